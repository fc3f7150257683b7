"""The frame level of RFC 6455 against the live server: framing errors and their close codes,
size limits, UTF-8 validation, control frames, keepalive, slow consumers, floods and shutdown."""
import gc
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import gevent
import gevent.socket
import pytest
import websocket

from chatserver import frames, transport
from tests.clients import ConnectionClosed, frame_bytes
from tests.conftest import ROOT, running



@pytest.fixture(scope="module")
def server():
    """One default server for the tests of this module that need no special settings (each
    test uses its own connections); it must log no traceback."""
    with running() as srv:
        yield srv

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def raw_client(server, clients, **handshake):
    raw = clients.raw(server)
    raw.handshake(**handshake)
    return raw


def close_code(raw, timeout=5):
    code, _reason = raw.recv_close(timeout)
    return code


def new_client_id(watcher):
    """The id in the next `Client N connected.` that the plain client ``watcher`` receives."""
    return int(re.fullmatch(r"Client (\d+) connected\.", watcher.recv()).group(1))


def assert_eof(raw, timeout):
    """The server drops the TCP connection within ``timeout`` s (frames before EOF are skipped);
    returns the opcodes seen before the EOF."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "still connected after %s s; frames seen %r" % (timeout, seen)
        try:
            opcode, _ = raw.recv_frame(left)
        except (EOFError, ConnectionResetError):
            return seen
        except socket.timeout:
            raise AssertionError("still connected after %s s; frames seen %r" % (timeout, seen))
        seen.append(opcode)


# -- framing errors -----------------------------------------------------------------------

def test_unmasked_client_frame_is_closed_with_1002(server, clients):
    """A client frame without a mask is a protocol error: close 1002 (RFC 6455 5.1)."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_TEXT, b"hello", mask=False)
    assert close_code(raw) == 1002


@pytest.mark.parametrize("rsv", [1, 2, 4])
def test_reserved_bits_are_closed_with_1002(server, clients, rsv):
    """A frame with a reserved bit set and no extension negotiated gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_TEXT, b"hello", rsv=rsv)
    assert close_code(raw) == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
def test_unknown_opcode_is_closed_with_1002(server, clients, opcode):
    """A reserved opcode gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(opcode, b"x")
    assert close_code(raw) == 1002


def test_fragmented_ping_is_closed_with_1002(server, clients):
    """A control frame without FIN (a fragmented ping) gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_PING, b"abc", fin=False)
    assert close_code(raw) == 1002


def test_long_control_frame_is_closed_with_1002(server, clients):
    """A ping longer than 125 bytes gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_PING, b"p" * 126)
    assert close_code(raw) == 1002


def test_continuation_without_start_is_closed_with_1002(server, clients):
    """A continuation frame with no message in progress gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CONT, b"orphan")
    assert close_code(raw) == 1002


def test_new_message_inside_fragmented_one_is_closed_with_1002(server, clients):
    """A text frame while a fragmented message is unfinished gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_TEXT, b"first", fin=False)
    raw.send_frame(OP_TEXT, b"second")
    assert close_code(raw) == 1002


# -- sizes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    """A server with MAX_MESSAGE_SIZE=1000, shared by the size tests."""
    with running(env={"MAX_MESSAGE_SIZE": "1000"}) as srv:
        yield srv


def test_huge_announced_frame_is_closed_with_1009_before_payload(small, clients):
    """A header announcing 10,000,000 bytes gets close 1009 at once, without any payload sent."""
    raw = raw_client(small, clients)
    raw.send_frame(OP_TEXT, b"", length=10_000_000)  # the header and mask only
    start = time.monotonic()
    assert close_code(raw, timeout=2) == 1009
    assert time.monotonic() - start < 1.0


def test_fragments_over_the_limit_are_closed_with_1009(small, clients):
    """Fragments of 600 + 600 bytes exceed MAX_MESSAGE_SIZE=1000 together: close 1009."""
    raw = raw_client(small, clients)
    raw.send_frame(OP_TEXT, b"a" * 600, fin=False)
    raw.send_frame(OP_CONT, b"b" * 600)
    assert close_code(raw) == 1009


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_one_byte_over_the_limit_is_closed_with_1009(small, clients, opcode):
    """A single frame of MAX_MESSAGE_SIZE + 1 bytes, text or binary, gets close 1009."""
    raw = raw_client(small, clients)
    raw.send_frame(opcode, b"a" * 1001)
    assert close_code(raw) == 1009


def test_64bit_length_with_top_bit_set_is_closed_with_1002(small, clients):
    """A 64-bit payload length with its most significant bit set gets close 1002 (RFC 6455 5.2)."""
    raw = raw_client(small, clients)
    raw.sock.sendall(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 1 << 63) + b"\0\0\0\0")
    assert close_code(raw) == 1002


def test_message_of_exactly_the_limit_is_relayed(small, clients):
    """A message of exactly MAX_MESSAGE_SIZE bytes, in two fragments, is accepted and relayed."""
    watcher = clients.plain(small)
    raw = raw_client(small, clients)
    raw_id = new_client_id(watcher)
    raw.send_frame(OP_TEXT, b"x" * 400, fin=False)
    raw.send_frame(OP_CONT, b"y" * 600)
    assert watcher.recv() == 'Client %d says "%s"' % (raw_id, "x" * 400 + "y" * 600)
    raw.send_text("z" * 1000)
    assert watcher.recv() == 'Client %d says "%s"' % (raw_id, "z" * 1000)


# -- UTF-8 --------------------------------------------------------------------------------

@pytest.mark.parametrize("fragments", [
    [b"\xff"],                                  # never valid in UTF-8
    [b"abc\xed\xa0\x80"],                       # an encoded surrogate
    [b"caf\xc3", b"\x28"],                      # invalid continuation in the next fragment
    [b"ok \xe2\x82", b"\x28 rest"],             # a 3-byte char broken across fragments
    [b"abc", b"\xe2\x82"],                      # truncated char at the end of the final fragment
    [b"abc\xf0\x9f", b""],                      # truncated char, then an empty final fragment
    [b"abc\xf0\x9f\x98"],                       # truncated char in a single frame
], ids=["ff", "surrogate", "split-bad-cont", "split-3byte", "truncated-final", "truncated-empty-final",
        "truncated-single"])
def test_invalid_utf8_is_closed_with_1007(server, clients, fragments):
    """A text message that is not valid UTF-8, however it is fragmented, gets close 1007."""
    raw = raw_client(server, clients)
    for i, part in enumerate(fragments):
        raw.send_frame(OP_TEXT if i == 0 else OP_CONT, part, fin=i == len(fragments) - 1)
    assert close_code(raw) == 1007


def test_text_after_our_close_frame_is_dropped(server, clients):
    """Messages that follow our close frame in the same packet are read and dropped, not
    relayed (RFC 6455 1.4), short ones as well as long ones."""
    watcher = clients.plain(server)
    raw = raw_client(server, clients)
    raw_id = new_client_id(watcher)
    raw.sock.sendall(frame_bytes(OP_BINARY, b"\x00")  # plain text has no binary: 1003
                     + frame_bytes(OP_TEXT, b"short after close")
                     + frame_bytes(OP_TEXT, b"long after close " * 10))
    assert close_code(raw) == 1003
    raw.send_frame(OP_CLOSE, struct.pack("!H", 1000))
    assert watcher.recv() == "Client %d disconnected." % raw_id
    assert watcher.quiet() is None


def test_multibyte_chars_split_across_fragments_are_relayed_intact(server, clients):
    """Valid characters split between fragments arrive whole at a plain client."""
    watcher = clients.plain(server)
    raw = raw_client(server, clients)
    raw_id = new_client_id(watcher)
    text = "h\u00e9llo \u20ac \U0001F44B!"
    data = text.encode("utf-8")
    # cut inside é (2 bytes), inside € (3 bytes) and twice inside 👋 (4 bytes)
    cuts = [2, data.index(b"\xe2") + 1, data.index(b"\xf0") + 1, data.index(b"\xf0") + 3]
    parts = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert b"".join(parts) == data and len(parts) == 5
    for i, part in enumerate(parts):
        raw.send_frame(OP_TEXT if i == 0 else OP_CONT, part, fin=i == len(parts) - 1)
    assert watcher.recv() == 'Client %d says "%s"' % (raw_id, text)


def test_control_frames_between_fragments_are_allowed(server, clients):
    """A ping between two fragments is answered and the message still arrives."""
    watcher = clients.plain(server)
    raw = raw_client(server, clients)
    raw_id = new_client_id(watcher)
    raw.send_frame(OP_TEXT, b"one ", fin=False)
    raw.send_frame(OP_PING, b"mid")
    raw.send_frame(OP_CONT, b"two")
    assert raw.recv_frame() == (OP_PONG, b"mid")
    assert watcher.recv() == 'Client %d says "one two"' % raw_id


# -- control frames -----------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"payload-123", bytes(range(125))])
def test_ping_is_answered_with_pong_of_same_payload(server, clients, payload):
    """The server answers a ping with a pong carrying the same payload."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_PING, payload)
    assert raw.recv_frame() == (OP_PONG, payload)


def test_close_1000_is_echoed_with_1000(server, clients):
    """A client's close frame with code 1000 is answered with a close frame carrying 1000."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    opcode, payload = raw.recv_frame()
    assert opcode == OP_CLOSE
    assert len(payload) >= 2, "the close frame must carry a status code, not be empty"
    assert struct.unpack("!H", payload[:2])[0] == 1000
    assert_eof(raw, 3)


def test_close_with_application_code_is_echoed(server, clients):
    """A close frame with a valid application code (4000) is answered with that code."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CLOSE, struct.pack("!H", 4000))
    assert close_code(raw) == 4000


@pytest.mark.parametrize("code", [1012, 1013])
def test_a_browser_echoing_our_restart_codes_is_answered_in_kind(server, clients, code):
    """Browsers answer our 1012 (restart) and 1013 (try again later) with the same code: it
    is a registered code (IANA), not a protocol error."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CLOSE, struct.pack("!H", code))
    assert close_code(raw) == code
    time.sleep(0.2)
    assert "invalid close code" not in server.log()


@pytest.mark.parametrize("code", [1005, 1006, 1015, 999, 2000])
def test_close_with_invalid_code_is_1002(server, clients, code):
    """A close frame with a code that must not be sent on the wire gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CLOSE, struct.pack("!H", code))
    assert close_code(raw) == 1002


def test_close_reason_that_is_not_utf8_is_1007(server, clients):
    """A close frame whose reason is not valid UTF-8 gets close 1007."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe")
    assert close_code(raw) == 1007


def test_unsolicited_pong_is_ignored(server, clients):
    """An unsolicited pong is allowed (RFC 6455 5.5.3): the connection goes on."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_PONG, b"unasked")
    raw.send_frame(OP_PING, b"still there?")
    assert raw.recv_frame() == (OP_PONG, b"still there?")


def test_close_with_one_byte_payload_is_1002(server, clients):
    """A close frame whose payload is a single byte gets close 1002."""
    raw = raw_client(server, clients)
    raw.send_frame(OP_CLOSE, b"\x03")
    assert close_code(raw) == 1002


# -- heartbeat ----------------------------------------------------------------------------

@pytest.fixture
def beating(start_server):
    """A server pinging every 0.2 s and dropping peers silent for 1 s."""
    return start_server(env={"PING_INTERVAL": "0.2", "PING_TIMEOUT": "1"})


def test_silent_raw_client_gets_pings_then_is_dropped(beating, clients):
    """A raw client receives ping frames and, never answering them, is dropped within ~3 s."""
    raw = raw_client(beating, clients)
    start = time.monotonic()
    seen = assert_eof(raw, 3.5)
    assert seen.count(OP_PING) >= 2, seen
    assert time.monotonic() - start < 3.5
    beating.wait_for_log(r"dropping the connection from 127\.0\.0\.1:\d+: silent")


def test_client_sending_one_big_message_slowly_is_not_silent(beating, clients):
    """A peer in the middle of a frame cannot answer a ping (RFC 6455 5.4: control frames
    go between frames): while its bytes keep coming, over a slow link, it is alive, and
    its message arrives whole."""
    plain = clients.plain(beating)
    raw = raw_client(beating, clients)
    raw_id = new_client_id(plain)
    text = "slow " * 20
    frame = frame_bytes(OP_TEXT, text.encode())
    heard = []
    for i in range(0, len(frame), 4):  # 3 s, three times PING_TIMEOUT
        raw.sock.sendall(frame[i:i + 4])
        heard.append(plain.quiet(3 / (len(frame) / 4)))  # (the watcher answers its pings)
    heard = [line for line in heard if line is not None] or [plain.recv()]
    assert heard == ['Client %d says "%s"' % (raw_id, text)]
    assert "silent" not in beating.log()


def test_client_answering_pings_stays_connected(beating, clients):
    """A websocket-client connection, which pongs every ping, is still served after 2.5 s."""
    j = clients.json(beating)
    pings = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        j.ws.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            opcode, _frame = j.ws.recv_data_frame(control_frame=True)  # pongs each ping
        except websocket.WebSocketTimeoutException:
            break
        assert opcode == websocket.ABNF.OPCODE_PING, opcode
        pings += 1
    assert pings >= 5
    j.send(type="ping", ref=1)
    assert j.wait("pong", timeout=2) == {"type": "pong", "ref": 1}
    assert beating.health()["connections"] == 1


# -- slow consumer ------------------------------------------------------------------------

def test_slow_consumer_is_dropped_while_others_get_everything(start_server, clients):
    """A client that stops reading is closed as a slow consumer; a reading one gets all, in order."""
    server = start_server(env={"OUTBOX_SIZE": "8", "RATE_LIMIT": "0"})
    reader = clients.plain(server)
    slow = raw_client(server, clients)  # never reads again
    slow_id = new_client_id(reader)
    sender = clients.plain(server)
    sender_id = new_client_id(reader)
    assert server.health()["connections"] == 3

    # The kernel buffers a few MB for the silent peer before the server has to queue, so the
    # sender goes on (1 KiB a message) until the server gives up on it; it never runs more
    # than `ahead` messages in front of the reader, whose own outbox must not fill.
    pad, ahead, cap = "x" * 1024, 400, 30000
    got, errors, done = [], [], threading.Event()

    def read_all():
        try:
            while True:
                line = reader.recv(timeout=10)
                if line == 'Client %d says "END"' % sender_id:
                    return
                if line.startswith("Client %d says" % sender_id):
                    got.append(line)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=read_all, daemon=True)
    thread.start()
    sent, dropped_at = 0, None
    while sent < cap and (dropped_at is None or sent < dropped_at + 500):
        if sent - len(got) > ahead:
            assert not done.is_set(), ("reader stopped", errors)
            time.sleep(0.001)
            continue
        sender.send("%05d %s" % (sent, pad))
        sent += 1
        if dropped_at is None and sent % 100 == 0 and any("slow consumer" in l for l in server.lines):
            dropped_at = sent
    sender.send("END")
    assert done.wait(20), "reader got only %d of %d" % (len(got), sent)
    assert not errors, errors
    assert dropped_at is not None, "no slow consumer closed after %d messages:\n%s" % (sent, server.log())
    assert len(got) == sent
    assert got == ['Client %d says "%05d %s"' % (sender_id, i, pad) for i in range(sent)]

    # the slow client leaves the registry (it gets SLOW_CLOSE_WAIT to take its close frame)
    assert reader.recv(timeout=10) == "Client %d disconnected." % slow_id
    assert server.health()["connections"] == 2
    server.wait_for_log(r"Connection %d from \S+ closed \(1008\)" % slow_id)


def test_close_frame_after_frames_the_peer_has_not_taken_is_not_lost():
    """Our close frame, given in the same turn as frames a slow peer has not taken, reaches it
    after them, even when they alone fill OUTBOX_SIZE."""
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ws = transport.HardenedWebSocket(gevent.socket.socket(fileno=ours.detach()), "peer",
                                     transport.Policy(outbox_size=1), None, set())
    first = frames.frame(frames.OP_BINARY, b"first")
    ws.send_frame_bytes(first)  # written at once: what follows in this turn is held
    for _ in range(3):
        ws.send_frame_bytes(frames.frame(frames.OP_BINARY, b"x" * 40000))
    ws.close(frames.POLICY, "going")
    gevent.sleep(0)  # the turn ends: the cork is written, and the rest queued
    got = b""
    theirs.settimeout(5)
    with gevent.Timeout(10):
        while not got.endswith(frames.frame(frames.OP_CLOSE, frames.close_payload(1008, "going"))):
            chunk = theirs.recv(65536)  # a real blocking read: the writer runs in our thread
            assert chunk, "EOF after %d bytes, no close frame" % len(got)
            got += chunk
            gevent.sleep(0.01)
    closing = frames.frame(frames.OP_CLOSE, frames.close_payload(1008, "going"))
    assert len(got) == len(first) + 3 * (40000 + 4) + len(closing)
    ws.abort()
    theirs.close()


# -- writes -------------------------------------------------------------------------------

def socket_pair(**policy):
    """A HardenedWebSocket on one end of a socket pair, and the other end, non-blocking.
    The loop starts a quiet turn, whatever earlier tests read (a busy one holds frames)."""
    transport._read, transport._holding = 0, False
    transport._loop_turn = transport._turns
    ours, theirs = socket.socketpair()
    ws = transport.HardenedWebSocket(gevent.socket.socket(fileno=ours.detach()), "peer",
                                     transport.Policy(**policy), None, set())
    theirs.setblocking(False)
    return ws, theirs


def available(sock):
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_a_frame_goes_out_at_once_and_the_rest_of_its_turn_when_the_turn_ends():
    ws, theirs = socket_pair()
    a, b, c = (frames.text_frame(text) for text in "abc")
    assert ws.send_frame_bytes(a)
    assert available(theirs) == a  # before this greenlet yields
    assert ws.send_frame_bytes(b) and ws.send_frame_bytes(c)
    assert available(theirs) == b""  # held for the end of the turn
    gevent.sleep(0)
    assert available(theirs) == b + c
    assert ws.send_frame_bytes(a)
    assert available(theirs) == a
    ws.abort()
    theirs.close()


class Relay:
    """A session that passes each message on to ``ws`` and notes what its peer could
    read right after: the frame, when it was written at once, or nothing, when it was held."""

    def __init__(self, ws, peer):
        self.ws, self.peer, self.seen = ws, peer, []

    def received(self, message):
        self.ws.send_frame_bytes(frames.text_frame(message))
        self.seen.append(available(self.peer))

    def ended(self):
        pass


def test_a_burst_goes_out_in_one_write_and_a_lone_message_at_once():
    sender, their_sender = socket_pair()
    ws, theirs = socket_pair()
    relay = Relay(ws, theirs)
    their_sender.sendall(b"".join(frame_bytes(OP_TEXT, t.encode()) for t in ("a", "b", "c")))
    sender.run(relay)  # reads the three in one read: a busy turn
    assert relay.seen == [b"", b"", b""]
    gevent.sleep(0)
    assert available(theirs) == b"".join(frames.text_frame(t) for t in ("a", "b", "c"))
    # Then one at a time: the turns after a busy one hold theirs too, until one has read a
    # lone message; from then on, each is written at once.
    for count, text in enumerate("defg", 4):
        their_sender.sendall(frame_bytes(OP_TEXT, text.encode()))
        with gevent.Timeout(5):
            while len(relay.seen) < count:
                gevent.sleep(0.001)
        gevent.sleep(0)
        assert relay.seen[-1] + available(theirs) == frames.text_frame(text)
    assert relay.seen[-2:] == [frames.text_frame("f"), frames.text_frame("g")]
    sender.abort()
    ws.abort()
    their_sender.close()
    theirs.close()


def test_nothing_is_written_after_our_close_frame():
    ws, theirs = socket_pair()
    assert ws.send_frame_bytes(frames.text_frame("before"))
    ws.close(frames.NORMAL, "bye")
    gevent.sleep(0)
    assert not ws.send_frame_bytes(frames.text_frame("after"))  # a later turn
    gevent.sleep(0)
    assert available(theirs) == frames.text_frame("before") + frames.frame(
        frames.OP_CLOSE, frames.close_payload(frames.NORMAL, "bye"))
    ws.abort()
    theirs.close()


def test_a_peer_that_caught_up_gets_frames_at_once_again():
    ws, theirs = socket_pair()
    big = frames.frame(frames.OP_BINARY, b"x" * (4 << 20))  # more than the socket buffers
    assert ws.send_frame_bytes(big)
    got = 0
    with gevent.Timeout(10):
        while got < len(big):
            got += len(available(theirs))
            gevent.sleep(0.001)  # the writer sends the rest as we read
    gevent.sleep(0.01)
    small = frames.text_frame("caught up")
    assert ws.send_frame_bytes(small)
    assert available(theirs) == small  # not held: nothing waits any more
    ws.abort()
    theirs.close()


@pytest.mark.parametrize("held", [False, True], ids=["nothing-held", "frames-held"])
def test_an_ended_connection_never_writes_to_its_descriptor_once_reused(held):
    """Writes go to the descriptor number (os.write); after a connection ends, the number
    may be a new connection's. Frames held in the turn it ended in are not written there."""
    gc.collect()  # sockets of earlier tests freed now, not in the middle of this one
    ws, theirs = socket_pair()
    fd = ws.sock.fileno()
    if held:
        assert ws.send_frame_bytes(frames.text_frame("at once"))
        assert ws.send_frame_bytes(frames.text_frame("held"))
    ws.abort()
    ws.sock.close()  # as a connection's end does
    other, peer = pair_at(fd)
    assert not ws.send_frame_bytes(frames.text_frame("late"))
    gevent.sleep(0)
    assert available(peer) == b""
    for sock in (theirs, other, peer):
        sock.close()


def pair_at(fd):
    """A new socket pair whose first socket has the descriptor number ``fd`` (just closed,
    as a connection's end does), and its non-blocking peer."""
    gevent.sleep(0)  # (gevent closes the descriptor itself when the loop next runs)
    other, peer = socket.socketpair()  # a new connection takes the lowest free number
    if peer.fileno() == fd:
        other, peer = peer, other
    if other.fileno() != fd:  # a lower one was free: the old number is made to name it
        os.dup2(other.fileno(), fd)
        other.close()
        other = socket.socket(fileno=fd)
    assert other.fileno() == fd
    peer.setblocking(False)
    return other, peer


# -- groups: one frame to many sockets ---------------------------------------------------

def group_of(n, **policy):
    """A Group of ``n`` sockets (see socket_pair), and their peers."""
    pairs = [socket_pair(**policy) for _ in range(n)]
    group = transport.Group()
    for ws, _ in pairs:
        group.add(ws)
    return group, [ws for ws, _ in pairs], [theirs for _, theirs in pairs]


def next_turn():
    """Wait for the loop's next turn (gevent.sleep(0) may only run callbacks)."""
    turn = transport._turns
    while transport._turns == turn:
        gevent.sleep(0.001)


def end(sockets, peers):
    for ws in sockets:
        ws.abort()
        transport._held.discard(ws)  # as the connection's end does
    for sock in peers:
        sock.close()


def test_a_group_writes_every_socket_at_once_but_the_one_it_skips():
    group, sockets, peers = group_of(3)
    a, b = frames.text_frame("a"), frames.text_frame("b")
    group.send(a, skip=sockets[1])
    assert [available(p) for p in peers] == [a, b"", a]  # before this greenlet yields
    group.send(b)  # later in the same turn: held for its end, with anything else
    assert [available(p) for p in peers] == [b"", b"", b""]
    gevent.sleep(0)
    assert [available(p) for p in peers] == [b, b, b]
    next_turn()
    group.send(a)
    assert [available(p) for p in peers] == [a, a, a]
    end(sockets, peers)


def test_a_group_holds_everything_in_a_busy_turn():
    group, sockets, peers = group_of(2)
    transport._reading(more=True)  # a read that brought several messages
    group.send(frames.text_frame("a"))
    group.send(frames.text_frame("b"))
    assert [available(p) for p in peers] == [b"", b""]
    gevent.sleep(0)
    assert [available(p) for p in peers] == [frames.text_frame("a") + frames.text_frame("b")] * 2
    end(sockets, peers)


def test_a_group_keeps_each_sockets_order_when_frames_wait_for_it():
    """A socket with frames held for it gets the group's frame after them, not at once."""
    group, sockets, peers = group_of(3)
    first, second, third = (frames.text_frame(t) for t in ("first", "second", "third"))
    assert sockets[0].send_frame_bytes(first)  # at once
    assert sockets[0].send_frame_bytes(second)  # held for the end of the turn
    group.send(third, skip=sockets[2])
    assert [available(p) for p in peers] == [first, third, b""]
    gevent.sleep(0)
    assert [available(p) for p in peers] == [second + third, b"", b""]
    end(sockets, peers)


def test_a_group_queues_for_a_full_socket_and_drops_a_gone_one_without_stalling_others():
    group, sockets, peers = group_of(3)
    full, gone, fine = sockets
    for sock in (full.sock, peers[0]):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peers[1].close()  # the peer went away: its next write fails
    frames_sent = [frames.frame(frames.OP_BINARY, bytes([i]) * 3000) for i in range(20)]
    got, got_fine = b"", b""
    with gevent.Timeout(10):
        for frame in frames_sent:  # a turn each: every one is a quiet turn's first
            group.send(frame)
            got_fine += available(peers[2])
            next_turn()
        assert full._writer is not None, "the full socket was not behind"
        while len(got) < len(b"".join(frames_sent)):
            got += available(peers[0])  # it reads at last: the writer sends what waits
            gevent.sleep(0.001)
    assert got == b"".join(frames_sent)  # all of it, in order
    assert got_fine == b"".join(frames_sent)  # at once, whatever the others did
    assert gone.dead
    end(sockets, peers[0::2])


def test_a_group_never_writes_the_descriptor_of_a_connection_that_ended():
    """Should a group still hold an ended connection (its session's end failed before the
    hub let it go, say), the descriptor number it had, now another's, is not written."""
    gc.collect()
    group, sockets, peers = group_of(2)
    ended, fine = sockets

    class Failing:
        def ended(self):
            raise RuntimeError("the session's end failed")

    ended._session = Failing()
    fd = ended.sock.fileno()
    ended._end(flush=False)  # logs the failure; the socket goes all the same
    other, peer = pair_at(fd)
    assert transport._loop_turn >= 0  # a quiet turn: the group writes descriptors itself
    group.send(frames.text_frame("late"))
    gevent.sleep(0)
    assert available(peer) == b""
    assert available(peers[1]) == frames.text_frame("late")
    assert ended in transport._held  # for as long as a group holds it
    group.discard(ended)
    assert ended not in transport._held
    end(sockets, peers)
    other.close()
    peer.close()


def test_a_connection_that_left_its_groups_is_forgotten_when_it_ends():
    """The count of groups that hold a socket stays true through repeated adds and
    discards; one that left them all is not kept in _held once it ends."""
    ws, theirs = socket_pair()
    one, two = transport.Group(), transport.Group()
    one.add(ws)
    one.add(ws)
    two.add(ws)
    two.discard(ws)
    two.discard(ws)
    assert ws._groups == 1
    one.discard(ws)
    assert ws._groups == 0

    class Quiet:
        def ended(self):
            pass

    ws._session = Quiet()
    ws._end(flush=False)
    assert ws not in transport._held
    theirs.close()


def test_a_slow_consumer_with_an_outbox_of_one_still_gets_its_close_frame():
    ws, theirs = socket_pair(outbox_size=1)
    for sock in (ws.sock, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = frames.frame(frames.OP_BINARY, b"x" * 40000)
    assert ws.send_frame_bytes(big)  # taken in part: the rest fills the outbox
    assert not ws.send_frame_bytes(frames.text_frame("one too many"))
    closing = frames.frame(frames.OP_CLOSE, frames.close_payload(
        1008, "slow consumer: too many frames queued"))
    got = b""
    with gevent.Timeout(10):
        while not got.endswith(closing):
            chunk = available(theirs)
            assert chunk or not ws.dead, "dropped after %d bytes, no close frame" % len(got)
            got += chunk
            gevent.sleep(0.01)
    assert got == big + closing
    ws.abort()
    theirs.close()


# -- flood --------------------------------------------------------------------------------

def test_flood_gets_rate_limited_then_closed_1008(start_server, clients):
    """A JSON client over RATE_LIMIT gets `rate_limited` errors then close 1008; others go on."""
    server = start_server(env={"RATE_LIMIT": "5", "RATE_BURST": "5"})
    other = clients.json(server)
    flooder = clients.json(server)
    other.wait("presence", event="join")
    for i in range(30):
        flooder.send(type="message", room="lobby", text="spam %d" % i, ref=i)
    frames_seen = []
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(100):
            frames_seen.append(flooder.recv(timeout=5))
    assert closed.value.code == 1008
    kinds = [(f["type"], f.get("code")) for f in frames_seen]
    assert ("error", "rate_limited") in kinds, kinds
    first_error = kinds.index(("error", "rate_limited"))
    assert first_error >= 1 and all(k == ("ack", None) for k in kinds[:first_error]), kinds
    assert all(k == ("error", "rate_limited") for k in kinds[first_error:]), kinds
    assert len(frames_seen) < 30, "the flood was closed before all 30 were answered"

    # the other client is unaffected: it can still say something and be heard
    watcher = clients.plain(server)
    other.send(type="message", room="lobby", text="still here", ref="r-1")
    assert other.wait("ack", ref="r-1")["room"] == "lobby"
    assert watcher.recv() == 'Client %d says "still here"' % other.id


# -- shutdown -----------------------------------------------------------------------------

def test_sigterm_closes_clients_with_1001_and_exits_0(start_server, clients):
    """SIGTERM sends every client close 1001, then the process exits with status 0 within 8 s."""
    server = start_server()
    a = clients.plain(server)
    b = clients.json(server)
    a.recv()  # b's arrival
    server.signal()
    start = time.monotonic()
    assert a.recv_until_closed().code == 1001
    closed = b.recv_until_closed()
    assert closed.code == 1001
    assert "shutting down" in closed.reason
    assert server.proc.wait(max(0.1, 8 - (time.monotonic() - start))) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_stops_it_cleanly(signum):
    """Ctrl-C or SIGTERM while start-up waits for an unreachable Redis (3 s) ends the
    process once that wait is over, before it listens, with status 0 and no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket is closed
    env = dict(os.environ, HOST="127.0.0.1", PORT="0", PYTHONUNBUFFERED="1",
               REDIS_URL="redis://127.0.0.1:%d/0" % closed_port)
    proc = subprocess.Popen([sys.executable, "chat.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.01)  # until chat.py has taken the signals over, as it starts to
        proc.send_signal(signum)  # wait for Redis
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Traceback" not in out, out
    assert proc.returncode == 0, out
    assert "Redis at 127.0.0.1:%d/0 is not reachable yet" % closed_port in out
    assert out.rstrip().endswith("Stopped before listening: a signal came during start-up"), out
    assert "Listening" not in out


def _catches(pid, signum):
    """Whether process ``pid`` has a handler for ``signum`` (Linux: SigCgt in /proc)."""
    with open("/proc/%d/status" % pid) as status:
        mask = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (signum - 1) & 1)


def test_sigterm_exits_even_when_a_peer_never_answers_the_close(start_server, clients):
    """A client that never answers the 1001 close does not keep the process alive past 8 s."""
    server = start_server()
    raw = raw_client(server, clients)
    plain = clients.plain(server)
    server.signal()
    start = time.monotonic()
    assert close_code(raw) == 1001  # read, never answered
    assert plain.recv_until_closed().code == 1001
    assert server.proc.wait(max(0.1, 8 - (time.monotonic() - start))) == 0
    assert_eof(raw, 1)


# -- a connection outlives its HTTP request -----------------------------------------------

def test_bytes_sent_with_the_handshake_are_not_lost(server, clients):
    """A client that sends its first message in the same write as its handshake, before the
    101 (RFC 6455 4.1 says it should wait), is still heard: the bytes the HTTP parser read
    ahead go to the WebSocket."""
    watcher = clients.plain(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        request = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % server.port)
        sock.sendall(request.encode("ascii") + frame_bytes(OP_TEXT, b"early bird"))
        raw_id = new_client_id(watcher)
        assert watcher.recv() == 'Client %d says "early bird"' % raw_id
    finally:
        sock.close()


def test_idle_connections_hold_no_greenlet(server, clients):
    """An idle connection is its objects and an event-loop watcher, not a greenlet waiting in
    recv(): 100 idle clients add no greenlets, not even after each has sent a ping (as
    keepalive makes them answer pongs), and each still hears the next message at once."""
    watcher = clients.plain(server)
    base = server.health(verbose=True)
    idle = [clients.plain(server) for _ in range(100)]
    for _ in idle:
        new_client_id(watcher)
    now = server.health(verbose=True)
    assert now["connections"] == base["connections"] + 100
    assert now["greenlets"] <= base["greenlets"] + 5, (base, now)
    for client in idle:
        client.ws.ping(b"still here")
    time.sleep(0.5)
    now = server.health(verbose=True)
    assert now["greenlets"] <= base["greenlets"] + 5, (base, now)
    watcher.send("wake up")
    for client in idle:
        while True:
            line = client.recv()
            if not line.endswith("connected."):
                break
        assert line.endswith('says "wake up"'), line
