"""A TCP proxy that counts, shapes and cuts: the network for tests and benchmarks.

One proxy sits between one client and the coordinator. It counts every byte it forwards in
each direction (``down``: coordinator to client), can limit each direction to a rate with a
one-way latency (serialisation at ``rate_bps`` then ``latency_s`` of propagation, like a
link), and can cut connections for real (RST) after a number of bytes, to test resumption.

It runs its own asyncio loop in a thread, so synchronous tests and benchmarks can use it::

    with TcpProxy(("127.0.0.1", port), down=Shape(5e6, 0.02)) as proxy:
        connect clients to f"127.0.0.1:{proxy.port}"; later read proxy.bytes_down
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

READ_BYTES = 4096


@dataclass(frozen=True)
class Shape:
    """One direction of a link: bits per second (None = unlimited) and one-way latency."""

    rate_bps: float | None = None
    latency_s: float = 0.0


@dataclass(frozen=True)
class Cut:
    """Abort a connection once this many bytes went through it in ``direction``; the first
    ``connections`` connections that reach it are cut, later ones are left alone."""

    direction: str  # "down" or "up"
    after_bytes: int
    connections: int = 1


class TcpProxy:
    def __init__(
        self,
        target: tuple[str, int],
        down: Shape = Shape(),
        up: Shape = Shape(),
        cut: Cut | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.shapes = {"down": down, "up": up}
        self.cut = cut
        self.listen_host = listen_host
        self.port = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self.cuts_done = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netem", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.port

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        return self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    # ------------------------------------------------------------- traffic
    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writers.add(w)
        self.connections += 1
        state = {"down": 0, "up": 0, "cut": False}
        up = asyncio.create_task(self._pump(client_r, server_w, "up", state, (client_w, server_w)))
        down = asyncio.create_task(self._pump(server_r, client_w, "down", state, (client_w, server_w)))
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        except asyncio.CancelledError:  # the proxy is stopping
            pass
        finally:
            for w in (client_w, server_w):
                self._writers.discard(w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        state: dict[str, int],
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        shape = self.shapes[direction]
        queue: asyncio.Queue[tuple[float, bytes] | str] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer, both))
        free_at = time.monotonic()  # when the emulated link is done serialising what it was given
        end = "eof"
        try:
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                cut = self.cut
                if (
                    cut is not None
                    and cut.direction == direction
                    and self.cuts_done < cut.connections
                    and state[direction] + len(data) >= cut.after_bytes
                ):
                    data = data[: max(cut.after_bytes - state[direction], 0)]
                    self.cuts_done += 1
                    end = "cut"
                state[direction] += len(data)
                if direction == "down":
                    self.bytes_down += len(data)
                else:
                    self.bytes_up += len(data)
                now = time.monotonic()
                if shape.rate_bps:
                    free_at = max(free_at, now) + 8.0 * len(data) / shape.rate_bps
                    at = free_at + shape.latency_s
                    if free_at - now > 0.05:  # back-pressure: read no further ahead of the link
                        await asyncio.sleep(free_at - now - 0.05)
                else:
                    at = now + shape.latency_s
                await queue.put((at, data))
                if end == "cut":
                    break
        except (ConnectionError, OSError):
            end = "cut"
        finally:
            await queue.put(end)
            await deliver

    @staticmethod
    async def _deliver(
        queue: asyncio.Queue[tuple[float, bytes] | str],
        writer: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """Writes each piece when the emulated link delivers it; then half-closes on EOF, or
        aborts the whole connection (RST both ways) on a cut."""
        while True:
            item = await queue.get()
            if isinstance(item, str):
                break
            at, data = item
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                item = "cut"
                break
        if item == "cut":
            for w in both:
                sock = w.get_extra_info("socket")
                if sock is not None:  # linger 0: the kernel answers with RST, as a dropped link would
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
        else:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
