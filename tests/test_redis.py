"""Scale-out: several server processes sharing one real redis-server (REDIS_URL)."""
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
import uuid

import pytest

from chatserver import session
from tests.clients import ConnectionClosed


@pytest.fixture
def pair(start_server, redis_server):
    """Two server processes on one Redis."""
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "1.5"}
    return start_server(env=env), start_server(env=env)


@contextlib.contextmanager
def hung(redis_server):
    """Redis stops answering but keeps its connections open (SIGSTOP: stopped, or swapping),
    for the block's duration."""
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


def health(server):
    return server.health(verbose=True)


def poll(check, timeout=10.0, every=0.1):
    """The first truthy result of ``check()`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met within %s s" % timeout)


def registered(server, n):
    """Wait until ``server`` has registered ``n`` connections in all, each in the lobby and
    subscribed to it (plain clients get no welcome). /healthz counts a connection once it
    has an id, before its lobby subscription is confirmed: the log line comes after."""
    poll(lambda: sum("New connection!" in line for line in list(server.lines)) == n)



def test_plain_relay_spans_processes(pair, clients):
    """The recipe's plain-text lines pass between processes word for word."""
    a, b = pair
    p1 = clients.plain(a)
    registered(a, 1)
    p2 = clients.plain(b)
    m = re.fullmatch(r"Client (\d+) connected\.", p1.recv())
    assert m
    p2.send("Hello World!")
    assert p1.recv() == 'Client %s says "Hello World!"' % m.group(1)
    # p2 hears nothing of its own; p1's arrival may still have been on its way as p2 came.
    heard = p2.quiet()
    if heard is not None and re.fullmatch(r"Client (?!%s\.)\d+ connected\." % m.group(1), heard):
        heard = p2.quiet()
    assert heard is None
    p2.close()
    assert p1.recv() == "Client %s disconnected." % m.group(1)


def test_ids_are_unique_across_processes(pair, clients):
    """Connection ids come from one counter, whichever process a client reaches."""
    a, b = pair
    ids = [clients.json(s).id for s in (a, b, a, b, a, b)]
    assert len(set(ids)) == len(ids)


def test_one_order_per_room_across_processes(pair, clients):
    """Senders on two processes: every receiver sees the same ids, strictly increasing."""
    a, b = pair
    sa, sb = clients.json(a), clients.json(b)
    ra, rb = clients.json(a), clients.json(b)
    for n in range(20):
        sa.send(type="message", text="a%d" % n)
        sb.send(type="message", text="b%d" % n)
    seen = {}
    for name, r in (("ra", ra), ("rb", rb)):
        got = []
        while len(got) < 40:
            msg = r.wait("message")
            got.append((msg["id"], msg["text"]))
        seen[name] = got
    assert seen["ra"] == seen["rb"]
    assert [i for i, _ in seen["ra"]] == list(range(1, 41))


def test_json_presence_and_members_span_processes(pair, clients):
    """Joins on one process are announced on the other and listed in `members`."""
    a, b = pair
    j1 = clients.json(a)
    j1.send(type="join", room="ops")
    j1.wait("joined")
    j2 = clients.json(b)
    j2.send(type="nick", nick="Bea")
    j2.wait("nick")
    j2.send(type="join", room="ops")
    joined = j2.wait("joined")
    assert {m["id"] for m in joined["members"]} == {j1.id, j2.id}
    assert joined["member_count"] == 2
    pres = j1.wait("presence", room="ops", event="join")
    assert pres["member"] == {"id": j2.id, "nick": "Bea"}
    j2.send(type="message", room="ops", text="hi ops")
    assert j1.wait("message", room="ops")["text"] == "hi ops"
    j2.send(type="typing", room="ops")
    assert j1.wait("typing")["from"]["id"] == j2.id
    j2.send(type="leave", room="ops")
    assert j1.wait("presence", room="ops", event="leave")["member"]["id"] == j2.id


def test_direct_message_to_another_process(pair, clients):
    """`direct` reaches a connection on another process; unknown ids get `no_such_client`."""
    a, b = pair
    j1, j2 = clients.json(a), clients.json(b)
    j1.send(type="direct", to=j2.id, text="over here")
    d = j2.wait("direct")
    assert d["from"]["id"] == j1.id and d["text"] == "over here"
    j1.send(type="direct", to=j2.id + 1000, text="?", ref="x")
    assert j1.wait("error")["code"] == "no_such_client"


def test_direct_to_a_client_of_a_killed_process_is_refused_at_once(start_server, redis_server,
                                                                   clients):
    """A `direct` to a connection whose process was killed outright gets `no_such_client`
    at once, not silence until that process's presence expires (PRESENCE_TTL)."""
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "60"}
    a, b = start_server(env=env), start_server(env=env)
    sender, gone, stays = clients.json(a), clients.json(b), clients.json(a)
    sender.send(type="direct", to=gone.id, text="before", ref="d1")
    assert gone.wait("direct")["text"] == "before"
    b.signal(signal.SIGKILL)
    b.proc.wait(5)
    sender.send(type="direct", to=gone.id, text="after", ref="d2")
    error = sender.wait("error", timeout=5)
    assert (error["code"], error["ref"]) == ("no_such_client", "d2")
    sender.send(type="direct", to=stays.id, text="still here", ref="d3")
    assert stays.wait("direct")["text"] == "still here"


def test_history_and_recovery_from_another_process(pair, clients):
    """A client that reconnects to the other process recovers exactly what it missed."""
    a, b = pair
    sender, reader = clients.json(a), clients.json(a)
    sender.send(type="message", text="seen")
    seen = reader.wait("message")
    epoch = reader.welcome["epoch"]
    reader.close()
    for text in ("missed 1", "missed 2"):
        sender.send(type="message", text=text)
        sender.wait("ack")
    back = clients.json(b)
    assert back.welcome["epoch"] == epoch
    assert [m["text"] for m in back.welcome["history"]] == ["seen", "missed 1", "missed 2"]
    back.send(type="join", room="lobby", since=seen["id"], epoch=epoch)
    joined = back.wait("joined")
    assert joined["recovered"] is True
    assert [m["text"] for m in joined["history"]] == ["missed 1", "missed 2"]


def test_resend_on_another_process_is_not_stored_twice(pair, clients):
    """The same string `ref` resent through another process gets the original ack."""
    a, b = pair
    s1, watcher = clients.json(a), clients.json(b)
    ref = str(uuid.uuid4())
    s1.send(type="message", text="exactly once", ref=ref)
    first = s1.wait("ack")
    assert watcher.wait("message")["text"] == "exactly once"
    s2 = clients.json(b)
    s2.send(type="message", text="exactly once", ref=ref)
    again = s2.wait("ack")
    assert (again["id"], again["ts"]) == (first["id"], first["ts"])
    assert all(f["type"] != "message" for f in watcher.drain())
    texts = [m["text"] for m in clients.json(a).welcome["history"]]
    assert texts == ["exactly once"]


def test_dead_process_leaves_no_ghosts(pair, redis_server, clients):
    """Members of a process killed outright are dropped after PRESENCE_TTL, and the others are
    told they left, even in a quiet room where nobody joins."""
    a, b = pair
    j1 = clients.json(a)
    ghost = clients.json(b)
    j1.wait("presence", event="join")
    b.signal(signal.SIGKILL)
    b.proc.wait(5)
    # (Not the welcome's last member: members are listed by presence expiry, which a
    # refresh on a may move past the ghost's.)
    j1.wait("presence", event="leave", member={"id": ghost.id, "nick": ghost.welcome["nick"]},
            timeout=8)
    assert ghost.id not in {m["id"] for m in clients.json(a).welcome["members"]}
    # Nor is the dead process remembered as the ghost's host (the record of which process
    # holds a connection would otherwise grow with every process killed).
    import redis
    store = redis.Redis.from_url(redis_server.url)
    poll(lambda: not store.hexists("chat:clients:at", ghost.id), timeout=5)
    assert store.hexists("chat:clients:at", j1.id)
    leaving = clients.json(a)
    assert store.hexists("chat:clients:at", leaving.id)
    leaving.close()
    poll(lambda: not store.hexists("chat:clients:at", leaving.id), timeout=5)
    # A record left by a process of an older version (it pruned the presence but did not
    # know of the record) is swept too.
    store.hset("chat:clients:at", 10 ** 9, "0ld0ld0ld0ld")
    poll(lambda: not store.hexists("chat:clients:at", 10 ** 9), timeout=5)
    assert store.hexists("chat:clients:at", j1.id)


def test_members_of_a_process_that_stalled_are_announced_back(pair, clients):
    """A process that stops refreshing presence for longer than PRESENCE_TTL (stopped, cut
    off from Redis) has its members pruned and announced as gone by the others; when it
    refreshes again they are announced as back and listed again."""
    a, b = pair
    watcher = clients.json(a)
    sleeper = clients.json(b)
    member = {"id": sleeper.id, "nick": sleeper.welcome["nick"]}
    watcher.wait("presence", event="join", member=member)
    b.signal(signal.SIGSTOP)
    try:
        watcher.wait("presence", event="leave", member=member, timeout=8)
    finally:
        b.signal(signal.SIGCONT)
    watcher.wait("presence", event="join", member=member, timeout=8)
    assert sleeper.id in {m["id"] for m in clients.json(a).welcome["members"]}
    sleeper.send(type="message", text="still here")
    assert watcher.wait("message")["text"] == "still here"
    assert [f for f in watcher.drain(1.0) if f["type"] == "presence"] == []  # told once


@pytest.mark.parametrize("how", ["leave", "close"])
def test_members_who_go_while_their_process_stalls_are_not_announced_back(pair, clients, how):
    """Members pruned while their process was stopped, who left (or closed) meanwhile, are
    told as gone once and not listed again. (A connection that closed may be seen as back
    for a moment, by a refresh that runs before its close is read: then its leave follows.)"""
    a, b = pair
    watcher = clients.json(a)
    watcher.send(type="join", room="r")
    watcher.wait("joined")
    members = [clients.json(b) for _ in range(3)]
    for m in members:
        m.send(type="join", room="r")
        m.wait("joined")
    for m in members:
        watcher.wait("presence", event="join", room="r", member={"id": m.id, "nick": m.welcome["nick"]})
    b.signal(signal.SIGSTOP)
    try:
        for m in members:
            watcher.wait("presence", event="leave", room="r", timeout=8)
        for m in members:
            if how == "leave":
                m.send(type="leave", room="r")
            else:
                m.close()
    finally:
        b.signal(signal.SIGCONT)
    time.sleep(2.5)  # more than a refresh (PRESENCE_TTL/3) and a prune
    notices = [f for f in watcher.drain(1.0) if f["type"] == "presence" and f["room"] == "r"]
    for m in members:
        told = [f["event"] for f in notices if f["member"]["id"] == m.id]
        assert told in ([], ["join", "leave"]), notices
    watcher.send(type="join", room="r")
    assert [m["id"] for m in watcher.wait("joined")["members"]] == [watcher.id]


def test_a_dead_process_with_thousands_of_members_is_pruned(start_server, redis_server, clients):
    """9,000 members of a dead process in one room (more than one Lua call may unpack) are
    pruned in batches: the room and new connections keep working."""
    import redis
    store = redis.Redis.from_url(redis_server.url)
    past = int((time.time() - 60) * 1000)
    pipe = store.pipeline(transaction=False)
    for n in range(100000, 109000):
        pipe.zadd("chat:room:lobby:presence", {n: past})
        pipe.hset("chat:room:lobby:members", n, '{"id": %d, "nick": "Client %d"}' % (n, n))
    pipe.execute()
    server = start_server(env={"REDIS_URL": redis_server.url, "PRESENCE_TTL": "1.5"})
    watcher = clients.json(server)  # in the lobby with the ghosts: its process prunes them
    poll(lambda: store.zcard("chat:room:lobby:presence") == 1, timeout=15)
    newcomer = clients.json(server)
    assert newcomer.welcome["member_count"] == 2
    newcomer.send(type="message", text="still working")
    assert newcomer.wait("ack")["id"] == 1
    assert "refused a command" not in server.log()
    store.close()


def test_a_burst_of_handshakes_waits_for_redis_connections_not_refused(start_server,
                                                                        redis_server):
    """300 chat.v1 handshakes at once need more Redis calls at a time than a process keeps
    connections for: they wait for one, and none is refused as if Redis were down."""
    server = start_server(env={"REDIS_URL": redis_server.url, "RATE_LIMIT": "0"})
    request = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat.v1\r\n\r\n"
               % server.port).encode()
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=15)
            s.sendall(request)
            socks.append(s)
        welcomed = 0
        for s in socks:
            data = b""
            while b'"welcome"' not in data and b"\x88" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            welcomed += b'"welcome"' in data
        assert welcomed == 300
    finally:
        for s in socks:
            s.close()
    assert "Too many connections" not in server.log()
    assert "unreachable" not in server.log()


def test_dead_process_in_a_big_room_is_dropped_without_notices(start_server, redis_server,
                                                                clients):
    """Above PRESENCE_LIMIT no join or leave is announced, and the members of a dead process
    are no exception: one room of 6 with a limit of 3 hears only the leaves that bring it
    under the limit (sizes 2 and 1), not one notice per member gone."""
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "1.5",
           "PRESENCE_LIMIT": "3"}
    a, b = start_server(env=env), start_server(env=env)
    watcher = clients.json(a)
    gone = [clients.json(b) for _ in range(5)]
    watcher.send(type="ping", ref="sync")
    watcher.wait("pong")
    watcher.drain()
    b.signal(signal.SIGKILL)
    b.proc.wait(5)
    heard = []

    def alone():
        watcher.send(type="join", room="lobby")
        while True:
            frame = watcher.recv()
            if frame["type"] == "joined":
                return frame["member_count"] == 1
            heard.append(frame)
    poll(alone, timeout=10)
    heard += watcher.drain(1.0)
    leaves = [m for m in heard if m["type"] == "presence" and m["event"] == "leave"]
    assert len(leaves) == 2, leaves
    assert {m["member"]["id"] for m in leaves} <= {c.id for c in gone}


def test_direct_never_arrives_before_welcome(pair, clients):
    """A `direct` aimed at a connection that is still registering waits for its welcome."""
    a, b = pair
    sender = clients.json(a)
    for _ in range(5):
        target_id = sender.id + 1  # the id the next connection will get
        stop = threading.Event()

        def spam():
            while not stop.is_set():
                sender.send(type="direct", to=target_id, text="early")
                time.sleep(0.001)
        t = threading.Thread(target=spam)
        t.start()
        try:
            target = clients.json(b)  # asserts that its first frame is the welcome
        finally:
            stop.set()
            t.join(5)
        assert target.id == target_id
        sender = target  # the next round aims past it
        sender.drain(0.2)


def test_no_message_twice_after_joined(pair, clients):
    """Messages in a join's history are not delivered again right after `joined`."""
    a, b = pair
    talker = clients.json(a)
    talker.send(type="join", room="busy")
    talker.wait("joined")
    stop = threading.Event()

    def talk():
        n = 0
        while not stop.is_set() and n < 5000:
            talker.send(type="message", room="busy", text="m%d" % n)
            n += 1
            time.sleep(0.002)
    t = threading.Thread(target=talk)
    t.start()
    try:
        joiner = clients.json(b)
        for _ in range(30):
            joiner.send(type="join", room="busy")
            joined = joiner.wait("joined", room="busy")
            seen = [m["id"] for m in joined["history"]]
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                msg = joiner.recv()
                if msg["type"] == "message":
                    seen.append(msg["id"])
            assert len(seen) == len(set(seen)), "a message arrived twice"
            assert seen == sorted(seen)
            joiner.send(type="leave", room="busy")
            joiner.wait("left")
    finally:
        stop.set()
        t.join(5)


def test_redis_refusing_commands_is_unavailable_not_a_crash(pair, redis_server, clients):
    """Redis reachable but refusing writes (out of memory): JSON messages get `unavailable`,
    leaving clients are cleaned up here, nothing crashes."""
    a, b = pair
    j = clients.json(a)
    other = clients.json(a)
    j.wait("presence", event="join")
    with socket.create_connection(("127.0.0.1", redis_server.port), 2) as s:
        s.sendall(b"CONFIG SET maxmemory 1\r\n")
        assert s.recv(64).startswith(b"+OK")
    j.send(type="message", text="no room for this", ref="oom-0001")
    err = j.wait("error")
    assert err["code"] == "unavailable" and err["ref"] == "oom-0001"
    other.close()
    poll(lambda: health(a)["connections"] == 1)
    j.send(type="ping", ref=1)
    assert j.wait("pong")["ref"] == 1


def test_redis_outage_degrades_and_heals(pair, redis_server, clients):
    """Redis down: plain relay goes on locally, JSON messages get `unavailable`, /healthz says
    degraded, the outage is logged once; Redis back (empty: this one keeps nothing), JSON
    clients are asked to reconnect (1012) to catch up, plain ones miss nothing new, and
    everything heals, nothing leaks."""
    a, b = pair
    p1 = clients.plain(a)
    registered(a, 1)
    p2 = clients.plain(a)
    p1.recv()
    j_a, j_b = clients.json(a), clients.json(b)
    for c in (p1, p2):
        c.recv()  # j_a's arrival on a; j_b's arrival too
        c.recv()
    j_a.send(type="message", text="before", ref="outage-0")
    assert j_a.wait("ack")["id"] == 1
    p3 = clients.plain(a)  # joins when the lobby's last id is 1
    p3.send("p3 here")  # handled once p3 is registered
    j_b.wait("message", text="p3 here")
    baseline = health(a)["greenlets"]

    redis_server.stop()
    poll(lambda: health(a)["status"] == "degraded")
    assert health(a)["redis"] == "down"
    p2.send("still here")
    assert re.fullmatch(r'Client \d+ says "still here"', p3.recv())
    j_a.send(type="message", text="lost?", ref="outage-1")
    err = j_a.wait("error")
    assert err["code"] == "unavailable" and err["ref"] == "outage-1"
    j_a.send(type="ping", ref=1)
    assert j_a.wait("pong")["ref"] == 1

    redis_server.start()
    poll(lambda: health(a)["status"] == "ok" and health(b)["status"] == "ok", timeout=15)
    for j in (j_a, j_b):
        assert j.recv_until_closed(timeout=5).code == 1012
    a.wait_for_log("room lobby: messages may have been missed .*its state was lost")
    j_a, j_b = clients.json(a), clients.json(b)
    j_a.send(type="message", text="back", ref="outage-2")
    assert j_a.wait("ack")["id"] == 1  # a new epoch
    assert j_b.wait("message")["text"] == "back"  # resubscribed across processes
    # The new epoch's id 1 is not taken for the old id 1 that p3 joined after.
    while True:
        line = p3.recv()
        if "says" in line:
            break
    assert line == 'Client %d says "back"' % j_a.id
    assert len([l for l in a.lines if "Redis unreachable" in l]) == 1
    assert health(a)["greenlets"] <= baseline + 2


def test_starts_while_redis_is_down_and_heals(start_server, redis_server, clients):
    """A process whose Redis is not up yet starts anyway, degraded, and heals by itself; the
    log says why Redis is unreachable, and when it is reached."""
    redis_server.stop()
    server = start_server(env={"REDIS_URL": redis_server.url})
    assert health(server)["status"] == "degraded"
    status, body = server.ready()  # not ready: traffic should go elsewhere
    assert status == 503 and body["ready"] is False and "unreachable" in body["reason"]
    server.wait_for_log(r"Redis at 127\.0\.0\.1:%d/0 is not reachable yet \(.*Connection refused"
                        % redis_server.port)
    redis_server.start()
    poll(lambda: health(server)["status"] == "ok", timeout=15)
    server.wait_for_log(r"Redis reachable at 127\.0\.0\.1:%d/0: taking connections" % redis_server.port)
    assert server.ready() == (200, {"ready": True})
    j = clients.json(server)
    j.send(type="message", text="hello")
    assert j.wait("ack")["id"] == 1


def test_a_tally_tells_its_count_with_since_when():
    """The refusals' log line: the first at once, then at most one per period, with the
    count and the time of the first it counts, so a count left over from an earlier
    outage is not read as the current one's."""
    now = [0.0]
    tally = session.Tally(30.0, clock=lambda: now[0], wall=lambda: 1000.0 + now[0])
    assert tally.count() == (1, 1000.0)
    for _ in range(999):
        now[0] += 0.01
        assert tally.count() == (0, None)
    now[0] = 86400.0  # the next outage, a day later
    assert tally.count() == (1000, 1000.01)
    now[0] += 1
    assert tally.count() == (0, None)


def test_why_redis_cannot_be_used_is_logged_once_per_reason(start_server, redis_server):
    """A Redis that answers but cannot be used (a database number it does not have) is
    named with its own error at start; each new reason is logged, not every retry."""
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    server = start_server(env={"REDIS_URL": url})
    server.wait_for_log(r"Redis at .*/99 is not reachable yet \(DB index is out of range\)")
    assert health(server)["status"] == "degraded"
    redis_server.stop()
    server.wait_for_log(r"Redis at .*/99 is still unreachable, now: .*Connection refused")
    time.sleep(2.5)  # several retries (backoff from 0.1 s): the same reason is not logged again
    told = [line for line in list(server.lines) if "unreachable" in line or "reachable yet" in line]
    assert len(told) == 2, told


def test_connections_refused_in_an_outage_are_logged_once_not_each(start_server, redis_server,
                                                                    clients):
    """Every client retrying through an outage is refused with 1013; the log says so once
    (then at most every 30 s, with a count), not once per handshake."""
    server = start_server(env={"REDIS_URL": redis_server.url})
    redis_server.stop()
    for _ in range(6):
        closed = clients.plain(server).recv_until_closed()
        assert (closed.code, closed.reason) == (1013, "the shared store is unreachable; try again later")
    told = [line for line in list(server.lines) if "refused" in line and "shared store" in line]
    assert len(told) == 1 and "refused a connection:" in told[0], told


def test_joining_while_the_last_members_leave_keeps_the_room_subscribed(pair, clients):
    """A join that lands while a room's other members on its process are leaving (each leave
    waits on Redis) still hears the room from other processes: the last leave must not
    unsubscribe the process from under it."""
    a, b = pair
    leavers = [clients.json(a) for _ in range(8)]
    joiner, speaker = clients.json(a), clients.json(b)
    deaf = []
    for trial in range(20):
        room = "race%d" % trial
        for c in leavers:
            c.send(type="join", room=room)
        for c in leavers:
            c.wait("joined", room=room)
        for c in leavers:
            c.send(type="leave", room=room)
        time.sleep(trial % 5 * 0.0005)
        joiner.send(type="join", room=room)
        joiner.wait("joined", room=room)
        speaker.send(type="join", room=room)
        speaker.wait("joined", room=room)
        speaker.send(type="message", room=room, text="hello %d" % trial)
        speaker.wait("ack")
        try:
            joiner.wait("message", timeout=2, room=room)
        except AssertionError:
            deaf.append(trial)
        for c in (joiner, speaker):
            c.send(type="leave", room=room)
            c.wait("left", room=room)
        for c in leavers:
            c.wait("left", room=room)
    assert deaf == [], "the joiner heard nothing in trials %s" % deaf


def test_redis_that_hangs_is_taken_for_down_and_heals(start_server, redis_server, clients):
    """A Redis that stops answering but keeps its connections open (SIGSTOP: stopped, or
    swapping) is found out by the first call that times out: /healthz says degraded, plain
    lines go on at once and JSON messages get `unavailable` at once; once it answers again,
    everything heals, and what it took late is not stored then."""
    server = start_server(env={"REDIS_URL": redis_server.url})
    p1, p2 = clients.plain(server), clients.plain(server)
    j = clients.json(server)
    p1.send("warm")  # everyone is registered once this goes round
    assert j.wait("message")["text"] == "warm"
    with hung(redis_server):
        p1.send("during the hang")
        poll(lambda: health(server)["status"] == "degraded", timeout=8)
        start = time.monotonic()
        p1.send("after it was found out")
        j.send(type="message", text="json", ref="hang-0001")
        assert j.wait("error")["code"] == "unavailable"
        while not p2.recv(timeout=1).endswith('says "after it was found out"'):
            pass
        assert time.monotonic() - start < 1.0
    poll(lambda: health(server)["status"] == "ok", timeout=15)
    # The line sent into the hang reached Redis's socket, and Redis runs the command once it
    # goes on, after this process gave up on it: past its deadline, it stores nothing. (It
    # went to the plain clients of this process, as lines do while Redis is down.)
    j.send(type="message", text="back", ref="hang-0002")
    assert j.wait("ack")["ref"] == "hang-0002"
    texts = [m["text"] for m in clients.json(server).welcome["history"]]
    assert texts == ["warm", "back"]


def test_leaving_while_redis_hangs_is_told_to_the_others_once_it_is_back(start_server,
                                                                        redis_server, clients):
    """A client that leaves while Redis cannot hear of it (here: hung, so it keeps its data)
    is told to the clients of its own process at once, and to the other processes once Redis
    is back; its own process's clients do not hear it twice when its presence would have
    expired."""
    # A presence TTL longer than the hang, or every member of a would expire meanwhile.
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "6"}
    a, b = start_server(env=env), start_server(env=env)
    p1 = clients.plain(a)
    leaver = clients.json(a)
    watcher = clients.json(b)
    p1.send("all here")  # handled once p1 is registered
    assert watcher.wait("message")["text"] == "all here"
    with hung(redis_server):
        p1.send("into the hang")
        poll(lambda: health(a)["status"] == "degraded", timeout=8)
        leaver.close()
        gone = "Client %d disconnected." % leaver.id
        while p1.recv() != gone:
            pass
    event = watcher.wait("presence", timeout=10, event="leave")
    assert event["member"] == {"id": leaver.id, "nick": "Client %d" % leaver.id}
    watcher.send(type="join", room="lobby")
    assert leaver.id not in [m["id"] for m in watcher.wait("joined")["members"]]
    time.sleep(6)  # past PRESENCE_TTL: its presence would have expired by now
    heard = []
    while True:
        line = p1.quiet(0.3)
        if line is None:
            break
        heard.append(line)
    assert gone not in heard


def test_a_join_refused_in_an_outage_is_never_told_as_a_leave(start_server, redis_server,
                                                              clients):
    """A join that Redis could not hear of is undone at once; should the undoing reach Redis
    only once it is back, the other processes are not told of a leave (nor a disconnect)
    by a client that never joined and is still connected."""
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "6"}
    a, b = start_server(env=env), start_server(env=env)
    joiner = clients.json(a)
    watcher = clients.json(b)
    watcher.send(type="join", room="x")
    watcher.wait("joined")
    joiner.send(type="leave", room="lobby")
    joiner.wait("left")
    assert watcher.wait("presence", event="leave")["member"]["id"] == joiner.id  # told once
    with hung(redis_server):
        for room in ("x", "lobby"):  # the first finds Redis hung (3 s), the second down
            joiner.send(type="join", room=room, ref=room)
            assert joiner.wait("error", timeout=10)["code"] == "unavailable"
    poll(lambda: health(a)["status"] == "ok", timeout=10)
    time.sleep(1)  # what a wrote after the outage is told by now
    joiner.send(type="join", room="x")
    joiner.wait("joined")
    event = watcher.wait("presence", timeout=5)
    assert (event["room"], event["event"], event["member"]["id"]) == ("x", "join", joiner.id)


def test_a_leave_in_an_outage_is_told_even_if_a_rejoin_is_refused(start_server,
                                                                   redis_server, clients):
    """A member that leaves while Redis hangs, then tries to come back and is refused, has
    still left: the others are told once Redis is back."""
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "6"}
    a, b = start_server(env=env), start_server(env=env)
    member, watcher = clients.json(a), clients.json(b)
    for c in (watcher, member):
        c.send(type="join", room="r")
        c.wait("joined")
    assert watcher.wait("presence", room="r", event="join")["member"]["id"] == member.id
    with hung(redis_server):
        member.send(type="message", room="r", text="into the hang")
        assert member.wait("error", timeout=10)["code"] == "unavailable"
        member.send(type="leave", room="r")
        member.wait("left")
        member.send(type="join", room="r", ref="again")
        assert member.wait("error")["code"] == "unavailable"
    event = watcher.wait("presence", room="r", timeout=10)
    assert (event["event"], event["member"]["id"]) == ("leave", member.id)


def _redis_command(port, *args):
    """One command to Redis over a plain socket (RESP); the reply, decoded."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a), a) for a in (str(x).encode() for x in args)))
        reply = b""
        while not reply.endswith(b"\r\n") or (reply.startswith(b"$") and reply.count(b"\r\n") < 2):
            reply += s.recv(65536)
        return reply.decode()


@pytest.mark.parametrize("newcomer", [False, True], ids=["", "newcomer"])
@pytest.mark.parametrize("before", [["before"], []], ids=["room-with-messages", "empty-room"])
def test_messages_missed_while_subscription_was_cut_reconnect_json_clients(pair, redis_server,
                                                                           clients, before,
                                                                           newcomer):
    """Messages published while one process's subscription was cut, with more arriving right
    after it is back (a busy room), are not missed silently: that process's JSON clients are
    closed with 1012 before any message from beyond the gap, so that rejoining from the last
    id they had recovers exactly what they missed. Also in a room that had no message yet
    when they joined, and when a newcomer's join reads the room just after the cut."""
    a, b = pair
    reader = clients.json(a)
    poster = clients.json(b)
    name = re.search(r"connections named (chat-[0-9a-f]+)",
                     a.wait_for_log(r"connections named chat-")).group(1)
    had = []
    for text in before:
        poster.send(type="message", text=text, ref="cut-before")
        poster.wait("ack")
        had.append(reader.wait("message", text=text))
    listing = _redis_command(redis_server.port, "CLIENT", "LIST")
    # a's pub/sub connection, by its flag: its last command may be a refresh's PING.
    cut = [re.search(r"\bid=(\d+)", line).group(1) for line in listing.splitlines()
           if "name=%s " % name in line and " flags=P " in line]
    assert len(cut) == 1, listing
    # a resubscribes within 100 ms of the cut: stopped meanwhile, it cannot do so before
    # the five are published, however long this test is kept waiting between the two.
    a.signal(signal.SIGSTOP)
    try:
        assert _redis_command(redis_server.port, "CLIENT", "KILL", "ID", cut[0]).startswith(":1")
        for n in range(5):  # while a is not subscribed
            poster.send(type="message", text="missed %d" % n, ref="cut-missed-%d" % n)
            poster.wait("ack")
    finally:
        a.signal(signal.SIGCONT)
    poll(lambda: health(a)["status"] == "ok", timeout=10)
    if newcomer:
        clients.json(a)  # its welcome reads the room's history at once
    for n in range(3):  # and the room goes on
        poster.send(type="message", text="after %d" % n, ref="cut-after-%d" % n)
        poster.wait("ack")
    while True:
        try:
            frame = reader.recv(timeout=10)
        except ConnectionClosed as closed:
            assert closed.code == 1012
            break
        if frame["type"] == "message":
            had.append(frame)
    everything = before + ["missed %d" % n for n in range(5)] + ["after %d" % n for n in range(3)]
    again = clients.json(a)
    assert [m["text"] for m in again.welcome["history"]] == everything
    again.send(type="join", room="lobby", since=had[-1]["id"] if had else 0,
               epoch=reader.welcome["epoch"])
    joined = again.wait("joined")
    assert joined["recovered"] is True
    assert [m["text"] for m in had + joined["history"]] == everything


def test_a_room_whose_sequence_alone_redis_lost_goes_on(pair, redis_server, clients):
    """Under maxmemory with an eviction policy, a room's sequence can go while its history
    stays: the next message goes on from the history's last id, not refused until the
    sequence catches up again."""
    a, _b = pair
    poster = clients.json(a)
    for n in range(3):
        poster.send(type="message", text="kept %d" % n, ref="seq-kept-%d" % n)
        assert poster.wait("ack")["id"] == n + 1
    _redis_command(redis_server.port, "DEL", "chat:room:lobby:seq")
    poster.send(type="message", text="next", ref="seq-next-0")
    assert poster.wait("ack")["id"] == 4
    assert [(m["id"], m["text"]) for m in clients.json(a).welcome["history"]] == \
        [(1, "kept 0"), (2, "kept 1"), (3, "kept 2"), (4, "next")]


@pytest.mark.parametrize("first", ["message", "join"])
def test_a_room_whose_state_redis_lost_reconnects_its_members(pair, redis_server, clients,
                                                              first):
    """A room's keys can go while its members stay (ROOM_TTL without a message, an operator's
    DEL): its ids start again at 1, in a new epoch. Members whose join held higher ids do not
    skip the new ones as seen already: JSON clients are asked to reconnect (1012) and find
    them, plain ones read them; whether a message or a join meets the new epoch first."""
    a, b = pair
    poster = clients.json(b)
    for n in range(3):
        poster.send(type="message", text="old %d" % n, ref="lost-old-%d" % n)
        poster.wait("ack")
    reader, plain = clients.json(a), clients.plain(a)
    assert [m["id"] for m in reader.welcome["history"]] == [1, 2, 3]
    registered(a, 2)  # the plain client's join is answered too: both have their floors
    for key in ("seq", "history", "epoch", "refs"):
        _redis_command(redis_server.port, "DEL", "chat:room:lobby:" + key)
    if first == "join":
        assert clients.json(a).welcome["epoch"] != reader.welcome["epoch"]
        assert reader.recv_until_closed(timeout=10).code == 1012
    poster.send(type="message", text="new 0", ref="lost-new-0")
    if first == "message":
        assert reader.recv_until_closed(timeout=10).code == 1012
    said = 'Client %d says "new 0"' % poster.welcome["id"]
    heard = [plain.recv()]  # (besides the JSON clients' going and coming back)
    while heard[-1] != said and len(heard) < 5:
        heard.append(plain.recv())
    assert said in heard, heard
    again = clients.json(a)
    assert again.welcome["epoch"] != reader.welcome["epoch"]
    assert [(m["id"], m["text"]) for m in again.welcome["history"]] == [(1, "new 0")]


def _redis_output_bytes(port):
    info = _redis_command(port, "INFO", "stats")
    return int(re.search(r"total_net_output_bytes:(\d+)", info).group(1))


def test_a_big_history_is_answered_as_without_redis_and_not_fetched_whole(start_server,
                                                                          redis_server, clients):
    """A join's answer holds the newest messages whose JSON fits in 1 MiB. With Redis the
    answer is the one a single process gives (multi-byte text included: the budget counts
    characters), and the process fetches little more than that: not the whole history,
    which it would have to parse while every other client waits."""
    answers = []
    for env in ({}, {"REDIS_URL": redis_server.url}):
        server = start_server(env=dict(env, RATE_LIMIT="0"))
        poster = clients.json(server)
        for n in range(100):  # HISTORY_SIZE: 100 messages of 60 KB (UTF-8 as is, unescaped)
            poster.ws.send(json.dumps({"type": "message", "text": "%02d " % n + "é" * 30000,
                                       "ref": "big-%02d" % n}, ensure_ascii=False))
            poster.wait("ack")
        sent_before = _redis_output_bytes(redis_server.port)
        joiner = clients.json(server)
        welcome = [m["text"][:2] for m in joiner.welcome["history"]]
        joiner.send(type="join", room="lobby", since=1, epoch=joiner.welcome["epoch"])
        joined = joiner.wait("joined")
        fetched = _redis_output_bytes(redis_server.port) - sent_before
        answers.append((welcome, [m["text"][:2] for m in joined["history"]], joined["recovered"]))
    assert answers[0] == answers[1]
    welcome, recovered_texts, recovered = answers[1]
    assert 20 < len(welcome) < 50 and welcome[-1] == "99" and welcome == recovered_texts
    assert recovered is False  # some after since=1 did not fit
    # Two answers of 1 MiB of characters, 2 MiB of UTF-8 each, and one message more each:
    # not the 12 MB of two whole histories.
    assert fetched < 5.5e6, fetched


def test_a_message_refused_as_unavailable_is_not_stored_later(start_server, redis_server,
                                                              clients):
    """'unavailable' says the message was not stored: a Redis that hung takes the command
    once it goes on, and then must not store it (no ref to tell a resend from it)."""
    env = {"REDIS_URL": redis_server.url, "RATE_LIMIT": "0", "PRESENCE_TTL": "6"}
    a, b = start_server(env=env), start_server(env=env)
    sender, other = clients.json(a), clients.json(b)
    sender.send(type="message", text="before the hang")
    sender.wait("ack")
    other.wait("message", text="before the hang")
    with hung(redis_server):
        sender.send(type="message", text="into the hang")
        error = sender.wait("error", timeout=10)
        assert error["code"] == "unavailable" and "not stored" in error["message"]
    poll(lambda: health(a)["status"] == "ok", timeout=10)
    sender.send(type="message", text="after the hang")
    sender.wait("ack")
    assert other.wait("message")["text"] == "after the hang"
    texts = [m["text"] for m in clients.json(b).welcome["history"]]
    assert texts == ["before the hang", "after the hang"]
