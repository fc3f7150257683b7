"""One connection's life: register, read and answer messages, clean up.

The only module that drives a WebSocket object. Each connection is read by its own
greenlet (the one gevent's server gave the request); writes go through the socket's
non-blocking ``send_frame_bytes``, so nothing here waits on another client.
"""
import logging
import time

import gevent

from . import frames, protocol, wamp
from .backplane import Unavailable
from .hub import JSON, PLAIN
from .protocol import ProtocolError
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

FLUSH_ON_EXIT = 2.0  # seconds to let queued frames (our close frame, say) reach the peer


class Connection:
    """A client as the hub sees it, over one HardenedWebSocket."""

    __slots__ = ("id", "nick", "rooms", "pending", "welcomed", "dialect", "ws", "bucket",
                 "strikes", "send")

    def __init__(self, ws, dialect, settings):
        self.id = None
        self.nick = None
        self.rooms = set()
        self.pending = {}
        self.welcomed = False
        self.dialect = dialect
        self.ws = ws
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst, time.monotonic())
        self.strikes = 0
        # The hub's fan-out calls send once per recipient: the socket's own method, unwrapped.
        self.send = ws.send_frame_bytes

    def send_json(self, obj):
        self.ws.send_frame_bytes(frames.text_frame(protocol.encode(obj)))


def serve(ws, hub, settings, router=None):
    """Run one WebSocket connection until it ends; never raises."""
    if ws.subprotocol == wamp.SUBPROTOCOL:
        return serve_wamp(ws, router, settings)
    dialect = JSON if ws.subprotocol == protocol.SUBPROTOCOL else PLAIN
    conn = Connection(ws, dialect, settings)
    try:
        try:
            hub.register(conn)
        except Unavailable as exc:
            log.warning("refused a connection: the shared store is unreachable (%s)", exc)
            ws.close(frames.TRY_AGAIN_LATER, "the shared store is unreachable; try again later")
            return
        log.info("New connection! (%d)", conn.id)
        handle = _handle_json if dialect == JSON else _handle_plain
        while True:
            message = ws.receive()
            if message is None:
                break
            if _over_rate(conn):
                if dialect == JSON:
                    conn.send_json(protocol.error("rate_limited", "slow down: at most %g messages "
                                                  "per second" % settings.rate_limit,
                                                  protocol.peek_ref(message)))
                continue
            if isinstance(message, bytes):
                if dialect == JSON:
                    conn.send_json(protocol.error("bad_request", "binary frames are not "
                                                  "supported; send JSON text"))
                    continue
                ws.close(frames.UNSUPPORTED_DATA, "binary frames are not supported")
                continue
            handle(conn, hub, message)
    except Exception:  # noqa: BLE001 - the one boundary of this greenlet
        log.exception("connection %s failed", conn.id)
        ws.close(frames.SERVER_ERROR, "server error")
    finally:
        hub.unregister(conn)
        ws.close()
        ws.flush(FLUSH_ON_EXIT)
        log.info("Connection %s closed (%s)", conn.id, ws.close_code or "dropped")


def serve_wamp(ws, router, settings):
    """Run one WAMP session (``wamp.2.json``) until it ends; never raises."""
    conn = Connection(ws, "wamp", settings)
    session = wamp.Session(ws.send_frame_bytes, ws.close)
    try:
        while True:
            message = ws.receive()
            if message is None:
                break
            if isinstance(message, bytes):
                router.handle(session, "binary")  # not JSON: ABORT protocol_violation
                break
            if _over_rate(conn):
                router.refuse(session, message, "chat.error.rate_limited",
                              "at most %g messages per second" % settings.rate_limit)
                continue
            if not router.handle(session, message):
                break
    except Exception:  # noqa: BLE001 - the one boundary of this greenlet
        log.exception("WAMP session %s failed", session.id)
        ws.close(frames.SERVER_ERROR, "server error")
    finally:
        router.leave(session)
        ws.close()
        ws.flush(FLUSH_ON_EXIT)


def echo(ws):
    """Send every message back as it came (text as text, binary as binary), through the same
    handshake, limits and frame code as /ws; for conformance suites, off by default."""
    while True:
        message = ws.receive()
        if message is None:
            break
        ws.send(message)
    ws.close()
    ws.flush(FLUSH_ON_EXIT)


def _over_rate(conn):
    """True when this message is over the rate limit; a sustained flood closes the
    connection with 1008."""
    if conn.bucket.allow(time.monotonic()):
        conn.strikes = 0
        return False
    conn.strikes += 1
    if conn.strikes > conn.bucket.burst:
        log.warning("closing connection %s: flooding", conn.id)
        conn.ws.close(frames.POLICY, "flooding: too many messages")
    return True


def _handle_plain(conn, hub, text):
    if text:
        hub.say(conn, protocol.LOBBY, text)


def _handle_json(conn, hub, text):
    ref = None
    try:
        req = protocol.decode(text)
        ref = req.ref
        reply = _REQUESTS[req.type](conn, hub, req)
    except ProtocolError as exc:
        conn.send_json(protocol.error(exc.code, exc.message, exc.ref if exc.ref is not None else ref))
        return
    if reply is not None:
        if req.ref is not None and "ref" not in reply:
            reply["ref"] = req.ref  # left, nick, pong: the answer names the request
        conn.send_json(reply)


def _pong(conn, hub, req):
    return {"type": "pong"}


_REQUESTS = {
    "message": lambda conn, hub, req: hub.say(conn, req["room"], req["text"], req.ref),
    "join": lambda conn, hub, req: hub.join(conn, req["room"], req["since"], req["epoch"], req.ref),
    "leave": lambda conn, hub, req: hub.leave(conn, req["room"]),
    "nick": lambda conn, hub, req: hub.rename(conn, req["nick"]),
    "direct": lambda conn, hub, req: hub.direct(conn, req["to"], req["text"]),
    "typing": lambda conn, hub, req: hub.typing(conn, req["room"]),
    "ping": _pong,
}


def keepalive(sockets, interval, timeout):
    """Forever: ping every WebSocket in ``sockets()`` each ``interval`` seconds and drop the
    ones whose peer sent nothing at all (not even a pong) for ``timeout`` seconds. One
    greenlet for all connections, whatever their dialect."""
    ping = frames.frame(frames.OP_PING, b"")
    while True:
        gevent.sleep(interval)
        now = time.monotonic()
        try:
            for ws in sockets():
                if now - ws.last_seen > timeout:
                    log.info("dropping the connection from %s: silent for %.0f s", ws.peer,
                             now - ws.last_seen)
                    ws.abort()
                else:
                    ws.send_frame_bytes(ping)
        except Exception:  # noqa: BLE001 - the one boundary of this greenlet: pings go on
            log.exception("keepalive sweep failed")
