"""HTTP transport: the only module that imports requests.

One :class:`Transport` owns one ``requests.Session`` whose adapters are mounted once,
at construction, and never changed. What is shared between threads:

* the urllib3 connection pools inside the mounted adapters (thread-safe; their size is
  ``STORAGE_MAX_CONNECTIONS`` per host, so a pool of that many threads never opens and
  throws away surplus connections);
* the immutable retry policy and timeouts;
* one watchdog thread that ends any attempt that outlives its bound.

The session's one mutable part, its cookie jar, is locked by ``http.cookiejar`` and set
to refuse every cookie: the client keeps no state between requests. Proxy settings from
the environment (``HTTPS_PROXY``, ``NO_PROXY``...) are resolved once per origin and
cached under a lock, rather than by requests on every call, which also means
``~/.netrc`` is never consulted. Everything else (request bodies, responses) belongs to
the calling thread.

**One retry owner.** urllib3's ``Retry`` retries every transport fault: connect and
read errors, 429 and 5xx (``Retry-After`` honoured). Reading the answer's body is part
of the attempt: the connection reads the (small, capped) body before it hands the
response to urllib3, so a reset, an ``IncompleteRead`` or a timeout in the middle of a
body is a read error that the same ``Retry`` retries, from the same attempt budget, as
a failure before the headers. Nothing above this module retries a transport fault.

**Every attempt has a bound**: ``connect_timeout_s + read_timeout_s + body_bytes /
min_send_rate_bytes_s`` seconds from the moment the attempt starts. Timeouts alone
cannot bound a server that trickles a byte at a time, so past the bound the watchdog
shuts the attempt's socket down; the attempt fails as a read error, and is retried.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import heapq
import http.client
import io
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Final
from urllib.parse import urlsplit

import requests
import requests.adapters
import requests.auth
import requests.utils
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.response
from urllib3.util.retry import Retry

from ._errors import TransportFailure
from ._redact import install_log_redaction, redact_text, redact_url

__all__ = ["HttpResult", "RequestCancelled", "RetryPolicy", "Transport", "TransportConfig"]

logger = logging.getLogger("ctrlupload")
#: One INFO line per retry: ``retrying in 0.5 s (attempt 2/5): connection refused``.
retry_logger = logging.getLogger("ctrlupload.retry")

#: Statuses retried with backoff (Retry-After honoured on 429 and 503).
RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
#: Methods urllib3 may repeat. Every call of the contract is safe to repeat: presign,
#: presign-parts and list-parts change nothing; complete, delete, multipart complete and
#: abort are idempotent; initiate carries an ``Idempotency-Key``; a presigned PUT
#: rewrites the same object or part.
RETRY_METHODS: Final = frozenset({"POST", "PUT", "GET", "HEAD"})
#: Largest response body kept; the rest is not read and the connection is dropped.
MAX_RESPONSE_BYTES: Final = 1024 * 1024
#: Default least rate a body is sent at before its attempt counts as stalled: 64 KiB/s.
DEFAULT_MIN_SEND_RATE_BYTES_S: Final = 64 * 1024
_READ_BLOCK_BYTES: Final = 64 * 1024

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
            other=0,  # e.g. a failed TLS handshake: repeating it will not help
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


class RequestCancelled(Exception):
    """The call's ``cancel`` event was set before an attempt or during a retry wait."""


class _LenientRetry(Retry):
    """urllib3's ``Retry``, except that

    * a Retry-After it cannot parse means "use the backoff" rather than failing the
      request (urllib3 raises InvalidHeader);
    * each wait is logged on ``ctrlupload.retry`` before it starts, with the reason;
    * the wait ends early, with :class:`RequestCancelled`, when the call is cancelled.
    """

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            return super().parse_retry_after(retry_after)
        except urllib3.exceptions.InvalidHeader:
            logger.debug("ignoring unparsable Retry-After %r", retry_after[:64])
            return 0.0  # falsy: sleep falls back to the exponential backoff

    def get_backoff_time(self) -> float:
        """``backoff_s * 2**(retry - 1)``, capped: 0.5, 1, 2, 4 s for the default 0.5.

        urllib3's own formula skips the wait before the first retry, which repeats a
        refused or reset request at once, into the same fault.
        """
        errors = len(
            list(itertools.takewhile(lambda h: h.redirect_location is None, reversed(self.history)))
        )
        if errors < 1:
            return 0.0
        return float(min(self.backoff_max, self.backoff_factor * 2 ** (errors - 1)))

    def sleep(self, response: urllib3.response.BaseHTTPResponse | None = None) -> None:
        wait: float | None = None
        if self.respect_retry_after_header and response:
            wait = self.get_retry_after(response)
        if not wait:
            wait = self.get_backoff_time()
        call = _CURRENT_CALL.get()
        if call is not None:
            last = self.history[-1] if self.history else None
            retry_logger.info(
                "%s %s: retrying in %.1f s (attempt %d/%d): %s",
                call.method,
                call.where,
                wait,
                call.attempts + 1,
                call.config.retry.attempts,
                _retry_reason(last),
            )
        cancel = None if call is None else call.cancel
        if cancel is None:
            if wait > 0:
                time.sleep(wait)
        elif cancel.wait(wait):
            raise RequestCancelled()


def _retry_reason(last: Any) -> str:
    """Why an attempt is being repeated, in a few plain words."""
    if last is None:
        return "unknown failure"
    if last.status is not None and last.error is None:
        return f"HTTP {last.status}"
    error = last.error
    root = _root_cause(error) if isinstance(error, BaseException) else error
    text = str(root).lower()
    if isinstance(root, urllib3.exceptions.NewConnectionError):
        return "connection refused" if "refused" in text else "could not connect"
    if isinstance(root, urllib3.exceptions.ConnectTimeoutError):
        return "connect timed out"
    if isinstance(root, (TimeoutError, urllib3.exceptions.TimeoutError)):
        return "timed out"
    if isinstance(root, ConnectionResetError) or "reset" in text:
        return "connection reset"
    if isinstance(root, (BrokenPipeError, http.client.RemoteDisconnected)) or (
        "closed" in text or "aborted" in text
    ):
        return "connection closed"
    return type(root).__name__


@dataclass(frozen=True)
class TransportConfig:
    """Timeouts, retries and pooling of a :class:`Transport`.

    Attributes:
        connect_timeout_s: Seconds to open a connection.
        read_timeout_s: Seconds any one socket read or write may wait.
        min_send_rate_bytes_s: A body slower than this on average makes its attempt
            overrun its bound (see :meth:`attempt_bound_s`).
        retry: The retry policy.
        send_block_bytes: Bytes handed to the socket at a time.
        max_connections: Kept-alive connections per host.
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    min_send_rate_bytes_s: float = DEFAULT_MIN_SEND_RATE_BYTES_S
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    send_block_bytes: int = 1024 * 1024
    max_connections: int = 32

    def attempt_bound_s(self, body_bytes: int) -> float:
        """Longest one attempt may take: connect, send ``body_bytes``, read the answer."""
        return (
            self.connect_timeout_s + self.read_timeout_s + body_bytes / self.min_send_rate_bytes_s
        )


@dataclass(frozen=True)
class HttpResult:
    """What came back: status, headers (lower-case names), the body (capped) and how
    many attempts it took."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status_code < 300


# -- attempts and their bounds ---------------------------------------------------------


@dataclass
class _Call:
    """One Transport call on one thread: its attempts, and whether the last overran."""

    config: TransportConfig
    watchdog: _Watchdog
    method: str = ""
    where: str = ""
    cancel: threading.Event | None = None
    attempts: int = 0
    overran: bool = False
    bound_s: float = 0.0


_CURRENT_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "ctrlupload_call", default=None
)


class _Alarm:
    __slots__ = ("call", "cancelled", "connection", "deadline", "fired")

    def __init__(self, connection: Any, deadline: float, call: _Call) -> None:
        self.connection = connection
        self.deadline = deadline
        self.call = call
        self.cancelled = False
        self.fired = False


class _Watchdog:
    """Shuts down the socket of an attempt that outlives its deadline.

    One daemon thread per transport, started on first use; alarms sit in a heap.
    Shutting a socket down (not closing it: the owning thread still holds it) makes a
    blocked send or receive in the owning thread fail at once.
    """

    #: How soon to look again at an attempt that has no socket yet (still connecting).
    _RECHECK_S: Final = 0.05

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, connection: Any, bound_s: float, call: _Call) -> _Alarm:
        alarm = _Alarm(connection, time.monotonic() + bound_s, call)
        with self._cond:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._run, name="ctrlupload-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            self._cond.notify()
        return alarm

    def disarm(self, alarm: _Alarm) -> bool:
        """Cancel the alarm; True if it had already fired."""
        with self._cond:
            alarm.cancelled = True
            return alarm.fired

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait_s = self._heap[0][0] - time.monotonic()
                if wait_s > 0:
                    self._cond.wait(wait_s)
                    continue
                _, _, alarm = heapq.heappop(self._heap)
                sock = getattr(alarm.connection, "sock", None)
                if sock is None:
                    # Still connecting (bounded by the connect timeout): look again soon.
                    alarm.deadline = time.monotonic() + self._RECHECK_S
                    heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
                    continue
                alarm.fired = True
                alarm.call.overran = True
                _shut_down(sock)


def _shut_down(sock: Any) -> None:
    """Make a blocked send or receive on ``sock`` fail at once, from another thread.

    The plain socket's shutdown, also for TLS: ``SSLSocket.shutdown`` would drop its SSL
    object under the thread that is using it. TLS inside a TLS proxy tunnel
    (urllib3's SSLTransport) wraps the socket: shut that one down.
    """
    raw = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)
    if isinstance(raw, socket.socket):
        with contextlib.suppress(OSError):  # its owner closed it meanwhile
            socket.socket.shutdown(raw, socket.SHUT_RDWR)


def _body_length(body: Any) -> int:
    if body is None:
        return 0
    try:
        return len(body)
    except TypeError:
        return 0


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """An urllib3 connection whose attempts are bounded and whose answers arrive whole.

    ``request`` counts the attempt and arms the watchdog. ``getresponse`` reads the
    answer's body (at most ``MAX_RESPONSE_BYTES``) before returning, so that a failure
    mid-body happens inside urllib3's retry loop; the response it returns serves the
    bytes already read.
    """

    _ctrlupload_alarm: _Alarm | None = None

    def request(self, method: str, url: str, body: Any = None, *args: Any, **kwargs: Any) -> None:
        call = _CURRENT_CALL.get()
        if call is not None:
            if call.cancel is not None and call.cancel.is_set():
                raise RequestCancelled()
            call.attempts += 1
            call.overran = False
            call.bound_s = call.config.attempt_bound_s(_body_length(body))
            self._ctrlupload_alarm = call.watchdog.arm(self, call.bound_s, call)
        try:
            send_over = getattr(body, "send_over", None)
            if send_over is None or kwargs.get("chunked"):
                super().request(method, url, body, *args, **kwargs)
            else:
                # The body sends itself (from a map of the file, read-ahead buffers or
                # hashed blocks) once the head is out; requests set its Content-Length.
                super().request(method, url, None, *args, **kwargs)
                send_over(self.sock, self.blocksize)
        except OSError as exc:
            # urllib3 swallows these and reads the answer the server may have sent
            # early (an S3 refusal before the whole body): the attempt, and its alarm,
            # go on into getresponse(). Anything else ends the attempt here.
            if not _read_follows(exc):
                self._disarm()
            raise
        except BaseException:
            self._disarm()
            raise

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        try:
            response = super().getresponse()
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_RESPONSE_BYTES:
                chunk = response.read(_READ_BLOCK_BYTES, decode_content=False)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            whole = size <= MAX_RESPONSE_BYTES
            body = b"".join(chunks)[:MAX_RESPONSE_BYTES]
        finally:
            overran = self._disarm()
        if overran:
            # The socket was shut down under this attempt: whatever was parsed from it
            # (a header cut short reads as the end of the headers) is not an answer.
            self.close()
            raise urllib3.exceptions.ReadTimeoutError(
                None,  # type: ignore[arg-type]
                response.url or "",
                "the attempt did not finish within its bound",
            )
        if not whole:
            # The rest is unread: this connection cannot carry another request.
            self.close()
        return urllib3.response.HTTPResponse(
            body=io.BytesIO(body),
            headers=response.headers,
            status=response.status,
            version=response.version,
            version_string=response.version_string,
            reason=response.reason,
            preload_content=False,
            decode_content=False,
            enforce_content_length=False,
            # Once read whole, the http.client response is closed, which tells urllib3
            # that this connection can go back to its pool.
            original_response=response._original_response,
            request_url=response.url,
        )

    def _disarm(self) -> bool:
        """Disarm this attempt's alarm; True if it had fired."""
        alarm, self._ctrlupload_alarm = self._ctrlupload_alarm, None
        return alarm is not None and alarm.call.watchdog.disarm(alarm)


def _read_follows(exc: OSError) -> bool:
    """Whether urllib3 reads the response after this failure to send (its own rule)."""
    return isinstance(exc, BrokenPipeError) or exc.errno in (errno.EPROTOTYPE, errno.ECONNRESET)


class _HTTPSConnection(_HTTPConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES: Final = {"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool}


class _Adapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose pools use bounded connections with ``block_bytes`` sends.

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
        self.poolmanager.pool_classes_by_scheme = dict(_POOL_CLASSES)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["blocksize"] = self._block_bytes
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(_POOL_CLASSES)
        return manager


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
        config: Timeouts, retry policy, attempt bounds, block size and pool size.
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
        # Answers are small and read whole; a compressed one could expand without bound.
        session.headers["Accept-Encoding"] = "identity"
        adapter = _Adapter(
            block_bytes=config.send_block_bytes,
            pool_connections=16,
            pool_maxsize=config.max_connections,
            max_retries=config.retry.to_urllib3(),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        self._watchdog = _Watchdog()
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

    def post_json(
        self,
        url: str,
        payload: Mapping[str, Any],
        *,
        token: str,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResult:
        """POST a JSON body with a bearer token.

        Raises:
            TransportFailure: The request could not be completed (already retried).
        """
        return self._send(
            "POST",
            url,
            json=dict(payload),
            auth=_BearerAuth(token),
            headers={"Accept": "application/json", **(headers or {})},
        )

    def put(
        self,
        url: str,
        body: object,
        headers: Mapping[str, str],
        *,
        cancel: threading.Event | None = None,
    ) -> HttpResult:
        """PUT ``body`` (bytes or an object with read/tell/seek/__len__) to ``url``.

        Args:
            url: Where to PUT.
            body: The body.
            headers: Headers to send as given.
            cancel: When set, no further attempt starts and a retry wait ends at once.
                (A body that checks the same event stops within one block.)

        Raises:
            TransportFailure: The request could not be completed (already retried).
            RequestCancelled: ``cancel`` was set.
        """
        return self._send("PUT", url, cancel=cancel, data=body, headers=dict(headers))

    def send(
        self, method: str, url: str, *, body: bytes | None, headers: Mapping[str, str]
    ) -> HttpResult:
        """Send one request of any method, with ``body`` sent as exactly those bytes.

        The framing is this method's: a bytes body, empty included, goes with its own
        ``Content-Length`` (never chunked), and any ``Content-Length`` or
        ``Transfer-Encoding`` in ``headers`` is dropped. Like every call, it is retried
        by the transport's retry policy and never follows a redirect; a 3xx, 4xx or 5xx
        comes back as an :class:`HttpResult`.

        Args:
            method: The HTTP method, e.g. ``"DELETE"``.
            url: Where to send it.
            body: The bytes to send, or None for no body.
            headers: Headers to send as given (no token is added).

        Returns:
            The answer.

        Raises:
            TransportFailure: The request could not be completed (already retried).
        """
        sent = {
            name: value
            for name, value in headers.items()
            if name.lower() not in ("content-length", "transfer-encoding")
        }
        if body is not None:
            # requests leaves it out for an empty GET body; say it is there, and empty.
            sent["Content-Length"] = str(len(body))
        return self._send(method, url, data=body, headers=sent)

    def _send(
        self, method: str, url: str, *, cancel: threading.Event | None = None, **kwargs: Any
    ) -> HttpResult:
        where = redact_url(url)
        logger.debug("%s %s", method, where)
        call = _Call(self.config, self._watchdog, method, where, cancel)
        token = _CURRENT_CALL.set(call)
        failure: TransportFailure | None = None
        try:
            kwargs.setdefault("proxies", self._proxies_for(url))
            response = self._session.request(
                method, url, timeout=self._timeout, allow_redirects=False, **kwargs
            )
            headers = {name.lower(): value for name, value in response.headers.items()}
            result = HttpResult(
                response.status_code, headers, response.content, max(1, call.attempts)
            )
            response.close()
            return result
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        ) as exc:
            failure = TransportFailure(
                _describe(exc, call), _qualified_name(exc), type(_root_cause(exc)).__name__
            )
        finally:
            _CURRENT_CALL.reset(token)
        # Raised outside the except block so the original exception, whose text holds
        # the URL with its signature, is not kept as __context__ either.
        raise failure

    def close(self) -> None:
        """Close every pooled connection and stop the watchdog."""
        self._session.close()
        self._watchdog.stop()


def _environ_ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment, read once."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


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


def _describe(exc: BaseException, call: _Call) -> str:
    root = _root_cause(exc)
    attempts = _attempts_text(call.attempts)
    if call.overran:
        return (
            f"timed out: the attempt did not finish within its {call.bound_s:.0f} s bound{attempts}"
        )
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
    return f"{kind}: {type(root).__name__}: {detail}{attempts}"


def _attempts_text(attempts: int) -> str:
    return f" after {attempts} attempts" if attempts > 1 else ""
