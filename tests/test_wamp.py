"""The WAMP v2 router (`wamp.2.json`): Basic Profile with Autobahn|Python as the real client,
malformed messages over a raw WebSocket, and the bridge to the chat rooms."""
import asyncio
import json
import socket
import time

import pytest
import websocket
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import PublishOptions

from chatserver import wamp
from tests.clients import close_quietly
from tests.wampclient import join, leave, run

ROLES = {"roles": {"publisher": {}, "subscriber": {}, "caller": {}, "callee": {}}}


class RawWamp:
    """A WAMP peer spoken by hand, to send what a library never would. Each is closed at the
    end of its test (see close_raw_peers)."""

    opened = []

    def __init__(self, port):
        self.ws = websocket.create_connection("ws://127.0.0.1:%d/ws" % port,
                                              subprotocols=["wamp.2.json"], timeout=5)
        RawWamp.opened.append(self)
        assert self.ws.getsubprotocol() == "wamp.2.json"

    def send(self, msg):
        self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    def recv(self):
        return json.loads(self.ws.recv())

    def hello(self, realm="realm1"):
        self.send([1, realm, ROLES])
        welcome = self.recv()
        assert welcome[0] == 2, welcome
        return welcome

    def closed(self):
        """True when the server closed the WebSocket."""
        try:
            opcode, _ = self.ws.recv_data(control_frame=True)
            return opcode == websocket.ABNF.OPCODE_CLOSE
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return True


@pytest.fixture(autouse=True)
def close_raw_peers(start_server):
    """Close the test's RawWamp peers before its servers stop (this fixture's end comes
    first, as it depends on start_server): one left open would hold the server's shutdown."""
    yield
    while RawWamp.opened:
        close_quietly(RawWamp.opened.pop().ws)


def future():
    return asyncio.get_running_loop().create_future()


def test_welcome_announces_broker_and_dealer(server):
    """HELLO gets WELCOME with a session id in [1, 2^53] and the broker and dealer roles."""
    w = RawWamp(server.port)
    welcome = w.hello()
    assert 1 <= welcome[1] <= 2 ** 53
    assert set(welcome[2]["roles"]) == {"broker", "dealer"}


@pytest.mark.parametrize("first", [
    "not json", "{}", "[]", '["hello"]', [32, 1, {}, "com.example.t"], [1, "bad realm", ROLES],
    [1, "realm1", {}], [True, "realm1", ROLES], [1, "realm1", {"roles": {"caller": []}}],
    [1, "realm1", {"roles": {"dancer": {}}}],
])
def test_protocol_violations_abort(server, first):
    """Anything but a valid HELLO first ends the session with ABORT protocol_violation."""
    w = RawWamp(server.port)
    w.send(first)
    abort = w.recv()
    assert abort[0] == 3 and abort[2] == "wamp.error.protocol_violation"
    assert w.closed()


def test_second_hello_and_malformed_messages_abort(server):
    """After WELCOME, a second HELLO or a malformed message aborts the session."""
    for bad in ([1, "realm1", ROLES], [32, "one", {}, "t"], [16, 1, "opts", "t"],
                [48, 1, {}, "p", "x"], [6], [6, {}, "not a uri"], [32, 0, {}, "t"], [34, 1, "one"], [66, 1, None],
                [16, 1, {"acknowledge": "yes"}, "t"], [49, 1, {"mode": "now"}],
                [8, 68, 1.0, {}, "com.example.error"]):
        w = RawWamp(server.port)
        w.hello()
        w.send(bad)
        abort = w.recv()
        assert abort[:1] == [3] and abort[2] == "wamp.error.protocol_violation", (bad, abort)


@pytest.mark.parametrize("payload", [
    '[16, 1, {"acknowledge": true}, "com.example.t", [NaN]]',
    '[16, 1, {"acknowledge": true}, "com.example.t", [], {"k": Infinity}]',
    '[16, 1, {"acknowledge": true}, "com.example.t", [1e999]]',
    '[16, 1, {"acknowledge": true}, "com.example.t", ["\\ud800"]]',
    '[16, 1, {"acknowledge": true}, "com.example.t", %s]' % ("[" * 975 + "]" * 975),
], ids=["NaN", "Infinity", "1e999", "lone-surrogate", "nested-975"])
def test_messages_other_peers_could_not_read_abort(server, payload):
    """NaN, Infinity, a number too large for a double, a lone surrogate and arguments nested
    too deep are not JSON every peer reads: ABORT protocol_violation, nothing relayed, no
    traceback."""
    sub, pub = RawWamp(server.port), RawWamp(server.port)
    sub.hello()
    pub.hello()
    sub.send([32, 1, {}, "com.example.t"])
    assert sub.recv()[0] == 33
    pub.send(payload)
    abort = pub.recv()
    assert abort[0] == 3 and abort[2] == "wamp.error.protocol_violation", abort
    assert pub.closed()
    sub.ws.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        sub.ws.recv()
    server.assert_no_traceback()


def test_realm_with_control_characters_is_refused(server):
    """A realm is a URI: one with control characters (which would reach the log) aborts."""
    w = RawWamp(server.port)
    w.send([1, "realm\x1b[31m\x07", ROLES])
    abort = w.recv()
    assert abort[0] == 3 and abort[2] == "wamp.error.protocol_violation"
    assert "\x1b" not in server.log()


def test_invalid_uris_are_refused(server):
    """Topics and procedures must be URIs: `wamp.error.invalid_uri` otherwise."""
    w = RawWamp(server.port)
    w.hello()
    w.send([32, 1, {}, "bad topic"])
    assert w.recv() == [8, 32, 1, {}, "wamp.error.invalid_uri"]
    w.send([64, 2, {}, "a..b"])
    assert w.recv() == [8, 64, 2, {}, "wamp.error.invalid_uri"]
    w.send([64, 3, {}, "wamp.reserved"])
    assert w.recv() == [8, 64, 3, {}, "wamp.error.invalid_uri"]
    w.send([16, 4, {"acknowledge": True}, "has space"])
    assert w.recv() == [8, 16, 4, {}, "wamp.error.invalid_uri"]


def test_long_uris_are_uris(server):
    """The specification sets no length for a URI: topics and procedures of up to 1,024
    characters work (the router keeps them, so it bounds them), and an error URI of any
    length within the message size is passed on."""
    long = "com.example." + "x" * 1000
    callee, caller = RawWamp(server.port), RawWamp(server.port)
    callee.hello()
    caller.hello()
    caller.send([32, 1, {}, long])
    assert caller.recv()[0] == 33
    callee.send([64, 1, {}, long])
    assert callee.recv()[0] == 65
    caller.send([48, 2, {}, long])
    invocation = callee.recv()
    assert invocation[0] == 68
    callee.send([8, 68, invocation[1], {}, long + ".failed" * 200])
    assert caller.recv() == [8, 48, 2, {}, long + ".failed" * 200]
    caller.send([32, 3, {}, long + ".more" * 4])  # 1,032 characters
    assert caller.recv() == [8, 32, 3, {}, "wamp.error.invalid_uri"]


def test_pattern_subscriptions_and_registrations_are_refused(server):
    """The router matches URIs exactly and does not announce patterns: a prefix or wildcard
    SUBSCRIBE or REGISTER is refused, not taken as an exact one that would never fire."""
    w = RawWamp(server.port)
    w.hello()
    w.send([32, 1, {"match": "prefix"}, "com.example"])
    refused = w.recv()
    assert refused[:5] == [8, 32, 1, {}, "wamp.error.option_not_allowed"], refused
    w.send([64, 2, {"match": "wildcard"}, "com..add"])
    assert w.recv()[:5] == [8, 64, 2, {}, "wamp.error.option_not_allowed"]
    w.send([32, 3, {"match": "exact"}, "com.example"])
    assert w.recv()[0] == 33


def test_second_subscription_to_a_topic_has_the_same_id(server):
    """Subscribing twice to one topic, from one session or two, gives the same id."""
    a, b = RawWamp(server.port), RawWamp(server.port)
    a.hello()
    b.hello()
    a.send([32, 1, {}, "com.example.topic"])
    b.send([32, 1, {}, "com.example.topic"])
    a.send([32, 2, {}, "com.example.topic"])
    first, second, again = a.recv(), b.recv(), a.recv()
    assert first[0] == second[0] == again[0] == 33
    assert first[2] == second[2] == again[2]
    a.send([34, 3, first[2]])
    assert a.recv() == [35, 3]
    a.send([34, 4, first[2]])
    assert a.recv() == [8, 34, 4, {}, "wamp.error.no_such_subscription"]


def test_goodbye(server):
    """GOODBYE is answered with GOODBYE wamp.close.goodbye_and_out."""
    w = RawWamp(server.port)
    w.hello()
    w.send([6, {}, "wamp.close.close_realm"])
    assert w.recv() == [6, {}, "wamp.close.goodbye_and_out"]


def test_pubsub_with_and_without_acknowledge(server):
    """EVENTs carry args and kwargs; acknowledged publishes get PUBLISHED; no echo to the publisher."""
    async def scenario():
        a, b = await join(server.port), await join(server.port)
        got_b, got_a = [], []
        done = future()

        def on_b(*args, **kwargs):
            got_b.append((args, kwargs))
            if len(got_b) == 2:
                done.set_result(True)
        await b.subscribe(on_b, "com.example.news")
        await a.subscribe(lambda *args, **kw: got_a.append(args), "com.example.news")
        pub = await a.publish("com.example.news", 1, "two", three=3,
                              options=PublishOptions(acknowledge=True))
        assert 1 <= pub.id <= 2 ** 53
        a.publish("com.example.news", "unacknowledged")
        await asyncio.wait_for(done, 5)
        assert got_b == [((1, "two"), {"three": 3}), (("unacknowledged",), {})]
        await asyncio.sleep(0.2)
        assert got_a == []  # a publisher does not get its own event
        await leave(a)
        await leave(b)
    run(scenario())


def test_realms_are_separate(server):
    """A session in one realm never sees another realm's events or procedures."""
    async def scenario():
        a = await join(server.port, "realm.one")
        b = await join(server.port, "realm.two")
        seen = []
        await b.subscribe(lambda *args: seen.append(args), "com.example.t")
        await b.register(lambda: "two", "com.example.who")
        await a.publish("com.example.t", "x", options=PublishOptions(acknowledge=True))
        try:
            await a.call("com.example.who")
            raise AssertionError("call crossed realms")
        except ApplicationError as exc:
            assert exc.error == "wamp.error.no_such_procedure"
        await asyncio.sleep(0.2)
        assert seen == []
        await leave(a)
        await leave(b)
    run(scenario())


def test_rpc_results_and_errors(server):
    """CALL -> INVOCATION -> YIELD -> RESULT with args and kwargs; ERRORs pass back whole."""
    async def scenario():
        callee, caller = await join(server.port), await join(server.port)

        def divide(a, b, *, scale=1):
            if b == 0:
                raise ApplicationError("com.example.division_by_zero", "b is zero", a=a)
            return a / b * scale
        await callee.register(divide, "com.example.divide")
        assert await caller.call("com.example.divide", 6, 3, scale=10) == 20
        try:
            await caller.call("com.example.divide", 1, 0)
            raise AssertionError("no error")
        except ApplicationError as exc:
            assert exc.error == "com.example.division_by_zero"
            assert exc.args == ("b is zero",) and exc.kwargs == {"a": 1}
        try:
            await caller.call("com.example.missing")
            raise AssertionError("no error")
        except ApplicationError as exc:
            assert exc.error == "wamp.error.no_such_procedure"
        try:
            await caller.register(lambda: None, "com.example.divide")
            raise AssertionError("no error")
        except ApplicationError as exc:
            assert exc.error == "wamp.error.procedure_already_exists"
        await leave(callee)
        await leave(caller)
    run(scenario())


def test_unregister_and_callee_leaving_mid_call(server):
    """A callee that disconnects mid-call fails the pending call instead of leaving it hanging;
    its procedures are gone afterwards."""
    async def scenario():
        callee, caller = await join(server.port), await join(server.port)
        started = future()

        async def slow():
            started.set_result(True)
            await asyncio.sleep(30)
        await callee.register(slow, "com.example.slow")
        call = asyncio.ensure_future(caller.call("com.example.slow"))
        await asyncio.wait_for(started, 5)
        callee.test_transport.abort()
        try:
            await asyncio.wait_for(call, 5)
            raise AssertionError("no error")
        except ApplicationError as exc:
            assert exc.error == "wamp.error.canceled"
        try:
            await caller.call("com.example.slow")
            raise AssertionError("no error")
        except ApplicationError as exc:
            assert exc.error == "wamp.error.no_such_procedure"
        again = await join(server.port)
        reg = await again.register(lambda: "back", "com.example.slow")
        assert await caller.call("com.example.slow") == "back"
        await reg.unregister()
        await leave(again)
        await leave(caller)
    run(scenario())


def test_a_call_the_caller_gives_up_on_is_canceled(server):
    """Autobahn cancels a call whose future is cancelled (asyncio.wait_for's timeout, say):
    the caller gets wamp.error.canceled and keeps its session, and the callee's invocation
    is interrupted."""
    async def scenario():
        callee, caller = await join(server.port), await join(server.port)
        started, stopped = future(), future()

        async def slow():
            started.set_result(True)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                stopped.set_result(True)
                raise
        await callee.register(slow, "com.example.slow")
        await callee.register(lambda: "quick", "com.example.quick")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(caller.call("com.example.slow"), 0.5)
        assert started.done()
        await asyncio.wait_for(stopped, 5)  # INTERRUPT reached the callee
        assert caller.is_attached() and callee.is_attached()
        assert await caller.call("com.example.quick") == "quick"
        await leave(callee)
        await leave(caller)
    run(scenario())
    server.assert_no_traceback()


@pytest.mark.parametrize("mode", ["skip", "killnowait", None, "kill"])
def test_cancel_modes(server, mode):
    """skip: the caller is answered at once and the callee is not told; killnowait (the
    default): the callee also gets an INTERRUPT; kill: the INTERRUPT, and the caller gets the
    callee's answer. Either way the caller gets one answer, and an answer to a call already
    answered or canceled goes nowhere."""
    callee, caller = RawWamp(server.port), RawWamp(server.port)
    callee.send([1, "realm1", {"roles": {"callee": {"features": {"call_canceling": True}}}}])
    assert callee.recv()[0] == 2
    caller.hello()
    callee.send([64, 1, {}, "com.example.slow"])
    assert callee.recv()[0] == 65
    caller.send([48, 7, {}, "com.example.slow"])
    invocation = callee.recv()[1]
    caller.send([49, 7, {"mode": mode} if mode else {}])
    if mode != "skip":
        assert callee.recv() == [69, invocation, {"mode": mode or "killnowait"}]
    if mode == "kill":
        caller.send([49, 7, {"mode": "kill"}])  # again: no second INTERRUPT
        caller.ws.settimeout(0.3)
        with pytest.raises(websocket.WebSocketTimeoutException):
            caller.ws.recv()  # nothing until the callee answers
        callee.ws.settimeout(0.3)
        with pytest.raises(websocket.WebSocketTimeoutException):
            callee.ws.recv()
        caller.ws.settimeout(5)
        callee.ws.settimeout(5)
        callee.send([8, 68, invocation, {}, "wamp.error.canceled"])
        assert caller.recv() == [8, 48, 7, {}, "wamp.error.canceled"]
    else:
        assert caller.recv() == [8, 48, 7, {}, "wamp.error.canceled", ["canceled by the caller"]]
        callee.send([70, invocation, {}, ["too late"]])
    caller.send([49, 7, {}])  # answered already: nothing happens
    caller.send([48, 8, {}, "com.example.slow"])
    invocation = callee.recv()[1]
    callee.send([70, invocation, {}, ["done"]])
    assert caller.recv() == [50, 8, {}, ["done"]]


def test_a_callee_that_cannot_be_interrupted_is_not(server):
    """A callee that did not announce call_canceling gets no INTERRUPT; the caller is
    answered at once."""
    callee, caller = RawWamp(server.port), RawWamp(server.port)
    callee.hello()  # roles without features
    caller.hello()
    callee.send([64, 1, {}, "com.example.slow"])
    assert callee.recv()[0] == 65
    caller.send([48, 1, {}, "com.example.slow"])
    invocation = callee.recv()[1]
    caller.send([49, 1, {"mode": "kill"}])
    assert caller.recv() == [8, 48, 1, {}, "wamp.error.canceled", ["canceled by the caller"]]
    callee.send([70, invocation, {}, ["too late"]])
    caller.send([48, 2, {}, "com.example.slow"])
    assert callee.recv()[0] == 68  # the next invocation, no INTERRUPT before it


def test_bridge_chat_to_wamp(server, clients):
    """A chat message in room R is an EVENT on chat.room.R with args [text] and kwargs {id, room, from, ts}."""
    async def scenario():
        w = await join(server.port)
        got = future()
        await w.subscribe(lambda *args, **kw: got.done() or got.set_result((args, kw)),
                          "chat.room.lobby")
        j = clients.json(server)
        j.send(type="message", text="hello wamp")
        ack = j.wait("ack")
        args, kwargs = await asyncio.wait_for(got, 5)
        assert args == ("hello wamp",)
        assert kwargs == {"id": ack["id"], "room": "lobby", "from": {"id": j.id, "nick": j.welcome["nick"]},
                          "ts": ack["ts"]}
        await leave(w)
    run(scenario())


def test_bridge_wamp_to_chat(server, clients):
    """A PUBLISH to chat.room.lobby is a chat message: plain and JSON clients see it, and history keeps it."""
    async def scenario():
        p = clients.plain(server)
        j = clients.json(server)
        p.recv()
        w = await join(server.port)
        await w.publish("chat.room.lobby", "from wamp", options=PublishOptions(acknowledge=True))
        msg = j.wait("message")
        assert msg["text"] == "from wamp"
        assert p.recv() == 'Client %d says "from wamp"' % msg["from"]["id"]
        assert [m["text"] for m in clients.json(server).welcome["history"]] == ["from wamp"]
        try:
            await w.publish("chat.room.lobby", 42, options=PublishOptions(acknowledge=True))
            raise AssertionError("no error")
        except ApplicationError as exc:
            assert exc.error == "wamp.error.invalid_argument"
        await leave(w)
    run(scenario())


def test_wamp_events_cross_processes(start_server, redis_server):
    """With REDIS_URL, an event published on one process reaches a subscriber on another."""
    env = {"REDIS_URL": redis_server.url}
    a, b = start_server(env=env), start_server(env=env)

    async def scenario():
        sub, pub = await join(a.port), await join(b.port)
        got = future()
        await sub.subscribe(lambda *args: got.done() or got.set_result(args), "com.example.x")
        await pub.publish("com.example.x", "across", options=PublishOptions(acknowledge=True))
        assert await asyncio.wait_for(got, 5) == ("across",)
        room = future()
        await sub.subscribe(lambda *args, **kw: room.done() or room.set_result(args), "chat.room.dev")
        await pub.publish("chat.room.dev", "bridged across", options=PublishOptions(acknowledge=True))
        assert await asyncio.wait_for(room, 5) == ("bridged across",)
        await leave(sub)
        await leave(pub)
    run(scenario())


def test_an_event_that_fails_to_deliver_does_not_cost_the_redis_subscription(start_server,
                                                                           redis_server, clients):
    """An event from Redis that cannot be delivered (from an older or faulty process, say) is
    logged and dropped: the process stays subscribed, and chat goes on."""
    server = start_server(env={"REDIS_URL": redis_server.url})
    sub = RawWamp(server.port)
    sub.hello()
    sub.send([32, 1, {}, "com.example.t"])
    assert sub.recv()[0] == 33
    bad = json.dumps({"k": "wamp", "realm": "realm1", "topic": "com.example.t", "pub": 1,
                      "args": ["\ud800"], "kwargs": {}, "publisher": 0}).encode()
    with socket.create_connection(("127.0.0.1", redis_server.port), 5) as r:
        r.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$12\r\nchat:control\r\n$%d\r\n%s\r\n" % (len(bad), bad))
        assert r.recv(64).startswith(b":1")
    assert "UnicodeEncodeError" in server.expect_traceback(
        "delivering an event from chat:control failed")
    chat = clients.json(server)
    chat.send(type="message", text="still here", ref="after-bad-event")
    assert chat.wait("ack")["ref"] == "after-bad-event"
    assert server.health()["redis"] == "up"
    assert "Redis unreachable" not in server.log()


def test_sessions_subscribing_at_once_to_a_room_share_one_subscription(start_server,
                                                                      redis_server, clients):
    """Two sessions that subscribe at once to a room this process does not follow yet (each
    waits for Redis to confirm) get the same subscription id, and both get its messages."""
    server = start_server(env={"REDIS_URL": redis_server.url, "RATE_LIMIT": "0"})
    chat = clients.json(server)
    for trial in range(3):
        topic = "chat.room.fresh%d" % trial
        subs = [RawWamp(server.port), RawWamp(server.port)]
        for w in subs:
            w.hello()
        for w in subs:
            w.send([32, 1, {}, topic])
        ids = {w.recv()[2] for w in subs}
        assert len(ids) == 1, ids
        chat.send(type="join", room="fresh%d" % trial)
        chat.wait("joined")
        chat.send(type="message", room="fresh%d" % trial, text="to both")
        chat.wait("ack")
        for w in subs:
            event = w.recv()
            assert event[0] == 36 and event[4] == ["to both"], event
            w.ws.close()


def test_rate_limit_applies_to_wamp(start_server):
    """Requests over RATE_LIMIT get an ERROR instead of silence."""
    server = start_server(env={"RATE_LIMIT": "1", "RATE_BURST": "2"})
    w = RawWamp(server.port)
    w.send([1, "realm1", ROLES])
    w.recv()
    for n in range(1, 5):
        w.send([16, n, {"acknowledge": True}, "com.example.t%d" % n])
    replies = [w.recv() for _ in range(3)]
    assert [r[0] for r in replies] == [17, 8, 8]
    assert replies[1][:3] == [8, 16, 2] and replies[1][4] == "chat.error.rate_limited"


def test_publish_over_the_rate_limit_gets_an_error_only_when_acknowledged(start_server):
    """The specification answers a PUBLISH only when it asks for acknowledgement: an ERROR
    for any other would be a protocol violation to a client library."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "3"})
    w = RawWamp(server.port)
    w.hello()
    w.send([16, 1, {"acknowledge": True}, "com.example.t"])
    w.send([16, 5, {}, "com.example.t"])  # the last token
    assert w.recv()[:2] == [17, 1]
    w.send([16, 2, {}, "com.example.t"])  # dropped, unanswered
    w.send([16, 3, {"acknowledge": False}, "com.example.t"])  # dropped, unanswered
    w.send([16, 4, {"acknowledge": True}, "com.example.t"])
    err = w.recv()
    assert err[:3] == [8, 16, 4] and err[4] == "chat.error.rate_limited", err


def test_a_callee_over_the_rate_limit_still_answers(start_server):
    """A callee's YIELD and ERROR are answers its callers wait for: never dropped by the
    rate limit (the CALLs were counted); but no more free answers than INVOCATIONs."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "2"})
    callee, caller = RawWamp(server.port), RawWamp(server.port)
    callee.hello()
    callee.send([64, 1, {}, "com.example.echo"])  # the callee's last token
    registration = callee.recv()[2]
    caller.hello()
    caller.send([48, 1, {}, "com.example.echo", ["one"]])
    invocation = callee.recv()
    assert invocation[:3] == [68, invocation[1], registration]
    callee.send([70, invocation[1], {}, ["one"]])
    assert caller.recv() == [50, 1, {}, ["one"]]
    caller.send([48, 2, {}, "com.example.echo", ["two"]])  # over the caller's rate
    assert caller.recv()[:3] == [8, 48, 2]
    callee.send([70, invocation[1] + 1, {}, ["bogus"]])  # owed nothing: counted, dropped
    for n in range(2, 2 + 3):  # a flood of answers owed nothing ends as any flood does
        callee.send([70, invocation[1] + n, {}, ["bogus"]])
    assert callee.closed()


def test_a_caller_over_the_rate_limit_can_still_cancel(start_server):
    """A CANCEL of a call still waiting is not dropped by the rate limit: the CALL was
    counted, and dropping it would leave the caller waiting."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "2"})
    callee, caller = RawWamp(server.port), RawWamp(server.port)
    callee.hello()
    callee.send([64, 1, {}, "com.example.slow"])
    assert callee.recv()[0] == 65
    caller.hello()
    caller.send([48, 1, {}, "com.example.slow"])  # the caller's last token
    assert callee.recv()[0] == 68
    caller.send([49, 1, {"mode": "skip"}])
    assert caller.recv() == [8, 48, 1, {}, "wamp.error.canceled", ["canceled by the caller"]]
    caller.send([48, 2, {}, "com.example.slow"])  # still over the rate
    assert caller.recv()[:5] == [8, 48, 2, {}, "chat.error.rate_limited"]


def test_calls_whose_callers_left_leave_the_callee_no_free_answers(start_server):
    """A free answer is one to a call still waiting: callers that leave take theirs with
    them, and answers to nothing count against the rate like any message."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "2"})
    callee = RawWamp(server.port)
    callee.hello()
    callee.send([64, 1, {}, "com.example.slow"])  # the callee's last token
    callee.recv()
    invocations = []
    for n in range(5):
        caller = RawWamp(server.port)
        caller.hello()
        caller.send([48, 1, {}, "com.example.slow"])
        invocations.append(callee.recv()[1])
        caller.ws.close()  # gone before the answer
    time.sleep(0.3)
    for invocation in invocations:  # answers to nothing waiting any more
        callee.send([70, invocation, {}, ["late"]])
    assert callee.closed()  # a flood: more than RATE_BURST refused in a row


def test_an_error_from_a_callee_over_the_rate_limit_reaches_the_caller(start_server):
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "2"})
    callee, caller = RawWamp(server.port), RawWamp(server.port)
    callee.hello()
    callee.send([64, 1, {}, "com.example.fail"])
    callee.recv()
    caller.hello()
    caller.send([48, 7, {}, "com.example.fail"])
    invocation = callee.recv()
    callee.send([8, 68, invocation[1], {}, "com.example.error.nope", ["no"]])
    assert caller.recv() == [8, 48, 7, {}, "com.example.error.nope", ["no"]]


def test_publisher_exclusion_can_be_turned_off(server):
    """With exclude_me false, a publisher subscribed to the topic gets its own event, on a
    plain topic and on a chat room's."""
    w = RawWamp(server.port)
    w.hello()
    for n, topic in enumerate(("com.example.mirror", "chat.room.mirror"), start=1):
        w.send([32, n, {}, topic])
        subscription = w.recv()[2]
        w.send([16, 10 + n, {"exclude_me": False, "acknowledge": True}, topic, ["me too"]])
        got = sorted((w.recv() for _ in range(2)), key=lambda m: m[0])
        assert got[0][:2] == [17, 10 + n], got
        assert got[1][:2] == [36, subscription] and got[1][4] == ["me too"], got
        assert got[1][2] == got[0][2]  # the event's publication id is the PUBLISHED one
        w.send([16, 20 + n, {"acknowledge": True}, topic, ["not me"]])  # excluded by default
        assert w.recv()[:2] == [17, 20 + n]
        w.ws.settimeout(0.3)
        with pytest.raises(websocket.WebSocketTimeoutException):
            w.recv()
        w.ws.settimeout(5)


def test_a_room_topic_event_carries_the_published_publication_id(server, clients):
    """PUBLISHED and the EVENT others get carry the same publication id (WAMP: "Publication
    ID"), on chat room topics too."""
    publisher, subscriber = RawWamp(server.port), RawWamp(server.port)
    publisher.hello()
    subscriber.hello()
    subscriber.send([32, 1, {}, "chat.room.lobby"])
    subscriber.recv()
    publisher.send([16, 2, {"acknowledge": True}, "chat.room.lobby", ["hi"]])
    published = publisher.recv()
    event = subscriber.recv()
    assert published[0] == 17 and event[0] == 36
    assert event[2] == published[2]
    assert 1 <= event[2] <= 2 ** 53


def test_resubscribing_after_a_reconnect_is_not_a_flood(start_server):
    """A client that comes back subscribes again to all its topics at once: a session's first
    MAX_ROOMS subscriptions are not counted against the rate; later ones are."""
    server = start_server(env={"RATE_LIMIT": "1", "RATE_BURST": "2", "MAX_ROOMS": "30"})
    w = RawWamp(server.port)
    w.send([1, "realm1", ROLES])
    w.recv()
    for n in range(1, 33):
        w.send([32, n, {}, "chat.room.r%d" % n])
    replies = [w.recv() for _ in range(32)]
    assert [r[0] for r in replies[:31]] == [33] * 31  # 30 free, 1 on the burst's last token
    assert replies[31][:3] == [8, 32, 32] and replies[31][4] == "chat.error.rate_limited"


def test_unsubscribing_ends_the_free_subscriptions(start_server):
    """After an UNSUBSCRIBE, subscribing again counts against the rate: no free loop."""
    server = start_server(env={"RATE_LIMIT": "0.1", "RATE_BURST": "2", "MAX_ROOMS": "30"})
    w = RawWamp(server.port)
    w.hello()  # one token of two
    w.send([32, 1, {}, "chat.room.a"])  # free
    subscription = w.recv()[2]
    w.send([34, 2, subscription])  # the last token; no more free subscriptions
    assert w.recv()[0] == 35
    w.send([32, 3, {}, "chat.room.a"])
    err = w.recv()
    assert err[:3] == [8, 32, 3] and err[4] == "chat.error.rate_limited"


@pytest.mark.parametrize("text, subscribe", [
    ('[32,1,{},"chat.room.a"]', True), ('[34,2,5]', False), ('[320,1]', False),
    ('[32,1,{},"%s"]' % ("x" * 2000), False)])
def test_what_counts_as_a_subscribe(text, subscribe):
    """Only a small frame that starts as a SUBSCRIBE may be a free one."""
    assert wamp.is_subscribe(text) is subscribe


def test_shutdown_closes_wamp_sessions_with_1001(start_server):
    """SIGTERM closes WAMP sessions too, with 1001, and the process exits."""
    server = start_server()
    w = RawWamp(server.port)
    w.hello()
    server.signal()
    opcode, payload = w.ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(payload[:2], "big") == 1001
    assert server.proc.wait(8) == 0


def test_silent_wamp_peer_is_dropped(start_server):
    """The keepalive covers WAMP sessions: a peer that never answers pings is dropped."""
    server = start_server(env={"PING_INTERVAL": "0.2", "PING_TIMEOUT": "1"})
    w = RawWamp(server.port)
    w.hello()
    sock = w.ws.sock
    sock.settimeout(5)
    data = b""
    while True:  # read raw bytes without answering pings, until the server drops us
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert b"\x89\x00" in data  # it was pinged first


def test_per_session_limits(start_server):
    """A session may hold only so many subscriptions: beyond that, ERROR chat.error.limit_exceeded."""
    server = start_server(env={"RATE_LIMIT": "0"})
    w = RawWamp(server.port)
    w.hello()
    limit = wamp.MAX_PER_SESSION
    for n in range(limit):
        w.send([32, n + 1, {}, "com.example.t%d" % n])
    replies = [w.recv() for _ in range(limit)]
    assert all(r[0] == 33 for r in replies)
    w.send([32, limit + 1, {}, "com.example.one.more"])
    err = w.recv()
    assert err[:5] == [8, 32, limit + 1, {}, "chat.error.limit_exceeded"]
    w.send([32, limit + 2, {}, "com.example.t0"])  # already held: same id, no new slot
    assert w.recv() == [33, limit + 2, replies[0][2]]
