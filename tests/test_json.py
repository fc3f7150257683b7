"""The JSON v1 dialect (`chat.v1`): every row of the contract's tables, over a live server."""
import json
import uuid

import pytest


def test_welcome_is_the_first_frame(server, clients):
    """`welcome` carries id, nick `Client <id>`, room lobby, members, member_count, history,
    epoch, and the largest message the server takes (MAX_MESSAGE_SIZE)."""
    a = clients.json(server)
    w = a.welcome
    assert w["max_message_size"] == 65536
    assert w["nick"] == "Client %d" % w["id"]
    assert w["room"] == "lobby"
    assert w["members"] == [{"id": w["id"], "nick": w["nick"]}]
    assert w["member_count"] == 1
    assert w["history"] == []
    assert isinstance(w["epoch"], str) and w["epoch"]
    b = clients.json(server)
    assert b.id != a.id
    assert {m["id"] for m in b.welcome["members"]} == {a.id, b.id}


def test_message_ack_and_sequence_ids(server, clients):
    """A message reaches the others with a per-room id; the sender gets an `ack`, not the message."""
    a, b = clients.json(server), clients.json(server)
    a.wait("presence", event="join")
    for n in (1, 2, 3):
        a.send(type="message", text="hello %d" % n, ref="k%d" % n)
        ack = a.recv()
        assert ack["type"] == "ack" and ack["ref"] == "k%d" % n
        assert ack["room"] == "lobby" and ack["id"] == n
        msg = b.wait("message")
        assert msg["id"] == n and msg["text"] == "hello %d" % n
        assert msg["from"] == {"id": a.id, "nick": a.welcome["nick"]}
        assert msg["ts"] == ack["ts"] and isinstance(msg["ts"], float)
    assert a.quiet() is None


def test_history_in_welcome_is_bounded(start_server, clients):
    """New clients see the latest HISTORY_SIZE messages, oldest first."""
    server = start_server(env={"HISTORY_SIZE": "3", "RATE_LIMIT": "0"})
    a = clients.json(server)
    for n in range(5):
        a.send(type="message", text="m%d" % n)
        a.wait("ack")
    b = clients.json(server)
    assert [m["text"] for m in b.welcome["history"]] == ["m2", "m3", "m4"]
    assert [m["id"] for m in b.welcome["history"]] == [3, 4, 5]
    assert all(m["type"] == "message" for m in b.welcome["history"])


def test_history_is_bounded_in_bytes_across_rooms(start_server, clients):
    """Past HISTORY_BYTES, the room that holds the most loses its oldest messages first: large
    messages in one room leave another room's chat whole. /healthz says how much is held."""
    server = start_server(env={"HISTORY_BYTES": "65536", "RATE_LIMIT": "0"})
    a = clients.json(server)
    for room, text in (("chat", "hello"), ("big", "x" * 20000)):
        a.send(type="join", room=room)
        a.wait("joined")
        for _ in range(5):
            a.send(type="message", room=room, text=text)
            a.wait("ack")
    b = clients.json(server)
    b.send(type="join", room="chat")
    assert [m["id"] for m in b.wait("joined")["history"]] == [1, 2, 3, 4, 5]
    b.send(type="join", room="big")
    assert [m["id"] for m in b.wait("joined")["history"]] == [3, 4, 5]
    assert 60000 < server.health()["history_bytes"] <= 65536
    server.wait_for_log("history reached HISTORY_BYTES")


def test_join_leave_and_rooms_are_separate(server, clients):
    """Messages stay in their room; `joined` lists members; presence tells of joins and leaves."""
    a, b, c = clients.json(server), clients.json(server), clients.json(server)
    a.send(type="join", room="dev")
    joined = a.wait("joined")
    assert joined["room"] == "dev" and joined["members"] == [{"id": a.id, "nick": a.welcome["nick"]}]
    assert joined["member_count"] == 1 and joined["recovered"] is False
    b.send(type="join", room="dev")
    assert b.wait("joined")["member_count"] == 2
    pres = a.wait("presence", room="dev")
    assert pres["event"] == "join" and pres["member"]["id"] == b.id
    a.send(type="message", room="dev", text="dev only")
    a.wait("ack")
    assert b.wait("message")["room"] == "dev"
    for frame in c.drain():
        assert frame["type"] != "message"
    b.send(type="leave", room="dev")
    assert b.wait("left")["room"] == "dev"
    pres = a.wait("presence", room="dev", event="leave")
    assert pres["member"]["id"] == b.id



def test_requests_in_rooms_you_are_not_in_are_refused(server, clients):
    """message, typing and leave for a room you are not in get `not_in_room` with the ref."""
    a = clients.json(server)
    for req in ({"type": "message", "room": "elsewhere", "text": "x"},
                {"type": "typing", "room": "elsewhere"},
                {"type": "leave", "room": "elsewhere"}):
        a.send(dict(req, ref="r1"))
        err = a.recv()
        assert err == {"type": "error", "code": "not_in_room", "message": err["message"], "ref": "r1"}
    a.send(type="ping", ref=7)
    assert a.recv() == {"type": "pong", "ref": 7}


def test_nick_change_is_seen_by_others(server, clients):
    """`nick` renames: the sender gets its new nick, the room a presence `nick` event."""
    a, b = clients.json(server), clients.json(server)
    a.send(type="nick", nick="  Ada  ")
    assert a.wait("nick") == {"type": "nick", "id": a.id, "nick": "Ada"}
    pres = b.wait("presence", event="nick")
    assert pres["member"] == {"id": a.id, "nick": "Ada"}
    a.send(type="message", text="hi")
    assert b.wait("message")["from"]["nick"] == "Ada"
    a.send(type="nick", nick="x" * 33, ref="n")
    err = a.wait("error")
    assert err["code"] == "bad_request" and err["ref"] == "n"


def test_direct_message(server, clients):
    """`direct` reaches only its target; an unknown target gets `no_such_client`."""
    a, b, c = clients.json(server), clients.json(server), clients.json(server)
    a.send(type="direct", to=b.id, text="psst")
    d = b.wait("direct")
    assert d["from"]["id"] == a.id and d["text"] == "psst" and isinstance(d["ts"], float)
    assert all(f["type"] != "direct" for f in c.drain())
    a.send(type="direct", to=999999, text="anyone?", ref="d1")
    err = a.wait("error")
    assert err["code"] == "no_such_client" and err["ref"] == "d1"


def test_typing_reaches_others_and_is_not_stored(server, clients):
    """`typing` goes to the other members and never into history."""
    a, b = clients.json(server), clients.json(server)
    a.send(type="typing", room="lobby")
    t = b.wait("typing")
    assert t == {"type": "typing", "room": "lobby", "from": {"id": a.id, "nick": a.welcome["nick"]}}
    c = clients.json(server)
    assert c.welcome["history"] == []


def test_ping_pong(server, clients):
    """`ping` gets `pong`, with the ref when one was given."""
    a = clients.json(server)
    a.send(type="ping")
    assert a.recv() == {"type": "pong"}
    a.send(type="ping", ref="abc")
    assert a.recv() == {"type": "pong", "ref": "abc"}


@pytest.mark.parametrize("frame, code", [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"text": "no type"}', "bad_request"),
    ('{"type": "shout", "text": "x"}', "unknown_type"),
    ('{"type": "message", "text": 5}', "bad_request"),
    ('{"type": "message", "text": "x", "room": "no spaces"}', "bad_request"),
    ('{"type": "join", "room": "ok", "since": -1}', "bad_request"),
    ('{"type": "direct", "to": "7", "text": "x"}', "bad_request"),
])
def test_bad_requests_get_errors_and_the_connection_stays_open(server, clients, frame, code):
    """A refused request gets `error` with its code and the connection keeps working."""
    a = clients.json(server)
    a.ws.send(frame)
    err = a.recv()
    assert err["type"] == "error" and err["code"] == code and err["message"]
    a.send(type="ping", ref=1)
    assert a.recv() == {"type": "pong", "ref": 1}


def test_unknown_fields_are_ignored(server, clients):
    """Fields the contract does not name are ignored."""
    a, b = clients.json(server), clients.json(server)
    a.send(type="message", text="hi", colour="red", extra={"nested": [1]})
    assert a.wait("ack")["id"] == 1
    assert b.wait("message")["text"] == "hi"


def test_binary_frame_gets_an_error(server, clients):
    """A binary frame is refused with `bad_request` and the connection stays open."""
    a = clients.json(server)
    a.ws.send_binary(b"\x01\x02")
    assert a.recv()["code"] == "bad_request"
    a.send(type="ping")
    assert a.recv()["type"] == "pong"


def test_resend_with_same_ref_is_not_duplicated(server, clients):
    """A `message` resent with the same string ref gets the original ack and is not relayed twice."""
    a, b = clients.json(server), clients.json(server)
    ref = str(uuid.uuid4())
    a.send(type="message", text="once", ref=ref)
    first = a.wait("ack")
    assert b.wait("message")["text"] == "once"
    a.close()
    a2 = clients.json(server)  # a reconnects and resends, not knowing the ack arrived
    a2.send(type="message", text="once", ref=ref)
    again = a2.wait("ack")
    assert (again["id"], again["ts"], again["ref"]) == (first["id"], first["ts"], ref)
    assert all(f["type"] != "message" for f in b.drain())
    assert [m["text"] for m in clients.json(server).welcome["history"]] == ["once"]


def test_a_ref_taken_by_another_message_is_refused_not_lost(server, clients):
    """Idempotency keys belong to the room: another client's message (another text) under a
    key already used is refused with bad_request and its ref, not acked as the first."""
    a, b, c = clients.json(server), clients.json(server), clients.json(server)
    a.send(type="message", text="Alice's first message", ref="msg-0001")
    first = a.wait("ack")
    b.send(type="message", text="Bob's first message", ref="msg-0001")
    err = b.wait("error")
    assert (err["code"], err["ref"]) == ("bad_request", "msg-0001")
    assert "unique ref" in err["message"]
    b.send(type="message", text="Bob's first message", ref="msg-0002")  # a fresh key: stored
    assert b.wait("ack")["id"] == first["id"] + 1
    assert [m["text"] for m in c.drain() if m["type"] == "message"] == [
        "Alice's first message", "Bob's first message"]


def test_a_nick_cannot_be_another_connections_default_name(server, clients):
    """"Client <n>" is connection n's name until it picks one: nobody else may take it."""
    a, b = clients.json(server), clients.json(server)
    for nick in ("Client %d" % b.id, "client %03d" % b.id, "CLIENT%d" % b.id, "Client 999999",
                 "Client %d\u200d" % b.id, "\u0421lient %d" % b.id, "CIient %d" % b.id,
                 "Ｃｌｉｅｎｔ %d" % b.id, "Cl\u034fient %d" % b.id, "Client %d\ufe00" % b.id,
                 "Client\u2800%d" % b.id, "Client\u3164%d" % b.id, "Cl\u0131ent %d" % b.id,
                 "\u13dflient %d" % b.id, "Clie\u0578t %d" % b.id, "C1ient %d" % b.id,
                 "C|ient %d" % b.id, "Cl|ent %d" % b.id):
        a.send(type="nick", nick=nick, ref="n")
        err = a.wait("error")
        assert (err["code"], err["ref"]) == ("bad_request", "n"), nick
        assert "another connection" in err["message"]
    a.send(type="nick", nick="Client %d" % a.id)  # its own default name
    assert a.wait("nick")["nick"] == "Client %d" % a.id
    a.send(type="nick", nick="Client Eastwood")
    assert a.wait("nick")["nick"] == "Client Eastwood"
    assert all(f["type"] != "presence" or f["event"] != "nick" or f["member"]["nick"] ==
               "Client Eastwood" for f in b.drain())


def test_a_gone_connections_default_name_stays_its_own(server, clients):
    """Once connection n has left, "Client <n>" is still refused, and the error says why."""
    a, b = clients.json(server), clients.json(server)
    gone = b.id
    b.close()
    a.wait("presence", event="leave")  # b left the lobby
    a.send(type="nick", nick="Client %d" % gone, ref="n")
    err = a.wait("error")
    assert (err["code"], err["ref"]) == ("bad_request", "n")
    assert err["message"].startswith("Client %d is another connection's default name, kept for "
                                     "it (connected, gone or yet to come)" % gone)


def test_a_null_room_is_the_lobby(server, clients):
    """Optional fields sent as null are absent: a message with room null goes to the lobby."""
    a, b = clients.json(server), clients.json(server)
    a.send(type="message", room=None, text="to the lobby")
    assert a.wait("ack")["room"] == "lobby"
    assert b.wait("message")["text"] == "to the lobby"
    a.send(type="join", room=None)
    assert a.wait("error")["code"] == "bad_request"  # join has no default room


def test_recovery_with_since_and_epoch(server, clients):
    """A client that rejoins with `since`/`epoch` gets exactly what it missed, `recovered: true`."""
    a, b = clients.json(server), clients.json(server)
    epoch = b.welcome["epoch"]
    a.send(type="message", text="seen")
    last_seen = b.wait("message")["id"]
    b.close()
    for text in ("missed 1", "missed 2"):
        a.send(type="message", text=text)
        a.wait("ack")
    b2 = clients.json(server)
    b2.send(type="join", room="lobby", since=last_seen, epoch=epoch)
    joined = b2.wait("joined")
    assert joined["recovered"] is True
    assert [m["text"] for m in joined["history"]] == ["missed 1", "missed 2"]
    b2.send(type="join", room="lobby", since=last_seen, epoch="another-epoch")
    joined = b2.wait("joined")
    assert joined["recovered"] is False
    assert [m["text"] for m in joined["history"]] == ["seen", "missed 1", "missed 2"]


def test_recovery_fails_past_the_history_window(start_server, clients):
    """When messages after `since` have left history, `recovered` is false and history is the latest."""
    server = start_server(env={"HISTORY_SIZE": "2", "RATE_LIMIT": "0"})
    a = clients.json(server)
    for n in range(5):
        a.send(type="message", text="m%d" % n)
        a.wait("ack")
    a.send(type="join", room="lobby", since=1, epoch=a.welcome["epoch"])
    joined = a.wait("joined")
    assert joined["recovered"] is False
    assert [m["id"] for m in joined["history"]] == [4, 5]


def test_presence_limit_silences_big_rooms(start_server, clients):
    """Above PRESENCE_LIMIT members no join/leave notices go out and member lists are capped."""
    server = start_server(env={"PRESENCE_LIMIT": "2"})
    p = clients.plain(server)
    a = clients.json(server)
    assert p.recv() == "Client %d connected." % a.id
    c = clients.json(server)  # the third member: the room is now over the limit
    assert p.quiet() is None
    assert all(f["type"] != "presence" for f in a.drain())
    assert len(c.welcome["members"]) == 2 and c.welcome["member_count"] == 3
    c.close()
    assert p.quiet() is None


def test_too_many_rooms(start_server, clients):
    """A connection may be in at most MAX_ROOMS rooms; beyond that `too_many_rooms`."""
    server = start_server(env={"MAX_ROOMS": "3"})
    a = clients.json(server)
    for room in ("r1", "r2"):
        a.send(type="join", room=room)
        a.wait("joined")
    a.send(type="join", room="r3", ref="x")
    err = a.wait("error")
    assert err["code"] == "too_many_rooms" and err["ref"] == "x"


def test_oversized_json_message_closes_with_1009(start_server, clients):
    """A message larger than MAX_MESSAGE_SIZE closes the connection with 1009."""
    server = start_server(env={"MAX_MESSAGE_SIZE": "1024"})
    a = clients.json(server)
    a.ws.send(json.dumps({"type": "message", "text": "x" * 2000}))
    closed = a.recv_until_closed()
    assert closed.code == 1009


def test_answers_carry_the_request_ref(server, clients):
    """joined, left, nick and pong name the request's ref, so a client can match them."""
    a = clients.json(server)
    a.send(type="join", room="r", ref="j1")
    assert a.wait("joined")["ref"] == "j1"
    a.send(type="leave", room="r", ref=2)
    assert a.wait("left") == {"type": "left", "room": "r", "ref": 2}
    a.send(type="nick", nick="Zed", ref="n1")
    assert a.wait("nick")["ref"] == "n1"
    a.send(type="join", room="r")
    assert "ref" not in a.wait("joined")


def test_rate_limited_error_names_the_dropped_message(start_server, clients):
    """Over RATE_LIMIT, the `rate_limited` error carries the ref of the message it dropped."""
    server = start_server(env={"RATE_LIMIT": "1", "RATE_BURST": "1"})
    a = clients.json(server)
    a.send(type="message", text="first", ref="m-000001")
    a.send(type="message", text="second", ref="m-000002")
    assert a.wait("ack")["ref"] == "m-000001"
    err = a.wait("error")
    assert err["code"] == "rate_limited" and err["ref"] == "m-000002"


def test_rejoining_every_room_after_a_reconnect_is_not_a_flood(start_server, clients):
    """A burst of joins of new rooms (a reconnect's) is not rate limited; what follows is."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "3", "MAX_ROOMS": "30"})
    a = clients.json(server)
    a.send(type="join", room="lobby", since=0, epoch=a.welcome["epoch"], ref="join:lobby")
    for n in range(29):
        a.send(type="join", room="r%d" % n, ref="join:r%d" % n)
    for n in range(4):
        a.send(type="message", text="pending %d" % n, ref="pending-%04d" % n)
    got = [a.recv() for _ in range(34)]
    assert sorted(f["ref"] for f in got if f["type"] == "joined") == \
        sorted(["join:lobby"] + ["join:r%d" % n for n in range(29)])
    # The lobby's join (already in it) took one token of three: two messages get through.
    assert [f["ref"] for f in got if f["type"] == "ack"] == ["pending-0000", "pending-0001"]
    assert [(f["code"], f["ref"]) for f in got if f["type"] == "error"] == \
        [("rate_limited", "pending-0002"), ("rate_limited", "pending-0003")]
    assert a.quiet() is None  # not closed for flooding


def test_joining_and_leaving_on_a_loop_is_rate_limited(start_server, clients):
    """Joins of a room already joined, and every join after a leave, count against the rate."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "3", "MAX_ROOMS": "5"})
    a = clients.json(server)
    for n, kind in enumerate(["join", "join", "leave", "join", "leave", "join"]):
        a.send(type=kind, room="r", ref="req-%d" % n)
    got = [a.recv() for _ in range(6)]
    assert [f["ref"] for f in got if f.get("code") == "rate_limited"] == ["req-4", "req-5"], got


def test_long_string_ref_is_not_an_idempotency_key(server, clients):
    """A string ref over 64 characters is echoed but not used to drop a resend."""
    a = clients.json(server)
    ref = "join:" + "r" * 64
    a.send(type="message", text="one", ref=ref)
    a.send(type="message", text="two", ref=ref)
    first, second = a.wait("ack"), a.wait("ack")
    assert (first["ref"], second["ref"]) == (ref, ref)
    assert second["id"] == first["id"] + 1
