"""Fixtures: a live ``python chat.py`` on an ephemeral port of 127.0.0.1, and clients for it."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.clients import JsonClient, PlainClient, RawClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(r"Listening on http://(?:\[[0-9a-f:.]+\]|[^:/\[]+):(\d+)/")


class Server:
    """A ``python chat.py`` subprocess; ``lines`` collects what it logs."""

    def __init__(self, env=None, args=()):
        full_env = dict(os.environ, HOST="127.0.0.1", PORT="0", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "chat.py", *args], cwd=ROOT, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.port = None
        started = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                match = LISTENING.search(line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    started.set()
            started.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        if not started.wait(15) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def ws_url(self):
        return "ws://127.0.0.1:%d/ws" % self.port

    def health(self, verbose=False):
        """/healthz as a dict (with ``greenlets`` when ``verbose``)."""
        path = "/healthz?verbose=1" if verbose else "/healthz"
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())

    def ready(self):
        """/readyz as (HTTP status, body)."""
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def log(self):
        return "\n".join(self.lines)

    def wait_for_log(self, pattern, timeout=5.0):
        """The first log line matching ``pattern`` (a regex), waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError("no log line matches %r in:\n%s" % (pattern, self.log()))

    def expect_traceback(self, pattern):
        """Take the traceback logged with the first line matching ``pattern`` (a regex) as
        expected: the end-of-test check ignores it. Returns that traceback's text."""
        first = self.lines.index(self.wait_for_log(pattern))
        end = first + 1
        while end < len(self.lines) and not re.match(r"\d{4}-\d\d-\d\d ", self.lines[end]):
            end += 1
        block = self.lines[first:end]
        del self.lines[first + 1:end]
        return "\n".join(block)

    def assert_no_traceback(self):
        unhandled = [l for l in self.lines if "Traceback" in l]
        assert not unhandled, "server logged a traceback:\n" + self.log()

    def signal(self, signum=signal.SIGTERM):
        self.proc.send_signal(signum)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture
def start_server():
    """Start servers with extra settings: ``start_server(env={...}, args=[...])``."""
    servers = []

    def start(env=None, args=()):
        server = Server(env, args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        server.assert_no_traceback()


@contextlib.contextmanager
def running(env=None):
    """A server for a ``with`` block (module-scoped fixtures); it must log no traceback."""
    server = Server(env)
    try:
        yield server
    finally:
        server.stop()
    server.assert_no_traceback()


@pytest.fixture
def server(start_server):
    """A server with default settings but a generous rate limit for quick tests."""
    return start_server()


@pytest.fixture
def clients():
    """Open clients with ``clients.json(server)``, ``clients.plain(server)``, ``clients.raw(server)``;
    all are closed at the end of the test."""
    opened = []

    class Factory:
        @staticmethod
        def json(server, **kw):
            c = JsonClient(server.port, **kw)
            opened.append(c)
            return c

        @staticmethod
        def plain(server, **kw):
            c = PlainClient(server.port, **kw)
            opened.append(c)
            return c

        @staticmethod
        def raw(server, **kw):
            c = RawClient(server.port, **kw)
            opened.append(c)
            return c

    yield Factory
    for c in opened:
        c.close()


class RedisServer:
    """A real ``redis-server`` on a free port of 127.0.0.1, without persistence."""

    def __init__(self, port=None):
        self.port = port or _free_port()
        self.proc = None
        self.start()

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start on port %d" % self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test; ``stop()`` and ``start()`` simulate an outage."""
    server = RedisServer()
    yield server
    server.stop()
