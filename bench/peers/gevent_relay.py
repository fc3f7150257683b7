"""Peer: the chat recipe's plain-text contract as a naive gevent-websocket relay.

Usage: python bench/peers/gevent_relay.py PORT

What public gevent chats do: one greenlet per connection from gevent's WSGIServer, and a
broadcast that is ``for c in clients: c.send(...)`` with the library's blocking ``send``. No
outbox, no write lock, no slow-consumer handling: a client that stops reading blocks the
sender's greenlet. Same messages and presence limit as ``chat.py`` in plain-text mode.
"""
from gevent import monkey

monkey.patch_all()

import itertools  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

PRESENCE_LIMIT = 1000
clients = {}  # websocket -> id
ids = itertools.count(1)


def broadcast(sender, text):
    for client in list(clients):
        if client is not sender:
            try:
                client.send(text)
            except Exception:  # noqa: BLE001 - a dead or busy client must not stop the loop
                pass


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"WebSocket only\n"]
    client_id = next(ids)
    clients[ws] = client_id
    try:
        if len(clients) <= PRESENCE_LIMIT:
            broadcast(ws, "Client %d connected." % client_id)
        while True:
            message = ws.receive()
            if message is None:
                break
            if isinstance(message, (bytes, bytearray)):
                ws.close(1003)
                break
            if message:
                broadcast(ws, 'Client %d says "%s"' % (client_id, message))
    finally:
        clients.pop(ws, None)
        if len(clients) < PRESENCE_LIMIT:
            broadcast(ws, "Client %d disconnected." % client_id)
    return []


if __name__ == "__main__":
    port = int(sys.argv[1])
    server = WSGIServer(("127.0.0.1", port), app, handler_class=WebSocketHandler, log=None)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    print("listening on %d" % port, flush=True)
    server.serve_forever()
