// The chat page: draws the ChatClient's state into the DOM and turns clicks and keys into
// calls on it. Protocol logic lives in client.js; everything from the network reaches the
// page through textContent (never innerHTML).
import { ChatClient, chatUrl, LOBBY, NICK_MAX, ROOM_NAME, TYPING_MS } from "./client.js";

const $ = (id) => document.getElementById(id);
const GROUP_SECONDS = 5 * 60; // consecutive messages from one person within this are grouped
const TYPING_EVERY = 3000; // ms between our own typing notices
const HUES = 8;

const ui = {
  app: $("app"), status: $("status"), statusText: $("status-text"),
  countdown: $("status-countdown"), retry: $("retry"), rooms: $("rooms"), directs: $("directs"),
  directsEmpty: $("directs-empty"), logs: $("logs"), title: $("room-title"), meta: $("room-meta"),
  leave: $("leave"), typing: $("typing"), composer: $("composer"), text: $("composer-text"),
  composerLabel: $("composer-label"), send: $("send"), members: $("members"), membersMore: $("members-more"),
  membersTitle: $("members-title"), membersCount: $("members-toggle-count"),
  nickForm: $("nick-form"), nick: $("nick"), nickNote: $("nick-note"), joinForm: $("join-form"),
  joinRoom: $("join-room"), joinNote: $("join-note"), toast: $("toast"),
  roomsToggle: $("rooms-toggle"), membersToggle: $("members-toggle"), scrim: $("scrim"),
};

const storedNick = readLocal("chat.nick");
const client = new ChatClient({
  url: chatUrl(location),
  nick: storedNick,
  storage: window.sessionStorage,
});

let active = LOBBY;
const unread = new Map(); // conversation key -> count of messages not yet seen
const logs = new Map(); // conversation key -> {list, nodes: Map(entry key -> li), stuck}
const lastTypingSent = new Map();
let typingTimer = null;
let countdownTimer = null;
let toastTimer = null;
const JOIN_HINT = ui.joinNote.textContent; // the join box's standing note, from the page
let nickAsked = null; // the name the form last asked for, until the server confirms it

// -- small DOM helpers ------------------------------------------------------------------------

/** An element with properties and children; strings become text nodes, never markup. */
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child); // append(string) makes a text node
  }
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function readLocal(key) {
  try {
    return window.localStorage.getItem(key);
  } catch (err) {
    return null;
  }
}

function writeLocal(key, value) {
  try {
    window.localStorage.setItem(key, value);
  } catch (err) {
    // private mode or full: the nick just is not remembered
  }
}

/** Keep `nick` for the next visit; not a connection's default name, which names whoever
 * has that id next time (the server would refuse it). */
function rememberNick(nick) {
  writeLocal("chat.nick", /^Client \d+$/.test(nick) ? "" : nick);
}

// Whole characters as people see them: a flag or a family emoji is one, not two halves.
const graphemes = typeof Intl.Segmenter === "function" ? new Intl.Segmenter(undefined, { granularity: "grapheme" }) : null;

function firstCharacter(word) {
  if (graphemes) return graphemes.segment(word)[Symbol.iterator]().next().value?.segment || "";
  return Array.from(word)[0] || "";
}

function initials(nick) {
  const text = String(nick || "?").trim();
  const number = /^Client (\d+)$/.exec(text);
  if (number) return number[1].slice(-3); // default names differ only in their number
  const words = text.split(/\s+/).filter(Boolean);
  const out = words.length > 1 ? firstCharacter(words[0]) + firstCharacter(words[1]) : firstCharacter(words[0] || "?");
  return out.toUpperCase();
}

function hueOf(nick) {
  let hash = 0;
  for (const ch of String(nick)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `hue-${hash % HUES}`;
}

const clock = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });
const dayClock = new Intl.DateTimeFormat(undefined, { weekday: "short", hour: "numeric", minute: "2-digit" });
const fullClock = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function timeParts(ts) {
  const date = new Date(ts * 1000);
  if (Number.isNaN(date.getTime())) return { short: "", full: "", iso: "" };
  const today = new Date().toDateString() === date.toDateString();
  return { short: (today ? clock : dayClock).format(date), full: fullClock.format(date), iso: date.toISOString() };
}

function label(conv) {
  if (!conv) return "";
  return conv.kind === "room" ? `#${conv.key}` : conv.name;
}

// -- the message logs -------------------------------------------------------------------------

function logFor(key) {
  let log = logs.get(key);
  if (!log) {
    const conv = client.conversations.get(key);
    const list = h("ol", {
      class: "log", role: "log", "aria-live": "polite", tabIndex: 0,
      "aria-label": `Messages in ${label(conv)}`, "data-testid": "messages", "data-key": key,
    });
    list.hidden = key !== active;
    log = { list, nodes: new Map(), stuck: true };
    let width = list.clientWidth, height = list.clientHeight;  // as the observer last saw it
    list.addEventListener("scroll", () => {
      // A scroll the browser makes as the log changes size (clamping, scroll anchoring)
      // comes before the observer below hears of the new size: it is not the reader's, and
      // must not unstick the log.
      if (list.clientWidth !== width || list.clientHeight !== height) return;
      log.stuck = list.scrollHeight - list.scrollTop - list.clientHeight < 48;
    });
    // A log that shrinks (a phone turned sideways, the composer growing) keeps its scroll
    // position, which hides the newest lines: one that showed the end goes on showing it.
    new ResizeObserver(() => {
      width = list.clientWidth;
      height = list.clientHeight;
      if (log.stuck) scrollToEnd(log);
    }).observe(list);
    ui.logs.append(list);
    logs.set(key, log);
  }
  return log;
}

function messageNode(entry) {
  if (entry.kind === "notice") {
    const node = h("li", { class: "notice", "data-testid": "notice" }, h("span", { text: entry.text }));
    node.parts = {};
    return node;
  }
  const avatar = h("span", { class: "avatar", "aria-hidden": "true" });
  // dir=auto: a name or text in a right-to-left script reads from its own start, and does
  // not reorder what stands beside it.
  const author = h("span", { class: "author", dir: "auto" });
  const time = h("time", { class: "time" });
  const state = h("span", { class: "msg-state" });
  const text = h("p", { class: "msg-text", dir: "auto", text: entry.text });
  const node = h("li", { class: "msg", "data-testid": "message" }, avatar,
    h("div", { class: "msg-body" }, h("p", { class: "msg-meta" }, author, " ", time, state), text));
  node.parts = { avatar, author, time, state };
  return node;
}

function updateMessage(node, entry, previous) {
  if (entry.kind === "notice") {
    setText(node.firstChild, entry.text);
    return;
  }
  const { avatar, author, time, state } = node.parts;
  const nick = entry.mine ? entry.from.nick || client.self.nick || "You" : entry.from.nick;
  setText(author, nick);
  setText(avatar, initials(nick));
  const hue = hueOf(nick);
  if (!avatar.classList.contains(hue)) {
    avatar.className = `avatar ${hue}`;
  }
  const when = timeParts(entry.ts);
  setText(time, when.short);
  if (time.dateTime !== when.iso) time.dateTime = when.iso;
  if (time.title !== when.full) time.title = when.full;
  let stateText = "";
  if (entry.status === "pending") stateText = client.connected ? "Sending…" : "Not sent yet: waiting for the connection";
  else if (entry.status === "failed") stateText = `Not sent: ${entry.error || "refused"}`;
  setText(state, stateText ? ` · ${stateText}` : "");
  const grouped = !!previous && previous.kind === entry.kind && previous.kind !== "notice" &&
    previous.from.nick === entry.from.nick && previous.mine === entry.mine &&
    previous.status !== "failed" && entry.ts - previous.ts < GROUP_SECONDS && entry.ts >= previous.ts;
  node.classList.toggle("grouped", grouped);
  node.classList.toggle("mine", entry.mine);
  if (node.dataset.status !== entry.status) node.dataset.status = entry.status;
  if (entry.ref && node.dataset.ref !== entry.ref) node.dataset.ref = entry.ref;
}

/** Bring conversation `key`'s list in line with its entries, touching only what changed,
 * so that screen readers announce new messages and nothing else. */
function renderLog(key, added = []) {
  const conv = client.conversations.get(key);
  if (!conv) return;
  const log = logFor(key);
  const { list, nodes } = log;
  const seen = new Set();
  let cursor = list.firstChild;
  let previous = null;
  for (const entry of conv.entries) {
    let node = nodes.get(entry.key);
    if (!node) {
      node = messageNode(entry);
      nodes.set(entry.key, node);
    }
    seen.add(entry.key);
    updateMessage(node, entry, previous);
    if (node === cursor) cursor = cursor.nextSibling;
    else list.insertBefore(node, cursor);
    previous = entry;
  }
  for (const [entryKey, node] of nodes) {
    if (!seen.has(entryKey)) {
      node.remove();
      nodes.delete(entryKey);
    }
  }
  if (log.stuck || added.some((e) => e.mine)) scrollToEnd(log);
}

function scrollToEnd(log) {
  log.stuck = true;
  if (!log.list.hidden) log.list.scrollTop = log.list.scrollHeight;
}

// -- rooms, members, header -----------------------------------------------------------------

function badge(key) {
  return countBadge(unread.get(key) || 0, "unread");
}

function countBadge(count, testid) {
  if (!count) return null;
  return h("span", { class: "badge", "data-testid": testid }, String(count > 99 ? "99+" : count),
    h("span", { class: "visually-hidden", text: count === 1 ? " unread message" : " unread messages" }));
}

/** Run `redraw`, which replaces `container`'s children, and put the keyboard focus back on
 * the new element for the same thing (same `attr` value) if it was inside. */
function keepFocus(container, attr, redraw) {
  const focused = container.contains(document.activeElement) ? document.activeElement.closest(`[${attr}]`) : null;
  const value = focused && focused.getAttribute(attr);
  redraw();
  if (value === null || value === undefined) return;
  for (const node of container.querySelectorAll(`[${attr}]`)) {
    if (node.getAttribute(attr) === value) {
      (node.matches("a, button") ? node : node.querySelector("a, button") || node).focus({ preventScroll: true });
      return;
    }
  }
}

function renderRooms() {
  keepFocus(ui.rooms, "data-room", drawRooms);
  keepFocus(ui.directs, "data-key", drawDirects);
  updateTitle();
}

function drawRooms() {
  const rooms = [...client.conversations.values()].filter((conv) => conv.kind === "room");
  ui.rooms.replaceChildren(...rooms.map((conv) => {
    const current = conv.key === active;
    const link = h("a", {
      class: "nav-item", href: `#${conv.key}`, "data-room": conv.key,
      "aria-current": current ? "page" : null,
    }, h("span", { class: "nav-hash", "aria-hidden": "true", text: "#" }),
    h("span", { class: "nav-name", text: conv.key }), badge(conv.key));
    link.addEventListener("click", () => activate(conv.key, { focus: true }));
    return h("li", {}, link);
  }));
}

function drawDirects() {
  const directs = [...client.conversations.values()].filter((conv) => conv.kind === "direct");
  ui.directs.replaceChildren(...directs.map((conv) => {
    const current = conv.key === active;
    const button = h("button", {
      type: "button", class: "nav-item", "data-key": conv.key, "aria-current": current ? "true" : null,
    }, h("span", { class: `avatar small ${hueOf(conv.name)}`, "aria-hidden": "true", text: initials(conv.name) }),
    h("span", { class: "nav-name", dir: "auto", text: conv.name }),
    conv.ended ? h("span", { class: "nav-tag", text: "ended" }) : null, badge(conv.key));
    if (conv.ended) button.classList.add("ended");
    button.addEventListener("click", () => activate(conv.key, { focus: true }));
    return h("li", {}, button);
  }));
  ui.directsEmpty.hidden = directs.length > 0;
}

function online(id) {
  for (const conv of client.conversations.values()) if (conv.members.has(id)) return true;
  return false;
}

function renderMembers() {
  const conv = client.conversations.get(active);
  if (!conv) return;
  let people;
  if (conv.kind === "room") {
    people = [...conv.members.values()];
    setText(ui.membersTitle, `Members of #${conv.key}`);
  } else {
    people = [client.self, conv.peer].filter((p) => p && p.id !== null);
    setText(ui.membersTitle, "In this conversation");
  }
  // (In a direct conversation that ended with a server restart, our new id may be the
  // peer's old one: there, we are the self object itself.)
  const isSelf = (p) => (conv.kind === "direct" ? p === client.self : p.id === client.self.id);
  people.sort((a, b) => isSelf(b) - isSelf(a) ||
    a.nick.localeCompare(b.nick, undefined, { sensitivity: "base" }));
  keepFocus(ui.members, "data-id", () => ui.members.replaceChildren(...people.map((person) => {
    const face = h("span", { class: `avatar small ${hueOf(person.nick)}`, "aria-hidden": "true", text: initials(person.nick) });
    if (isSelf(person)) {
      return h("li", { "data-id": String(person.id) }, h("span", { class: "member self" }, face,
        h("span", { class: "member-name", dir: "auto", text: person.nick }), h("span", { class: "you", text: "you" })));
    }
    if (conv.ended) {
      // Its id may name someone else now: no link to a new conversation from here.
      return h("li", { "data-id": String(person.id) }, h("span", { class: "member away" }, face,
        h("span", { class: "member-name", dir: "auto", text: person.nick })));
    }
    const button = h("button", { type: "button", class: "member", title: `Send ${person.nick} a direct message` },
      face, h("span", { class: "member-name", dir: "auto", text: person.nick }),
      h("span", { class: "visually-hidden", text: ", send a direct message" }));
    if (conv.kind === "direct" && !online(person.id)) button.classList.add("away");
    button.addEventListener("click", () => {
      const dm = client.direct(person);
      activate(dm.key, { focus: true });
    });
    return h("li", { "data-id": String(person.id) }, button);
  })));
  ui.members.classList.toggle("stale", !client.connected); // last known, while reconnecting
  const more = conv.kind === "room" ? conv.memberCount - conv.members.size : 0;
  setText(ui.membersMore, more > 0 ? `and ${more} more` : "");
  ui.membersMore.hidden = more <= 0;
  setText(ui.membersCount, conv.kind === "room" ? String(conv.memberCount) : "");
  renderHeader();
}

function renderHeader() {
  const conv = client.conversations.get(active);
  if (!conv) return;
  setText(ui.title, label(conv));
  let meta;
  if (conv.kind === "room") {
    if (conv.state === "joining" && !client.connected) meta = "Offline: showing what arrived before";
    else if (conv.state === "joining") meta = "Joining…";
    else meta = conv.memberCount === 1 ? "Just you here" : `${conv.memberCount} people here`;
  } else if (conv.ended) {
    meta = `Ended: ${conv.ended}`;
  } else {
    meta = online(conv.peer.id) ? "Direct message, online" : "Direct message, not in your rooms now";
  }
  setText(ui.meta, meta);
  ui.leave.hidden = conv.key === LOBBY;
  setText(ui.leave, conv.kind === "room" ? "Leave room" : "Close");
  const placeholder = conv.ended ? "This conversation has ended" : `Message ${label(conv)}`;
  if (ui.text.placeholder !== placeholder) ui.text.placeholder = placeholder;
  setText(ui.composerLabel, placeholder);
  const ended = !!conv.ended;
  if (ended && (document.activeElement === ui.text || document.activeElement === ui.send)) {
    // A disabled box drops the focus to the page's start. The log is where it can go
    // harmlessly (not Close: the next key typed would press it); its notice is read out.
    logFor(conv.key).list.focus({ preventScroll: true });
  }
  ui.text.disabled = ui.send.disabled = ended;
}

function renderTyping() {
  const conv = client.conversations.get(active);
  const names = conv ? conv.typers(Date.now()) : [];
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = "Several people are typing…";
  setText(ui.typing, text);
  ui.typing.classList.toggle("on", !!text);
  clearTimeout(typingTimer);
  if (text) typingTimer = setTimeout(renderTyping, 1000);
}

function renderStatus() {
  let text;
  let state = client.state;
  if (client.state === "open") text = "Connected";
  else if (client.state === "connecting") text = client.everConnected ? "Reconnecting…" : "Connecting…";
  else if (client.state === "waiting") text = "Reconnecting…";
  else {
    text = "Disconnected";
    state = "stopped";
  }
  ui.status.dataset.state = state;
  setText(ui.statusText, text);
  ui.retry.hidden = client.state !== "waiting";
  clearInterval(countdownTimer);
  const tick = () => {
    const left = client.retryAt ? Math.max(0, Math.ceil((client.retryAt - Date.now()) / 1000)) : 0;
    let note = "";
    if (client.state === "waiting") note = navigator.onLine === false ? "offline" : left > 0 ? `in ${left} s` : "";
    setText(ui.countdown, note);
  };
  tick();
  if (client.state === "waiting") countdownTimer = setInterval(tick, 250);
}

function updateTitle() {
  let total = 0;
  for (const n of unread.values()) total += n;
  const title = `${label(client.conversations.get(active)) || "Chat"} · Chat`;
  document.title = total ? `(${total}) ${title}` : title;
  // On a phone the lists are in a drawer: its button carries the count, as the title does.
  const shown = ui.roomsToggle.querySelector(".badge");
  if ((shown ? shown.firstChild.data : "") !== String(total > 99 ? "99+" : total || "")) {
    if (shown) shown.remove();
    if (total) ui.roomsToggle.append(countBadge(total, "rooms-unread"));
  }
}

function toast(message) {
  setText(ui.toast, message);
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { ui.toast.hidden = true; }, 6000);
}

// -- switching conversations ----------------------------------------------------------------

// fromUrl: the address named `key` (a link, Back, a reload); when it named a room that is
// refused, the lobby replaces that entry rather than stacking on it, so Back leaves.
function activate(key, { focus = false, fromUrl = false } = {}) {
  if (!client.conversations.has(key)) key = LOBBY;
  const changed = key !== active;
  active = key;
  for (const [k, log] of logs) log.list.hidden = k !== key;
  const log = logFor(key);
  renderLog(key);
  log.list.hidden = false;
  if (log.stuck) scrollToEnd(log);
  unread.delete(key);
  if (client.conversations.get(key).kind === "room" && location.hash !== `#${key}` &&
      !(key === LOBBY && !location.hash)) {
    history[fromUrl ? "replaceState" : "pushState"](null, "", `#${key}`);
  }
  renderRooms();
  renderMembers();
  renderTyping();
  closePanels();
  if (changed || focus) ui.text.focus({ preventScroll: true });
}

function fromHash() {
  const raw = location.hash.slice(1);
  let name = "";
  try {
    name = decodeURIComponent(raw);
  } catch (err) {
    name = raw; // a stray %: refused below, by its own spelling
  }
  if (!name) return LOBBY;
  if (!ROOM_NAME.test(name)) {
    toast(name.length > 64 && ROOM_NAME.test(name.slice(0, 64))
      ? `“${name.slice(0, 40)}…” is too long for a room name: at most 64 characters`
      : `“${name.slice(0, 64)}” is not a room name: use letters, digits, -, _ or .`);
    return LOBBY;
  }
  client.join(name);
  return name;
}

// -- panels on narrow screens ---------------------------------------------------------------

function openPanel(which) {
  const toggle = which === "rooms" ? ui.roomsToggle : ui.membersToggle;
  const panel = which === "rooms" ? $("sidebar") : $("members-panel");
  const open = ui.app.dataset.panel !== which;
  closePanels();
  if (!open) return;
  ui.app.dataset.panel = which;
  toggle.setAttribute("aria-expanded", "true");
  ui.scrim.hidden = false;
  // A drawer is modal: Tab stays in it, and a screen reader reads only it.
  for (const region of pageRegions()) region.inert = region !== panel && region !== ui.scrim;
  const first = panel.querySelector("a, input, button:not(.panel-close)");
  if (first) first.focus();
}

/** What a drawer makes inert: the page around it (not the toast, which must still be heard). */
function pageRegions() {
  return [...document.body.children, ...ui.app.children].filter((e) => e !== ui.app && e !== ui.toast);
}

function closePanels({ restoreFocus = false } = {}) {
  const was = ui.app.dataset.panel;
  ui.app.dataset.panel = "none";
  for (const region of pageRegions()) region.inert = false;
  ui.roomsToggle.setAttribute("aria-expanded", "false");
  ui.membersToggle.setAttribute("aria-expanded", "false");
  ui.scrim.hidden = true;
  if (restoreFocus && was !== "none") (was === "rooms" ? ui.roomsToggle : ui.membersToggle).focus();
}

// -- wiring ---------------------------------------------------------------------------------

client.addEventListener("status", () => {
  renderStatus();
  renderMembers();
  renderLog(active); // pending messages say whether they are waiting for the connection
});

client.addEventListener("self", () => {
  const { nick } = client.self;
  if (client.wantedNick && nick === client.wantedNick) rememberNick(nick);
  if (nickAsked !== null && nick === nickAsked) {
    setText(ui.nickNote, `Saved: you are “${nick}”.`); // also replaces "once connected"
    nickAsked = null;
  }
  if (document.activeElement !== ui.nick) ui.nick.value = nick;
  ui.nick.placeholder = nick;
  renderMembers();
});

client.addEventListener("rooms", () => {
  // A conversation let go (left, or a rejoin refused) takes its log and unread count along.
  for (const [key, log] of logs) {
    if (!client.conversations.has(key)) {
      log.list.remove();
      logs.delete(key);
    }
  }
  for (const key of unread.keys()) if (!client.conversations.has(key)) unread.delete(key);
  if (!client.conversations.has(active)) activate(LOBBY);
  renderRooms();
});

client.addEventListener("entries", ({ detail }) => {
  const fresh = detail.initial ? 0 : detail.added.filter((e) => !e.mine && e.kind !== "notice").length;
  if (fresh && (detail.key !== active || document.hidden)) {
    unread.set(detail.key, (unread.get(detail.key) || 0) + fresh);
    renderRooms();
  }
  renderLog(detail.key, detail.added);
  if (detail.key === active) renderTyping();
});

client.addEventListener("members", ({ detail }) => {
  if (detail.key === active || client.conversations.get(active)?.kind === "direct") renderMembers();
  else renderHeader();
});

client.addEventListener("typing", ({ detail }) => {
  if (detail.key === active) renderTyping();
});

client.addEventListener("problem", ({ detail }) => {
  if (detail.about === "nick") {
    nickAsked = null;
    rememberNick(client.self.nick); // not the refused one, or it is refused at every visit
    setText(ui.nickNote, `Not changed: ${detail.message}`);
    ui.nickNote.classList.add("error");
  } else if (detail.about === "join") {
    setText(ui.joinNote, `Could not join: ${detail.message}`);
    ui.joinNote.classList.add("error");
    toast(`Could not join the room: ${detail.message}`);
  } else {
    toast(detail.message);
  }
});

function send() {
  const text = ui.text.value;
  if (!text.trim()) return;
  const conv = client.conversations.get(active);
  if (!conv) return;
  client.send(active, text);
  ui.text.value = "";
  lastTypingSent.delete(active);
  resizeComposer();
}

function resizeComposer() {
  if (CSS.supports("field-sizing", "content")) return;
  ui.text.style.height = "auto";
  ui.text.style.height = `${Math.min(ui.text.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    send();
  }
});

// The browser cuts a paste at the box's maxlength without a word: say so.
ui.text.addEventListener("paste", (event) => {
  const pasted = event.clipboardData ? event.clipboardData.getData("text").length : 0;
  const kept = ui.text.value.length - (ui.text.selectionEnd - ui.text.selectionStart);
  if (kept + pasted > ui.text.maxLength) {
    toast(`A message holds at most ${ui.text.maxLength.toLocaleString("en")} characters: the rest of what you pasted was left out.`);
  }
});

ui.text.addEventListener("input", () => {
  resizeComposer();
  const conv = client.conversations.get(active);
  if (!ui.text.value.trim() || !conv || conv.kind !== "room") return;
  const now = Date.now();
  if (now - (lastTypingSent.get(active) || 0) > TYPING_EVERY) {
    lastTypingSent.set(active, now);
    client.typing(active);
  }
});

ui.nickForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const nick = ui.nick.value.trim();
  ui.nickNote.classList.remove("error");
  const length = Array.from(nick).length; // as the server counts: code points
  if (!nick || length > NICK_MAX) {
    // A family emoji is one symbol on screen and seven code points: say why it is too long.
    const shown = [...new Intl.Segmenter().segment(nick)].length;
    setText(ui.nickNote, `A name is 1 to ${NICK_MAX} characters` + (nick && shown < length
      ? `, and this one counts as ${length}: some emoji count as several.` : "."));
    ui.nickNote.classList.add("error");
    return;
  }
  client.setNick(nick);
  nickAsked = nick;
  setText(ui.nickNote, client.connected ? "" : "Saved: it will be used once connected.");
  if (!client.connected) rememberNick(nick);
});

ui.joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = ui.joinRoom.value.trim().replace(/^#/, "");
  ui.joinNote.classList.remove("error");
  if (!ROOM_NAME.test(name)) {
    setText(ui.joinNote, "Use 1 to 64 letters, digits, -, _ or .");
    ui.joinNote.classList.add("error");
    return;
  }
  setText(ui.joinNote, JOIN_HINT);
  ui.joinRoom.value = "";
  client.join(name);
  activate(name, { focus: true });
});

ui.leave.addEventListener("click", () => {
  const conv = client.conversations.get(active);
  if (!conv || conv.key === LOBBY) return;
  const unsent = client.unsent(conv.key);
  const what = unsent === 1 ? "1 message" : `${unsent} messages`;
  if (unsent && !window.confirm(`${what} to ${label(conv)} not sent yet will be dropped. Leave anyway?`)) return;
  if (conv.kind === "room") client.leave(conv.key);
  else client.closeDirect(conv.key);
  activate(LOBBY, { focus: true });
});

ui.retry.addEventListener("click", () => client.reconnectNow());
// The skip link moves focus itself: following its #fragment would read as a room name.
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  ui.text.focus();
});
ui.roomsToggle.addEventListener("click", () => openPanel("rooms"));
ui.membersToggle.addEventListener("click", () => openPanel("members"));
ui.scrim.addEventListener("click", () => closePanels({ restoreFocus: true }));
for (const button of document.querySelectorAll(".panel-close")) {
  button.addEventListener("click", () => closePanels({ restoreFocus: true }));
}
// The same widths as chat.css's: past them a drawer is a fixed panel again, and the page
// behind it must not stay inert.
for (const width of ["(max-width: 700px)", "(max-width: 1000px)"]) {
  matchMedia(width).addEventListener("change", () => closePanels());
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.app.dataset.panel !== "none") {
    closePanels({ restoreFocus: true });
  } else if (event.altKey && (event.key === "ArrowUp" || event.key === "ArrowDown")) {
    // Alt+Up/Down: the previous or next conversation in the sidebar
    const keys = [...client.conversations.keys()];
    const step = event.key === "ArrowUp" ? -1 : 1;
    const next = keys[(keys.indexOf(active) + step + keys.length) % keys.length];
    event.preventDefault();
    activate(next, { focus: true });
  }
});

window.addEventListener("hashchange", () => activate(fromHash(), { fromUrl: true }));
// Closing the tab loses what is not confirmed yet (a reload keeps room messages, not direct
// ones), so the browser asks first, in its own words: a page cannot set them.
window.addEventListener("beforeunload", (event) => {
  if (!client.unsent()) return;
  event.preventDefault();
  event.returnValue = true; // (what older browsers look for instead)
});
window.addEventListener("online", () => client.reconnectNow());
// Offline means the socket is dead even if the browser has not noticed yet; reconnecting
// starts (and backs off) now, and "online" cuts the wait short.
window.addEventListener("offline", () => client.drop());
document.addEventListener("visibilitychange", () => {
  if (document.hidden) return;
  unread.delete(active);
  renderRooms();
  client.reconnectNow();
});

ui.nick.value = storedNick || "";
const first = fromHash();
logFor(LOBBY);
activate(first, { fromUrl: true });
// Ready to type, as in other chat apps; not on touch screens, where it would open the keyboard.
if (matchMedia("(pointer: fine)").matches) ui.text.focus({ preventScroll: true });
renderStatus();
client.start();
