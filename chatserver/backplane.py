"""How processes share messages and state: in this process, or through one Redis.

The hub asks a backplane for everything that must hold across processes: connection ids,
the per-room message sequence and history, presence, and the fan-out of events. Events come
back to every process's hub through ``deliver``, the callback given to ``start``; the hub
then hands them to its local members. ``LocalBackplane`` (the default) keeps it all in
memory; ``RedisBackplane`` (with ``REDIS_URL``) keeps it in Redis, where a Lua script stores
each message and publishes it in one step, so every process sees one order per room.

Events are dicts with a kind ``k``: ``msg`` (a stored message), ``presence``, ``typing``,
``direct`` (to one connection id), ``plain`` (text for plain-text clients only).
"""
import collections
import heapq
import itertools
import json
import logging
import random
import secrets
import time

import gevent
import gevent.event
import gevent.lock
import redis

from .rooms import Room

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The shared store cannot be reached; the operation did not happen."""


class LocalBackplane:
    """One process, nothing to install: rooms from ``rooms.py``, events delivered at once."""

    name = "local"

    def __init__(self, history_size, history_bytes):
        self.history_size = history_size
        self.history_bytes = history_bytes  # the budget of all rooms' history together
        self._held = 0  # what their history holds now (``rooms.message_cost``)
        # A heap of (-size, name): each room with history at its current size, so the one
        # that holds the most is found at once; entries for older sizes are skipped. Kept
        # from the first time history reaches the budget (most servers never pay for it).
        self._largest = []
        self._budget_met = False
        self._ids = itertools.count(1)
        self._rooms = collections.OrderedDict()  # name -> Room, least recently used first
        self._presence = {}  # name -> {id: {id, nick}}
        self._online = set()
        self._deliver = None

    def start(self, deliver, local_members=None):
        self._deliver = deliver

    def stop(self):
        pass

    def health(self):
        return {"backplane": self.name, "history_bytes": self._held}

    def next_id(self):
        return next(self._ids)

    def online(self, member):
        self._online.add(member["id"])

    def offline(self, member_id):
        self._online.discard(member_id)

    def watch(self, room):
        pass

    def unwatch(self, room):
        pass

    def enter(self, room, member):
        """Add ``member`` to the room's presence; returns the room's size."""
        members = self._presence.setdefault(room, {})
        members[member["id"]] = member
        return len(members)

    def exit(self, room, member_id, nick=None):
        """Remove a member from the room's presence; returns the room's size. (``nick``: for
        a leave notice, should it have to be given later.)"""
        members = self._presence.get(room, {})
        members.pop(member_id, None)
        if not members:
            self._presence.pop(room, None)
            self._forget_if_idle(room)
        return len(members)

    def rename(self, rooms, member):
        for room in rooms:
            if member["id"] in self._presence.get(room, {}):
                self._presence[room][member["id"]] = member

    def members(self, room, limit):
        """(up to ``limit`` members, the room's true size)."""
        members = self._presence.get(room, {})
        return list(itertools.islice(members.values(), limit)), len(members)

    def history(self, room, since=None, epoch=None, budget=None):
        """(messages, epoch, recovered): see ``Room.recover``. All of them, whatever the
        ``budget``: they are in memory already."""
        r = self._room(room)
        messages, recovered = r.recover(since, epoch)
        return messages, r.epoch, recovered

    def post(self, room, sender, text, ts, ref=None):
        """Store and publish a message; (message, fresh). A known ``ref`` returns the stored
        message with fresh False and publishes nothing."""
        r = self._room(room)
        if ref is not None:
            earlier = r.find(ref)
            if earlier is not None:
                return earlier, False
        held = r.size
        message = r.append(sender, text, ts, ref)
        self._held += r.size - held
        if self._budget_met:
            self._note_size(r)
        if self._held > self.history_bytes:
            self._trim(r)
        self._deliver({"k": "msg", "message": message})
        return message, True

    def publish(self, room, event):
        self._deliver(event)

    def publish_all(self, event):
        """An event for every process, whatever rooms it watches."""
        self._deliver(event)

    def direct(self, to, event):
        """Deliver ``event`` to connection ``to``; False when no such connection exists."""
        if to not in self._online:
            return False
        self._deliver(event)
        return True

    def _room(self, name):
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, self.history_size)
            self._evict()
        else:
            self._rooms.move_to_end(name)
        return room

    def _forget_if_idle(self, name):
        room = self._rooms.get(name)
        if room is not None and not room.history:
            del self._rooms[name]

    def _evict(self):
        """Empty rooms keep their history for people who come back, up to a bound: the
        least recently used go first (WAMP publishers can create rooms nobody joins)."""
        excess = len(self._rooms) - len(self._presence) - EMPTY_ROOMS_KEPT
        if excess <= 0:
            return
        for name in [n for n in self._rooms if n not in self._presence][:excess]:
            self._held -= self._rooms.pop(name).size

    def _trim(self, newest):
        """Forget the oldest messages of the rooms that hold the most until all history fits
        in HISTORY_BYTES.

        HISTORY_SIZE messages of the largest size in every room would not fit in memory. The
        biggest rooms go first, so large messages posted to some rooms, a flood say, do not
        erase the history (and the idempotency keys) of rooms of ordinary chat. The message
        just stored in ``newest`` always stays.
        """
        if not self._budget_met:
            self._budget_met = True
            log.info("history reached HISTORY_BYTES (%d bytes): the oldest messages of the "
                     "rooms that hold the most are forgotten from now on", self.history_bytes)
            self._rebuild()
        spared = None
        while self._held > self.history_bytes and self._largest:
            entry = heapq.heappop(self._largest)
            room = self._rooms.get(entry[1])
            if room is None or room.size != -entry[0] or not room.history:
                continue  # the room shrank or grew since, or is gone
            if room is newest and len(room.history) == 1:
                spared = entry
                continue
            self._held -= room.drop_oldest()
            self._note_size(room)
        if spared is not None:
            heapq.heappush(self._largest, spared)

    def _note_size(self, room):
        if room.history:
            heapq.heappush(self._largest, (-room.size, room.name))
        if len(self._largest) > 2 * len(self._rooms) + 64:
            self._rebuild()  # entries for older sizes pile up

    def _rebuild(self):
        self._largest = [(-r.size, n) for n, r in self._rooms.items() if r.history]
        heapq.heapify(self._largest)


EMPTY_ROOMS_KEPT = 1000


# -- Redis --------------------------------------------------------------------------------

ROOM_TTL = 7 * 24 * 3600  # a room nobody wrote to for this long is forgotten (its keys expire)
SUBSCRIBE_WAIT = 3.0  # seconds to wait for Redis to confirm a subscription
GAP_SETTLE = 0.5  # seconds for messages already published to arrive, before counting a gap
UNFINISHED_MAX = 100000  # leaves during an outage told to Redis once it is back
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0  # reconnect delays, doubled with jitter up to the cap

# KEYS: seq, stream, epoch, refs. ARGV: channel, new epoch, history size, sender json, text,
# ts, ref ('' for none), room, origin, seconds to keep an idle room, deadline (ms, Redis's
# clock). Increment, append (capped) and publish in one step: every process sees one order
# per room. Nothing after the deadline: by then the process has told the sender that the
# message was not stored (a hung Redis runs the command once it goes on).
POST = """
redis.replicate_commands()  -- (Redis < 7: TIME, then writes)
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[11]) then
  return {-1, 0, {}}
end
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
end
local ref = ARGV[7]
if ref ~= '' then
  local seen = redis.call('ZSCORE', KEYS[4], ref)
  if seen then
    local found = redis.call('XRANGE', KEYS[2], seen .. '-0', seen .. '-0')
    if #found > 0 then
      return {0, tonumber(seen), found[1][2]}
    end
  end
end
local id = redis.call('INCR', KEYS[1])
if id == 1 and redis.call('EXISTS', KEYS[2]) == 1 then
  -- The sequence alone went (evicted under maxmemory): go on from the stream's last id.
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      id = tonumber(string.match(info[i + 1], '^%d+')) + 1
      redis.call('SET', KEYS[1], id)
    end
  end
end
local size = tonumber(ARGV[3])
local fields = {'from', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6], 'ref', ref}
redis.call('XADD', KEYS[2], 'MAXLEN', size, id .. '-0', unpack(fields))
if ref ~= '' then
  redis.call('ZADD', KEYS[4], id, ref)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', id - size)
end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[10]) end
redis.call('PUBLISH', ARGV[1], cjson.encode({k = 'msg', o = ARGV[9], room = ARGV[8], id = id,
  epoch = epoch, from = ARGV[4], text = ARGV[5], ts = ARGV[6], ref = ref}))
return {1, id, fields}
"""

# KEYS: seq, stream, epoch. ARGV: history size, since ('' for none), epoch ('' for none),
# budget (characters). Reads the sequence, epoch and entries together so they agree; returns
# the epoch, whether the entries are all those after since, the entries (newest first) and
# the sequence. Entries stop at the first whose texts and the newer ones' hold more than
# the budget's characters (non-continuation bytes of UTF-8): the answer keeps fewer anyway
# (it counts their JSON, at least as long), and a join need not fetch, nor the process
# parse, a whole history of big messages.
HISTORY = """
local function newest(key, oldest, count, budget)
  local out, total, upto = {}, 0, '+'
  while #out < count do
    local page = redis.call('XREVRANGE', key, upto, oldest, 'COUNT', math.min(100, count - #out))
    if #page == 0 then
      break
    end
    for _, entry in ipairs(page) do
      out[#out + 1] = entry
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'text' then
          local text = fields[i + 1]  -- its characters: bytes that do not continue one
          total = total + #text - select(2, string.gsub(text, '[\\128-\\191]', ''))
        end
      end
      if total > budget then
        return out
      end
    end
    upto = (tonumber(string.match(page[#page][1], '^%d+')) - 1) .. '-0'  -- (ids are N-0)
  end
  return out
end
local epoch = redis.call('GET', KEYS[3]) or ''
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local size = tonumber(ARGV[1])
local budget = tonumber(ARGV[4])
if ARGV[2] ~= '' and ARGV[3] == epoch and epoch ~= '' then
  local since = tonumber(ARGV[2])
  if since == seq then
    return {epoch, 1, {}, seq}
  end
  local after = (since + 1) .. '-0'
  if since < seq and #redis.call('XRANGE', KEYS[2], after, after) > 0 then
    return {epoch, 1, newest(KEYS[2], after, seq - since, budget), seq}
  end
end
return {epoch, 0, newest(KEYS[2], '-', size, budget), seq}
"""

# KEYS: presence zset, info hash, pruned set. ARGV: now (ms), seconds to remember the pruned,
# batch size. Drops up to a batch of the members whose process stopped refreshing them (Lua's
# unpack takes a few thousand values at most); returns their info so their departure can be
# announced.
PRUNE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local infos = {}
if #gone > 0 then
  infos = redis.call('HMGET', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('SADD', KEYS[3], unpack(gone))
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return infos
"""
PRUNE_BATCH = 1000

# KEYS: a room's presence, members, pruned. ARGV: expiry time (ms), then id, info pairs of
# this process's members. Refreshes them, but for those pruned meanwhile (a process that
# stalled longer than PRESENCE_TTL): their ids are returned, for RETURN if still here.
ANNOUNCE = """
local back = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], id) and redis.call('SISMEMBER', KEYS[3], id) == 1 then
    back[#back + 1] = id
  else
    redis.call('ZADD', KEYS[1], ARGV[1], id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 1])
  end
end
return back
"""

# KEYS: a room's presence, members, pruned. ARGV: expiry (ms), id, info, channel, the join
# event, presence limit. A pruned member back: listed again and its join published, in one
# step with taking it off the pruned set. Whoever takes it off tells: this, or its leave
# (exit) or join (enter) if either came first; so the others hear join and leave in order.
RETURN = """
if redis.call('SREM', KEYS[3], ARGV[2]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if redis.call('ZCARD', KEYS[1]) <= tonumber(ARGV[6]) then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""
_NOTHING = object()
REDIS_CONNECTIONS = 100  # per process, besides the pub/sub one
COMMAND_TIMEOUT = 3.0  # seconds: a command that takes longer finds Redis hung (unavailable)
# A message posted is stored only if Redis runs the script this soon after it was sent: its
# answer then has the rest of COMMAND_TIMEOUT to arrive, before the sender is told it was not.
POST_DEADLINE = COMMAND_TIMEOUT - 0.5
POOL_WAIT = 10.0  # seconds a request may wait for one of them
PRUNED_TTL = 24 * 3600  # how long a pruned member is remembered, to announce it if it is back


# KEYS: ids. ARGV: the highest id in use on this process. After Redis lost its data, new ids
# must not repeat ones that live connections still hold.
RAISE_IDS = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
"""


class _Hung(BaseException):
    """Raised in the listener when a call found Redis hung (see RedisBackplane._call): a
    BaseException, so that no boundary on the way (one event's, say) takes it for its own."""


def _keys(room):
    base = "chat:room:" + room
    return {"seq": base + ":seq", "stream": base + ":history", "epoch": base + ":epoch",
            "refs": base + ":refs", "presence": base + ":presence", "info": base + ":members",
            "pruned": base + ":pruned", "channel": base}


CONTROL = "chat:control"
CLIENTS = "chat:clients"  # connection id -> when its presence expires (ms)
CLIENT_AT = "chat:clients:at"  # connection id -> the origin of the process that holds it
INBOX = "chat:process:"  # + origin: the channel of one process, for direct messages
IDS = "chat:ids"

# KEYS: clients, clients' processes. ARGV: now (ms), batch size. Forgets connections whose
# presence expired (their process died), a batch at a time (Lua's unpack has a limit).
FORGET_CLIENTS = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return #gone
"""

# KEYS: clients, clients' processes. ARGV: a cursor, how many to look at. Drops the records
# of connections no longer listed that FORGET_CLIENTS did not see go (a process of an older
# version pruned them); returns the cursor to go on from, "0" after a whole pass.
SWEEP_CLIENTS = """
local page = redis.call('HSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
local gone = {}
for i = 1, #page[2], 2 do
  if not redis.call('ZSCORE', KEYS[1], page[2][i]) then
    gone[#gone + 1] = page[2][i]
  end
end
if #gone > 0 then
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return page[1]
"""
SWEEP_BATCH = 500


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _message(room, msg_id, fields):
    """A message dict from a stream entry's flat field list."""
    f = dict(zip(map(_text, fields[::2]), map(_text, fields[1::2])))
    message = {"type": "message", "room": room, "id": int(msg_id), "from": json.loads(f["from"]),
               "text": f["text"], "ts": float(f["ts"])}
    if f.get("ref"):
        message["ref"] = f["ref"]
    return message


class RedisBackplane:
    """Several processes sharing one Redis: pub/sub for events, streams for history, sorted
    sets for presence. One pub/sub connection per process, read by one greenlet."""

    name = "redis"

    def __init__(self, url, history_size, presence_ttl=30.0, presence_limit=1000):
        self.url = url
        self.history_size = history_size
        self.presence_ttl = presence_ttl  # a process refreshes its members 3 times per TTL
        # Leaves told here (members of a dead process, leaves written after an outage) follow
        # the hub's rule: none in a room that still has PRESENCE_LIMIT members or more.
        self.presence_limit = presence_limit
        self.origin = secrets.token_hex(6)
        # Named, so that an operator can tell which process holds which connection
        # (CLIENT LIST): chat-<origin>, as the log says at start.
        # A burst of requests (a crowd reconnecting at once) waits for a free connection
        # instead of failing as if Redis were down (the default pool raises past 100).
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=POOL_WAIT,
            socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=2,
            client_name="chat-" + self.origin, health_check_interval=0)
        self.redis = redis.Redis(connection_pool=pool)
        self._post = self.redis.register_script(POST)
        self._history = self.redis.register_script(HISTORY)
        self._prune = self.redis.register_script(PRUNE)
        self._refresh = self.redis.register_script(ANNOUNCE)
        self._return = self.redis.register_script(RETURN)
        self._raise_ids = self.redis.register_script(RAISE_IDS)
        self._forget_clients = self.redis.register_script(FORGET_CLIENTS)
        self._sweep_clients = self.redis.register_script(SWEEP_CLIENTS)
        self._sweep_cursor = "0"
        # Redis's clock (s) when last read, and our monotonic clock just after: see _redis_ms.
        self._redis_clock = (time.time(), time.monotonic())
        self._inbox = INBOX + self.origin
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.BusyLoadingError, OSError)
        self._deliver = None
        self._local_members = None
        self._channels = {}  # channel -> Event set once Redis confirmed the subscription
        self._channels[self._inbox] = gevent.event.Event()  # ours, for directs: for good
        self._seen = {}  # watched room -> [epoch, highest message id this process has had]
        # (from the subscription on: a message may arrive while a join's history is read)
        self._unfinished = {}  # (room, id) of leaves Redis did not hear of -> the member's
        # nick, or (None, id) of connections it did not hear close: done once it is back
        self._pending = {}  # channel -> SUBSCRIBE commands not yet confirmed
        self._sub = None  # the pub/sub connection
        self._write_lock = None
        self.up = False
        self._reasons = {}  # why Redis was unreachable since it was last up (keys, in order)
        self._waited = False  # start() went on without Redis, and said so
        self._greenlets = []
        self._listener = None  # the one greenlet that reads (and drops) the pub/sub connection

    # -- life --------------------------------------------------------------------------

    def start(self, deliver, local_members):
        """Begin listening; ``local_members()`` returns {room: [member]} for this process,
        re-announced to Redis on every refresh."""

        self._deliver = deliver
        self._local_members = local_members
        self._write_lock = gevent.lock.BoundedSemaphore()
        self._connected = gevent.event.Event()
        self._listener = gevent.spawn(self._listen)
        self._greenlets = [self._listener, gevent.spawn(self._refresh_forever)]
        self._connected.wait(SUBSCRIBE_WAIT)
        if self.up:
            # Directs to our clients come on our channel: listened to before any client comes.
            self._channels[self._inbox].wait(SUBSCRIBE_WAIT)
        log.info("Redis backplane at %s, connections named chat-%s", self._safe_url(), self.origin)
        if not self.up:
            # The reason is the operator's clue: a wrong password or database, TLS against
            # a plain port, a host that does not resolve.
            self._reasons = self._reasons or {"no answer yet": None}
            log.warning("Redis at %s is not reachable yet (%s); retrying in the background",
                        self._safe_url(), "; then ".join(self._reasons))
            self._waited = True

    def stop(self):
        for g in self._greenlets:
            g.kill(block=False)
        if self._sub is not None:
            self._sub.disconnect()

    def health(self):
        return {"backplane": self.name, "redis": "up" if self.up else "down",
                **({} if self.up else {"status": "degraded"})}

    def _safe_url(self):
        # Never log a password.
        kw = self.redis.connection_pool.connection_kwargs
        return "%s:%s/%s" % (kw.get("host", kw.get("path", "?")), kw.get("port", ""), kw.get("db", 0))

    # -- pub/sub -----------------------------------------------------------------------

    def _listen(self):
        """The one reader of the pub/sub connection: reconnects with capped backoff,
        resubscribes, and hands every event to the hub."""

        delay = BACKOFF_MIN
        while True:
            try:
                self._connect_subscriber()
                delay = BACKOFF_MIN
                while True:
                    self._on_reply(self._sub.read_response(push_request=True))
            except (_Hung,) + self._errors + (redis.exceptions.ResponseError,) as exc:
                self._went_down(exc)
            except Exception:  # noqa: BLE001 - the one boundary of this greenlet
                log.exception("Redis listener failed; reconnecting")
                self._went_down(None)
            try:
                gevent.sleep(delay * (0.5 + random.random() / 2))
            except _Hung:
                pass  # a timeout elsewhere (see _call), told while we were down already
            delay = min(delay * 2, BACKOFF_MAX)

    def _connect_subscriber(self):

        if self._sub is not None:
            self._sub.disconnect()
        self.redis.ping()  # within socket_timeout: a hung Redis accepts connections, then hangs
        self._sync_clock()
        # Not from the pool (a blocking pool keeps every connection it made): our own.
        pool = self.redis.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        conn.socket_timeout = None  # pub/sub waits for events as long as it takes
        conn.connect()
        self._sub = conn
        self._pending = {}
        # A fresh connection has no subscriptions: ask again for every wanted channel (the
        # same Events, so that a watch() waiting across the reconnect is woken too).
        for event in self._channels.values():
            event.clear()
        with self._write_lock:
            for channel in [CONTROL] + list(self._channels):
                self._pending[channel] = self._pending.get(channel, 0) + 1
                conn.send_command("SUBSCRIBE", channel)
        if not self.up:
            if self._connected.is_set():
                log.warning("Redis reachable again at %s", self._safe_url())
                gevent.spawn(self._after_outage)  # not in this greenlet: it reads replies
            elif self._waited:
                log.warning("Redis reachable at %s: taking connections", self._safe_url())
            self.up = True
            self._reasons.clear()
        self._announce_all()  # up first: members back after a cut are told to every process
        self._connected.set()

    def _note_id(self, room, msg_id, epoch):
        """Note a message id received for ``room`` in ``epoch`` (None from a process of an
        older version). "skipped" when ids were skipped: a room's ids come one after
        another (INCR), so a jump means some were published while we were not subscribed
        (messages go on arriving after a reconnect, so _find_gaps, which compares with
        Redis's sequence, would not see it). "epoch" when the epoch changed: Redis lost the
        room's state (its keys expired, say) and ids started again, below the floors of
        members who had the old ones."""
        seen = self._seen.get(room)
        if seen is None:
            return None  # not a room we answer joins for
        if epoch is not None and seen[0] is not None and epoch != seen[0]:
            log.warning("room %s: a new epoch (its state in Redis was lost)", room)
            seen[:] = [epoch, msg_id]
            return "epoch"
        if seen[1] is None or msg_id > seen[1]:
            skipped = seen[1] is not None and msg_id > seen[1] + 1
            seen[1] = msg_id
            return "skipped" if skipped else None
        return None  # already in a history answer

    def _note_unfinished(self, room, member_id, nick):
        # Bounded: past it, presence expiry (PRESENCE_TTL) cleans up, only less neatly. A
        # leave to tell (a nick) stays one when a join undone (None) follows it.
        key = (room, member_id)
        if nick is None and key in self._unfinished:
            return
        if len(self._unfinished) < UNFINISHED_MAX:
            self._unfinished[key] = nick

    def _after_outage(self):
        self._finish_leaves()
        self._find_gaps()

    def _finish_leaves(self):
        """Tell Redis of the connections that closed, and the members that left, while it was
        unreachable. Other processes still list them; a leave notice goes to them, not to
        this process's clients, which were told at the time (and would otherwise hear it
        again when the member's presence expires)."""
        for key in list(self._unfinished):
            if key not in self._unfinished:
                continue  # back meanwhile (enter), or done by an earlier pass
            room, member_id = key
            nick = self._unfinished[key]
            try:
                if room is None:
                    self.offline(member_id)
                else:
                    info, listed, pruned, size = self._remove(room, member_id)
                    if nick is None and listed and info:
                        # A join undone that Redis heard of after all (a hung Redis ran it
                        # late): others may have listed it since, so it is told as gone.
                        nick = json.loads(info)["nick"]
                    # Told even if Redis had it removed already: a call that timed out in
                    # the hang may have run once Redis went on, and told no one.
                    if key in self._unfinished and nick is not None and not pruned \
                            and size < self.presence_limit:
                        self._call(self.redis.publish, _keys(room)["channel"], json.dumps(
                            {"k": "presence", "room": room, "event": "leave", "o": self.origin,
                             "member": {"id": member_id, "nick": nick}, "told": self.origin}))
            except Unavailable:
                return  # down again: the next reconnect goes on
            self._unfinished.pop(key, None)

    def _find_gaps(self):
        """After an outage: a room whose messages went on elsewhere meanwhile (its sequence
        is past what we had), or whose state Redis lost (a new epoch), is reported to the hub
        as a "gap": what was published while we were not subscribed is not coming."""
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        for event in list(self._channels.values()):
            # Subscribed again: from here on nothing is missed.
            event.wait(max(0.0, deadline - time.monotonic()))
        rooms = list(self._seen)
        pipe = self.redis.pipeline(transaction=False)
        for room in rooms:
            k = _keys(room)
            pipe.get(k["epoch"])
            pipe.get(k["seq"])
        try:
            replies = self._call(pipe.execute)
        except Unavailable:
            return  # down again: the next reconnect looks again
        # What was published before those reads, after we subscribed, is on its way to us:
        # let it arrive before counting it as missed.
        gevent.sleep(GAP_SETTLE)
        for room, epoch, seq in zip(rooms, replies[::2], replies[1::2]):
            seen = self._seen.get(room)
            now = [_text(epoch) if epoch else None, int(seq or 0)]
            if seen is None or seen[0] is None or \
                    (now[0] == seen[0] and (seen[1] is None or now[1] <= seen[1])):
                continue
            log.warning("room %s: messages may have been missed while Redis was unreachable "
                        "(%s)", room, "its state was lost" if now[0] != seen[0] else
                        "%d published meanwhile" % (now[1] - seen[1]))
            self._seen[room] = now
            self._deliver({"k": "gap", "room": room})

    def _log_down(self, exc):
        log.error("Redis unreachable (%s); plain-text relay goes on locally, JSON messages "
                  "are refused with 'unavailable' until it is back", exc)

    def _went_down(self, exc):
        """In the listener only: down, and the pub/sub connection dropped."""
        reason = "the listener failed" if exc is None else str(exc) or type(exc).__name__
        if self.up:
            self._log_down(exc)
        elif self._reasons and reason not in self._reasons:
            # Still down, for a reason not logged yet: news (the database number was wrong,
            # and now the port is closed, say); the same one on every retry is not.
            log.warning("Redis at %s is still unreachable, now: %s", self._safe_url(), reason)
        self._reasons[reason] = None
        self.up = False
        for event in self._channels.values():
            event.clear()
        if self._sub is not None:
            self._sub.disconnect()
            self._sub = None

    def _on_reply(self, reply):
        kind = _text(reply[0])
        channel = _text(reply[1])
        if kind == "message":
            try:
                event = json.loads(reply[2])
            except ValueError:
                log.warning("dropped a malformed event on %s", channel)
                return
            if event.get("told") == self.origin:
                return  # our clients heard this one at the time (_finish_leaves)
            try:
                gap = None
                if event.get("k") == "msg":
                    room = event["room"]
                    epoch = event.get("epoch")
                    event = {"k": "msg", "message": _message(
                        room, event["id"], ["from", event["from"], "text", event["text"],
                                            "ts", event["ts"], "ref", event.get("ref", "")])}
                    gap = self._note_id(room, event["message"]["id"], epoch)
                if gap:
                    # First: JSON members must rejoin from the last id they had, not from
                    # this one, and a new epoch's floors must go before its ids come.
                    self._deliver({"k": "gap", "room": room})
                self._deliver(event)
            except Exception:  # noqa: BLE001 - one bad event must not cost the subscription
                log.exception("delivering an event from %s failed", channel)
        elif kind == "subscribe":
            left = self._pending.get(channel, 1) - 1
            self._pending[channel] = left
            if left <= 0 and channel in self._channels:
                self._channels[channel].set()

    def _send(self, *command):
        if self._sub is None or not self.up:
            raise Unavailable("Redis is unreachable")
        try:
            with self._write_lock:
                sub = self._sub
                if sub is None or not self.up:  # dropped while we waited for the lock
                    raise Unavailable("Redis is unreachable")
                if command[0] in ("SUBSCRIBE", "UNSUBSCRIBE"):
                    # A watch and an unwatch of one channel can both wait for the lock: each
                    # command goes only if it is still what _channels wants, or the later
                    # wish could be undone by the earlier one (a member left deaf, say).
                    channel = command[1]
                    if (channel in self._channels) != (command[0] == "SUBSCRIBE"):
                        return  # wished otherwise meanwhile: that wish sends its own
                    if command[0] == "SUBSCRIBE":
                        self._pending[channel] = self._pending.get(channel, 0) + 1
                sub.send_command(*command)
        except (redis.exceptions.RedisError,) + self._errors as exc:
            raise Unavailable(str(exc)) from None

    def watch(self, room):
        """Subscribe to the room's channel (once per process); returns once Redis confirmed."""

        channel = _keys(room)["channel"]
        self._seen.setdefault(room, [None, None])  # nothing known yet: see _note_id, history
        event = self._channels.get(channel)
        if event is None:
            event = self._channels[channel] = gevent.event.Event()
            try:
                self._send("SUBSCRIBE", channel)
            except Unavailable:
                # The wish stays (a reconnect subscribes to it): others may share it by
                # now; the caller's cleanup unwatches once nobody does.
                raise
        if self._channels.get(channel) is event and not event.wait(SUBSCRIBE_WAIT):
            raise Unavailable("Redis did not confirm the subscription to %s" % channel)

    def unwatch(self, room):
        channel = _keys(room)["channel"]
        self._seen.pop(room, None)
        if self._channels.pop(channel, None) is not None and self.up:
            try:
                self._send("UNSUBSCRIBE", channel)
            except Unavailable:
                pass  # a new connection subscribes only to wanted channels anyway

    # -- store -------------------------------------------------------------------------

    def _call(self, fn, *args, **kw):
        if not self.up:
            raise Unavailable("Redis is unreachable")
        try:
            return fn(*args, **kw)
        except redis.exceptions.TimeoutError as exc:
            # A Redis that hangs (stopped, swapping) keeps its connections open: the pub/sub
            # reader, which waits without a timeout, would never notice, and every call
            # would wait socket_timeout. Down until the listener reconnects and Redis answers.
            # (Only the listener touches the pub/sub connection: it is told, not bypassed.)
            if self.up:
                self._log_down(exc)
                self.up = False
                self._listener.kill(_Hung(str(exc)), block=False)
            raise Unavailable(str(exc)) from None
        except self._errors as exc:
            raise Unavailable(str(exc)) from None
        except redis.exceptions.RedisError as exc:
            # Reachable but refusing: out of memory, read-only replica after a failover...
            log.warning("Redis refused a command: %s", exc)
            raise Unavailable(str(exc)) from None

    def next_id(self):
        return int(self._call(self.redis.incr, IDS))

    def online(self, member):
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(CLIENTS, {member["id"]: self._expiry()})
        pipe.hset(CLIENT_AT, member["id"], self.origin)
        self._call(pipe.execute)

    def offline(self, member_id):
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(CLIENTS, member_id)
        pipe.hdel(CLIENT_AT, member_id)
        try:
            self._call(pipe.execute)
        except Unavailable:
            self._note_unfinished(None, member_id, None)
            raise

    def enter(self, room, member):
        key = (room, member["id"])
        owed = self._unfinished.pop(key, _NOTHING)  # back before Redis heard it left
        k = _keys(room)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(k["presence"], {member["id"]: self._expiry()})
        pipe.hset(k["info"], member["id"], json.dumps(member))
        pipe.srem(k["pruned"], member["id"])  # announced by the hub: not "back" as well
        pipe.zcard(k["presence"])
        try:
            return self._call(pipe.execute)[-1]
        except Unavailable:
            if owed is not _NOTHING and key not in self._unfinished:
                self._unfinished[key] = owed  # not back after all: its leave is still owed
            raise

    def exit(self, room, member_id, nick=None):
        """The room's size once ``member_id`` is gone; None when another process pruned it
        meanwhile (its process stalled) and told the others already. Should Redis be
        unreachable, the leave is written once it is back, and told to the other processes
        if ``nick`` is given (not for a join undone: they never heard of it)."""
        try:
            _info, _listed, pruned, size = self._remove(room, member_id)
        except Unavailable:
            self._note_unfinished(room, member_id, nick)
            raise
        return None if pruned else size

    def _remove(self, room, member_id):
        """(its info as listed or None, whether it was listed, whether it was pruned, the
        room's size once it is gone)."""
        k = _keys(room)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(k["info"], member_id)
        pipe.zrem(k["presence"], member_id)
        pipe.hdel(k["info"], member_id)
        pipe.srem(k["pruned"], member_id)
        pipe.zcard(k["presence"])
        info, listed, _deleted, pruned, size = self._call(pipe.execute)
        return info, bool(listed), bool(pruned), size

    def rename(self, rooms, member):
        pipe = self.redis.pipeline(transaction=False)
        for room in rooms:
            pipe.hset(_keys(room)["info"], member["id"], json.dumps(member))
        self._call(pipe.execute)

    def members(self, room, limit):
        k = _keys(room)
        self._prune_room(room)
        count = self._call(self.redis.zcard, k["presence"])
        if not limit or not count:
            return [], count
        ids = self._call(self.redis.zrange, k["presence"], 0, limit - 1)
        infos = self._call(self.redis.hmget, k["info"], ids) if ids else []
        return [json.loads(i) for i in infos if i], count

    def _prune_room(self, room):
        """Drop members whose process stopped refreshing them and announce their leaving."""
        k = _keys(room)
        now = int(time.time() * 1000)
        gone = []
        while True:
            batch = self._call(self._prune, keys=[k["presence"], k["info"], k["pruned"]],
                               args=[now, PRUNED_TTL, PRUNE_BATCH])
            gone += filter(None, batch)
            if len(batch) < PRUNE_BATCH:
                break
        if not gone:
            return
        size = self._call(self.redis.zcard, k["presence"]) + len(gone)
        for info in gone:
            size -= 1  # the room's size once this one is gone
            if size < self.presence_limit:
                self.publish(room, {"k": "presence", "room": room, "event": "leave",
                                    "member": json.loads(info)})

    def history(self, room, since=None, epoch=None, budget=None):
        """(messages, epoch, recovered): the newest messages at least, up to where their
        texts hold more than ``budget`` characters (see HISTORY)."""
        k = _keys(room)
        got_epoch, recovered, entries, seq = self._call(
            self._history, keys=[k["seq"], k["stream"], k["epoch"]],
            args=[self.history_size, "" if since is None else since, epoch or "",
                  budget or 2 ** 53])
        messages = [_message(room, _text(eid).split("-")[0], fields)
                    for eid, fields in reversed(entries)]
        got_epoch = _text(got_epoch) or self._new_epoch_for(room)
        seen = self._seen.get(room)
        if seen is not None:  # watched: note where it stands (_note_id, _find_gaps)
            last = int(seq)  # (read with the epoch: 0 in a room with no message yet)
            if seen[0] is not None and seen[0] != got_epoch:
                seen[:] = [got_epoch, last]  # a new epoch: ids start again
                # Redis lost the room's state while members here had it (see _note_id): their
                # floors and ids are of the old one. (After this join's answer.)
                log.warning("room %s: a new epoch (its state in Redis was lost)", room)
                gevent.spawn(self._deliver, {"k": "gap", "room": room})
            else:
                seen[0] = got_epoch
                if seen[1] is None:
                    # Where the subscription takes over. Not raised by later joins: their
                    # answers cover their joiners, not the members here who had only what
                    # the subscription brought (see _note_id, _find_gaps).
                    seen[1] = last
        return messages, got_epoch, bool(recovered)

    def _new_epoch_for(self, room):
        # A room never written to yet: fix its epoch now so clients can quote it later.
        key = _keys(room)["epoch"]
        self._call(self.redis.set, key, secrets.token_hex(8), nx=True, ex=ROOM_TTL)
        return _text(self._call(self.redis.get, key))

    def post(self, room, sender, text, ts, ref=None):
        k = _keys(room)
        for _attempt in range(2):
            sent = time.monotonic()
            fresh, msg_id, fields = self._call(
                self._post, keys=[k["seq"], k["stream"], k["epoch"], k["refs"]],
                args=[k["channel"], secrets.token_hex(8), self.history_size, json.dumps(sender),
                      text, repr(ts), ref or "", room, self.origin, ROOM_TTL,
                      self._redis_ms(sent + POST_DEADLINE)])
            if fresh != -1:
                return _message(room, msg_id, fields), bool(fresh)
            # Nothing was stored. Answered in time yet past the deadline: Redis's clock moved
            # since we read it, so read it again. (Or we waited that long for a connection.)
            if time.monotonic() - sent < POST_DEADLINE:
                log.warning("Redis's clock is not where we thought; reading it again")
                self._call(self._sync_clock)
        raise Unavailable("Redis did not store the message in time")

    def _sync_clock(self):
        """Read Redis's clock (TIME), for the deadlines of POST: hosts' clocks may differ.
        Ours is read after the answer, so that a slow one makes deadlines early, not late."""
        seconds, micros = self.redis.time()
        self._redis_clock = (seconds + micros / 1e6, time.monotonic())

    def _redis_ms(self, when):
        """Our monotonic time ``when`` on Redis's clock, in milliseconds."""
        at_redis, at_ours = self._redis_clock
        return int((at_redis + when - at_ours) * 1000)

    def publish(self, room, event):
        """Send an unstored event to every process; in an outage, to this one only."""
        event = dict(event, o=self.origin)
        try:
            self._call(self.redis.publish, _keys(room)["channel"], json.dumps(event))
        except Unavailable:
            self._deliver(event)

    def publish_all(self, event):
        self._call(self.redis.publish, CONTROL, json.dumps(dict(event, o=self.origin)))

    def direct(self, to, event):
        """To the process that holds connection ``to``, on its own channel: when no process
        listens there (it died, or is cut off from Redis), the message reached no one and
        False says so at once, not only once its presence expires. (A connection of a
        process that does not say where it is goes to every process.)"""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(CLIENTS, to)
        pipe.hget(CLIENT_AT, to)
        score, origin = self._call(pipe.execute)
        if score is None or score < time.time() * 1000:
            return False
        channel = INBOX + _text(origin) if origin else CONTROL
        return self._call(self.redis.publish, channel, json.dumps(dict(event, o=self.origin))) > 0

    # -- presence refresh --------------------------------------------------------------

    def _expiry(self):
        return int((time.time() + self.presence_ttl) * 1000)

    def _refresh_forever(self):

        while True:
            gevent.sleep(self.presence_ttl / 3)
            if not self.up:
                continue
            try:
                self._sync_clock()  # (it drifts)
                self._announce_all()
                for room in self._local_members()[0]:
                    self._prune_room(room)  # members of dead processes leave, announced
                self._send("PING")  # a dead pub/sub connection shows up as an error here
            except (Unavailable, redis.exceptions.RedisError) + self._errors as exc:
                log.debug("presence refresh failed: %s", exc)
            except Exception:  # noqa: BLE001 - the one boundary of this greenlet
                log.exception("presence refresh failed")

    def _announce_all(self):
        """Tell Redis again who is connected here, with fresh expiry times; members another
        process pruned meanwhile (and announced as gone) are announced as back."""
        rooms, everyone = self._local_members()
        expiry = self._expiry()
        pipe = self.redis.pipeline(transaction=False)
        refreshed = []
        for room, members in rooms.items():
            if members:
                k = _keys(room)
                args = [expiry]
                for m in members:
                    args += [m["id"], json.dumps(m)]
                self._refresh(keys=[k["presence"], k["info"], k["pruned"]], args=args, client=pipe)
                refreshed.append((room, {m["id"]: m for m in members}))
        if everyone:
            pipe.zadd(CLIENTS, {m["id"]: expiry for m in everyone})
            pipe.hset(CLIENT_AT, mapping={m["id"]: self.origin for m in everyone})
            self._raise_ids(keys=[IDS], args=[max(m["id"] for m in everyone)], client=pipe)
        self._forget_clients(keys=[CLIENTS, CLIENT_AT], args=[int(time.time() * 1000), PRUNE_BATCH],
                             client=pipe)
        self._sweep_clients(keys=[CLIENTS, CLIENT_AT], args=[self._sweep_cursor, SWEEP_BATCH],
                            client=pipe)
        replies = pipe.execute()
        self._sweep_cursor = _text(replies[-1])
        # Members may have left while the refresh was on its way (a stalled process goes on
        # with the leaves its clients sent meanwhile): not back, and not to be kept listed.
        rooms_now, everyone_now = self._local_members()
        stale = self.redis.pipeline(transaction=False)
        for (room, members), back in zip(refreshed, replies):
            here = {m["id"] for m in rooms_now.get(room, ())}
            k = _keys(room)
            gone = [member_id for member_id in members if member_id not in here]
            if gone:
                stale.zrem(k["presence"], *gone)
                stale.hdel(k["info"], *gone)
            for member_id in map(int, back):
                if member_id in here:
                    member = members[member_id]
                    event = {"k": "presence", "room": room, "event": "join", "member": member,
                             "o": self.origin}
                    self._return(keys=[k["presence"], k["info"], k["pruned"]],
                                 args=[expiry, member_id, json.dumps(member), k["channel"],
                                       json.dumps(event), self.presence_limit], client=stale)
        closed = {m["id"] for m in everyone} - {m["id"] for m in everyone_now}
        if closed:
            stale.zrem(CLIENTS, *closed)
            stale.hdel(CLIENT_AT, *closed)
        if len(stale):
            stale.execute()
