"""A TCP proxy that caps each connection's rate, the way S3 caps a single stream.

S3 serves one TCP stream at a bounded rate however fast the link is; parallel parts
are how a client goes faster. :class:`ThrottleProxy` stands in front of a loopback
server and gives every accepted connection its own token bucket per direction, so one
stream tops out at ``rate_bytes_per_s`` while N streams get N times that. It also
counts what it forwards: bytes per direction and per connection and, because it reads
the client's side as HTTP/1.1 (request heads with ``Content-Length`` bodies, the way
the provider and presigned PUTs send them), how many of the bytes were request heads
and how many were bodies, and the request line of every request.

When the counters are final: bytes are counted as they are handed to the other side,
and a connection is marked closed (``closed_s``) before the proxy passes the last EOF or
close on; both happen on the proxy's loop, where :meth:`ThrottleProxy.stats` is read. So a
client that has its answer, or that has seen the proxy close its connection, reads
counters that already include them. A client that hangs up first, without waiting for
the proxy to close, has no such guarantee: it calls :meth:`ThrottleProxy.wait_idle`.

Two ways to run it:

- :class:`ThrottleProxy`: an asyncio loop on a daemon thread of this process (tests).
- :class:`ThrottleProxyProcess`: the same in a spawned child process, controlled over a
  pipe, so the proxy does not compete for the measuring process's GIL (benchmarks).

Command line, for trying it by hand::

    python -m tests.support.throttle_proxy --upstream 127.0.0.1:8080 --rate-mib 20

Stdlib only; the benchmark imports this too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

__all__ = [
    "ConnectionStats",
    "CountingSink",
    "HttpRequestMeter",
    "ProxyStats",
    "RequestRecord",
    "ThrottleProxy",
    "ThrottleProxyProcess",
    "TokenBucket",
]

MIB = 1024 * 1024
#: Bytes read from a socket at a time. Small enough that 20 MiB/s is ~320 reads a
#: second per connection, so the bucket meters smoothly.
READ_BYTES = 64 * 1024
#: Longest request head the meter parses before giving up on a connection.
MAX_HEAD_BYTES = 64 * 1024
#: Request targets are kept up to this many characters (presigned queries are long).
MAX_TARGET_CHARS = 400


class TokenBucket:
    """Tokens (bytes) refill at ``rate`` per second up to ``burst``.

    :meth:`take` always grants and returns how long to wait first: the bucket goes into
    debt, so the long-run rate is exactly ``rate`` whatever the read sizes are.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self, amount: int) -> float:
        """Spend ``amount`` tokens; returns the seconds to wait before using them."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass
class RequestRecord:
    """One HTTP request seen on the client->server side."""

    method: str
    target: str
    head_bytes: int
    content_length: int
    body_bytes: int = 0
    started_s: float = 0.0
    #: When the last body byte went through; None while the body is incomplete.
    finished_s: float | None = None
    #: Seconds the proxy held this request's bytes back to keep to the rate.
    throttled_s: float = 0.0
    #: Seconds the proxy waited for the server to take this request's bytes.
    drain_s: float = 0.0

    @property
    def complete(self) -> bool:
        """Whether the whole announced body went through."""
        return self.body_bytes == self.content_length


class HttpRequestMeter:
    """Splits a client->server byte stream into request heads and bodies.

    Understands what the provider sends: HTTP/1.1 requests, keep-alive, bodies framed
    by ``Content-Length``. A chunked body or an unparsable head switches the meter off
    for the rest of the connection; those bytes are then counted as ``unparsed_bytes``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._head = bytearray()
        self._body_left = 0
        self.head_bytes = 0
        self.body_bytes = 0
        self.unparsed_bytes = 0
        self.requests: list[RequestRecord] = []

    def feed(self, data: bytes) -> None:
        """Account for ``data``, the next bytes of the stream."""
        at, size = 0, len(data)
        while at < size:
            if self.unparsed_bytes:
                self.unparsed_bytes += size - at
                return
            if self._body_left:
                take = min(self._body_left, size - at)
                self._body_left -= take
                self.body_bytes += take
                if self.requests:  # empty after a reset in the middle of a body
                    self.requests[-1].body_bytes += take
                    if not self._body_left:
                        self.requests[-1].finished_s = self._clock()
                at += take
                continue
            before = len(self._head)
            self._head += data[at:]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD_BYTES:
                    self.unparsed_bytes += len(self._head)
                    del self._head[:]
                return
            head_len = end + 4
            at += head_len - before
            head = bytes(self._head[:head_len])
            del self._head[:]
            if not self._start_request(head):
                self.unparsed_bytes += len(head) + size - at
                return

    def _start_request(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return False
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding":
                return False
            if name == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return False
        self.head_bytes += len(head)
        now = self._clock()
        self.requests.append(
            RequestRecord(
                parts[0],
                parts[1][:MAX_TARGET_CHARS],
                len(head),
                length,
                0,
                now,
                None if length else now,
            )
        )
        self._body_left = length
        return True


@dataclass
class ConnectionStats:
    """What one proxied connection carried."""

    number: int
    opened_s: float
    closed_s: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    head_bytes: int = 0
    body_bytes: int = 0
    unparsed_bytes: int = 0
    requests: list[RequestRecord] = field(default_factory=list)


@dataclass
class ProxyStats:
    """A snapshot of the proxy's counters; times are seconds since the last reset."""

    rate_bytes_per_s: float | None
    connections_total: int
    connections_open: int
    bytes_up: int
    bytes_down: int
    head_bytes: int
    body_bytes: int
    unparsed_bytes: int
    requests: int
    connections: list[ConnectionStats]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Connection:
    # Created on the proxy's loop, and only touched there.
    def __init__(self, number: int, opened_s: float) -> None:
        self.stats = ConnectionStats(number, opened_s)
        self.meter = HttpRequestMeter()
        self.tasks: list[asyncio.Task[None]] = []
        #: Directions still forwarding ("up", "down").
        self.open_sides = {"up", "down"}
        #: Set once ``stats.closed_s`` is, i.e. once this connection's counters are final.
        self.closed = asyncio.Event()


class ThrottleProxy:
    """Forward ``listen_host:listen_port`` to ``upstream``, capping each connection.

    Args:
        upstream_host: Where to connect.
        upstream_port: Where to connect.
        rate_bytes_per_s: Cap per connection and per direction; None forwards at full
            speed (it still counts).
        burst_bytes: Bucket size; a quarter of a MiB by default.
        listen_host: Address to bind.
        listen_port: Port to bind; 0 picks a free one.
        throttle_down: Also cap server->client (on by default; responses are small).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        rate_bytes_per_s: float | None,
        burst_bytes: int = 256 * 1024,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        throttle_down: bool = True,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        self.throttle_down = throttle_down
        self._listen = (listen_host, listen_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: list[_Connection] = []
        self._numbers = itertools.count(1)
        self._epoch = time.monotonic()
        self.port = 0
        self.host = listen_host

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening side."""
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> ThrottleProxy:
        """Bind and serve on a daemon thread."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, *self._listen, reuse_address=True)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="throttle-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every open connection."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [task for conn in self._connections for task in conn.tasks if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> ThrottleProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- counters ------------------------------------------------------------------------

    def _call(self, make: Callable[[], Any]) -> Any:
        """Run ``make`` on the proxy's loop, so it sees a consistent state."""
        assert self._loop is not None, "not started"

        async def call() -> Any:
            return make()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def stats(self, *, with_connections: bool = True) -> ProxyStats:
        """A snapshot of every counter since the last :meth:`reset`."""
        return self._call(lambda: self._snapshot(with_connections))  # type: ignore[no-any-return]

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until no connection is open, so every counter is final.

        Returns False when some connection is still open after ``timeout_s``.
        """
        assert self._loop is not None, "not started"

        async def idle() -> None:
            while pending := [c for c in self._connections if not c.closed.is_set()]:
                await pending[0].closed.wait()

        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(idle(), timeout_s), self._loop)
        try:
            future.result(timeout_s + 10)  # the margin only matters if the loop is stuck
        except TimeoutError:
            future.cancel()
            return False
        return True

    def reset(self) -> None:
        """Zero the counters; open connections keep their buckets and go on counting."""

        def clear() -> None:
            now = time.monotonic()
            self._epoch = now
            kept = []
            for conn in self._connections:
                if conn.stats.closed_s is None:
                    conn.stats = ConnectionStats(conn.stats.number, 0.0)
                    conn.meter.head_bytes = conn.meter.body_bytes = conn.meter.unparsed_bytes = 0
                    conn.meter.requests = []
                    kept.append(conn)
            self._connections = kept

        self._call(clear)

    def _snapshot(self, with_connections: bool) -> ProxyStats:
        conns = [
            replace(
                conn.stats,
                head_bytes=conn.meter.head_bytes,
                body_bytes=conn.meter.body_bytes,
                unparsed_bytes=conn.meter.unparsed_bytes,
                requests=[
                    replace(
                        record,
                        started_s=record.started_s - self._epoch,
                        finished_s=None
                        if record.finished_s is None
                        else record.finished_s - self._epoch,
                    )
                    for record in conn.meter.requests
                ],
            )
            for conn in self._connections
        ]
        return ProxyStats(
            rate_bytes_per_s=self.rate,
            connections_total=len(conns),
            connections_open=sum(c.closed_s is None for c in conns),
            bytes_up=sum(c.bytes_up for c in conns),
            bytes_down=sum(c.bytes_down for c in conns),
            head_bytes=sum(c.head_bytes for c in conns),
            body_bytes=sum(c.body_bytes for c in conns),
            unparsed_bytes=sum(c.unparsed_bytes for c in conns),
            requests=sum(len(c.requests) for c in conns),
            connections=conns if with_connections else [],
        )

    # -- forwarding ----------------------------------------------------------------------

    def _bucket(self) -> TokenBucket | None:
        return None if self.rate is None else TokenBucket(self.rate, self.burst)

    def _closed(self, conn: _Connection) -> None:
        """Settle ``conn``'s counters; call before anything tells a peer it ended."""
        if conn.stats.closed_s is None:
            conn.stats.closed_s = time.monotonic() - self._epoch
        conn.closed.set()

    def _side_done(self, conn: _Connection, side: str) -> None:
        """One direction stopped forwarding; the second one to stop closes ``conn``."""
        conn.open_sides.discard(side)
        if not conn.open_sides:
            self._closed(conn)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(next(self._numbers), time.monotonic() - self._epoch)
        self._connections.append(conn)
        handler = asyncio.current_task()
        if handler is not None:  # so that stopping cancels it even before the pipes run
            conn.tasks.append(handler)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._closed(conn)
            writer.close()
            return
        up = asyncio.ensure_future(self._pipe(reader, up_writer, conn, upstream=True))
        down = asyncio.ensure_future(self._pipe(up_reader, writer, conn, upstream=False))
        conn.tasks += [up, down]
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            # Normally the pipes have closed the books already; not when cancelled.
            self._closed(conn)
            for side in (writer, up_writer):
                side.close()
            for side in (writer, up_writer):
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await side.wait_closed()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Connection,
        *,
        upstream: bool,
    ) -> None:
        bucket = self._bucket() if upstream or self.throttle_down else None
        side = "up" if upstream else "down"
        try:
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                started = time.monotonic()
                if bucket is not None:
                    wait = bucket.take(len(data))
                    if wait > 0:
                        await asyncio.sleep(wait)
                throttled = time.monotonic()
                writer.write(data)
                # Count now, before the next await: from here on the far side may act on
                # these bytes (answer, hang up), and the stats must already hold them.
                record = None
                if upstream:
                    conn.stats.bytes_up += len(data)
                    conn.meter.feed(data)
                    if conn.meter.requests:
                        record = conn.meter.requests[-1]
                        record.throttled_s += throttled - started
                else:
                    conn.stats.bytes_down += len(data)
                await writer.drain()
                if record is not None:
                    record.drain_s += time.monotonic() - throttled
            self._side_done(conn, side)  # before the EOF is passed on
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            # One side went away (reset, or killed): drop the other side too.
            self._side_done(conn, side)
            writer.close()


class CountingSink:
    """A raw TCP server that reads everything and counts it per connection (calibration)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received: list[int] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, name="counting-sink", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            index = len(self.received)
            self.received.append(0)
            thread = threading.Thread(target=self._drain, args=(conn, index), daemon=True)
            # Listed before it runs: it may close its connection (which the client can
            # see) before this thread gets the GIL back, and join() must not miss it.
            self._threads.append(thread)
            thread.start()

    def _drain(self, conn: socket.socket, index: int) -> None:
        with conn:
            while data := conn.recv(MIB):
                self.received[index] += len(data)

    def join(self, timeout_s: float = 10.0) -> None:
        """Wait until every connection so far has been drained and closed."""
        for thread in list(self._threads):
            thread.join(timeout_s)

    def close(self) -> None:
        self.listener.close()


# -- in a child process -----------------------------------------------------------------


def _child_main(options: dict[str, Any], conn: Connection) -> None:
    proxy = ThrottleProxy(**options).start()
    conn.send(("ready", proxy.port))
    try:
        while True:
            command, arg = conn.recv()
            if command == "stats":
                conn.send(proxy.stats(with_connections=arg).to_dict())
            elif command == "reset":
                proxy.reset()
                conn.send("ok")
            elif command == "wait_idle":
                conn.send(proxy.wait_idle(arg))
            elif command == "stop":
                break
    except EOFError:
        pass
    finally:
        proxy.stop()
        with contextlib.suppress(OSError):
            conn.send("stopped")


class ThrottleProxyProcess:
    """:class:`ThrottleProxy` in a spawned child process; same arguments.

    :meth:`stats` returns :meth:`ProxyStats.to_dict` (plain data over the pipe).
    """

    def __init__(self, upstream_host: str, upstream_port: int, **options: Any) -> None:
        self._options = {"upstream_host": upstream_host, "upstream_port": upstream_port}
        self._options.update(options)
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_child_main, args=(self._options, child), daemon=True
        )
        self.port = 0
        self.host = str(options.get("listen_host", "127.0.0.1"))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ThrottleProxyProcess:
        self._process.start()
        if not self._conn.poll(30):
            raise RuntimeError("throttle proxy did not start")
        status, port = self._conn.recv()
        if status != "ready":
            raise RuntimeError(f"throttle proxy did not start: {status}")
        self.port = port
        return self

    def stats(self, *, with_connections: bool = True) -> dict[str, Any]:
        self._conn.send(("stats", with_connections))
        answer: dict[str, Any] = self._conn.recv()
        return answer

    def reset(self) -> None:
        self._conn.send(("reset", None))
        self._conn.recv()

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """:meth:`ThrottleProxy.wait_idle` in the child: False when some are still open."""
        self._conn.send(("wait_idle", timeout_s))
        answer: bool = self._conn.recv()
        return answer

    def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self._conn.send(("stop", None))
                self._conn.poll(10) and self._conn.recv()
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    def __enter__(self) -> ThrottleProxyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind")
    parser.add_argument("--rate-mib", type=float, default=20.0, help="MiB/s per connection")
    args = parser.parse_args(argv)
    up_host, _, up_port = args.upstream.rpartition(":")
    host, _, port = args.listen.rpartition(":")
    with ThrottleProxy(
        up_host,
        int(up_port),
        rate_bytes_per_s=args.rate_mib * MIB if args.rate_mib > 0 else None,
        listen_host=host,
        listen_port=int(port),
    ) as proxy:
        print(f"proxy at {proxy.url} -> {args.upstream}, {args.rate_mib} MiB/s per connection")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(5)
                stats = proxy.stats(with_connections=False)
                print(
                    f"{stats.connections_open} open, {stats.bytes_up / MIB:.1f} MiB up, "
                    f"{stats.bytes_down / MIB:.1f} MiB down, {stats.requests} requests",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
