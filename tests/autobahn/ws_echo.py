"""A minimal echo server on the ``websockets`` library (asyncio), the yardstick for chapter 9.

``python ws_echo.py MAX_SIZE`` listens on a free port of 127.0.0.1, prints
``Listening on PORT`` once ready, and echoes every message back as it came (text as text,
binary as binary) until it is terminated. Compression and keepalive pings are off, and the
size limit is the one the chat server gets, so both do the same work for the suite.
"""
import asyncio
import signal
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main(max_size):
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.cancel)
    async with serve(echo, "127.0.0.1", 0, max_size=max_size, compression=None,
                     ping_interval=None) as server:
        print("Listening on %d" % server.sockets[0].getsockname()[1], flush=True)
        try:
            await stop
        except asyncio.CancelledError:
            pass


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
