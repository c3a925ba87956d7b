"""A worker's GCS relay: an address for the GCS that stays the same while the head's IP changes.

Ray's raylets reconnect to the GCS at the address they were started with; on CML a restarted head
is a new pod with a new IP and pods have no stable name. So each worker launcher runs this small
TCP relay on its own pod address and starts Ray with `--address=<pod ip>:<relay port>`: the raylet,
its core workers and drivers on that node all reach the GCS through it. Each new connection is
forwarded to the GCS of the newest head rendezvous (`head.json`, read every `POLL_SECONDS`; one
with a lower epoch than the highest seen is ignored); when the head changes, open connections are
closed so gRPC reconnects, through the relay, to the new GCS. With no head published, new
connections are closed at once (the clients retry within their reconnect window).

It runs an asyncio loop in one daemon thread of the launcher; `start()` returns the bound port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("ray_serve_cai.node")

POLL_SECONDS = 1.0
CHUNK = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Target:
    """Where the relay forwards to, and which head that is (a change closes open connections)."""

    host: str
    port: int
    head_id: str
    epoch: int = 0


class EpochFilter:
    """Follow only the newest epoch: a target whose epoch is below the highest seen is ignored."""

    def __init__(self) -> None:
        self.highest = 0

    def accept(self, target: Target | None) -> Target | None:
        if target is None:
            return None
        if target.epoch < self.highest:
            return None
        self.highest = target.epoch
        return target


class GcsRelay:
    """The relay of one worker node (see the module docstring)."""

    def __init__(self, host: str, port: int, find_target: Callable[[], Target | None],
                 also_on: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.host = host
        # More addresses on the same port (a shared host: Ray turns a 127.0.0.1 address into the
        # host's own IP, so the relay listens on both).
        self.also_on = also_on
        self.port = port
        self._find_target = find_target
        self._filter = EpochFilter()
        self.target: Target | None = None
        self.connections = 0  # forwarded so far (the status page and tests read it)
        self._open: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None

    def start(self, timeout: float = 10.0) -> int:
        """Bind and serve in a daemon thread; the bound port. Raises OSError when it cannot bind."""
        self._thread = threading.Thread(target=self._run, name="gcs-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OSError(f"the GCS relay did not start on {self.host}:{self.port} within {timeout:.0f}s")
        if self._error is not None:
            raise OSError(f"the GCS relay cannot listen on {self.host}:{self.port}: {self._error}")
        return self.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported to start(), never raised in a thread
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.target = self._filter.accept(await asyncio.to_thread(self._find_target))
        hosts = [self.host, *(h for h in self.also_on if h != self.host)]
        if self.port == 0 and len(hosts) > 1:  # one port for every address: the first one's
            first = await asyncio.start_server(self._serve, self.host, 0, reuse_address=True)
            self.port = first.sockets[0].getsockname()[1]
            first.close()
            await first.wait_closed()
        self._server = await asyncio.start_server(self._serve, hosts, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        watcher = asyncio.create_task(self._watch())
        await self._stopping.wait()
        watcher.cancel()
        self._server.close()
        self._close_all()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                found = await asyncio.to_thread(self._find_target)
            except Exception as error:  # an unreadable rendezvous: keep the last target
                logger.warning("GCS relay: cannot read the head rendezvous: %s", error)
                continue
            accepted = self._filter.accept(found)
            if found is not None and accepted is None:
                continue  # a stale head (lower epoch): keep following the newest
            if accepted != self.target:
                old = self.target
                self.target = accepted
                logger.info(
                    "GCS relay %s: head %s → %s; closing %s open connection(s)",
                    self.address,
                    f"{old.host}:{old.port} (epoch {old.epoch})" if old else "none",
                    f"{accepted.host}:{accepted.port} (epoch {accepted.epoch})" if accepted else "none",
                    len(self._open),
                )
                self._close_all()

    def _close_all(self) -> None:
        for writer in list(self._open):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:  # the relay stops: end quietly (asyncio logs a cancelled handler)
            writer.transport.abort()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target
        if target is None:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_SECONDS
            )
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        if target != self.target:  # the head changed while connecting
            upstream_writer.transport.abort()
            writer.transport.abort()
            return
        self.connections += 1
        self._open.update((writer, upstream_writer))
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            for side in (writer, upstream_writer):
                self._open.discard(side)
                side.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error, then close the other side (so both ends see the end)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, RuntimeError):
        pass
    finally:
        writer.transport.abort()


__all__ = ["EpochFilter", "GcsRelay", "Target"]
