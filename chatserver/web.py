"""The Bottle application: the page, static files, /healthz, and the /ws endpoint."""
import gc
import os

import bottle
import greenlet

from . import session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWS = os.path.join(ROOT, "views")
STATIC = os.path.join(ROOT, "static")


def _csp(host):
    # The page may talk only to its own origin, over HTTP and WebSocket alike.
    return ("default-src 'self'; connect-src 'self' ws://{0} wss://{0}; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'".format(host))


def create_app(hub, settings, health=None):
    """The WSGI app; ``health`` returns extra fields for /healthz (the backplane's state)."""
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
        return bottle.static_file(path, root=STATIC)

    @app.get("/healthz")
    def healthz():
        # 200 while the process serves, degraded or not: plain-text relay goes on locally
        # through a Redis outage, and a platform that restarts unhealthy dynos would only
        # make that worse. The body tells the difference.
        body = {"status": "ok", **hub.stats()}
        if health is not None:
            body.update(health())
        if bottle.request.query.get("verbose"):
            # A walk of the heap: for diagnosing leaks, not for a load balancer's probe.
            body["greenlets"] = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))
        return body

    @app.get("/ws")
    def ws():
        websocket = bottle.request.environ.get("wsgi.websocket")
        if websocket is None:
            bottle.response.status = 400
            bottle.response.content_type = "text/plain; charset=utf-8"
            return ("This is the chat's WebSocket endpoint: connect with a WebSocket client "
                    "(Upgrade: websocket), for example: wscat -c ws://HOST/ws\n")
        session.serve(websocket, hub, settings)
        return ""

    return app
