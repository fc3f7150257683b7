"""Rooms: members, a per-room message sequence, and bounded history. Plain data, no I/O.

A room's ``epoch`` names one life of its sequence: ids restart when a room is created anew,
so a client that recovers with ``since`` must present the epoch it saw (see the protocol doc).
"""
import collections
import secrets


class Room:
    """One room. Shape: members[client_id] = client; history = deque of message dicts, oldest
    first; refs[idempotency_key] = message (only for messages still in history)."""

    __slots__ = ("name", "epoch", "seq", "members", "history", "refs")

    def __init__(self, name, history_size, epoch=None):
        self.name = name
        self.epoch = epoch or secrets.token_hex(8)
        self.seq = 0
        self.members = {}
        self.history = collections.deque(maxlen=history_size)
        self.refs = {}

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
                self.refs.pop(self.history[0].get("ref"), None)
            self.history.append(message)
            if ref is not None:
                self.refs[ref] = message
        return message

    def recover(self, since, epoch):
        """(messages, recovered): every message after ``since`` when history still holds them all
        in this epoch, else the latest history and False."""
        if since is None or epoch != self.epoch or since > self.seq:
            return list(self.history), False
        oldest_held = self.history[0]["id"] if self.history else self.seq + 1
        if since + 1 < oldest_held:
            return list(self.history), False
        return [m for m in self.history if m["id"] > since], True
