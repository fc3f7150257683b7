"""Rooms: members, a per-room message sequence, and bounded history. Plain data, no I/O.

A room's ``epoch`` names one life of its sequence: ids restart when a room is created anew,
so a client that recovers with ``since`` must present the epoch it saw (see the protocol doc).
"""
import collections
import secrets
import sys

# What a stored message costs beside its text: the message dict, its sender dict, the id and
# the timestamp (measured with tracemalloc on CPython 3.11: about 520 bytes).
MESSAGE_OVERHEAD = 512


def message_cost(message):
    """The approximate bytes of memory one stored message holds."""
    return sys.getsizeof(message["text"]) + MESSAGE_OVERHEAD


class Room:
    """One room. Shape: members[client_id] = client; history = deque of message dicts, oldest
    first; refs[idempotency_key] = message (only for messages still in history); size = the
    ``message_cost`` of everything in history."""

    __slots__ = ("name", "epoch", "seq", "members", "history", "refs", "size")

    def __init__(self, name, history_size, epoch=None):
        self.name = name
        self.epoch = epoch or secrets.token_hex(8)
        self.seq = 0
        self.members = {}
        self.history = collections.deque(maxlen=history_size)
        self.refs = {}
        self.size = 0

    def __len__(self):
        return len(self.members)

    def add(self, client):
        self.members[client.id] = client

    def remove(self, client):
        self.members.pop(client.id, None)

    def find(self, ref):
        """The stored message that carried idempotency key ``ref``, or None."""
        return self.refs.get(ref)

    def append(self, sender, text, ts, ref=None):
        """Store a new message from ``sender`` ({id, nick}); returns the message dict.

        ``ref`` is remembered as an idempotency key for as long as the message stays in
        history; the caller decides what counts as a key.
        """
        self.seq += 1
        message = {"type": "message", "room": self.name, "id": self.seq,
                   "from": sender, "text": text, "ts": ts}
        if ref is not None:
            message["ref"] = ref
        if self.history.maxlen:
            if len(self.history) == self.history.maxlen:
                self.drop_oldest()
            self.history.append(message)
            self.size += message_cost(message)
            if ref is not None:
                self.refs[ref] = message
        return message

    def drop_oldest(self):
        """Forget the oldest message in history (and its ref); returns the bytes freed."""
        message = self.history.popleft()
        self.refs.pop(message.get("ref"), None)
        cost = message_cost(message)
        self.size -= cost
        return cost

    def recover(self, since, epoch):
        """(messages, recovered): every message after ``since`` when history still holds them all
        in this epoch, else the latest history and False."""
        if since is None or epoch != self.epoch or since > self.seq:
            return list(self.history), False
        oldest_held = self.history[0]["id"] if self.history else self.seq + 1
        if since + 1 < oldest_held:
            return list(self.history), False
        return [m for m in self.history if m["id"] > since], True
