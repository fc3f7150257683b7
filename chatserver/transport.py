"""gevent-websocket, hardened: our subclasses of its ``WebSocket`` and ``WebSocketHandler``.

What the library leaves out and RFC 6455 asks for (section numbers are the RFC's):
the handshake answers 400/403/426/503 with a text body instead of a traceback, checks
``Origin`` (10.2) and parses ``Sec-WebSocket-Protocol`` as a token list (4.2.2); frames must be
masked (5.1), messages are limited in size before their payload is read, UTF-8 is validated
as the bytes arrive (8.1), close frames carry their status code (5.5.1), and writes never
block the caller: one writer per socket, and a bounded outbox for a peer that reads slowly.

What a chat server needs beyond that: a connection outlives its HTTP request (the socket is
taken from pywsgi once the 101 is out), and an idle connection holds no greenlet, only its
objects and an event-loop watcher, so ten thousand of them cost a few KiB each.
"""
import base64
import binascii
import codecs
import dataclasses
import fcntl
import hashlib
import http.client
import logging
import os
import socket
import struct
import termios
import time
from collections import deque
from itertools import repeat

import gevent
import gevent.socket
import greenlet
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from . import frames
from .frames import FrameError

log = logging.getLogger(__name__)

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_CHUNK = 64 * 1024  # the most one read of a payload takes
WRITE_BATCH = 256 * 1024  # queued frames joined into one write, up to this many bytes
CORK_FRAMES = 64  # frames held for one socket in one turn of the loop before they are written
FLUSH_ON_EXIT = 2.0  # seconds to let queued frames (our close frame, say) reach the peer
CLOSE_WAIT = 2.0  # seconds to wait for the peer's close frame after ours
SLOW_CLOSE_WAIT = 5.0  # seconds a slow consumer gets to take its 1008 before the socket goes
IDLE_READERS = 64  # reader greenlets kept for the next connection that has bytes in
TURN = 0.005  # seconds one connection may go on reading frames already in before the others run
READ_PAUSE = 1024 * 1024  # bytes queued for a peer past which its requests wait (backpressure)
CONTROL_RATE = 100  # control frames a peer may send a second (more is a flood: 1008)
MIN_FRAGMENTS = 256  # frames one message may span, at least (else MAX_MESSAGE_SIZE / 64)
HTTP_TIMEOUT = 10.0  # seconds a whole HTTP request and its answer may take (slowloris guard)
# HTTP connections served at once (a WebSocket's, until the upgrade; a kept-alive one while
# it waits for its next request, until slots run short); more wait in the listen backlog.
# With HTTP_TIMEOUT, it bounds what slow clients can hold: the file descriptors beyond
# MAX_CONNECTIONS are few (chat.py keeps 256 spare).
HTTP_CONCURRENCY = 200
LOGGED_REQUEST_LINE = 512  # characters of a request line the access log keeps
MALFORMED = b"Malformed HTTP request.\n"
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain; "
               b"charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(MALFORMED) + MALFORMED)


FIN_TEXT = 0x80 | frames.OP_TEXT  # a frame's first byte: a whole text message, no extension
INVALID_UTF8 = (frames.INVALID_DATA, "invalid UTF-8 in a text message")  # RFC 6455 8.1: 1007
NO_MESSAGE = object()  # receive(): a frame was handled, but it carried no message


class _EOF(Exception):
    """The peer went away in the middle of a frame or between frames."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the handshake and the socket enforce; built from the settings in ``chat.py``."""
    paths: tuple = ("/ws",)
    subprotocols: tuple = ("chat.v1",)
    allowed_origins: tuple = ()
    max_message_size: int = 65536
    outbox_size: int = 1024
    is_full: object = staticmethod(lambda: False)


class HardenedWebSocket(WebSocket):
    """One WebSocket connection, once its handshake is done: it outlives the HTTP request.

    ``run(session)`` hands it the object that takes its messages (``received(message)``, a
    str for text or bytes for binary) and hears of its end (``ended()``). No greenlet waits
    on an idle connection: a reader is spawned when bytes arrive, reads the messages they
    carry, and exits once the socket has nothing more, so an idle connection costs its
    objects and one event-loop watcher, not a greenlet's stack.

    ``send_frame_bytes`` never blocks: it writes what the socket takes now and queues the rest
    for a writer greenlet that exists only while the peer is behind.
    """

    __slots__ = ("sock", "subprotocol", "peer", "max_size", "outbox_limit", "last_seen",
                 "close_code", "close_reason", "dead", "_turn", "_buf", "_drained", "_sock_recv",
                 "_queued", "_paused", "_unacked", "_swept", "_window", "_controls",
                 "_fd", "_watcher", "_session", "_registry", "_outbox", "_writer", "_cork",
                 "_wrote_in", "_groups")

    def __init__(self, sock, peer, policy, subprotocol, registry, buffered=b""):
        # Not the library's constructor: it keeps the request (environ, handler, stream)
        # alive for as long as the connection, and a chat connection lasts hours.
        self.closed = False
        self.sock = sock
        self.subprotocol = subprotocol
        self.peer = peer
        self.max_size = policy.max_message_size
        self.outbox_limit = policy.outbox_size
        self.last_seen = self._turn = time.monotonic()
        self.close_code = None  # what we sent, or what the peer sent first
        self.close_reason = ""
        self.dead = False
        self._buf = buffered  # bytes received and not yet parsed
        self._drained = False  # the last read took all the socket had (see _ready)
        self._sock_recv = sock._sock.recv  # the raw non-blocking socket: no gevent layer
        # Written with os.write, a plain system call: socket.send first parses its arguments
        # into a tuple and sets up its timeout, a tenth of what a delivery costs us.
        # No write follows abort(), which comes before the socket is closed, so a descriptor
        # number reused by a later connection is never written.
        self._fd = sock.fileno()
        self._watcher = None  # the event-loop watcher that wakes a parked connection
        self._session = None
        self._registry = registry
        registry.add(self)
        self._outbox = None  # a deque of what the socket refused, while a writer drains it
        self._queued = 0  # the bytes in it
        self._paused = False  # reading waits for the writer to catch up (READ_PAUSE)
        self._unacked = 0  # bytes the peer had not acknowledged at the last sweep (quiet_for)
        self._swept = self.last_seen  # when keepalive last asked quiet_for
        self._window, self._controls = self.last_seen, 0  # control frames this second
        self._writer = None
        self._cork = None  # frames given in this turn of the event loop, not yet written
        # The turn of the loop in which this socket was last written at once (see
        # send_frame_bytes), or HELD while it may not be: frames wait (corked or in the
        # outbox) or it is closing. One comparison then tells whether a frame may go now.
        self._wrote_in = -1
        self._groups = 0  # the Groups that hold it (and its descriptor number)
        _count_turns()
        try:
            # Frames are written whole (and held for the end of a busy turn), so Nagle's
            # algorithm only adds delay: with the peer's delayed ACK, up to 40 ms a message.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not TCP (a Unix socket in a test, say)

    def __del__(self):
        # The library's __del__ sends a close frame from the garbage collector; ours does not.
        pass

    # -- the connection's life -----------------------------------------------------------

    def run(self, session):
        """Deliver this connection's messages to ``session`` until it ends. Reads what has
        arrived in the calling greenlet, then returns; later messages are read by readers
        spawned as they arrive."""
        self._session = session
        self._watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self._serve()

    def _serve(self):
        """Read and hand over messages while bytes are in, then park (or end)."""
        session = self._session
        self._turn = time.monotonic()  # this reader's share of the loop starts now
        self._drained = False  # woken: something came
        try:
            while self._ready():
                if self._backlogged():
                    # The peer is far behind: its requests (a join's answer carries a room's
                    # whole history) wait until it has read what it was sent, so one that
                    # never reads cannot make us queue without end. The writer resumes us.
                    self._paused = True
                    return
                message = self.receive()
                if message is None:
                    break
                if message is not NO_MESSAGE:
                    _reading(more=bool(self._buf))
                    session.received(message)
            else:
                self._watcher.start(self._wake)
                return
        except Exception:  # noqa: BLE001 - the one boundary of a connection's reader
            log.exception("connection from %s failed", self.peer)
            self.close(frames.SERVER_ERROR, "server error")
        except BaseException:
            # Killed (GreenletExit when the server stops, say): no waiting, nothing kept.
            self._end(flush=False)
            raise
        self._end()

    def _backlogged(self):
        """True when more than READ_PAUSE bytes wait for the peer in the writer's outbox
        (frames held for this turn are written first if they alone are that many)."""
        cork = self._cork
        if cork is not None and (sum(map(len, cork)) if cork.__class__ is list
                                 else len(cork)) > READ_PAUSE:
            self._uncork()
        return self._writer is not None and self._queued > READ_PAUSE

    def _wake(self):
        # Called by the event loop, which must not block: a reader greenlet takes over at
        # once, as one waiting in recv() would be switched to, and hands back to the loop
        # when it waits or is done.
        self._watcher.stop()
        while _idle_readers:
            reader = _idle_readers.pop()
            if not reader.dead:
                reader.switch(self)
                return
        greenlet.greenlet(_reader, gevent.get_hub()).switch(self)

    def _ready(self):
        """True when there is something to read now: bytes, the peer's EOF, or an error.

        After a read that took less than it asked for and held one message, the socket had
        nothing more: False without asking it again (as libuv does after a short read), since
        a chat line usually comes alone and a read that finds nothing costs a system call and
        an exception. Bytes that came meanwhile wake the parked connection at once (the
        watcher is level-triggered). A read that held more than one message is from a peer
        sending fast: it is asked again, so that more of its messages share this turn's
        writes.
        """
        if self._buf:
            self._drained = False  # a second message in one read (or a frame's rest)
            return True
        if self._drained:
            return False
        try:
            buf = self._buf = self._sock_recv(READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            return True  # receive() meets it again and ends the connection
        self._drained = len(buf) < READ_CHUNK
        return True

    def quiet_for(self, now):
        """Seconds since the peer last showed it is alive; keepalive asks once a sweep.

        A sign of life is a frame from it (a pong, say), or that its TCP stack took more of
        what we sent: a peer far behind is slow, not gone, though its pongs reach us late
        (they wait behind its requests, see READ_PAUSE, and it reads them late). The writer
        sees the socket take bytes; for a peer not heard from since the last sweep, the
        kernel's count of bytes it has not acknowledged (SIOCOUTQ, Linux) going down shows it
        too. (A peer whose program hangs but whose kernel still takes bytes looks alive until
        its receive buffer is full.)
        """
        if self.last_seen <= self._swept:  # nothing from it since the last sweep
            try:
                unacked = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ,
                                                         b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                unacked = self._unacked  # closed meanwhile: no news
            if unacked < self._unacked:
                self.last_seen = now
            self._unacked = unacked
        else:
            self._unacked = 0  # heard from: the next silent sweep takes a new reading
        self._swept = now
        return now - self.last_seen

    def _end(self, flush=True):
        try:
            self._session.ended()
            if flush:
                self.close()
                self.flush(FLUSH_ON_EXIT)
        except Exception:  # noqa: BLE001 - the socket must be released whatever happens
            log.exception("ending the connection from %s failed", self.peer)
        finally:
            self.abort()
            if self._groups:
                # A group holds its descriptor number, soon another connection's: it stays
                # held, so that no group ever writes that number.
                log.error("a connection from %s ended in %d groups", self.peer, self._groups)
            else:
                _held.discard(self)
            self._registry.discard(self)
            self._watcher = self._session = None
            self.sock.close()

    # -- reading -------------------------------------------------------------------------

    def receive(self):
        """The next message (str for text, bytes for binary); NO_MESSAGE after a control
        frame outside a message (so an idle connection can park); None when it ends."""
        try:
            return self._read_message()
        except FrameError as exc:
            log.info("closing connection: %s (%d)", exc.reason, exc.code)
            self.close(exc.code, exc.reason)
            self._linger()
        except _EOF:
            # The peer closed its side; ours may still carry what we owe it (corked replies).
            if self._cork is not None:
                self._uncork()
            self.abort()
        except OSError:
            self.abort()
        return None

    def _recv(self):
        data = self.sock.recv(READ_CHUNK)  # gevent's: waits for the peer without blocking others
        if not data:
            raise _EOF()
        # The rest of a frame: a sign of life too. A peer in the middle of a big frame over a
        # slow link cannot answer our ping until it has sent it all (RFC 6455 5.4).
        self.last_seen = time.monotonic()
        return data

    def _read_exact(self, n):
        buf = self._buf
        while len(buf) < n:
            buf += self._recv()
        self._buf = buf[n:]
        return buf[:n]

    def _read_some(self, n):
        """Between 1 and ``n`` bytes, as soon as any have arrived: a payload is checked as
        its bytes come (RFC 6455 8.1: fail fast on invalid UTF-8), not once it is all in."""
        buf = self._buf or self._recv()
        self._buf = buf[n:]
        return buf[:n]

    def _read_message(self):
        buf = self._buf
        if len(buf) >= 6 and buf[0] == FIN_TEXT:
            n = buf[1] ^ 0x80  # the length, when the mask bit is set (else 128 or more)
            if n < 126 and len(buf) >= 6 + n and n <= self.max_size:
                # A whole short text message is in, the usual chat line: read in one step
                # what the loop below reads a piece at a time.
                self._buf = buf[6 + n:]
                self._heard()
                try:
                    text = frames.unmask(buf[6:6 + n], buf[2:6]).decode("utf-8")
                except UnicodeDecodeError:
                    raise FrameError(*INVALID_UTF8) from None
                # RFC 6455 1.4: data after our close frame is read and dropped.
                return text if self.close_code is None else NO_MESSAGE
        opcode, parts, size, decoder, fragments = None, [], 0, None, 0
        while True:
            fin, op, masked, length = self._read_header()
            if not masked:
                raise FrameError(frames.PROTOCOL_ERROR, "client frames must be masked")
            mask = self._read_exact(4)
            if op >= frames.OP_CLOSE:
                if op != frames.OP_CLOSE:
                    self._count_control()
                if self._control(op, frames.unmask(self._read_exact(length), mask)):
                    return None
                if opcode is None:
                    return NO_MESSAGE
                continue  # between the fragments of a message
            if op == frames.OP_CONT:
                if opcode is None:
                    raise FrameError(frames.PROTOCOL_ERROR, "continuation frame without a message")
                fragments += 1
                if fragments > max(MIN_FRAGMENTS, self.max_size // 64):
                    # Empty fragments never reach MAX_MESSAGE_SIZE: without this a message
                    # could go on forever, a frame at a time, outside the rate limit.
                    raise FrameError(frames.POLICY, "too many fragments in one message")
            elif opcode is not None:
                raise FrameError(frames.PROTOCOL_ERROR, "new message before the last one ended")
            else:
                opcode = op
                if op == frames.OP_TEXT:
                    decoder = codecs.getincrementaldecoder("utf-8")()
            size += length
            if size > self.max_size:
                raise FrameError(frames.TOO_BIG, "message exceeds %d bytes" % self.max_size)
            remaining, offset = length, 0
            while remaining:
                # Text is read as it arrives, to fail fast on invalid UTF-8; binary in
                # whole chunks, which costs fewer calls.
                read = self._read_some if decoder is not None else self._read_exact
                data = read(min(remaining, READ_CHUNK))
                turn = offset % 4  # where this piece starts in the mask's cycle
                chunk = frames.unmask(data, mask[turn:] + mask[:turn] if turn else mask)
                offset += len(data)
                remaining -= len(data)
                if decoder is not None:
                    try:
                        chunk = decoder.decode(chunk, final=fin and not remaining)
                    except UnicodeDecodeError:
                        raise FrameError(*INVALID_UTF8) from None
                parts.append(chunk)
            if decoder is not None and fin and not length:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise FrameError(*INVALID_UTF8) from None
            if fin:
                if self.close_code is not None:
                    # RFC 6455 1.4: data after our close frame is read and dropped.
                    return NO_MESSAGE
                return "".join(parts) if decoder is not None else b"".join(parts)

    def _read_header(self):
        fin, _rsv, op, masked, length = frames.parse_head(self._read_exact(2))
        self._heard()
        if length == 126:
            length = struct.unpack("!H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exact(8))[0]
            if length >> 63:
                raise FrameError(frames.PROTOCOL_ERROR, "64-bit length with its top bit set")
        return fin, op, masked, length

    def _heard(self):
        """A frame came: the peer is alive, and this reader may have had its share."""
        now = self.last_seen = time.monotonic()
        if now - self._turn > TURN:
            # A peer that sends faster than we read never makes our reads block, and a
            # greenlet that never blocks never lets the others (or any timer) run: give the
            # loop a whole turn, I/O included (sleep(0) would only run its callbacks).
            gevent.idle()
            self._turn = time.monotonic()

    def _count_control(self):
        """Close with 1008 a peer that sends more than CONTROL_RATE control frames (pings,
        pongs) a second: they are outside the message rate limit, and a pong costs a write."""
        now = self.last_seen
        if now - self._window >= 1.0:
            self._window, self._controls = now, 0
        self._controls += 1
        if self._controls > CONTROL_RATE:
            raise FrameError(frames.POLICY, "too many control frames")

    def _control(self, op, payload):
        """Answer a control frame; True when it ends the connection."""
        if op == frames.OP_PING:
            self.send_frame_bytes(frames.frame(frames.OP_PONG, payload))
            return False
        if op == frames.OP_PONG:
            return False
        code, reason = frames.parse_close(payload)
        if self.close_code is None:
            self.close_code, self.close_reason = code or frames.NORMAL, reason
            self._hold()
            self._send_close(code or frames.NORMAL, "")
        return True

    def _linger(self):
        """After failing the connection: send our close frame and FIN, then discard what the
        peer still sends until it closes, so its stack does not reset away our close frame."""
        self.flush(CLOSE_WAIT)
        try:
            self.sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(CLOSE_WAIT, False):
                while self.sock.recv(READ_CHUNK):
                    pass
        except OSError:
            pass
        self.abort()

    # -- writing -------------------------------------------------------------------------

    def send_frame_bytes(self, data):
        """Write a complete frame without blocking; False when it was dropped.

        In a quiet turn of the event loop (one message read, a chat line's usual case), a
        socket's first frame is written at once: one system call, no waiting. Frames after
        it in the same turn, and all frames of a busy turn (see _reading), are held (corked)
        until the greenlets of the turn have yielded, then go out in one write per socket,
        however many messages they carry. What the socket does not take goes to the outbox,
        drained by a writer greenlet that exists only while the peer is behind.
        """
        if self._wrote_in < _loop_turn:  # not written this turn, nothing waits, not closing
            self._wrote_in = _loop_turn
            try:  # (_uncork's write, inline: this runs once per recipient of a broadcast)
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return False
            if sent != len(data):
                self._behind((data,), sent)
            return True
        if self.close_code is not None or self.dead:
            return False
        return self._push(data)

    def _push(self, data):
        if self._writer is None:
            # The cork is None, one frame (a broadcast's usual case: no list to make), or a
            # list of several.
            cork = self._cork
            if cork is None:
                self._cork = data
                self._wrote_in = HELD
                _held.add(self)
                _corked.append(self)
                if len(_corked) == 1:
                    gevent.get_hub().loop.run_callback(_uncork_all)
            elif cork.__class__ is list:
                cork.append(data)
                if len(cork) >= CORK_FRAMES:
                    self._uncork()
            else:
                self._cork = [cork, data]
            return True
        if len(self._outbox) >= self.outbox_limit and self.close_code is None:
            # (Our close frame, the last one we give, is always queued: with OUTBOX_SIZE=1 and
            # a frame the socket took in part, the outbox is full when _slow_consumer closes.)
            self._slow_consumer()
            return False
        self._outbox.append(data)
        self._queued += len(data)
        return True

    def _uncork(self):
        """Write the corked frames in one non-blocking write; queue what the socket refused
        and start the writer for it. (_uncork_all has its own copy of the one-frame case.)"""
        cork, self._cork = self._cork, None
        if cork is None or self.dead:
            return
        if cork.__class__ is list:
            data = b"".join(cork)
        else:
            data, cork = cork, (cork,)
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return
        if sent != len(data):
            self._behind(cork, sent)
        else:
            self._reopen()

    def _reopen(self):
        """Let frames be written at once again, if nothing waits and the socket is open."""
        if self._cork is None and self._writer is None and self.close_code is None \
                and not self.dead:
            self._wrote_in = -1
            _held.discard(self)

    def _hold(self):
        """Frames for it must wait (corked or queued), or it is closing."""
        self._wrote_in = HELD
        _held.add(self)

    def _behind(self, cork, sent):
        """The peer is behind: queue the frames of ``cork`` past its first ``sent`` bytes
        (the first perhaps in part, so that the outbox counts frames as if each had been
        written on its own), and start the writer."""
        outbox = self._outbox = deque()
        self._queued = 0
        for frame in cork:
            if sent >= len(frame):
                sent -= len(frame)
                continue
            if len(outbox) >= self.outbox_limit and self.close_code is None:
                # (Once our close frame is given, it is the cork's last frame: all of it is
                # queued, at most CORK_FRAMES frames, or the close frame would be lost.)
                self._writer = gevent.spawn(self._drain)  # it writes the close frame
                self._hold()
                self._slow_consumer()
                return
            outbox.append(memoryview(frame)[sent:] if sent else frame)
            self._queued += len(frame) - sent
            sent = 0
        self._writer = gevent.spawn(self._drain)
        self._hold()

    def _drain(self):
        outbox = self._outbox
        try:
            while outbox:
                batch, size = [], 0
                while outbox and size < WRITE_BATCH:
                    item = outbox.popleft()
                    batch.append(item)
                    size += len(item)
                self._queued -= size
                data = memoryview(b"".join(batch) if len(batch) > 1 else batch[0])
                while data:
                    # gevent's send waits for the socket to take bytes (this socket has no
                    # timeout), then sends what it takes.
                    data = data[self.sock.send(data):]
                    self.last_seen = time.monotonic()  # it reads: see quiet_for
        except OSError:
            self.abort()
        finally:
            # Caught up (or dead): back to direct writes, and no outbox kept while idle.
            self._writer = self._outbox = None
            self._queued = 0
            self._reopen()
            if self._paused:
                # Requests may wait in our buffer, not only on the socket: the loop hands
                # us to a reader as it would on new bytes (the writer cannot switch to it).
                self._paused = False
                gevent.get_hub().loop.run_callback(self._wake)

    def _slow_consumer(self):
        log.warning("closing a slow consumer: %d frames queued (OUTBOX_SIZE)", len(self._outbox))
        outbox = self._outbox
        # A frame the socket took in part must be finished before the close frame.
        head = outbox[0] if outbox and isinstance(outbox[0], memoryview) else None
        outbox.clear()
        self._queued = 0
        if head is not None:
            outbox.append(head)
            self._queued = len(head)
        self.close(frames.POLICY, "slow consumer: too many frames queued", wait=SLOW_CLOSE_WAIT)

    def flush(self, timeout):
        """Wait up to ``timeout`` seconds for queued frames to be written."""
        if self._cork is not None:
            self._uncork()
        writer = self._writer
        if writer is not None:
            writer.join(timeout)

    # -- closing -------------------------------------------------------------------------

    def close(self, code=frames.NORMAL, message="", wait=CLOSE_WAIT):
        """Send a close frame with ``code`` and a reason, once; the peer's answer ends
        ``receive``, and a peer that has not answered within ``wait`` seconds is dropped."""
        if self.close_code is None and not self.dead:
            self.close_code, self.close_reason = code, message or ""
            self._hold()
            self._send_close(code, self.close_reason)
            # A peer that ignores our close frame (and, say, goes on flooding) must not keep
            # the connection: RFC 6455 7.1.1 lets the server drop it.
            gevent.spawn_later(wait, self.abort)
        self.closed = True

    def _send_close(self, code, reason):
        if self.dead:
            return  # nothing more is written (_uncork_all counts on a dead socket's empty cork)
        if isinstance(reason, (bytes, bytearray)):
            reason = bytes(reason).decode("utf-8", "replace")
        self._push(frames.frame(frames.OP_CLOSE, frames.close_payload(code, reason)))

    def abort(self):
        """Drop the connection now: no more writes, and the reader sees EOF."""
        if self.dead:
            return
        cork, self._cork = self._cork, None
        if cork is not None:
            # Frames given before the end still get the one non-blocking write they would
            # have had uncorked: a peer that only half-closed reads them before our FIN.
            try:
                os.write(self._fd, b"".join(cork) if cork.__class__ is list else cork)
            except OSError:
                pass
        self.dead = self.closed = True
        self._hold()  # until _end: the hub may still count it a member meanwhile
        self._fd = -1  # no write at all from here on: the number may soon be another's
        if self._outbox is not None:
            self._outbox.clear()
            self._queued = 0
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send(self, message, binary=None):
        """The library's API, kept for callers that expect it: never blocks."""
        if binary is None:
            binary = not isinstance(message, str)
        if binary:
            self.send_frame_bytes(frames.frame(frames.OP_BINARY, bytes(message)))
        else:
            self.send_frame_bytes(frames.text_frame(message))


_idle_readers = []  # reader greenlets waiting for a connection with bytes in


def _reader(ws):
    """A reader greenlet: serve ``ws`` until it parks, then wait for the next connection.

    Kept for reuse (up to IDLE_READERS of them), since starting a greenlet costs more than
    reading a small message: its frame stack is mapped anew each time.
    """
    hub = gevent.get_hub()
    while True:
        ws._serve()
        if len(_idle_readers) >= IDLE_READERS:
            return
        ws = None  # hold nothing while idle
        _idle_readers.append(greenlet.getcurrent())
        ws = hub.switch()  # the loop switches back with the next connection (see _wake)


# -- turns of the event loop ------------------------------------------------------------
# Writes are grouped by turn of the loop (one pass: wait for I/O, run what is ready). The
# state is the loop's, so it lives here; send_frame_bytes reads _loop_turn once per recipient.

HELD = 1 << 62  # a socket's _wrote_in while it may not be written at once: later than any turn
HOLD_ALL = -2  # _loop_turn in a busy turn: before any socket's _wrote_in, so all are held
_turns = 0  # the loop's turns, counted from the first connection (see _count_turns)
_loop_turn = 0  # the turn as send_frame_bytes sees it: _turns, or HOLD_ALL
_read = 0  # messages read in this turn (2 for a read that brought several)
_holding = False  # the last turn that read anything read more than one message: busy
_turn_counter = None  # the loop watcher that counts the turns


def _count_turns():
    """Count the turns of the event loop: a watcher of the loop's prepare phase, run each
    time before it waits for I/O. Started once, and again should the loop be replaced (by
    a test, say). One loop's: the state here is module-wide, like _corked."""
    global _turn_counter
    loop = gevent.get_hub().loop
    if _turn_counter is None or _turn_counter.loop is not loop:
        _turn_counter = loop.prepare(ref=False)  # (keeps no loop running)
        _turn_counter.start(_next_turn)


def _next_turn():
    global _turns, _loop_turn, _read, _holding
    _turns += 1
    if _read:
        _holding, _read = _read > 1, 0
    # After a busy turn, more are likely (a burst, a crowd): their frames are held from the
    # start, until a turn reads just one message.
    _loop_turn = HOLD_ALL if _holding else _turns


def _reading(more):
    """A message is about to be handed over. If ``more`` came with it in one read, or
    another was read before it in this turn, the turn is busy: the frames given in the rest
    of it are all held and go out at its end, one write per socket (rather than a write at
    once for each message's first, and one for the rest)."""
    global _read, _loop_turn
    _read += 2 if more else 1
    if _read > 1:
        _loop_turn = HOLD_ALL


_corked = []  # sockets holding corked frames, written when the loop next runs callbacks


def _uncork_all():
    """Run by the event loop once the greenlets of this turn have yielded."""
    global _corked
    pending, _corked = _corked, []
    for ws in pending:
        cork = ws._cork
        try:
            if cork.__class__ is bytes:
                # One frame, a broadcast's usual case: HardenedWebSocket._uncork inline, as
                # a method call per recipient costs a tenth of the write. (A socket that
                # died has no cork.)
                ws._cork = None
                try:
                    sent = os.write(ws._fd, cork)
                except BlockingIOError:
                    sent = 0
                if sent != len(cork):
                    ws._behind((cork,), sent)
                elif ws.close_code is None:  # (_reopen inline: no writer, no cork, not dead)
                    ws._wrote_in = -1
                    _held.discard(ws)
            else:
                ws._uncork()
        except OSError:
            ws.abort()
        except Exception:  # noqa: BLE001 - one socket's failure must not strand the others
            log.exception("writing to a connection failed")
            ws.abort()


_held = set()  # sockets that may not be written at once: _wrote_in is HELD (see _hold)


class Group:
    """Sockets that take the same frames: a room's members of one dialect, say.

    ``send`` gives a frame to all of them but one. In a quiet turn of the loop, the sockets
    nothing waits for are written at once by a loop in C (``map`` over ``os.write``), not a
    Python call per socket: the interpreter's work per recipient was most of ours per
    delivery. What the turn gives after that is held for its end, as in a busy turn, where
    each socket takes the frame as ``send_frame_bytes`` would.

    It keeps each socket's descriptor number, read once when it is added. A socket that
    ends while a group holds it stays in _held (see HardenedWebSocket._end), so a number that
    may have become another connection's is never written.
    """

    __slots__ = ("_members",)

    def __init__(self):
        self._members = {}  # socket -> its descriptor number

    def __len__(self):
        return len(self._members)

    def add(self, ws):
        if ws not in self._members:
            self._members[ws] = ws._fd
            ws._groups += 1

    def discard(self, ws):
        if self._members.pop(ws, None) is not None:
            ws._groups -= 1
            if not ws._groups and ws.dead and ws._session is None:
                _held.discard(ws)  # it ended in a group (see _end): no group holds it now

    def send(self, data, skip=None):
        global _loop_turn
        members = self._members
        if _loop_turn < 0 or not members:  # a busy turn: everything is held
            for ws in tuple(members):
                if ws is not skip:
                    ws.send_frame_bytes(data)
            return
        _loop_turn = HOLD_ALL  # the rest of the turn is held: one more write per socket at most
        if _held and not members.keys().isdisjoint(_held):  # (walks the smaller of the two)
            held = _held.intersection(members)
            held.discard(skip)
            targets = members.copy()
            targets.pop(skip, None)
            for ws in held:
                del targets[ws]
                ws.send_frame_bytes(data)  # after what waits for it
            _write_all(targets, data)
        elif skip in members:  # the sender, usually: left out of the dict while it is written
            fd = members.pop(skip)
            try:
                _write_all(members, data)
            finally:
                members[skip] = fd
        else:
            _write_all(members, data)


def _write_all(targets, data):
    """Write ``data`` at once to each socket of ``targets`` ({socket: descriptor number})."""
    sent = []
    writes = map(os.write, targets.values(), repeat(data))
    while True:
        try:
            sent.extend(writes)  # keeps the counts it has when a write raises
            break
        except BlockingIOError:
            sent.append(0)
        except OSError:
            sent.append(-1)
    size = len(data)
    if sent.count(size) != len(sent):
        # (A dict's keys come in the order of its values; listed first, in case a group
        # changes while the failures are handled.)
        for ws, n in zip(list(targets), sent):
            if n != size:
                _wrote(ws, data, n)


def _wrote(ws, data, sent):
    """A write of ``data`` by Group.send took ``sent`` bytes of it, not all (-1: it failed)."""
    try:
        if sent < 0:
            ws.abort()
        else:
            ws._behind((data,), sent)
    except Exception:  # noqa: BLE001 - one socket's failure must not strand the others
        log.exception("writing to a connection failed")
        ws.abort()


class _Unserved:
    """The session of a WebSocket that no application took: it is closed at once."""

    def received(self, message):
        pass  # never called: data after our close frame is dropped

    def ended(self):
        pass


def _printable(text, limit):
    """Text from a client, fit for one log line (CWE-117): control characters, non-ASCII and
    quotes escaped, so it can neither forge a line or a field nor drive a terminal; cut at
    ``limit`` characters once escaped."""
    shown = text[:limit].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    if len(shown) <= limit and len(text) <= limit:
        return shown
    return shown[:limit] + "...(cut: %d characters)" % len(text)


def _peer(address):
    """host:port of a TCP peer, for the log ([host]:port for IPv6; a Unix socket's address
    as it is)."""
    if not isinstance(address, tuple):
        return str(address)
    return ("[%s]:%s" if ":" in address[0] else "%s:%s") % address[:2]


_DEFAULT_PORTS = {"http": "80", "https": "443"}  # (an Origin's scheme is the page's)


def _hosts(env):
    """The host[:port] names a request was sent to, lower-case: its Host, and the first
    X-Forwarded-Host and Forwarded host (RFC 7239) that a reverse proxy adds."""
    names = [env.get("HTTP_HOST", ""), env.get("HTTP_X_FORWARDED_HOST", "").partition(",")[0]]
    for pair in env.get("HTTP_FORWARDED", "").partition(",")[0].split(";"):
        key, _, value = pair.partition("=")
        if key.strip().lower() == "host":
            names.append(value.strip().strip('"'))
    return [n.strip().lower() for n in names if n.strip()]


def _with_port(netloc, default):
    """host:port, the port written out when it is the default one."""
    after_host = netloc[netloc.rfind("]") + 1:]  # an IPv6 literal's colons are no port's
    if default is None or ":" in after_host:
        return netloc
    return "%s:%s" % (netloc, default)


def _tokens(header):
    return [t.strip() for t in header.split(",") if t.strip()]


class ChatHandler(WebSocketHandler):
    """The handshake of RFC 6455 section 4.2, with every refusal answered in plain text."""

    policy = Policy()
    sockets = set()  # every open HardenedWebSocket, each removes itself when it ends

    @classmethod
    def configured(cls, policy, sockets):
        """A handler class bound to ``policy`` that registers each WebSocket it opens in the
        set ``sockets``, for ``WSGIServer(handler_class=...)``."""
        return type(cls.__name__, (cls,), {"policy": policy, "sockets": sockets})

    def handle(self):
        # A client that never finishes its request must not hold a connection forever; the
        # timeout is lifted once the connection is a WebSocket (keepalive takes over then).
        self.socket.settimeout(HTTP_TIMEOUT)
        super().handle()

    def handle_one_request(self):
        # The socket's timeout restarts with every byte, so a client that trickles its
        # request (or a body, which pywsgi reads to its end) a byte at a time would never
        # meet it: a whole HTTP request and its answer get HTTP_TIMEOUT seconds. A WebSocket
        # is free of the deadline once upgraded (run_websocket).
        self._deadline = gevent.Timeout(HTTP_TIMEOUT, socket.timeout("HTTP request too slow"))
        self._deadline.start()
        try:
            return super().handle_one_request()
        finally:
            self._deadline.close()

    def read_request(self, requestline):
        ok = super().read_request(requestline)
        pool = getattr(self.server, "pool", None)
        if ok and pool is not None and pool.free_count() < HTTP_CONCURRENCY // 4 and \
                self.headers.get("Upgrade", "").lower() != "websocket":
            # A connection kept alive holds its slot while it waits for its next request:
            # once slots run short, answer and close, so that idle browsers (or a crowd of
            # them) cannot keep new WebSocket handshakes waiting.
            self.close_connection = True
        return ok

    def start_response(self, status, headers, exc_info=None):
        if self.close_connection and self.request_version == "HTTP/1.1" and \
                not any(name.lower() == "connection" for name, _ in headers):
            # Say so when we close after this answer (RFC 9112 section 9.6): the client
            # then opens a new connection for its next request instead of losing it to ours
            # closing under it.
            headers = list(headers) + [("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def format_request(self):
        """The access log line: peer, request line, status, bytes sent, seconds taken. The
        request line is the client's, escaped: it cannot forge fields or lines. (pywsgi's own
        line carries a second timestamp; the log's format has one.)"""
        elapsed = "%.6f" % (self.time_finish - self.time_start) if self.time_finish else "-"
        return '%s "%s" %s %s %s' % (
            _peer(self.client_address), _printable(self.requestline or "", LOGGED_REQUEST_LINE),
            (self._orig_status or self.status or "000").split()[0], self.response_length or "-",
            elapsed)

    def log_request(self):
        # To the server's access log, like every other request (gevent-websocket's own
        # handler writes to a logger of its own).
        self.server.log.write(self.format_request() + "\n")

    def _handle_client_error(self, ex):
        if isinstance(ex, OSError):  # timed out or reset while sending headers: just close
            log.info("dropped an incomplete HTTP request from %s: %s", _peer(self.client_address),
                     type(ex).__name__)
            return None
        if isinstance(ex, (ValueError, http.client.HTTPException)):
            # A malformed request is the client's doing, and common on a public port
            # (scanners, TLS spoken to a plain-HTTP port): logged like a refused handshake,
            # not as a server error, as gevent would (with a traceback past 100 headers).
            # gevent's own message quotes the client's bytes escaped (%r) already.
            detail = getattr(ex, "formatted_message", None) or \
                _printable(str(ex) or type(ex).__name__, 200)
            log.info("bad HTTP request from %s: %s", _peer(self.client_address), detail[:300])
        else:
            log.error("reading an HTTP request from %s failed", _peer(self.client_address),
                      exc_info=ex)
        return ("400", BAD_REQUEST)

    def upgrade_websocket(self):
        env = self.environ
        if env.get("REQUEST_METHOD") != "GET" or env.get("HTTP_UPGRADE", "").lower() != "websocket":
            return None  # not a WebSocket request: the application answers it
        if env.get("PATH_INFO") not in self.policy.paths:
            return self._refuse("404 Not Found", "No WebSocket endpoint at this path.")
        if "upgrade" not in [t.lower() for t in _tokens(env.get("HTTP_CONNECTION", ""))]:
            return self._refuse("400 Bad Request", "Connection header must include Upgrade.")
        if self.request_version != "HTTP/1.1":
            return self._refuse("400 Bad Request", "WebSocket needs HTTP/1.1.")
        if not env.get("HTTP_HOST", "").strip():
            return self._refuse("400 Bad Request", "A Host header is required.")
        if "HTTP_TRANSFER_ENCODING" in env or self.content_length:
            # What follows the headers is the WebSocket's first frames (RFC 6455 4.1): a
            # request body there would be read as frames, or frames read as a body.
            return self._refuse("400 Bad Request", "A WebSocket handshake has no body.")
        if env.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
            return self._refuse("426 Upgrade Required", "Only WebSocket version 13 is supported.",
                                [("Sec-WebSocket-Version", "13")])
        key = env.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError
        except (binascii.Error, ValueError):
            return self._refuse("400 Bad Request",
                                "Sec-WebSocket-Key must be 16 bytes in base64.")
        origin = env.get("HTTP_ORIGIN")
        if origin is not None and not self._origin_allowed(origin, env):
            return self._refuse("403 Forbidden", "Origin %s is not allowed." % origin[:200],
                                log_note="this server is at %s; see ALLOWED_ORIGINS"
                                % " or ".join(_hosts(env)))
        offered = _tokens(env.get("HTTP_SEC_WEBSOCKET_PROTOCOL", ""))
        subprotocol = next((p for p in offered if p in self.policy.subprotocols), None)
        if offered and subprotocol is None:
            return self._refuse("400 Bad Request", "Unsupported subprotocol; this server speaks: "
                                "%s (or none, for plain text)." % ", ".join(self.policy.subprotocols))
        if self.policy.is_full():
            return self._refuse("503 Service Unavailable", "Too many connections; try again later.")

        # The WebSocket itself is made once the 101 is out (run_websocket, below); the
        # library only needs to know that there will be one.
        self.websocket = None
        self.subprotocol = subprotocol
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Accept", accept)]
        if subprotocol:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        self.start_response("101 Switching Protocols", headers)
        return None

    def run_websocket(self):
        """Make the WebSocket and start its session; return while the connection lives on.

        pywsgi closes a connection's socket when its request is done; a WebSocket outlives
        its request, so the socket is detached from pywsgi's object first, together with
        whatever the client sent right after its handshake. The request's greenlet, handler
        and environ are then freed instead of waiting as long as the connection lasts.
        """
        self._deadline.close()  # the handshake is done; keepalive watches the connection now
        sock = self.socket
        sock.settimeout(0.0)
        buffered = self.rfile.peek()  # non-blocking now: the bytes read ahead, if any
        self.socket = None  # pywsgi's request loop ends, and leaves the socket open
        peer = _peer(self.client_address)
        ws = HardenedWebSocket(gevent.socket.socket(fileno=sock.detach()), peer, self.policy,
                               self.subprotocol, self.sockets, buffered)
        self.websocket = ws
        self.environ.update({"wsgi.websocket_version": "13", "wsgi.websocket": ws})
        try:
            self.application(self.environ, lambda status, headers, exc_info=None: None)
        except Exception:  # noqa: BLE001 - the app failed before its session took the socket
            log.exception("starting the WebSocket session from %s failed", peer)
        if ws._session is None and ws in self.sockets:
            # No session took it (the app failed, say): the client hears so, and the socket
            # is released like any other.
            ws.close(frames.SERVER_ERROR, "server error")
            ws.run(_Unserved())

    def _origin_allowed(self, origin, env):
        """An origin in ALLOWED_ORIGINS, or the page's own: the host the request was sent
        to, as Host says or, behind a reverse proxy, X-Forwarded-Host or Forwarded, with the
        scheme's default port written or not. (A page's script cannot set those headers on
        a WebSocket handshake, and the check is for pages: other clients send any Origin.)"""
        origin = origin.strip().rstrip("/").lower()
        allowed = self.policy.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        scheme, _, netloc = origin.partition("://")
        port = _DEFAULT_PORTS.get(scheme)
        return bool(netloc) and \
            _with_port(netloc, port) in {_with_port(h, port) for h in _hosts(env)}

    def _refuse(self, status, text, headers=(), log_note=None):
        body = (text + "\n").encode("utf-8")
        if log_note:
            text += " (%s)" % log_note
        log.info("refused WebSocket handshake from %s: %s %s", _peer(self.client_address),
                 status, _printable(text, 600))  # the text may quote the client's headers
        self.start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(body)))] + list(headers))
        return [body]
