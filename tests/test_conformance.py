"""``ctrlupload conformance``: the contract checker, against good and broken backends.

The reference backend must conform with both stores (the s3 one over moto's server).
Broken backends are the reference backend's app behind a wrapper that breaks one thing
(tests/support/wsgi_host.py); each must make the run fail, with a FAIL line naming the
check. The deciding functions are tested without a server at the end.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import Settings
from ctrlupload import _cli as cli
from ctrlupload._conformance import (
    CHECKS,
    Answer,
    CheckResult,
    error_problem,
    presign_problem,
    refusal_expected,
    run_conformance,
    signed_header_names,
)
from ctrlupload.server import ApiPaths, ReferenceServer, ServerConfig
from tests.support.moto_server import MotoS3Server, s3_reference_server
from tests.support.wsgi_host import (
    WsgiApp,
    WsgiHost,
    accept_any_token,
    refuse_paths,
    rewrite_answers,
    strip_header,
)

_LINE = re.compile(r"^(PASS|FAIL|SKIP) ([a-z0-9-]+)(?:: (.+))?$")
_MULTIPART = {check.name for check in CHECKS if check.multipart}
_DEFAULTS = Settings()
_PRESIGN = _DEFAULTS.backend_storage_presign_path
_COMPLETE = _DEFAULTS.backend_storage_complete_path
_COMPLETE_SET = _DEFAULTS.backend_storage_complete_set_path
_SET_CHECKS = {
    "complete-set-probe",
    "complete-set-records",
    "complete-set-rejects-missing-object",
}
_MULTIPART_PATHS = {
    _DEFAULTS.backend_storage_multipart_initiate_path,
    _DEFAULTS.backend_storage_multipart_presign_path,
    _DEFAULTS.backend_storage_multipart_list_path,
    _DEFAULTS.backend_storage_multipart_complete_path,
    _DEFAULTS.backend_storage_multipart_abort_path,
}
_REFUSALS = {"put-refuses-wrong-content-type", "put-refuses-wrong-length"}


class Report:
    """A finished run: its exit status, its raw text and each check's line."""

    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text
        self.lines: dict[str, tuple[str, str]] = {}
        for line in text.splitlines():
            match = _LINE.match(line)
            if match:
                self.lines[match[2]] = (match[1], match[3] or "")

    def named(self, outcome: str) -> set[str]:
        return {name for name, (kind, _) in self.lines.items() if kind == outcome}

    def reason(self, name: str) -> str:
        return self.lines[name][1]


def conformance(base_url: str, token: str, **options: Any) -> Report:
    out = io.StringIO()
    options.setdefault("settings", Settings())
    status = run_conformance(base_url, token, out=out, **options)
    report = Report(status, out.getvalue())
    assert set(report.lines) == {check.name for check in CHECKS}, report.text
    assert token not in report.text
    assert "signature=" not in report.text and "X-Amz-Signature" not in report.text
    return report


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[Any], str]]:
    """Serve a wrapper around the reference backend (local store); returns its URL.

    ``serve(wrap)`` calls ``wrap(reference_app)``; upload URLs still point at the
    reference backend itself, so only the internal API goes through the wrapper.
    """
    with ReferenceServer(ServerConfig(port=0, data_dir=tmp_path / "backend")) as server:
        hosts: list[WsgiHost] = []

        def serve(wrap: Any) -> str:
            host = WsgiHost(wrap(server.app)).__enter__()
            hosts.append(host)
            return host.base_url

        serve.server = server  # type: ignore[attr-defined]
        yield serve
        for host in hosts:
            host.__exit__(None, None, None)


def _stored_files(root: Path) -> list[Path]:
    return [path for path in (root / "objects").rglob("*") if path.is_file()]


# -- conforming backends -----------------------------------------------------------------


def test_reference_backend_with_local_store_passes_every_check_and_cleans_up(
    reference_server: ReferenceServer, tmp_path: Path
) -> None:
    report = conformance(reference_server.base_url, reference_server.token)

    assert report.status == 0, report.text
    assert report.named("PASS") == {check.name for check in CHECKS}
    assert report.text.rstrip().endswith(f"conformant: {len(CHECKS)} passed, 0 failed, 0 skipped")
    assert "NOTE" not in report.text
    assert reference_server.db.all() == []
    assert _stored_files(tmp_path / "backend") == []


@pytest.fixture
def s3_reference(
    moto_s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ReferenceServer, str]]:
    with s3_reference_server(moto_s3, tmp_path, monkeypatch) as running:
        yield running


def test_reference_backend_with_s3_store_on_moto_conforms_when_refusals_are_skipped(
    s3_reference: tuple[ReferenceServer, str], moto_s3: MotoS3Server
) -> None:
    server, bucket = s3_reference

    report = conformance(server.base_url, server.token, skip_put_refusals=True)

    assert report.status == 0, report.text
    assert report.named("SKIP") == _REFUSALS
    assert report.reason("put-refuses-wrong-length") == "skipped on request (--skip-put-refusals)"
    assert moto_s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_moto_accepting_mis_signed_puts_fails_the_refusal_checks(
    s3_reference: tuple[ReferenceServer, str],
) -> None:
    # moto checks no signature (tests/support/moto_server.py); real S3 answers 403.
    server, _ = s3_reference

    report = conformance(server.base_url, server.token, skip_multipart=True)

    assert report.status == 1
    assert report.named("FAIL") == _REFUSALS
    assert report.reason("put-refuses-wrong-content-type") == (
        "a PUT with another Content-Type answered 200, expected 403"
    )


def test_configured_paths_are_used(tmp_path: Path) -> None:
    paths = ApiPaths(
        presign="/api/v2/presign", complete="/api/v2/complete", delete="/api/v2/delete"
    )
    environ = {
        "BACKEND_STORAGE_PRESIGN_PATH": paths.presign,
        "BACKEND_STORAGE_COMPLETE_PATH": paths.complete,
        "BACKEND_STORAGE_DELETE_PATH": paths.delete,
    }
    with ReferenceServer(ServerConfig(port=0, data_dir=tmp_path, paths=paths)) as server:
        moved = conformance(
            server.base_url,
            server.token,
            settings=Settings.from_env(environ, dotenv_path=None),
            skip_multipart=True,
        )
        defaults = conformance(server.base_url, server.token, skip_multipart=True)

    assert moved.status == 0, moved.text
    assert defaults.status == 1
    assert defaults.reason("presign-shape").startswith("presign-put answered 404 not_found")


# -- broken backends ---------------------------------------------------------------------


def test_backend_accepting_any_token_fails_every_auth_check(served: Any) -> None:
    url = served(lambda app: accept_any_token(app, served.server.token))

    report = conformance(url, served.server.token)

    assert report.status == 1
    assert report.named("FAIL") == {
        f"auth-{endpoint}-{case}"
        for endpoint in ("presign", "complete", "delete")
        for case in ("no-token", "wrong-token")
    } | {"multipart-initiate-no-token"}
    assert report.reason("auth-presign-no-token") == "answered 200, expected 401 unauthorized"
    assert report.reason("auth-complete-wrong-token").startswith(
        "answered 409 object_mismatch (object 'conformance/"
    )


def _json_rewrite(path: str, change: Callable[[dict[str, Any]], None]) -> Any:
    def rewrite(seen: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if seen != path or status != 200:
            return None
        payload = json.loads(body)
        change(payload)
        return 200, json.dumps(payload).encode()

    return lambda app: rewrite_answers(app, rewrite)


@pytest.mark.parametrize(
    ("path", "change", "failing", "reason"),
    [
        (
            _PRESIGN,
            lambda body: body.update(expires_sec="600"),
            "presign-shape",
            "response field 'expires_sec' is invalid",
        ),
        (
            _PRESIGN,
            lambda body: body.pop("headers"),
            "presign-shape",
            "response is missing 'headers'",
        ),
        (
            _PRESIGN,
            lambda body: body.update(upload_url="ftp://storage.example/x"),
            "presign-shape",
            "response field 'upload_url' is invalid",
        ),
        (
            _COMPLETE,
            lambda body: body.update(status="stored"),
            "complete-shape",
            "response field 'status' is 'stored', expected 'ok'",
        ),
        (
            _DEFAULTS.backend_storage_multipart_complete_path,
            lambda body: body.update(etag='"' + "a" * 32 + '-2"'),
            "multipart-complete",
            "complete answered ETag",
        ),
        (
            _COMPLETE_SET,
            lambda body: body.pop("objects"),
            "complete-set-probe",
            "complete-set response is missing 'objects'",
        ),
        (
            _COMPLETE_SET,
            lambda body: body.update(objects=body["objects"][::-1] + body["objects"]),
            "complete-set-records",
            "not the ones sent in order",
        ),
    ],
    ids=[
        "expires-sec-string",
        "no-headers",
        "ftp-url",
        "status-not-ok",
        "wrong-multipart-etag",
        "set-without-objects",
        "set-listing-other-objects",
    ],
)
def test_backend_answering_the_wrong_shape_fails_the_shape_check(
    served: Any,
    path: str,
    change: Callable[[dict[str, Any]], None],
    failing: str,
    reason: str,
) -> None:
    url = served(_json_rewrite(path, change))

    report = conformance(url, served.server.token)

    assert report.status == 1
    assert failing in report.named("FAIL"), report.text
    assert reason in report.reason(failing)


def test_backend_recording_complete_without_checking_storage_fails(served: Any) -> None:
    def trust_complete(path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if path == _COMPLETE and status == 409:
            return 200, b'{"status": "ok"}'
        return None

    url = served(lambda app: rewrite_answers(app, trust_complete))

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 1
    assert report.named("FAIL") == {
        "complete-rejects-missing-object",
        "complete-rejects-wrong-size",
        "complete-rejects-wrong-etag",
        "delete-removes-object",
    }
    assert (
        report.reason("complete-rejects-wrong-size") == "answered 200, expected 409 object_mismatch"
    )


def test_uploads_left_pending_by_a_failing_check_are_aborted_at_the_end(served: Any) -> None:
    complete_path = _DEFAULTS.backend_storage_multipart_complete_path
    url = served(lambda app: refuse_paths(app, {complete_path}, 500, "internal"))

    report = conformance(url, served.server.token)

    assert report.status == 1
    assert report.reason("multipart-complete") == (
        "complete answered 500 internal (refused by the test (internal)), expected 200"
    )
    assert [row.object_key for row in served.server.db.uploads()] == []
    assert served.server.db.all() == []


def _insert_only_complete(app: WsgiApp) -> WsgiApp:
    """A complete that records with an INSERT: the same object twice is a conflict."""
    seen: set[str] = set()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != _COMPLETE:
            return app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        try:
            key = json.loads(body)["object_key"]
        except (ValueError, KeyError, TypeError):
            return app(environ, start_response)
        if key in seen:
            answer = b'{"error": "object_mismatch", "message": "duplicate key"}'
            start_response("409 Conflict", [("Content-Type", "application/json")])
            return [answer]
        captured: list[str] = []

        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            captured.append(status)
            return start_response(status, headers, *exc_info)

        result = app(environ, start)
        if captured and captured[0].startswith("200"):
            seen.add(key)
        return result

    return wrapped


def test_backend_whose_complete_is_not_idempotent_fails(served: Any) -> None:
    url = served(_insert_only_complete)

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 1
    assert report.named("FAIL") == {"complete-idempotent"}
    assert report.reason("complete-idempotent") == (
        "the first of two identical completes answered 409 object_mismatch (duplicate key), "
        "expected 200"
    )


def test_405_without_an_allow_header_fails_the_method_checks(served: Any) -> None:
    url = served(lambda app: strip_header(app, "Allow"))

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 1
    assert report.named("FAIL") == {
        "method-presign-get",
        "method-complete-get",
        "method-delete-get",
    }
    assert report.reason("method-delete-get") == (
        "answered 405 with Allow '', which does not list POST"
    )


def test_backend_without_multipart_conforms_with_multipart_skipped(served: Any) -> None:
    url = served(lambda app: refuse_paths(app, _MULTIPART_PATHS))

    report = conformance(url, served.server.token)

    assert report.status == 0, report.text
    assert report.named("SKIP") == _MULTIPART
    assert {report.reason(name) for name in _MULTIPART} == {
        "the backend does not offer multipart (initiate answered 404)"
    }


@pytest.mark.parametrize("status", [404, 405, 501])
def test_backend_without_complete_set_conforms_with_its_checks_skipped(
    served: Any, status: int
) -> None:
    url = served(lambda app: refuse_paths(app, {_COMPLETE_SET}, status, "refused"))

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 0, report.text
    assert report.named("SKIP") == _MULTIPART | _SET_CHECKS
    assert {report.reason(name) for name in _SET_CHECKS} == {
        f"the backend does not offer complete-set (an empty set answered {status})"
    }


def test_backend_recording_a_set_without_checking_storage_fails(served: Any) -> None:
    def trust_sets(path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if path == _COMPLETE_SET and status == 409:
            return 200, b'{"status": "ok", "objects": []}'
        return None

    url = served(lambda app: rewrite_answers(app, trust_sets))

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 1
    assert report.named("FAIL") == {"complete-set-rejects-missing-object"}
    assert report.reason("complete-set-rejects-missing-object") == (
        "answered 200, expected 409 object_mismatch"
    )


def test_a_failing_complete_set_probe_is_not_a_missing_one(served: Any) -> None:
    url = served(lambda app: refuse_paths(app, {_COMPLETE_SET}, 500, "internal"))

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 1
    assert report.named("FAIL") == {"complete-set-probe"}
    assert report.lines["complete-set-records"] == ("SKIP", "not run: needs complete-set-probe")


def test_presign_headers_that_storage_refuses_fail_the_put_and_block_what_needs_it(
    served: Any,
) -> None:
    # The backend signs one Content-Type and tells the client to send another.
    url = served(_json_rewrite(_PRESIGN, lambda body: body.update(headers={"Content-Type": "a/b"})))

    report = conformance(url, served.server.token, skip_multipart=True)

    assert report.status == 1
    assert "put-upload" in report.named("FAIL")
    assert report.reason("put-upload").startswith("PUT to http://127.0.0.1:")
    assert "answered 403 (SignatureDoesNotMatch" in report.reason("put-upload")
    assert report.reason("complete-shape") == "not run: needs put-upload"
    assert report.reason("delete-removes-object") == "not run: needs delete-shape"


def test_unreachable_backend_fails_every_check_without_a_traceback() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there

    report = conformance(f"http://127.0.0.1:{port}", "some-token-value", skip_multipart=True)

    assert report.status == 1
    assert report.reason("presign-shape").startswith(
        "request failed: connection failed: NewConnectionError"
    )
    assert "Traceback" not in report.text


def test_each_request_is_sent_once_even_when_the_backend_answers_503(served: Any) -> None:
    seen: list[tuple[str, bytes]] = []

    def recording(app: WsgiApp) -> WsgiApp:
        refusing = refuse_paths(app, {_PRESIGN}, 503, "unavailable")

        def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == _PRESIGN:
                body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                seen.append((environ.get("HTTP_AUTHORIZATION", ""), body))
            return refusing(environ, start_response)

        return wrapped

    url = served(recording)
    # The client's retry settings are not the checker's: it never retries.
    retrying = Settings.from_env({"STORAGE_RETRY_ATTEMPTS": "5"}, dotenv_path=None)

    report = conformance(url, served.server.token, settings=retrying, skip_multipart=True)

    assert report.reason("presign-shape") == (
        "presign-put answered 503 unavailable (refused by the test (unavailable)), expected 200"
    )
    assert seen and len(set(seen)) == len(seen), "a presign request was sent twice"


def test_skip_multipart_skips_only_the_multipart_checks(
    reference_server: ReferenceServer,
) -> None:
    report = conformance(reference_server.base_url, reference_server.token, skip_multipart=True)

    assert report.status == 0
    assert report.named("SKIP") == _MULTIPART
    assert report.reason("multipart-abort") == "skipped on request (--skip-multipart)"


# -- the command -------------------------------------------------------------------------


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith(("STORAGE_", "BACKEND_", "VIDEO_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_conformance_reports_and_exits_zero_on_a_conforming_backend(
    clean_env: Path,
    reference_server: ReferenceServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", reference_server.token)

    status = cli.main(["conformance", reference_server.base_url, "--skip-multipart"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "PASS auth-presign-wrong-token" in out
    assert "SKIP multipart-initiate: skipped on request (--skip-multipart)" in out
    assert reference_server.token not in out


def test_cli_conformance_exits_one_on_a_failing_backend(
    clean_env: Path,
    served: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = served(lambda app: accept_any_token(app, served.server.token))
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", served.server.token)

    status = cli.main(["conformance", url, "--skip-multipart"])

    assert status == 1
    assert "FAIL auth-delete-no-token: answered 200, expected 401 unauthorized" in (
        capsys.readouterr().out
    )


def test_cli_conformance_without_a_token_is_a_clear_error(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["conformance", "http://127.0.0.1:9"])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err == (
        "ctrlupload: error: BACKEND_SERVICE_TOKEN is not set: "
        "the conformance check needs the backend's service token\n"
    )


def test_cli_conformance_refuses_a_base_url_that_is_not_http(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", "a-token-value")

    status = cli.main(["conformance", "backend:8080"])

    assert status == 1
    assert "BASE_URL must be an http:// or https:// URL" in capsys.readouterr().err


# -- deciding, without a server ----------------------------------------------------------


def _answer(status: int, payload: Any = None, body: bytes | None = None) -> Answer:
    return Answer(status, {}, body if body is not None else json.dumps(payload).encode())


def test_error_problem_wants_the_status_and_the_contracts_error_body() -> None:
    good = _answer(409, {"error": "object_mismatch", "message": "size differs"})
    assert error_problem(good, 409, "object_mismatch") is None
    assert error_problem(good, 401, "unauthorized") == (
        "answered 409 object_mismatch (size differs), expected 401 unauthorized"
    )
    assert error_problem(_answer(401, body=b""), 401, "unauthorized") == (
        'answered 401 without the error body {"error": …, "message": …}'
    )
    spring = _answer(405, {"status": 405, "error": "Method Not Allowed", "message": ""})
    assert error_problem(spring, 405, "method_not_allowed") == (
        "answered 405 Method Not Allowed, expected 405 method_not_allowed"
    )


def test_presign_problem_wants_all_four_fields() -> None:
    full = {
        "upload_url": "https://s3.example/b/k?X-Amz-Signature=secret",
        "public_url": "https://cdn.example/k",
        "headers": {"Content-Type": "video/mp4"},
        "expires_sec": 600,
    }
    assert presign_problem(_answer(200, full))[1] == ""
    for name in full:
        partial = {key: value for key, value in full.items() if key != name}
        assert presign_problem(_answer(200, partial))[1] == f"response is missing '{name}'"
    zero = presign_problem(_answer(200, {**full, "expires_sec": 0}))[1]
    assert zero.startswith("response field 'expires_sec' is invalid")
    assert "secret" not in presign_problem(_answer(200, {**full, "headers": [1]}))[1]


def test_refusal_is_expected_for_what_the_url_or_the_headers_sign() -> None:
    sigv4 = (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost&X-Amz-Signature=abc"
    )
    host_only = "https://b.s3.amazonaws.com/k?X-Amz-SignedHeaders=host&X-Amz-Signature=abc"
    assert signed_header_names(sigv4) == frozenset({"content-length", "content-type", "host"})
    assert signed_header_names("http://local/upload/k?expires=1&signature=abc") is None
    assert refusal_expected(sigv4, {}, "Content-Length")
    assert not refusal_expected(host_only, {}, "Content-Type")
    assert refusal_expected(host_only, {"content-type": "video/mp4"}, "Content-Type")
    # The local store's opaque URL binds both, as contract.md says.
    assert refusal_expected("http://local/upload/k?expires=1&signature=abc", {}, "Content-Length")


def test_only_a_pass_or_an_allowed_skip_is_conformant() -> None:
    assert CheckResult("a", "PASS").line() == "PASS a"
    assert CheckResult("a", "FAIL", "why").line() == "FAIL a: why"
    assert CheckResult("a", "SKIP", "n/a").conformant
    assert not CheckResult("a", "SKIP", "not run", allowed=False).conformant
    assert not CheckResult("a", "FAIL", "why").conformant


def test_check_names_are_unique_and_every_multipart_check_is_marked() -> None:
    names = [check.name for check in CHECKS]
    assert len(names) == len(set(names))
    assert {name for name in names if name.startswith("multipart-")} == _MULTIPART
