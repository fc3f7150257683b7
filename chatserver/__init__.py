"""A real-time chat server: the Ratchet recipe's relay, typed JSON messages, one registry.

The modules, from the edge to the core: ``web`` (Bottle routes) -> ``session`` (one
connection's life) -> ``hub`` (the client registry) -> ``rooms`` and ``protocol`` (plain
data). ``transport`` hardens gevent-websocket, ``frames`` is RFC 6455 framing without I/O,
``config`` reads the settings.
"""

__version__ = "0.1.0"
