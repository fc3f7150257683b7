"""Autobahn|Python (asyncio) as a real WAMP client for the tests."""
import asyncio

from autobahn.asyncio.wamp import ApplicationSession
from autobahn.asyncio.websocket import WampWebSocketClientFactory
from autobahn.wamp.types import ComponentConfig


async def join(port, realm="realm1"):
    """A joined Autobahn session on ws://127.0.0.1:port/ws; close it with ``leave``."""
    loop = asyncio.get_running_loop()
    joined = loop.create_future()
    left = loop.create_future()

    class Client(ApplicationSession):
        def onJoin(self, details):
            if not joined.done():
                joined.set_result(self)

        def onLeave(self, details):
            if not left.done():
                left.set_result(details)
            self.disconnect()

    factory = WampWebSocketClientFactory(lambda: Client(ComponentConfig(realm)),
                                         url="ws://127.0.0.1:%d/ws" % port)
    transport, _protocol = await loop.create_connection(factory, "127.0.0.1", port)
    session = await asyncio.wait_for(joined, 5)
    session.test_transport = transport
    session.test_left = left
    return session


async def leave(session):
    if session.is_attached():
        session.leave()
    try:
        await asyncio.wait_for(asyncio.shield(session.test_left), 3)
    except asyncio.TimeoutError:
        session.test_transport.close()


def run(coro, timeout=20):
    """Run a scenario coroutine to completion, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
