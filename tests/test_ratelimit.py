"""TokenBucket: bursts, refill at the rate, and rate 0 meaning no limit."""
from chatserver.ratelimit import TokenBucket


def test_burst_then_empty():
    """A full bucket allows exactly ``burst`` messages at one instant."""
    bucket = TokenBucket(rate=2, burst=3, now=100.0)
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]


def test_refill_at_rate():
    """After emptying, one token comes back every 1/rate seconds."""
    bucket = TokenBucket(rate=2, burst=3, now=0.0)
    for _ in range(3):
        assert bucket.allow(0.0)
    assert not bucket.allow(0.0)
    assert not bucket.allow(0.25), "half a token is not enough"
    assert bucket.allow(0.5)
    assert not bucket.allow(0.5)
    assert bucket.allow(1.0)
    assert not bucket.allow(1.0)


def test_refill_is_capped_at_burst():
    """A long pause refills the bucket only up to ``burst``."""
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.allow(0.0) and bucket.allow(0.0)
    results = [bucket.allow(1000.0) for _ in range(3)]
    assert results == [True, True, False]


def test_steady_rate_is_sustained():
    """Sending exactly at the rate is always allowed once the burst is spent."""
    bucket = TokenBucket(rate=4, burst=1, now=0.0)
    assert bucket.allow(0.0)
    assert all(bucket.allow(i * 0.25) for i in range(1, 41))
    assert not bucket.allow(10.0)


def test_denied_attempts_do_not_cost_tokens():
    """Refused attempts do not push the next allowed time further out."""
    bucket = TokenBucket(rate=1, burst=1, now=0.0)
    assert bucket.allow(0.0)
    for t in (0.1, 0.2, 0.5, 0.9):
        assert not bucket.allow(t)
    assert bucket.allow(1.0)


def test_rate_zero_allows_everything():
    """rate 0 turns the limit off: any number of messages at one instant is allowed."""
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(1000))
    bucket = TokenBucket(rate=0.0, burst=1, now=0.0)
    assert all(bucket.allow(5.0) for _ in range(100))
