"""The one client registry: connections by id, rooms by name, and fan-out between them.

Every change to who is connected, who is in which room and what was said goes through a
method here. A broadcast encodes each frame once per dialect and hands the same bytes to
every recipient's ``send``, which never blocks (see ``transport``), so one slow client
cannot hold up a room.

A client, as the hub sees it, has: ``id``, ``nick``, ``dialect`` (PLAIN or JSON), ``rooms``
(a set of names) and ``send(frame_bytes)``; ``register`` sets ``id`` and ``nick``.
"""
import itertools
import logging
import time

from . import frames, protocol
from .protocol import LOBBY, ProtocolError
from .rooms import Room

PLAIN, JSON = "plain", "json"
EMPTY_ROOMS_KEPT = 10000  # empty rooms whose history is kept for people who come back

log = logging.getLogger(__name__)


def default_nick(client_id):
    return "Client %d" % client_id


class Hub:
    """Shape: clients[id] = client; rooms[name].members[id] = client; client.rooms = {name}."""

    def __init__(self, settings, clock=time.time):
        self.history_size = settings.history_size
        self.presence_limit = settings.presence_limit
        self.max_rooms = settings.max_rooms
        self.clients = {}
        self.rooms = {}
        self._ids = itertools.count(1)
        self._clock = clock

    # -- connections ---------------------------------------------------------------------

    def register(self, client):
        """Give ``client`` an id and nick, put it in the lobby, tell the others; returns the
        ``welcome`` message for it."""
        client.id = next(self._ids)
        client.nick = default_nick(client.id)
        client.rooms = set()
        self.clients[client.id] = client
        room = self._enter(client, LOBBY)
        return {"type": "welcome", "id": client.id, "nick": client.nick, "room": LOBBY,
                **self._room_state(room)}

    def unregister(self, client):
        """Take ``client`` out of every room and the registry; tell the others."""
        if self.clients.pop(getattr(client, "id", None), None) is None:
            return
        for name in list(client.rooms):
            self._exit(client, name)

    def __len__(self):
        return len(self.clients)

    def connections(self):
        """A snapshot of the connected clients, safe to iterate while they come and go."""
        return tuple(self.clients.values())

    def stats(self):
        return {"connections": len(self.clients),
                "rooms": sum(1 for r in self.rooms.values() if r.members)}

    # -- requests ------------------------------------------------------------------------

    def join(self, client, name, since=None, epoch=None):
        """Put ``client`` in room ``name`` (again is fine); returns the ``joined`` answer,
        with what it missed when ``since``/``epoch`` allow recovery."""
        if name not in client.rooms:
            if len(client.rooms) >= self.max_rooms:
                raise ProtocolError("too_many_rooms", "a connection may be in at most %d rooms"
                                    % self.max_rooms)
            room = self._enter(client, name)
        else:
            room = self.rooms[name]
        history, recovered = room.recover(since, epoch)
        state = self._room_state(room)
        state["history"] = history
        return {"type": "joined", "room": name, **state, "recovered": recovered}

    def leave(self, client, name):
        self._member_room(client, name)
        self._exit(client, name)
        return {"type": "left", "room": name}

    def say(self, client, name, text, ref=None):
        """Store and relay ``text`` from ``client`` in room ``name``; returns the ``ack``.

        A string ``ref`` of 8-64 characters is an idempotency key: when the room's history
        still holds a message with it, nothing is stored or relayed and the original ack is
        returned.
        """
        room = self._member_room(client, name)
        key = ref if protocol.is_idempotency_key(ref) else None
        if key is not None:
            earlier = room.find(key)
            if earlier is not None:
                return _ack(ref, earlier)
        message = room.append(_who(client), text, self._clock(), key)
        plain = 'Client %d says "%s"' % (client.id, text) if name == LOBBY else None
        self._broadcast(room, message, plain, exclude=client)
        return _ack(ref, message)

    def rename(self, client, nick):
        """Change ``client``'s nick (already validated); returns the answer for it."""
        client.nick = nick
        for name in client.rooms:
            room = self.rooms[name]
            if len(room) <= self.presence_limit:
                self._broadcast(room, _presence(name, "nick", client), None, exclude=client)
        return {"type": "nick", "id": client.id, "nick": nick}

    def direct(self, client, to, text):
        """Send a private message to connection ``to``."""
        target = self.clients.get(to)
        if target is None:
            raise ProtocolError("no_such_client", "no connection with id %d" % to)
        if target.dialect == JSON:
            body = protocol.encode({"type": "direct", "from": _who(client), "text": text,
                                    "ts": self._clock()})
        else:
            body = 'Client %d whispers "%s"' % (client.id, text)
        target.send(frames.text_frame(body))

    def typing(self, client, name):
        room = self._member_room(client, name)
        self._broadcast(room, {"type": "typing", "room": name, "from": _who(client)}, None,
                        exclude=client)

    # -- inside --------------------------------------------------------------------------

    def _member_room(self, client, name):
        if name not in client.rooms:
            raise ProtocolError("not_in_room", "you are not in room %r; join it first" % name)
        return self.rooms[name]

    def _room_state(self, room):
        members = room.members.values()
        if len(room) > self.presence_limit:
            members = itertools.islice(members, self.presence_limit)
        return {"members": [_who(c) for c in members], "member_count": len(room),
                "history": list(room.history), "epoch": room.epoch}

    def _enter(self, client, name):
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.history_size)
        room.add(client)
        client.rooms.add(name)
        if len(room) <= self.presence_limit:
            plain = "Client %d connected." % client.id if name == LOBBY else None
            self._broadcast(room, _presence(name, "join", client), plain, exclude=client)
        return room

    def _exit(self, client, name):
        room = self.rooms[name]
        room.remove(client)
        client.rooms.discard(name)
        # Notices stop above the limit; at exactly limit+1 -> limit the leaver was unannounced.
        if len(room) < self.presence_limit:
            plain = "Client %d disconnected." % client.id if name == LOBBY else None
            self._broadcast(room, _presence(name, "leave", client), plain)
        if not room.members and (not room.history or len(self.rooms) > EMPTY_ROOMS_KEPT):
            del self.rooms[name]

    def _broadcast(self, room, message, plain, exclude=None):
        """Hand ``message`` (a dict, to JSON clients) and ``plain`` (a str, to plain-text
        clients) to every member but ``exclude``; each frame is encoded once."""
        json_frame = plain_frame = None
        for member in tuple(room.members.values()):
            if member is exclude:
                continue
            if member.dialect == JSON:
                if json_frame is None:
                    json_frame = frames.text_frame(protocol.encode(message))
                member.send(json_frame)
            elif plain is not None:
                if plain_frame is None:
                    plain_frame = frames.text_frame(plain)
                member.send(plain_frame)


def _who(client):
    return {"id": client.id, "nick": client.nick}


def _presence(room, event, client):
    return {"type": "presence", "room": room, "event": event, "member": _who(client)}


def _ack(ref, message):
    return {"type": "ack", "ref": ref, "room": message["room"], "id": message["id"],
            "ts": message["ts"]}
