// The chat.v1 client: connection, reconnect with backoff, rejoin with since/epoch, pending
// messages until their ack, and resending them with their original ref. No DOM here: the page
// (chat.js) calls the methods below and redraws from this object's state when it fires events.
//
// State, in one line: conversations[key] = Conversation (rooms by name, direct messages as
// "@<n>"); directs[peer id] = the open direct conversation with that connection;
// pending[ref] = an entry of ours the server has not confirmed yet.
//
// A direct conversation is with one connection, named by its id: it ends when that
// connection is gone (the server says no_such_client) or when the server restarts (a new
// lobby epoch), since ids start again at 1 and the same id may then name someone else.
//
// Events (CustomEvent, details in brackets):
//   status   the connection changed: see `state`, `retryAt`
//   self     our id or nick changed
//   rooms    a conversation was added or removed
//   entries  [key, added, initial]: a conversation's entries changed; `added` are the new
//            ones, `initial` when they are the backlog of a room just joined
//   members  [key]: a room's member list changed
//   typing   [key]: someone started typing in a room
//   problem  [code, message, about]: the server refused something the user asked for

export const LOBBY = "lobby";
export const ROOM_NAME = /^[A-Za-z0-9_.-]{1,64}$/;
export const NICK_MAX = 32;
export const TEXT_MAX = 4000;
export const TYPING_MS = 5000; // how long "is typing" lasts after the last notice
const ENTRIES_MAX = 1000; // entries kept per conversation, oldest dropped first
const REFS_KEPT = 300; // our own refs remembered across reloads, to mark our messages
const LAST = Number.MAX_SAFE_INTEGER; // sorts pending messages after everything stored
const RATE_PAUSE_MS = 1500; // after a rate_limited answer, wait this long before resending

/** The WebSocket URL of the page's own server: ws: for http pages, wss: for https. */
export function chatUrl(loc) {
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.host}/ws`;
}

/** Milliseconds to wait before reconnect attempt `attempt` (1, 2, ...): the ceiling doubles
 * from `base` up to `cap`, and the wait is a random point in its upper half, so that clients
 * dropped together (a server restart) do not come back in lockstep. */
export function backoff(attempt, { base = 500, cap = 5000, random = Math.random } = {}) {
  const ceiling = Math.min(cap, base * 2 ** Math.max(0, attempt - 1));
  return ceiling / 2 + (random() * ceiling) / 2;
}

/** A fresh idempotency key: 32 hex digits (the contract wants a string of 8 to 64). Uses
 * getRandomValues, which, unlike randomUUID, also exists on plain-http pages. */
export function newRef(crypto = globalThis.crypto) {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** What to tell the user when the server closed the socket on purpose, by close code
 * (RFC 6455 7.4, and IANA's 1013); null when reconnecting says it all (a network drop, a
 * server shutting down or asking us to catch up). */
export function closeNotice(code, reason) {
  const why = typeof reason === "string" && reason ? `: ${reason}` : "";
  if (code === 1013) return `The server cannot take connections now${why}. Trying again…`;
  if ([1002, 1003, 1007, 1008, 1009, 1011].includes(code)) {
    return `The server closed the connection${why}. Reconnecting…`;
  }
  return null;
}

const utf8 = new TextEncoder();

function compareSort(a, b) {
  return a[0] - b[0] || a[1] - b[1] || a[2] - b[2];
}

function who(raw) {
  return { id: Number(raw && raw.id), nick: String((raw && raw.nick) || "?") };
}

/** A room or a direct conversation: its entries in display order, members and recovery
 * point. Entries are messages (`kind` "message" or "direct") and local "notice" lines; each
 * has a stable `key` and a `sort` triple [epoch ordinal, message id, tie-breaker]. */
export class Conversation {
  constructor(key, kind, name) {
    this.key = key;
    this.kind = kind; // "room" or "direct"
    this.name = name; // room name, or the peer's nick
    this.peer = null; // {id, nick} for a direct conversation
    this.state = kind === "room" ? "joining" : "open"; // rooms: joining, joined, left
    this.ended = null; // a direct conversation that can no longer reach its peer: why
    this.entries = [];
    this.index = new Map(); // "r:<ref>" and "m:<epoch>:<id>" -> entry
    this.members = new Map(); // id -> {id, nick}
    this.memberCount = 0;
    this.epoch = null; // the room's epoch as last seen
    this.lastId = 0; // the highest message id known in that epoch (acks too): notices go after it
    // The highest id received (live or in history) in that epoch: `since` on rejoin. An
    // ack's only when it follows it: with several server processes, another's message may
    // reach us after our ack for a later one, and a rejoin from the ack's id would skip it.
    this.heard = 0;
    this.asked = null; // {since, epoch} of this connection's catch-up join, until answered
    this.epochs = new Map(); // epoch -> ordinal, in the order we met them
    this.typing = new Map(); // id -> {nick, until}
    this.seq = 0; // tie-breaker for notices and direct messages
  }

  /** Put `entry` in display order (it may already be in the list: then it moves). */
  place(entry) {
    const at = this.entries.indexOf(entry);
    if (at >= 0) this.entries.splice(at, 1);
    let i = this.entries.length;
    while (i > 0 && compareSort(this.entries[i - 1].sort, entry.sort) > 0) i -= 1;
    this.entries.splice(i, 0, entry);
    while (this.entries.length > ENTRIES_MAX) {
      const gone = this.entries.shift();
      for (const [k, e] of this.index) if (e === gone) this.index.delete(k);
    }
  }

  ordinal() {
    return this.epochs.has(this.epoch) ? this.epochs.get(this.epoch) : 0;
  }

  /** Typing members whose notice has not expired, at time `now`. */
  typers(now) {
    const out = [];
    for (const [id, t] of this.typing) {
      if (t.until > now) out.push(t.nick);
      else this.typing.delete(id);
    }
    return out;
  }
}

export class ChatClient extends EventTarget {
  /**
   * url:       the /ws URL (see chatUrl)
   * nick:      the nick to ask for after every welcome (null keeps the server's)
   * storage:   a Storage (sessionStorage) for joined rooms and unconfirmed messages, or null
   * WebSocket, timers ({setTimeout, clearTimeout, setInterval, clearInterval}), random, now:
   *            seams for tests
   * retry:     {base, cap} for backoff(), in ms
   * heartbeat: {every, timeout, resend} in ms: ping after `every` of silence and drop the
   *            socket when `timeout` passes without an answer; resend a message whose ack
   *            is `resend` late
   */
  constructor({ url, nick = null, storage = null, WebSocket = globalThis.WebSocket,
    timers = globalThis, random = Math.random, now = () => Date.now(),
    retry = { base: 500, cap: 5000 }, heartbeat = { every: 15000, timeout: 10000, resend: 8000 } } = {}) {
    super();
    this.url = url;
    this.WebSocket = WebSocket;
    this.timers = timers;
    this.random = random;
    this.now = now;
    this.retry = retry;
    this.heartbeat = heartbeat;
    this.storage = storage;

    this.state = "idle"; // idle, connecting, open, waiting (for a retry), stopped
    this.maxMessageSize = null; // bytes one frame may have, as the welcome says
    this.everConnected = false;
    this.lastNotice = null; // the last closeNotice told, so a refusal repeated is told once
    this.attempt = 0;
    this.retryAt = null;
    this.generation = 0; // counts welcomes: which connection an entry was last sent on
    this.self = { id: null, nick: null };
    this.wantedNick = nick;
    this.conversations = new Map();
    this.directs = new Map();
    this.directSerial = 0;
    this.pending = new Map();
    this.myRefs = new Set();
    this.ws = null;
    this.lastFrameAt = 0;
    this.pingSentAt = 0;
    this.retryTimer = null;
    this.tickTimer = null;
    this.resendTimer = null;
    this.quietUntil = 0; // no typing notices before then: the rate limit refused something
    this.held = new Set(); // messages refused as rate_limited, waiting for resendTimer

    this.#room(LOBBY);
    this.#restore();
  }

  // -- what the page asks for -------------------------------------------------------------

  start() {
    if (this.state === "idle" || this.state === "stopped") this.#connect();
  }

  stop() {
    this.state = "stopped";
    this.#clearTimers();
    if (this.ws) this.#detach(this.ws).close(1000, "bye");
    this.ws = null;
    this.#failSentDirects(); // (their answer cannot come now, and they hold up the next)
    this.#emit("status");
  }

  /** Directs have no idempotency key: one that went out on a socket now gone, unconfirmed,
   * is not sent twice. */
  #failSentDirects() {
    for (const [ref, entry] of this.pending) {
      if (entry.kind === "direct" && entry.sentOn !== null) {
        this.pending.delete(ref);
        entry.status = "failed";
        entry.error = "the connection dropped before it was confirmed; it may not have arrived";
      }
    }
  }

  /** Skip the rest of the backoff wait (the network came back, the user asked). */
  reconnectNow() {
    if (this.state === "waiting") {
      this.timers.clearTimeout(this.retryTimer);
      this.#connect();
    }
  }

  /** Give up on the current socket (the browser went offline, say) and reconnect as after any
   * lost connection. */
  drop() {
    if (this.state !== "open" && this.state !== "connecting") return;
    const ws = this.ws;
    this.#lost();
    if (ws) ws.close(4000, "dropped by the client");
  }

  get connected() {
    return this.state === "open";
  }

  /** Join room `name` (or just answer with what is there when already in it). */
  join(name) {
    if (!ROOM_NAME.test(name)) throw new RangeError("room names are 1-64 letters, digits, '-', '_' or '.'");
    const conv = this.#room(name);
    if (conv.state === "left") conv.state = "joining";
    this.#saveRooms();
    if (conv.state === "joining") this.#sendJoin(conv);
    return conv;
  }

  /** How many of our messages to conversation `key` (to any, without one) are not confirmed yet. */
  unsent(key) {
    let n = 0;
    for (const entry of this.pending.values()) if (key === undefined || entry.room === key) n += 1;
    return n;
  }

  leave(name) {
    const conv = this.conversations.get(name);
    if (!conv || name === LOBBY) return;
    this.#send({ type: "leave", room: name, ref: `leave:${name}` });
    this.#forget(conv);
  }

  /** Ask for nick `nick`; kept and asked for again after every reconnect. */
  setNick(nick) {
    this.wantedNick = nick.trim();
    this.#send({ type: "nick", nick: this.wantedNick, ref: "nick" });
  }

  typing(key) {
    const conv = this.conversations.get(key);
    // Not while the rate limit refuses us: each refused request counts towards the server's
    // flood limit, and a notice is not worth the connection.
    if (this.now() < this.quietUntil) return;
    if (conv && conv.kind === "room" && conv.state === "joined") this.#send({ type: "typing", room: key, ref: "typing" });
  }

  /** The open direct conversation with connection `member` ({id, nick}), made when needed
   * (an ended one with the same id stays as it is: that id may be someone else now). */
  direct(member) {
    const peer = who(member);
    let conv = this.directs.get(peer.id);
    if (!conv) {
      conv = new Conversation(`@${++this.directSerial}`, "direct", peer.nick);
      conv.peer = peer;
      this.conversations.set(conv.key, conv);
      this.directs.set(peer.id, conv);
      this.#emit("rooms");
    }
    return conv;
  }

  closeDirect(key) {
    const conv = this.conversations.get(key);
    if (conv && conv.kind === "direct") this.#forget(conv);
  }

  /** Send `text` to conversation `key`; returns the entry, shown as pending until the server
   * confirms it. Room messages wait in `pending` through disconnects and are resent with
   * the same ref until acknowledged. */
  send(key, text) {
    const conv = this.conversations.get(key);
    if (!conv || !text.trim()) return null;
    const ref = newRef();
    this.#remember(ref);
    const entry = {
      key: `r:${ref}`, kind: conv.kind === "room" ? "message" : "direct", ref, text,
      from: { ...this.self }, ts: this.now() / 1000, mine: true, status: "pending",
      id: null, epoch: null, error: null, sentOn: null, sentAt: 0, room: key,
      // Room messages take their place by id once stored; directs stay in arrival order.
      sort: conv.kind === "room" ? [LAST, 0, ++conv.seq] : [0, ++conv.seq, 0],
    };
    conv.index.set(entry.key, entry);
    conv.place(entry);
    if (conv.ended) {
      entry.status = "failed";
      entry.error = conv.ended;
    } else {
      this.pending.set(ref, entry);
      if (conv.kind === "room") this.#savePending();
      this.#flush();
    }
    this.#emit("entries", { key, added: [entry] });
    return entry;
  }

  // -- the connection ----------------------------------------------------------------------

  #connect() {
    this.#clearTimers();
    this.state = "connecting";
    this.retryAt = null;
    this.#emit("status");
    let ws;
    try {
      ws = new this.WebSocket(this.url, "chat.v1");
    } catch (err) {
      this.#lost();
      return;
    }
    this.ws = ws;
    ws.onmessage = (event) => this.#receive(event.data);
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      if (event.code === 1009) this.#failTooBig();
      this.#lost();
      // Said once, not at every attempt while the server keeps refusing for the same reason.
      const notice = closeNotice(event.code, event.reason);
      if (notice && notice !== this.lastNotice) this.#emit("problem", { code: "closed", message: notice, about: "connection" });
      this.lastNotice = notice;
    };
    ws.onerror = () => {}; // a close event follows; the browser has logged the details
  }

  #detach(ws) {
    ws.onmessage = ws.onclose = ws.onerror = null;
    return ws;
  }

  /** The socket is gone: keep everything, wait a little, try again. */
  #lost() {
    if (this.state === "stopped") return;
    this.#clearTimers();
    if (this.ws) this.#detach(this.ws);
    this.ws = null;
    for (const conv of this.conversations.values()) {
      conv.typing.clear();
      if (conv.kind === "room" && conv.state === "joined") conv.state = "joining";
    }
    this.#failSentDirects();
    this.attempt += 1;
    const wait = backoff(this.attempt, { ...this.retry, random: this.random });
    this.state = "waiting";
    this.retryAt = this.now() + wait;
    this.retryTimer = this.timers.setTimeout(() => this.#connect(), wait);
    this.#emit("status");
    for (const conv of this.conversations.values()) this.#emit("entries", { key: conv.key, added: [] });
  }

  /** Fail `entry` instead of sending `frame` when the server (its welcome says how much it
   * takes) would close the connection for it with 1009. */
  #tooBig(entry, frame) {
    if (!this.maxMessageSize || utf8.encode(JSON.stringify(frame)).length <= this.maxMessageSize) return false;
    this.#fail(entry, `too long for this server (at most ${this.maxMessageSize.toLocaleString("en")} bytes)`);
    return true;
  }

  /** The server closed with 1009: a message of ours was bigger than it takes. Sent again it
   * would be refused again, and hold up everything behind it: the longest one unanswered on
   * this connection fails instead. */
  #failTooBig() {
    let culprit = null;
    for (const entry of this.pending.values()) {
      if (entry.sentOn === this.generation && (!culprit || entry.text.length > culprit.text.length)) {
        culprit = entry;
      }
    }
    if (culprit) this.#fail(culprit, "too long for this server");
  }

  /** `entry` will not be sent: it says why, and no longer waits. */
  #fail(entry, why) {
    this.pending.delete(entry.ref);
    this.#savePending();
    entry.status = "failed";
    entry.error = why;
    this.#emit("entries", { key: entry.room, added: [] });
  }

  #clearTimers() {
    this.timers.clearTimeout(this.retryTimer);
    this.timers.clearInterval(this.tickTimer);
    this.timers.clearTimeout(this.resendTimer);
    this.retryTimer = this.tickTimer = this.resendTimer = null;
    this.held.clear(); // the next connection sends them anyway
  }

  /** Every few seconds while open: ping when idle, give up on a socket that does not answer
   * (the browser may not notice a dead one for minutes), resend messages whose ack is
   * overdue. Measured from our own ping, so that timers slowed down in a background tab do
   * not count as silence. */
  #tick() {
    const now = this.now();
    if (this.pingSentAt > this.lastFrameAt && now - this.pingSentAt > this.heartbeat.timeout) {
      this.drop();
      return;
    }
    if (now - this.lastFrameAt > this.heartbeat.every && this.pingSentAt <= this.lastFrameAt) {
      this.pingSentAt = now;
      this.#send({ type: "ping", ref: "heartbeat" });
    }
    for (const entry of this.pending.values()) {
      if (entry.kind === "message" && entry.sentOn !== null && now - entry.sentAt > this.heartbeat.resend) {
        entry.sentOn = null;
      }
    }
    this.#flush();
  }

  #send(obj) {
    if (!this.connected || !this.ws) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  #receive(data) {
    this.lastFrameAt = this.now();
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (err) {
      return; // not ours to show; the contract says every frame is JSON
    }
    if (!msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "welcome":
        this.#onWelcome(msg);
        break;
      case "joined":
        this.#onJoined(msg);
        break;
      case "left":
        break; // we forgot the room when we asked to leave
      case "message":
        this.#onMessage(msg);
        break;
      case "ack":
        this.#onAck(msg);
        break;
      case "presence":
        this.#onPresence(msg);
        break;
      case "nick":
        this.#onNick(msg);
        break;
      case "direct":
        this.#onDirect(msg);
        break;
      case "typing":
        this.#onTyping(msg);
        break;
      case "pong":
        this.#onPong(msg);
        break;
      case "error":
        this.#onError(msg);
        break;
      default:
        break; // the contract may add types; ignore what we do not know
    }
  }

  // -- what the server says ----------------------------------------------------------------

  #onWelcome(msg) {
    this.state = "open";
    this.everConnected = true;
    this.lastNotice = null;
    this.attempt = 0;
    this.generation += 1;
    this.self = { id: Number(msg.id), nick: String(msg.nick) };
    this.maxMessageSize = Number(msg.max_message_size) || null;
    this.pingSentAt = 0;
    this.tickTimer = this.timers.setInterval(() => this.#tick(), Math.min(5000, this.heartbeat.every));
    if (this.wantedNick && this.wantedNick !== this.self.nick) {
      this.#send({ type: "nick", nick: this.wantedNick, ref: "nick" });
    }

    // The welcome puts us in the lobby. On a first connection its history is all we need;
    // after a reconnect we ask with since/epoch what we missed, like for every other room.
    const lobby = this.#room(LOBBY);
    const fresh = lobby.epoch === null;
    if (!fresh && String(msg.epoch) !== lobby.epoch) {
      for (const conv of [...this.directs.values()]) {
        this.#endDirect(conv, "the server restarted, and ids now name other people");
      }
    }
    const since = { since: lobby.heard, epoch: lobby.epoch };
    this.#applyState(lobby, msg, fresh ? msg.history : []);
    for (const conv of this.conversations.values()) conv.asked = null; // a new connection's
    if (!fresh) {
      lobby.asked = since;
      this.#send({ type: "join", room: LOBBY, ...since, ref: `join:${LOBBY}` });
    }
    for (const conv of this.conversations.values()) {
      if (conv.kind === "room" && conv.key !== LOBBY && conv.state !== "left") this.#sendJoin(conv);
    }
    this.#flush();
    this.#emit("self");
    this.#emit("status");
    this.#emit("members", { key: LOBBY });
  }

  #sendJoin(conv) {
    conv.state = "joining";
    const req = { type: "join", room: conv.key, ref: `join:${conv.key}` };
    // A catch-up refused (rate_limited) is asked again from where it started: live messages
    // since then have raised `heard` past what it was to bring.
    if (conv.epoch !== null) conv.asked = conv.asked || { since: conv.heard, epoch: conv.epoch };
    if (conv.asked) Object.assign(req, conv.asked);
    this.#send(req);
  }

  #onJoined(msg) {
    const conv = this.conversations.get(msg.room);
    if (!conv || conv.kind !== "room") return; // we left meanwhile; the leave is on its way
    this.#applyState(conv, msg, msg.history);
    this.#flush();
    this.#emit("members", { key: conv.key });
  }

  /** Take a welcome's or joined's room state: members, epoch, and `history` merged in. */
  #applyState(conv, msg, history) {
    conv.state = "joined";
    conv.members = new Map((Array.isArray(msg.members) ? msg.members : []).map((m) => [Number(m.id), who(m)]));
    // Renames made while we were away come only this way: no notice is replayed.
    for (const member of conv.members.values()) this.#renamePeer(member);
    conv.memberCount = Number(msg.member_count ?? conv.members.size);
    const initial = conv.epoch === null; // the room's backlog on first joining: not "unread"
    // What we had seen before a catch-up the server could not fully answer (same epoch).
    const asked = msg.type === "joined" ? conv.asked : null;
    if (msg.type === "joined") conv.asked = null;
    const seen = asked && msg.recovered === false && msg.epoch === asked.epoch ? asked.since : null;
    if (msg.epoch !== conv.epoch) this.#newEpoch(conv, String(msg.epoch));
    const added = [];
    let next = Infinity; // the first id after what we had seen that this answer brings
    for (const m of Array.isArray(history) ? history : []) {
      const id = Number(m.id);
      if (seen !== null && id > seen && id < next) next = id;
      const entry = this.#merge(conv, m);
      if (entry) added.push(entry);
    }
    if (seen !== null && next !== Infinity && next > seen + 1) {
      // The server no longer held all we missed (its history is bounded): the log must
      // not read as if the latest messages came straight after the ones we have.
      this.#notice(conv, "Some messages were missed here: the server no longer had them.", [conv.ordinal(), seen, 1]);
    }
    this.#emit("entries", { key: conv.key, added, initial });
  }

  /** The room's sequence started anew (the server restarted, say): ids from now on are in a
   * new epoch. What we already show stays; a notice marks the seam. */
  #newEpoch(conv, epoch) {
    const hadHistory = conv.entries.some((e) => e.kind === "message" && e.status === "sent");
    conv.epoch = epoch;
    conv.lastId = conv.heard = 0;
    if (!conv.epochs.has(epoch)) conv.epochs.set(epoch, conv.epochs.size);
    if (hadHistory) {
      this.#notice(conv, "The server's history starts again here; earlier messages are kept above.", [conv.ordinal(), 0, 0.5]);
    }
  }

  /** Add a stored message (live or from history) unless we already show it: the same id in
   * the same epoch, or the same ref (our own pending message, or a resend after a restart).
   * Returns the new entry, or null. */
  #merge(conv, m) {
    const id = Number(m.id);
    if (!Number.isFinite(id)) return null;
    conv.heard = Math.max(conv.heard, id);
    const idKey = `m:${conv.epoch}:${id}`;
    if (conv.index.has(idKey)) return null;
    conv.lastId = Math.max(conv.lastId, id);
    const ref = typeof m.ref === "string" ? m.ref : null;
    const same = ref && conv.index.get(`r:${ref}`);
    if (same) {
      conv.index.set(idKey, same);
      if (same.status !== "sent") this.#confirm(conv, same, id, m.ts, who(m.from));
      return null;
    }
    const from = who(m.from);
    const entry = {
      key: ref ? `r:${ref}` : idKey, kind: "message", ref, id, epoch: conv.epoch, from,
      text: String(m.text), ts: Number(m.ts), status: "sent", error: null, room: conv.key,
      mine: from.id === this.self.id || (ref !== null && this.myRefs.has(ref)),
      sort: [conv.ordinal(), id, 0],
    };
    conv.index.set(idKey, entry);
    if (ref) conv.index.set(entry.key, entry);
    conv.place(entry);
    conv.typing.delete(from.id);
    return entry;
  }

  /** Our message is stored: under `from` as the server has it, or, from an ack, under the
   * name we have now (requests are answered in order, so a rename before it is known). */
  #confirm(conv, entry, id, ts, from = { ...this.self }) {
    entry.from = from;
    entry.id = id;
    entry.ts = Number(ts) || entry.ts;
    entry.epoch = conv.epoch;
    entry.status = "sent";
    entry.error = null;
    entry.sort = [conv.ordinal(), id, 0];
    conv.index.set(`m:${conv.epoch}:${id}`, entry);
    conv.lastId = Math.max(conv.lastId, id);
    if (id === conv.heard + 1) conv.heard = id; // (nothing can be missing before it: see heard)
    conv.place(entry);
    this.pending.delete(entry.ref);
    this.#savePending();
  }

  #onMessage(msg) {
    const conv = this.conversations.get(msg.room);
    if (!conv || conv.kind !== "room") return;
    const entry = this.#merge(conv, msg);
    this.#emit("entries", { key: conv.key, added: entry ? [entry] : [] });
  }

  #onAck(msg) {
    const entry = this.pending.get(msg.ref);
    const conv = this.conversations.get(msg.room);
    if (!entry || !conv || entry.kind !== "message") return;
    this.#confirm(conv, entry, Number(msg.id), msg.ts);
    this.#flush(); // the next one, if any
    this.#emit("entries", { key: conv.key, added: [] });
  }

  #onPresence(msg) {
    const conv = this.conversations.get(msg.room);
    if (!conv || conv.kind !== "room") return;
    const member = who(msg.member);
    const before = conv.members.get(member.id);
    switch (msg.event) {
      case "join":
        if (!before) conv.memberCount += 1;
        conv.members.set(member.id, member);
        this.#notice(conv, `${member.nick} joined`).about = { id: member.id, event: "join" };
        break;
      case "leave":
        if (before) conv.memberCount = Math.max(0, conv.memberCount - 1);
        conv.members.delete(member.id);
        conv.typing.delete(member.id);
        this.#notice(conv, `${member.nick} left`);
        break;
      case "nick": {
        conv.members.set(member.id, member);
        // Someone who renames right after arriving just "joined" under the new name.
        const arrival = this.#recentJoin(conv, member.id);
        if (arrival) arrival.text = `${member.nick} joined`;
        else if (before && before.nick !== member.nick) this.#notice(conv, `${before.nick} is now ${member.nick}`);
        this.#renamePeer(member);
        break;
      }
      default:
        return;
    }
    this.#emit("members", { key: conv.key });
    this.#emit("entries", { key: conv.key, added: [] });
  }

  #recentJoin(conv, id) {
    const since = this.now() / 1000 - 60;
    for (let i = conv.entries.length - 1; i >= Math.max(0, conv.entries.length - 20); i -= 1) {
      const e = conv.entries[i];
      // Once they have spoken under the old name, the rename is news: "joined" stays as it was.
      if (e.kind === "message" && e.from && e.from.id === id) return null;
      if (e.kind === "notice" && e.about && e.about.id === id && e.about.event === "join" && e.ts > since) return e;
    }
    return null;
  }

  #renamePeer(member) {
    const conv = this.directs.get(member.id);
    if (conv && conv.peer.nick !== member.nick) {
      conv.peer = member;
      conv.name = member.nick;
      this.#emit("rooms");
    }
  }

  #onNick(msg) {
    this.self = { id: Number(msg.id), nick: String(msg.nick) };
    this.wantedNick = this.self.nick;
    for (const conv of this.conversations.values()) {
      if (conv.members.has(this.self.id)) {
        conv.members.set(this.self.id, { ...this.self });
        this.#emit("members", { key: conv.key });
      }
    }
    // Requests are answered in order: what is still unconfirmed was sent after the rename
    // (or is not sent yet), so the others see it under the new name. Show it so here too.
    const renamed = new Set();
    for (const entry of this.pending.values()) {
      entry.from = { ...this.self };
      renamed.add(entry.room);
    }
    for (const key of renamed) this.#emit("entries", { key, added: [] });
    this.#emit("self");
  }

  #onDirect(msg) {
    const from = who(msg.from);
    const conv = this.direct(from);
    this.#renamePeer(from);
    const entry = {
      key: `d:${++conv.seq}`, kind: "direct", ref: null, id: null, epoch: null, from,
      text: String(msg.text), ts: Number(msg.ts), status: "sent", error: null, mine: false,
      room: conv.key, sort: [0, conv.seq, 0],
    };
    conv.place(entry);
    this.#emit("entries", { key: conv.key, added: [entry] });
  }

  #onTyping(msg) {
    const conv = this.conversations.get(msg.room);
    if (!conv) return;
    const from = who(msg.from);
    conv.typing.set(from.id, { nick: from.nick, until: this.now() + TYPING_MS });
    this.#emit("typing", { key: conv.key });
  }

  #onPong(msg) {
    const ref = typeof msg.ref === "string" ? msg.ref : "";
    if (!ref.startsWith("dm:")) return;
    const entry = this.pending.get(ref.slice(3));
    // (sentOn null: the direct itself was refused, to be sent again; this answers that try.)
    if (!entry || entry.sentOn === null) return;
    this.pending.delete(entry.ref);
    if (entry.status === "pending") entry.status = "sent";
    this.#flush(); // the next direct, if any
    this.#emit("entries", { key: entry.room, added: [] });
  }

  #onError(msg) {
    const ref = typeof msg.ref === "string" ? msg.ref : null;
    const code = String(msg.code);
    const text = String(msg.message || code);
    if (code === "rate_limited") this.quietUntil = this.now() + RATE_PAUSE_MS;
    // A typing notice or a heartbeat's ping refused: no loss (the refusal is an answer too),
    // nothing to resend, and not the user's doing.
    if (ref === "typing" || ref === "heartbeat") return;
    if (ref && ref.startsWith("dm:")) {
      // Any answer to the ping after a direct, even a refusal, means the direct itself was
      // handled without an error (those come first, in order): it went through.
      this.#onPong({ ref });
      return;
    }
    const entry = ref && this.pending.get(ref);
    if (!entry && code === "no_such_client") return; // another direct to an ended conversation
    if (!entry && code === "not_in_room" && ref) return; // a message of a room we let go
    if (entry) {
      if (code === "unavailable" && entry.kind === "message") {
        entry.sentOn = null; // not stored: sent again at the next tick, the others after it
        return;
      }
      if (code === "rate_limited") {
        // We sent too fast: again after a pause (a message with its ref; a direct was not
        // sent, so sending it again cannot make two).
        if (entry.kind === "direct") entry.sentOn = null;
        this.#resendLater([entry]);
        return;
      }
      const conv = this.conversations.get(entry.room);
      if (code === "no_such_client" && conv && conv.kind === "direct") {
        this.#endDirect(conv, `${conv.peer.nick} is no longer connected`);
        this.#flush(); // directs to others, if any
        return; // the entry failed with the others
      }
      this.#fail(entry, text);
      this.#flush(); // the next one, if any
      return;
    }
    const joining = ref && ref.startsWith("join:") ? this.conversations.get(ref.slice(5)) : null;
    // Joins asked too fast (a reconnect with many rooms), or a rejoin of a room we were in
    // while the server's store is unreachable: ask again after a pause, keeping the room
    // and what waits to be sent to it.
    if (joining && (code === "rate_limited" || (code === "unavailable" && joining.epoch !== null))) {
      const generation = this.generation; // (a new connection asks for itself)
      this.timers.setTimeout(() => {
        // (The lobby's join after a reconnect is how it catches up: asked again too.)
        if (this.connected && this.generation === generation &&
            (joining.state === "joining" || joining.key === LOBBY)) {
          this.#sendJoin(joining);
        }
      }, RATE_PAUSE_MS);
      return;
    }
    const leaving = ref && ref.startsWith("leave:") ? ref.slice(6) : null;
    if (code === "rate_limited" && leaving !== null) {
      // The server keeps us in the room until a leave goes through: ask again after a pause,
      // unless we joined it again meanwhile (a new connection is in no room it did not ask).
      const generation = this.generation;
      this.timers.setTimeout(() => {
        if (this.connected && this.generation === generation && !this.conversations.has(leaving)) {
          this.#send({ type: "leave", room: leaving, ref });
        }
      }, RATE_PAUSE_MS);
      return;
    }
    if (code === "rate_limited") {
      // A request we do not track (or a server that does not name it): resend whatever is
      // unconfirmed (the refs make that safe) once the limit lets us.
      this.#resendLater([...this.pending.values()].filter((e) => e.kind === "message"));
    }
    let about = "other";
    if (ref && ref.startsWith("join:")) {
      about = "join";
      const conv = this.conversations.get(ref.slice(5));
      if (conv && conv.key !== LOBBY) this.#forget(conv);
    } else if (ref === "nick") {
      about = "nick";
      this.wantedNick = this.self.nick;
    }
    this.#emit("problem", { code, message: text, about });
  }

  // -- helpers -----------------------------------------------------------------------------

  /** Send `entries` again after RATE_PAUSE_MS, not before (whatever flushes meanwhile): one
   * timer however many rate_limited answers ask for it. */
  #resendLater(entries) {
    for (const entry of entries) this.held.add(entry);
    if (this.resendTimer !== null) return;
    this.resendTimer = this.timers.setTimeout(() => {
      this.resendTimer = null;
      for (const entry of this.held) entry.sentOn = null;
      this.held.clear();
      this.#flush();
    }, RATE_PAUSE_MS);
  }

  /** Send unconfirmed messages, oldest first (a direct only once: see #lost). Room messages
   * go one at a time, the next once the last is acked: the server stores them in the order
   * it accepts them, and one refused as rate_limited must not be overtaken by the next.
   * Directs do the same in a lane of their own, the next once the last is answered: else
   * those typed offline would go all at once on reconnect, a flood the server closes. */
  #flush() {
    if (!this.connected) return;
    let inFlight = false;
    let directInFlight = false;
    for (const entry of this.pending.values()) {
      if (entry.kind === "direct") {
        if (directInFlight) continue;
        if (entry.sentOn !== null || this.held.has(entry)) {
          directInFlight = true; // answered, or refused and to be sent again, before the next
          continue;
        }
        const conv = this.conversations.get(entry.room);
        const frame = { type: "direct", to: conv.peer.id, text: entry.text, ref: entry.ref };
        if (this.#tooBig(entry, frame)) continue;
        this.#send(frame);
        // Requests are answered in order, so this pong means the direct went through,
        // unless an error with its ref came first. (The server has no ack for directs.)
        this.#send({ type: "ping", ref: `dm:${entry.ref}` });
        entry.sentOn = this.generation;
        directInFlight = true;
        continue;
      }
      if (entry.kind !== "message") continue;
      // Not before the room is joined (#onJoined flushes): a join refused as rate_limited
      // is asked again later, and this message would meet "not_in_room" meanwhile.
      const conv = this.conversations.get(entry.room);
      if (!conv || conv.state !== "joined") continue;
      if (entry.sentOn === this.generation) inFlight = true;
      if (inFlight) continue;
      const frame = { type: "message", room: entry.room, text: entry.text, ref: entry.ref };
      if (this.#tooBig(entry, frame)) continue;
      this.#send(frame);
      entry.sentOn = this.generation;
      entry.sentAt = this.now();
      inFlight = true;
    }
  }

  #room(name) {
    let conv = this.conversations.get(name);
    if (!conv) {
      conv = new Conversation(name, "room", name);
      this.conversations.set(name, conv);
      this.#emit("rooms");
    }
    return conv;
  }

  /** A direct conversation can no longer reach its peer: say why, fail what waits for it,
   * and let a new conversation with that id start afresh. */
  #endDirect(conv, why) {
    if (conv.ended) return;
    conv.ended = why;
    if (this.directs.get(conv.peer.id) === conv) this.directs.delete(conv.peer.id);
    for (const [ref, entry] of this.pending) {
      if (entry.room !== conv.key) continue;
      this.pending.delete(ref);
      entry.status = "failed";
      entry.error = why;
    }
    this.#notice(conv, `This conversation has ended: ${why}.`, [0, conv.seq + 1, 0]);
    this.#emit("entries", { key: conv.key, added: [] });
    this.#emit("rooms");
    this.#emit("members", { key: conv.key }); // its header, member list and composer change
  }

  #forget(conv) {
    conv.state = "left";
    if (conv.kind === "direct" && this.directs.get(conv.peer.id) === conv) this.directs.delete(conv.peer.id);
    this.conversations.delete(conv.key);
    for (const [ref, entry] of this.pending) if (entry.room === conv.key) this.pending.delete(ref);
    this.#saveRooms();
    this.#savePending();
    this.#emit("rooms");
    this.#flush(); // what waited behind a message of this room
  }

  #notice(conv, text, sort = [conv.ordinal(), conv.lastId, 1]) {
    const seq = ++conv.seq;
    const entry = {
      key: `n:${seq}`, kind: "notice", text, ts: this.now() / 1000, status: "sent", mine: false,
      room: conv.key, sort: [sort[0], sort[1], sort[2] + seq / 1e6],
    };
    conv.place(entry);
    return entry;
  }

  #remember(ref) {
    this.myRefs.add(ref);
    if (this.myRefs.size > REFS_KEPT) this.myRefs.delete(this.myRefs.values().next().value);
    this.#store("chat.refs", [...this.myRefs]);
  }

  #emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // Joined rooms and unconfirmed messages survive a reload of the tab (sessionStorage).
  #store(key, value) {
    try {
      this.storage?.setItem(key, JSON.stringify(value));
    } catch (err) {
      // storage full or disabled: the session still works, it just forgets on reload
    }
  }

  #load(key) {
    try {
      const raw = this.storage?.getItem(key);
      return raw ? JSON.parse(raw) : null;
    } catch (err) {
      return null;
    }
  }

  #saveRooms() {
    const names = [...this.conversations.values()]
      .filter((c) => c.kind === "room" && c.key !== LOBBY && c.state !== "left").map((c) => c.key);
    this.#store("chat.rooms", names);
  }

  #savePending() {
    const list = [...this.pending.values()].filter((e) => e.kind === "message")
      .map((e) => ({ ref: e.ref, room: e.room, text: e.text, ts: e.ts }));
    this.#store("chat.pending", list);
  }

  #restore() {
    for (const ref of this.#load("chat.refs") || []) if (typeof ref === "string") this.myRefs.add(ref);
    for (const name of this.#load("chat.rooms") || []) {
      if (typeof name === "string" && ROOM_NAME.test(name)) this.#room(name);
    }
    for (const p of this.#load("chat.pending") || []) {
      if (!p || typeof p.ref !== "string" || typeof p.text !== "string" || !ROOM_NAME.test(String(p.room))) continue;
      const conv = this.#room(p.room);
      const entry = {
        key: `r:${p.ref}`, kind: "message", ref: p.ref, text: p.text, from: { id: null, nick: null },
        ts: Number(p.ts), mine: true, status: "pending", id: null, epoch: null, error: null,
        sentOn: null, sentAt: 0, room: p.room, sort: [LAST, 0, ++conv.seq],
      };
      conv.index.set(entry.key, entry);
      conv.place(entry);
      this.pending.set(p.ref, entry);
    }
  }
}
