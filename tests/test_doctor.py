"""``ctrlupload doctor``: the configuration and the storage it points at, in plain lines.

Against real loopback servers: the reference backend, the reference backend behind a
wrapper that hides the optional calls or refuses a token, a closed port, a raw socket
server whose Date header is off, moto for the s3 and minio providers.
"""

from __future__ import annotations

import email.utils
import io
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import _checksum
from ctrlupload import _cli as cli
from ctrlupload._doctor import _check_checksum, _Report, run_doctor, unknown_settings
from ctrlupload._settings import Settings
from ctrlupload.server import ReferenceServer, ServerConfig
from tests.support.servers import RawSocketServer
from tests.support.wsgi_host import WsgiHost, refuse_paths

_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_")
_ABORT = "/internal/storage/multipart/abort"
_COMPLETE_SET = "/internal/storage/complete-set"
_PRESIGN = "/internal/storage/presign-put"


class Doctor:
    """One doctor run: its exit status and its lines, by subject."""

    def __init__(self, env: dict[str, str], *, dotenv_path: Path | None = None) -> None:
        out = io.StringIO()
        self.status = run_doctor(env, out, dotenv_path=dotenv_path)
        self.text = out.getvalue()
        self.lines = self.text.splitlines()
        for line in self.lines:
            assert re.match(r"^(ok  |FAIL|warn|info|skip)  [^:]+: \S", line), line
        assert self.lines[-1].split(":")[0].split()[-1] == "doctor"

    def line(self, subject: str) -> str:
        """The one line about ``subject`` (its status word and text)."""
        found = [line for line in self.lines if line[6:].startswith(f"{subject}: ")]
        assert len(found) == 1, (subject, self.text)
        return found[0]

    def has(self, subject: str) -> bool:
        return any(line[6:].startswith(f"{subject}: ") for line in self.lines)


def _backend_env(base_url: str, token: str, **extra: str) -> dict[str, str]:
    return {
        "STORAGE_PROVIDER": "backend_presigned",
        "BACKEND_BASE_URL": base_url,
        "BACKEND_SERVICE_TOKEN": token,
        **extra,
    }


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[ReferenceServer]:
    with ReferenceServer(ServerConfig(port=0, data_dir=tmp_path / "backend")) as server:
        yield server


@pytest.fixture
def wrapped(reference: ReferenceServer) -> Iterator[Callable[[Any], str]]:
    """Serve ``wrap(reference.app)`` on a port of its own; returns its URL."""
    hosts: list[WsgiHost] = []

    def serve(wrap: Any) -> str:
        host = WsgiHost(wrap(reference.app)).__enter__()
        hosts.append(host)
        return host.base_url

    yield serve
    for host in hosts:
        host.__exit__(None, None, None)


# -- the reference backend -------------------------------------------------------------


def test_the_reference_backend_passes_every_check_and_nothing_is_stored(
    reference: ReferenceServer,
) -> None:
    doctor = Doctor(_backend_env(reference.base_url, reference.token))

    assert doctor.status == 0, doctor.text
    assert doctor.line("provider") == "ok    provider: backend_presigned (STORAGE_PROVIDER)"
    assert doctor.line("BACKEND_SERVICE_TOKEN") == "ok    BACKEND_SERVICE_TOKEN: set (not shown)"
    assert doctor.line("backend") == (
        f"ok    backend: {reference.base_url} answered GET /healthz with HTTP 200"
    )
    assert doctor.line("service token").startswith("ok    service token: the backend accepted")
    assert doctor.line("multipart").startswith("ok    multipart: offered")
    assert doctor.line("complete-set").startswith("ok    complete-set: offered")
    assert re.fullmatch(r"ok    clock: .*\b[01] s.*", doctor.line("clock"))
    assert doctor.lines[-1] == "ok    doctor: every check passed"
    assert reference.token not in doctor.text
    # The probes change nothing: no row, no object, no upload left behind.
    assert reference.db.all() == []
    objects = reference.config.data_dir / "objects"
    assert not objects.exists() or not any(path.is_file() for path in objects.rglob("*"))


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_backend_without_multipart_or_complete_set_passes_with_info_lines(
    wrapped: Callable[[Any], str], reference: ReferenceServer, status: int
) -> None:
    url = wrapped(lambda app: refuse_paths(app, {_ABORT, _COMPLETE_SET}, status, "not_found"))

    doctor = Doctor(_backend_env(url, reference.token))

    assert doctor.status == 0, doctor.text
    assert doctor.line("multipart") == (
        f"info  multipart: not offered (POST {_ABORT} answered HTTP {status}); every file "
        "goes up in one PUT, and put --resume cannot work"
    )
    assert doctor.line("complete-set") == (
        f"info  complete-set: not offered (POST {_COMPLETE_SET} answered HTTP {status}); "
        "a render's assets are recorded one complete call each"
    )


def test_storage_multipart_always_fails_without_multipart(
    wrapped: Callable[[Any], str], reference: ReferenceServer
) -> None:
    url = wrapped(lambda app: refuse_paths(app, {_ABORT}))

    doctor = Doctor(_backend_env(url, reference.token, STORAGE_MULTIPART="always"))

    assert doctor.status == 1
    assert doctor.line("multipart").startswith("FAIL  multipart: not offered")
    assert doctor.line("multipart").endswith("STORAGE_MULTIPART=always needs it")


def test_a_complete_set_that_refuses_the_empty_probe_fails(
    wrapped: Callable[[Any], str], reference: ReferenceServer
) -> None:
    url = wrapped(lambda app: refuse_paths(app, {_COMPLETE_SET}, 400, "bad_request"))

    doctor = Doctor(_backend_env(url, reference.token))

    assert doctor.status == 1
    assert doctor.line("complete-set").startswith(
        f"FAIL  complete-set: POST {_COMPLETE_SET} answered HTTP 400 (refused by the test"
    )


def test_a_wrong_token_is_named_and_never_shown(reference: ReferenceServer) -> None:
    token = "not-the-token-7f3a9c"

    doctor = Doctor(_backend_env(reference.base_url, token))

    assert doctor.status == 1
    assert doctor.line("service token") == (
        "FAIL  service token: the backend refused BACKEND_SERVICE_TOKEN (HTTP 401)"
    )
    assert not doctor.has("multipart")
    assert not doctor.has("complete-set")
    assert doctor.line("clock").startswith("ok    clock:")
    assert token not in doctor.text
    assert reference.token not in doctor.text


def test_a_wrong_presign_path_is_named(reference: ReferenceServer) -> None:
    env = _backend_env(
        reference.base_url, reference.token, BACKEND_STORAGE_PRESIGN_PATH="/api/presign"
    )

    doctor = Doctor(env)

    assert doctor.status == 1
    assert doctor.line("presign").startswith("FAIL  presign: POST /api/presign answered HTTP 404")
    assert doctor.line("presign").endswith("; check BACKEND_STORAGE_PRESIGN_PATH")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_closed_port_fails_with_the_plain_reason() -> None:
    base_url = f"http://127.0.0.1:{_closed_port()}"

    doctor = Doctor(_backend_env(base_url, "some-token-1234"))

    assert doctor.status == 1
    assert doctor.line("backend") == f"FAIL  backend: cannot reach {base_url}: connection refused"
    assert doctor.line("service token") == "skip  service token: the backend is unreachable"
    assert not doctor.has("clock")


# -- the clock -------------------------------------------------------------------------


def _skewed_backend(skew_s: float) -> Callable[[socket.socket], None]:
    """A raw HTTP server that conforms, except that its Date is ``skew_s`` off."""

    def handle(conn: socket.socket) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                return
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        length = next(
            (
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk
        answers: dict[str, Any] = {
            "/healthz": {"status": "ok"},
            _PRESIGN: {
                "upload_url": "http://127.0.0.1:1/upload/probe?signature=x",
                "public_url": "http://127.0.0.1:1/files/probe",
                "headers": {"Content-Type": "text/plain"},
                "expires_sec": 600,
            },
            _ABORT: {"status": "ok"},
            _COMPLETE_SET: {"status": "ok", "objects": []},
        }
        payload = json.dumps(answers.get(path, {"error": "not_found"})).encode()
        status = "200 OK" if path in answers else "404 Not Found"
        date = email.utils.formatdate(time.time() + skew_s, usegmt=True)
        conn.sendall(
            f"HTTP/1.1 {status}\r\nDate: {date}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )

    return handle


@pytest.mark.parametrize(
    ("skew_s", "status_word", "exit_status", "direction"),
    [(-400, "FAIL", 1, "ahead of"), (120, "warn", 0, "behind"), (-20, "ok  ", 0, "ahead of")],
)
def test_clock_skew_against_the_backends_date_header(
    skew_s: int, status_word: str, exit_status: int, direction: str
) -> None:
    with RawSocketServer(_skewed_backend(skew_s)) as raw:
        doctor = Doctor(_backend_env(raw.base_url, "raw-token-1234"))

    assert doctor.status == exit_status, doctor.text
    clock = doctor.line("clock")
    match = re.fullmatch(
        rf"{status_word}  clock: this machine's clock is (\d+) s {direction} the backend's.*",
        clock,
    )
    assert match, clock
    # Date has whole seconds: the skew read is within a second or two of the real one.
    assert abs(int(match[1]) - abs(skew_s)) <= 2
    if status_word == "FAIL":
        assert "presigned URLs may be refused as expired" in clock
    for subject in ("backend", "service token", "multipart", "complete-set"):
        assert doctor.line(subject).startswith("ok    "), doctor.text


# -- the settings ----------------------------------------------------------------------


def test_a_misspelt_variable_gets_a_suggestion_and_fails(tmp_path: Path) -> None:
    env = {
        "STORAGE_LOCAL_ROOT": str(tmp_path / "store"),
        "BACKEND_SERVCE_TOKEN": "secret-value-never-shown",
        "STORAGE_ACCOUNT": "unrelated",
        "HOME": "/nowhere",
    }

    doctor = Doctor(env)

    assert doctor.status == 1
    assert doctor.line("BACKEND_SERVCE_TOKEN") == (
        "FAIL  BACKEND_SERVCE_TOKEN: unknown setting; did you mean BACKEND_SERVICE_TOKEN?"
    )
    assert doctor.line("STORAGE_ACCOUNT") == (
        "warn  STORAGE_ACCOUNT: unknown setting; ctrlupload ignores it"
    )
    assert not doctor.has("HOME")
    assert "secret-value-never-shown" not in doctor.text
    assert doctor.lines[-1] == "FAIL  doctor: 1 check failed"


def test_misspelt_names_in_dotenv_are_found_too(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("STORAGE_PROVDER=backend_presigned\nstorage_local_root=x\n")

    doctor = Doctor({"STORAGE_LOCAL_ROOT": str(tmp_path / "store")}, dotenv_path=dotenv)

    assert doctor.status == 1
    assert doctor.line("STORAGE_PROVDER") == (
        "FAIL  STORAGE_PROVDER: unknown setting (in .env); did you mean STORAGE_PROVIDER?"
    )
    assert doctor.line("storage_local_root") == (
        "FAIL  storage_local_root: unknown setting (in .env); did you mean STORAGE_LOCAL_ROOT?"
    )
    assert doctor.line("settings") == "ok    settings: loaded from the environment and .env"
    assert doctor.line("provider").startswith("ok    provider: local (the default")


def test_unknown_settings_knows_every_settings_alias() -> None:
    from ctrlupload import Settings

    names = {str(field.alias): "x" for field in Settings.model_fields.values()}

    assert unknown_settings(names) == []


def test_a_bad_value_is_a_fail_line_not_a_traceback() -> None:
    doctor = Doctor({"STORAGE_PROVIDER": "bogus", "BACKEND_SERVICE_TOKEN": "tok en"})

    assert doctor.status == 1
    assert doctor.line("settings").startswith("FAIL  settings: Invalid setting ")
    assert doctor.line("provider") == "skip  provider: the settings do not load"
    assert "tok en" not in doctor.text


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"STORAGE_PROVIDER": "backend_presigned"}, ["BACKEND_BASE_URL", "BACKEND_SERVICE_TOKEN"]),
        (
            {"STORAGE_PROVIDER": "backend_presigned", "BACKEND_BASE_URL": "http://b:8080"},
            ["BACKEND_SERVICE_TOKEN"],
        ),
        ({"STORAGE_PROVIDER": "s3"}, ["STORAGE_S3_BUCKET"]),
        ({"STORAGE_PROVIDER": "minio"}, ["STORAGE_S3_BUCKET", "STORAGE_S3_ENDPOINT_URL"]),
        ({"STORAGE_PROVIDER": "minio", "STORAGE_S3_BUCKET": "b-1"}, ["STORAGE_S3_ENDPOINT_URL"]),
    ],
)
def test_required_variables_of_each_provider(env: dict[str, str], missing: list[str]) -> None:
    doctor = Doctor(env)

    assert doctor.status == 1
    provider = env["STORAGE_PROVIDER"]
    for name in missing:
        assert doctor.line(name) == f"FAIL  {name}: not set; STORAGE_PROVIDER={provider} needs it"
    assert doctor.line(provider) == f"skip  {provider}: a required setting is missing"


def test_backend_variables_with_the_local_provider_are_a_warning(tmp_path: Path) -> None:
    env = {"BACKEND_BASE_URL": "http://backend:8080", "STORAGE_LOCAL_ROOT": str(tmp_path)}

    doctor = Doctor(env)

    assert doctor.status == 0
    assert (
        doctor.line("provider")
        == "ok    provider: local (the default; STORAGE_PROVIDER is not set)"
    )
    assert (
        "warn  backend settings: BACKEND_BASE_URL is set but STORAGE_PROVIDER is local "
        "(the default); set STORAGE_PROVIDER=backend_presigned to use the backend"
    ) in doctor.lines


# -- local -----------------------------------------------------------------------------


def test_a_writable_local_root_passes_and_is_left_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()

    doctor = Doctor({"STORAGE_PROVIDER": "local", "STORAGE_LOCAL_ROOT": str(root)})

    assert doctor.status == 0
    assert doctor.line("STORAGE_LOCAL_ROOT") == f"ok    STORAGE_LOCAL_ROOT: {root} is writable"
    assert list(root.iterdir()) == []


def test_a_local_root_yet_to_be_made_passes_and_is_not_made(tmp_path: Path) -> None:
    root = tmp_path / "new" / "store"

    doctor = Doctor({"STORAGE_LOCAL_ROOT": str(root)})

    assert doctor.status == 0
    assert doctor.line("STORAGE_LOCAL_ROOT") == (
        f"ok    STORAGE_LOCAL_ROOT: {root} does not exist yet; it will be made in "
        f"{tmp_path} (writable)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_local_root_under_a_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    doctor = Doctor({"STORAGE_LOCAL_ROOT": str(blocker / "store")})

    assert doctor.status == 1
    assert doctor.line("STORAGE_LOCAL_ROOT") == (
        f"FAIL  STORAGE_LOCAL_ROOT: {blocker} is a file, not a folder"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_local_root_fails(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o555)
    try:
        doctor = Doctor({"STORAGE_LOCAL_ROOT": str(root)})
    finally:
        root.chmod(0o755)

    assert doctor.status == 1
    assert doctor.line("STORAGE_LOCAL_ROOT").startswith(f"FAIL  STORAGE_LOCAL_ROOT: {root} is not")


# -- s3 and minio ----------------------------------------------------------------------


@pytest.fixture
def aws_env(tmp_path: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def aws_process_env(monkeypatch: pytest.MonkeyPatch, aws_env: dict[str, str]) -> None:
    """boto3 reads its credentials from os.environ, whatever doctor is given."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in aws_env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("aws_process_env")
def test_an_existing_bucket_passes_headbucket(moto_s3: Any) -> None:
    bucket = moto_s3.make_bucket()
    env = {
        "STORAGE_PROVIDER": "minio",
        "STORAGE_S3_BUCKET": bucket,
        "STORAGE_S3_ENDPOINT_URL": moto_s3.endpoint_url,
    }

    doctor = Doctor(env)

    assert doctor.status == 0, doctor.text
    assert doctor.line("bucket") == (
        f"ok    bucket: HeadBucket of '{bucket}' at {moto_s3.endpoint_url} succeeded"
    )
    assert "testing-secret-key" not in doctor.text


@pytest.mark.usefixtures("aws_process_env")
def test_a_missing_bucket_fails_naming_the_setting(moto_s3: Any) -> None:
    env = {
        "STORAGE_PROVIDER": "s3",
        "STORAGE_S3_BUCKET": "no-such-bucket-for-doctor",
        "STORAGE_S3_ENDPOINT_URL": moto_s3.endpoint_url,
        "STORAGE_S3_REGION": "us-east-1",
    }

    doctor = Doctor(env)

    assert doctor.status == 1
    line = doctor.line("bucket")
    assert line.startswith("FAIL  bucket: ")
    assert "no-such-bucket-for-doctor" in line
    assert "STORAGE_S3_BUCKET" in line


@pytest.mark.usefixtures("aws_process_env")
def test_an_unreachable_endpoint_fails_naming_the_setting() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {
        "STORAGE_PROVIDER": "minio",
        "STORAGE_S3_BUCKET": "renders",
        "STORAGE_S3_ENDPOINT_URL": endpoint,
    }

    doctor = Doctor(env)

    assert doctor.status == 1
    line = doctor.line("bucket")
    assert line.startswith("FAIL  bucket: S3 HeadBucket for bucket 'renders' failed")
    assert line.endswith("; check STORAGE_S3_ENDPOINT_URL and the network")


# -- the command -----------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith(_SETTING_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_ctrlupload_doctor_prints_the_lines_and_exits_with_their_verdict(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    reference: ReferenceServer,
) -> None:
    for name, value in _backend_env(reference.base_url, reference.token).items():
        monkeypatch.setenv(name, value)

    assert cli.main(["doctor"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "ok    service token: the backend accepted it" in out
    assert out.endswith("ok    doctor: every check passed\n")

    # A .env in the working directory counts, misspellings included.
    (cli_env / ".env").write_text("BACKEND_SERVICE_TOKN=x\n")
    assert cli.main(["doctor"]) == 1
    out, _ = capsys.readouterr()
    assert "FAIL  BACKEND_SERVICE_TOKN: unknown setting (in .env); did you mean " in out
    assert reference.token not in out


@pytest.mark.parametrize(
    ("mode", "crc", "verdict", "says"),
    [
        ("auto", True, "ok", "CRC64NVME (awscrt)"),
        ("auto", False, "info", "awscrt is not installed"),
        ("crc64nvme", False, "FAIL", "crc64nvme needs awscrt"),
        ("md5", False, "ok", "md5"),
    ],
)
def test_doctor_says_how_uploads_will_be_checked(
    monkeypatch: pytest.MonkeyPatch, mode: str, crc: bool, verdict: str, says: str
) -> None:
    if not crc:
        monkeypatch.setattr(_checksum, "_crc", None)
    elif not _checksum.available():
        pytest.skip("needs awscrt")
    out = io.StringIO()
    report = _Report(out)
    _check_checksum(Settings(STORAGE_CHECKSUM=mode), report)
    (line,) = out.getvalue().splitlines()
    assert line.split()[:2] == [verdict, "STORAGE_CHECKSUM:"] and says in line
    assert report.failures == (1 if verdict == "FAIL" else 0)
