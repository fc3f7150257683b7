#!/usr/bin/env node
// The load tool of bench/run: one process, Node's `ws` client.
//
// Usage: node bench/load.js '<json config>'   (bench/bench.py builds the config)
//
// N clients connect (ramped: at most `ramp` handshakes in flight, each with a timeout); the
// tool waits until the server's connection notices have died down; then S of the clients send
// M messages each (as fast as the tool can, or `rate` per second per sender) whose text
// carries the sender, a sequence number and a timestamp. Every receiver timestamps arrival.
// Server CPU comes from /proc (schedstat of every thread, and stat) before and after the
// sending phase, RSS from /proc/PID/status. One JSON object goes to stdout; progress goes to
// stderr.
//
// Modes: "fanout" (the above), "idle" (connect, hold, measure RSS per connection), and
// "fanout" with `slow: true`: the last client (never a sender) stops reading when sending
// starts, and reads again once the others have everything, to see how the server closed it.
'use strict';

const fs = require('fs');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

const cfg = Object.assign({
  url: 'ws://127.0.0.1:8080/ws',
  pid: 0,              // the server's PID, for /proc
  clkTck: 100,
  mode: 'fanout',      // fanout | idle
  clients: 100,
  senders: 10,
  messages: 100,
  rate: 0,             // messages per second per sender; 0: as fast as possible
  size: 0,             // pad each message's text to this many bytes
  slow: false,         // the last client stops reading during the fanout
  ramp: 100,           // handshakes in flight at once
  connectTimeout: 10000,
  settleMs: 500,       // quiet time that ends the settling phase
  settleMax: 60000,
  stallMs: 10000,      // no new delivery for this long ends the wait for deliveries
  maxMs: 180000,       // hard cap on the sending phase
  holdMs: 2000,        // idle mode: how long to hold the connections before measuring
  slowWaitMs: 10000,   // slow mode: how long to wait for the slow client's close
  markFile: '',        // written with "sending" and then "done" around the sending phase
}, JSON.parse(process.argv[2] || '{}'));

const t00 = performance.now();
function log(msg) {
  process.stderr.write(`  [load ${((performance.now() - t00) / 1000).toFixed(1)}s] ${msg}\n`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function procTimes(pid) {
  // [utime, stime] of the whole process (all threads), in seconds.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return [Number(f[11]) / cfg.clkTck, Number(f[12]) / cfg.clkTck];
}
function procCpu(pid) {
  // Time on CPU of all the process's threads, in seconds, to the nanosecond: the sum of
  // /proc/PID/task/*/schedstat. /proc/PID/stat counts 10 ms ticks, too coarse for a run that
  // costs a fast server 50 ms; both are reported.
  let ns = 0;
  try {
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      try { ns += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]); } catch (e) { /* exited */ }
    }
  } catch (e) { return null; }
  return ns / 1e9;
}
function procRss(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

const N = cfg.clients;
const S = cfg.mode === 'idle' ? 0 : cfg.senders;
const M = cfg.messages;
const slowIdx = cfg.slow ? N - 1 : -1;

const socks = new Array(N).fill(null);
const received = new Uint32Array(N);      // bench deliveries per client
const lastSeq = new Int32Array(N * Math.max(S, 1)).fill(-1);
let deliveries = 0;          // bench deliveries to clients other than the slow one
let slowDeliveries = 0;
let orderErrors = 0;         // a sequence number at or below one already seen from that sender
let otherFrames = 0;         // connection notices and such
let lastFrameAt = performance.now();
let lastDeliveryAt = 0;
let earlyCloses = 0;
const closeCodes = {};
let slowClose = null;
const latCap = Math.max(1, S * M * Math.max(N - 1, 1));
const lat = new Float64Array(Math.min(latCap, 20000000));
let nLat = 0;
let sending = false;

function onMessage(i, data) {
  const now = performance.now();
  lastFrameAt = now;
  // Relayed as: Client 7 says "~<sender>~<seq>~<ms>~padding"
  const head = data.length > 96 ? data.toString('latin1', 0, 96) : data.toString('latin1');
  const q = head.indexOf('"~');
  if (q < 0) { otherFrames++; return; }
  const a = head.indexOf('~', q + 2);
  const b = head.indexOf('~', a + 1);
  const c = head.indexOf('~', b + 1);
  if (a < 0 || b < 0 || c < 0) { otherFrames++; return; }
  const s = Number(head.slice(q + 2, a));
  const seq = Number(head.slice(a + 1, b));
  const ts = Number(head.slice(b + 1, c));
  const k = i * S + s;
  if (seq <= lastSeq[k]) orderErrors++;
  else lastSeq[k] = seq;
  received[i]++;
  if (i === slowIdx) { slowDeliveries++; return; }
  deliveries++;
  lastDeliveryAt = now;
  if (nLat < lat.length) lat[nLat++] = now - ts;
}

function connectOne(i) {
  return new Promise((resolve) => {
    let done = false;
    const ws = new WebSocket(cfg.url, { perMessageDeflate: false, handshakeTimeout: cfg.connectTimeout });
    const finish = (ok) => { if (!done) { done = true; resolve(ok); } };
    ws.on('open', () => { socks[i] = ws; finish(true); });
    ws.on('message', (data) => onMessage(i, data));
    ws.on('error', () => finish(false));
    ws.on('close', (code) => {
      closeCodes[code] = (closeCodes[code] || 0) + 1;
      if (i === slowIdx) slowClose = { code, at: performance.now() };
      else if (socks[i] && !shuttingDown) earlyCloses++;
      finish(false);
    });
  });
}
let shuttingDown = false;

async function connectAll() {
  let next = 0, opened = 0, failed = 0;
  const t0 = performance.now();
  let lastLog = t0;
  async function worker() {
    while (next < N) {
      const i = next++;
      if (await connectOne(i)) opened++; else failed++;
      const now = performance.now();
      if (now - lastLog > 1000) { lastLog = now; log(`connected ${opened}/${N}, failed ${failed}`); }
    }
  }
  await Promise.all(Array.from({ length: Math.min(cfg.ramp, N) }, worker));
  const secs = (performance.now() - t0) / 1000;
  log(`connected ${opened}/${N}, failed ${failed} in ${secs.toFixed(1)} s`);
  return { opened, failed, connect_s: secs };
}

async function settle() {
  const t0 = performance.now();
  lastFrameAt = performance.now();
  while (performance.now() - lastFrameAt < cfg.settleMs && performance.now() - t0 < cfg.settleMax) {
    await sleep(50);
  }
  return (performance.now() - t0) / 1000;
}

function text(s, seq) {
  const head = `~${s}~${seq}~${performance.now().toFixed(3)}~`;
  return cfg.size > head.length ? head + 'x'.repeat(cfg.size - head.length) : head;
}

function sendAll(senders) {
  // Resolves when every message has been handed to the client sockets.
  return new Promise((resolve) => {
    if (!senders.length) return resolve();
    if (cfg.rate > 0) {
      const interval = 1000 / cfg.rate;
      const start = performance.now();
      let left = senders.length;
      senders.forEach((ws, s) => {
        let seq = 0;
        const offset = (s * interval) / senders.length;  // spread the senders over a period
        const tick = () => {
          const now = performance.now();
          while (seq < M && start + offset + seq * interval <= now) {
            if (ws.readyState === WebSocket.OPEN) ws.send(text(s, seq));
            seq++;
          }
          if (seq >= M) { if (--left === 0) resolve(); return; }
          setTimeout(tick, Math.max(0, start + offset + seq * interval - performance.now()));
        };
        setTimeout(tick, offset);
      });
    } else {
      // As fast as possible, one message per sender per turn of the event loop, so that
      // the tool keeps reading while it sends.
      let seq = 0;
      const round = () => {
        for (let s = 0; s < senders.length; s++) {
          if (senders[s].readyState === WebSocket.OPEN) senders[s].send(text(s, seq));
        }
        if (++seq < M) setImmediate(round); else resolve();
      };
      round();
    }
  });
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx];
}

async function main() {
  const out = { config: cfg };
  out.server_rss_start = procRss(cfg.pid);
  const conn = await connectAll();
  Object.assign(out, conn);
  out.settle_s = await settle();

  if (cfg.mode === 'idle') {
    await sleep(cfg.holdMs);
    out.server_rss = procRss(cfg.pid);
    out.rss_per_conn = conn.opened ? (out.server_rss - out.server_rss_start) / conn.opened : null;
    out.still_open = socks.filter((w) => w && w.readyState === WebSocket.OPEN).length;
    log(`holding ${out.still_open} connections: server RSS ${(out.server_rss / 1048576).toFixed(1)} MiB, ` +
        `${(out.rss_per_conn / 1024).toFixed(1)} KiB per connection`);
    return finish(out);
  }

  const senders = [];
  for (let i = 0; i < N && senders.length < S; i++) if (socks[i] && i !== slowIdx) senders.push(socks[i]);
  const open = socks.filter(Boolean).length;
  const perMessage = open - 1;  // everyone but the sender
  const slowOpen = slowIdx >= 0 && socks[slowIdx] !== null;
  out.expected = senders.length * M * (perMessage - (slowOpen ? 1 : 0));
  out.expected_slow = slowOpen ? senders.length * M : 0;
  out.senders_used = senders.length;

  otherFrames = 0;
  if (slowOpen) socks[slowIdx]._socket.pause();  // stop reading: the kernel buffers fill up

  let rssMax = procRss(cfg.pid);
  const rssTimer = setInterval(() => { rssMax = Math.max(rssMax, procRss(cfg.pid)); }, 100);
  const times0 = procTimes(cfg.pid);
  const cpu0 = procCpu(cfg.pid);
  const own0 = process.cpuUsage();
  const t0 = performance.now();
  lastDeliveryAt = t0;
  sending = true;
  let progress = setInterval(() => {
    log(`${deliveries}/${out.expected} deliveries (${(100 * deliveries / Math.max(out.expected, 1)).toFixed(1)}%)` +
        (slowOpen ? `, slow client ${slowDeliveries}` : ''));
  }, 1000);

  if (cfg.markFile) fs.writeFileSync(cfg.markFile, 'sending\n');  // bench.py --profile starts py-spy
  const sent = sendAll(senders).then(() => { out.send_s = (performance.now() - t0) / 1000; });
  // Wait for every delivery, or until they stop coming.
  while (true) {
    await sleep(5);
    const now = performance.now();
    if (deliveries >= out.expected && out.send_s !== undefined) break;
    if (out.send_s !== undefined && now - lastDeliveryAt > cfg.stallMs) { out.stalled = true; break; }
    if (now - t0 > cfg.maxMs) { out.timed_out = true; break; }
  }
  const cpu1 = procCpu(cfg.pid);
  const times1 = procTimes(cfg.pid);
  if (cfg.markFile) fs.writeFileSync(cfg.markFile, 'done\n');
  const own1 = process.cpuUsage(own0);
  const t1 = performance.now();
  await sent;
  clearInterval(progress);
  rssMax = Math.max(rssMax, procRss(cfg.pid));
  clearInterval(rssTimer);

  const wall = ((deliveries >= out.expected ? lastDeliveryAt : t1) - t0) / 1000;
  out.received = deliveries;
  out.delivery_ratio = out.expected ? deliveries / out.expected : null;
  out.wall_s = wall;
  out.server_cpu_s = cpu1 - cpu0;  // schedstat: precise
  out.server_user_s = times1[0] - times0[0];  // /proc/PID/stat, in ticks
  out.server_sys_s = times1[1] - times0[1];
  out.server_cpu_stat_s = out.server_user_s + out.server_sys_s;
  out.deliveries_per_s = wall > 0 ? deliveries / wall : null;
  out.deliveries_per_cpu_s = out.server_cpu_s > 0 ? deliveries / out.server_cpu_s : null;
  out.server_cpu_share = (cpu1 - cpu0) / ((t1 - t0) / 1000);
  out.load_cpu_share = (own1.user + own1.system) / 1e6 / ((t1 - t0) / 1000);
  out.server_rss = procRss(cfg.pid);
  out.server_rss_max = rssMax;
  out.order_errors = orderErrors;
  out.early_closes = earlyCloses;
  const sorted = Array.from(lat.subarray(0, nLat)).sort((x, y) => x - y);
  out.latency_ms = {
    p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99),
    max: sorted.length ? sorted[sorted.length - 1] : null, samples: sorted.length,
  };

  if (slowOpen) {
    // Read again and see what the server did with the slow client.
    const slowWs = socks[slowIdx];
    out.slow_received_before_resume = slowDeliveries;
    slowWs._socket.resume();
    const tw = performance.now();
    let lastCount = -1, lastChange = tw;
    while (slowClose === null && performance.now() - tw < cfg.slowWaitMs) {
      await sleep(50);
      if (slowDeliveries !== lastCount) { lastCount = slowDeliveries; lastChange = performance.now(); }
      // The server kept it open and it has caught up: it was not closed.
      if (slowDeliveries >= out.expected_slow && performance.now() - lastChange > 1000) break;
    }
    out.slow_close_code = slowClose ? slowClose.code : null;
    out.slow_received = slowDeliveries;
    log(`slow client: ${slowClose ? 'closed with ' + slowClose.code : 'not closed'}, ` +
        `received ${slowDeliveries}/${out.expected_slow}`);
  }
  log(`${deliveries}/${out.expected} deliveries in ${wall.toFixed(2)} s, server CPU ${out.server_cpu_s.toFixed(2)} s ` +
      `(${Math.round(out.deliveries_per_cpu_s)} per CPU-s), p99 ${out.latency_ms.p99 && out.latency_ms.p99.toFixed(1)} ms, ` +
      `load tool CPU ${(100 * out.load_cpu_share).toFixed(0)}%`);
  return finish(out);
}

function finish(out) {
  shuttingDown = true;
  out.close_codes = closeCodes;
  out.other_frames = otherFrames;
  process.stdout.write(JSON.stringify(out) + '\n', () => {
    for (const ws of socks) if (ws) ws.terminate();
    setTimeout(() => process.exit(0), 100);
  });
}

main().catch((err) => { log(`failed: ${err && err.stack || err}`); process.exit(1); });
