"""The HTTP side of the server: the page, static files, /healthz, and the WebSocket handshake
of RFC 6455 section 4.2 with every refusal answered by a status and a readable text body."""
import base64
import hashlib
import http.client
import json
import os
import re
import time

import pytest

from chatserver import web
from tests.clients import RawClient
from tests.conftest import running



@pytest.fixture(scope="module")
def server():
    """One default server for the tests of this module that need no special settings (each
    test uses its own connections); it must log no traceback."""
    with running() as srv:
        yield srv


def http_get(server, path, headers=None):
    """(status, headers dict with lower-case names, body bytes) of a plain HTTP GET."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def health(server):
    status, headers, body = http_get(server, "/healthz")
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


def wait_health(server, timeout=3.0, **want):
    """Poll /healthz until its fields equal ``want``; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        got = health(server)
        if all(got.get(k) == v for k, v in want.items()):
            return got
        if time.monotonic() > deadline:
            raise AssertionError("/healthz never showed %r; last %r" % (want, got))
        time.sleep(0.02)


def assert_text_refusal(status, headers, body, want_status):
    assert status == want_status, (status, headers, body)
    assert headers.get("content-type", "").startswith("text/plain"), headers
    text = body.decode("utf-8").strip()
    assert text, "a refusal must say why"
    assert "Traceback" not in text
    assert "upgrade" not in headers, headers
    assert "sec-websocket-accept" not in headers, headers
    return text


def handshake(server, **kw):
    raw = RawClient(server.port)
    try:
        return raw.request(**kw)
    finally:
        raw.close()


def assert_server_healthy(server):
    """The server still upgrades a good request and has logged no traceback."""
    status, _, body = handshake(server)
    assert status == 101, (status, body)
    assert "Traceback" not in server.log(), server.log()


# -- plain HTTP ---------------------------------------------------------------------------

def test_plain_get_of_ws_endpoint_is_400_with_text(server):
    """GET /ws without Upgrade is answered 400 with a readable text/plain explanation."""
    status, headers, body = http_get(server, "/ws")
    assert status == 400
    assert headers["content-type"].startswith("text/plain")
    assert b"WebSocket" in body


def test_index_page_has_content_security_policy(server):
    """GET / is a 200 HTML page with a Content-Security-Policy limiting it to its own origin."""
    status, headers, body = http_get(server, "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"<html" in body.lower()
    csp = headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp
    assert "ws://127.0.0.1:%d" % server.port in csp


def test_static_script_is_served(server):
    """/static/chat.js is served as JavaScript with the file's bytes."""
    status, headers, body = http_get(server, "/static/chat.js")
    assert status == 200
    assert "javascript" in headers["content-type"]
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "static", "chat.js"), "rb") as f:
        assert body == f.read()


def test_recipe_demo_page_is_served(server):
    """/websocket serves the recipe's demo page, which loads recipe.js."""
    status, headers, body = http_get(server, "/websocket")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"/static/recipe.js" in body
    assert "content-security-policy" in headers


def test_healthz_counts_connections_and_rooms(server, clients):
    """/healthz is 200 JSON whose connection and room counts follow clients as they come and go."""
    assert wait_health(server, connections=0, rooms=0)["status"] == "ok"
    a = clients.plain(server)
    wait_health(server, connections=1, rooms=1)
    b = clients.json(server)
    b.send(type="join", room="side")
    b.wait("joined", room="side")
    wait_health(server, connections=2, rooms=2)
    a.close()
    b.close()
    wait_health(server, connections=0, rooms=0)


def test_readyz_says_a_process_without_redis_is_ready(server):
    """/readyz, for a load balancer's readiness probe: one process on its own takes
    connections as long as it runs (with Redis, see tests/test_redis.py)."""
    assert server.ready() == (200, {"ready": True})


def test_readyz_is_503_while_the_process_is_full(start_server, clients):
    """A process holding MAX_CONNECTIONS refuses handshakes (503): /readyz says so, until
    one goes."""
    server = start_server(env={"MAX_CONNECTIONS": "1"})
    client = clients.plain(server)
    status, body = server.ready()
    assert status == 503 and body == {"ready": False, "reason": "MAX_CONNECTIONS (1) are open"}
    client.close()
    deadline = time.monotonic() + 5
    while server.ready()[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.ready() == (200, {"ready": True})


@pytest.mark.parametrize("proxy_header", [None, "X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_healthz_verbose_only_for_this_machine(server, proxy_header):
    """?verbose=1 (a walk of the heap) adds a greenlet count for a request from loopback, and
    is ignored for one a proxy passed on: the internet cannot make the server walk its heap."""
    headers = {proxy_header: "for=203.0.113.7" if proxy_header == "Forwarded" else
               "203.0.113.7"} if proxy_header else {}
    status, _, body = http_get(server, "/healthz?verbose=1", headers)
    assert status == 200
    got = json.loads(body)
    if proxy_header:
        assert "greenlets" not in got and got["status"] == "ok"
    else:
        assert got["greenlets"] > 0
    _, _, body = http_get(server, "/healthz?verbose=0", headers)
    assert "greenlets" not in json.loads(body)


@pytest.mark.parametrize("address, local", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("2001:db8::1", False), ("", False),
    ("unix", False)])
def test_what_counts_as_this_machine(address, local):
    """Loopback in any spelling (IPv4-mapped too, for a server on "::") is this machine."""
    assert web._from_this_machine({"REMOTE_ADDR": address}) is local


# -- Origin -------------------------------------------------------------------------------

def test_no_origin_is_accepted(server):
    """A handshake without Origin (a script, not a browser) is upgraded."""
    status, headers, _ = handshake(server)
    assert status == 101
    assert headers["upgrade"].lower() == "websocket"


def test_origin_matching_host_is_accepted(server):
    """The page's own origin (same host and port as Host) is upgraded."""
    status, _, body = handshake(server, headers={"Origin": "http://127.0.0.1:%d" % server.port})
    assert status == 101, body


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:1",
                                    "http://127.0.0.1", "null"])
def test_foreign_origin_is_403_without_upgrade(server, origin):
    """An Origin other than the page's own gets 403 with a text body and no upgrade."""
    status, headers, body = handshake(server, headers={"Origin": origin})
    text = assert_text_refusal(status, headers, body, 403)
    assert "origin" in text.lower()


PROXIED = [  # (Origin, Host, more headers, upgraded?): as a reverse proxy passes a page's handshake on
    ("https://chat.example.com", None, {"X-Forwarded-Host": "chat.example.com"}, True),
    ("https://chat.example.com", None, {"X-Forwarded-Host": "chat.example.com, inner.lan"}, True),
    ("https://chat.example.com", None, {"Forwarded": 'for=192.0.2.1;host="chat.example.com";proto=https'}, True),
    ("https://chat.example.com", "chat.example.com:443", {}, True),
    ("http://chat.example.com", "chat.example.com:80", {}, True),
    ("https://chat.example.com:443", "chat.example.com", {}, True),
    ("http://[::1]", "[::1]:80", {}, True),
    ("https://chat.example.com", "chat.example.com:80", {}, False),
    ("https://chat.example.com", None, {}, False),
    ("https://evil.example", None, {"X-Forwarded-Host": "chat.example.com"}, False),
    ("http://[::1]", "[::1]:8080", {}, False),
]


@pytest.mark.parametrize("origin, host, more, upgraded", PROXIED)
def test_the_pages_origin_is_known_behind_a_reverse_proxy(server, origin, host, more, upgraded):
    """The page's own origin is the host the browser sent its handshake to: Host, or the
    X-Forwarded-Host or Forwarded host a proxy passes on, with the scheme's default port
    written or not. A refusal's log line says what this server took itself to be."""
    status, headers, body = handshake(server, host=host, headers={"Origin": origin, **more})
    if upgraded:
        assert status == 101, body
    else:
        assert_text_refusal(status, headers, body, 403)
        server.wait_for_log(r"refused WebSocket handshake .*: 403 Forbidden Origin %s is not "
                            r"allowed\. \(this server is at %s.*; see ALLOWED_ORIGINS\)"
                            % (re.escape(origin), re.escape(host or "127.0.0.1:%d" % server.port)))


def test_origin_listed_in_allowed_origins_is_accepted(start_server):
    """A foreign origin listed in ALLOWED_ORIGINS is upgraded; an unlisted one still is not."""
    server = start_server(env={"ALLOWED_ORIGINS": "https://chat.example.com, http://evil.example"})
    status, _, body = handshake(server, headers={"Origin": "http://evil.example"})
    assert status == 101, body
    status, _, body = handshake(server, headers={"Origin": "https://chat.example.com"})
    assert status == 101, body
    status, headers, body = handshake(server, headers={"Origin": "http://other.example"})
    assert_text_refusal(status, headers, body, 403)


def test_allowed_origins_star_accepts_any(start_server):
    """ALLOWED_ORIGINS='*' upgrades a handshake from any origin."""
    server = start_server(env={"ALLOWED_ORIGINS": "*"})
    status, _, body = handshake(server, headers={"Origin": "http://evil.example"})
    assert status == 101, body


# -- Sec-WebSocket-Protocol ---------------------------------------------------------------

def test_no_subprotocol_is_plain_without_protocol_header(server):
    """Offering no subprotocol upgrades to plain text and the answer has no protocol header."""
    status, headers, _ = handshake(server)
    assert status == 101
    assert "sec-websocket-protocol" not in headers


@pytest.mark.parametrize("offer", ["chat.v1", "foo, chat.v1", "foo,chat.v1,bar", " chat.v1 "])
def test_supported_subprotocol_is_chosen_from_token_list(server, offer):
    """chat.v1 is picked out of the offered token list and echoed alone."""
    status, headers, body = handshake(server, headers={"Sec-WebSocket-Protocol": offer})
    assert status == 101, body
    assert headers["sec-websocket-protocol"] == "chat.v1"


@pytest.mark.parametrize("offer", ["foo", "chat.v1x", "xchat.v1", "chat", "foo, bar"])
def test_only_unknown_subprotocols_is_400_with_text(server, offer):
    """Offering only unknown subprotocols (no substring matching) gets 400 with a text body."""
    status, headers, body = handshake(server, headers={"Sec-WebSocket-Protocol": offer})
    text = assert_text_refusal(status, headers, body, 400)
    assert "chat.v1" in text, "the refusal names what the server speaks"


# -- Sec-WebSocket-Key and -Version -------------------------------------------------------

@pytest.mark.parametrize("key", ["!!!notbase64", base64.b64encode(b"12345").decode(),
                                 base64.b64encode(os.urandom(17)).decode(), "%%%%"])
def test_invalid_key_is_400_not_500(server, key):
    """A Sec-WebSocket-Key that is not 16 bytes of base64 gets 400 with text, never a 500."""
    status, headers, body = handshake(server, key=key)
    text = assert_text_refusal(status, headers, body, 400)
    assert "Sec-WebSocket-Key" in text
    assert_server_healthy(server)


def test_missing_key_is_400(server):
    """A handshake without Sec-WebSocket-Key gets 400 with text."""
    status, headers, body = handshake(server, key="")
    assert_text_refusal(status, headers, body, 400)
    assert_server_healthy(server)


@pytest.mark.parametrize("version", [None, "8", "14"])
def test_missing_or_wrong_version_is_426(server, version):
    """Without Sec-WebSocket-Version 13 the answer is 426 naming version 13."""
    status, headers, body = handshake(server, version=version)
    assert_text_refusal(status, headers, body, 426)
    assert headers.get("sec-websocket-version") == "13"
    assert_server_healthy(server)


def test_accept_header_is_derived_from_key(server):
    """Sec-WebSocket-Accept is base64(SHA-1(key + GUID)) (RFC 6455 4.2.2)."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    status, headers, _ = handshake(server, key=key)
    assert status == 101
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert headers["sec-websocket-accept"] == base64.b64encode(
        hashlib.sha1((key + guid).encode()).digest()).decode()


# -- MAX_CONNECTIONS ----------------------------------------------------------------------

def test_max_connections_refuses_with_503_then_frees_a_slot(start_server, clients):
    """With MAX_CONNECTIONS=2 a third handshake gets 503 with a body; after one closes, 101."""
    server = start_server(env={"MAX_CONNECTIONS": "2"})
    a = clients.raw(server)
    a.handshake()
    b = clients.raw(server)
    b.handshake()
    wait_health(server, connections=2)
    status, headers, body = handshake(server)
    text = assert_text_refusal(status, headers, body, 503)
    assert "connections" in text.lower()
    a.send_frame(0x8, b"\x03\xe8")
    assert a.recv_close() == (1000, "")
    deadline = time.monotonic() + 3
    while True:
        status, _, body = handshake(server)
        if status == 101:
            break
        assert status == 503, (status, body)
        assert time.monotonic() < deadline, "no slot freed within 3 s"
        time.sleep(0.02)
