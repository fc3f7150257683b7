"""Room: per-room sequence ids, bounded history, idempotency refs and recovery."""
from chatserver.rooms import Room, message_cost

SENDER = {"id": 1, "nick": "Client 1"}


def fill(room, n, start_ts=100.0, refs=False):
    """Append ``n`` messages; with ``refs`` each carries ref 'ref-%08d' % its number."""
    out = []
    for i in range(n):
        ref = "ref-%08d" % (room.seq + 1) if refs else None
        out.append(room.append(SENDER, "m%d" % (room.seq + 1), start_ts + i, ref))
    return out


def test_sequence_ids_start_at_one_and_increase():
    """Message ids are 1, 2, 3, ... and seq follows them."""
    room = Room("dev", 10)
    msgs = fill(room, 3)
    assert [m["id"] for m in msgs] == [1, 2, 3]
    assert room.seq == 3


def test_message_shape():
    """A stored message has the contract's fields: type, room, id, from, text, ts."""
    room = Room("dev", 10)
    msg = room.append(SENDER, "hello", 12.5)
    assert msg == {"type": "message", "room": "dev", "id": 1, "from": SENDER, "text": "hello",
                   "ts": 12.5}
    assert list(room.history) == [msg]


def test_message_with_ref_carries_it():
    """A message appended with a ref keeps it and can be found by it."""
    room = Room("dev", 10)
    msg = room.append(SENDER, "hello", 1.0, "abcdefgh")
    assert msg["ref"] == "abcdefgh"
    assert room.find("abcdefgh") is msg
    assert room.find("other-ref") is None


def test_history_is_bounded_oldest_first():
    """History keeps only the latest history_size messages, oldest first."""
    room = Room("dev", 3)
    fill(room, 5)
    assert [m["id"] for m in room.history] == [3, 4, 5]
    assert room.seq == 5


def test_refs_forgotten_when_message_leaves_history():
    """An idempotency ref is forgotten exactly when its message drops out of history."""
    room = Room("dev", 2)
    fill(room, 2, refs=True)
    assert room.find("ref-00000001") is not None
    fill(room, 1, refs=True)
    assert room.find("ref-00000001") is None
    assert room.find("ref-00000002")["id"] == 2
    assert room.find("ref-00000003")["id"] == 3
    assert set(room.refs) == {"ref-00000002", "ref-00000003"}


def test_refs_do_not_grow_beyond_history():
    """Many messages with refs leave at most history_size refs behind."""
    room = Room("dev", 5)
    fill(room, 50, refs=True)
    assert len(room.refs) == 5
    assert sorted(m["id"] for m in room.refs.values()) == [46, 47, 48, 49, 50]


def test_messages_without_ref_evict_refs_too():
    """Plain messages pushing a ref'd message out of history also drop its ref."""
    room = Room("dev", 2)
    room.append(SENDER, "keyed", 1.0, "abcdefgh")
    fill(room, 2)
    assert room.find("abcdefgh") is None
    assert room.refs == {}


def test_history_size_zero_keeps_nothing():
    """With history_size 0 nothing is stored, ids still count and refs are not kept."""
    room = Room("dev", 0)
    msgs = [room.append(SENDER, "x", 1.0, "abcdefgh%d" % i) for i in range(3)]
    assert [m["id"] for m in msgs] == [1, 2, 3]
    assert list(room.history) == []
    assert room.refs == {}
    assert room.find("abcdefgh0") is None


def test_members_add_remove_len():
    """Members are keyed by client id; remove of a non-member is harmless."""
    class C:
        def __init__(self, id_):
            self.id = id_
    room = Room("dev", 1)
    a, b = C(1), C(2)
    room.add(a)
    room.add(b)
    room.add(a)
    assert len(room) == 2
    room.remove(a)
    room.remove(a)
    assert list(room.members) == [2]


def test_epochs_differ_between_rooms_unless_given():
    """Each new room gets its own random epoch; an explicit epoch is kept."""
    assert Room("a", 1).epoch != Room("a", 1).epoch
    assert isinstance(Room("a", 1).epoch, str) and Room("a", 1).epoch
    assert Room("a", 1, epoch="e1").epoch == "e1"


# -- recover() ----------------------------------------------------------------------------

def make_room():
    """A room with history_size 5 after 8 messages: history holds ids 4..8."""
    room = Room("dev", 5, epoch="E")
    fill(room, 8)
    return room


def ids(messages):
    return [m["id"] for m in messages]


def test_recover_without_since_gives_latest_not_recovered():
    """since=None gives the latest history and recovered False."""
    msgs, ok = make_room().recover(None, "E")
    assert ids(msgs) == [4, 5, 6, 7, 8]
    assert ok is False


def test_recover_wrong_epoch():
    """A different epoch (or none) gives the latest history and recovered False."""
    room = make_room()
    for epoch in ("other", None):
        msgs, ok = room.recover(6, epoch)
        assert ids(msgs) == [4, 5, 6, 7, 8]
        assert ok is False


def test_recover_since_inside_window():
    """since inside the window gives exactly the later messages and True."""
    room = make_room()
    assert (ids(room.recover(6, "E")[0]), room.recover(6, "E")[1]) == ([7, 8], True)
    assert (ids(room.recover(4, "E")[0]), room.recover(4, "E")[1]) == ([5, 6, 7, 8], True)


def test_recover_since_just_before_oldest():
    """since = oldest held id - 1 still recovers: every later message is held."""
    msgs, ok = make_room().recover(3, "E")
    assert ids(msgs) == [4, 5, 6, 7, 8]
    assert ok is True


def test_recover_since_equals_seq():
    """since == the latest id gives no messages and True."""
    msgs, ok = make_room().recover(8, "E")
    assert msgs == []
    assert ok is True


def test_recover_since_older_than_window():
    """since older than the window (a gap would be lost) gives the latest history and False."""
    room = make_room()
    for since in (2, 0):
        msgs, ok = room.recover(since, "E")
        assert ids(msgs) == [4, 5, 6, 7, 8]
        assert ok is False


def test_recover_since_in_the_future():
    """since > seq (the client saw another life of the room) gives latest history and False."""
    msgs, ok = make_room().recover(9, "E")
    assert ids(msgs) == [4, 5, 6, 7, 8]
    assert ok is False


def test_recover_new_room_since_zero():
    """A fresh room with since=0 in its epoch recovers nothing, successfully."""
    room = Room("dev", 5, epoch="E")
    assert room.recover(0, "E") == ([], True)


def test_recover_returns_a_copy():
    """Changing the returned list does not change the room's history."""
    room = make_room()
    msgs, _ = room.recover(None, "E")
    msgs.clear()
    assert len(room.history) == 5


def test_recover_with_history_size_zero():
    """Without history, only since == seq recovers; anything older cannot."""
    room = Room("dev", 0, epoch="E")
    fill(room, 3)
    assert room.recover(3, "E") == ([], True)
    assert room.recover(2, "E") == ([], False)


def test_size_counts_what_history_holds():
    """``size`` is the cost of the messages in history: it grows with each one, and shrinks
    when the oldest leave, whether pushed out by HISTORY_SIZE or dropped."""
    room = Room("dev", 2)
    first = room.append(SENDER, "a" * 1000, 1.0, "ref-first")
    assert room.size == message_cost(first) > 1000
    second = room.append(SENDER, "b", 2.0)
    third = room.append(SENDER, "c", 3.0)  # pushes the first out
    assert room.size == message_cost(second) + message_cost(third)
    assert room.find("ref-first") is None
    assert room.drop_oldest() == message_cost(second)
    assert list(room.history) == [third] and room.size == message_cost(third)
