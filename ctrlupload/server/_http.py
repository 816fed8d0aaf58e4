"""The HTTP server under the reference backend: cheroot, with the limits a deployment needs.

cheroot (the CherryPy project's server) is pure Python, runs in-process on a thread
pool, streams request bodies to the app (``wsgi.input`` reads the socket; nothing is
buffered whole), and speaks HTTP/1.1 with keep-alive. This module configures it and adds
what an exposed upload server needs on top, through cheroot's own extension points
(its connection class, request class, gateway and connection manager):

* **Idle sockets hold no thread.** A new connection waits in cheroot's selector, like an
  idle keep-alive one, until its first byte arrives; only then does a worker read it.
* **The request head has a deadline** (``header_timeout_s``, from the first byte to the
  last header line), not only a per-read timeout: a client dripping one byte at a time
  is cut off. Bodies keep the per-read ``idle_timeout_s``.
* **Connections are capped** (``max_connections``, and never more than the file
  descriptor limit leaves room for). At the cap, the connection idle the longest is
  closed to admit a new one. If ``accept`` fails for want of descriptors, the same
  happens, and the listening socket rests until one is free instead of spinning.
* **Strict framing:** a Content-Length that is not plain digits, or one sent together
  with Transfer-Encoding, is a 400 and the connection closes.
* **A body cut short** (the client reset or went silent) reads as an early end, so the
  app answers it instead of failing with a socket error; the connection then closes.
* **One access-log line per request** on ``ctrlupload.server.access``: method, path
  without its query (where signatures travel), status, bytes in and out, duration.

``WSGIServer`` runs it in-process, for ``demo``, the tests and ``ctrlupload serve``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import unquote_to_bytes

try:
    from cheroot import connections as cheroot_connections
    from cheroot import makefile as cheroot_makefile
    from cheroot import server as cheroot_server
    from cheroot import wsgi as cheroot_wsgi
    from cheroot.workers import threadpool as cheroot_threadpool
except ImportError as exc:  # pragma: no cover - exercised in a venv without the extra
    raise ImportError(
        "the reference backend runs on cheroot: pip install 'ctrlupload[server]'"
    ) from exc

from .._redact import redact_text
from ._limits import ServerLimits

logger = logging.getLogger("ctrlupload.server")
access_logger = logging.getLogger("ctrlupload.server.access")

# cheroot's stubs leave out the extension points used here (its connection manager's
# loop, the request and connection classes' hooks), so its classes are bases of type Any.
_ConnectionBase: Any = cheroot_server.HTTPConnection
_RequestBase: Any = cheroot_server.HTTPRequest
_GatewayBase: Any = cheroot_wsgi.Gateway_10
_ManagerBase: Any = cheroot_connections.ConnectionManager
_ServerBase: Any = cheroot_wsgi.Server
_ReaderBase: Any = cheroot_makefile.StreamReader
_PoolBase: Any = cheroot_threadpool.ThreadPool
_WorkerThread: Any = cheroot_threadpool.WorkerThread

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: How long the listening socket rests after ``accept`` found no free descriptor.
_ACCEPT_REST_S: Final = 0.1
#: The most of an unread request body drained to keep a connection alive; more closes it.
_MAX_DRAIN_BYTES: Final = 1024 * 1024
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _SocketReader(_ReaderBase):  # type: ignore[misc]
    """cheroot's socket reader, with large reads done by ``recv_into`` into one buffer.

    cheroot reads through ``_pyio`` (the pure-Python io module), whose BufferedReader
    allocates and joins a buffer per socket read: a 1 MiB body block cost about three
    times the CPU of reading it straight in, and the extra garbage raised the server's
    peak memory. ``readinto`` (and a read larger than the buffer) takes what is
    buffered, then fills the rest of the caller's buffer from the socket. Small reads
    (request lines and headers) stay cheroot's.
    """

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size <= self.buffer_size:
            return bytes(super().read(size))
        block = bytearray(size)
        return bytes(memoryview(block)[: self.readinto(block)])

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` (to its end, or the end of the stream): buffered bytes first."""
        view = memoryview(buffer).cast("B")
        with self._read_lock:
            buffered = self._read_buf[self._read_pos : self._read_pos + len(view)]
            self._read_pos += len(buffered)
            got = len(buffered)
            view[:got] = buffered
            while got < len(view):
                received = self.raw.readinto(view[got:])
                if not received:
                    break
                got += received
        self.bytes_read += got
        return got


def _make_file(sock: socket.socket, mode: str = "r", bufsize: int = io.DEFAULT_BUFFER_SIZE) -> Any:
    """cheroot's ``MakeFile``, with :class:`_SocketReader` for reading."""
    if "r" in mode:
        return _SocketReader(sock, mode, bufsize)
    return cheroot_makefile.MakeFile(sock, mode, bufsize)


class _Connection(_ConnectionBase):  # type: ignore[misc]
    """A client connection that waits for its first byte in the selector."""

    def __init__(self, server: _Server, sock: socket.socket, makefile: Any = None) -> None:
        if makefile is None or makefile is cheroot_makefile.MakeFile:
            makefile = _make_file
        super().__init__(server, sock, makefile)
        self.waited = False
        server.track(self)

    def communicate(self) -> bool:
        server: _Server = self.server
        server.head_started(self)
        try:
            return bool(super().communicate())
        finally:
            server.head_ended(self)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.server.untrack(self)


class _Request(_RequestBase):  # type: ignore[misc]
    """cheroot's request, with strict Content-Length framing."""

    def read_request_headers(self) -> bool:
        if not super().read_request_headers():
            return False
        length = self.inheaders.get(b"Content-Length")
        if length is None:
            return True
        if not (length.isascii() and length.isdigit()):
            self.close_connection = True
            self.simple_response("400 Bad Request", "Malformed Content-Length header.")
            return False
        if self.inheaders.get(b"Transfer-Encoding"):
            self.close_connection = True
            self.simple_response(
                "400 Bad Request", "Content-Length and Transfer-Encoding together."
            )
            return False
        return True

    def send_headers(self) -> None:
        # cheroot reads what is left of an unread body in one call before answering on
        # a kept-alive connection: fine for a little, not for a refused 5 GB PUT.
        remaining = getattr(self.rfile, "remaining", 0) or 0
        if remaining > _MAX_DRAIN_BYTES:
            self.close_connection = True
        super().send_headers()


class _ClientBody:
    """``wsgi.input`` that reads a reset or silent client as the body's early end."""

    def __init__(self, stream: Any, on_break: Callable[[], None]) -> None:
        self._stream = stream
        self._on_break = on_break
        self.bytes_read = 0
        self.broken = False

    def _break(self, exc: BaseException) -> bytes:
        logger.debug("client body ended early: %r", exc)
        self.broken = True
        self._on_break()  # nothing more can be read on this connection: close it
        return b""

    def read(self, size: int | None = -1) -> bytes:
        if self.broken:
            return b""
        try:
            block: bytes = self._stream.read(size)
        except OSError as exc:  # reset, timed out
            return self._break(exc)
        self.bytes_read += len(block)
        return block

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` straight from the socket, within the body's length."""
        if self.broken:
            return 0
        stream = self._stream
        if not isinstance(stream, cheroot_server.KnownLengthRFile):
            block = self.read(len(buffer))  # chunked: cheroot's own reader
            memoryview(buffer)[: len(block)] = block
            return len(block)
        want = min(len(buffer), stream.remaining)
        if want <= 0:
            return 0
        try:
            got = int(stream.rfile.readinto(memoryview(buffer)[:want]))
        except OSError as exc:
            self._break(exc)
            return 0
        stream.remaining -= got
        self.bytes_read += got
        return got

    def readline(self, size: int | None = -1) -> bytes:
        if self.broken:
            return b""
        try:
            line: bytes = self._stream.readline(size)
        except OSError as exc:
            return self._break(exc)
        self.bytes_read += len(line)
        return line

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class _Gateway(_GatewayBase):  # type: ignore[misc]
    """The WSGI 1.0 gateway, with the client body guarded and each request logged."""

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        # cheroot leaves %2F encoded in PATH_INFO; PEP 3333 (and the contract, and the
        # server this one replaced) decode every escape: a key's "/" may come as %2F.
        target = self.req.uri.partition(b"?")[0]
        if target.startswith(b"/"):
            env["PATH_INFO"] = unquote_to_bytes(target).decode("latin-1")
        return env

    def respond(self) -> None:
        server: _Server = self.req.server
        server.head_ended(self.req.conn)
        started = time.monotonic()
        body = _ClientBody(
            self.env["wsgi.input"], lambda: setattr(self.req, "close_connection", True)
        )
        self.env["wsgi.input"] = body
        sent = 0
        write = self.req.write

        def counted(data: bytes) -> None:
            nonlocal sent
            write(data)
            sent += len(data)

        self.req.write = counted
        try:
            super().respond()
        finally:
            self.req.write = write
            _log_access(self.req, body.bytes_read, sent, time.monotonic() - started)


def _log_access(req: Any, received: int, sent: int, took_s: float) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    method = req.method.decode("latin-1", "backslashreplace")
    path = req.uri.partition(b"?")[0].decode("latin-1", "backslashreplace")
    status = req.status[:3].decode("latin-1") if req.status else "-"
    access_logger.info(
        "%s %s %s %s in=%d out=%d %.1fms",
        req.conn.remote_addr or "-",
        method if method.isprintable() else repr(method),
        path if path.isprintable() else repr(path),
        status,
        received,
        sent,
        took_s * 1000,
    )


class _ConnectionManager(_ManagerBase):  # type: ignore[misc]
    """cheroot's selector loop, with the connection cap and head deadlines."""

    server: _Server

    def __init__(self, server: _Server) -> None:
        super().__init__(server)
        self._resting_until: float | None = None

    def _from_server_socket(self, server_socket: socket.socket) -> Any:
        try:
            conn = super()._from_server_socket(server_socket)
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            if not self.evict_idlest():
                self._rest()
            return None
        over_cap = conn is not None and self.server.open_connections() > self.server.connection_cap
        if over_cap and not self.evict_idlest():
            logger.warning("connection cap reached with no idle one to close: refusing")
            conn.close()
            return None
        return conn

    def evict_idlest(self) -> bool:
        """Close the connection that has waited longest in the selector; False if none."""
        idle = [
            (conn.last_used, fd, conn)
            for fd, conn in self._selector.connections
            if conn is not self.server
        ]
        if not idle:
            return False
        _, fd, conn = min(idle, key=lambda item: item[0])
        self._selector.unregister(fd)
        conn.close()
        return True

    def _rest(self) -> None:
        """Stop watching the listening socket for a moment: no descriptor is free."""
        if self._resting_until is None:
            logger.warning("out of file descriptors: not accepting for %.1f s", _ACCEPT_REST_S)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.server.socket.fileno())
            self._resting_until = time.monotonic() + _ACCEPT_REST_S

    def stop(self) -> None:
        """Stop the selector loop now, not at its next timeout: wake it with a connection."""
        self._stop_requested = True
        host, port = self.server.socket.getsockname()[:2]
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind: knock on loopback
            host = "::1" if ":" in host else "127.0.0.1"
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=1).close()
        super().stop()

    def _expire(self, threshold: float) -> None:
        super()._expire(threshold)
        self.server.cut_late_heads()
        if self._resting_until is not None and time.monotonic() >= self._resting_until:
            self._resting_until = None
            self._selector.register(self.server.socket.fileno(), _EVENT_READ, data=self.server)


_EVENT_READ: Final = 1  # selectors.EVENT_READ


class _DaemonPool(_PoolBase):  # type: ignore[misc]
    """cheroot's thread pool with daemon workers, like the server thread itself.

    A program that forgets :meth:`WSGIServer.stop` (a script, a notebook cell, a test
    module) can still exit; ``serve`` always stops, so its requests in flight drain.
    """

    def _spawn_worker(self) -> Any:
        worker = _WorkerThread(self.server)
        worker.name = f"ctrlupload-worker {worker.name}"
        worker.daemon = True
        worker.start()
        return worker


class _Server(_ServerBase):  # type: ignore[misc]
    """cheroot's WSGI server, with :class:`ServerLimits` applied."""

    ConnectionClass = _Connection

    def __init__(self, address: tuple[str, int], limits: ServerLimits) -> None:
        super().__init__(
            address,
            None,
            numthreads=limits.threads,
            max=limits.threads,
            request_queue_size=limits.backlog,
            timeout=limits.idle_timeout_s,
            shutdown_timeout=limits.shutdown_timeout_s,
            server_name="ctrlupload-reference",
        )
        self.requests = _DaemonPool(self, min=limits.threads, max=limits.threads)
        self.gateway = _Gateway
        self.limits = limits
        self.connection_cap = limits.connection_cap()
        # The manager closes idle connections beyond the cap itself (the idlest first),
        # so cheroot's own keep-alive limit must not close busy ones after each request.
        self.keep_alive_conn_limit = None
        self.max_request_header_size = limits.max_header_bytes
        # Check deadlines often enough that a late head is cut within a second.
        self.expiration_interval = min(0.5, limits.header_timeout_s / 4)
        self._live: set[_Connection] = set()
        self._heads: dict[_Connection, float] = {}
        self._track_lock = threading.Lock()
        self._connections: Any = None

    def prepare(self) -> None:
        super().prepare()
        # cheroot builds its manager in prepare(); ours replaces it before serving.
        self._connections._selector.close()
        self._connections = _ConnectionManager(self)

    def process_conn(self, conn: _Connection) -> None:
        if not conn.waited:
            conn.waited = True
            if not conn.rfile.has_data() and not _readable(conn.socket):
                self._connections.put(conn)  # wait in the selector, not in a thread
                return
        super().process_conn(conn)

    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            level, traceback = logging.DEBUG, False
        logger.log(level, "%s", redact_text(str(msg)), exc_info=traceback)

    # -- bookkeeping (any thread) ------------------------------------------------------

    def track(self, conn: _Connection) -> None:
        with self._track_lock:
            self._live.add(conn)

    def untrack(self, conn: _Connection) -> None:
        with self._track_lock:
            self._live.discard(conn)
            self._heads.pop(conn, None)

    def open_connections(self) -> int:
        with self._track_lock:
            return len(self._live)

    def head_started(self, conn: _Connection) -> None:
        with self._track_lock:
            self._heads[conn] = time.monotonic() + self.limits.header_timeout_s

    def head_ended(self, conn: _Connection) -> None:
        with self._track_lock:
            self._heads.pop(conn, None)

    def cut_late_heads(self) -> None:
        """End the reading of request heads that outlived ``header_timeout_s``."""
        now = time.monotonic()
        with self._track_lock:
            late = [conn for conn, deadline in self._heads.items() if deadline <= now]
            for conn in late:
                del self._heads[conn]
        for conn in late:
            logger.info("request head from %s took too long: closing", conn.remote_addr)
            with contextlib.suppress(OSError):
                # The reader sees the end of the stream and answers 400; then it closes.
                conn.socket.shutdown(socket.SHUT_RD)


_Connection.RequestHandlerClass = _Request


def _readable(sock: socket.socket) -> bool:
    poll = getattr(select, "poll", None)
    if poll is None:  # pragma: no cover - Windows: let a worker wait for it
        return True
    poller = poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class WSGIServer:
    """Runs a WSGI app on cheroot, in-process, on a pool of worker threads.

    Args:
        app: The WSGI application (or None, and :meth:`set_app` once the port is known).
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
        limits: The server's limits; :class:`ServerLimits` defaults when None.
    """

    def __init__(
        self,
        app: WSGIApp | None,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServerLimits | None = None,
    ) -> None:
        self.limits = limits or ServerLimits()
        self._server = _Server((host, port), self.limits)
        self._server.wsgi_app = app
        self._server.prepare()  # binds now, so the port is known before serving
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._closed = False
        self._stop_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.bind_addr[1])

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._server.bind_addr[0])

    @property
    def connection_cap(self) -> int:
        """The most connections held open at once (``max_connections``, fitted to fds)."""
        return int(self._server.connection_cap)

    def set_app(self, app: WSGIApp) -> None:
        """Set the app after binding (when the app needs to know the port)."""
        self._server.wsgi_app = app

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`stop` is called from another one."""
        if self._closed:
            return
        self._serving.set()
        self._server.serve()

    def start(self) -> WSGIServer:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="ctrlupload-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (``shutdown_timeout_s``), close.

        Idempotent. A second caller (the serving thread, once a signal handler's thread
        has begun stopping) waits until the first one has finished, so the process does
        not exit while requests are still cleaning up their staging files.
        """
        with self._stop_lock:
            if self._closed:
                return
            self._closed = True
            self._server.stop()
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None

    def __enter__(self) -> WSGIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = ["WSGIServer"]
