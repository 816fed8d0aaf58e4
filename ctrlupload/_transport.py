"""HTTP transport: the only module that imports requests.

One :class:`Transport` owns one ``requests.Session`` whose adapters are mounted once,
at construction, and never changed. What is shared between threads:

* the urllib3 connection pools inside the mounted adapters (thread-safe; their size is
  ``STORAGE_MAX_CONNECTIONS`` per host, so a pool of that many threads never opens and
  throws away surplus connections);
* the immutable retry policy and timeouts.

The session's one mutable part, its cookie jar, is locked by ``http.cookiejar`` and set
to refuse every cookie: the client keeps no state between requests. Proxy settings from
the environment (``HTTPS_PROXY``, ``NO_PROXY``...) are resolved once per origin and
cached under a lock, rather than by requests on every call, which also means
``~/.netrc`` is never consulted. Everything else (request bodies, responses) belongs to
the calling thread.

Retries belong to urllib3 alone (connect and read errors, 429 and 5xx, Retry-After
honoured); nothing above this module retries a transport fault.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Final
from urllib.parse import urlsplit

import requests
import requests.adapters
import requests.auth
import requests.utils
import urllib3.exceptions
from urllib3.util.retry import Retry

from ._errors import TransportFailure
from ._redact import install_log_redaction, redact_text, redact_url

__all__ = ["HttpResult", "RetryPolicy", "Transport", "TransportConfig"]

logger = logging.getLogger("ctrlupload")

#: Statuses retried with backoff (Retry-After honoured on 429 and 503).
RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
#: Methods urllib3 may repeat: presign is safe, complete and delete are idempotent
#: upserts, and a presigned PUT rewrites the same object.
RETRY_METHODS: Final = frozenset({"POST", "PUT", "GET", "HEAD"})
#: Largest response body read into memory; larger ones are cut (error bodies are tiny).
MAX_RESPONSE_BYTES: Final = 1024 * 1024

install_log_redaction()


@dataclass(frozen=True)
class RetryPolicy:
    """How urllib3 retries one request.

    Attributes:
        attempts: Attempts per request, the first included (1 disables retries).
        backoff_s: Backoff factor: waits are ``backoff_s * 2**(retry - 1)`` seconds.
        backoff_max_s: Longest wait between attempts; also caps ``Retry-After``.
    """

    attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0

    def to_urllib3(self) -> Retry:
        """Build the urllib3 ``Retry`` mounted on the adapters."""
        retries = self.attempts - 1
        return _LenientRetry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            redirect=0,
            allowed_methods=RETRY_METHODS,
            status_forcelist=RETRY_STATUSES,
            backoff_factor=self.backoff_s,
            backoff_max=self.backoff_max_s,
            # urllib3 annotates this as int but compares it as a number of seconds.
            retry_after_max=self.backoff_max_s,  # type: ignore[arg-type]
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )


class _LenientRetry(Retry):
    """urllib3's ``Retry``, except that a Retry-After it cannot parse means "use the
    backoff" rather than failing the request (urllib3 raises InvalidHeader)."""

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            return super().parse_retry_after(retry_after)
        except urllib3.exceptions.InvalidHeader:
            logger.debug("ignoring unparsable Retry-After %r", retry_after[:64])
            return 0.0  # falsy: sleep_for_retry falls back to the exponential backoff


@dataclass(frozen=True)
class TransportConfig:
    """Timeouts, retries and pooling of a :class:`Transport`."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    send_block_bytes: int = 1024 * 1024
    max_connections: int = 32


@dataclass(frozen=True)
class HttpResult:
    """What came back: status, headers (lower-case names) and the body, capped."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status_code < 300


class _BlockSizeAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose connections send bodies in ``block_bytes`` blocks.

    urllib3 reads a file body 16 KiB at a time by default; larger blocks mean fewer
    syscalls and trips through the interpreter, and more than double loopback
    throughput.
    """

    def __init__(self, *, block_bytes: int, **kwargs: Any) -> None:
        self._block_bytes = block_bytes
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **pool_kwargs: Any) -> None:
        pool_kwargs["blocksize"] = self._block_bytes
        super().init_poolmanager(*args, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["blocksize"] = self._block_bytes
        return super().proxy_manager_for(proxy, **proxy_kwargs)


class _BearerAuth(requests.auth.AuthBase):
    """Adds the service token; its repr never shows it."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "<BearerAuth [redacted]>"


class Transport:
    """Sends requests through one pooled, retrying session.

    Args:
        config: Timeouts, retry policy, block size and pool size.
        user_agent: The User-Agent header.
    """

    def __init__(self, config: TransportConfig, *, user_agent: str) -> None:
        self.config = config
        self._timeout = (config.connect_timeout_s, config.read_timeout_s)
        session = requests.Session()
        # requests would re-read proxy variables, .netrc and CA bundle variables on every
        # request (about a seventh of the client's CPU per small upload); they are
        # resolved once instead, see _proxies_for.
        session.trust_env = False
        session.verify = _environ_ca_bundle() or True
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        session.headers["User-Agent"] = user_agent
        adapter = _BlockSizeAdapter(
            block_bytes=config.send_block_bytes,
            pool_connections=16,
            pool_maxsize=config.max_connections,
            max_retries=config.retry.to_urllib3(),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        self._proxies: dict[tuple[str, str], dict[str, str]] = {}
        self._proxies_lock = threading.Lock()

    def _proxies_for(self, url: str) -> dict[str, str]:
        parts = urlsplit(url)
        origin = (parts.scheme, parts.netloc)
        with self._proxies_lock:
            cached = self._proxies.get(origin)
        if cached is None:
            cached = requests.utils.get_environ_proxies(url)
            with self._proxies_lock:
                self._proxies[origin] = cached
        return cached

    def post_json(self, url: str, payload: Mapping[str, Any], *, token: str) -> HttpResult:
        """POST a JSON body with a bearer token.

        Raises:
            TransportFailure: The request could not be completed (already retried).
        """
        return self._send(
            "POST",
            url,
            json=dict(payload),
            auth=_BearerAuth(token),
            headers={"Accept": "application/json"},
        )

    def put(self, url: str, body: object, headers: Mapping[str, str]) -> HttpResult:
        """PUT ``body`` (bytes or an object with read/tell/seek/__len__) to ``url``.

        Raises:
            TransportFailure: The request could not be completed (already retried).
        """
        return self._send("PUT", url, data=body, headers=dict(headers))

    def _send(self, method: str, url: str, **kwargs: Any) -> HttpResult:
        logger.debug("%s %s", method, redact_url(url))
        failure: TransportFailure | None = None
        try:
            kwargs.setdefault("proxies", self._proxies_for(url))
            response = self._session.request(
                method,
                url,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
                **kwargs,
            )
            try:
                body = _read_capped(response)
                headers = {name.lower(): value for name, value in response.headers.items()}
                return HttpResult(response.status_code, headers, body)
            finally:
                response.close()
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        ) as exc:
            failure = TransportFailure(_describe(exc), _qualified_name(exc))
        # Raised outside the except block so the original exception, whose text holds
        # the URL with its signature, is not kept as __context__ either.
        assert failure is not None
        raise failure

    def close(self) -> None:
        """Close every pooled connection."""
        self._session.close()


def _environ_ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment, read once."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def _read_capped(response: requests.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)[:MAX_RESPONSE_BYTES]


def _qualified_name(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost reason: requests wraps urllib3's MaxRetryError, which holds it."""
    seen: set[int] = set()
    current: BaseException = exc
    while id(current) not in seen:
        seen.add(id(current))
        inner: BaseException | None = None
        if isinstance(current, urllib3.exceptions.MaxRetryError) and current.reason:
            inner = current.reason
        elif current.args and isinstance(current.args[0], BaseException):
            inner = current.args[0]
        elif isinstance(current, urllib3.exceptions.ProtocolError) and len(current.args) > 1:
            last = current.args[-1]
            inner = last if isinstance(last, BaseException) else None
        if inner is None:
            break
        current = inner
    return current


def _describe(exc: BaseException) -> str:
    root = _root_cause(exc)
    # requests reports a read timeout that exhausted the retries as a ConnectionError;
    # the root cause tells the truth.
    timed_out = isinstance(root, (TimeoutError, urllib3.exceptions.TimeoutError))
    # NewConnectionError descends from ConnectTimeoutError, yet means "refused".
    if isinstance(root, urllib3.exceptions.NewConnectionError):
        timed_out = False
    if isinstance(exc, requests.Timeout) or timed_out:
        kind = "timed out"
    elif isinstance(exc, requests.ConnectionError):
        kind = "connection failed"
    else:
        kind = "transport error"
    detail = redact_text(str(root)) or type(root).__name__
    return f"{kind}: {type(root).__name__}: {detail}"
