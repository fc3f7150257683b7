"""The one client registry of this process: connections by id, local room membership, and
the fan-out of events to them.

Every change to who is connected and who is in which room goes through a method here. What
must hold across processes (ids, history, presence, the order of messages) is asked of the
backplane, which hands every event back through ``deliver``. A delivery encodes each frame
once per dialect and gives the same bytes to the room's group of that dialect at once (see
``Group``); nothing it does blocks (see ``transport``), so one slow client cannot hold up a
room.

A client, as the hub sees it, has: ``id``, ``nick``, ``dialect`` (PLAIN or JSON), ``rooms``
(a set of names), ``pending`` (a dict), ``send(frame_bytes)`` and ``resync()`` (reconnect to
catch up: messages were missed), and whatever the hub's group class needs of it (``Group``
here: nothing more; ``session.Group``: its socket, ``ws``).
"""
import logging
import re
import time

from . import frames, protocol
from .backplane import Unavailable
from .protocol import LOBBY, ProtocolError

PLAIN, JSON = "plain", "json"
ANSWER_HISTORY = 1 << 20  # characters of JSON, at least (see Hub.answer_history)

log = logging.getLogger(__name__)


def default_nick(client_id):
    return "Client %d" % client_id


# What default_nick makes, as protocol.nick_skeleton sees it (an l, i or 1 may pass for another).
_DEFAULT_NICK = re.compile(r"c[il1]{2}ent(\d+)", re.ASCII)


class Group:
    """The members of a room that take its frames alike: one dialect, no join being answered.

    The fan-out hands each frame to the group at once. This one calls each member's ``send``;
    chat.py gives the hub ``session.Group``, which writes their sockets in one pass.
    """

    def __init__(self):
        self._members = {}  # (a dict: in the order they came, for a predictable fan-out)

    def __len__(self):
        return len(self._members)

    def add(self, client):
        self._members[client] = None

    def discard(self, client):
        self._members.pop(client, None)

    def send(self, frame, skip=None):
        for client in tuple(self._members):
            if client is not skip:
                client.send(frame)


class Hub:
    """Shape: clients[id] = client; local[room][id] = client (members on this process);
    groups[room][dialect] = Group of the members with no client.pending[room], which is
    [(message id or None, frame)] while a join is being answered, then the answer's floor.
    """

    def __init__(self, settings, backplane, clock=time.time, group=Group):
        self.presence_limit = settings.presence_limit
        self.max_rooms = settings.max_rooms
        # What one welcome/joined answer carries of history, in characters of JSON: a
        # client that asks for it, again and again or from many connections, must not make
        # us build (and hold, if it does not read) a room's whole history each time; 100
        # messages of 64 KiB of control characters, escaped as \u0001, are 39 MB.
        self.answer_history = max(ANSWER_HISTORY, 8 * settings.max_message_size)
        self.max_message_size = settings.max_message_size
        self.backplane = backplane
        self.clients = {}
        self.local = {}
        self.groups = {}
        self._group = group
        self.followed = {}  # room -> how many non-member listeners (the WAMP bridge) follow it
        self._listeners = {}  # event kind -> handler, for kinds other dialects own
        self._message_hooks = []
        self._clock = clock

    def start(self):
        self.backplane.start(self.deliver, self.local_members)

    # -- connections ---------------------------------------------------------------------

    def register(self, client):
        """Give ``client`` an id and nick, put it in the lobby, tell the others, and send it
        the ``welcome`` (JSON clients). Raises Unavailable when no id can be had."""
        client.id = self.backplane.next_id()
        client.nick = default_nick(client.id)
        client.rooms = set()
        client.pending = {LOBBY: []}  # everything for it waits until the welcome is sent
        client.welcomed = False
        self.clients[client.id] = client
        try:
            self.backplane.online(_who(client))
            state = self._enter(client, LOBBY)
        except Unavailable:
            self.unregister(client)
            raise
        # max_message_size: a client can refuse what the server would close the connection
        # for (1009) before sending it.
        welcome = {"type": "welcome", "id": client.id, "nick": client.nick, "room": LOBBY,
                   "max_message_size": self.max_message_size}
        welcome.update(state)
        del welcome["recovered"]
        self._answer(client, LOBBY, welcome, history_floor(state["history"], None))
        client.welcomed = True

    def unregister(self, client):
        """Take ``client`` out of every room and the registry; tell the others. Local state
        goes first and for sure: the shared store may be unreachable meanwhile."""
        if self.clients.pop(getattr(client, "id", None), None) is None:
            return
        for name in list(client.rooms):
            try:
                self._exit(client, name)
            except Exception:  # noqa: BLE001 - it must still leave its other rooms
                log.exception("connection %s leaving room %s failed", client.id, name)
        try:
            self.backplane.offline(client.id)
        except Unavailable:
            pass  # its presence expires by itself

    def __len__(self):
        return len(self.clients)

    def connections(self):
        """A snapshot of the connected clients, safe to iterate while they come and go."""
        return tuple(self.clients.values())

    def local_members(self):
        """({room: [member]}, [every member]) on this process, for the backplane's refresh."""
        rooms = {name: [_who(c) for c in members.values()] for name, members in self.local.items()}
        return rooms, [_who(c) for c in self.clients.values()]

    def stats(self):
        return {"connections": len(self.clients), "rooms": len(self.local)}

    # -- other dialects ------------------------------------------------------------------

    def listen(self, kind, handler):
        """Route backplane events of ``kind`` to ``handler`` (the WAMP router's own events)."""
        self._listeners[kind] = handler

    def on_message(self, hook):
        """Call ``hook(message)`` for every chat message delivered to this process."""
        self._message_hooks.append(hook)

    def follow(self, room):
        """Receive ``room``'s messages on this process without being a member of it."""
        first = not self.followed.get(room) and room not in self.local
        # Counted before watch() yields, so that a leave meanwhile keeps the subscription.
        self.followed[room] = self.followed.get(room, 0) + 1
        if first:
            try:
                self.backplane.watch(room)
            except Unavailable:
                self.unfollow(room)
                raise

    def unfollow(self, room):
        left = self.followed.get(room, 0) - 1
        if left > 0:
            self.followed[room] = left
            return
        self.followed.pop(room, None)
        if room not in self.local:
            self.backplane.unwatch(room)

    def post_as(self, who, room, text):
        """Store and relay a chat message from a non-member (``who`` = {id, nick}); returns
        the message. Raises ProtocolError for bad text or when the store is unreachable."""
        if not isinstance(text, str) or not text.strip() or protocol.has_surrogate(text):
            raise ProtocolError("bad_request", "the first argument must be the message text")
        try:
            message, _fresh = self.backplane.post(room, who, text, self._clock())
        except Unavailable:
            raise _unavailable("the message was not stored") from None
        return message

    # -- requests ------------------------------------------------------------------------

    def join(self, client, name, since=None, epoch=None, ref=None):
        """Put ``client`` in room ``name`` (again is fine) and send it ``joined``, with what
        it missed when ``since``/``epoch`` allow recovery."""
        if name not in client.rooms and len(client.rooms) >= self.max_rooms:
            raise ProtocolError("too_many_rooms", "a connection may be in at most %d rooms"
                                % self.max_rooms)
        try:
            state = self._enter(client, name, since, epoch)
        except Unavailable:
            raise _unavailable("joining") from None
        answer = {"type": "joined", "room": name, **state}
        if ref is not None:
            answer["ref"] = ref
        last = history_floor(state["history"], since if state["recovered"] else None)
        self._answer(client, name, answer, last)

    def leave(self, client, name):
        self._check_member(client, name)
        self._exit(client, name)
        return {"type": "left", "room": name}

    def say(self, client, name, text, ref=None):
        """Store and relay ``text`` from ``client`` in room ``name``; returns the ``ack``
        (None for plain-text clients).

        A string ``ref`` of 8-64 characters is an idempotency key: when the room's history
        still holds a message with it, nothing is stored or relayed and the original ack is
        returned. The key is the room's, not the sender's (a resend comes from a new
        connection), so a message with another text under a known key is refused, not
        lost with an ack.
        """
        self._check_member(client, name)
        key = ref if protocol.is_idempotency_key(ref) else None
        try:
            message, fresh = self.backplane.post(name, _who(client), text, self._clock(), key)
        except Unavailable:
            if client.dialect == PLAIN:
                # No id without the store, so JSON clients cannot be told; plain ones can.
                self.deliver({"k": "plain", "room": name, "from": client.id,
                              "text": 'Client %d says "%s"' % (client.id, text)})
                return None
            raise _unavailable("the message was not stored") from None
        if client.dialect == PLAIN:
            return None
        if not fresh and message["text"] != text:
            raise ProtocolError("bad_request", "this ref already names another message in %s: "
                                "give each message a unique ref (a UUID, say)" % name, ref)
        return {"type": "ack", "ref": ref, "room": name, "id": message["id"], "ts": message["ts"]}

    def rename(self, client, nick):
        """Change ``client``'s nick (already validated); returns the answer for it."""
        default = _DEFAULT_NICK.fullmatch(protocol.nick_skeleton(nick))
        if default and int(default.group(1)) != client.id:
            # Connection n goes by that name until it picks one, and the log still shows it
            # under that name once it is gone: no passing for it, then or later.
            raise ProtocolError("bad_request", "%s is another connection's default name, kept "
                                "for it (connected, gone or yet to come): choose another" % nick)
        if nick == client.nick:
            return {"type": "nick", "id": client.id, "nick": nick}  # nothing to announce
        client.nick = nick
        try:
            self.backplane.rename(client.rooms, _who(client))
        except Unavailable:
            pass  # refreshed into the store when it is back
        for name in client.rooms:
            self._announce(name, "nick", client)
        return {"type": "nick", "id": client.id, "nick": nick}

    def direct(self, client, to, text):
        """Send a private message to connection ``to``."""
        event = {"k": "direct", "to": to, "from": _who(client), "text": text, "ts": self._clock()}
        try:
            found = self.backplane.direct(to, event)
        except Unavailable:
            raise _unavailable("the message was not sent") from None
        if not found:
            raise ProtocolError("no_such_client", "no connection with id %d" % to)

    def typing(self, client, name):
        self._check_member(client, name)
        event = {"k": "typing", "room": name, "from": _who(client)}
        try:
            self.backplane.publish(name, event)
        except Unavailable:
            pass

    # -- deliveries ----------------------------------------------------------------------

    def deliver(self, event):
        """Hand one event from the backplane to the local clients it concerns. Never blocks."""
        kind = event.get("k")
        if kind == "msg":
            message = event["message"]
            room = message["room"]
            plain = 'Client %d says "%s"' % (message["from"]["id"], message["text"]) \
                if room == LOBBY else None
            self._fanout(room, message, plain, message["from"]["id"], message["id"])
            for hook in self._message_hooks:
                hook(message)
        elif kind == "presence":
            room, member = event["room"], event["member"]
            plain = None
            if room == LOBBY and event["event"] != "nick":
                plain = "Client %d %s." % (member["id"], "connected" if event["event"] == "join"
                                           else "disconnected")
            out = {"type": "presence", "room": room, "event": event["event"], "member": member}
            self._fanout(room, out, plain, member["id"])
        elif kind == "typing":
            out = {"type": "typing", "room": event["room"], "from": event["from"]}
            self._fanout(event["room"], out, None, event["from"]["id"])
        elif kind == "direct":
            target = self.clients.get(event["to"])
            if target is None:
                return
            if target.dialect == JSON:
                body = protocol.encode({"type": "direct", "from": event["from"],
                                        "text": event["text"], "ts": event["ts"]})
            else:
                body = 'Client %d whispers "%s"' % (event["from"]["id"], event["text"])
            held = target.pending.get(LOBBY)
            if held.__class__ is list and not target.welcomed:
                held.append((None, frames.text_frame(body)))  # after the welcome
            else:
                target.send(frames.text_frame(body))
        elif kind == "plain":
            self._fanout(event["room"], None, event["text"], event["from"])
        elif kind == "gap":
            self._resync(event["room"])
        elif kind in self._listeners:
            self._listeners[kind](event)
        else:
            log.warning("dropped an event of unknown kind %r", kind)

    def _fanout(self, room, message, plain, exclude_id, msg_id=None):
        """Give ``message`` (a dict, to JSON clients) and ``plain`` (a str, to plain-text
        clients) to every local member of ``room`` but ``exclude_id``; each frame is encoded
        once."""
        members = self.local.get(room)
        if not members:
            return
        groups = self.groups[room]
        sender = members.get(exclude_id)  # (a leaving client is no longer in self.clients)
        json_frame = plain_frame = None
        if message is not None and groups[JSON]:
            json_frame = frames.text_frame(protocol.encode(message))
            groups[JSON].send(json_frame, sender)
        if plain is not None and groups[PLAIN]:
            plain_frame = frames.text_frame(plain)
            groups[PLAIN].send(plain_frame, sender)
        if len(groups[JSON]) + len(groups[PLAIN]) == len(members):
            return
        # The others' joins are being answered, or were just now (a floor).
        for member in tuple(members.values()):
            held = member.pending.get(room)
            if held is None or member.id == exclude_id:
                continue  # (in a group: it has the frame)
            if member.dialect == JSON:
                if message is None:
                    continue
                if json_frame is None:
                    json_frame = frames.text_frame(protocol.encode(message))
                frame = json_frame
            else:
                if plain is None:
                    continue
                if plain_frame is None:
                    plain_frame = frames.text_frame(plain)
                frame = plain_frame
            if held.__class__ is list:  # its join is being answered: hold the frame
                held.append((msg_id, frame))
                continue
            if msg_id is not None:  # a floor: skip what its answer already held
                if msg_id <= held:
                    continue
                del member.pending[room]  # later ids only from here on
                self._ready(member, room)
            member.send(frame)

    def _resync(self, room):
        """Messages of ``room`` were missed (the shared store was unreachable, or lost its
        data): JSON members are asked to reconnect, which catches them up with since/epoch
        (or starts them afresh in a new epoch); plain members' floors go, since ids may
        have started again."""
        resynced = 0
        for member in tuple(self.local.get(room, {}).values()):
            held = member.pending.get(room)
            if held is not None and held.__class__ is not list:
                del member.pending[room]
                self._ready(member, room)
            if member.dialect == JSON:
                member.resync()
                resynced += 1
        if resynced:
            log.warning("room %s: %d JSON clients asked to reconnect to catch up", room, resynced)

    # -- inside --------------------------------------------------------------------------

    def _check_member(self, client, name):
        if name not in client.rooms:
            raise ProtocolError("not_in_room", "you are not in room %r; join it first" % name)

    def _enter(self, client, name, since=None, epoch=None):
        """Make ``client`` a member of ``name`` and gather the room's state for the answer.

        Events for the room that arrive while the state is read (the backplane may yield)
        wait in ``client.pending`` until ``_answer`` has sent it.
        """
        new = name not in client.rooms
        floor = client.pending.get(name)
        if floor.__class__ is not list:
            client.pending[name] = []
            self._unready(client, name)
        entered = False
        try:
            if new:
                # A member before anything yields: a leave of the room's last other member
                # meanwhile must not unsubscribe the room from under this join.
                if name not in self.local:
                    self.local[name] = {}
                    self.groups[name] = {JSON: self._group(), PLAIN: self._group()}
                self.local[name][client.id] = client
                client.rooms.add(name)
                self.backplane.watch(name)
                size = self.backplane.enter(name, _who(client))
                entered = True
                if size <= self.presence_limit:
                    self._publish_presence(name, "join", client)
            members, count = self.backplane.members(name, self.presence_limit)
            history, room_epoch, recovered = self.backplane.history(
                name, since, epoch, budget=self.answer_history)
            history, complete = newest_within(history, self.answer_history)
            recovered = recovered and complete  # the client must learn that some are missing
        except Unavailable:
            held = client.pending.pop(name, None)
            if new:
                self._exit(client, name, announce=entered)
            elif name in client.rooms:
                # Still a member: what arrived meanwhile is delivered, not dropped (but not
                # what its last answer held already: the floor).
                last = floor if floor.__class__ is int else 0
                for msg_id, frame in held or ():
                    if msg_id is None or msg_id > last:
                        client.send(frame)
                if floor.__class__ is int:
                    client.pending[name] = floor
                elif name not in client.pending:
                    self._ready(client, name)
            raise
        return {"members": members, "member_count": count, "history": history,
                "epoch": room_epoch, "recovered": recovered}

    def _answer(self, client, name, answer, last):
        """Send a welcome/joined answer, then what arrived for the room meanwhile that the
        answer's history does not already hold (ids above ``last``).

        ``last`` stays behind as the room's floor: with Redis, a message already in the
        history may still be on its way through pub/sub, and must not be sent twice.
        """
        if client.dialect == JSON:
            client.send(frames.text_frame(protocol.encode(answer)))
        for msg_id, frame in client.pending.pop(name, ()):
            if msg_id is None or msg_id > last:
                client.send(frame)
        if last and name in client.rooms:
            client.pending[name] = last
        else:
            self._ready(client, name)

    def _exit(self, client, name, announce=True):
        members = self.local.get(name, {})
        members.pop(client.id, None)
        client.rooms.discard(name)
        client.pending.pop(name, None)
        self._unready(client, name)
        try:
            # (No nick for a join undone: should Redis hear of it later, nobody is told.)
            size = self.backplane.exit(name, client.id, client.nick if announce else None)
        except Unavailable:
            size = len(members)
        # Notices stop above the limit: a room that had limit+1 members was unannounced. (None:
        # the leave was told already, by a process that pruned it while ours stalled.)
        if announce and size is not None and size < self.presence_limit:
            self._publish_presence(name, "leave", client)
        if not self.local.get(name):  # as it is now: others may have come or gone meanwhile
            self.local.pop(name, None)
            self.groups.pop(name, None)
            if not self.followed.get(name):
                self.backplane.unwatch(name)

    def _ready(self, client, name):
        """Nothing of room ``name`` waits for ``client`` any more: it takes the room's
        frames with its group (if it is still a member)."""
        if name in client.rooms and name not in client.pending:
            groups = self.groups.get(name)
            if groups is not None:
                groups[client.dialect].add(client)

    def _unready(self, client, name):
        groups = self.groups.get(name)
        if groups is not None:
            groups[client.dialect].discard(client)

    def _announce(self, name, event, client):
        members, count = self._members_quietly(name)
        if count <= self.presence_limit:
            self._publish_presence(name, event, client)

    def _members_quietly(self, name):
        try:
            return self.backplane.members(name, 0)
        except Unavailable:
            return [], len(self.local.get(name, {}))

    def _publish_presence(self, name, event, client):
        self.backplane.publish(name, {"k": "presence", "room": name, "event": event,
                                      "member": _who(client)})


def newest_within(history, budget):
    """(the newest messages of ``history`` whose JSON fits in ``budget`` characters, oldest
    first; whether that is all of them). Encodes at most ``budget`` characters and one
    message more."""
    total = 0
    for i in range(len(history) - 1, -1, -1):
        total += len(protocol.encode(history[i]))
        if total > budget:
            return history[i + 1:], False
    return history, True


def history_floor(history, since):
    """The highest message id a welcome/joined answer covers."""
    if history:
        return history[-1]["id"]
    return since or 0


def _who(client):
    return {"id": client.id, "nick": client.nick}


def _unavailable(what):
    return ProtocolError("unavailable", "%s: the shared store is unreachable; try again later" % what)
