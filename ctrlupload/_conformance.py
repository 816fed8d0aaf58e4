"""``ctrlupload conformance``: check a backend against the internal storage API contract.

Another team's backend (Spring + S3, say) must keep the contract the reference backend
keeps (``docs/contract.md``, ``ctrlupload/server/openapi.yaml``). This module drives it
the way a client does, and the ways a client never does (no token, broken JSON, bad
keys, another method), and prints one line per check::

    PASS name
    FAIL name: reason
    SKIP name: reason

The run is conformant, exit status 0, when every check passed or was skipped for a
reason that is allowed: the backend does not offer the optional multipart extension
(initiate answered 404, 405 or 501) or the optional complete-set (an empty set answered
404, 405 or 501), the caller asked to skip a group, or the upload URL
shows that storage does not sign the header a refusal check is about. A check that needs
one that did not pass is reported as SKIP, after that FAIL.

Requests go through the client's :class:`~ctrlupload._transport.Transport`, built with
a retry policy of one attempt: each request is sent exactly once (a retry would hide the
answer being checked; a 5xx comes back as an answer), with the settings' connect and read
timeouts and attempt bound, a bytes body always with its exact ``Content-Length``, and no
redirect followed. No cookie is kept and ``~/.netrc`` is never read, so nothing adds
credentials to the no-token checks; proxies and the CA bundle (``REQUESTS_CA_BUNDLE``)
still come from the environment. Nothing printed holds the token or a URL's query
string.

Objects are created under ``conformance/<uuid>/`` and deleted at the end, best effort;
pending multipart uploads are aborted.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TextIO, TypeVar
from urllib.parse import parse_qsl, urlsplit

from ._errors import StorageConfigError, TransportFailure
from ._redact import redact_text, redact_url, register_secret
from ._settings import Settings
from ._transport import MAX_RESPONSE_BYTES, RetryPolicy, Transport, TransportConfig
from .protocol._answers import s3_error_detail
from .protocol._contract import (
    CompleteSetResponse,
    MultipartCompleteResponse,
    MultipartInitiateResponse,
    MultipartListResponse,
    MultipartPresignResponse,
    PresignResponse,
    ResponseModel,
    StatusResponse,
    bare_etag,
    parse_response,
)
from .protocol._parts import MIN_PART_BYTES, multipart_etag, plan_parts

__all__ = [
    "BAD_KEYS",
    "CHECKS",
    "Answer",
    "Check",
    "CheckResult",
    "describe",
    "error_problem",
    "model_problem",
    "presign_problem",
    "refusal_expected",
    "run_conformance",
    "signed_header_names",
    "status_problem",
]

Outcome = Literal["PASS", "FAIL", "SKIP"]
_Auth = Literal["token", "none", "wrong"]

#: Statuses by which a backend says it has no multipart extension (contract.md).
MULTIPART_ABSENT_STATUSES: Final = frozenset({404, 405, 501})
#: Statuses by which a backend says it has no complete-set (contract.md).
COMPLETE_SET_ABSENT_STATUSES: Final = frozenset({404, 405, 501})
#: Largest answer body read (the transport's cap); the rest is not needed to judge it.
MAX_ANSWER_BYTES: Final = MAX_RESPONSE_BYTES
#: Over S3's largest object: no backend's content_length maximum can be above it.
OVERSIZED_CONTENT_LENGTH: Final = 5 * 1024**4 + 1
#: Size of the single-PUT test object.
SINGLE_PUT_BYTES: Final = 64 * 1024
#: Size of the multipart test object: two parts at S3's smallest part size.
MULTIPART_BYTES: Final = MIN_PART_BYTES + 1024
CONTENT_TYPE: Final = "video/mp4"
WRONG_CONTENT_TYPE: Final = "application/x-ctrlupload-conformance"
_ZERO_ETAG: Final = '"' + "0" * 32 + '"'

_ResponseT = TypeVar("_ResponseT", bound=ResponseModel)


# -- outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """What one check found.

    Attributes:
        name: The check's name.
        outcome: ``PASS``, ``FAIL`` or ``SKIP``.
        reason: Why it failed or was skipped (empty for a pass); already redacted.
        allowed: For a SKIP, whether the run can still be conformant.
    """

    name: str
    outcome: Outcome
    reason: str = ""
    allowed: bool = True

    @property
    def conformant(self) -> bool:
        """True for a pass and for an allowed skip."""
        return self.outcome == "PASS" or (self.outcome == "SKIP" and self.allowed)

    def line(self) -> str:
        """The report line: ``PASS name``, ``FAIL name: reason`` or ``SKIP name: reason``."""
        return f"{self.outcome} {self.name}" + (f": {self.reason}" if self.reason else "")


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Skipped(Exception):
    def __init__(self, reason: str, *, allowed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.allowed = allowed


# -- HTTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, headers (lower-case names) and body (capped)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _Http:
    """Sends each request once, through a transport that never retries."""

    def __init__(self, settings: Settings) -> None:
        config = TransportConfig(
            connect_timeout_s=settings.storage_connect_timeout_s,
            read_timeout_s=settings.storage_read_timeout_s,
            min_send_rate_bytes_s=settings.storage_min_send_rate_bytes_s,
            retry=RetryPolicy(attempts=1),
        )
        self._transport = Transport(config, user_agent="ctrlupload-conformance")

    def send(
        self, method: str, url: str, *, body: bytes | None, headers: Mapping[str, str]
    ) -> Answer:
        """Send once; a bytes body always goes with its exact Content-Length.

        Raises:
            TransportFailure: No answer came (refused, reset, timed out).
        """
        result = self._transport.send(method, url, body=body, headers=headers)
        return Answer(result.status_code, result.headers, result.body)

    def close(self) -> None:
        self._transport.close()


# -- deciding: pure functions over answers -----------------------------------------------


def describe(answer: Answer) -> str:
    """``"answered 409 object_mismatch (message)"``: the status, and the error body's
    code and message when it has them, redacted."""
    text = f"answered {answer.status}"
    payload = answer.json()
    if isinstance(payload, dict):
        code, message = payload.get("error"), payload.get("message")
        if isinstance(code, str):
            text += f" {code}"
        if isinstance(message, str) and message:
            text += f" ({message[:200]})"
    else:
        text += s3_error_detail(answer.body)
    return redact_text(text)


def error_problem(answer: Answer, status: int, code: str) -> str | None:
    """Why ``answer`` is not the contract's error ``status`` / ``code``, or None."""
    expected = f"expected {status} {code}"
    if answer.status != status:
        return f"{describe(answer)}, {expected}"
    payload = answer.json()
    if not (
        isinstance(payload, dict)
        and isinstance(payload.get("error"), str)
        and isinstance(payload.get("message"), str)
    ):
        return f'answered {status} without the error body {{"error": …, "message": …}}'
    if payload["error"] != code:
        return f"{describe(answer)}, {expected}"
    return None


def model_problem(model: type[_ResponseT], answer: Answer) -> tuple[_ResponseT | None, str]:
    """``(instance, "")`` when ``answer`` is a 200 with ``model``'s JSON, else
    ``(None, reason)``."""
    if answer.status != 200:
        return None, f"{describe(answer)}, expected 200"
    payload = answer.json()
    if payload is None:
        return None, "answered 200 with a body that is not JSON"
    parsed, reason = parse_response(model, payload)
    return parsed, reason


def presign_problem(answer: Answer) -> tuple[PresignResponse | None, str]:
    """Check a presign-put answer: all four fields, with the contract's types."""
    parsed, reason = model_problem(PresignResponse, answer)
    if parsed is None:
        return None, reason
    payload = answer.json()
    # The client tolerates a missing headers or expires_sec; the contract requires both.
    for name in ("upload_url", "public_url", "headers", "expires_sec"):
        if payload.get(name) is None:
            return None, f"response is missing '{name}'"
    if not parsed.public_url:
        return None, "response field 'public_url' is empty"
    return parsed, ""


def status_problem(answer: Answer) -> str | None:
    """Why ``answer`` is not ``200 {"status": "ok"}``, or None."""
    parsed, reason = model_problem(StatusResponse, answer)
    if parsed is None:
        return reason
    if parsed.status != "ok":
        return f"response field 'status' is {parsed.status!r}, expected 'ok'"
    return None


def signed_header_names(url: str) -> frozenset[str] | None:
    """The headers a URL's signature covers, when the URL says (SigV4's
    ``X-Amz-SignedHeaders``, GCS's ``X-Goog-SignedHeaders``); None when it does not."""
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name.lower() in ("x-amz-signedheaders", "x-goog-signedheaders"):
            return frozenset(part.strip().lower() for part in value.split(";") if part.strip())
    return None


def refusal_expected(url: str, headers: Mapping[str, str], header: str) -> bool:
    """Whether storage must refuse a PUT whose ``header`` differs from the signed one.

    It must when the presign answer asks for that header, or the URL lists it among its
    signed headers. A URL that lists its signed headers without it is not bound to it.
    For an opaque URL that does not ask for the header either, the reference backend's
    local store is the model: it binds both Content-Type and Content-Length.
    """
    header = header.lower()
    if header in (name.lower() for name in headers):
        return True
    signed = signed_header_names(url)
    return signed is None or header in signed


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _without(headers: Mapping[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key.lower() != name.lower()}


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# -- the run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    key: str
    etag: str
    size_bytes: int
    content_type: str
    public_url: str

    def complete_body(self, **changes: Any) -> dict[str, Any]:
        body = {
            "object_key": self.key,
            "etag": self.etag,
            "size_bytes": self.size_bytes,
            "content_type": self.content_type,
            "public_url": self.public_url,
        }
        body.update(changes)
        return body


@dataclass(frozen=True)
class _Upload:
    key: str
    upload_id: str
    part_size: int
    data: bytes


@dataclass
class _Run:
    """Per run: where the API is, the token, what earlier checks produced and what to
    clean up."""

    http: _Http
    base_url: str
    paths: Mapping[str, str]
    token: str
    skip_multipart: bool
    skip_put_refusals: bool
    prefix: str = field(default_factory=lambda: f"conformance/{uuid.uuid4().hex}")
    values: dict[str, Any] = field(default_factory=dict)
    results: dict[str, CheckResult] = field(default_factory=dict)
    stored_keys: set[str] = field(default_factory=set)
    pending_uploads: dict[str, str] = field(default_factory=dict)  # upload_id -> key

    @property
    def wrong_token(self) -> str:
        # As long as the real one, so a length check alone does not tell them apart.
        return secrets.token_urlsafe(len(self.token))[: len(self.token)]

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def post(
        self,
        endpoint: str,
        payload: Any,
        *,
        auth: _Auth = "token",
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """POST ``payload`` as JSON with the token, no token, or a wrong one."""
        return self.post_raw(
            endpoint, json.dumps(payload).encode("utf-8"), auth=auth, headers=headers
        )

    def post_raw(
        self,
        endpoint: str,
        body: bytes,
        *,
        auth: _Auth = "token",
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        sent = {"Content-Type": "application/json", "Accept": "application/json"}
        sent.update(headers or {})
        if auth == "token":
            sent["Authorization"] = f"Bearer {self.token}"
        elif auth == "wrong":
            sent["Authorization"] = f"Bearer {self.wrong_token}"
        return self.http.send("POST", self._url(endpoint), body=body, headers=sent)

    def get(self, endpoint: str) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        return self.http.send("GET", self._url(endpoint), body=None, headers=headers)

    def put(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        return self.http.send("PUT", url, body=body, headers=headers)

    def _url(self, endpoint: str) -> str:
        return self.base_url + self.paths[endpoint]

    def presign(self, key: str, length: int) -> PresignResponse:
        answer = self.post(
            "presign",
            {"object_key": key, "content_type": CONTENT_TYPE, "content_length": length},
        )
        parsed, reason = presign_problem(answer)
        if parsed is None:
            raise _Failed(f"presign-put {reason}")
        return parsed

    def needs(self, name: str) -> Any:
        return self.values[name]


# -- the registry ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One conformance check.

    Attributes:
        name: Its name in the report.
        run: Does the check; raises to fail or skip, returns what dependents need.
        requires: Checks that must pass first; otherwise this one is skipped.
        multipart: Part of the optional multipart extension.
    """

    name: str
    run: Callable[[_Run], Any]
    requires: tuple[str, ...] = ()
    multipart: bool = False


#: Every check, in the order they run.
CHECKS: list[Check] = []


def _check(
    name: str, *, requires: tuple[str, ...] = (), multipart: bool = False
) -> Callable[[Callable[[_Run], Any]], Callable[[_Run], Any]]:
    def register(function: Callable[[_Run], Any]) -> Callable[[_Run], Any]:
        if any(check.name == name for check in CHECKS):
            raise ValueError(f"two checks named {name!r}")
        CHECKS.append(Check(name, function, requires, multipart))
        return function

    return register


def _expect_error(answer: Answer, status: int, code: str) -> None:
    problem = error_problem(answer, status, code)
    if problem is not None:
        raise _Failed(problem)


def _presign_body(key: str) -> dict[str, Any]:
    return {"object_key": key, "content_type": CONTENT_TYPE, "content_length": 1}


def _complete_body(key: str) -> dict[str, Any]:
    return {
        "object_key": key,
        "etag": _ZERO_ETAG,
        "size_bytes": 1,
        "content_type": CONTENT_TYPE,
        "public_url": "https://cdn.example.invalid/" + key,
    }


# Bodies that are valid but for the token: a backend that ignores the token answers
# them with 200 (presign, delete) or 409 (complete), never 401.
_VALID_BODIES: Final[dict[str, Callable[[str], dict[str, Any]]]] = {
    "presign": _presign_body,
    "complete": _complete_body,
    "delete": lambda key: {"object_key": key},
}


_AUTH_CASES: Final[tuple[tuple[_Auth, str], ...]] = (("none", "no-token"), ("wrong", "wrong-token"))


def _register_auth_checks() -> None:
    for endpoint in _VALID_BODIES:
        for auth, case in _AUTH_CASES:

            def check(run: _Run, endpoint: str = endpoint, auth: _Auth = auth) -> None:
                payload = _VALID_BODIES[endpoint](run.key("auth.mp4"))
                _expect_error(run.post(endpoint, payload, auth=auth), 401, "unauthorized")

            _check(f"auth-{endpoint}-{case}")(check)


def _register_method_checks() -> None:
    for endpoint in _VALID_BODIES:

        def check(run: _Run, endpoint: str = endpoint) -> None:
            answer = run.get(endpoint)
            _expect_error(answer, 405, "method_not_allowed")
            allow = answer.headers.get("allow", "")
            if "POST" not in allow.upper():
                raise _Failed(f"answered 405 with Allow {allow!r}, which does not list POST")

        _check(f"method-{endpoint}-get")(check)


_register_auth_checks()
_register_method_checks()


@_check("presign-shape")
def _presign_shape(run: _Run) -> None:
    run.presign(run.key("presign-shape.mp4"), 1024)


def _register_bad_request(name: str, endpoint: str, make: Callable[[_Run], Any]) -> None:
    """A check that a body breaking the contract gets ``400 bad_request``."""

    def check(run: _Run) -> None:
        body = make(run)
        answer = (
            run.post_raw(endpoint, body) if isinstance(body, bytes) else run.post(endpoint, body)
        )
        _expect_error(answer, 400, "bad_request")

    _check(name)(check)


#: A field value meaning "leave the field out".
_DROP: Final = object()


def _presign_with(**changes: Any) -> Callable[[_Run], dict[str, Any]]:
    def make(run: _Run) -> dict[str, Any]:
        body = _presign_body(run.key("rejected.mp4"))
        body.update(changes)
        return {name: value for name, value in body.items() if value is not _DROP}

    return make


_BAD_JSON: Final = b'{"object_key": "conformance/'
_PRESIGN_REJECTIONS: Final[dict[str, Callable[[_Run], Any]]] = {
    "bad-json": lambda run: _BAD_JSON,
    "non-object": lambda run: b"[]",
    "missing-field": _presign_with(content_length=_DROP),
    "unknown-field": _presign_with(bucket="other-bucket"),
    "wrong-type": _presign_with(content_length="1"),
    "negative-length": _presign_with(content_length=-1),
    "empty-content-type": _presign_with(content_type=""),
    "too-large": _presign_with(content_length=OVERSIZED_CONTENT_LENGTH),
}
#: One key per key rule of contract.md; none may be presigned.
BAD_KEYS: Final[dict[str, str]] = {
    "dotdot-segment": "../x",
    "dot-segment": "conformance/./x",
    "leading-slash": "/conformance/x",
    "empty-segment": "conformance//x",
    "trailing-slash": "conformance/x/",
    "backslash": "conformance\\x",
    "control-char": "conformance/\x01x",
    "empty": "",
    "too-long": "conformance/" + "x" * 1013,  # 1025 bytes
}
for _name, _make in _PRESIGN_REJECTIONS.items():
    _register_bad_request(f"presign-rejects-{_name}", "presign", _make)
for _name, _bad_key in BAD_KEYS.items():
    _register_bad_request(
        f"presign-rejects-key-{_name}", "presign", _presign_with(object_key=_bad_key)
    )


@_check("put-upload")
def _put_upload(run: _Run) -> _Stored:
    """PUT to upload_url with the signed headers as given: storage answers the MD5."""
    key = run.key("video.mp4")
    body = os.urandom(SINGLE_PUT_BYTES)
    signed = run.presign(key, len(body))
    length = _header(signed.headers, "Content-Length")
    if length is not None and length != str(len(body)):
        raise _Failed(f"presign-put asks for Content-Length {length}, not {len(body)}")
    run.stored_keys.add(key)
    answer = run.put(signed.upload_url, body, signed.headers)
    if not 200 <= answer.status < 300:
        raise _Failed(f"PUT to {redact_url(signed.upload_url)} {describe(answer)}")
    etag = answer.headers.get("etag")
    if not etag:
        raise _Failed("the PUT's answer has no ETag")
    if bare_etag(etag) != _md5_hex(body):
        raise _Failed(f"the PUT answered ETag {etag}, not the body's MD5 {_md5_hex(body)}")
    return _Stored(key, etag, len(body), CONTENT_TYPE, signed.public_url)


def _register_refusal(name: str, header: str) -> None:
    def check(run: _Run) -> None:
        if run.skip_put_refusals:
            raise _Skipped("skipped on request (--skip-put-refusals)", allowed=True)
        key = run.key(f"{name}.mp4")
        body = os.urandom(1024)
        signed = run.presign(key, len(body))
        if not refusal_expected(signed.upload_url, signed.headers, header):
            raise _Skipped(f"the upload URL does not sign {header}", allowed=True)
        run.stored_keys.add(key)
        headers = dict(signed.headers)
        if header == "Content-Type":
            headers = _without(headers, header)
            headers["Content-Type"] = WRONG_CONTENT_TYPE
        else:
            body += b"x"  # the transport sends the longer body's own Content-Length
            headers = _without(headers, header)
        answer = run.put(signed.upload_url, body, headers)
        if answer.status != 403:
            raise _Failed(f"a PUT with another {header} {describe(answer)}, expected 403")

    _check(f"put-refuses-{name}")(check)


_register_refusal("wrong-content-type", "Content-Type")
_register_refusal("wrong-length", "Content-Length")


@_check("complete-shape", requires=("put-upload",))
def _complete_shape(run: _Run) -> None:
    stored: _Stored = run.needs("put-upload")
    problem = status_problem(run.post("complete", stored.complete_body()))
    if problem is not None:
        raise _Failed(problem)


@_check("complete-idempotent", requires=("put-upload",))
def _complete_idempotent(run: _Run) -> None:
    stored: _Stored = run.needs("put-upload")
    for attempt in ("first", "second"):
        problem = status_problem(run.post("complete", stored.complete_body()))
        if problem is not None:
            raise _Failed(f"the {attempt} of two identical completes {problem}")


@_check("complete-rejects-missing-object")
def _complete_missing(run: _Run) -> None:
    answer = run.post("complete", _complete_body(run.key("never-uploaded.mp4")))
    _expect_error(answer, 409, "object_mismatch")


@_check("complete-rejects-wrong-size", requires=("put-upload",))
def _complete_wrong_size(run: _Run) -> None:
    stored: _Stored = run.needs("put-upload")
    answer = run.post("complete", stored.complete_body(size_bytes=stored.size_bytes + 1))
    _expect_error(answer, 409, "object_mismatch")


@_check("complete-rejects-wrong-etag", requires=("put-upload",))
def _complete_wrong_etag(run: _Run) -> None:
    stored: _Stored = run.needs("put-upload")
    wrong = _ZERO_ETAG if bare_etag(stored.etag) != "0" * 32 else '"' + "1" * 32 + '"'
    answer = run.post("complete", stored.complete_body(etag=wrong))
    _expect_error(answer, 409, "object_mismatch")


def _traversal_key(run: _Run) -> str:
    # Never resolves to an object of this run, nor outside the run's prefix's parent.
    return f"{run.prefix}/../{run.prefix.rsplit('/', 1)[-1]}-absent"


def _complete_with(**changes: Any) -> Callable[[_Run], dict[str, Any]]:
    def make(run: _Run) -> dict[str, Any]:
        body = _complete_body(run.key("rejected.mp4"))
        body.update(changes)
        return {name: value for name, value in body.items() if value is not _DROP}

    return make


_register_bad_request("complete-rejects-bad-json", "complete", lambda run: _BAD_JSON)
_register_bad_request("complete-rejects-missing-field", "complete", _complete_with(etag=_DROP))
_register_bad_request(
    "complete-rejects-bad-key",
    "complete",
    lambda run: _complete_body(_traversal_key(run)),
)
_register_bad_request("delete-rejects-bad-json", "delete", lambda run: _BAD_JSON)
_register_bad_request("delete-rejects-missing-field", "delete", lambda run: {})
_register_bad_request(
    "delete-rejects-bad-key", "delete", lambda run: {"object_key": _traversal_key(run)}
)


# -- complete-set (optional) -------------------------------------------------------------


def _complete_set_answer(run: _Run, objects: list[dict[str, Any]]) -> CompleteSetResponse:
    """A 200 complete-set answer of the contract's shape, listing ``objects`` in order."""
    answer = run.post("complete_set", {"objects": objects})
    parsed, reason = model_problem(CompleteSetResponse, answer)
    if parsed is None:
        raise _Failed(f"complete-set {reason}")
    if parsed.status != "ok":
        raise _Failed(f"complete-set answered status {parsed.status!r}, expected 'ok'")
    listed = [item.object_key for item in parsed.objects]
    if listed != [item["object_key"] for item in objects]:
        raise _Failed(f"complete-set answered the objects {listed}, not the ones sent in order")
    return parsed


@_check("complete-set-probe")
def _complete_set_probe(run: _Run) -> None:
    """An empty set: 200 with no objects, or 404/405/501 from a backend without it."""
    answer = run.post("complete_set", {"objects": []})
    if answer.status in COMPLETE_SET_ABSENT_STATUSES:
        raise _Skipped(
            f"the backend does not offer complete-set (an empty set answered {answer.status})",
            allowed=True,
        )
    _complete_set_answer(run, [])


def _set_entry(stored: _Stored) -> dict[str, Any]:
    return {
        "object_key": stored.key,
        "size_bytes": stored.size_bytes,
        "content_type": stored.content_type,
        "etag": stored.etag,
        "public_url": stored.public_url,
    }


@_check("complete-set-records", requires=("complete-set-probe", "put-upload"))
def _complete_set_records(run: _Run) -> None:
    """A set of the stored object is recorded, and repeating it answers the same."""
    stored: _Stored = run.needs("put-upload")
    first = _complete_set_answer(run, [_set_entry(stored)])
    recorded = first.objects[0]
    if bare_etag(recorded.etag) != bare_etag(stored.etag):
        raise _Failed(f"complete-set answered ETag {recorded.etag}, not the PUT's {stored.etag}")
    if recorded.public_url != stored.public_url:
        raise _Failed("complete-set answered another public_url than the one sent")
    again = _complete_set_answer(run, [_set_entry(stored)])
    if again.objects != first.objects:
        raise _Failed("a repeated complete-set answered another result")


@_check("complete-set-rejects-missing-object", requires=("complete-set-probe", "put-upload"))
def _complete_set_missing(run: _Run) -> None:
    """A set with an object never stored: 409 object_mismatch, the set all or nothing."""
    stored: _Stored = run.needs("put-upload")
    missing = _complete_body(run.key("never-uploaded-set.mp4"))
    answer = run.post("complete_set", {"objects": [_set_entry(stored), missing]})
    _expect_error(answer, 409, "object_mismatch")


@_check("delete-shape", requires=("put-upload",))
def _delete_shape(run: _Run) -> _Stored:
    stored: _Stored = run.needs("put-upload")
    problem = status_problem(run.post("delete", {"object_key": stored.key}))
    if problem is not None:
        raise _Failed(problem)
    return stored


@_check("delete-idempotent", requires=("delete-shape",))
def _delete_idempotent(run: _Run) -> None:
    stored: _Stored = run.needs("delete-shape")
    problem = status_problem(run.post("delete", {"object_key": stored.key}))
    if problem is not None:
        raise _Failed(f"deleting a deleted key {problem}")


@_check("delete-removes-object", requires=("delete-shape",))
def _delete_removes(run: _Run) -> None:
    stored: _Stored = run.needs("delete-shape")
    problem = error_problem(run.post("complete", stored.complete_body()), 409, "object_mismatch")
    if problem is not None:
        raise _Failed(f"complete after delete {problem}: the object is still in storage")


# -- multipart ---------------------------------------------------------------------------


def _initiate(run: _Run, key: str, length: int, *, auth: _Auth = "token") -> Answer:
    body = {
        "object_key": key,
        "content_type": CONTENT_TYPE,
        "content_length": length,
        "part_size": MIN_PART_BYTES,
    }
    # The client sends one on every initiate; a backend may ignore it.
    headers = {"Idempotency-Key": secrets.token_hex(16)}
    return run.post("multipart_initiate", body, auth=auth, headers=headers)


def _started(run: _Run, key: str, answer: Answer) -> MultipartInitiateResponse:
    parsed, reason = model_problem(MultipartInitiateResponse, answer)
    if parsed is None:
        raise _Failed(f"initiate {reason}")
    run.pending_uploads[parsed.upload_id] = key
    return parsed


@_check("multipart-initiate", multipart=True)
def _multipart_initiate(run: _Run) -> _Upload:
    key = run.key("multipart.mp4")
    answer = _initiate(run, key, MULTIPART_BYTES)
    if answer.status in MULTIPART_ABSENT_STATUSES:
        raise _Skipped(
            f"the backend does not offer multipart (initiate answered {answer.status})",
            allowed=True,
        )
    started = _started(run, key, answer)
    return _Upload(key, started.upload_id, started.part_size, os.urandom(MULTIPART_BYTES))


@_check("multipart-initiate-no-token", requires=("multipart-initiate",), multipart=True)
def _multipart_initiate_no_token(run: _Run) -> None:
    key = run.key("multipart-no-token.mp4")
    answer = _initiate(run, key, MULTIPART_BYTES, auth="none")
    if answer.status == 200:
        _started(run, key, answer)  # so that the cleanup aborts it
    _expect_error(answer, 401, "unauthorized")


def _presign_parts(run: _Run, upload: _Upload, numbers: list[int]) -> dict[int, Any]:
    answer = run.post(
        "multipart_presign",
        {"object_key": upload.key, "upload_id": upload.upload_id, "part_numbers": numbers},
    )
    parsed, reason = model_problem(MultipartPresignResponse, answer)
    if parsed is None:
        raise _Failed(f"presign-parts {reason}")
    got = sorted(part.part_number for part in parsed.parts)
    if got != sorted(numbers):
        raise _Failed(f"presign-parts for parts {numbers} answered parts {got}")
    return {part.part_number: part for part in parsed.parts}


def _put_part(run: _Run, signed: Any, data: bytes) -> str:
    answer = run.put(signed.upload_url, data, signed.headers)
    if not 200 <= answer.status < 300:
        raise _Failed(
            f"PUT of part {signed.part_number} to {redact_url(signed.upload_url)} "
            f"{describe(answer)}"
        )
    etag = answer.headers.get("etag")
    if not etag:
        raise _Failed(f"the PUT of part {signed.part_number} answered no ETag")
    if bare_etag(etag) != _md5_hex(data):
        raise _Failed(f"part {signed.part_number} got ETag {etag}, not its MD5 {_md5_hex(data)}")
    return etag


@_check("multipart-presign-parts", requires=("multipart-initiate",), multipart=True)
def _multipart_presign(run: _Run) -> dict[int, Any]:
    upload: _Upload = run.needs("multipart-initiate")
    plan = plan_parts(len(upload.data), upload.part_size)
    return _presign_parts(run, upload, [part.number for part in plan])


@_check("multipart-put-parts", requires=("multipart-presign-parts",), multipart=True)
def _multipart_put_parts(run: _Run) -> list[tuple[int, str, int]]:
    """Each part's number, ETag as storage gave it, and size."""
    upload: _Upload = run.needs("multipart-initiate")
    signed: dict[int, Any] = run.needs("multipart-presign-parts")
    done = []
    for part in plan_parts(len(upload.data), upload.part_size):
        data = upload.data[part.offset : part.offset + part.length]
        done.append((part.number, _put_part(run, signed[part.number], data), part.length))
    return done


@_check("multipart-list-parts", requires=("multipart-put-parts",), multipart=True)
def _multipart_list(run: _Run) -> None:
    upload: _Upload = run.needs("multipart-initiate")
    done: list[tuple[int, str, int]] = run.needs("multipart-put-parts")
    answer = run.post("multipart_list", {"object_key": upload.key, "upload_id": upload.upload_id})
    parsed, reason = model_problem(MultipartListResponse, answer)
    if parsed is None:
        raise _Failed(f"list-parts {reason}")
    listed = [(part.part_number, bare_etag(part.etag), part.size_bytes) for part in parsed.parts]
    expected = [(number, bare_etag(etag), size) for number, etag, size in done]
    if listed != expected or parsed.is_truncated:
        raise _Failed(
            f"list-parts answered {listed} (is_truncated {parsed.is_truncated}), "
            f"expected {expected}"
        )


def _complete_multipart_body(upload: _Upload, parts: list[tuple[int, str]]) -> dict[str, Any]:
    return {
        "object_key": upload.key,
        "upload_id": upload.upload_id,
        "parts": [{"part_number": number, "etag": etag} for number, etag in parts],
        "size_bytes": len(upload.data),
        "content_type": CONTENT_TYPE,
    }


def _multipart_complete_once(run: _Run, what: str) -> MultipartCompleteResponse:
    upload: _Upload = run.needs("multipart-initiate")
    done: list[tuple[int, str, int]] = run.needs("multipart-put-parts")
    body = _complete_multipart_body(upload, [(number, etag) for number, etag, _ in done])
    run.stored_keys.add(upload.key)
    parsed, reason = model_problem(MultipartCompleteResponse, run.post("multipart_complete", body))
    if parsed is None:
        raise _Failed(f"{what} {reason}")
    run.pending_uploads.pop(upload.upload_id, None)
    expected = multipart_etag([bare_etag(etag) for _, etag, _ in done])
    if bare_etag(parsed.etag) != bare_etag(expected):
        raise _Failed(f"{what} answered ETag {parsed.etag}, expected {expected}")
    return parsed


@_check("multipart-complete", requires=("multipart-put-parts",), multipart=True)
def _multipart_complete(run: _Run) -> MultipartCompleteResponse:
    return _multipart_complete_once(run, "complete")


@_check("multipart-complete-repeat", requires=("multipart-complete",), multipart=True)
def _multipart_complete_repeat(run: _Run) -> None:
    first: MultipartCompleteResponse = run.needs("multipart-complete")
    again = _multipart_complete_once(run, "a repeated complete")
    if again.public_url != first.public_url:
        raise _Failed("a repeated complete answered another public_url")


@_check("multipart-abort", requires=("multipart-initiate",), multipart=True)
def _multipart_abort(run: _Run) -> tuple[_Upload, str]:
    """Start an upload, store its one part, then abort it twice."""
    key = run.key("aborted.mp4")
    started = _started(run, key, _initiate(run, key, 1024))
    upload = _Upload(key, started.upload_id, started.part_size, os.urandom(1024))
    signed = _presign_parts(run, upload, [1])
    etag = _put_part(run, signed[1], upload.data)
    for attempt in ("an abort", "a repeated abort"):
        answer = run.post("multipart_abort", {"object_key": key, "upload_id": upload.upload_id})
        problem = status_problem(answer)
        if problem is not None:
            raise _Failed(f"{attempt} {problem}")
        run.pending_uploads.pop(upload.upload_id, None)
    return upload, etag


@_check("multipart-list-aborted", requires=("multipart-abort",), multipart=True)
def _multipart_list_aborted(run: _Run) -> None:
    upload, _ = run.needs("multipart-abort")
    answer = run.post("multipart_list", {"object_key": upload.key, "upload_id": upload.upload_id})
    _expect_error(answer, 404, "no_such_upload")


@_check("multipart-complete-aborted", requires=("multipart-abort",), multipart=True)
def _multipart_complete_aborted(run: _Run) -> None:
    upload, etag = run.needs("multipart-abort")
    run.stored_keys.add(upload.key)  # in case the abort did not take
    answer = run.post("multipart_complete", _complete_multipart_body(upload, [(1, etag)]))
    _expect_error(answer, 404, "no_such_upload")


# -- running -----------------------------------------------------------------------------


def _run_one(check: Check, run: _Run) -> CheckResult:
    name = check.name
    if check.multipart and run.skip_multipart:
        return CheckResult(name, "SKIP", "skipped on request (--skip-multipart)")
    for needed in check.requires:
        before = run.results[needed]
        if before.outcome == "SKIP" and before.allowed:
            return CheckResult(name, "SKIP", before.reason)
        if before.outcome != "PASS":
            return CheckResult(name, "SKIP", f"not run: needs {needed}", allowed=False)
    try:
        run.values[name] = check.run(run)
    except _Failed as failed:
        return CheckResult(name, "FAIL", redact_text(failed.reason))
    except _Skipped as skipped:
        return CheckResult(name, "SKIP", redact_text(skipped.reason), allowed=skipped.allowed)
    except TransportFailure as failure:
        return CheckResult(name, "FAIL", _request_failure(failure))
    return CheckResult(name, "PASS")


def _request_failure(failure: TransportFailure) -> str:
    # The transport has redacted it already; redacting again costs nothing.
    return redact_text(f"request failed: {failure.args[0][:300]}")


def _clean_up(run: _Run) -> list[str]:
    """Abort what is pending and delete what may be stored; what could not be done."""
    notes = []
    for upload_id, key in list(run.pending_uploads.items()):
        try:
            answer = run.post("multipart_abort", {"object_key": key, "upload_id": upload_id})
        except TransportFailure as failure:
            notes.append(f"could not abort the upload of '{key}': {_request_failure(failure)}")
            continue
        if answer.status != 200:
            notes.append(f"could not abort the upload of '{key}': {describe(answer)}")
    for key in sorted(run.stored_keys):
        try:
            answer = run.post("delete", {"object_key": key})
        except TransportFailure as failure:
            notes.append(f"could not delete '{key}': {_request_failure(failure)}")
            continue
        if answer.status != 200:
            notes.append(f"could not delete '{key}': {describe(answer)}")
    return [redact_text(note) for note in notes]


def _base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StorageConfigError(
            f"BASE_URL must be an http:// or https:// URL, not {redact_url(base_url)!r}"
        )
    if parts.query or parts.fragment:
        raise StorageConfigError("BASE_URL must not have a query string or fragment")
    return base_url.rstrip("/")


def run_conformance(
    base_url: str,
    token: str,
    *,
    settings: Settings | None = None,
    out: TextIO,
    skip_multipart: bool = False,
    skip_put_refusals: bool = False,
) -> int:
    """Check the backend at ``base_url`` against the internal storage API contract.

    Prints one line per check to ``out`` (``PASS name``, ``FAIL name: reason``,
    ``SKIP name: reason``), then a summary line.

    Args:
        base_url: The backend, e.g. ``http://backend:8080``; the API paths come from
            ``settings``.
        token: The backend's service token (``BACKEND_SERVICE_TOKEN``).
        settings: The ``BACKEND_STORAGE_*_PATH`` paths and the timeouts; loaded with
            :meth:`Settings.from_env` when None.
        out: Where the report goes.
        skip_multipart: Skip the multipart checks (they still count as conformant).
        skip_put_refusals: Do not expect storage to refuse a PUT with another
            Content-Type or length; for S3 emulators that check no signatures (moto).

    Returns:
        0 when every check passed or was skipped for an allowed reason, else 1.

    Raises:
        StorageConfigError: ``base_url`` is not an http(s) URL, the token is empty, or
            a setting is invalid.
    """
    base = _base_url(base_url)
    if not token:
        raise StorageConfigError(
            "the conformance check needs the backend's service token",
            variable="BACKEND_SERVICE_TOKEN",
        )
    register_secret(token)
    settings = settings if settings is not None else Settings.from_env()
    paths = {
        "presign": settings.backend_storage_presign_path,
        "complete": settings.backend_storage_complete_path,
        "delete": settings.backend_storage_delete_path,
        "complete_set": settings.backend_storage_complete_set_path,
        "multipart_initiate": settings.backend_storage_multipart_initiate_path,
        "multipart_presign": settings.backend_storage_multipart_presign_path,
        "multipart_list": settings.backend_storage_multipart_list_path,
        "multipart_complete": settings.backend_storage_multipart_complete_path,
        "multipart_abort": settings.backend_storage_multipart_abort_path,
    }
    http = _Http(settings)
    run = _Run(http, base, paths, token, skip_multipart, skip_put_refusals)
    out.write(f"conformance of {redact_url(base)} (objects under {run.prefix}/)\n")
    try:
        for check in CHECKS:
            result = _run_one(check, run)
            run.results[check.name] = result
            out.write(result.line() + "\n")
            out.flush()
        for note in _clean_up(run):
            out.write(f"NOTE cleanup {note}\n")
    finally:
        http.close()
    results = run.results.values()
    counts = {kind: sum(r.outcome == kind for r in results) for kind in ("PASS", "FAIL", "SKIP")}
    conformant = all(result.conformant for result in results)
    out.write(
        f"{'conformant' if conformant else 'NOT conformant'}: {counts['PASS']} passed, "
        f"{counts['FAIL']} failed, {counts['SKIP']} skipped\n"
    )
    out.flush()
    return 0 if conformant else 1
