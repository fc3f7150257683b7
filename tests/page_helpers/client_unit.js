// Run in a page of the server's origin by tests/test_page.py: client.js on its own, against a
// fake WebSocket that the script drives as if it were the server. Returns what it saw.
async () => {
  const m = await import("/static/client.js");
  const out = {};
  out.backoffLow = [1, 2, 3, 4, 5, 6, 8].map((n) => m.backoff(n, { random: () => 0 }));
  out.backoffHigh = [1, 2, 3, 4, 5, 6, 8].map((n) => m.backoff(n, { random: () => 0.999999 }));
  out.urls = [m.chatUrl({ protocol: "https:", host: "chat.example:8443" }),
              m.chatUrl({ protocol: "http:", host: "127.0.0.1:8080" })];

  // A fake socket: records what the client sends; the test plays the server.
  const sockets = [];
  class FakeSocket {
    constructor(url, protocol) { this.url = url; this.protocol = protocol; this.sent = []; sockets.push(this); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() { this.closed = true; }
    deliver(obj) { this.onmessage({ data: JSON.stringify(obj) }); }
    drop() { this.onclose({ code: 1006 }); }
  }
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (f) => { for (let i = 0; i < 200 && !f(); i++) await wait(5); };
  const client = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 } });
  const lobby = () => client.conversations.get("lobby");
  const shown = () => lobby().entries.map((e) => (e.kind === "notice" ? "--" : e.text + ":" + e.status));
  const msg = (id, text, ref) => ({ type: "message", room: "lobby", id, text, ts: 1700000000 + id,
                                    from: { id: 9, nick: "Zed" }, ...(ref ? { ref } : {}) });
  const welcome = (id, epoch, history) => ({ type: "welcome", id, nick: "Client " + id, room: "lobby",
    members: [{ id, nick: "Client " + id }], member_count: 1, history, epoch });

  client.start();
  out.protocol = sockets[0].protocol;
  sockets[0].deliver(welcome(1, "e1", [msg(1, "one")]));
  const entry = client.send("lobby", "mine");
  const ref = sockets[0].sent.at(-1).ref;
  out.firstSend = sockets[0].sent.at(-1);
  sockets[0].drop();  // before the ack came
  out.stateAfterDrop = client.state;
  await until(() => sockets.length === 2);
  // The server had stored "mine" as id 2 before the connection went.
  sockets[1].deliver(welcome(4, "e1", [msg(1, "one"), msg(2, "mine", ref)]));
  out.reconnectFrames = sockets[1].sent.map((f) => f.type === "join" ? [f.type, f.room, f.since, f.epoch] : [f.type, f.ref]);
  sockets[1].deliver({ type: "joined", room: "lobby", members: [], member_count: 1, epoch: "e1",
                       recovered: true, history: [msg(2, "mine", ref), msg(3, "three")] });
  sockets[1].deliver({ type: "ack", ref, room: "lobby", id: 2, ts: 1700000002 });
  out.afterRecovery = shown();
  out.lastId = lobby().lastId;

  // The server restarts: a new epoch, ids from 1 again; the old messages stay.
  sockets[1].drop();
  await until(() => sockets.length === 3);
  sockets[2].deliver(welcome(1, "e2", [msg(1, "new one")]));
  out.restartJoin = sockets[2].sent.find((f) => f.type === "join");
  sockets[2].deliver({ type: "joined", room: "lobby", members: [], member_count: 1, epoch: "e2",
                       recovered: false, history: [msg(1, "new one"), msg(2, "mine", ref)] });
  sockets[2].deliver(msg(3, "new three"));
  sockets[2].deliver(msg(3, "new three"));
  out.afterRestart = shown();
  out.reconnects = sockets.length;
  out.pendingLeft = client.pending.size;
  client.stop();

  // A socket that stops answering is given up on: a ping after `every` ms of silence, and a
  // new socket when no answer comes within `timeout`.
  const quiet = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 },
                                   heartbeat: { every: 40, timeout: 60, resend: 1000 } });
  const before = sockets.length;
  quiet.start();
  const silent = sockets.at(-1);
  silent.deliver(welcome(7, "h1", []));
  await until(() => sockets.length === before + 2);
  out.heartbeat = { pinged: silent.sent.some((f) => f.type === "ping"), closed: !!silent.closed,
                    sockets: sockets.length - before };
  quiet.stop();

  // A message the server refused as over the rate limit stays pending and is sent again,
  // with its ref, after a pause; it is not shown as failed.
  const eager = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 } });
  eager.start();
  const limited = sockets.at(-1);
  limited.deliver(welcome(8, "r1", []));
  const tooFast = eager.send("lobby", "too fast");
  const sentRef = limited.sent.at(-1).ref;
  limited.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: sentRef });
  const sends = () => limited.sent.filter((f) => f.ref === sentRef).length;
  eager.send("lobby", "next one");  // flushes: the refused one waits for the pause
  out.rateLimited = { status: tooFast.status, sendsBeforePause: sends() };
  for (let i = 0; i < 60 && sends() < 2; i++) await wait(50);
  out.rateLimited.sends = sends();
  // A join refused as too fast is asked again after the pause; the room is kept.
  eager.join("dev");
  limited.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: "join:dev" });
  const joins = () => limited.sent.filter((f) => f.type === "join" && f.room === "dev").length;
  for (let i = 0; i < 60 && joins() < 2; i++) await wait(50);
  out.rateLimited.joinKept = eager.conversations.has("dev");
  out.rateLimited.joins = joins();
  eager.stop();

  // Direct messages go to a connection: typed offline they wait for the next connection;
  // one that went out unconfirmed is not sent twice; a peer that is gone, or a server
  // restart (ids start again, so id 5 may be someone else), ends the conversation.
  // A client welcomed as id 3 in lobby epoch `epoch`, and its socket.
  const welcomed = (epoch) => {
    const c = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 } });
    c.start();
    sockets.at(-1).deliver(welcome(3, epoch, []));
    return [c, sockets.at(-1)];
  };
  const [dm, first] = welcomed("d1");
  let sock = first;
  const bob = dm.direct({ id: 5, nick: "Bob" });
  const sentDirect = dm.send(bob.key, "hello bob");
  sock.drop();  // before its pong
  const offline = dm.send(bob.key, "typed offline");
  out.directs = { unconfirmed: [sentDirect.status, sentDirect.error], offline: offline.status };
  await until(() => sockets.length && sockets.at(-1) !== sock);
  sock = sockets.at(-1);
  sock.deliver(welcome(3, "d1", []));  // the same server
  out.directs.resent = sock.sent.filter((f) => f.type === "direct").map((f) => [f.to, f.text]);
  sock.deliver({ type: "pong", ref: "dm:" + offline.ref });
  out.directs.offlineAfter = offline.status;
  const gone = dm.send(bob.key, "still there?");
  sock.deliver({ type: "error", code: "no_such_client", message: "no connection with id 5", ref: gone.ref });
  out.directs.gone = [gone.status, gone.error, bob.ended, dm.send(bob.key, "again").status];
  out.directs.newBob = dm.direct({ id: 5, nick: "Bob" }).key !== bob.key;
  const carl = dm.direct({ id: 6, nick: "Carl" });
  sock.drop();
  const waiting = dm.send(carl.key, "for carl");
  await until(() => sockets.at(-1) !== sock);
  sock = sockets.at(-1);
  sock.deliver(welcome(3, "d2", []));  // restarted: a new lobby epoch
  out.directs.restart = [carl.ended, waiting.status, waiting.error,
                         sock.sent.filter((f) => f.type === "direct").length];
  sock.deliver({ type: "direct", from: { id: 6, nick: "Dee" }, text: "hi", ts: 1700000000 });
  const dee = [...dm.conversations.values()].find((c) => c.kind === "direct" && !c.ended && c.peer.id === 6);
  out.directs.incomingAfterRestart = [dee && dee.key !== carl.key, dee && dee.name, carl.entries.length];
  dm.stop();

  // A direct refused as too fast is not failed: sent again after the pause (the pong that
  // follows the refusal confirms nothing); a refused ping after a direct confirms it.
  const [dm2, s2] = welcomed("d9");
  const eve = dm2.direct({ id: 7, nick: "Eve" });
  const fast = dm2.send(eve.key, "too fast");
  s2.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: fast.ref });
  s2.deliver({ type: "pong", ref: "dm:" + fast.ref });
  const tries = () => s2.sent.filter((f) => f.type === "direct" && f.ref === fast.ref).length;
  out.directs.rateLimited = [fast.status, tries()];
  for (let i = 0; i < 60 && tries() < 2; i++) await wait(50);
  s2.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: "dm:" + fast.ref });
  out.directs.rateLimited.push(tries(), fast.status, dm2.pending.size);
  dm2.stop();

  // A server that does not say its limit closes with 1009 on a message too big for it: that
  // message fails, and the one behind it goes on the next connection.
  const big = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 } });
  big.start();
  const b1 = sockets.at(-1);
  b1.deliver(welcome(1, "e1", []));
  const huge = big.send("lobby", "x".repeat(3000));
  const after = big.send("lobby", "after it");
  b1.onclose({ code: 1009, reason: "message exceeds 1000 bytes" });
  await until(() => sockets.at(-1) !== b1);
  const b2 = sockets.at(-1);
  b2.deliver(welcome(2, "e1", []));
  out.tooBig = [huge.status, huge.error, b2.sent.filter((f) => f.type === "message").map((f) => f.text)];
  big.stop();
  // Catching up: a gap the server could not fill is marked where it is (after the `since`
  // asked, in the epoch asked), and not across a restart's new epoch; a catch-up refused as
  // too fast is asked again from the same point, whatever came live meanwhile.
  const gap = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 } });
  const joined = (room, epoch, history) => ({ type: "joined", room, members: [], member_count: 1, epoch,
                                              recovered: false, history });
  const notes = () => gap.conversations.get("lobby").entries.map(
    (e) => (e.kind === "notice" ? "--" + e.text.split(" ").slice(0, 2).join(" ") : e.text));
  gap.start();
  let g = sockets.at(-1);
  g.deliver(welcome(1, "g1", [msg(1, "one"), msg(2, "two")]));
  g.drop();
  await until(() => sockets.at(-1) !== g);
  g = sockets.at(-1);
  g.deliver(welcome(2, "g1", []));
  g.deliver(msg(9, "nine"));  // live, before the catch-up is answered
  g.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: "join:lobby" });
  const catchUps = () => g.sent.filter((f) => f.type === "join").map((f) => [f.since, f.epoch]);
  for (let i = 0; i < 60 && catchUps().length < 2; i++) await wait(50);
  out.gap = { joins: catchUps() };
  g.deliver(joined("lobby", "g1", [msg(7, "seven"), msg(8, "eight"), msg(9, "nine")]));
  out.gap.shown = notes();
  g.drop();
  await until(() => sockets.at(-1) !== g);
  g = sockets.at(-1);
  g.deliver(welcome(3, "g2", []));  // restarted: ids from 1 again, 1-19 gone already
  g.deliver(joined("lobby", "g2", [msg(20, "twenty")]));
  out.gap.afterRestart = notes().slice(notes().indexOf("nine") + 1);
  gap.stop();

  // An ack does not move `since`: message 2 (from another server process, say) had not
  // reached us when our message was acked as 3, and the connection then dropped.
  const acked = new m.ChatClient({ url: "ws://x/ws", WebSocket: FakeSocket, retry: { base: 10, cap: 40 } });
  acked.start();
  let h = sockets.at(-1);
  h.deliver(welcome(1, "h1", [msg(1, "one")]));
  const mine = acked.send("lobby", "mine");
  h.deliver({ type: "ack", ref: mine.ref, room: "lobby", id: 3, ts: 1700000003 });
  h.drop();
  await until(() => sockets.at(-1) !== h);
  h = sockets.at(-1);
  h.deliver(welcome(2, "h1", []));
  const ackJoin = h.sent.find((f) => f.type === "join");
  h.deliver({ ...joined("lobby", "h1", [msg(2, "two"), msg(3, "mine", mine.ref)]), recovered: true });
  out.acked = [ackJoin.since, acked.conversations.get("lobby").entries.map((e) => e.text)];
  acked.stop();

  // A rejoin refused because the server's store is unreachable keeps the room and what
  // waits for it, and is asked again after a pause; a first join so refused is let go.
  const [kept, k1] = welcomed("s1");
  kept.join("dev");
  k1.deliver(joined("dev", "x", [msg(4, "four")]));
  k1.drop();
  const waitingForDev = kept.send("dev", "typed while away");
  await until(() => sockets.at(-1) !== k1);
  const k2 = sockets.at(-1);
  k2.deliver(welcome(3, "s1", []));
  const unavailable = (room) => ({ type: "error", code: "unavailable", ref: "join:" + room,
                                   message: "the shared store is unreachable (joining); try again later" });
  k2.deliver(unavailable("dev"));
  kept.join("new");
  k2.deliver(unavailable("new"));
  const devJoins = () => k2.sent.filter((f) => f.type === "join" && f.room === "dev").map((f) => f.since);
  for (let i = 0; i < 60 && devJoins().length < 2; i++) await wait(50);
  out.unavailable = [devJoins(), kept.conversations.has("dev"), kept.conversations.has("new"),
                     waitingForDev.status, k2.sent.filter((f) => f.type === "message").length];
  k2.deliver(joined("dev", "x", [msg(4, "four")]));
  out.unavailable.push(k2.sent.filter((f) => f.type === "message").map((f) => f.text));
  kept.stop();

  // While the rate limit refuses us: no typing notices; a refused leave is asked again
  // after the pause (not once the room is joined again); and a message for a room still
  // joining waits for its join (one refused as too fast is asked again later).
  const [lim, l1] = welcomed("l1");
  const count = (type, room) => l1.sent.filter((f) => f.type === type && (!room || f.room === room)).length;
  lim.typing("lobby");
  const typing = [count("typing")];
  for (const room of ["dev", "attic"]) {
    lim.join(room);
    l1.deliver(joined(room, "x", []));
    lim.leave(room);
    l1.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: "leave:" + room });
  }
  lim.join("attic");  // again, before the pause is over
  lim.typing("lobby");
  typing.push(count("typing"));
  out.limited = { typing };
  lim.join("kitchen");
  l1.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: "join:kitchen" });
  lim.send("kitchen", "typed while joining");
  out.limited.messageBeforeJoined = count("message");
  for (let i = 0; i < 60 && count("join", "kitchen") < 2; i++) await wait(50);
  l1.deliver(joined("kitchen", "k", []));
  out.limited.messageAfterJoined = l1.sent.filter((f) => f.type === "message").map((f) => f.text);
  out.limited.leaves = [count("leave", "dev"), count("leave", "attic")];
  lim.typing("lobby");
  out.limited.typing.push(count("typing"));
  // A refused heartbeat ping is not the user's doing: no "problem", nothing resent.
  const problems = [];
  lim.addEventListener("problem", ({ detail }) => problems.push(detail.code));
  lim.send("lobby", "after the pause");
  const lobbySends = () => l1.sent.filter((f) => f.type === "message" && f.room === "lobby").length;
  const sendsBefore = lobbySends();
  l1.deliver({ type: "error", code: "rate_limited", message: "slow down", ref: "heartbeat" });
  for (let i = 0; i < 40; i++) await wait(50);  // past the pause: a resend would have gone
  out.limited.heartbeat = [problems, lobbySends() - sendsBefore];
  lim.stop();

  // Directs go one at a time: the next once the last is answered. Stopped, one unanswered
  // fails (as when the connection drops): it can no longer be answered.
  const [lane, d1] = welcomed("dl");
  const fay = lane.direct({ id: 8, nick: "Fay" });
  const one = lane.send(fay.key, "d one");
  const two = lane.send(fay.key, "d two");
  const directTexts = () => d1.sent.filter((f) => f.type === "direct").map((f) => f.text);
  out.lane = [directTexts()];
  d1.deliver({ type: "pong", ref: "dm:" + one.ref });
  out.lane.push(directTexts(), one.status);
  lane.stop();
  out.lane.push(two.status, lane.pending.size);
  return out;
}
