"""An HTTP/1.1 fault-injecting proxy: resets, lost answers, cut bodies and stalls.

It sits between a client and one upstream server on loopback and reads both sides as
HTTP/1.1 (``Content-Length`` framing, keep-alive). For every exchange it asks
``decide(exchange)`` what to do:

* ``None``: relay the request and the answer;
* ``RESET_BEFORE``: reset the client before the request reaches the server;
* ``LOST_ANSWER``: let the server handle the request, then reset the client instead
  of answering (the answer is lost: the server did the work);
* ``CUT_ANSWER``: relay the answer's head and half its body, then reset;
* ``STALL``: let the server handle the request, then hold the client's connection
  open without answering until the client gives up;
* ``CLOSE_BEFORE_ANSWER``: let the server handle the request, then close cleanly.

Every exchange is recorded (``exchanges``) under a lock before the proxy acts on it, so
a test that has its answer, or its failure, can read the record. Stdlib only.
"""

from __future__ import annotations

import contextlib
import enum
import random
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from tests.support.servers import RawSocketServer, _abort

__all__ = ["Exchange", "Fault", "FaultProxy", "fault_on", "random_faults"]

_BLOCK = 256 * 1024
_HEAD_LIMIT = 64 * 1024


class Fault(enum.Enum):
    """What the proxy does to one exchange."""

    RESET_BEFORE = "reset before the request reaches the server"
    LOST_ANSWER = "server handled it; the answer is replaced by a reset"
    CUT_ANSWER = "answer cut mid-body by a reset"
    STALL = "server handled it; the client waits for an answer that never comes"
    CLOSE_BEFORE_ANSWER = "server handled it; the connection closes with no answer"


@dataclass(frozen=True)
class Exchange:
    """One request as the proxy saw it: its method, path (no query) and sequence number."""

    method: str
    path: str
    number: int
    fault: Fault | None = None


Decide = Callable[[Exchange], Fault | None]


def fault_on(path_part: str, fault: Fault, *, times: int = 1, method: str | None = None) -> Decide:
    """Fault the first ``times`` exchanges whose path contains ``path_part``."""
    lock = threading.Lock()
    left = [times]

    def decide(exchange: Exchange) -> Fault | None:
        if path_part not in exchange.path or (method and exchange.method != method):
            return None
        with lock:
            if left[0] <= 0:
                return None
            left[0] -= 1
        return fault

    return decide


def random_faults(rate: float, seed: int, faults: tuple[Fault, ...] = tuple(Fault)) -> Decide:
    """Fault each exchange with probability ``rate``, the fault picked at random."""
    lock = threading.Lock()
    rng = random.Random(seed)

    def decide(exchange: Exchange) -> Fault | None:
        with lock:
            if rng.random() >= rate:
                return None
            return rng.choice(faults)

    return decide


class _Head:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.split(b"\r\n")
        self.start = lines[0].decode("latin-1")
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if b":" in line:
                name, _, value = line.partition(b":")
                self.headers[name.decode("latin-1").strip().lower()] = value.decode(
                    "latin-1"
                ).strip()

    @property
    def length(self) -> int:
        return int(self.headers.get("content-length", "0") or 0)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class _Stream:
    """Buffered reads from a socket: heads up to CRLFCRLF, then exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def head(self) -> _Head | None:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > _HEAD_LIMIT:
                return None
            block = self.sock.recv(_BLOCK)
            if not block:
                return None
            self.buffer += block
        raw, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return _Head(raw + b"\r\n\r\n")

    def copy(self, length: int, target: socket.socket | None) -> bytes:
        """Move ``length`` body bytes to ``target`` (or keep them, when it is None)."""
        kept: list[bytes] = []
        while length > 0:
            if not self.buffer:
                self.buffer = self.sock.recv(min(_BLOCK, length))
                if not self.buffer:
                    raise ConnectionError("peer closed mid-body")
            block, self.buffer = self.buffer[:length], self.buffer[length:]
            length -= len(block)
            if target is not None:
                target.sendall(block)
            else:
                kept.append(block)
        return b"".join(kept)


def _client_speaks_first(client: socket.socket, server: socket.socket) -> bool:
    """Wait for the client's next request; False if the server hangs up before it."""
    readable, _, _ = select.select([client, server], [], [])
    return server not in readable or client in readable


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream``, faulting what ``decide`` says.

    Args:
        decide: Called for each exchange; None relays it untouched.
        upstream: ``(host, port)`` of the server; may also be set after start, before
            the first request.
    """

    def __init__(
        self, decide: Decide | None = None, upstream: tuple[str, int] | None = None
    ) -> None:
        self.decide: Decide = decide or (lambda exchange: None)
        self.upstream = upstream
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        # Accepting, a thread per connection, and shutting clients down on stop.
        self._server = RawSocketServer(self._serve)
        # Upstream sockets, shut down on stop too, so no handler waits on the server.
        self._upstreams: set[socket.socket] = set()

    @property
    def exchanges(self) -> list[Exchange]:
        """Every exchange so far, with the fault applied to it."""
        with self._lock:
            return list(self._exchanges)

    def faulted(self) -> list[Exchange]:
        """The exchanges that were faulted."""
        return [exchange for exchange in self.exchanges if exchange.fault is not None]

    @property
    def base_url(self) -> str:
        return self._server.base_url

    def start(self) -> FaultProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        with self._lock:
            upstreams = list(self._upstreams)
        for sock in upstreams:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _track(self, sock: socket.socket, live: bool) -> None:
        with self._lock:
            if live:
                self._upstreams.add(sock)
            else:
                self._upstreams.discard(sock)

    def _serve(self, client: socket.socket) -> None:
        server: socket.socket | None = None
        try:
            source = _Stream(client)
            upstream: _Stream | None = None
            while True:
                if (
                    server is not None
                    and not source.buffer
                    and not _client_speaks_first(client, server)
                ):
                    # The server closed the idle connection: close the client's too, as a
                    # TCP proxy would, so its pool sees the close instead of a reset later.
                    return
                head = source.head()
                if head is None:
                    return
                method, _, rest = head.start.partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                with self._lock:
                    number = len(self._exchanges)
                exchange = Exchange(method, path, number)
                fault = self.decide(exchange)
                with self._lock:
                    self._exchanges.append(Exchange(method, path, number, fault))
                if fault is Fault.RESET_BEFORE:
                    _abort(client)
                    return
                if server is None:
                    assert self.upstream is not None, "FaultProxy.upstream is not set"
                    server = socket.create_connection(self.upstream)
                    self._track(server, True)
                    upstream = _Stream(server)
                assert upstream is not None
                server.sendall(head.raw)
                source.copy(head.length, server)
                answer = upstream.head()
                if answer is None:
                    _abort(client)
                    return
                length = 0 if method == "HEAD" else answer.length
                if fault is None:
                    client.sendall(answer.raw)
                    upstream.copy(length, client)
                elif fault is Fault.CUT_ANSWER and length > 1:
                    client.sendall(answer.raw)
                    upstream.copy(length // 2, client)
                    _abort(client)
                    return
                else:
                    upstream.copy(length, None)  # the server's work is done; drop it
                    if fault is Fault.STALL:
                        with contextlib.suppress(OSError):
                            while client.recv(_BLOCK):
                                pass  # until the client gives up and closes
                        return
                    if fault is Fault.CLOSE_BEFORE_ANSWER:
                        client.close()
                        return
                    _abort(client)  # LOST_ANSWER, or a CUT_ANSWER with no body to cut
                    return
                if answer.closes or head.closes:
                    return
        except OSError:
            return
        finally:
            if server is not None:
                self._track(server, False)
                with contextlib.suppress(OSError):
                    server.close()


def main(argv: list[str] | None = None) -> int:
    """Run a proxy in its own process (for benchmarks): prints its URL, then serves.

    On SIGTERM it writes its exchanges, as JSON counts per fault and path kind, to
    ``--stats`` and exits 0.
    """
    import argparse
    import json
    import signal
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="host:port of the server")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stats", required=True)
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    proxy = FaultProxy(random_faults(args.rate, args.seed), (host, int(port))).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print(proxy.base_url, flush=True)
    stopped.wait()
    exchanges = proxy.exchanges
    proxy.stop()
    counts: dict[str, int] = {}
    for exchange in exchanges:
        name = exchange.fault.name if exchange.fault else "none"
        counts[name] = counts.get(name, 0) + 1
    with open(args.stats, "w", encoding="utf-8") as handle:
        json.dump({"exchanges": len(exchanges), "by_fault": counts}, handle)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
