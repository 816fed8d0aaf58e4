"""Serve any WSGI app on loopback, and middleware that breaks a backend on purpose.

Used to run the conformance checker against backends that break the contract in one
known way: a wrapper around the reference backend's app changes one thing (accepts any
token, rewrites an answer, hides the multipart endpoints) and passes the rest through.

The host is the reference backend's own server (``ctrlupload.server.WSGIServer``), so
the broken backends speak HTTP exactly as the real one does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable
from types import TracebackType
from typing import Any

from ctrlupload.server import WSGIServer

__all__ = [
    "AnswerRewrite",
    "WsgiApp",
    "WsgiHost",
    "accept_any_token",
    "refuse_paths",
    "rewrite_answers",
    "strip_header",
]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
#: Called with the path, status and body of each answer; a new (status, body) or None.
AnswerRewrite = Callable[[str, int, bytes], tuple[int, bytes] | None]


class WsgiHost:
    """``app`` on ``http://127.0.0.1:<free port>`` for the duration of a ``with`` block.

    Attributes:
        base_url: Where it is served, set once started.
    """

    def __init__(self, app: WsgiApp) -> None:
        self._server = WSGIServer(app, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{self._server.port}"

    def __enter__(self) -> WsgiHost:
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop()


def accept_any_token(app: WsgiApp, token: str) -> WsgiApp:
    """``app``, except that every request counts as carrying ``token``."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        return app(environ, start_response)

    return wrapped


def rewrite_answers(app: WsgiApp, rewrite: AnswerRewrite) -> WsgiApp:
    """``app``, with each answer passed through ``rewrite`` (buffered whole)."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> None:
            captured["status"], captured["headers"] = status, headers

        answer = app(environ, capture)
        try:
            body = b"".join(answer)
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()
        status = int(captured["status"].split(" ", 1)[0])
        headers = [(n, v) for n, v in captured["headers"] if n.lower() != "content-length"]
        changed = rewrite(environ.get("PATH_INFO", ""), status, body)
        if changed is not None:
            status, body = changed
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status} Rewritten", headers)
        return [body]

    return wrapped


def strip_header(app: WsgiApp, name: str) -> WsgiApp:
    """``app``, with the answer header ``name`` left out of every answer."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            kept = [(n, v) for n, v in headers if n.lower() != name.lower()]
            return start_response(status, kept, *exc_info)

        return app(environ, start)

    return wrapped


def refuse_paths(
    app: WsgiApp,
    paths: Collection[str],
    status: int = 404,
    code: str = "not_found",
) -> WsgiApp:
    """``app``, except that ``paths`` answer ``status`` with the error body ``code``
    without reaching it: 404 by default, as if they did not exist."""
    body = json.dumps({"error": code, "message": f"refused by the test ({code})"}).encode()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in paths:
            start_response(
                f"{status} Refused",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return app(environ, start_response)

    return wrapped
