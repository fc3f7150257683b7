"""The in-process backplane: bounded rooms, presence and delivery, without a network."""
from chatserver import backplane
from chatserver.backplane import LocalBackplane


def test_empty_rooms_are_bounded_least_recently_used_first(monkeypatch):
    """Rooms nobody is in keep their history only up to EMPTY_ROOMS_KEPT, oldest dropped first;
    rooms with members are never dropped."""
    monkeypatch.setattr(backplane, "EMPTY_ROOMS_KEPT", 3)
    bp = LocalBackplane(history_size=10)
    bp.start(lambda event: None)
    bp.enter("kept", {"id": 1, "nick": "a"})
    bp.post("kept", {"id": 1, "nick": "a"}, "hello", 1.0)
    for n in range(10):
        bp.post("room%d" % n, {"id": 2, "nick": "b"}, "x", 1.0)
    bp.history("room7")  # used again: now the most recent
    bp.post("room10", {"id": 2, "nick": "b"}, "x", 1.0)
    assert set(bp._rooms) == {"kept", "room7", "room9", "room10"}
    assert [m["text"] for m in bp.history("kept")[0]] == ["hello"]


def test_posts_are_delivered_and_refs_deduplicated():
    """A post is handed to deliver once; the same idempotency key returns the stored message."""
    got = []
    bp = LocalBackplane(history_size=10)
    bp.start(got.append)
    first, fresh = bp.post("r", {"id": 1, "nick": "a"}, "hi", 1.0, "key-0001")
    again, fresh_again = bp.post("r", {"id": 1, "nick": "a"}, "hi", 2.0, "key-0001")
    assert fresh and not fresh_again and again is first
    assert got == [{"k": "msg", "message": first}]
