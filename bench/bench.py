"""Benchmark the chat server against the relays people would pick instead; run by ``bench/run``.

Each run starts one server fresh on a free port of 127.0.0.1, drives it with the Node load
tool (``bench/load.js``), which reads the server's CPU time and RSS from ``/proc``, and stops
it. Runs interleave the servers (A B C D, then B C D A, ...) so that a noisy neighbour on the
machine hurts them alike; each scenario is repeated ``--repeat`` times and reported as the
median with min-max. Results: ``bench/results/results.json`` (every run and the summary),
``results.md`` (tables and targets) and ``results.png`` (chart).
"""
import argparse
import collections
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PY = sys.executable
NODE = os.environ.get("NODE", "node")
OUTBOX_SIZE = 1024  # chat.py's default, for the slow-consumer memory bound

SERVERS = {
    # name: (label, argv with {port}, environment additions)
    "chat": ("chat.py (ours)", [PY, os.path.join(ROOT, "chat.py")],
             {"HOST": "127.0.0.1", "PORT": "{port}", "RATE_LIMIT": "0",
              "MAX_CONNECTIONS": "12000"}),
    "node-ws": ("Node ws", [NODE, os.path.join(BENCH, "peers", "ws_relay.js"), "{port}"], {}),
    "websockets": ("Python websockets", [PY, os.path.join(BENCH, "peers", "websockets_relay.py"),
                                         "{port}"], {}),
    "gevent-naive": ("naive gevent-websocket",
                     [PY, os.path.join(BENCH, "peers", "gevent_relay.py"), "{port}"], {}),
}

# name: load-tool settings. "quick" replaces some of them for --quick; "rounds" is how many
# runs each server gets (ROUNDS if not given), unless --repeat says otherwise.
ROUNDS = 3
SCENARIOS = {
    "fanout-small": dict(clients=100, senders=10, messages=100, quick=dict(messages=30)),
    "fanout-large": dict(clients=1000, senders=5, messages=50, quick=dict(messages=20)),
    "chatty": dict(clients=50, senders=50, messages=100, quick=dict(messages=30)),
    # 15 s of sending per run: a p99 taken from five seconds moved with any hiccup of the
    # machine, and so did the CPU figure of a server that is idle most of the time.
    # Five rounds: its figure is a p99, and one round's p99 moves with the machine's hiccups
    # (a ten-round check put single rounds of one server from 3.7 to 11 ms); the median of
    # five is moved by two such rounds, not one.
    "paced": dict(clients=100, senders=10, messages=300, rate=20, rounds=5,
                  quick=dict(messages=40)),
    "idle-1k": dict(mode="idle", clients=1000),
    "idle-5k": dict(mode="idle", clients=5000, quick=dict(clients=2000)),
    "idle-10k": dict(mode="idle", clients=10000, quick=dict(clients=3000)),
    # One client stops reading while 10 senders send 4 KiB messages at 50/s each for 6 s:
    # 12 MB for the slow client, enough to fill the kernel's buffers (~4 MB on loopback) and
    # then an outbox of OUTBOX_SIZE frames. The control run is the same without the slow
    # client. The slow client reads again once sending is over, to see how it was closed.
    # Each server's two runs of a round go back to back (see jobs), five rounds, as for paced.
    "slow-control": dict(clients=50, senders=10, messages=300, rate=50, size=4096, rounds=5),
    "slow": dict(clients=50, senders=10, messages=300, rate=50, size=4096, slow=True, rounds=5),
}
PAIRED = ("slow-control", "slow")  # a scenario and its control, compared run against run
DEFAULT_SCENARIOS = list(SCENARIOS)
HEADLINE = ("fanout-small", "fanout-large", "chatty", "paced")


def load_settings(scenario, quick=False):
    """What the load tool is given for ``scenario`` (the benchmark's own keys left out)."""
    settings = {k: v for k, v in SCENARIOS[scenario].items() if k not in ("quick", "rounds")}
    if quick:
        settings.update(SCENARIOS[scenario].get("quick", {}))
    return settings


def rounds(scenario, repeat=None, quick=False):
    """Runs per server of ``scenario``: ``repeat`` if given, 1 with --quick, else its own."""
    if repeat is not None:
        return repeat
    return 1 if quick else SCENARIOS[scenario].get("rounds", ROUNDS)


def jobs(scenarios, servers, rep, counts):
    """The (scenario, server) runs of round ``rep``, in order.

    The servers take turns (A B C D, then B C D A, ...), so that a noisy neighbour on the
    machine hurts them alike. A scenario and its control (PAIRED) run back to back for each
    server, the control first in even rounds and second in odd ones: their ratio is a
    target, and runs minutes apart would add the machine's drift to it.
    """
    order = servers[rep % len(servers):] + servers[:rep % len(servers)]
    paired = all(s in scenarios and counts[s] > rep for s in PAIRED)
    for scenario in scenarios:
        if counts[scenario] <= rep or (paired and scenario == PAIRED[0]):
            continue
        for server in order:
            if paired and scenario == PAIRED[1]:
                for s in (PAIRED if rep % 2 == 0 else PAIRED[::-1]):
                    yield s, server
            else:
                yield scenario, server


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def start_server(name, port, logfile):
    _label, argv, extra = SERVERS[name]
    env = dict(os.environ)
    env.update({k: v.format(port=port) for k, v in extra.items()})
    argv = [a.format(port=port) for a in argv]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_listening(port, proc):
        stop_server(proc)
        raise RuntimeError("%s did not start listening on %d (log: %s)" % (name, port, logfile.name))
    time.sleep(0.3)  # let it finish starting up before the RSS baseline
    return proc


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Profiler:
    """py-spy on the server during the sending phase only: started when the load tool writes
    "sending" to the mark file, stopped (SIGINT, so that it writes its output) at "done"."""

    def __init__(self, pid, mark, out_raw):
        self.pid, self.mark, self.out_raw = pid, mark, out_raw
        self.proc = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = threading.Event()
        self.thread.start()

    def _state(self):
        try:
            with open(self.mark) as f:
                return f.read().strip()
        except OSError:
            return ""

    def _run(self):
        while not self.stop.is_set() and self._state() != "sending":
            time.sleep(0.02)
        if self.stop.is_set():
            return
        self.proc = subprocess.Popen([os.path.join(os.path.dirname(PY), "py-spy"), "record",
                                      "--pid", str(self.pid), "--rate", "500", "--nonblocking",
                                      "--format", "raw", "-o", self.out_raw],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not self.stop.is_set() and self._state() != "done":
            time.sleep(0.02)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def finish(self):
        self.stop.set()
        self.thread.join(30)


def top_frames(raw_path, limit=15):
    """The hottest functions of a py-spy raw profile: (self share, inclusive share, frame)."""
    own, incl, total = collections.Counter(), collections.Counter(), 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                incl[frame] += n
    return total, [(own[f] / total, incl[f] / total, f) for f, _ in own.most_common(limit)]


PROFILE_SCALE = 10  # --profile: this many times the messages of a scenario without a pace


def run_one(server, scenario, quick, logdir, profile_dir=None):
    settings = load_settings(scenario, quick)
    if profile_dir and not settings.get("rate") and settings.get("mode") != "idle":
        # chat.py relays a burst in well under a second: too few samples without more of it.
        settings["messages"] *= PROFILE_SCALE
    port = free_port()
    logpath = os.path.join(logdir, "%s-%s-%d.log" % (server, scenario, port))
    with open(logpath, "w") as logfile:
        proc = start_server(server, port, logfile)
        try:
            cfg = dict(settings, url="ws://127.0.0.1:%d/ws" % port, pid=proc.pid,
                       clkTck=os.sysconf("SC_CLK_TCK"))
            profiler = None
            if profile_dir and server == "chat" and settings.get("mode") != "idle":
                cfg["markFile"] = os.path.join(logdir, "mark-%d" % port)
                raw = os.path.join(logdir, "profile-%s-%d.txt" % (scenario, port))
                profiler = Profiler(proc.pid, cfg["markFile"], raw)
            # A bound on the whole run: the tool stops by itself well before this.
            try:
                done = subprocess.run([NODE, os.path.join(BENCH, "load.js"), json.dumps(cfg)],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=None, timeout=420)
            finally:
                if profiler:
                    profiler.finish()
            alive = proc.poll() is None
        finally:
            stop_server(proc)
        if profiler and os.path.exists(raw):
            save_profile(raw, os.path.join(profile_dir, "profile-%s.txt" % scenario), scenario)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError("load tool failed (exit %d)" % done.returncode)
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result.pop("config", None)
    result.update(server=server, scenario=scenario, settings=settings, server_survived=alive)
    return result


def save_profile(raw, path, scenario):
    total, rows = top_frames(raw)
    spec = load_settings(scenario)
    if not spec.get("rate"):
        spec["messages"] *= PROFILE_SCALE
    lines = ["py-spy on chat.py during the sending phase of %s %s: %d samples at 500 Hz"
             % (scenario, json.dumps(spec), total),
             "(self: samples with this frame on top, which includes the system calls it makes;",
             " inclusive: samples with it anywhere on the stack)", "",
             "  self  incl.  frame"]
    lines += ["%5.1f%% %5.1f%%  %s" % (100 * a, 100 * b, f) for a, b, f in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log("  profile: %s" % path)


# -- summary --------------------------------------------------------------------------------

METRICS = {
    # key: (getter, better) -- better is "high" or "low"
    "deliveries_per_cpu_s": (lambda r: r.get("deliveries_per_cpu_s"), "high"),
    "deliveries_per_s": (lambda r: r.get("deliveries_per_s"), "high"),
    "delivery_ratio": (lambda r: r.get("delivery_ratio"), "high"),
    "p50_ms": (lambda r: (r.get("latency_ms") or {}).get("p50"), "low"),
    "p90_ms": (lambda r: (r.get("latency_ms") or {}).get("p90"), "low"),
    "p99_ms": (lambda r: (r.get("latency_ms") or {}).get("p99"), "low"),
    "max_ms": (lambda r: (r.get("latency_ms") or {}).get("max"), "low"),
    "server_rss_mib": (lambda r: r.get("server_rss") and r["server_rss"] / 2**20, "low"),
    "server_rss_max_mib": (lambda r: r.get("server_rss_max") and r["server_rss_max"] / 2**20, "low"),
    "rss_per_conn_kib": (lambda r: r.get("rss_per_conn") and r["rss_per_conn"] / 1024, "low"),
    "opened": (lambda r: r.get("opened"), "high"),
    "load_cpu_share": (lambda r: r.get("load_cpu_share"), "low"),
    "server_cpu_share": (lambda r: r.get("server_cpu_share"), None),
    "order_errors": (lambda r: r.get("order_errors"), "low"),
}


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(runs):
    summary = {}
    for run in runs:
        summary.setdefault(run["scenario"], {}).setdefault(run["server"], []).append(run)
    out = {}
    for scenario, by_server in summary.items():
        out[scenario] = {}
        for server, rs in by_server.items():
            entry = {key: stats([get(r) for r in rs]) for key, (get, _b) in METRICS.items()}
            entry["runs"] = len(rs)
            entry["all_received"] = all(r.get("delivery_ratio") == 1 for r in rs) \
                if rs[0].get("expected") is not None else None
            entry["expected"] = rs[0].get("expected")
            if scenario == "slow":
                entry["slow_close_codes"] = [r.get("slow_close_code") for r in rs]
            out[scenario][server] = entry
    return out


def med(summary, scenario, server, key):
    try:
        return summary[scenario][server][key]["median"]
    except (KeyError, TypeError):
        return None


def by_round(runs, a, b, key):
    """The ratio a/b of METRICS[key] in each round of the run, for the ratio targets: a
    median hides how far single rounds moved. ``a`` and ``b`` are (scenario, server)."""
    get = METRICS[key][0]
    value = {(r["scenario"], r["server"], r.get("rep")): get(r) for r in runs}
    ratios = []
    for rep in sorted({r.get("rep") for r in runs}, key=lambda rep: (rep is None, rep)):
        x, y = value.get(a + (rep,)), value.get(b + (rep,))
        if x is not None and y:
            ratios.append("%.2f" % (x / y))
    return "; by round: %s" % ", ".join(ratios) if len(ratios) > 1 else ""


def targets(summary, runs=(), quick=False):
    """The targets, each as (text, measured, met: True/False/None for not measured)."""
    rows = []
    for scenario in ("fanout-large", "chatty", "paced"):
        ours = med(summary, scenario, "chat", "deliveries_per_cpu_s")
        node = med(summary, scenario, "node-ws", "deliveries_per_cpu_s")
        wsk = med(summary, scenario, "websockets", "deliveries_per_cpu_s")
        complete = (summary.get(scenario, {}).get("chat") or {}).get("all_received")
        if ours and node:
            rows.append(("%s: deliveries/CPU-s >= 1.0x Node ws" % scenario,
                         "%.2fx (%s vs %s)" % (ours / node, kfmt(ours), kfmt(node)), ours >= node))
        if ours and wsk:
            rows.append(("%s: deliveries/CPU-s >= 1.5x websockets" % scenario,
                         "%.2fx (%s vs %s%s)" % (ours / wsk, kfmt(ours), kfmt(wsk), by_round(
                             runs, (scenario, "chat"), (scenario, "websockets"),
                             "deliveries_per_cpu_s")), ours >= 1.5 * wsk))
        if complete is not None:
            rows.append(("%s: every delivery received (all runs)" % scenario,
                         "yes" if complete else "no", bool(complete)))
    ours = med(summary, "paced", "chat", "p99_ms")
    wsk = med(summary, "paced", "websockets", "p99_ms")
    if ours is not None and wsk is not None:
        rows.append(("paced: p99 latency <= websockets", "%.2f ms vs %.2f ms (%.2fx%s)" % (
            ours, wsk, ours / wsk, by_round(runs, ("paced", "chat"), ("paced", "websockets"),
                                            "p99_ms")), ours <= wsk))
    for scenario in ("idle-1k", "idle-5k", "idle-10k"):
        kib = med(summary, scenario, "chat", "rss_per_conn_kib")
        if kib is not None:
            rows.append(("%s: <= 16 KiB per connection" % scenario, "%.1f KiB" % kib, kib <= 16))
    entry = summary.get("idle-10k", {}).get("chat")
    if entry:
        opened = entry["opened"]["min"]
        rows.append(("idle-10k: 10,000 connections held", "%d opened (min of runs)%s"
                     % (opened, " with --quick" if quick else ""),
                     None if quick else opened >= 10000))
    slow = summary.get("slow", {}).get("chat")
    control = summary.get("slow-control", {}).get("chat")
    if slow:
        ratio = slow["delivery_ratio"] and slow["delivery_ratio"]["min"]
        rows.append(("slow: the others receive 100% (all runs)",
                     "%.2f%% (worst run)" % (100 * (ratio or 0)), ratio == 1))
        if control and slow["p99_ms"] and control["p99_ms"]:
            a, b = slow["p99_ms"]["median"], control["p99_ms"]["median"]
            rows.append(("slow: the others' p99 <= 1.2x without the slow client",
                         "%.2f ms vs %.2f ms (%.2fx%s)" % (a, b, a / b, by_round(
                             runs, ("slow", "chat"), ("slow-control", "chat"), "p99_ms")),
                         a <= 1.2 * b))
        codes = slow.get("slow_close_codes") or []
        rows.append(("slow: the slow client is closed with 1008", "codes seen: %s" % codes,
                     bool(codes) and all(c == 1008 for c in codes)))
        if control and slow["server_rss_max_mib"] and control["server_rss_max_mib"]:
            grow = slow["server_rss_max_mib"]["max"] - control["server_rss_max_mib"]["median"]
            bound = OUTBOX_SIZE * 4.1 / 1024 + 4  # the outbox of 4 KiB frames, plus 4 MiB slack
            rows.append(("slow: RSS stays bounded (peak over the control run <= OUTBOX_SIZE "
                         "frames + 4 MiB = %.0f MiB)" % bound, "%+.1f MiB (worst run)" % grow,
                         grow <= bound))
    return rows


def kfmt(v):
    return "%.0fk" % (v / 1000) if v >= 10000 else "%.1fk" % (v / 1000)


def fmt(st, kind):
    if st is None:
        return "–"
    m, lo, hi = st["median"], st["min"], st["max"]
    if kind == "k":
        f = kfmt
    elif kind == "ms":
        f = (lambda v: "%.1f" % v if v >= 10 else "%.2f" % v)
    elif kind == "pct":
        f = (lambda v: "%.0f%%" % (100 * v))
    elif kind == "ratio":
        f = (lambda v: "%.2f%%" % (100 * v) if v < 1 else "100%")
    elif kind == "int":
        f = (lambda v: "%d" % v)
    else:
        f = (lambda v: "%.1f" % v)
    if st["n"] == 1 or lo == hi:
        return f(m)
    return "%s (%s–%s)" % (f(m), f(lo), f(hi))


def span(counts):
    """"3", or "3–5" for counts that differ."""
    counts = sorted(set(counts))
    return "%d" % counts[0] if len(counts) == 1 else "%d–%d" % (counts[0], counts[-1])


def runs_text(meta):
    """How many runs each scenario had, for the header: "3 runs (5 for paced, ...)"."""
    counts = meta.get("rounds") or {s: meta["repeat"] for s in meta["scenarios"]}
    usual = collections.Counter(counts.values()).most_common(1)[0][0]
    text = "%d run%s" % (usual, "s" if usual > 1 else "")
    other = ["%d for %s" % (n, ", ".join(s for s in counts if counts[s] == n))
             for n in sorted(set(counts.values()) - {usual})]
    return text + (" (%s)" % "; ".join(other) if other else "")


def markdown(meta, summary, target_rows, servers):
    lines = ["# Benchmark results", "",
             "`bash bench/run%s` on %s: %s, %d cores (shared with other work), Python %s, "
             "Node %s. Medians of %s per server, min–max in brackets; servers interleaved. "
             "Headline: deliveries per server CPU-second (server CPU from `/proc`: schedstat of "
             "every thread, which agrees with `/proc/PID/stat` to its 10 ms ticks), the figure "
             "that moves least on a busy machine. \"load tool CPU\" near 100%% means the load tool, "
             "not the server, set deliveries per second. How it runs and how to read it: "
             "[bench/README.md](../README.md)."
             % ((" " + meta["args"]) if meta["args"] else "", meta["date"], meta["machine"],
                meta["cores"], meta["python"], meta["node"], runs_text(meta)), ""]
    for scenario in [s for s in SCENARIOS if s in summary]:
        runs = span(e["runs"] for e in summary[scenario].values())
        lines += ["## %s" % scenario, "", "`%s`, %s run%s per server" % (
            json.dumps(load_settings(scenario, meta.get("quick"))), runs, "" if runs == "1" else "s"), ""]
        by = summary[scenario]
        if scenario.startswith("idle"):
            lines += ["| server | opened | RSS MiB | KiB per connection |", "| --- | --- | --- | --- |"]
            for server in [s for s in servers if s in by]:
                e = by[server]
                lines.append("| %s | %s | %s | %s |" % (SERVERS[server][0], fmt(e["opened"], "int"),
                                                       fmt(e["server_rss_mib"], ""),
                                                       fmt(e["rss_per_conn_kib"], "")))
        else:
            lines += ["| server | deliveries / CPU-s | deliveries / s | received | p50 ms | p90 ms "
                      "| p99 ms | max ms | peak RSS MiB | load tool CPU |"
                      + (" slow client closed |" if scenario == "slow" else ""),
                      "| --- " * (10 + (scenario == "slow")) + "|"]
            for server in [s for s in servers if s in by]:
                e = by[server]
                row = [SERVERS[server][0], fmt(e["deliveries_per_cpu_s"], "k"),
                       fmt(e["deliveries_per_s"], "k"), fmt(e["delivery_ratio"], "ratio"),
                       fmt(e["p50_ms"], "ms"), fmt(e["p90_ms"], "ms"), fmt(e["p99_ms"], "ms"),
                       fmt(e["max_ms"], "ms"), fmt(e["server_rss_max_mib"], ""),
                       fmt(e["load_cpu_share"], "pct")]
                if scenario == "slow":
                    row.append(", ".join(str(c) if c is not None else "no"
                                         for c in e.get("slow_close_codes", [])))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    for text, measured, met in target_rows:
        verdict = "not measured" if met is None else "met" if met else "**missed**"
        lines.append("| %s | %s | %s |" % (text, measured, verdict))
    lines += ["", "![chart](results.png)", ""]
    return "\n".join(lines)


def chart(summary, servers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"chat": "#1f77b4", "node-ws": "#2ca02c", "websockets": "#ff7f0e",
              "gevent-naive": "#7f7f7f", "baseline": "#9467bd"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def bars(ax, groups, key, scale, title, ylabel):
        groups = [g for g in groups if g in summary]
        present = [s for s in servers if any(s in summary[g] for g in groups)]
        width = 0.8 / max(len(present), 1)
        for i, server in enumerate(present):
            xs, ys, lo, hi = [], [], [], []
            for j, g in enumerate(groups):
                st = (summary[g].get(server) or {}).get(key)
                if not st:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(st["median"] * scale)
                lo.append((st["median"] - st["min"]) * scale)
                hi.append((st["max"] - st["median"]) * scale)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=SERVERS[server][0],
                   color=colors[server], error_kw={"elinewidth": 1, "alpha": 0.7})
            for x, y, h in zip(xs, ys, hi):
                ax.annotate("%.0f" % y if y >= 10 else "%.1f" % y, (x, y + h), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0][0], list(HEADLINE) + ["slow-control"], "deliveries_per_cpu_s", 1e-3,
         "Deliveries per server CPU-second (higher is better)", "thousands (log scale)")
    axes[0][0].set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    bars(axes[0][1], ["paced", "slow-control", "slow"], "p99_ms", 1,
         "p99 latency, paced scenarios (lower is better)", "ms")
    axes[0][1].set_yscale("log")
    bars(axes[1][0], ["idle-1k", "idle-5k", "idle-10k"], "rss_per_conn_kib", 1,
         "Idle memory per connection (lower is better; dashed: 16 KiB target)",
         "KiB (RSS growth / connections)")
    axes[1][0].axhline(16, color="red", linestyle="--", linewidth=1)
    bars(axes[1][1], ["slow-control", "slow"], "server_rss_max_mib", 1,
         "Peak server RSS with and without a slow consumer", "MiB")
    fig.suptitle("Chat relay benchmark: medians of %s runs, error bars min–max "
                 "(bench/results/results.md)" % span(e["runs"] for by in summary.values()
                                                      for e in by.values()))
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
               bbox_to_anchor=(0.5, 0.955), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs, meta, servers, outdir):
    summary = summarize(runs)
    target_rows = targets(summary, runs, meta.get("quick"))
    data = {"meta": meta, "summary": summary,
            "targets": [{"target": t, "measured": m, "met": met} for t, m, met in target_rows],
            "runs": runs}
    with open(os.path.join(outdir, "results.json.tmp"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(os.path.join(outdir, "results.json.tmp"), os.path.join(outdir, "results.json"))
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(markdown(meta, summary, target_rows, servers))
    return summary, target_rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help="comma-separated, from: %s" % ", ".join(SCENARIOS))
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="comma-separated, from: %s" % ", ".join(SERVERS))
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per server and scenario (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="one run each, fewer messages and connections: a smoke test")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"), help="results folder")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG")
    ap.add_argument("--profile", action="store_true",
                    help="instead of measuring: run chat.py once per scenario under py-spy "
                         "while messages flow (%dx the messages of an unpaced scenario); "
                         "its hottest frames go to DIR/profile-SCENARIO.txt" % PROFILE_SCALE)
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rebuild results.md and results.png from results.json")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run DIR/chat.py as server 'baseline' (another checkout, to "
                         "compare a change; e.g. from git worktree or git archive)")
    args = ap.parse_args(argv)
    if args.baseline:
        SERVERS["baseline"] = ("baseline chat.py", [PY, os.path.join(os.path.abspath(args.baseline),
                                                                   "chat.py")], SERVERS["chat"][2])
        if "baseline" not in args.servers:
            args.servers += ",baseline"
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in scenarios:
        if name not in SCENARIOS:
            ap.error("unknown scenario %r" % name)
    for name in servers:
        if name not in SERVERS:
            ap.error("unknown server %r" % name)
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            data = json.load(f)
        servers = data["meta"]["servers"]
        if "baseline" in servers and "baseline" not in SERVERS:
            SERVERS["baseline"] = ("baseline chat.py", [], {})
        summary, _rows = report(data["runs"], data["meta"], servers, args.out)
        if not args.no_chart:
            chart(summary, servers, os.path.join(args.out, "results.png"))
        log(open(os.path.join(args.out, "results.md")).read())
        return 0
    if args.profile:
        os.makedirs(args.out, exist_ok=True)
        logdir = tempfile.mkdtemp(prefix="chat-bench-")
        for scenario in scenarios:
            if SCENARIOS[scenario].get("mode") == "idle":
                continue
            log("[profile] %s on chat" % scenario)
            run_one("chat", scenario, args.quick, logdir, args.out)
        return 0
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be at least 1")
    counts = {s: rounds(s, args.repeat, args.quick) for s in scenarios}
    os.makedirs(args.out, exist_ok=True)
    logdir = tempfile.mkdtemp(prefix="chat-bench-")
    node = subprocess.run([NODE, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "args": " ".join(sys.argv[1:] if argv is None else argv),
            "machine": platform.platform(), "cores": os.cpu_count(),
            "python": platform.python_version(), "node": node, "rounds": counts,
            "scenarios": scenarios, "servers": servers, "quick": args.quick, "logs": logdir}
    total = sum(counts.values()) * len(servers)
    log("bench: %d scenario(s) x %d server(s), %d runs; server logs in %s"
        % (len(scenarios), len(servers), total, logdir))
    runs = []
    t0 = time.monotonic()
    for rep in range(max(counts.values())):
        for scenario, server in jobs(scenarios, servers, rep, counts):
            log("[run %d/%d, round %d] %s on %s (%.0f s so far)" % (
                len(runs) + 1, total, rep + 1, scenario, server, time.monotonic() - t0))
            try:
                result = run_one(server, scenario, args.quick, logdir)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                log("  failed: %s" % exc)
                result = {"server": server, "scenario": scenario, "error": str(exc)}
            result["rep"] = rep
            runs.append(result)
            report(runs, meta, servers, args.out)  # partial results survive an interruption
    summary, target_rows = report(runs, meta, servers, args.out)
    if not args.no_chart:
        chart(summary, servers, os.path.join(args.out, "results.png"))
    log("")
    log(open(os.path.join(args.out, "results.md")).read())
    log("bench: done in %.0f s; results in %s" % (time.monotonic() - t0, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
