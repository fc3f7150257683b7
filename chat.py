"""Run the chat server: ``python chat.py`` (settings: ``python chat.py --help``)."""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402 - after patching, so every module sees gevent's sockets
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from chatserver import backplane, config, frames, session, transport, wamp, web  # noqa: E402
from chatserver.hub import Hub  # noqa: E402

log = logging.getLogger("chat")
DRAIN_SECONDS = 5.0  # how long SIGTERM waits for clients to answer our close frames


def main(argv=None):
    try:
        settings = config.load(sys.argv[1:] if argv is None else argv)
    except config.ConfigError as exc:
        print("chat.py: bad setting: %s" % exc, file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stdout, level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # From here a signal is a clean shutdown, once start-up is done (it may wait seconds
    # for an unreachable Redis), not a traceback.
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)

    _raise_file_limit(settings.max_connections)
    if settings.redis_url:
        shared = backplane.RedisBackplane(settings.redis_url, settings.history_size,
                                          settings.presence_ttl, settings.presence_limit)
    else:
        shared = backplane.LocalBackplane(settings.history_size, settings.history_bytes)
    hub = Hub(settings, shared, group=session.Group)
    router = wamp.Router(hub, settings.wamp_realm)
    hub.start()
    sockets = set()  # every open WebSocket, whatever its dialect
    is_full = lambda: len(sockets) >= settings.max_connections  # noqa: E731
    app = web.create_app(hub, settings, health=shared.health, router=router, is_full=is_full)
    policy = transport.Policy(
        paths=("/ws", "/echo") if settings.echo_endpoint else ("/ws",),
        subprotocols=("chat.v1", wamp.SUBPROTOCOL),
        allowed_origins=settings.allowed_origins, max_message_size=settings.max_message_size,
        outbox_size=settings.outbox_size, is_full=is_full)
    server = WSGIServer((settings.host, settings.port), app,
                        spawn=gevent.pool.Pool(transport.HTTP_CONCURRENCY),
                        handler_class=transport.ChatHandler.configured(policy, sockets),
                        log=logging.getLogger("chat.access"), error_log=logging.getLogger("chat.error"))
    if stop.is_set():  # a signal came while starting: stop before listening
        shared.stop()
        log.info("Stopped before listening: a signal came during start-up")
        return 0
    try:
        server.start()
    except OSError as exc:
        print("chat.py: cannot listen on %s:%d: %s (check HOST and PORT)"
              % (settings.host, settings.port, exc.strerror or exc), file=sys.stderr)
        return 2
    host = "[%s]" % settings.host if ":" in settings.host else settings.host  # IPv6 (RFC 3986)
    log.info("Listening on http://%s:%d/", host, server.server_port)
    open_sockets = lambda: list(sockets)  # noqa: E731 - a snapshot: they come and go meanwhile
    keepalive = gevent.spawn(session.keepalive, open_sockets, settings.ping_interval,
                             settings.ping_timeout)
    stop.wait()

    log.info("Shutting down: closing %d connections", len(sockets))
    server.close()  # stop accepting
    keepalive.kill()
    for ws in open_sockets():
        ws.close(frames.GOING_AWAY, "server shutting down")
    deadline = time.monotonic() + DRAIN_SECONDS
    while sockets and time.monotonic() < deadline:
        gevent.sleep(0.05)
    for ws in open_sockets():
        ws.abort()
    server.stop(timeout=1)
    shared.stop()
    log.info("Stopped")
    return 0


def _raise_file_limit(connections):
    """Each connection is a file descriptor; the usual soft limit of 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256  # listening socket, logs, Redis, headroom
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open-file limit %d is below MAX_CONNECTIONS + 256 (%d); raise it "
                        "(ulimit -n) to hold that many connections", new, want)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before main() took the signal over
        sys.exit(130)
