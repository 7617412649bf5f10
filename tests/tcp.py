"""A TCP proxy that can stop answering: a database or Redis that hangs, on demand.

The server behind it stays healthy; the proxy accepts every connection and,
once ``hang()`` is called (or past the first ``forward`` connections), passes
nothing on in either direction and closes nothing — what a peer looks like
when it is stopped, overloaded or behind a dead network path. ``resume()``
lets held bytes through again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class HangingProxy:
    def __init__(self, target_host: str, target_port: int, forward: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.forward = forward
        self.port = 0
        self.accepted = 0
        self._answering = asyncio.Event()
        self._answering.set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def hang(self) -> None:
        self._in_loop(self._answering.clear)

    def resume(self) -> None:
        self._in_loop(self._answering.set)

    def _in_loop(self, change: Callable[[], None]) -> None:
        """Applied before returning: bytes that arrive afterwards see the new state."""

        async def apply() -> None:
            change()

        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.forward is not None and self.accepted > self.forward:
                await reader.read()  # silent: read until the client gives up, answer nothing
                return
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(
                self._pump(reader, upstream_writer),
                self._pump(upstream_reader, writer),
                return_exceptions=True,
            )
        except OSError:
            pass  # the client reset, or the target is down: as a dead peer would, say nothing
        finally:
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._answering.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> HangingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        self._answering.set()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers on them."""
    with HangingProxy("127.0.0.1", 9, forward=0) as proxy:
        yield proxy.port
