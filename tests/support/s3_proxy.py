"""A forwarding proxy in front of an S3 endpoint that can answer chosen calls itself.

Used to show S3 answers moto never gives, such as CompleteMultipartUpload's ``200 OK``
with an ``<Error>`` document inside: the proxy forwards every request to the upstream
(moto) unless :attr:`S3FaultProxy.fault` returns a canned answer for it. Clients use the
proxy as their endpoint with path-style addressing; moto checks no signatures, so the
changed ``Host`` does not matter.

Stdlib only, loopback only, one upstream connection per request.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["CannedAnswer", "FaultRule", "S3FaultProxy", "complete_multipart_calls"]

#: ``(status, body)`` sent instead of forwarding (as ``application/xml``).
CannedAnswer = tuple[int, bytes]
#: Called with the method, path and query of each request; a canned answer or None.
FaultRule = Callable[[str, str, str], CannedAnswer | None]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}
)


def complete_multipart_calls(answer: CannedAnswer) -> FaultRule:
    """A rule that answers every CompleteMultipartUpload (``POST ?uploadId=``) itself."""

    def rule(method: str, path: str, query: str) -> CannedAnswer | None:
        del path
        if method == "POST" and "uploadId=" in query:
            return answer
        return None

    return rule


class S3FaultProxy:
    """Forward to ``upstream_url``, except what :attr:`fault` answers itself.

    Attributes:
        fault: The rule in force; None forwards everything. May be changed any time.
        faults_served: How many canned answers were sent.
    """

    def __init__(self, upstream_url: str, fault: FaultRule | None = None) -> None:
        upstream = urlsplit(upstream_url)
        assert upstream.hostname is not None and upstream.port is not None
        self.fault = fault
        self.faults_served = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                rule = proxy.fault
                canned = rule(self.command, path, query) if rule is not None else None
                if canned is not None:
                    with proxy._lock:
                        proxy.faults_served += 1
                    status, payload = canned
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                try:
                    headers = {
                        name: value
                        for name, value in self.headers.items()
                        if name.lower() not in _HOP_BY_HOP
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    payload = answer.read()
                    self.send_response(answer.status)
                    for name, value in answer.getheaders():
                        if name.lower() not in _HOP_BY_HOP:
                            self.send_header(name, value)
                    # A HEAD answer has no body but announces the object's length.
                    length = answer.getheader("Content-Length") or "0"
                    is_head = self.command == "HEAD"
                    self.send_header("Content-Length", length if is_head else str(len(payload)))
                    self.end_headers()
                    if not is_head:
                        self.wfile.write(payload)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> S3FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="S3FaultProxy", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
