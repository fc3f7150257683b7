"""A token bucket: ``rate`` messages per second with bursts of up to ``burst``."""


class TokenBucket:
    """Allows ``burst`` messages at once, refilled at ``rate`` per second; rate 0 allows all."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def allow(self, now):
        """Take one token; False when the bucket is empty."""
        if not self.rate:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
