"""A WAMP v2 router, Basic Profile, for the ``wamp.2.json`` subprotocol, bridged to the chat.

Message codes, ids and error URIs follow the WAMP specification (wamp-proto.org, "Basic
Profile", and call canceling from the Advanced Profile). The router keeps realms of
sessions; each realm has a broker (topics and their subscribers) and a dealer (procedures
and their callees). No I/O here: a session is given a ``send(frame_bytes)`` and the router
calls it.

The bridge: in the realm ``WAMP_REALM`` (default ``realm1``), topic ``chat.room.<room>`` is
chat room ``<room>``. Chat messages are published to it as EVENTs with ``args`` ``[text]``
and ``kwargs`` ``{id, room, from, ts}``; a PUBLISH to it becomes a chat message from that
WAMP session, stored in history and seen by plain-text and JSON clients alike.

Pub/sub reaches subscribers on every process through the backplane; RPC stays within one
process (a callee serves the callers connected to the same process).
"""
import hashlib
import json
import logging
import math
import random
import re

from . import frames, protocol
from .backplane import Unavailable
from .protocol import ProtocolError

log = logging.getLogger(__name__)

SUBPROTOCOL = "wamp.2.json"
HELLO, WELCOME, ABORT, GOODBYE, ERROR = 1, 2, 3, 6, 8
PUBLISH, PUBLISHED, SUBSCRIBE, SUBSCRIBED, UNSUBSCRIBE, UNSUBSCRIBED, EVENT = \
    16, 17, 32, 33, 34, 35, 36
CALL, CANCEL, RESULT, REGISTER, REGISTERED, UNREGISTER, UNREGISTERED, INVOCATION, INTERRUPT, \
    YIELD = 48, 49, 50, 64, 65, 66, 67, 68, 69, 70
CANCEL_MODES = ("skip", "kill", "killnowait")

_REQUESTS = (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, CALL, REGISTER, UNREGISTER)
ROOM_TOPIC = "chat.room."
# What one session may hold at once: its subscriptions, its registrations, its calls that
# are still waiting for a result. Beyond that: ERROR chat.error.limit_exceeded.
MAX_PER_SESSION = 1000
LIMIT = "chat.error.limit_exceeded"
MAX_ID = 2 ** 53
# Loose URIs, as the specification's "relaxed" rule: dot-separated components without
# whitespace, '#' or empty parts; nor control characters or lone surrogates, which no URI
# needs and which would reach the log or fail to encode.
_URI_PART = "[^\\s.#\x00-\x1f\x7f-\x9f\ud800-\udfff]+"
_URI = re.compile(r"%s(\.%s)*\Z" % (_URI_PART, _URI_PART))
ROUTER_ROLES = {"broker": {"features": {"publisher_exclusion": True}},
                "dealer": {"features": {"call_canceling": True}}}
CLIENT_ROLES = ("publisher", "subscriber", "caller", "callee")


def new_id():
    """A global-scope id: random in [1, 2^53] (WAMP section "IDs")."""
    return random.randint(1, MAX_ID)


def publication_id(message):
    """The publication id of a chat message on its room's topic. Derived from the message,
    not drawn, so that the PUBLISHED a publisher gets and the EVENT every process sends
    carry the same id, as the specification asks."""
    key = json.dumps([message["room"], message["id"], message["ts"]]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % MAX_ID + 1


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _finite(literal):
    number = float(literal)
    if math.isinf(number):  # 1e999: JSON allows it, but it would go out as Infinity
        raise ValueError("%s is too large" % literal[:20])
    return number


def _decode(text):
    """One WAMP message, as JSON (RFC 8259) that every peer can read: no NaN or Infinity
    (Python's json takes them, and reads 1e999 as one; JavaScript's does not), and no lone surrogate from a \\u
    escape, which cannot be encoded again as UTF-8. Raises ValueError."""
    msg = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    if "\\u" in text:  # only an escape can make a lone surrogate
        protocol.encode(msg).encode("utf-8")  # UnicodeEncodeError is a ValueError
    return msg


def valid_uri(uri, limit=1024):
    """A URI of at most ``limit`` characters. The specification sets no length; the router
    keeps topics, procedures and realms while they are in use (1,000 per session each), so
    it bounds theirs. An error URI is only passed on: the message size bounds it."""
    return isinstance(uri, str) and len(uri) <= limit and _URI.match(uri) is not None


def is_subscribe(text):
    """True for a small frame that claims to be a SUBSCRIBE (the router validates it)."""
    return len(text) <= protocol.SMALL_REQUEST and text.startswith("[%d," % SUBSCRIBE)


def is_unsubscribe(text):
    return text.startswith("[%d," % UNSUBSCRIBE)


_ANSWER = re.compile(r"\[\s*(?:%d|%d\s*,\s*%d)\s*," % (YIELD, ERROR, INVOCATION))
_CANCEL = re.compile(r"\[\s*%d\s*," % CANCEL)
_GOODBYE = re.compile(r"\[\s*%d\s*," % GOODBYE)


def is_answer(text):
    """True for a frame that claims to be a callee's YIELD or ERROR to an INVOCATION."""
    return _ANSWER.match(text) is not None


def is_goodbye(text):
    return _GOODBYE.match(text) is not None


def is_cancel(text):
    return _CANCEL.match(text) is not None


class Violation(Exception):
    """The peer broke the protocol; the session ends with ABORT."""


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def _payload(args, kwargs):
    """The optional Arguments|list, ArgumentsKw|dict tail of a message."""
    if kwargs:
        return [args or [], kwargs]
    if args:
        return [args]
    return []


class Session:
    """One WAMP session on one connection; ``send`` takes complete frames."""

    def __init__(self, send, close):
        self.send_frame = send
        self.close = close
        self.id = None
        self.realm = None
        self.chat = None  # {id, nick} in the bridged realm
        self.subscriptions = set()  # subscription ids
        self.registrations = set()  # registration ids
        self.calls = 0  # calls made and not yet answered
        self.waiting = {}  # its calls' request ids -> (callee id, invocation id): for CANCEL
        self.interruptible = False  # a callee that takes INTERRUPT (call canceling)
        self.answers_due = 0  # INVOCATIONs to it still waiting: their answers are not rate limited
        self.next_request = 0

    def send(self, msg):
        self.send_frame(frames.text_frame(protocol.encode(msg)))

    def request_id(self):
        """Router-originated request ids (INVOCATION) count up per session."""
        self.next_request = self.next_request + 1 if self.next_request < MAX_ID else 1
        return self.next_request


class Realm:
    """Shape: sessions[id] = Session; topics[uri] = subscription id; subscribers[sub id] =
    {session}; procedures[uri] = registration id; callees[reg id] = (uri, Session);
    calls[(callee id, invocation id)] = (caller, call request id); each caller's ``waiting``
    maps the other way."""

    def __init__(self, name):
        self.name = name
        self.sessions = {}
        self.topics = {}
        self.subscribers = {}
        self.topic_of = {}
        self.procedures = {}
        self.callees = {}
        self.calls = {}
        self.interrupted = set()  # keys of calls whose callee was sent an INTERRUPT (kill)


class Router:
    """The realms of this process and the bridge to the hub."""

    def __init__(self, hub, bridge_realm="realm1"):
        self.hub = hub
        self.bridge_realm = bridge_realm
        self.realms = {}
        hub.listen("wamp", self._on_event)
        hub.on_message(self._on_chat_message)

    # -- sessions ------------------------------------------------------------------------

    def handle(self, session, text):
        """Process one frame from ``session``; returns False when the session is over."""
        try:
            msg = _decode(text)
        except (ValueError, RecursionError):
            return self._abort(session, "wamp.error.protocol_violation", "message is not JSON")
        if not (isinstance(msg, list) and msg and isinstance(msg[0], int)
                and not isinstance(msg[0], bool)):
            return self._abort(session, "wamp.error.protocol_violation",
                               "a message is a JSON array starting with its type code")
        try:
            if session.realm is None:
                return self._hello(session, msg)
            handler = self._HANDLERS.get(msg[0])
            if handler is None:
                raise Violation("unexpected message type %d" % msg[0])
            return handler(self, session, msg)
        except (Violation, IndexError, TypeError, ValueError, KeyError, RecursionError) as exc:
            # (RecursionError: arguments nested too deep to encode again for the receivers.)
            reason = str(exc) if isinstance(exc, Violation) else "malformed message"
            return self._abort(session, "wamp.error.protocol_violation", reason)

    def refuse(self, session, text, uri, reason):
        """Answer a request that is dropped before handling (over the rate limit) with an
        ERROR, so a caller does not wait for nothing. A PUBLISH without ``acknowledge``
        gets no answer, as the specification says: a client library would take an ERROR
        for it as a protocol violation."""
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not (isinstance(msg, list) and len(msg) > 2 and msg[0] in _REQUESTS
                and _is_id(msg[1])):
            return
        if msg[0] == PUBLISH and not (isinstance(msg[2], dict) and msg[2].get("acknowledge") is True):
            return
        session.send([ERROR, msg[0], msg[1], {}, uri, [reason]])

    def _abort(self, session, uri, message):
        session.send([ABORT, {"message": message}, uri])
        self.leave(session)
        return False

    def _hello(self, session, msg):
        if msg[0] != HELLO or len(msg) != 3:
            raise Violation("the first message must be HELLO")
        realm, details = msg[1], msg[2]
        if not valid_uri(realm) or not isinstance(details, dict):
            raise Violation("HELLO needs a realm URI and a details dict")
        roles = details.get("roles")
        if not isinstance(roles, dict) or not any(role in roles for role in CLIENT_ROLES):
            raise Violation("HELLO must announce at least one of the roles %s"
                            % ", ".join(CLIENT_ROLES))
        if not all(isinstance(roles[role], dict) for role in CLIENT_ROLES if role in roles):
            raise Violation("a role's details must be a dict")
        callee = roles.get("callee", {})
        features = callee.get("features")
        session.interruptible = isinstance(features, dict) and \
            features.get("call_canceling") is True
        r = self.realms.get(realm)
        if r is None:
            r = self.realms[realm] = Realm(realm)
        session.id = new_id()
        while session.id in r.sessions:
            session.id = new_id()
        if realm == self.bridge_realm:
            try:
                chat_id = self.hub.backplane.next_id()
            except Unavailable:
                session.send([ABORT, {"message": "the shared store is unreachable; try again "
                                      "later"}, "wamp.error.system_shutdown"])
                return False
            session.chat = {"id": chat_id, "nick": "Client %d" % chat_id}
        session.realm = r
        r.sessions[session.id] = session
        session.send([WELCOME, session.id, {"roles": ROUTER_ROLES, "authrole": "anonymous",
                                            "authmethod": "anonymous", "agent": "chatserver"}])
        log.info("WAMP session %d joined realm %s", session.id, realm)
        return True

    def leave(self, session):
        """Forget ``session``: its subscriptions, registrations and pending calls."""
        r = session.realm
        if r is None:
            return
        session.realm = None
        r.sessions.pop(session.id, None)
        for sub_id in list(session.subscriptions):
            self._unsubscribe(r, session, sub_id)
        for reg_id in list(session.registrations):
            self._unregister(r, session, reg_id)
        for key, (caller, request) in list(r.calls.items()):
            if key[0] == session.id:
                self._end_call(r, key)
                caller.send([ERROR, CALL, request, {}, "wamp.error.canceled",
                             ["callee disconnected from in-flight request"]])
            elif caller is session:
                self._end_call(r, key)
        # (Unsubscribing may have waited for Redis: the realm may have emptied and been made
        # anew by another session meanwhile.)
        if not r.sessions and self.realms.get(r.name) is r:
            del self.realms[r.name]
        log.info("WAMP session %d left realm %s", session.id, r.name)

    def _goodbye(self, session, msg):
        if len(msg) < 3 or not isinstance(msg[1], dict) or not valid_uri(msg[2]):
            raise Violation("GOODBYE needs a details dict and a reason URI")
        session.send([GOODBYE, {}, "wamp.close.goodbye_and_out"])
        self.leave(session)
        return False

    # -- broker --------------------------------------------------------------------------

    def _subscribe(self, session, msg):
        _, request, options, topic = msg[:4]
        self._check_request(request, options)
        r = session.realm
        if options.get("match", "exact") != "exact":  # (a wildcard has empty parts)
            return self._error(session, SUBSCRIBE, request, "wamp.error.option_not_allowed",
                               ["only exact matching: the router has no pattern-based "
                                "subscriptions"])
        if not valid_uri(topic):
            return self._error(session, SUBSCRIBE, request, "wamp.error.invalid_uri")
        sub_id = r.topics.get(topic)
        if sub_id is not None and sub_id in session.subscriptions:
            session.send([SUBSCRIBED, request, sub_id])
            return True
        if len(session.subscriptions) >= MAX_PER_SESSION:
            return self._error(session, SUBSCRIBE, request, LIMIT,
                               ["at most %d subscriptions per session" % MAX_PER_SESSION])
        room = self._bridged_room(r, topic)
        if room is not None:
            try:
                self.hub.follow(room)
            except Unavailable:
                return self._error(session, SUBSCRIBE, request, "wamp.error.unavailable")
            # follow() may wait for Redis: another session may have subscribed meanwhile.
            sub_id = r.topics.get(topic)
        if sub_id is None:
            sub_id = new_id()
            while sub_id in r.subscribers:
                sub_id = new_id()
            r.topics[topic] = sub_id
            r.subscribers[sub_id] = set()
            r.topic_of[sub_id] = topic
        r.subscribers[sub_id].add(session)
        session.subscriptions.add(sub_id)
        session.send([SUBSCRIBED, request, sub_id])
        return True

    def _unsubscribe_msg(self, session, msg):
        _, request, sub_id = msg[:3]
        self._check_request(request)
        if not _is_id(sub_id):
            raise Violation("subscription ids are integers in [1, 2^53]")
        if sub_id not in session.subscriptions:
            return self._error(session, UNSUBSCRIBE, request, "wamp.error.no_such_subscription")
        self._unsubscribe(session.realm, session, sub_id)
        session.send([UNSUBSCRIBED, request])
        return True

    def _unsubscribe(self, r, session, sub_id):
        session.subscriptions.discard(sub_id)
        subscribers = r.subscribers.get(sub_id, set())
        subscribers.discard(session)
        topic = r.topic_of.get(sub_id)
        room = self._bridged_room(r, topic) if topic else None
        if room is not None:
            self.hub.unfollow(room)
        if not subscribers:
            r.subscribers.pop(sub_id, None)
            r.topic_of.pop(sub_id, None)
            r.topics.pop(topic, None)

    def _publish(self, session, msg):
        _, request, options, topic = msg[:4]
        self._check_request(request, options)
        args, kwargs = self._args(msg, 4)
        r = session.realm
        acknowledge = options.get("acknowledge", False)
        exclude_me = options.get("exclude_me", True)
        if not (isinstance(acknowledge, bool) and isinstance(exclude_me, bool)):
            raise Violation("acknowledge and exclude_me are booleans")
        if not valid_uri(topic) or topic.startswith("wamp."):
            return self._error(session, PUBLISH, request, "wamp.error.invalid_uri") \
                if acknowledge else True
        pub_id = new_id()
        room = self._bridged_room(r, topic)
        if room is not None:
            text = args[0] if args else None
            try:
                message = self.hub.post_as(session.chat, room, text)
            except ProtocolError as exc:
                if acknowledge:
                    uri = "wamp.error.unavailable" if exc.code == "unavailable" \
                        else "wamp.error.invalid_argument"
                    self._error(session, PUBLISH, request, uri, [exc.message])
                return True
            pub_id = publication_id(message)
            sub_id = r.topics.get(topic)
            if not exclude_me and sub_id in session.subscriptions:
                session.send_frame(self._chat_event(sub_id, message))  # others get it by the hub
        else:
            event = {"k": "wamp", "realm": r.name, "topic": topic, "pub": pub_id,
                     "args": args, "kwargs": kwargs,
                     "publisher": session.id if exclude_me else None}
            try:
                self.hub.backplane.publish_all(event)
            except Unavailable:
                if acknowledge:
                    self._error(session, PUBLISH, request, "wamp.error.unavailable")
                return True
        if acknowledge:
            session.send([PUBLISHED, request, pub_id])
        return True

    def _on_event(self, event):
        """A non-bridged publication from any process: EVENT to the local subscribers."""
        r = self.realms.get(event.get("realm"))
        if r is None:
            return
        sub_id = r.topics.get(event.get("topic"))
        if sub_id is None:
            return
        frame = frames.text_frame(protocol.encode(
            [EVENT, sub_id, event["pub"], {}] + _payload(event.get("args"), event.get("kwargs"))))
        for s in tuple(r.subscribers.get(sub_id, ())):
            if s.id != event.get("publisher"):
                s.send_frame(frame)

    def _on_chat_message(self, message):
        """A chat message in a room: EVENT to the subscribers of its topic in the bridged realm."""
        r = self.realms.get(self.bridge_realm)
        if r is None:
            return
        sub_id = r.topics.get(ROOM_TOPIC + message["room"])
        if sub_id is None:
            return
        frame = self._chat_event(sub_id, message)
        sender = message["from"]["id"]
        for s in tuple(r.subscribers.get(sub_id, ())):
            if s.chat is None or s.chat["id"] != sender:
                s.send_frame(frame)

    @staticmethod
    def _chat_event(sub_id, message):
        kwargs = {"id": message["id"], "room": message["room"], "from": message["from"],
                  "ts": message["ts"]}
        return frames.text_frame(protocol.encode(
            [EVENT, sub_id, publication_id(message), {}, [message["text"]], kwargs]))

    def _bridged_room(self, r, topic):
        if r.name != self.bridge_realm or not topic.startswith(ROOM_TOPIC):
            return None
        room = topic[len(ROOM_TOPIC):]
        return room if protocol.valid_room(room) else None

    # -- dealer --------------------------------------------------------------------------

    def _register(self, session, msg):
        _, request, options, procedure = msg[:4]
        self._check_request(request, options)
        r = session.realm
        if options.get("match", "exact") != "exact":
            return self._error(session, REGISTER, request, "wamp.error.option_not_allowed",
                               ["only exact matching: the router has no pattern-based "
                                "registrations"])
        if not valid_uri(procedure) or procedure.startswith("wamp."):
            return self._error(session, REGISTER, request, "wamp.error.invalid_uri")
        if procedure in r.procedures:
            return self._error(session, REGISTER, request, "wamp.error.procedure_already_exists")
        if len(session.registrations) >= MAX_PER_SESSION:
            return self._error(session, REGISTER, request, LIMIT,
                               ["at most %d registrations per session" % MAX_PER_SESSION])
        reg_id = new_id()
        while reg_id in r.callees:
            reg_id = new_id()
        r.procedures[procedure] = reg_id
        r.callees[reg_id] = (procedure, session)
        session.registrations.add(reg_id)
        session.send([REGISTERED, request, reg_id])
        return True

    def _unregister_msg(self, session, msg):
        _, request, reg_id = msg[:3]
        self._check_request(request)
        if not _is_id(reg_id):
            raise Violation("registration ids are integers in [1, 2^53]")
        if reg_id not in session.registrations:
            return self._error(session, UNREGISTER, request, "wamp.error.no_such_registration")
        self._unregister(session.realm, session, reg_id)
        session.send([UNREGISTERED, request])
        return True

    def _unregister(self, r, session, reg_id):
        session.registrations.discard(reg_id)
        procedure, _ = r.callees.pop(reg_id, (None, None))
        r.procedures.pop(procedure, None)

    def _call(self, session, msg):
        _, request, options, procedure = msg[:4]
        self._check_request(request, options)
        args, kwargs = self._args(msg, 4)
        r = session.realm
        if not valid_uri(procedure):
            return self._error(session, CALL, request, "wamp.error.invalid_uri")
        reg_id = r.procedures.get(procedure)
        if reg_id is None:
            return self._error(session, CALL, request, "wamp.error.no_such_procedure",
                               ["no callee registered procedure '%s'" % procedure])
        if session.calls >= MAX_PER_SESSION:
            return self._error(session, CALL, request, LIMIT,
                               ["at most %d calls waiting per session" % MAX_PER_SESSION])
        _, callee = r.callees[reg_id]
        invocation = callee.request_id()
        r.calls[(callee.id, invocation)] = (session, request)
        session.waiting[request] = (callee.id, invocation)
        session.calls += 1
        callee.answers_due += 1
        callee.send([INVOCATION, invocation, reg_id, {}] + _payload(args, kwargs))
        return True

    def _yield(self, session, msg):
        _, invocation, options = msg[:3]
        self._check_request(invocation, options)
        args, kwargs = self._args(msg, 3)
        pending = self._end_call(session.realm, (session.id, invocation))
        if pending is not None:  # the caller may have left (or canceled) meanwhile
            caller, request = pending
            caller.send([RESULT, request, {}] + _payload(args, kwargs))
        return True

    def _error_msg(self, session, msg):
        _, kind, invocation, details, uri = msg[:5]
        if kind != INVOCATION:
            raise Violation("a client may send ERROR only for an INVOCATION")
        self._check_request(invocation, details)
        if not valid_uri(uri, limit=math.inf):
            raise Violation("ERROR needs an error URI")
        args, kwargs = self._args(msg, 5)
        pending = self._end_call(session.realm, (session.id, invocation))
        if pending is not None:
            caller, request = pending
            caller.send([ERROR, CALL, request, {}, uri] + _payload(args, kwargs))
        return True

    def _cancel(self, session, msg):
        """Call canceling (Advanced Profile): "skip" answers the caller at once; "killnowait"
        (without a mode) also sends the callee an INTERRUPT; "kill" sends the INTERRUPT and
        lets the callee's answer, whatever it is, go to the caller. A callee that did not
        announce call_canceling gets no INTERRUPT. A call answered already is let be."""
        _, request, options = msg[:3]
        self._check_request(request, options)
        mode = options.get("mode", "killnowait")
        if mode not in CANCEL_MODES:
            raise Violation("a CANCEL's mode is one of %s" % ", ".join(CANCEL_MODES))
        r = session.realm
        key = session.waiting.get(request)
        if key is None or key not in r.calls:
            return True
        callee = r.sessions.get(key[0])  # (None while it leaves: see leave)
        interrupt = mode != "skip" and callee is not None and callee.interruptible
        if interrupt:
            if key not in r.interrupted:  # (once: a kill leaves the call waiting)
                callee.send([INTERRUPT, key[1], {"mode": mode}])
            if mode == "kill":
                r.interrupted.add(key)
                return True
        self._end_call(r, key)
        session.send([ERROR, CALL, request, {}, "wamp.error.canceled", ["canceled by the caller"]])
        return True

    @staticmethod
    def _end_call(r, key):
        """Forget the call waiting for (callee id, invocation id); (caller, request id), or
        None if none was. Its callee's answer, if one comes, answers nothing."""
        pending = r.calls.pop(key, None)
        r.interrupted.discard(key)
        if pending is not None:
            caller, request = pending
            caller.calls -= 1
            if caller.waiting.get(request) == key:
                del caller.waiting[request]
            callee = r.sessions.get(key[0])
            if callee is not None:
                callee.answers_due -= 1
        return pending

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _check_request(request, options=None):
        if not _is_id(request):
            raise Violation("request ids are integers in [1, 2^53]")
        if options is not None and not isinstance(options, dict):
            raise Violation("options must be a dict")

    @staticmethod
    def _args(msg, at):
        args = msg[at] if len(msg) > at else []
        kwargs = msg[at + 1] if len(msg) > at + 1 else {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise Violation("Arguments must be a list and ArgumentsKw a dict")
        return args, kwargs

    @staticmethod
    def _error(session, kind, request, uri, args=None):
        session.send([ERROR, kind, request, {}, uri] + ([args] if args else []))
        return True

    _HANDLERS = {
        GOODBYE: _goodbye, SUBSCRIBE: _subscribe, UNSUBSCRIBE: _unsubscribe_msg,
        PUBLISH: _publish, REGISTER: _register, UNREGISTER: _unregister_msg, CALL: _call,
        CANCEL: _cancel, YIELD: _yield, ERROR: _error_msg,
    }
