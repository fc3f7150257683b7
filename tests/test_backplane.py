"""The in-process backplane: bounded rooms, presence and delivery, without a network."""
from chatserver import backplane
from chatserver.backplane import LocalBackplane


def test_empty_rooms_are_bounded_least_recently_used_first(monkeypatch):
    """Rooms nobody is in keep their history only up to EMPTY_ROOMS_KEPT, oldest dropped first;
    rooms with members are never dropped."""
    monkeypatch.setattr(backplane, "EMPTY_ROOMS_KEPT", 3)
    bp = LocalBackplane(history_size=10, history_bytes=1 << 20)
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
    bp = LocalBackplane(history_size=10, history_bytes=1 << 20)
    bp.start(got.append)
    first, fresh = bp.post("r", {"id": 1, "nick": "a"}, "hi", 1.0, "key-0001")
    again, fresh_again = bp.post("r", {"id": 1, "nick": "a"}, "hi", 2.0, "key-0001")
    assert fresh and not fresh_again and again is first
    assert got == [{"k": "msg", "message": first}]


def held(bp):
    """What the backplane says its history holds, checked against the rooms themselves."""
    total = bp.health()["history_bytes"]
    assert total == sum(room.size for room in bp._rooms.values())
    # A trim finds the room that holds the most in a heap, kept once the budget was first
    # reached: each room with history must be in it at its current size.
    if bp._budget_met:
        assert {(-room.size, name) for name, room in bp._rooms.items() if room.history} \
            <= set(bp._largest)
    return total


SENDER = {"id": 1, "nick": "a"}


def test_history_stays_within_its_byte_budget():
    """Past HISTORY_BYTES the rooms that hold the most lose their oldest messages first: a
    flood of large messages in other rooms leaves a room of ordinary chat, and its
    idempotency keys, as they were."""
    bp = LocalBackplane(history_size=100, history_bytes=2000000)
    bp.start(lambda event: None)
    for n in range(100):
        bp.post("chat", SENDER, "hello %d" % n, float(n), "key-%08d" % n)
    chat = held(bp)
    for n in range(400):
        bp.post("flood%d" % (n % 20), SENDER, "x" * 20000, float(n))
        assert held(bp) <= 2000000
    assert [m["id"] for m in bp.history("chat")[0]] == list(range(1, 101))
    assert bp.post("chat", SENDER, "hello 0", 0.0, "key-00000000")[1] is False
    floods = [bp._rooms["flood%d" % n].size for n in range(20)]
    share = (2000000 - chat) / 20
    assert all(share - 25000 < size <= share + 25000 for size in floods), (share, floods)
    for n in range(2000):  # rooms in use without history do not slow a trim down
        bp.enter("quiet%d" % n, {"id": 2, "nick": "b"})
        bp.history("quiet%d" % n)
    bp.post("flood0", SENDER, "x" * 20000, 0.0)
    assert held(bp) <= 2000000
    assert len(bp._largest) <= 2 * len(bp._rooms) + 64


def test_a_message_bigger_than_the_budget_is_still_kept():
    """The newest message stays even when it alone exceeds the budget: a join after it still
    sees it, and the room's older messages are gone."""
    bp = LocalBackplane(history_size=10, history_bytes=65536)
    bp.start(lambda event: None)
    bp.post("other", SENDER, "z" * 1000, 1.0)
    bp.post("r", SENDER, "small", 1.0, "key-small")
    bp.post("r", SENDER, "y" * 70000, 2.0)
    assert [m["id"] for m in bp.history("r")[0]] == [2]
    assert bp._rooms["r"].find("key-small") is None
    assert bp.history("other")[0] == []
    assert held(bp) > 65536


def test_evicted_rooms_give_their_bytes_back(monkeypatch):
    """Dropping an empty room (EMPTY_ROOMS_KEPT) frees its history from the budget's count."""
    monkeypatch.setattr(backplane, "EMPTY_ROOMS_KEPT", 1)
    bp = LocalBackplane(history_size=10, history_bytes=1 << 20)
    bp.start(lambda event: None)
    for n in range(4):
        bp.post("room%d" % n, SENDER, "z" * 1000, 1.0)
    assert set(bp._rooms) == {"room3"}
    assert held(bp) == bp._rooms["room3"].size
