"""Hostile clients against a live server over real sockets to 127.0.0.1: connection churn,
clients that are slow to send or never read, floods, garbage instead of a handshake, invalid
and truncated frames, extreme JSON, names at and past their limits, too many rooms, and
property-based tests over the frame reader and the protocol decoder.

Every test is bounded in count and time and ends with the server alive, the right close code
or error, the other clients unaffected and no traceback in the server's log.
"""
import base64
import codecs
import json
import os
import re
import select
import socket
import statistics
import struct
import threading
import time

import pytest
import websocket
from hypothesis import HealthCheck, given, settings, strategies as st

from chatserver.protocol import NICK_MAX, REF_MAX
from chatserver.transport import (CLOSE_WAIT, CONTROL_RATE, HTTP_CONCURRENCY, HTTP_TIMEOUT,
                                  SLOW_CLOSE_WAIT)
from tests.clients import ConnectionClosed, RawClient, frame_bytes, mask_bytes
from tests.conftest import Server

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- helpers ------------------------------------------------------------------------------

def health(server, verbose=False):
    return server.health(verbose)


def rss_mb(server):
    """The server process's resident set size in MiB, from /proc."""
    with open("/proc/%d/status" % server.proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS for pid %d" % server.proc.pid)


def wait_until(check, timeout, what):
    """Poll ``check()`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %s s" % (what, timeout))
        time.sleep(0.05)


def tracebacks(server, since=0):
    return [l for l in server.lines[since:] if "Traceback" in l]


def assert_no_traceback(server, since=0):
    assert not tracebacks(server, since), "server logged a traceback:\n" + "\n".join(server.lines[since:])


def close_frame(code=1000):
    return frame_bytes(OP_CLOSE, struct.pack("!H", code))


def handshake_request(port, path="/ws", extra=""):
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
            % (path, port, key, extra)).encode("latin-1")


def read_upgrade(sock):
    """Read a 101 answer; returns the bytes that followed it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError("connection closed during the handshake: %r" % buf)
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return rest


def ws_socket(port, path="/ws", rcvbuf=None):
    """A raw socket with a finished handshake: (socket, bytes read past the handshake)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(handshake_request(port, path))
    return sock, read_upgrade(sock)


def parse_frames(buf):
    """Complete server frames at the start of ``buf``: ([(opcode, payload)], rest)."""
    out = []
    while len(buf) >= 2:
        n, pos = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, pos = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < pos + n:
            break
        out.append((buf[0] & 0x0F, buf[pos:pos + n]))
        buf = buf[pos + n:]
    return out, buf


def read_until_close_or_eof(sock, buf=b"", timeout=5.0):
    """Server frames until its close frame or EOF: (frames before the close, close code or
    None, whether EOF or a reset came instead of a close frame)."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        got, buf = parse_frames(buf)
        for i, (op, payload) in enumerate(got):
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return frames + got[:i], code, False
        frames += got
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("neither a close frame nor EOF within %s s; frames %r"
                                 % (timeout, frames[:10]))
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return frames, None, True
        buf += chunk


def reset(sock):
    """Close with a TCP reset (RST) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Calm:
    """Two JSON clients chatting in room ``calm``, out of the lobby: the bystanders whose
    service must not change whatever the hostile client does."""

    def __init__(self, clients, server):
        self.a, self.b = clients.json(server), clients.json(server)
        for c in (self.a, self.b):
            c.send(type="join", room="calm")
            c.wait("joined", room="calm")
        for c in (self.a, self.b):
            c.send(type="leave", room="lobby")
            c.wait("left", room="lobby")
        self.n = 0

    def check(self, timeout=2.0):
        """a says something: a's ack and b's copy arrive within ``timeout``; returns the seconds."""
        self.n += 1
        token = "calm-%d-%s" % (self.n, os.urandom(3).hex())
        start = time.monotonic()
        self.a.send(type="message", room="calm", text=token, ref=token)
        self.a.wait("ack", timeout=timeout, ref=token)
        self.b.wait("message", timeout=timeout, text=token)
        return time.monotonic() - start


class Collector(threading.Thread):
    """Reads a plain client's lines in the background until ``stop()`` or ``until`` arrives."""

    def __init__(self, client, until=None):
        super().__init__(daemon=True)
        self.client, self.until = client, until
        self.lines, self.error = [], None
        self._stop_event = threading.Event()
        self.start()

    def run(self):
        while not self._stop_event.is_set():
            try:
                line = self.client.recv(timeout=1)
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.error = exc
                return
            self.lines.append(line)
            if line == self.until:
                return

    def count(self, predicate):
        return sum(1 for line in list(self.lines) if predicate(line))

    def stop(self):
        self._stop_event.set()
        self.join(5)


class RawCollector(Collector):
    """A Collector over a raw socket (no UTF-8 check in Python: fast for big frames)."""

    def __init__(self, sock, rest=b"", until=None):
        self.sock, self.buf = sock, rest
        super().__init__(None, until)

    def run(self):
        self.sock.settimeout(1)
        while not self._stop_event.is_set():
            frames, self.buf = parse_frames(self.buf)
            for op, payload in frames:
                if op == OP_TEXT:
                    line = payload.decode("utf-8")
                    self.lines.append(line)
                    if line == self.until:
                        return
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                self.error = exc
                return
            if not chunk:
                self.error = EOFError("the server closed the reader's connection")
                return
            self.buf += chunk


def new_id(collector, before):
    """The id in the first ``Client N connected.`` among the lines after index ``before``."""
    def find():
        for line in collector.lines[before:]:
            if line.startswith("Client ") and line.endswith(" connected."):
                return int(line.split()[1])
        return None
    return wait_until(find, 5, "a connection notice")


# -- 1,000 connections opened and dropped ---------------------------------------------------

CHURN, BATCH = 1000, 100
RSS_SLACK_MB = 8  # what may stay behind after 1,000 connections (allocator arenas, caches)


def _churn(port, n):
    """Open ``n`` connections, BATCH at a time, and drop them: half with a close frame (and
    the server's answer read), half reset, a quarter of them in the middle of a frame."""
    for _ in range(n // BATCH):
        socks = []
        for _ in range(BATCH):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(handshake_request(port))
            socks.append(sock)
        rests = [read_upgrade(sock) for sock in socks]
        for i, sock in enumerate(socks):
            if i % 2 == 0:
                sock.sendall(close_frame(1000))
            elif i % 4 == 1:
                reset(sock)
            else:
                sock.sendall(frame_bytes(OP_TEXT, b"half a frame", length=100))
                reset(sock)
        for i in range(0, BATCH, 2):
            _, code, eof = read_until_close_or_eof(socks[i], rests[i])
            assert code == 1000 and not eof, (code, eof)
            socks[i].close()


def test_thousand_connections_opened_and_dropped_leave_no_trace(start_server, clients):
    """1,000 connections dropped (half closed, half reset) leave registry, greenlets and RSS at their baseline."""
    server = start_server(env={"RATE_LIMIT": "0"})
    calm = Calm(clients, server)
    watcher = Collector(clients.plain(server))
    _churn(server.port, 200)  # warm-up: what is made once, lazily, belongs in the baseline
    wait_until(lambda: health(server)["connections"] == 3, 10, "warm-up connections gone")
    # The watcher's reader thread may lag: the warm-up's lines must all be in before the count.
    wait_until(lambda: sum(l.endswith(" disconnected.") for l in list(watcher.lines)) == 200, 10,
               "the lobby told of every warm-up departure")
    base_greenlets = health(server, verbose=True)["greenlets"]
    base_rss = rss_mb(server)
    before = len(watcher.lines)

    start = time.monotonic()
    _churn(server.port, CHURN)
    assert time.monotonic() - start < 60

    wait_until(lambda: health(server)["connections"] == 3, 10, "every dropped connection unregistered")
    assert health(server)["rooms"] == 2  # lobby (the watcher) and calm
    wait_until(lambda: health(server, verbose=True)["greenlets"] <= base_greenlets + 3, 5,
               "greenlets back to the baseline of %d" % base_greenlets)
    grown = rss_mb(server) - base_rss
    print("RSS %.1f -> %.1f MiB, greenlets %d -> %d" % (base_rss, base_rss + grown, base_greenlets,
                                                       health(server, verbose=True)["greenlets"]))
    assert grown <= RSS_SLACK_MB, "RSS grew by %.1f MiB over 1,000 connections" % grown
    lines = lambda: watcher.lines[before:]  # noqa: E731
    wait_until(lambda: sum(l.endswith(" disconnected.") for l in lines()) == CHURN, 10,
               "the lobby told of every departure")
    assert sum(l.endswith(" connected.") for l in lines()) == CHURN
    assert not any(" says " in l for l in lines())  # half a frame is never a message
    assert calm.check() < 1.0
    watcher.stop()
    assert watcher.error is None, watcher.error
    assert_no_traceback(server)


# -- clients slow to send ---------------------------------------------------------------------

def _watch_eof(socks, timeout, tick=None, every=2.0):
    """Seconds until each socket saw EOF or a reset, reading what arrives (None: still open);
    ``tick()`` runs every ``every`` seconds and its results are returned too."""
    start = time.monotonic()
    result = {s: None for s in socks}
    pending, ticks, next_tick = set(socks), [], start
    while pending and time.monotonic() - start < timeout:
        if tick is not None and time.monotonic() >= next_tick:
            ticks.append(tick())
            next_tick += every
        ready, _, _ = select.select(list(pending), [], [], 0.1)
        for s in ready:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                result[s] = time.monotonic() - start
                pending.discard(s)
    return result, ticks


def test_request_never_completed_is_dropped_after_http_timeout(start_server, clients):
    """Clients that send nothing or half a request are dropped after HTTP_TIMEOUT s; the others chat on."""
    server = start_server()
    calm = Calm(clients, server)
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    partial = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webso")
        partial.append(s)
    times, latencies = _watch_eof([idle] + partial, HTTP_TIMEOUT + 4, tick=calm.check)
    for s, t in times.items():
        assert t is not None, "a client that never finished its request is still connected"
        assert HTTP_TIMEOUT - 1 <= t <= HTTP_TIMEOUT + 3, t
        s.close()
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies
    assert health(server)["connections"] == 2
    server.wait_for_log(r"dropped an incomplete HTTP request")
    assert_no_traceback(server)


def test_requests_trickled_byte_by_byte_are_dropped_after_http_timeout(start_server, clients):
    """Headers, or a body (which the server reads to its end), sent one byte a second are
    dropped HTTP_TIMEOUT s after the request began; more slow clients than are served at once
    wait their turn without using up file descriptors; chat goes on, and a new client gets in."""
    # A socket timeout restarts with every byte, so a trickle needs a deadline for the whole
    # request (HTTP_TIMEOUT) to be dropped.
    server = start_server(env={"MAX_CONNECTIONS": "100"})  # 356 file descriptors, no more
    calm = Calm(clients, server)
    trickles = {
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ": b"a",
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n": b"a",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n": b"1\r\na\r\n",
    }
    slow = {}
    for head, drip in trickles.items():
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(head)
        slow[s] = drip
    crowd = []  # more than are served at once: the rest wait in the listen backlog
    for _ in range(HTTP_CONCURRENCY + 20):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        crowd.append(s)
    start, dropped, latencies = time.monotonic(), {}, []
    while len(dropped) < len(slow) and time.monotonic() - start < HTTP_TIMEOUT + 4:
        latencies.append(calm.check())
        for s, drip in slow.items():
            if s in dropped:
                continue
            try:
                s.sendall(drip)
                closed = select.select([s], [], [], 0)[0] and not _read_to_eof(s)
            except OSError:
                closed = True
            if closed:
                dropped[s] = time.monotonic() - start
        time.sleep(1.0)
    assert len(dropped) == len(slow), "a trickling request is still connected after %.0f s" % (
        HTTP_TIMEOUT + 4)
    assert max(dropped.values()) <= HTTP_TIMEOUT + 3, dropped
    assert max(latencies) < 1.0, latencies
    newcomer = clients.json(server)  # served once the first slow ones are gone
    assert newcomer.id
    for s in list(slow) + crowd:
        s.close()
    assert "Too many open files" not in server.log()
    assert_no_traceback(server)


def test_idle_kept_alive_connections_do_not_keep_handshakes_waiting(start_server, clients):
    """As many kept-alive HTTP connections as are served at once, each idle after one answer
    (a crowd of browsers), do not make a new WebSocket handshake wait: once slots run short,
    answers close their connection."""
    server = start_server()
    idle, closing = [], []
    for _ in range(HTTP_CONCURRENCY):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = _read_answer(s)
        assert answer.startswith(b"HTTP/1.1 200")
        head = answer.split(b"\r\n\r\n")[0].lower()
        if b"connection: close" in head:
            closing.append(s)  # told: the answer ends the connection
        else:
            assert b"connection:" not in head, head  # kept alive (HTTP/1.1's default)
            idle.append(s)
    # The first answers keep their connection; once a quarter of the slots is left, each
    # says it closes, and does.
    assert len(idle) == HTTP_CONCURRENCY - HTTP_CONCURRENCY // 4, (len(idle), len(closing))
    for s in closing:
        assert not _read_to_eof(s)
    start = time.monotonic()
    newcomer = clients.json(server)
    assert newcomer.id and time.monotonic() - start < 2.0
    for s in closing:
        s.close()
    for s in idle:
        s.close()


def _read_answer(sock):
    """One whole HTTP answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return data


def _read_to_eof(sock):
    """Read what is there; False once the peer has closed (EOF or reset)."""
    try:
        return bool(sock.recv(65536))
    except OSError:
        return False


# -- a client that never reads ----------------------------------------------------------------

def test_requests_of_a_client_that_does_not_read_wait_and_lose_nothing(start_server, clients):
    """A client that asks for a room's 1 MB history again and again without reading does not
    make the server queue it all: its requests wait while over 1 MiB waits for it, and once it
    reads, every one is answered, in order."""
    server = start_server(env={"RATE_LIMIT": "0", "HISTORY_SIZE": "20",
                               "MALLOC_MMAP_THRESHOLD_": "32768"})
    writer = clients.json(server)
    for n in range(20):
        writer.send(type="message", text="%02d %s" % (n, "x" * 50000))
        writer.wait("ack")
    base = rss_mb(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(handshake_request(server.port, extra="Sec-WebSocket-Protocol: chat.v1\r\n"))
        buf = read_upgrade(sock)
        asks = 100  # 100 MB of answers
        sock.sendall(b"".join(frame_bytes(OP_TEXT, json.dumps(
            {"type": "join", "room": "lobby", "ref": "ask-%d" % n}).encode()) for n in range(asks)))
        time.sleep(1.0)
        assert rss_mb(server) - base < 40, "the server queued %.0f MiB" % (rss_mb(server) - base)
        refs = []
        while len(refs) < asks:
            chunk = sock.recv(1 << 20)
            assert chunk, "closed after %d answers" % len(refs)
            frames, buf = parse_frames(buf + chunk)
            refs += [json.loads(p)["ref"] for op, p in frames
                     if op == OP_TEXT and json.loads(p)["type"] == "joined"]
        assert refs == ["ask-%d" % n for n in range(asks)]
    finally:
        sock.close()
    assert_no_traceback(server, 0)


def test_client_slowly_reading_paused_answers_is_kept_and_one_that_stops_is_dropped(start_server, clients):
    """While a client's requests wait for it to read (backpressure), its pongs wait too: one
    that keeps reading, however slowly, is not dropped as silent and gets every answer; one
    that reads nothing is dropped after PING_TIMEOUT all the same."""
    server = start_server(env={"RATE_LIMIT": "0", "HISTORY_SIZE": "20",
                               "PING_INTERVAL": "0.3", "PING_TIMEOUT": "1.5"})
    writer = clients.json(server)
    for n in range(20):
        writer.send(type="message", text="%02d %s" % (n, "x" * 50000))
        writer.wait("ack")
    writer.close()  # it would not answer pings either
    asks = 10  # 10 MB of answers, read at about 2 MB/s: longer than PING_TIMEOUT
    socks = []
    for rcvbuf in (65536, 4096):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(handshake_request(server.port, extra="Sec-WebSocket-Protocol: chat.v1\r\n"))
        buf = read_upgrade(sock)
        sock.sendall(b"".join(frame_bytes(OP_TEXT, json.dumps(
            {"type": "join", "room": "lobby", "ref": "ask-%d" % n}).encode()) for n in range(asks)))
        socks.append((sock, buf))
    (slow, buf), (stuck, _) = socks
    try:
        start = time.monotonic()
        refs = []
        while len(refs) < asks:
            chunk = slow.recv(65536)
            assert chunk, "dropped after %d answers, %.1f s" % (len(refs), time.monotonic() - start)
            frames, buf = parse_frames(buf + chunk)
            refs += [json.loads(p)["ref"] for op, p in frames
                     if op == OP_TEXT and json.loads(p)["type"] == "joined"]
            for op, payload in frames:
                if op == OP_PING:  # as any client does; the server reads them once caught up
                    slow.sendall(frame_bytes(OP_PONG, payload))
            time.sleep(0.03)
        assert time.monotonic() - start > 1.5 + 0.3, "read too fast to test the keepalive"
        assert refs == ["ask-%d" % n for n in range(asks)]
        server.wait_for_log(r"dropping the connection from .*: silent", timeout=5)
        assert len(server.log().split("silent for")) == 2, "only the client that reads nothing"
    finally:
        slow.close()
        stuck.close()
    assert_no_traceback(server, 0)


def test_client_that_never_reads_is_closed_its_queue_freed_and_latency_elsewhere_flat(start_server, clients):
    """A client that never reads is closed with 1008, its ~60 MiB queue is freed, and ping latency elsewhere stays flat."""
    # OUTBOX_SIZE is the default 1024 frames. Frames of 60 KB would come from glibc's heap,
    # which keeps freed pages for reuse: RSS could not tell a leak from that cache. With
    # allocations over 32 KiB mmapped, a freed queue leaves RSS at once.
    server = start_server(env={"RATE_LIMIT": "0", "MALLOC_MMAP_THRESHOLD_": "32768"})
    pinger = clients.json(server)
    pinger.send(type="leave", room="lobby")
    pinger.wait("left")
    reader_sock, rest = ws_socket(server.port)
    reader = RawCollector(reader_sock, rest)
    sender = RawClient(server.port)
    sender.handshake()
    sender_id = new_id(reader, 0)
    pad = "x" * 60000
    sent = [0]
    pings = [0]

    def burst(k=10):
        # keep the reader (a Python thread) within 300 messages, so its own queue never fills
        wait_until(lambda: sent[0] - reader.count(lambda l: l.startswith("Client %d says" % sender_id))
                   < 300 or reader.error, 20, "the reader keeps up")
        for _ in range(k):
            sender.sock.sendall(frame_bytes(OP_TEXT, ("%05d %s" % (sent[0], pad)).encode()))
            sent[0] += 1

    def rtt():
        pings[0] += 1
        start = time.monotonic()
        pinger.send(type="ping", ref=pings[0])
        pinger.wait("pong", timeout=5, ref=pings[0])
        return time.monotonic() - start

    base_rtts = []
    for _ in range(30):  # the same traffic without a slow client, for the baseline
        burst()
        base_rtts.append(rtt())
    base_rss = rss_mb(server)

    before = len(reader.lines)
    slow, _ = ws_socket(server.port, rcvbuf=4096)  # reads nothing from here on
    slow_id = new_id(reader, before)
    rtts, peak = [], base_rss
    while sent[0] < 4000 and not any("slow consumer" in l for l in server.lines):
        burst()
        rtts.append(rtt())
        peak = max(peak, rss_mb(server))
    assert any("slow consumer" in l for l in server.lines), "no slow consumer closed after %d" % sent[0]
    closed_at = time.monotonic()
    for _ in range(10):
        burst()
        rtts.append(rtt())
    wait_until(lambda: "Client %d disconnected." % slow_id in reader.lines, SLOW_CLOSE_WAIT + 3,
               "the slow client leaves the registry")
    assert time.monotonic() - closed_at <= SLOW_CLOSE_WAIT + 3
    server.wait_for_log(r"Connection %d from \S+ closed \(1008\)" % slow_id)

    print("RSS %.0f -> peak %.0f -> %.0f MiB; ping median %.1f -> %.1f ms, max %.1f ms" % (
        base_rss, peak, rss_mb(server), 1000 * statistics.median(base_rtts),
        1000 * statistics.median(rtts), 1000 * max(rtts)))
    assert peak - base_rss >= 30, "the queue never held much: %.0f -> %.0f MiB" % (base_rss, peak)
    wait_until(lambda: rss_mb(server) <= base_rss + 10, 5,
               "RSS back near %.0f MiB from a peak of %.0f MiB" % (base_rss, peak))
    assert max(rtts) < 0.5, sorted(rtts)[-5:]
    assert statistics.median(rtts) <= 3 * statistics.median(base_rtts) + 0.02, (
        statistics.median(base_rtts), statistics.median(rtts))

    reader.until = 'Client %d says "END"' % sender_id
    sender.send_text("END")
    wait_until(lambda: reader.lines and reader.lines[-1] == reader.until or reader.error, 20,
               "the reader gets everything")
    assert reader.error is None, reader.error
    got = [l for l in reader.lines if l.startswith("Client %d says" % sender_id)]
    assert got[:-1] == ['Client %d says "%05d %s"' % (sender_id, i, pad) for i in range(sent[0])]
    slow.close()
    reader.stop()
    reader_sock.close()
    assert_no_traceback(server)


# -- floods -------------------------------------------------------------------------------------

def test_flooder_is_rate_limited_then_closed_while_others_chat(start_server, clients):
    """A plain client sending as fast as it can is relayed at RATE_LIMIT, then closed with 1008; others chat on."""
    # A flooder's reads never block, so without a yield its greenlet would never let the
    # others (or any timer) run: the reader gives the loop a turn every few milliseconds.
    server = start_server(env={"RATE_LIMIT": "10", "RATE_BURST": "20"})
    calm = Calm(clients, server)
    watcher = Collector(clients.plain(server))
    flooder = RawClient(server.port)
    flooder.handshake()
    flooder_id = new_id(watcher, 0)
    burst = b"".join(frame_bytes(OP_TEXT, b"spam %d" % i) for i in range(200))
    stop, sent = threading.Event(), [0]

    def flood():
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline and not stop.is_set():
                flooder.sock.sendall(burst)
                sent[0] += 200
        except OSError:
            pass

    thread = threading.Thread(target=flood, daemon=True)
    start = time.monotonic()
    thread.start()
    latencies = [calm.check() for _ in range(5)]
    code, _reason = flooder.recv_close(timeout=5)
    elapsed = time.monotonic() - start
    stop.set()
    thread.join(5)
    assert code == 1008
    assert sent[0] >= 200
    relayed = watcher.count(lambda l: l.startswith("Client %d says" % flooder_id))
    assert 1 <= relayed <= 20 + 10 * elapsed + 1, (relayed, elapsed)
    assert max(latencies) < 1.0, latencies
    server.wait_for_log(r"closing connection %d: flooding" % flooder_id)
    flooder.close()
    wait_until(lambda: health(server)["connections"] == 3, 10, "the flooder leaves the registry")
    assert calm.check() < 1.0
    watcher.stop()
    assert_no_traceback(server)


def test_flooder_that_ignores_the_close_frame_is_dropped(start_server, clients):
    """A flooder that goes on sending after its 1008 is disconnected within CLOSE_WAIT s; the others chat on."""
    # Data frames after our close frame refresh last_seen, so only the close timeout can
    # drop a peer that ignores the close frame (the same holds for a plain client's 1003).
    server = start_server(env={"RATE_LIMIT": "5", "RATE_BURST": "5"})
    calm = Calm(clients, server)
    flooder = RawClient(server.port)
    flooder.handshake()
    flooder.sock.sendall(b"".join(frame_bytes(OP_TEXT, b"spam %d" % i) for i in range(100)))
    assert flooder.recv_close()[0] == 1008
    start, dropped_at = time.monotonic(), None
    while time.monotonic() - start < CLOSE_WAIT + 3:
        try:
            flooder.sock.sendall(frame_bytes(OP_TEXT, b"still here"))
            if select.select([flooder.sock], [], [], 0.1)[0] and not flooder.sock.recv(65536):
                raise ConnectionResetError
        except OSError:
            dropped_at = time.monotonic() - start
            break
    assert calm.check() < 1.0
    assert dropped_at is not None, "still connected %.0f s after the close frame" % (CLOSE_WAIT + 3)
    assert dropped_at <= CLOSE_WAIT + 1.5, dropped_at
    wait_until(lambda: health(server)["connections"] == 2, 5, "the flooder leaves the registry")
    flooder.close()
    assert_no_traceback(server)


FLOODS = {
    "pings": (frame_bytes(OP_PING, b"p" * 125) * 1000, "too many control frames"),
    "pongs": (frame_bytes(OP_PONG, b"") * 1000, "too many control frames"),
    "empty-fragments": (frame_bytes(OP_TEXT, b"", fin=False)
                        + frame_bytes(OP_CONT, b"", fin=False) * 2000, "too many fragments"),
}


@pytest.mark.parametrize("flood", FLOODS)
def test_floods_of_frames_that_carry_no_message_are_closed_with_1008(start_server, clients, flood):
    """Pings, unsolicited pongs or a message that never ends, one empty fragment after another,
    are outside the message rate limit: past CONTROL_RATE a second, or MAX_MESSAGE_SIZE / 64
    fragments (at least 256), the flooder is closed with 1008; the others chat on."""
    frames_, reason = FLOODS[flood]
    server = start_server()
    calm = Calm(clients, server)
    sock, rest = ws_socket(server.port, rcvbuf=4096)
    try:
        sock.sendall(frames_)
    except OSError:
        pass  # closed before it took everything
    latency = calm.check()
    frames, code, eof = read_until_close_or_eof(sock, rest, timeout=CLOSE_WAIT + 2)
    assert code == 1008, (code, eof)
    assert all(op == OP_PONG for op, _ in frames)
    assert latency < 1.0
    sock.close()
    server.wait_for_log(r"closing connection: %s.*\(1008\)" % reason)
    wait_until(lambda: health(server)["connections"] == 2, CLOSE_WAIT + 3,
               "the flooder leaves the registry")
    assert_no_traceback(server)


def test_pings_at_a_modest_rate_are_all_answered(start_server):
    """Below CONTROL_RATE a second, every ping gets its pong, in order."""
    server = start_server()
    sock, rest = ws_socket(server.port)
    sock.sendall(b"".join(frame_bytes(OP_PING, b"%d" % n) for n in range(CONTROL_RATE)))
    got, buf = [], rest
    sock.settimeout(5)
    while len(got) < CONTROL_RATE:
        chunk = sock.recv(65536)
        assert chunk, "closed after %d pongs" % len(got)
        frames, buf = parse_frames(buf + chunk)
        got += [payload for op, payload in frames if op == OP_PONG]
    assert got == [b"%d" % n for n in range(CONTROL_RATE)]
    sock.close()


# -- garbage instead of a handshake --------------------------------------------------------------

@pytest.fixture(scope="module")
def garbage_server():
    """A default server shared by the garbage tests; each checks the log lines of its own run."""
    srv = Server()
    yield srv
    srv.stop()


def _send_garbage(server, data, timeout=5.0):
    """Send ``data``, end our side, and read the answer to EOF: (status or None, answer)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    answer = b""
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may refuse before it has read everything
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "no EOF within %s s after %r" % (timeout, answer[:80])
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    if not answer:
        return None, answer
    assert answer.startswith(b"HTTP/1."), answer[:80]
    return int(answer.split(b" ", 2)[1]), answer


def _assert_still_serving(server, since):
    sock, _ = ws_socket(server.port)
    sock.sendall(frame_bytes(OP_PING, b"alive?"))
    frames, buf = [], b""
    deadline = time.monotonic() + 5
    while not frames and time.monotonic() < deadline:
        buf += sock.recv(4096)
        frames, buf = parse_frames(buf)
    assert (OP_PONG, b"alive?") in frames, frames
    sock.close()
    assert_no_traceback(server, since)


U = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
K = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
GARBAGE = {
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "nul-bytes": b"\x00" * 1024,
    "blank-lines": b"\r\n" * 100,
    "request-line-100k": b"GET /" + b"a" * 100000,
    "header-line-70k": b"GET /ws HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    "key-not-ascii": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U
                     + b"Sec-WebSocket-Key: \xff\xfe\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "version-not-ascii": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U
                         + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: \xff\r\n\r\n",
    "nul-in-path": b"GET /ws\x00 HTTP/1.1\r\n\r\n",
    "negative-content-length": b"GET /ws HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "huge-content-length": b"GET /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "bad-chunked-body": b"GET /ws HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
    "http-9.9": b"GET /ws HTTP/9.9\r\n\r\n",
    "http-1.0-upgrade": b"GET /ws HTTP/1.0\r\nHost: x\r\n" + U + K + b"\r\n",
    "utf8-method": b"G\xc3\xa9T /ws HTTP/1.1\r\n\r\n",
    "4000-subprotocols": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + K
                         + b"Sec-WebSocket-Protocol: " + b"x," * 4000 + b"\r\n\r\n",
    "folded-header": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + K + b" folded: y\r\n\r\n",
    "origin-not-ascii": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + K + b"Origin: http://\xe9.example\r\n\r\n",
    "absolute-uri-elsewhere": b"GET http://elsewhere/ws HTTP/1.1\r\nHost: x\r\n" + U + K + b"\r\n",
    "percent-garbage-path": b"GET /%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "post-with-expect": b"POST /ws HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
    "doubled-headers": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + U + K + K + b"\r\n",
    "static-traversal": b"GET /static/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    "300-headers": b"GET /ws HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_instead_of_a_handshake_gets_4xx_or_nothing(garbage_server, name):
    """Garbage where a handshake belongs gets a 4xx answer or none, promptly; the server serves on."""
    # More than 100 header lines make http.client raise HTTPException, which gevent would
    # print with a traceback unless it is treated as the client's error.
    since = len(garbage_server.lines)
    status, answer = _send_garbage(garbage_server, GARBAGE[name])
    assert status is None or 400 <= status < 500, answer[:200]
    _assert_still_serving(garbage_server, since)


def test_handshake_without_host_is_refused_with_400(garbage_server):
    """A handshake without a Host header is not a valid opening handshake (RFC 6455 4.2.1): HTTP 400."""
    # RFC 6455 4.2.1 item 2: a handshake must carry Host.
    since = len(garbage_server.lines)
    status, answer = _send_garbage(garbage_server, b"GET /ws HTTP/1.1\r\n" + U + K + b"\r\n")
    assert status == 400, answer[:200]
    _assert_still_serving(garbage_server, since)


@pytest.mark.parametrize("length", ["0", "00", " 0 "])
def test_handshake_with_an_empty_body_is_upgraded(garbage_server, length):
    """Content-Length: 0 (however written) is no body: the handshake is upgraded."""
    request = (b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + K
               + b"Content-Length: %s\r\n\r\n" % length.encode())
    sock = socket.create_connection(("127.0.0.1", garbage_server.port), timeout=5)
    try:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
    finally:
        sock.close()


@pytest.mark.parametrize("body", [b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                                  b"Content-Length: 5\r\n\r\nhello"], ids=["chunked", "length"])
def test_handshake_with_a_body_is_refused(garbage_server, body):
    """A handshake that claims a body gets 400 and no upgrade: the bytes after it would be
    taken for WebSocket frames (RFC 6455 4.1)."""
    since = len(garbage_server.lines)
    status, answer = _send_garbage(garbage_server, b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + K + body)
    assert status == 400, answer[:200]
    assert answer.endswith(b"A WebSocket handshake has no body.\n")
    _assert_still_serving(garbage_server, since)


def test_malformed_requests_are_logged_as_the_clients_doing(garbage_server):
    """Bytes that are not HTTP get a 400 that says so, and an INFO line naming the peer, not
    an ERROR: a public port sees them all day."""
    since = len(garbage_server.lines)
    status, answer = _send_garbage(garbage_server, GARBAGE["tls-client-hello"])
    assert status == 400 and answer.endswith(b"Malformed HTTP request.\n"), answer[:200]
    line = garbage_server.wait_for_log(r"INFO .*bad HTTP request from 127\.0\.0\.1:\d+: ")
    assert "Invalid HTTP method" in line
    assert not [l for l in garbage_server.lines[since:] if " ERROR " in l]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=3000))
def test_random_bytes_instead_of_a_handshake(garbage_server, data):
    """Random bytes where a handshake belongs get a 4xx answer or none, and no traceback."""
    since = len(garbage_server.lines)
    status, answer = _send_garbage(garbage_server, data)
    assert status is None or 400 <= status < 500, answer[:200]
    time.sleep(0.01)
    assert_no_traceback(garbage_server, since)


def test_access_log_escapes_and_cuts_request_lines(garbage_server):
    """What a client sends is logged escaped and cut: it cannot forge a log line or field."""
    since = len(garbage_server.lines)
    _send_garbage(garbage_server, b"GET /\x1b[31mred\rfake HTTP/1.1\r\nHost: x\r\n\r\n")
    _send_garbage(garbage_server, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    _send_garbage(garbage_server, b'GET /x" 200 4242 0.1 "-" HTTP/1.1\r\nHost: x\r\n\r\n')
    _send_garbage(garbage_server, b"GET /ws HTTP/1.1\r\nHost: x\r\n" + U + K
                  + b"Origin: http://e\x1b[31mvil\x08\x08FAKE\r\n\r\n")
    garbage_server.wait_for_log(r'"GET /a{507}\.\.\.\(cut: 8192 characters\)" 414 ')
    garbage_server.wait_for_log(r'"GET /\\x1b\[31mred\\rfake HTTP/1\.1" ')
    garbage_server.wait_for_log(r'"GET /x\\" 200 4242 0\.1 \\"-\\" HTTP/1\.1" 400 ')
    garbage_server.wait_for_log(r"403 Forbidden Origin http://e\\x1b\[31mvil\\x08\\x08FAKE ")
    new = garbage_server.lines[since:]
    assert not [l for l in new if "\x1b" in l or "\r" in l or "\x08" in l]
    assert max(len(l) for l in new) < 1000


def test_garbage_server_serves_on(garbage_server):
    """After all the garbage, the shared server still upgrades and answers, with no traceback left unreported."""
    _assert_still_serving(garbage_server, len(garbage_server.lines))
    assert health(garbage_server)["connections"] == 0


# -- invalid and truncated frames on /ws ----------------------------------------------------------

BAD_FRAMES = {
    "reserved-bit": (frame_bytes(OP_TEXT, b"x", rsv=4), 1002),
    "opcode-6": (frame_bytes(0x6, b"x"), 1002),
    "opcode-0xD": (frame_bytes(0xD, b""), 1002),
    "fragmented-ping": (frame_bytes(OP_PING, b"x", fin=False), 1002),
    "fragmented-close": (frame_bytes(OP_CLOSE, b"\x03\xe8", fin=False), 1002),
    "unmasked-text": (frame_bytes(OP_TEXT, b"hello", mask=False), 1002),
    "unmasked-ping": (frame_bytes(OP_PING, b"hello", mask=False), 1002),
    "lone-continuation": (frame_bytes(OP_CONT, b"x"), 1002),
    "overlong-slash": (frame_bytes(OP_TEXT, b"\xc0\xaf"), 1007),
    "cesu-surrogate-pair": (frame_bytes(OP_TEXT, b"\xed\xa0\xbd\xed\xb8\x80"), 1007),
    "beyond-u10ffff": (frame_bytes(OP_TEXT, b"\xf4\x90\x80\x80"), 1007),
    "utf8-in-second-fragment": (frame_bytes(OP_TEXT, b"ok", fin=False)
                                + frame_bytes(OP_CONT, b"\xfe"), 1007),
    "announces-2-GiB": (frame_bytes(OP_BINARY, b"", length=2 ** 31), 1009),
    "truncated-header": (b"\x81", None),
    "truncated-length": (b"\x81\xfe\x01", None),
    "truncated-mask": (b"\x81\x85\x01\x02", None),
    "truncated-payload": (frame_bytes(OP_TEXT, b"hello", length=50), None),
    "truncated-fragmented-message": (frame_bytes(OP_TEXT, b"part one", fin=False), None),
}


def test_invalid_and_truncated_frames_get_their_close_codes_and_others_are_unaffected(start_server, clients):
    """Each bad frame on /ws gets its close code (truncated ones: a dropped connection); nothing is relayed; others chat on."""
    server = start_server()
    calm = Calm(clients, server)
    watcher = Collector(clients.plain(server))
    socks = {}
    for name, (data, _code) in BAD_FRAMES.items():
        sock, rest = ws_socket(server.port)
        socks[name] = (sock, rest)
    wait_until(lambda: watcher.count(lambda l: l.endswith(" connected.")) == len(BAD_FRAMES), 5,
               "every bad client arrived")
    for name, (data, code) in BAD_FRAMES.items():
        sock = socks[name][0]
        sock.sendall(data)
        if code is None:
            sock.shutdown(socket.SHUT_WR)
    assert calm.check() < 1.0
    for name, (data, code) in BAD_FRAMES.items():
        sock, rest = socks[name]
        _frames, got, eof = read_until_close_or_eof(sock, rest)
        if code is None:
            assert eof and got is None, (name, got)
        else:
            assert got == code and not eof, (name, got, eof)
        sock.close()
    wait_until(lambda: health(server)["connections"] == 3, 5, "every bad client left the registry")
    wait_until(lambda: watcher.count(lambda l: l.endswith(" disconnected.")) == len(BAD_FRAMES), 5,
               "every departure announced")
    assert not watcher.count(lambda l: " says " in l)
    assert calm.check() < 1.0
    watcher.stop()
    assert_no_traceback(server)


# -- the frame reader, property-based ---------------------------------------------------------------

ECHO_MAX = 256  # MAX_MESSAGE_SIZE of the echo server below: small, so that 1009 is in reach


@pytest.fixture(scope="module")
def echo_server():
    """A server with ECHO_ENDPOINT=1 and MAX_MESSAGE_SIZE=256, shared by the property tests."""
    srv = Server(env={"ECHO_ENDPOINT": "1", "MAX_MESSAGE_SIZE": str(ECHO_MAX)})
    yield srv
    srv.stop()
    assert_no_traceback(srv)


def _valid_close_code(code):
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or \
        3000 <= code <= 4999


def expected_replies(stream, max_size):
    """What the server must answer to ``stream`` (client bytes) on /echo, by RFC 6455:
    (frames it sends, outcome); outcome is a close code (it closes after those frames),
    "eof" (the bytes ended between or inside frames: it drops the connection without a close
    frame once we end our side), or {"eof", 1007} when a truncated text frame already holds
    invalid UTF-8 (failing it then, or at EOF, are both right)."""
    out, pos = [], 0
    opcode, parts, size, decoder = None, [], 0, None

    def take(n):
        nonlocal pos
        if pos + n > len(stream):
            raise EOFError
        data = stream[pos:pos + n]
        pos += n
        return data

    while True:
        if pos == len(stream):
            return out, "eof"
        try:
            b0, b1 = take(2)
            fin, rsv, op = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
            masked, n = bool(b1 & 0x80), b1 & 0x7F
            if rsv or op not in (0, 1, 2, 8, 9, 10):
                return out, 1002
            if op >= 8 and (not fin or n > 125):
                return out, 1002
            if n == 126:
                n = struct.unpack("!H", take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", take(8))[0]
                if n >> 63:
                    return out, 1002
            if not masked:
                return out, 1002
            key = take(4)
            if op >= 8:
                payload = mask_bytes(take(n), key)
                if op == OP_PING:
                    out.append((OP_PONG, payload))
                elif op == OP_CLOSE:
                    if not payload:
                        return out, 1000
                    if len(payload) == 1:
                        return out, 1002
                    code = struct.unpack("!H", payload[:2])[0]
                    if not _valid_close_code(code):
                        return out, 1002
                    try:
                        payload[2:].decode("utf-8")
                    except UnicodeDecodeError:
                        return out, 1007
                    return out, code
                continue
            if op == OP_CONT and opcode is None:
                return out, 1002
            if op != OP_CONT and opcode is not None:
                return out, 1002
            if op != OP_CONT:
                opcode = op
                decoder = codecs.getincrementaldecoder("utf-8")() if op == OP_TEXT else None
            size += n
            if size > max_size:
                return out, 1009
            available = stream[pos:pos + n]
            if decoder is not None:
                try:
                    decoder.decode(mask_bytes(available, key), final=fin and len(available) == n)
                except UnicodeDecodeError:
                    return out, (1007 if len(available) == n else {"eof", 1007})
            payload = mask_bytes(take(n), key)
            parts.append(payload)
            if fin:
                out.append((opcode, b"".join(parts)))
                opcode, parts, size, decoder = None, [], 0, None
        except EOFError:
            return out, "eof"


utf8_bits = st.sampled_from([b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"\xc3", b"\xa9",
                             b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xff", b"\x80"])
text_payloads = st.one_of(st.text(max_size=24).map(lambda t: t.encode("utf-8")),
                          st.lists(st.one_of(utf8_bits, st.binary(max_size=4)), max_size=5)
                          .map(b"".join))
close_payloads = st.one_of(
    st.binary(max_size=3),
    st.builds(lambda code, reason: struct.pack("!H", code) + reason,
              st.sampled_from([1000, 1001, 1002, 1003, 1005, 1006, 1007, 1011, 1015, 999, 2999,
                               3000, 4999, 5000]),
              st.one_of(st.text(max_size=10).map(lambda t: t.encode("utf-8")), st.binary(max_size=6))))


@st.composite
def client_frames(draw):
    op = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 2, 8, 9, 9, 10, 3, 0xB]))
    if op == OP_CLOSE:
        payload = draw(close_payloads)
    elif op in (OP_TEXT, OP_CONT):
        payload = draw(text_payloads)
    else:
        payload = draw(st.binary(max_size=130))
    return frame_bytes(op, payload,
                       fin=draw(st.sampled_from([True, True, False])),
                       rsv=draw(st.sampled_from([0] * 14 + [1, 2, 4])),
                       mask=draw(st.sampled_from([True] * 14 + [False])),
                       length=draw(st.sampled_from([None] * 24 + [126, 300, 70000, 2 ** 40, 2 ** 63])))


@st.composite
def client_streams(draw):
    """Client bytes after the handshake: frames, then a close frame, a cut, or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=64))
    stream = b"".join(draw(st.lists(client_frames(), min_size=1, max_size=6)))
    ending = draw(st.sampled_from(["close", "close", "cut", "garbage"]))
    if ending == "close":
        return stream + close_frame(1000)
    if ending == "cut":
        return stream[:draw(st.integers(1, len(stream)))]
    return stream + draw(st.binary(min_size=1, max_size=20))


def test_reply_to_a_message_sent_just_before_a_half_close_is_delivered(echo_server):
    """A message followed at once by the client's FIN (a half-close) still gets its echo before EOF."""
    # The peer only closed its sending side: replies corked before its EOF must still go out.
    for _ in range(20):
        sock, rest = ws_socket(echo_server.port, "/echo")
        try:
            sock.sendall(frame_bytes(OP_TEXT, b"last words"))
            sock.shutdown(socket.SHUT_WR)
            got, code, eof = read_until_close_or_eof(sock, rest)
        finally:
            sock.close()
        assert (got, code, eof) == ([(OP_TEXT, b"last words")], None, True)


@pytest.mark.timeout(180)
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=client_streams())
def test_frame_reader_answers_any_bytes_as_rfc6455_says(echo_server, stream):
    """Any bytes after the handshake get exactly the echoes, pongs and close code RFC 6455 prescribes."""
    # Replies corked before an EOF must not be dropped (see the half-close test above).
    want, outcome = expected_replies(stream, ECHO_MAX)
    sock, rest = ws_socket(echo_server.port, "/echo")
    try:
        try:
            sock.sendall(stream)
            if outcome == "eof" or isinstance(outcome, set):
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it may have failed the connection before taking everything
        got, code, eof = read_until_close_or_eof(sock, rest, timeout=CLOSE_WAIT + 3)
    finally:
        sock.close()
    assert got == want
    if outcome == "eof":
        assert eof and code is None, (code, eof)
    elif isinstance(outcome, set):
        assert (eof and code is None) or code == 1007, (code, eof)
    else:
        assert code == outcome and not eof, (code, outcome, eof)


# -- the protocol decoder, over a live session --------------------------------------------------

ANSWER_TYPES = {"message", "ack", "joined", "left", "nick", "presence", "direct", "typing", "pong",
                "error"}
ERROR_CODES = {"bad_json", "bad_request", "unknown_type", "not_in_room", "no_such_client",
               "too_many_rooms"}


@pytest.fixture(scope="module")
def json_session():
    """A server (RATE_LIMIT=0, MAX_ROOMS=5) and one chat.v1 client on it, shared by the
    decoder tests; a plain client in the lobby stays connected throughout."""
    from tests.clients import JsonClient, PlainClient
    srv = Server(env={"RATE_LIMIT": "0", "MAX_ROOMS": "5"})
    client, bystander = JsonClient(srv.port), PlainClient(srv.port)
    watcher = Collector(bystander)
    yield srv, client, watcher
    watcher.stop()
    client.close()
    bystander.close()
    srv.stop()
    assert_no_traceback(srv)


def _answers_until_pong(client, ref, timeout=5):
    """Frames the client gets until the pong for ``ref``; fails on a close."""
    seen = []
    client.send(type="ping", ref=ref)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no pong within %s s; got %r" % (timeout, seen[-5:])
        try:
            msg = client.recv(left)
        except ConnectionClosed as closed:
            raise AssertionError("the server closed the connection: %s %s" % (closed.code, closed.reason))
        if msg.get("type") == "pong" and msg.get("ref") == ref:
            return seen
        seen.append(msg)


def _check_answers(answers):
    for msg in answers:
        assert isinstance(msg, dict) and msg.get("type") in ANSWER_TYPES, msg
        if msg["type"] == "error":
            assert msg["code"] in ERROR_CODES and isinstance(msg["message"], str), msg
            assert len(msg["message"]) < 300, msg  # no echo of a huge input


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                       max_size=4),
    max_leaves=15)
FIELDS = ["room", "text", "nick", "to", "since", "epoch", "ref"]
plausible = {"room": st.sampled_from(["lobby", "calm", "r1", "r2", "r3", "r4", "r5", "a" * 64, "a" * 65]),
             "text": st.text(max_size=40), "nick": st.text(max_size=40), "to": st.integers(-2, 5),
             "since": st.integers(-1, 10), "epoch": st.text(max_size=10),
             "ref": st.one_of(st.text(max_size=70), st.integers(-2 ** 60, 2 ** 60))}
requests = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["message", "join", "leave", "nick", "direct", "typing", "ping",
                                        "", "welcome", "MESSAGE"]), json_values)},
    optional={f: st.one_of(plausible[f], json_values) for f in FIELDS})
json_frames = st.one_of(
    requests.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=100),
    st.integers(1, 3000).map(lambda d: "[" * d + "]" * d),
    st.integers(1, 3000).map(lambda d: '{"type": "message", "text": "x", "deep": %s%s}'
                             % ("[" * d, "]" * d)),
)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(frame=json_frames)
def test_any_text_frame_gets_contract_answers_and_the_connection_lives(json_session, frame):
    """Any text frame (wrong types in every field, deep nesting) gets contract answers only; the connection stays open."""
    server, client, watcher = json_session
    since = len(server.lines)
    client.ws.send(frame)
    _check_answers(_answers_until_pong(client, "p-%s" % os.urandom(4).hex()))
    assert watcher.error is None, watcher.error
    assert_no_traceback(server, since)


EXTREME = [
    ("[" * 60000, "bad_json"),
    ('{"type": "message", "text": "x", "deep": %s%s}' % ("[" * 30000, "]" * 30000), "bad_json"),
    ('{"type": "message", "text": "x", "deep": %s%s}' % ("[" * 500, "]" * 500), "ack"),
    ('{"type": "join", "room": "r", "since": %s}' % ("9" * 5000), "bad_json"),
    ('{"type": "join", "room": "r", "since": 1e400}', "bad_request"),
    ('{"type": "message", "text": "x", "ref": NaN}', "bad_request"),
    ('{"type": "direct", "to": %d, "text": "x"}' % 2 ** 64, "no_such_client"),
    (json.dumps({"type": "m" * 60000}), "unknown_type"),
    (json.dumps({"type": "message", "text": "x", "ref": "r" * 60000}), "bad_request"),
    (json.dumps({"type": "nick", "nick": "n" * 60000}), "bad_request"),
    (json.dumps({"type": "join", "room": "r" * 60000}), "bad_request"),
    (json.dumps(dict({"f%d" % i: i for i in range(3000)}, type="message", text="x")), "ack"),
    ("\ufeff" + json.dumps({"type": "ping"}), "bad_json"),
    (json.dumps({"type": ["message"], "text": "x"}), "bad_request"),
    (json.dumps({"type": {"$gt": ""}}), "bad_request"),
    (json.dumps({"type": "message", "text": {"toString": "x"}}), "bad_request"),
    (json.dumps({"type": "message", "text": "x", "room": ["lobby"]}), "bad_request"),
    (json.dumps({"type": "message", "text": "x", "room": None}), "ack"),  # null is absent: the lobby
    (json.dumps({"type": "join", "room": "r", "since": True}), "bad_request"),
    (json.dumps({"type": "direct", "to": 1.0, "text": "x"}), "bad_request"),
    (json.dumps({"type": "message", "text": "y" * 65000}), "ack"),
]


@pytest.mark.parametrize("frame, want", EXTREME, ids=[
    "60k-brackets", "30k-deep-field", "500-deep-field", "5000-digit-number", "1e400", "NaN-ref",
    "2**64-id", "60k-type", "60k-ref", "60k-nick", "60k-room", "3000-fields", "BOM", "type-list",
    "type-object", "text-object", "room-list", "room-null", "since-bool", "to-float", "65000-text"])
def test_extreme_json_gets_its_answer_and_the_connection_stays_open(start_server, clients, frame, want):
    """Deep, huge and mistyped JSON gets its error (or ack), bounded, and the connection stays open."""
    server = start_server(env={"RATE_LIMIT": "0"})
    client = clients.json(server)
    watcher = clients.plain(server)
    client.ws.send(frame)
    answers = _answers_until_pong(client, "after")
    _check_answers(answers)
    kinds = [a["type"] if a["type"] != "error" else a["code"] for a in answers]
    assert want in kinds, kinds
    if want == "ack":
        assert watcher.recv().startswith('Client %d says "' % client.id)
    assert_no_traceback(server)


# -- names and rooms at and past their limits ---------------------------------------------------

LIMITS = [
    ({"type": "join", "room": "r" * 64}, "joined"),
    ({"type": "join", "room": "r" * 65}, "bad_request"),
    ({"type": "join", "room": ""}, "bad_request"),
    ({"type": "join", "room": "caf\u00e9"}, "bad_request"),
    ({"type": "join", "room": "a b"}, "bad_request"),
    ({"type": "join", "room": "a/b"}, "bad_request"),
    ({"type": "join", "room": "a\u0000"}, "bad_request"),
    ({"type": "nick", "nick": "n" * NICK_MAX}, "nick"),
    ({"type": "nick", "nick": "n" * (NICK_MAX + 1)}, "bad_request"),
    ({"type": "nick", "nick": "   " + "n" * NICK_MAX + "   "}, "nick"),
    ({"type": "nick", "nick": "\U0001F600" * NICK_MAX}, "nick"),
    ({"type": "nick", "nick": "\U0001F600" * (NICK_MAX + 1)}, "bad_request"),
    ({"type": "nick", "nick": "   "}, "bad_request"),
    ({"type": "nick", "nick": "a\u200bb"}, "bad_request"),
    ({"type": "nick", "nick": "evil\u202e"}, "bad_request"),
    ({"type": "nick", "nick": "two\nlines"}, "bad_request"),
    ({"type": "ping", "ref": "f" * REF_MAX}, "pong"),
    ({"type": "ping", "ref": "f" * (REF_MAX + 1)}, "bad_request"),
    ({"type": "ping", "ref": 2 ** 53 - 1}, "pong"),
    ({"type": "ping", "ref": 2 ** 53}, "bad_request"),
]


@pytest.mark.parametrize("request_, want", LIMITS, ids=[
    "room-64", "room-65", "room-empty", "room-accent", "room-space", "room-slash", "room-nul",
    "nick-max", "nick-max+1", "nick-max-padded", "nick-max-emoji", "nick-max+1-emoji", "nick-blank",
    "nick-zero-width", "nick-rtl-override", "nick-newline", "ref-max", "ref-max+1", "ref-2**53-1",
    "ref-2**53"])
def test_names_at_and_past_their_limits(start_server, clients, request_, want):
    """Room names, nicks and refs at their limit are taken, one past it refused; a bystander sees only what was taken."""
    server = start_server()
    client, other = clients.json(server), clients.json(server)
    client.wait("presence", event="join")
    client.send(request_)
    answers = _answers_until_pong(client, "after")
    _check_answers(answers)
    kinds = [a["type"] if a["type"] != "error" else a["code"] for a in answers]
    assert kinds == [want], kinds
    if "ref" in request_:  # in the answer or the error, as sent
        assert answers[0]["ref"] == request_["ref"]
    if want == "nick":
        assert answers[0]["nick"] == request_["nick"].strip()
        assert other.wait("presence", event="nick")["member"]["nick"] == request_["nick"].strip()
    else:
        assert other.quiet() is None
    assert_no_traceback(server)


def test_too_many_rooms_for_one_client_stay_bounded_and_are_freed(start_server, clients):
    """300 joins from one client get MAX_ROOMS rooms and too_many_rooms for the rest; the rooms go with it."""
    server = start_server(env={"RATE_LIMIT": "0", "MAX_ROOMS": "20"})
    calm = Calm(clients, server)
    greedy = clients.json(server)
    for i in range(300):
        greedy.send(type="join", room="greedy-%d" % i, ref=i)
    answers = _answers_until_pong(greedy, "after", timeout=10)
    _check_answers(answers)
    joined = [a for a in answers if a["type"] == "joined"]
    refused = [a for a in answers if a.get("code") == "too_many_rooms"]
    assert len(joined) == 19 and len(refused) == 281  # the lobby is the 20th
    assert [a["ref"] for a in refused] == list(range(19, 300))
    assert health(server)["rooms"] == 21  # its 20 and calm
    assert calm.check() < 1.0
    for i in range(19):
        greedy.send(type="leave", room="greedy-%d" % i)
    for i in range(2000):  # rooms come and go: the registry keeps none that are empty
        greedy.send(type="join", room="churn-%d" % i)
        greedy.send(type="leave", room="churn-%d" % i)
    answers = _answers_until_pong(greedy, "churned", timeout=20)
    _check_answers(answers)
    assert sum(a["type"] == "joined" for a in answers) == 2000
    assert sum(a["type"] == "left" for a in answers) == 2019
    assert health(server)["rooms"] == 2  # the lobby and calm
    greedy.close()
    wait_until(lambda: health(server)["rooms"] == 1, 5, "the greedy client's rooms are gone")
    assert calm.check() < 1.0
    assert_no_traceback(server)
