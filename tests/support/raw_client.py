"""A misbehaving client on raw sockets: starts a signed PUT, then goes away mid-body.

The provider never abandons a body half-way on purpose, so tests of what a server does
when a client disappears (no partial object, no row, nothing left in staging) drive
the socket themselves. Stdlib only; the benchmark imports this too.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import urllib.request
from typing import Any
from urllib.parse import urlsplit

__all__ = ["hang_up", "presign_put", "start_partial_put"]


def presign_put(
    base_url: str,
    token: str,
    key: str,
    content_type: str,
    content_length: int,
    path: str = "/internal/storage/presign-put",
) -> dict[str, Any]:
    """Ask a backend for a presigned PUT, as the provider would; returns the JSON."""
    request = urllib.request.Request(
        f"{base_url}{path}",
        data=json.dumps(
            {"object_key": key, "content_type": content_type, "content_length": content_length}
        ).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


def start_partial_put(
    upload_url: str, headers: dict[str, str], content_length: int, send_bytes: int
) -> socket.socket:
    """Send a PUT's head (announcing ``content_length``) and only ``send_bytes`` of body.

    Returns:
        The still-open connection; pass it to :func:`hang_up`.
    """
    url = urlsplit(upload_url)
    assert url.hostname is not None
    conn = socket.create_connection((url.hostname, url.port or 80), timeout=10)
    target = f"{url.path}?{url.query}" if url.query else url.path
    lines = [f"PUT {target} HTTP/1.1", f"Host: {url.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {content_length}")
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    block = bytes(min(send_bytes, 1024 * 1024))
    remaining = send_bytes
    while remaining:
        piece = block[:remaining]
        conn.sendall(piece)
        remaining -= len(piece)
    return conn


def hang_up(conn: socket.socket, *, reset: bool) -> None:
    """Close the connection: a FIN when ``reset`` is false, a TCP RST when true."""
    if reset:
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
