"""gevent-websocket, hardened: our subclasses of its ``WebSocket`` and ``WebSocketHandler``.

What the library leaves out and RFC 6455 asks for (section numbers are the RFC's):
the handshake answers 400/403/426/503 with a text body instead of a traceback, checks
``Origin`` (10.2) and parses ``Sec-WebSocket-Protocol`` as a token list (4.2.2); frames must be
masked (5.1), messages are limited in size before their payload is read, UTF-8 is validated
as the bytes arrive (8.1), close frames carry their status code (5.5.1), and writes never
block the caller: one writer per socket, and a bounded outbox for a peer that reads slowly.
"""
import base64
import binascii
import codecs
import dataclasses
import hashlib
import logging
import socket
import struct
import time
from collections import deque

import gevent
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Stream, WebSocket

from . import frames
from .frames import FrameError

log = logging.getLogger(__name__)

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_CHUNK = 64 * 1024  # a multiple of 4, so each chunk unmasks with the same key
WRITE_BATCH = 256 * 1024  # queued frames joined into one write, up to this many bytes
CLOSE_WAIT = 2.0  # seconds to wait for the peer's close frame after ours
SLOW_CLOSE_WAIT = 5.0  # seconds a slow consumer gets to take its 1008 before the socket goes
HTTP_TIMEOUT = 10.0  # seconds a client has to send a whole HTTP request (slowloris guard)


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
    """One WebSocket connection: read messages in the owner's greenlet, write from anywhere.

    ``receive`` returns str, bytes, or None once the connection is over. ``send_frame_bytes``
    never blocks: it writes what the socket takes now and queues the rest for a writer
    greenlet that exists only while the peer is behind.
    """

    def __init__(self, environ, handler, policy, subprotocol):
        super().__init__(environ, Stream(handler), handler)
        self.sock = handler.socket
        self.read = handler.rfile.read
        self.subprotocol = subprotocol
        self.peer = "%s:%s" % handler.client_address[:2] if isinstance(
            handler.client_address, tuple) else str(handler.client_address)
        self.max_size = policy.max_message_size
        self.outbox_limit = policy.outbox_size
        self.last_seen = time.monotonic()
        self.close_code = None  # what we sent, or what the peer sent first
        self.close_reason = ""
        self.dead = False
        self._outbox = deque()
        self._writer = None

    def __del__(self):
        # The library's __del__ sends a close frame from the garbage collector; ours does not.
        pass

    # -- reading -------------------------------------------------------------------------

    def receive(self):
        """The next message (str for text, bytes for binary); None when the connection ends."""
        try:
            return self._read_message()
        except FrameError as exc:
            log.info("closing connection: %s (%d)", exc.reason, exc.code)
            self.close(exc.code, exc.reason)
            self._linger()
        except (_EOF, OSError):
            self.abort()
        return None

    def _read_exact(self, n):
        data = self.read(n)
        if len(data) != n:
            raise _EOF()
        return data

    def _read_message(self):
        opcode, parts, size, decoder = None, [], 0, None
        while True:
            fin, op, masked, length = self._read_header()
            if not masked:
                raise FrameError(frames.PROTOCOL_ERROR, "client frames must be masked")
            mask = self._read_exact(4)
            if op >= frames.OP_CLOSE:
                if self._control(op, frames.unmask(self._read_exact(length), mask)):
                    return None
                continue
            if op == frames.OP_CONT:
                if opcode is None:
                    raise FrameError(frames.PROTOCOL_ERROR, "continuation frame without a message")
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
                chunk = frames.unmask(self._read_exact(min(remaining, READ_CHUNK)), mask)
                remaining -= len(chunk)
                if decoder is not None:
                    try:
                        chunk = decoder.decode(chunk, final=fin and not remaining)
                    except UnicodeDecodeError:
                        raise FrameError(frames.INVALID_DATA, "invalid UTF-8 in a text message") from None
                parts.append(chunk)
            if decoder is not None and fin and not length:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise FrameError(frames.INVALID_DATA, "invalid UTF-8 in a text message") from None
            if fin:
                if self.close_code is not None:
                    # RFC 6455 1.4: data after our close frame is read and dropped.
                    opcode, parts, size, decoder = None, [], 0, None
                    continue
                return "".join(parts) if decoder is not None else b"".join(parts)

    def _read_header(self):
        fin, _rsv, op, masked, length = frames.parse_head(self._read_exact(2))
        self.last_seen = time.monotonic()
        if length == 126:
            length = struct.unpack("!H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exact(8))[0]
            if length >> 63:
                raise FrameError(frames.PROTOCOL_ERROR, "64-bit length with its top bit set")
        return fin, op, masked, length

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
        """Queue a complete frame without blocking; False when it was dropped."""
        if self.dead or self.close_code is not None:
            return False
        return self._push(data)

    def _push(self, data):
        if self._writer is None:
            try:
                sent = self.sock.send(data, 0, timeout=0.0)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return False
            if sent == len(data):
                return True
            self._outbox.append(memoryview(data)[sent:])
            self._writer = gevent.spawn(self._drain)
            return True
        if len(self._outbox) >= self.outbox_limit:
            self._slow_consumer()
            return False
        self._outbox.append(data)
        return True

    def _drain(self):
        try:
            while self._outbox:
                batch, size = [], 0
                while self._outbox and size < WRITE_BATCH:
                    item = self._outbox.popleft()
                    batch.append(item)
                    size += len(item)
                self.sock.sendall(b"".join(batch) if len(batch) > 1 else batch[0])
        except OSError:
            self.abort()
        finally:
            self._writer = None

    def _slow_consumer(self):
        log.warning("closing a slow consumer: %d frames queued (OUTBOX_SIZE)", len(self._outbox))
        self._outbox.clear()
        self.close(frames.POLICY, "slow consumer: too many frames queued")
        gevent.spawn_later(SLOW_CLOSE_WAIT, self.abort)

    def flush(self, timeout):
        """Wait up to ``timeout`` seconds for queued frames to be written."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)

    # -- closing -------------------------------------------------------------------------

    def close(self, code=frames.NORMAL, message=""):
        """Send a close frame with ``code`` and a reason, once; the peer's answer ends
        ``receive``."""
        if self.close_code is None and not self.dead:
            self.close_code, self.close_reason = code, message or ""
            self._send_close(code, self.close_reason)
        self.closed = True

    def _send_close(self, code, reason):
        if isinstance(reason, (bytes, bytearray)):
            reason = bytes(reason).decode("utf-8", "replace")
        self._push(frames.frame(frames.OP_CLOSE, frames.close_payload(code, reason)))

    def abort(self):
        """Drop the connection now: no more writes, and the reader sees EOF."""
        if self.dead:
            return
        self.dead = self.closed = True
        self._outbox.clear()
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


def _tokens(header):
    return [t.strip() for t in header.split(",") if t.strip()]


class ChatHandler(WebSocketHandler):
    """The handshake of RFC 6455 section 4.2, with every refusal answered in plain text."""

    policy = Policy()

    @classmethod
    def configured(cls, policy):
        """A handler class bound to ``policy``, for ``WSGIServer(handler_class=...)``."""
        return type(cls.__name__, (cls,), {"policy": policy})

    def handle(self):
        # A client that never finishes its request must not hold a connection forever; the
        # timeout is lifted once the connection is a WebSocket (keepalive takes over then).
        self.socket.settimeout(HTTP_TIMEOUT)
        super().handle()

    def _handle_client_error(self, ex):
        if isinstance(ex, OSError):  # timed out or reset while sending headers: just close
            log.info("dropped an incomplete HTTP request from %s: %s", self.client_address,
                     type(ex).__name__)
            return None
        return super()._handle_client_error(ex)

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
        if origin is not None and not self._origin_allowed(origin, env.get("HTTP_HOST", "")):
            return self._refuse("403 Forbidden", "Origin %s is not allowed." % origin[:200])
        offered = _tokens(env.get("HTTP_SEC_WEBSOCKET_PROTOCOL", ""))
        subprotocol = next((p for p in offered if p in self.policy.subprotocols), None)
        if offered and subprotocol is None:
            return self._refuse("400 Bad Request", "Unsupported subprotocol; this server speaks: "
                                "%s (or none, for plain text)." % ", ".join(self.policy.subprotocols))
        if self.policy.is_full():
            return self._refuse("503 Service Unavailable", "Too many connections; try again later.")

        self.socket.settimeout(None)
        self.websocket = HardenedWebSocket(env, self, self.policy, subprotocol)
        env.update({"wsgi.websocket_version": "13", "wsgi.websocket": self.websocket})
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Accept", accept)]
        if subprotocol:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        self.start_response("101 Switching Protocols", headers)
        return None

    def _origin_allowed(self, origin, host):
        origin = origin.strip().rstrip("/").lower()
        allowed = self.policy.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        netloc = origin.partition("://")[2]
        return bool(netloc) and netloc == host.strip().lower()

    def _refuse(self, status, text, headers=()):
        body = (text + "\n").encode("utf-8")
        log.info("refused WebSocket handshake from %s: %s %s", self.client_address[0]
                 if isinstance(self.client_address, tuple) else self.client_address, status, text)
        self.start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(body)))] + list(headers))
        return [body]
