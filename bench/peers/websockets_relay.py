"""Peer: the chat recipe's plain-text contract as a minimal Python ``websockets`` relay.

Usage: python bench/peers/websockets_relay.py PORT

asyncio and the library's ``broadcast()``, as its documentation (topics/broadcast) shows;
the same messages and presence limit as ``chat.py`` in plain-text mode.
"""
import asyncio
import itertools
import signal
import sys

from websockets.asyncio.server import broadcast, serve

PRESENCE_LIMIT = 1000
CLIENTS = set()
IDS = itertools.count(1)


async def relay(websocket):
    client_id = next(IDS)
    CLIENTS.add(websocket)
    try:
        if len(CLIENTS) <= PRESENCE_LIMIT:
            broadcast(CLIENTS - {websocket}, "Client %d connected." % client_id)
        async for message in websocket:
            if isinstance(message, bytes):
                await websocket.close(1003, "binary frames are not supported")
                break
            if message:
                broadcast(CLIENTS - {websocket}, 'Client %d says "%s"' % (client_id, message))
    finally:
        CLIENTS.discard(websocket)
        if len(CLIENTS) < PRESENCE_LIMIT:
            broadcast(CLIENTS, "Client %d disconnected." % client_id)


async def main(port):
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(relay, "127.0.0.1", port, max_size=65536):
        print("listening on %d" % port, flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
