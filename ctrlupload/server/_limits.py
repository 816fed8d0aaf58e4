"""The HTTP server's limits: a plain value, importable without the server's dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Descriptors kept free for what is not a connection: the listening socket, the
#: selector, SQLite, and one staging file per worker thread come on top of this.
_FD_RESERVE: Final = 32


@dataclass(frozen=True)
class ServerLimits:
    """What the HTTP server bounds, and how.

    Attributes:
        threads: Worker threads: requests served at once. More connections than this
            may be open (idle, or waiting for a thread); each upload in progress holds
            one thread.
        max_connections: Open client connections at most. At the cap, the connection
            idle the longest is closed to admit a new one. Lowered automatically to what
            the process's file descriptor limit (``ulimit -n``) leaves room for.
        backlog: Connections the kernel queues before ``accept`` (``listen()``).
        header_timeout_s: Seconds from a request's first byte to the end of its headers.
        idle_timeout_s: Seconds a connection may stay silent: idle between requests,
            or stalled in the middle of a body.
        max_header_bytes: Largest request line plus headers; larger gets 413 or 414.
        shutdown_timeout_s: How long stopping waits for requests in flight before it
            cuts their connections.
    """

    threads: int = 32
    max_connections: int = 1024
    backlog: int = 1024
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_header_bytes: int = 64 * 1024
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("threads", "max_connections", "backlog", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("header_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must not be negative")

    def connection_cap(self) -> int:
        """``max_connections``, lowered to fit the file descriptor limit."""
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            return self.max_connections
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        room = soft - _FD_RESERVE - 2 * self.threads
        return max(1, min(self.max_connections, room))
