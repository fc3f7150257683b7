"""Real WebSocket clients for the tests: websocket-client for JSON and plain text, and a raw
socket client that can break the rules on purpose."""
import base64
import json
import os
import socket
import struct
import time

import websocket  # websocket-client


def close_quietly(ws):
    """Close a websocket-client connection at the end of a test, and its socket in any case:
    once a close frame has been read, ``close()`` does nothing, and a socket left open keeps
    the server waiting for its end (RFC 6455 7.1.1), up to its CLOSE_WAIT, when it stops."""
    try:
        ws.close(timeout=1)
    except Exception:  # noqa: BLE001 - the test is over; the socket may be gone already
        pass
    finally:
        ws.shutdown()


class _Base:
    subprotocols = None

    def __init__(self, port, subprotocols=None, origin=None, timeout=5):
        kw = {"timeout": timeout}
        protos = subprotocols if subprotocols is not None else self.subprotocols
        if protos:
            kw["subprotocols"] = protos
        if origin:
            kw["origin"] = origin
        self.ws = websocket.create_connection("ws://127.0.0.1:%d/ws" % port, **kw)

    def close(self):
        close_quietly(self.ws)

    def _recv_text(self, timeout):
        self.ws.settimeout(timeout)
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionClosed(data)
        return data.decode("utf-8")

    def quiet(self, wait=0.3):
        """None when nothing arrives within ``wait`` seconds, else what arrived."""
        try:
            return self.recv(wait)
        except websocket.WebSocketTimeoutException:
            return None


class ConnectionClosed(Exception):
    """The server closed the connection; ``code`` and ``reason`` are from its close frame."""

    def __init__(self, payload):
        super().__init__(payload)
        self.code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        self.reason = payload[2:].decode("utf-8", "replace")


class PlainClient(_Base):
    """The recipe's client: no subprotocol, text in and out."""

    def send(self, text):
        self.ws.send(text)

    def recv(self, timeout=5):
        return self._recv_text(timeout)

    def recv_until_closed(self, timeout=5):
        """Read until the server's close frame; returns its ConnectionClosed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._recv_text(max(0.01, deadline - time.monotonic()))
            except ConnectionClosed as closed:
                return closed
        raise AssertionError("server did not close within %s s" % timeout)


class JsonClient(PlainClient):
    """A ``chat.v1`` client; ``welcome`` holds its first frame."""

    subprotocols = ["chat.v1"]

    def __init__(self, port, **kw):
        super().__init__(port, **kw)
        self.welcome = self.recv()
        assert self.welcome["type"] == "welcome", self.welcome
        self.id = self.welcome["id"]

    def send(self, obj=None, **fields):
        self.ws.send(json.dumps(obj if obj is not None else fields))

    def recv(self, timeout=5):
        return json.loads(self._recv_text(timeout))

    def drain(self, wait=0.3):
        """Every frame that arrives until ``wait`` seconds pass without one."""
        out = []
        while True:
            frame = self.quiet(wait)
            if frame is None:
                return out
            out.append(frame)

    def wait(self, type_, timeout=5, **match):
        """The next frame of ``type_`` whose fields equal ``match``, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s frame matching %r within %s s" % (type_, match, timeout))
            msg = self.recv(left)
            if msg.get("type") == type_ and all(msg.get(k) == v for k, v in match.items()):
                return msg


def mask_bytes(payload, key):
    """``payload`` XOR the 4-byte ``key``, at C speed."""
    n = len(payload)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame_bytes(opcode, payload=b"", fin=True, rsv=0, mask=True, length=None):
    """A client frame; ``length`` announces another payload length than the one sent."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + mask_bytes(payload, key)


class RawClient:
    """A client on a bare socket: any handshake, any frame, masked or not."""

    def __init__(self, port, timeout=5):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.buf = b""

    def request(self, path="/ws", headers=None, key=None, version="13", method="GET", host=None):
        """Send a handshake; returns (status code, headers dict, body so far)."""
        key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % (host or "127.0.0.1:%d" % self.port),
                 "Upgrade: websocket", "Connection: Upgrade"]
        if version is not None:
            lines.append("Sec-WebSocket-Version: %s" % version)
        if key:
            lines.append("Sec-WebSocket-Key: %s" % key)
        for name, value in (headers or {}).items():
            lines.append("%s: %s" % (name, value))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return self.read_response()

    def read_response(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 101:
            n = int(headers.get("content-length", 0) or 0)
            while len(self.buf) < n:
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
                self.buf += chunk
        body, self.buf = (self.buf, b"") if status != 101 else (b"", self.buf)
        return status, headers, body

    def handshake(self, **kw):
        status, headers, body = self.request(**kw)
        assert status == 101, (status, body)
        return headers

    def send_frame(self, opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
        self.sock.sendall(frame_bytes(opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length))

    def send_text(self, text, **kw):
        self.send_frame(0x1, text.encode("utf-8"), **kw)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by the server")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv_frame(self, timeout=5):
        """(opcode, payload) of the next frame from the server."""
        self.sock.settimeout(timeout)
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        assert not b1 & 0x80, "server frames must not be masked"
        return b0 & 0x0F, self._read(n)

    def recv_close(self, timeout=5):
        """Read frames until a close frame; returns its (code, reason)."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:].decode("utf-8")

    def recv_text(self, timeout=5):
        while True:
            opcode, payload = self.recv_frame(timeout)
            if opcode == 0x1:
                return payload.decode("utf-8")
            if opcode == 0x8:
                raise EOFError("close frame %r" % payload)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
