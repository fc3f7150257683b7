"""The Bottle application: the page, static files, /healthz, /readyz, and the /ws endpoint."""
import gc
import ipaddress
import os
import re

import bottle
import greenlet

from . import session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWS = os.path.join(ROOT, "views")
STATIC = os.path.join(ROOT, "static")


_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


def _csp(host):
    """The page's Content-Security-Policy: its own origin only, over HTTP and WebSocket alike.

    Scripts and styles come from files (no inline code), and Trusted Types forbid string
    sinks such as innerHTML outright. ``'self'`` covers ws:/wss: in CSP 3 browsers; the
    explicit host is for older ones, and is left out when the Host header looks odd.
    """
    sockets = " ws://{0} wss://{0}".format(host) if _HOST.match(host) else ""
    return ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'%s; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
            % sockets)


def create_app(hub, settings, health=None, router=None, is_full=None):
    """The WSGI app; ``health`` returns extra fields for /healthz (the backplane's state),
    ``router`` serves WAMP sessions, ``is_full()`` says MAX_CONNECTIONS are open."""
    app = bottle.Bottle()

    def page(name, **values):
        bottle.response.set_header("Content-Security-Policy", _csp(bottle.request.get_header("Host", "")))
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        bottle.response.set_header("Referrer-Policy", "no-referrer")
        return bottle.template(name, template_lookup=[VIEWS], **values)

    @app.get("/")
    def index():
        return page("index")

    @app.get("/websocket")
    def recipe_demo():
        return page("websocket")

    @app.get("/static/<path:path>")
    def static(path):
        response = bottle.static_file(path, root=STATIC)
        # Revalidate each time (Last-Modified makes that cheap), so a changed module is never
        # mixed with stale ones from the cache.
        response.set_header("Cache-Control", "no-cache")
        response.set_header("X-Content-Type-Options", "nosniff")
        return response

    @app.get("/favicon.ico")
    def favicon():
        # Browsers ask for it on every page (the recipe's too); an SVG answers them all.
        return static("favicon.svg")

    @app.get("/healthz")
    def healthz():
        # 200 while the process serves, degraded or not: plain-text relay goes on locally
        # through a Redis outage, and a platform that restarts unhealthy dynos would only
        # make that worse. The body tells the difference.
        body = {"status": "ok", **hub.stats()}
        if health is not None:
            body.update(health())
        verbose = bottle.request.query.get("verbose", "0") not in ("", "0", "false")
        if verbose and _from_this_machine(bottle.request.environ):
            # A walk of the heap: for diagnosing leaks, not for a load balancer's probe, and
            # not for anyone on the internet to make the server do on a loop.
            body["greenlets"] = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))
        return body

    @app.get("/readyz")
    def readyz():
        # For a load balancer's or an orchestrator's readiness probe: 503 while this process
        # refuses new connections (its Redis is unreachable: each would get 1013; or it
        # holds MAX_CONNECTIONS), so they go to processes that can take them. Not a reason
        # to restart it: /healthz stays 200.
        state = health() if health is not None else {}
        if state.get("status", "ok") != "ok":
            reason = "the shared store (Redis) is unreachable: new connections are refused " \
                     "until it is back"
        elif is_full is not None and is_full():
            reason = "MAX_CONNECTIONS (%d) are open" % settings.max_connections
        else:
            return {"ready": True}
        bottle.response.status = 503
        return {"ready": False, "reason": reason}

    @app.get("/ws")
    def ws():
        websocket = bottle.request.environ.get("wsgi.websocket")
        if websocket is not None:
            # The handshake is done (transport.ChatHandler): start the session and return;
            # the connection lives on without this request.
            session.serve(websocket, hub, settings, router)
            return ""
        bottle.response.status = 400
        bottle.response.content_type = "text/plain; charset=utf-8"
        return ("This is the chat's WebSocket endpoint: connect with a WebSocket client "
                "(Upgrade: websocket), for example: wscat -c ws://HOST/ws\n")

    if settings.echo_endpoint:
        @app.get("/echo")
        def echo():
            websocket = bottle.request.environ.get("wsgi.websocket")
            if websocket is None:
                bottle.response.status = 400
                return "The echo endpoint speaks WebSocket.\n"
            session.echo(websocket)
            return ""

    return app


PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def _from_this_machine(environ):
    """True for a request from a loopback address that no proxy passed on: a proxy on the
    same machine says whom it forwards for (one that does not, and a TLS terminator that
    forwards bare TCP, make every request look local)."""
    if any(environ.get(name) for name in PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    # An IPv4 client of a server listening on "::" arrives as ::ffff:127.0.0.1.
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback
