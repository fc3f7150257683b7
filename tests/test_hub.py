"""The hub (client registry and fan-out) over the in-process backplane, driven with recording
fake clients: objects with id/nick/dialect/rooms/pending and a send() that keeps the frames."""
import json
import struct

import pytest

from chatserver import config, protocol
from chatserver.backplane import LocalBackplane
from chatserver.hub import JSON, PLAIN, Hub
from chatserver.protocol import ProtocolError


class FakeClient:
    """What the hub needs of a client: id, nick, dialect, rooms, pending, send(frame_bytes)
    and resync()."""

    def __init__(self, dialect=JSON):
        self.id = None
        self.nick = None
        self.dialect = dialect
        self.rooms = set()
        self.pending = {}
        self.frames = []
        self.resyncs = 0

    def send(self, frame):
        self.frames.append(frame)

    def resync(self):
        self.resyncs += 1

    def texts(self):
        """The text payloads received so far (and forget them)."""
        out = [payload(f) for f in self.frames]
        self.frames.clear()
        return out

    def objs(self):
        """The JSON objects received so far (and forget them)."""
        return [json.loads(t) for t in self.texts()]

    def last(self):
        """The one JSON object received since the last check."""
        got = self.objs()
        assert len(got) == 1, got
        return got[0]


def payload(frame):
    """The UTF-8 text of one unmasked, final text frame."""
    assert frame[0] == 0x81, "a final text frame"
    n = frame[1]
    assert not n & 0x80, "server frames are not masked"
    if n == 126:
        n, start = struct.unpack("!H", frame[2:4])[0], 4
    elif n == 127:
        n, start = struct.unpack("!Q", frame[2:10])[0], 10
    else:
        start = 2
    assert len(frame) == start + n
    return frame[start:].decode("utf-8")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make_hub(backplane_class=LocalBackplane, **env):
    clock = Clock()
    settings = config.load([], environ={k.upper(): str(v) for k, v in env.items()})
    hub = Hub(settings, backplane_class(settings.history_size, settings.history_bytes),
              clock=clock)
    hub.start()
    return hub, clock


@pytest.fixture
def hub():
    return make_hub()[0]


def connect(hub, dialect=JSON):
    """Register a fake client; returns (client, welcome or None for plain clients)."""
    client = FakeClient(dialect)
    hub.register(client)
    welcome = client.objs()[0] if dialect == JSON else None
    assert client.frames == []
    return client, welcome


def join(hub, client, name, since=None, epoch=None):
    """hub.join() and the 'joined' answer the client got."""
    client.frames.clear()
    hub.join(client, name, since, epoch)
    got = client.objs()
    assert got and got[0]["type"] == "joined", got
    return got[0]


def clear(*clients):
    for c in clients:
        c.frames.clear()


def who(client):
    return {"id": client.id, "nick": client.nick}


# -- register -----------------------------------------------------------------------------

def test_register_gives_sequential_ids_and_default_nicks(hub):
    """Connections get ids 1, 2, 3, ... and the nick 'Client N', and start in the lobby."""
    clients = [connect(hub, d)[0] for d in (JSON, PLAIN, JSON)]
    assert [c.id for c in clients] == [1, 2, 3]
    assert [c.nick for c in clients] == ["Client 1", "Client 2", "Client 3"]
    assert len(hub) == 3
    assert all(c.rooms == {"lobby"} for c in clients)


def test_welcome_is_the_first_frame_and_carries_lobby_state(hub):
    """A JSON client's first frame is welcome: id, nick, room lobby, members, member_count, history, epoch."""
    a, _ = connect(hub)
    b = FakeClient(JSON)
    hub.register(b)
    assert len(b.frames) == 1
    welcome = json.loads(payload(b.frames[0]))
    assert welcome["type"] == "welcome"
    assert welcome["id"] == b.id == 2
    assert welcome["nick"] == "Client 2"
    assert welcome["room"] == "lobby"
    assert welcome["members"] == [who(a), who(b)]
    assert welcome["member_count"] == 2
    assert welcome["history"] == []
    assert isinstance(welcome["epoch"], str) and welcome["epoch"]


def test_plain_client_gets_no_welcome(hub):
    """A plain-text client gets no frame when it connects."""
    p = FakeClient(PLAIN)
    hub.register(p)
    assert p.frames == []


def test_welcome_history_has_earlier_lobby_messages(hub):
    """A newcomer's welcome carries the lobby's latest messages, oldest first."""
    a, _ = connect(hub)
    hub.say(a, "lobby", "one")
    hub.say(a, "lobby", "two")
    _, welcome = connect(hub)
    assert [m["text"] for m in welcome["history"]] == ["one", "two"]
    assert [m["id"] for m in welcome["history"]] == [1, 2]
    assert all(m["type"] == "message" and m["room"] == "lobby" for m in welcome["history"])


def test_register_tells_the_others(hub):
    """Others get a presence join (JSON) or 'Client N connected.' (plain); the newcomer gets only its welcome."""
    j, _ = connect(hub, JSON)
    p, _ = connect(hub, PLAIN)
    assert j.objs() == [{"type": "presence", "room": "lobby", "event": "join",
                         "member": {"id": 2, "nick": "Client 2"}}]
    assert p.frames == []
    n, _ = connect(hub, JSON)
    assert j.objs() == [{"type": "presence", "room": "lobby", "event": "join",
                         "member": {"id": 3, "nick": "Client 3"}}]
    assert p.texts() == ["Client 3 connected."]
    assert n.frames == []


def test_lobby_epoch_is_shared_while_it_has_members(hub):
    """Everyone connected at the same time sees the same lobby epoch."""
    _, w1 = connect(hub)
    _, w2 = connect(hub)
    assert w1["epoch"] == w2["epoch"]


# -- say ----------------------------------------------------------------------------------

def test_say_relays_one_encoded_frame_to_every_json_member():
    """say() hands the very same bytes object to every JSON recipient, plain text to plain ones, none to the sender."""
    hub, clock = make_hub()
    sender, _ = connect(hub)
    others = [connect(hub)[0] for _ in range(3)]
    plains = [connect(hub, PLAIN)[0] for _ in range(2)]
    clear(sender, *others, *plains)
    clock.now = 1234.5
    hub.say(sender, "lobby", "Hello World!")
    assert sender.frames == []
    assert all(len(c.frames) == 1 for c in others + plains)
    first = others[0].frames[0]
    assert all(c.frames[0] is first for c in others), "encoded once: the same bytes object"
    msg = json.loads(payload(first))
    assert {k: msg[k] for k in ("type", "room", "id", "from", "text", "ts")} == {
        "type": "message", "room": "lobby", "id": 1, "from": {"id": 1, "nick": "Client 1"},
        "text": "Hello World!", "ts": 1234.5}
    assert plains[0].frames[0] is plains[1].frames[0]
    assert payload(plains[0].frames[0]) == 'Client 1 says "Hello World!"'


def test_say_from_plain_client_reaches_json_clients(hub):
    """A plain client's lobby message reaches JSON clients as a message object with its id."""
    j, _ = connect(hub, JSON)
    p, _ = connect(hub, PLAIN)
    clear(j)
    assert hub.say(p, "lobby", 'quote " and é') is None, "plain clients get no ack"
    msg = j.last()
    assert msg["type"] == "message"
    assert msg["from"] == {"id": p.id, "nick": p.nick}
    assert msg["text"] == 'quote " and é'
    assert p.frames == []


def test_say_outside_lobby_reaches_no_plain_client(hub):
    """Plain clients get plain text only for the lobby, even as members of another room."""
    a, _ = connect(hub, JSON)
    b, _ = connect(hub, JSON)
    p, _ = connect(hub, PLAIN)
    for c in (a, b, p):
        hub.join(c, "dev")
    clear(a, b, p)
    hub.say(a, "dev", "hi dev")
    assert p.frames == []
    assert [(m["room"], m["text"]) for m in b.objs()] == [("dev", "hi dev")]
    assert a.frames == []


def test_say_does_not_reach_other_rooms(hub):
    """A message in one room does not reach clients that are not in it."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    hub.leave(b, "lobby")
    clear(b)
    hub.say(a, "dev", "only dev")
    hub.say(a, "lobby", "only lobby")
    assert b.frames == []


def test_say_returns_ack():
    """say() returns an ack with ref, room, id (the room's sequence) and ts."""
    hub, clock = make_hub()
    a, _ = connect(hub)
    clock.now = 50.25
    assert hub.say(a, "lobby", "one", "r1") == {"type": "ack", "ref": "r1", "room": "lobby",
                                                "id": 1, "ts": 50.25}
    clock.now = 51.0
    ack = hub.say(a, "lobby", "two")
    assert (ack["type"], ack["room"], ack["id"], ack["ts"]) == ("ack", "lobby", 2, 51.0)
    hub.join(a, "dev")
    assert hub.say(a, "dev", "three", 7)["id"] == 1, "ids count per room"


def test_idempotent_resend_returns_original_ack_and_relays_nothing():
    """A resent message with the same 8-64 char ref returns the first ack and is neither stored nor relayed."""
    hub, clock = make_hub()
    a, _ = connect(hub)
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    ref = "3f2b1c4d-0000-4000-8000-000000000001"
    clock.now = 10.0
    first = hub.say(a, "lobby", "once", ref)
    clear(a, b, p)
    clock.now = 20.0
    again = hub.say(a, "lobby", "once", ref)
    assert again == first == {"type": "ack", "ref": ref, "room": "lobby", "id": 1, "ts": 10.0}
    assert a.frames == [] and b.frames == [] and p.frames == []
    _, welcome = connect(hub)
    assert [m["text"] for m in welcome["history"]] == ["once"], "stored once"
    assert hub.say(a, "lobby", "next")["id"] == 2


@pytest.mark.parametrize("ref", ["12345678", "k" * 64])
def test_idempotency_key_boundaries(hub, ref):
    """Refs of exactly 8 and 64 characters are idempotency keys."""
    a, _ = connect(hub)
    first = hub.say(a, "lobby", "x", ref)
    assert hub.say(a, "lobby", "x", ref) == first
    assert hub.say(a, "lobby", "y")["id"] == 2


@pytest.mark.parametrize("ref", ["1234567", "", 12345678])
def test_short_or_integer_ref_is_not_an_idempotency_key(hub, ref):
    """A ref shorter than 8 characters (or an integer) is only echoed: a resend is a new message."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    clear(b)
    first = hub.say(a, "lobby", "x", ref)
    second = hub.say(a, "lobby", "x", ref)
    assert (first["id"], second["id"]) == (1, 2)
    assert first["ref"] == second["ref"] == ref
    assert len(b.frames) == 2


def test_idempotency_key_forgotten_after_leaving_history():
    """Once its message has left the history window, a ref makes a fresh message again."""
    hub, _ = make_hub(history_size=2)
    a, _ = connect(hub)
    hub.say(a, "lobby", "keyed", "abcdefgh")
    hub.say(a, "lobby", "x")
    hub.say(a, "lobby", "y")
    assert hub.say(a, "lobby", "keyed", "abcdefgh")["id"] == 4


@pytest.mark.parametrize("action", ["say", "typing", "leave"])
def test_not_in_room(hub, action):
    """say, typing and leave in a room the client is not in raise not_in_room and tell nobody."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(b, "dev")
    clear(a, b)
    call = {"say": lambda: hub.say(a, "dev", "hi"), "typing": lambda: hub.typing(a, "dev"),
            "leave": lambda: hub.leave(a, "dev")}[action]
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.code == "not_in_room"
    assert a.frames == [] and b.frames == []
    assert "dev" not in a.rooms


def test_say_after_leaving_lobby_is_not_in_room(hub):
    """After leaving the lobby a client can no longer say there."""
    a, _ = connect(hub)
    hub.leave(a, "lobby")
    with pytest.raises(ProtocolError) as info:
        hub.say(a, "lobby", "hi")
    assert info.value.code == "not_in_room"


# -- join / leave -------------------------------------------------------------------------

def test_join_answer_and_presence(hub):
    """join answers 'joined' with the room's state; members get a presence join, the joiner no echo."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    hub.say(a, "dev", "first")
    clear(a, b)
    joined = join(hub, b, "dev")
    assert joined["room"] == "dev"
    assert joined["members"] == [who(a), who(b)]
    assert joined["member_count"] == 2
    assert [m["text"] for m in joined["history"]] == ["first"]
    assert isinstance(joined["epoch"], str) and joined["epoch"]
    assert joined["recovered"] is False
    assert a.objs() == [{"type": "presence", "room": "dev", "event": "join", "member": who(b)}]
    assert b.frames == []
    assert b.rooms == {"lobby", "dev"}


def test_join_again_is_fine_and_silent(hub):
    """Joining a room you are already in answers again without a second presence notice."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    hub.join(b, "dev")
    clear(a)
    again = join(hub, b, "dev")
    assert again["member_count"] == 2
    assert a.frames == []


def test_join_with_since_and_epoch_recovers(hub):
    """join with since/epoch gets exactly the missed messages and recovered true; a wrong epoch does not."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    epoch = join(hub, b, "dev")["epoch"]
    for t in ("1", "2", "3"):
        hub.say(a, "dev", t)
    hub.leave(b, "dev")
    hub.say(a, "dev", "4")
    hub.say(a, "dev", "5")
    joined = join(hub, b, "dev", since=3, epoch=epoch)
    assert joined["recovered"] is True
    assert [m["text"] for m in joined["history"]] == ["4", "5"]
    other = join(hub, b, "dev", since=3, epoch="not-the-epoch")
    assert other["recovered"] is False
    assert [m["text"] for m in other["history"]] == ["1", "2", "3", "4", "5"]


def test_answers_carry_the_newest_history_that_fits_and_say_when_some_is_missing(hub):
    """A welcome or joined carries at most about 1 MiB of history as JSON, newest kept: control
    characters escaped six times over cannot make each answer a room's whole history. A
    recovery that would need more says recovered: false."""
    a, _ = connect(hub)
    epoch = join(hub, a, "dev")["epoch"]
    for n in range(20):
        hub.say(a, "dev", "%02d%s" % (n, "\x01" * 30000))  # about 180 KB each as JSON
        hub.say(a, "lobby", "%02d%s" % (n, "\x01" * 30000))
    joined = join(hub, a, "dev", since=0, epoch=epoch)
    texts = [m["text"][:2] for m in joined["history"]]
    assert texts == ["%02d" % n for n in range(20 - len(texts), 20)] and 3 <= len(texts) <= 6
    assert joined["recovered"] is False
    assert len(protocol.encode(joined)) < 1.3 * (1 << 20)
    assert join(hub, a, "dev", since=18, epoch=epoch)["recovered"] is True
    b, welcome = connect(hub)
    assert 3 <= len(welcome["history"]) <= 6 and welcome["history"][-1]["text"][:2] == "19"


def test_a_gap_asks_json_members_to_reconnect_and_lifts_plain_floors(hub):
    """When the backplane reports that a room's messages were missed (a "gap" after an outage),
    its JSON members are asked to reconnect; plain members forget their floor, so the first
    ids of a new epoch reach them."""
    a, _ = connect(hub)
    hub.say(a, "lobby", "one")
    j, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    assert p.pending == {"lobby": 1}  # ids up to 1 were in its answer
    check_groups(hub)
    hub.deliver({"k": "gap", "room": "lobby"})
    assert (a.resyncs, j.resyncs, p.resyncs) == (1, 1, 0)
    assert p.pending == {}
    check_groups(hub)
    clear(p)
    hub.deliver({"k": "msg", "message": {"type": "message", "room": "lobby", "id": 1, "ts": 1.0,
                                         "from": {"id": a.id, "nick": a.nick}, "text": "anew"}})
    assert p.texts() == ['Client %d says "anew"' % a.id]


def test_room_without_members_or_history_starts_a_new_epoch(hub):
    """A room that emptied without history is forgotten; joining again starts a new epoch."""
    a, _ = connect(hub)
    first = join(hub, a, "dev")["epoch"]
    hub.leave(a, "dev")
    assert join(hub, a, "dev")["epoch"] != first


def test_empty_room_with_history_is_kept_for_recovery(hub):
    """A room whose members all left keeps its history and epoch for people who come back."""
    a, _ = connect(hub)
    epoch = join(hub, a, "dev")["epoch"]
    hub.say(a, "dev", "kept")
    hub.leave(a, "dev")
    joined = join(hub, a, "dev", since=0, epoch=epoch)
    assert joined["epoch"] == epoch
    assert joined["recovered"] is True
    assert [m["text"] for m in joined["history"]] == ["kept"]


def test_leave_answer_and_presence(hub):
    """leave returns 'left'; remaining members get a presence leave; the leaver gets nothing."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    for c in (a, b):
        hub.join(c, "dev")
    clear(a, b, p)
    assert hub.leave(b, "dev") == {"type": "left", "room": "dev"}
    assert a.objs() == [{"type": "presence", "room": "dev", "event": "leave", "member": who(b)}]
    assert b.frames == [] and p.frames == []
    assert b.rooms == {"lobby"}
    hub.say(a, "dev", "after")
    assert b.frames == [], "a client that left gets no more messages from the room"


def test_leaving_lobby_tells_plain_clients(hub):
    """Leaving the lobby is announced to plain clients as 'Client N disconnected.'."""
    a, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    hub.leave(a, "lobby")
    assert p.texts() == ["Client 1 disconnected."]


def test_max_rooms():
    """A connection in max_rooms rooms (the lobby counts) gets too_many_rooms; rejoining is fine."""
    hub, _ = make_hub(max_rooms=2)
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "one")
    hub.join(b, "two")
    clear(a, b)
    with pytest.raises(ProtocolError) as info:
        hub.join(a, "two")
    assert info.value.code == "too_many_rooms"
    assert a.rooms == {"lobby", "one"}
    assert a.frames == [] and b.frames == [], "no joined answer and no presence"
    assert join(hub, a, "one")["room"] == "one"
    hub.leave(a, "one")
    assert join(hub, a, "two")["room"] == "two"


# -- presence limit -----------------------------------------------------------------------

def test_presence_limit_silences_big_rooms():
    """Above PRESENCE_LIMIT the joiner produces no notices; members lists are capped, member_count is true."""
    hub, _ = make_hub(presence_limit=2)
    a, _ = connect(hub, JSON)
    b, _ = connect(hub, PLAIN)
    assert a.last()["event"] == "join", "the second member is still announced"
    c, welcome = connect(hub, JSON)
    assert a.frames == [] and b.frames == [], "the third joiner produces no notices"
    assert welcome["member_count"] == 3
    assert len(welcome["members"]) == 2
    assert all(m in [who(a), who(b), who(c)] for m in welcome["members"])
    joined = join(hub, a, "lobby")
    assert joined["member_count"] == 3 and len(joined["members"]) == 2


def test_presence_limit_applies_to_joined_rooms():
    """In another room, the third joiner above PRESENCE_LIMIT 2 is not announced."""
    hub, _ = make_hub(presence_limit=2)
    a, _ = connect(hub)
    b, _ = connect(hub)
    c, _ = connect(hub)
    hub.join(a, "dev")
    hub.join(b, "dev")
    clear(a, b)
    joined = join(hub, c, "dev")
    assert a.frames == [] and b.frames == []
    assert joined["member_count"] == 3 and len(joined["members"]) == 2


def test_presence_limit_silences_nick_and_leave():
    """In a room above PRESENCE_LIMIT, renames and leaves are not announced either."""
    hub, _ = make_hub(presence_limit=2)
    a, _ = connect(hub)
    b, _ = connect(hub, PLAIN)
    c, _ = connect(hub)
    clear(a, b)
    hub.rename(c, "Carol")
    assert a.frames == [] and b.frames == []
    hub.unregister(c)
    assert a.frames == [] and b.frames == [], "the room had 3 members when c left"
    hub.unregister(b)
    assert a.objs() == [{"type": "presence", "room": "lobby", "event": "leave",
                         "member": {"id": 2, "nick": "Client 2"}}]


def test_presence_limit_zero_sends_no_notices():
    """PRESENCE_LIMIT 0 turns join/leave notices off and members lists are empty."""
    hub, _ = make_hub(presence_limit=0)
    a, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    _, welcome = connect(hub)
    hub.unregister(p)
    assert a.frames == []
    assert welcome["members"] == [] and welcome["member_count"] == 3


def test_messages_still_flow_above_presence_limit():
    """The presence limit silences notices, not messages."""
    hub, _ = make_hub(presence_limit=1)
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.say(b, "lobby", "hi")
    assert [m["text"] for m in a.objs()] == ["hi"]


# -- rename, typing, direct ---------------------------------------------------------------

def test_rename(hub):
    """rename tells the others in each shared room with a nick presence and returns a nick answer."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    hub.join(a, "dev")
    hub.join(b, "dev")
    clear(a, b, p)
    assert hub.rename(a, "Ada") == {"type": "nick", "id": 1, "nick": "Ada"}
    assert a.nick == "Ada"
    got = b.objs()
    assert sorted(o["room"] for o in got) == ["dev", "lobby"]
    assert all(o == {"type": "presence", "room": o["room"], "event": "nick",
                     "member": {"id": 1, "nick": "Ada"}} for o in got)
    assert a.frames == [] and p.frames == [], "plain clients get no nick notice"
    hub.say(a, "dev", "hi")
    assert b.last()["from"] == {"id": 1, "nick": "Ada"}
    _, welcome = connect(hub)
    assert {"id": 1, "nick": "Ada"} in welcome["members"]


def test_typing_relays_and_is_not_stored(hub):
    """typing reaches the other JSON members of the room and is not stored in history."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    clear(a, b, p)
    assert hub.typing(a, "lobby") is None
    assert b.objs() == [{"type": "typing", "room": "lobby", "from": who(a)}]
    assert a.frames == [] and p.frames == []
    _, welcome = connect(hub)
    assert welcome["history"] == []


def test_direct_to_unknown_client(hub):
    """direct to an id nobody has raises no_such_client."""
    a, _ = connect(hub)
    with pytest.raises(ProtocolError) as info:
        hub.direct(a, 99, "hello?")
    assert info.value.code == "no_such_client"


def test_direct_to_json_client():
    """A JSON target gets a direct object with from, text and ts; nobody else gets anything."""
    hub, clock = make_hub()
    a, _ = connect(hub)
    b, _ = connect(hub)
    c, _ = connect(hub)
    clear(a, b, c)
    clock.now = 77.0
    hub.direct(a, b.id, "psst")
    assert b.objs() == [{"type": "direct", "from": who(a), "text": "psst", "ts": 77.0}]
    assert a.frames == [] and c.frames == []


def test_direct_to_plain_client(hub):
    """A plain target gets 'Client N whispers "..."'."""
    a, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    clear(a, p)
    hub.direct(a, p.id, "psst")
    assert p.texts() == ['Client 1 whispers "psst"']
    assert a.frames == []


def test_direct_reaches_client_outside_shared_rooms(hub):
    """A direct message needs no shared room."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.leave(b, "lobby")
    clear(b)
    hub.direct(a, b.id, "still here?")
    assert [o["text"] for o in b.objs()] == ["still here?"]


def test_direct_to_disconnected_client(hub):
    """After unregister, a client's id is no_such_client."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.unregister(b)
    with pytest.raises(ProtocolError) as info:
        hub.direct(a, b.id, "gone?")
    assert info.value.code == "no_such_client"


# -- unregister ---------------------------------------------------------------------------

def test_unregister_announces_and_empties_rooms(hub):
    """unregister tells every room (presence leave / 'Client N disconnected.') and removes the client."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    hub.join(a, "dev")
    hub.join(b, "dev")
    clear(a, b, p)
    hub.unregister(a)
    got = b.objs()
    assert sorted(o["room"] for o in got) == ["dev", "lobby"]
    assert all(o["type"] == "presence" and o["event"] == "leave"
               and o["member"] == {"id": 1, "nick": "Client 1"} for o in got)
    assert p.texts() == ["Client 1 disconnected."]
    assert a.rooms == set()
    assert a.frames == []
    assert len(hub) == 2
    assert hub.connections() == (b, p)
    _, welcome = connect(hub)
    assert who(a) not in welcome["members"]
    assert join(hub, b, "dev")["members"] == [who(b)]


def test_unregister_twice_is_harmless(hub):
    """A second unregister (or one of a never-registered client) does nothing."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.unregister(a)
    clear(b)
    hub.unregister(a)
    hub.unregister(FakeClient())
    assert b.frames == []
    assert len(hub) == 1


def test_stats_and_connections(hub):
    """stats() counts connections and rooms with members; connections() is a snapshot."""
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    assert hub.stats()["connections"] == 2
    assert hub.stats()["rooms"] == 2
    snapshot = hub.connections()
    hub.unregister(a)
    assert snapshot == (a, b)
    assert hub.connections() == (b,)
    assert hub.stats()["connections"] == 1
    assert hub.stats()["rooms"] == 1


# -- events that arrive while a join is answered ------------------------------------------

class RacyBackplane(LocalBackplane):
    """A LocalBackplane on which another member speaks while a join reads the history:
    ``before`` messages land in the history the answer carries, ``after`` ones just after."""

    speaker = None
    before = after = ()

    def history(self, room, since=None, epoch=None, budget=None):
        speaker, type(self).speaker = type(self).speaker, None
        if speaker is not None:
            for text in self.before:
                self.post(room, {"id": speaker.id, "nick": speaker.nick}, text, 1.0)
        result = super().history(room, since, epoch, budget)
        if speaker is not None:
            for text in self.after:
                self.post(room, {"id": speaker.id, "nick": speaker.nick}, text, 2.0)
        return result


def test_messages_during_join_come_after_the_answer_exactly_once():
    """Messages stored while a join is answered reach the joiner after 'joined', none twice, none lost."""
    hub, _ = make_hub(RacyBackplane)
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    RacyBackplane.before, RacyBackplane.after = ("early",), ("late",)
    RacyBackplane.speaker = a
    clear(b)
    hub.join(b, "dev")
    got = b.objs()
    assert got[0]["type"] == "joined"
    assert [m["text"] for m in got[0]["history"]] == ["early"]
    rest = [o for o in got[1:] if o["type"] == "message"]
    assert [m["text"] for m in rest] == ["late"]
    assert all(o["type"] != "joined" for o in got[1:])
    check_groups(hub)


# -- the fan-out's groups -------------------------------------------------------------------

def check_groups(hub):
    """Each room's group of a dialect holds its members of that dialect for which nothing of
    the room waits (no join being answered, no floor)."""
    assert hub.groups.keys() == hub.local.keys()
    for room, members in hub.local.items():
        for dialect in (JSON, PLAIN):
            want = {c.id for c in members.values() if c.dialect == dialect and room not in c.pending}
            assert {c.id for c in hub.groups[room][dialect]._members} == want, (room, dialect)


def test_a_member_waits_outside_its_group_until_its_floor_is_passed():
    """A joiner whose answer held the room's history takes the next message once, from the
    fan-out's per-member path, and the ones after it with its group."""
    hub, _ = make_hub()
    a, _ = connect(hub)
    hub.say(a, "lobby", "one")
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    assert b.pending == {"lobby": 1} and p.pending == {"lobby": 1}
    check_groups(hub)
    clear(b, p)
    hub.say(a, "lobby", "two")
    assert [o["text"] for o in b.objs()] == ["two"]
    assert p.texts() == ['Client %d says "two"' % a.id]
    assert b.pending == {} and p.pending == {}
    check_groups(hub)
    hub.say(a, "lobby", "three")
    assert [o["text"] for o in b.objs()] == ["three"]
    assert p.texts() == ['Client %d says "three"' % a.id]


def test_groups_follow_joins_leaves_and_ends():
    hub, _ = make_hub(RacyBackplane)
    a, _ = connect(hub)
    b, _ = connect(hub)
    p, _ = connect(hub, PLAIN)
    check_groups(hub)
    hub.join(a, "dev")
    hub.say(a, "dev", "first")
    check_groups(hub)
    RacyBackplane.before, RacyBackplane.after = ("early",), ("late",)
    RacyBackplane.speaker = a
    hub.join(b, "dev")  # answered with a floor: "late" came meanwhile
    assert b.pending["dev"].__class__ is int
    check_groups(hub)
    hub.join(b, "dev")  # again: its floor goes with the new answer
    check_groups(hub)
    clear(a, b)
    hub.say(a, "dev", "to b")
    assert [o["text"] for o in b.objs() if o["type"] == "message"] == ["to b"]
    assert a.objs() == []  # the sender is skipped
    check_groups(hub)
    RacyBackplane.before, RacyBackplane.after = (), ("during",)
    RacyBackplane.speaker = b
    hub.join(a, "dev")  # again, while in its group: out of it until the answer is sent
    got = a.objs()
    assert got[0]["type"] == "joined"
    assert [o["text"] for o in got if o["type"] == "message"] == ["during"]
    check_groups(hub)
    hub.leave(b, "dev")
    check_groups(hub)
    hub.unregister(a)
    assert "dev" not in hub.groups
    check_groups(hub)
    hub.unregister(p)
    hub.unregister(b)
    assert hub.groups == {} and hub.local == {}


class SpeakingOnExit(LocalBackplane):
    """A LocalBackplane on which, while a client's leave of its first room is stored, a
    message of the client's in its other room comes through (the Redis one may yield there)."""

    def exit(self, room, member_id, nick=None):
        size = super().exit(room, member_id, nick)
        if member_id == 1 and not getattr(self, "spoke", False):
            self.spoke = True
            other = "dev" if room == "lobby" else "lobby"
            self.post(other, {"id": member_id, "nick": nick}, "late", 3.0)
        return size


def test_a_leaving_client_is_not_sent_its_own_late_message():
    hub, _ = make_hub(SpeakingOnExit)
    a, _ = connect(hub)
    b, _ = connect(hub)
    hub.join(a, "dev")
    hub.join(b, "dev")
    clear(a, b)
    hub.unregister(a)
    assert [o for o in a.objs() if o["type"] == "message"] == []
    assert [o["text"] for o in b.objs() if o["type"] == "message"] == ["late"]


class FailingExit(LocalBackplane):
    """A LocalBackplane whose store fails, unexpectedly, on one room's leave."""

    def exit(self, room, member_id, nick=None):
        if room == "dev":
            raise RuntimeError("the store failed")
        return super().exit(room, member_id, nick)


def test_a_client_leaves_every_room_even_when_one_leave_fails(caplog):
    hub, _ = make_hub(FailingExit)
    a, _ = connect(hub)
    b, _ = connect(hub)
    for name in ("dev", "ops"):
        hub.join(a, name)
        hub.join(b, name)
    hub.unregister(a)
    assert all(a.id not in members for members in hub.local.values())
    check_groups(hub)
    assert "leaving room dev failed" in caplog.text
