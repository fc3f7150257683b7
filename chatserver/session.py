"""One connection's session: register, answer its messages, clean up.

The transport (``HardenedWebSocket.run``) reads each connection's messages and hands them to
its session's ``received``, then calls ``ended`` once. Writes go through the socket's
non-blocking ``send_frame_bytes``, so nothing here waits on another client.
"""
import logging
import time

import gevent

from . import frames, protocol, transport, wamp
from .backplane import Unavailable
from .hub import JSON, PLAIN
from .protocol import ProtocolError
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)


class Group(transport.Group):
    """The hub's groups (a room's members of one dialect) for Connections: kept as their
    sockets, which the transport writes in one pass."""

    __slots__ = ()

    def add(self, client):
        transport.Group.add(self, client.ws)

    def discard(self, client):
        transport.Group.discard(self, client.ws)

    def send(self, frame, skip=None):
        transport.Group.send(self, frame, None if skip is None else skip.ws)


class Connection:
    """A chat client (plain text or ``chat.v1``) as the hub sees it, over one WebSocket."""

    __slots__ = ("id", "nick", "rooms", "pending", "welcomed", "dialect", "ws", "bucket",
                 "strikes", "free_joins", "send", "hub")

    def __init__(self, ws, dialect, settings, hub):
        self.id = None
        self.nick = None
        self.rooms = set()
        self.pending = {}
        self.welcomed = False
        self.dialect = dialect
        self.ws = ws
        self.hub = hub
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst, time.monotonic())
        self.strikes = 0
        # A client that reconnects rejoins all its rooms at once: that burst is not a flood.
        # Up to MAX_ROOMS joins of rooms it is not in are not counted against the rate,
        # until its first leave (so joining and leaving on a loop is).
        self.free_joins = settings.max_rooms
        # The hub's fan-out calls send once per recipient: the socket's own method, unwrapped.
        self.send = ws.send_frame_bytes

    def resync(self):
        """Messages meant for it were missed: the client reconnects, and catches up with
        since/epoch (close code 1012, "service restart": try again at once)."""
        self.ws.close(frames.SERVICE_RESTART, "messages were missed while the shared store "
                      "was unreachable, or it lost them; reconnect to catch up")

    def send_json(self, obj):
        self.ws.send_frame_bytes(frames.text_frame(protocol.encode(obj)))

    def received(self, message):
        json = self.dialect == JSON
        free = json and self.free_joins and _free_join(self, message)
        if not free and _over_rate(self):
            if json:
                self.send_json(protocol.error("rate_limited", "slow down: at most %g messages "
                                              "per second" % self.bucket.rate,
                                              protocol.peek_ref(message)))
            return
        if isinstance(message, bytes):
            if json:
                self.send_json(protocol.error("bad_request", "binary frames are not "
                                              "supported; send JSON text"))
            else:
                self.ws.close(frames.UNSUPPORTED_DATA, "binary frames are not supported")
            return
        if json:
            _handle_json(self, self.hub, message)
        elif message and not message.isspace():  # what a JSON client may not send either
            self.hub.say(self, protocol.LOBBY, message)

    def ended(self):
        if self.id is None:
            return  # refused before it was registered
        self.hub.unregister(self)
        # The address ties the id of "New connection! (7)" (the recipe's line, kept as it is)
        # to the access log's line for the handshake.
        log.info("Connection %s from %s closed (%s)", self.id, self.ws.peer,
                 self.ws.close_code or "dropped")


class WampConnection:
    """One WAMP session (``wamp.2.json``) over one WebSocket."""

    __slots__ = ("ws", "router", "session", "bucket", "strikes", "free_subscriptions")

    def __init__(self, ws, router, settings):
        self.ws = ws
        self.router = router
        self.session = wamp.Session(ws.send_frame_bytes, ws.close)
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst, time.monotonic())
        self.strikes = 0
        # A WAMP client that reconnects subscribes again to all its topics at once, as a
        # chat client rejoins its rooms: up to MAX_ROOMS, until its first UNSUBSCRIBE.
        self.free_subscriptions = settings.max_rooms

    @property
    def id(self):
        return self.session.id

    def received(self, message):
        if isinstance(message, bytes):
            self.router.handle(self.session, "binary")  # not JSON: ABORT protocol_violation
            self.ws.close()
        elif self.free_subscriptions and wamp.is_subscribe(message):
            self.free_subscriptions -= 1
            self._handle(message)
        elif self.session.answers_due and wamp.is_answer(message):
            # A callee's YIELD or ERROR: dropping it would leave its caller waiting for
            # ever, and the CALL that asked for it was counted already.
            self._handle_settling(message, "answers_due")
        elif self.session.calls and wamp.is_cancel(message):
            self._handle_settling(message, "calls")  # a caller giving up on a counted call
        elif wamp.is_goodbye(message):
            self._handle(message)  # ends the session: never more than one
        elif _over_rate(self):
            self.router.refuse(self.session, message, "chat.error.rate_limited",
                               "at most %g messages per second" % self.bucket.rate)
        else:
            if wamp.is_unsubscribe(message):
                self.free_subscriptions = 0
            self._handle(message)

    def _handle_settling(self, message, waiting):
        """A message that settles a call counted already (``waiting`` names the session's
        count of them) passes the rate limit; one that settles none counts like any other
        (a CANCEL that only interrupts, an answer to nothing)."""
        before = getattr(self.session, waiting)
        self._handle(message)
        if getattr(self.session, waiting) == before:
            _over_rate(self)

    def _handle(self, message):
        if not self.router.handle(self.session, message):
            self.ws.close()  # after an ABORT or GOODBYE: the session is over

    def ended(self):
        self.router.leave(self.session)


class Echo:
    """Every message sent back as it came (text as text, binary as binary), through the same
    handshake, limits and frame code as /ws: for conformance suites, off by default."""

    __slots__ = ("ws",)

    def __init__(self, ws):
        self.ws = ws

    def received(self, message):
        self.ws.send(message)

    def ended(self):
        pass


class Tally:
    """Counts something that may recur thousands of times a second (every client retrying
    through an outage), so that the log says it at once, then at most once per ``every``
    seconds with how many there were and since when."""

    def __init__(self, every, clock=time.monotonic, wall=time.time):
        self.every = every
        self.clock, self.wall = clock, wall
        self.counted = 0
        self.first = None  # wall-clock time of the first one counted and not yet told
        self.told_at = None

    def count(self):
        """Count one; returns (how many to log now, since when), or (0, None): not yet.
        (What was counted after the last line is told with the next one, dated, so a
        count from an earlier outage is not taken for the current one's.)"""
        now = self.clock()
        if not self.counted:
            self.first = self.wall()
        self.counted += 1
        if self.told_at is not None and now - self.told_at < self.every:
            return 0, None
        told = self.counted, self.first
        self.counted, self.told_at = 0, now
        return told


_refusals = Tally(30.0)


def serve(ws, hub, settings, router=None):
    """Start the session of a new WebSocket on /ws: WAMP, chat.v1 JSON or plain text."""
    if ws.subprotocol == wamp.SUBPROTOCOL:
        ws.run(WampConnection(ws, router, settings))
        return
    conn = Connection(ws, JSON if ws.subprotocol == protocol.SUBPROTOCOL else PLAIN, settings, hub)
    try:
        hub.register(conn)
    except Unavailable as exc:
        count, since = _refusals.count()
        if count:
            log.warning("refused %s: the shared store is unreachable (%s)",
                        "a connection" if count == 1 else "%d connections since %s (this line "
                        "comes once per %g s at most)"
                        % (count, time.strftime("%H:%M:%S", time.localtime(since)),
                           _refusals.every), exc)
        ws.close(frames.TRY_AGAIN_LATER, "the shared store is unreachable; try again later")
    else:
        log.info("New connection! (%d)", conn.id)
    ws.run(conn)


def echo(ws):
    """Start an echo session (see ``Echo``)."""
    ws.run(Echo(ws))


def _leave(conn, hub, room):
    conn.free_joins = 0  # joins after a leave are not a reconnect's
    return hub.leave(conn, room)


def _free_join(conn, message):
    """True (and one free join spent) for a join of a room ``conn`` is not in."""
    room = protocol.join_target(message)
    if room is None or room in conn.rooms:
        return False
    conn.free_joins -= 1
    return True


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
    "leave": lambda conn, hub, req: _leave(conn, hub, req["room"]),
    "nick": lambda conn, hub, req: hub.rename(conn, req["nick"]),
    "direct": lambda conn, hub, req: hub.direct(conn, req["to"], req["text"]),
    "typing": lambda conn, hub, req: hub.typing(conn, req["room"]),
    "ping": _pong,
}


def keepalive(sockets, interval, timeout):
    """Forever: ping every WebSocket in ``sockets()`` each ``interval`` seconds and drop the
    ones whose peer sent nothing at all (not even a pong) and read nothing we sent for
    ``timeout`` seconds (``quiet_for``). One greenlet for all connections, whatever their
    dialect."""
    ping = frames.frame(frames.OP_PING, b"")
    while True:
        gevent.sleep(interval)
        now = time.monotonic()
        try:
            for ws in sockets():
                quiet = ws.quiet_for(now)
                if quiet > timeout:
                    log.info("dropping the connection from %s: silent for %.0f s", ws.peer, quiet)
                    ws.abort()
                else:
                    ws.send_frame_bytes(ping)
        except Exception:  # noqa: BLE001 - the one boundary of this greenlet: pings go on
            log.exception("keepalive sweep failed")
