"""The ``ctrlupload`` command: ``demo``, ``serve``, ``put`` and ``--version``.

Most tests call :func:`ctrlupload._cli.main` in-process with a clean environment and
the working directory in ``tmp_path`` (so no stray ``.env`` is read). What only a real
process shows (exit codes after a signal, tracebacks on stderr, ``python -m``) runs as
a subprocess with the same precautions.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

import ctrlupload
from ctrlupload import BackendPresignedStorageProvider
from ctrlupload import _cli as cli
from ctrlupload.server import AssetDB, ReferenceServer
from tests.conftest import TOKEN, backend_settings, wait_until
from tests.support.raw_client import hang_up, presign_put, start_partial_put
from tests.support.serve_process import ServeProcess, child_env
from tests.support.servers import PRESIGN_PATH, FakeBackend, Status

_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_")
_SUBPROCESS_TIMEOUT_S = 60
MIB = 1024 * 1024


def _settings_free_env(**overrides: str) -> dict[str, str]:
    """A child environment without any ctrlupload setting, plus ``overrides``."""
    drop = [name for name in os.environ if name.startswith(_SETTING_PREFIXES)]
    return child_env(overrides, drop=drop)


def _run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctrlupload", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ctrlupload setting in ``os.environ``, and ``tmp_path`` as the working dir."""
    for name in list(os.environ):
        if name.startswith(_SETTING_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


class _TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- demo ------------------------------------------------------------------------------

_DEMO_OK = re.compile(
    r"^  ok   (?P<key>videos/V-DEMO/S-001/(?P<job>JOB-\d{8}-\d{6})/(?P<name>[a-z]+\.[a-z0-9]+))"
    r"\s+(?P<size>\d+) B\s+md5 (?P<md5>[0-9a-f]{32})$"
)
_DEMO_URL = re.compile(r"^       (?P<url>http://127\.0\.0\.1:\d+/files/\S+)$")
_DEMO_ROW = re.compile(
    r'^  (?P<key>videos/\S+)  etag="(?P<md5>[0-9a-f]{32})"  size_bytes=(?P<size>\d+)'
    r"  content_type=(?P<type>\S+)  created_at=(?P<created>\S+)$"
)


def _check_demo_output(out: str, video_bytes: int) -> dict[str, dict[str, str]]:
    """Assert the demo's report is complete and self-consistent; return its ok lines."""
    lines = out.splitlines()
    assert "DIFF" not in out
    ok = [match.groupdict() for line in lines if (match := _DEMO_OK.match(line))]
    assert sorted(entry["name"] for entry in ok) == ["subtitles.srt", "thumb.jpg", "video.mp4"]
    assert len({entry["job"] for entry in ok}) == 1, "one job id for the whole render"
    by_key = {entry["key"]: entry for entry in ok}
    urls = [match["url"] for line in lines if (match := _DEMO_URL.match(line))]
    assert sorted(urlsplit(url).path for url in urls) == sorted(f"/files/{key}" for key in by_key)

    sizes = {entry["name"]: int(entry["size"]) for entry in ok}
    assert sizes["video.mp4"] == video_bytes
    assert sizes["subtitles.srt"] == len(cli._SUBTITLES.encode())
    assert sizes["thumb.jpg"] > 1000

    rows = [match.groupdict() for line in lines if (match := _DEMO_ROW.match(line))]
    assert sorted(row["key"] for row in rows) == sorted(by_key)
    for row in rows:
        uploaded = by_key[row["key"]]
        assert row["md5"] == uploaded["md5"]
        assert row["size"] == uploaded["size"]
    types = {row["key"].rsplit("/", 1)[1]: row["type"] for row in rows}
    assert types == {
        "video.mp4": "video/mp4",
        "subtitles.srt": "application/x-subrip",
        "thumb.jpg": "image/jpeg",
    }
    assert lines[-1].startswith("demo ok")
    return by_key


def test_demo_in_process_uploads_the_sample_render_and_keeps_data_dir(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = cli_env / "demo-data"

    status = cli.main(["demo", "--video-mib", "1", "--data-dir", str(data_dir)])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert err == ""
    uploaded = _check_demo_output(out, video_bytes=MIB)
    # --data-dir keeps what the backend stored: the objects and the rows.
    db = AssetDB(data_dir / "assets.sqlite3")
    try:
        for key, entry in uploaded.items():
            stored = (data_dir / "objects" / key).read_bytes()
            assert hashlib.md5(stored).hexdigest() == entry["md5"]
            row = db.get(key)
            assert row is not None
            assert row.size_bytes == int(entry["size"])
    finally:
        db.close()
    assert list((data_dir / "staging").iterdir()) == []


def test_demo_as_python_m_ctrlupload_exits_0(tmp_path: Path) -> None:
    done = _run_cli("demo", "--video-mib", "1", cwd=tmp_path, env=_settings_free_env())

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    _check_demo_output(done.stdout, video_bytes=MIB)


def test_demo_respects_video_max_upload_bytes(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VIDEO_MAX_UPLOAD_BYTES", str(MIB))

    # An explicit size over the limit: say which setting to raise, before any upload.
    assert cli.main(["demo", "--video-mib", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"ctrlupload: error: --video-mib 2 makes a {2 * MIB}-byte video, more than "
        f"VIDEO_MAX_UPLOAD_BYTES={MIB}; raise VIDEO_MAX_UPLOAD_BYTES or pass a smaller "
        "--video-mib\n"
    )

    # No size given: the sample video is made to fit (1 MiB, not the usual 4).
    assert cli.main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    _check_demo_output(out, video_bytes=MIB)


def test_demo_with_a_limit_below_its_thumbnail_says_what_to_raise(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VIDEO_MAX_UPLOAD_BYTES", "1000")

    assert cli.main(["demo"]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "ctrlupload: error: VIDEO_MAX_UPLOAD_BYTES=1000 is less than the demo's "
        "30013-byte thumbnail; raise VIDEO_MAX_UPLOAD_BYTES to at least 30013\n"
    )


def test_demo_takes_an_empty_video_and_refuses_a_negative_size(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--video-mib", "0"]) == 0
    out, _ = capsys.readouterr()
    _check_demo_output(out, video_bytes=0)

    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--video-mib", "-1"])
    assert exited.value.code == 2
    assert "argument --video-mib: '-1' must not be negative" in capsys.readouterr().err


# -- serve -----------------------------------------------------------------------------


def _upload_and_download(base_url: str, token: str, source: Path, key: str) -> None:
    settings = backend_settings(base_url, BACKEND_SERVICE_TOKEN=token)
    with BackendPresignedStorageProvider(settings) as storage:
        result = storage.put_file(source, key)
    assert result.url == f"{base_url}/files/{key}"
    downloaded = requests.get(result.url, timeout=10)
    assert downloaded.status_code == 200
    assert downloaded.content == source.read_bytes()


def test_serve_announces_a_generated_token_answers_and_stops_on_sigterm(
    tmp_path: Path, make_file: Callable[..., Path]
) -> None:
    source = make_file(2 * MIB, "video.mp4")
    key = "videos/V-CLI/S-1/JOB-1/video.mp4"
    data_dir = tmp_path / "data"
    env = _settings_free_env()
    assert "BACKEND_SERVICE_TOKEN" not in env

    with ServeProcess(data_dir, env=env, cwd=tmp_path) as serve:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", serve.base_url)
        assert serve.token is not None
        assert len(serve.token) >= 24
        _upload_and_download(serve.base_url, serve.token, source, key)
        health = requests.get(f"{serve.base_url}/healthz", timeout=5)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        # A kept-alive client connection must not hold up the shutdown.
        keep_alive = requests.Session()
        assert keep_alive.get(f"{serve.base_url}/healthz", timeout=5).status_code == 200

        started = time.monotonic()
        status = serve.stop(signal.SIGTERM, timeout_s=5)
        took = time.monotonic() - started
        keep_alive.close()

    assert status == 0, serve.stderr
    assert took < 5
    assert "ctrlupload reference backend stopped" in serve.stdout
    assert "Traceback" not in serve.stderr
    # stderr holds the access log, one line per request, and nothing else.
    lines = serve.stderr.splitlines()
    assert lines
    assert all(" INFO ctrlupload.server.access: 127.0.0.1 " in line for line in lines), lines
    assert any(" GET /healthz 200 in=0 out=16 " in line for line in lines)
    assert any(f" PUT /upload/{key} 200 in={2 * MIB} out=0 " in line for line in lines)
    assert not any("signature" in line or "?" in line for line in lines)
    assert serve.token not in serve.stderr
    db = AssetDB(data_dir / "assets.sqlite3")
    try:
        row = db.get(key)
    finally:
        db.close()
    assert row is not None
    assert row.size_bytes == 2 * MIB


def test_serve_uses_the_token_from_the_environment_without_printing_it(
    tmp_path: Path, make_file: Callable[..., Path]
) -> None:
    token = "cli-env-token-5f0c1d2e3a4b"
    source = make_file(64 * 1024, "thumb.jpg")
    env = _settings_free_env(BACKEND_SERVICE_TOKEN=token)

    with ServeProcess(tmp_path / "data", env=env, cwd=tmp_path) as serve:
        assert serve.token is None
        assert serve.token_line == "BACKEND_SERVICE_TOKEN: the one in this server's environment"
        _upload_and_download(serve.base_url, token, source, "videos/V-CLI/S-1/JOB-2/thumb.jpg")
        wrong = requests.post(
            f"{serve.base_url}/internal/storage/presign-put",
            json={"object_key": "a/b.jpg", "content_type": "image/jpeg", "content_length": 1},
            headers={"Authorization": "Bearer not-the-token"},
            timeout=5,
        )
        assert wrong.status_code == 401
        # Ctrl-C stops it as cleanly as SIGTERM does.
        status = serve.stop(signal.SIGINT, timeout_s=5)

    assert status == 0, serve.stderr
    assert token not in serve.stdout
    assert token not in serve.stderr
    assert "ctrlupload reference backend stopped" in serve.stdout
    assert "Traceback" not in serve.stderr


def test_serve_on_a_port_in_use_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run_cli(
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            cwd=tmp_path,
            env=_settings_free_env(),
        )

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("ctrlupload: error: cannot start the backend: ")
    assert "Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_stopped_during_an_upload_leaves_no_staging_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    args = ("--port", "0", "--shutdown-timeout-s", "0.5")
    with ServeProcess(data_dir, env=_settings_free_env(), cwd=tmp_path, args=args) as serve:
        assert serve.token is not None
        presign = presign_put(
            serve.base_url, serve.token, "videos/V-CLI/S-1/JOB-3/video.mp4", "video/mp4", 8 * MIB
        )
        conn = start_partial_put(presign["upload_url"], presign["headers"], 8 * MIB, MIB)
        try:
            staging = data_dir / "staging"
            assert wait_until(lambda: any(staging.iterdir()))
            # The stalled upload gets its grace period, then its connection is cut.
            assert serve.stop(signal.SIGTERM, timeout_s=5) == 0
        finally:
            hang_up(conn, reset=False)
        assert list(staging.iterdir()) == []


def test_serve_lets_an_upload_in_flight_finish_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = "videos/V-CLI/S-1/JOB-4/video.mp4"
    args = ("--port", "0", "--shutdown-timeout-s", "30")
    with ServeProcess(data_dir, env=_settings_free_env(), cwd=tmp_path, args=args) as serve:
        assert serve.token is not None
        presign = presign_put(serve.base_url, serve.token, key, "video/mp4", 2 * MIB)
        conn = start_partial_put(presign["upload_url"], presign["headers"], 2 * MIB, MIB)
        try:
            assert wait_until(lambda: any((data_dir / "staging").iterdir()))
            assert serve.process is not None
            serve.process.send_signal(signal.SIGTERM)
            # A new client is refused once the server has begun to stop...
            assert wait_until(lambda: not _accepts(serve.base_url))
            # ...while the upload in flight is read to its end and answered.
            conn.sendall(b"\0" * MIB)
            answer = conn.recv(4096)
        finally:
            hang_up(conn, reset=False)
        assert serve.stop(signal.SIGTERM, timeout_s=10) == 0
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert (data_dir / "objects" / key).stat().st_size == 2 * MIB


def _accepts(base_url: str) -> bool:
    url = urlsplit(base_url)
    try:
        socket.create_connection((url.hostname, url.port), timeout=1).close()
    except OSError:
        return False
    return True


# -- put -------------------------------------------------------------------------------


def test_put_with_the_local_provider_prints_the_url_and_stores_the_file(
    tmp_path: Path, make_file: Callable[..., Path]
) -> None:
    source = make_file(3 * MIB + 7, "video.mp4")
    key = "videos/V-1/S-1/JOB-1/video.mp4"
    store = tmp_path / "store"
    env = _settings_free_env(STORAGE_PROVIDER="local", STORAGE_LOCAL_ROOT=str(store))

    done = _run_cli("put", str(source), key, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    target = store / "videos/V-1/S-1/JOB-1/video.mp4"
    assert done.stdout == f"{target.absolute().as_uri()}\n"
    # stderr is a pipe, not a terminal: no progress bar.
    assert done.stderr == ""
    assert target.read_bytes() == source.read_bytes()


def test_put_of_a_missing_file_exits_1_with_the_error_message_and_no_traceback(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "not-rendered.mp4"
    key = "videos/V-1/S-1/JOB-1/video.mp4"
    store = tmp_path / "store"
    env = _settings_free_env(STORAGE_PROVIDER="local", STORAGE_LOCAL_ROOT=str(store))

    done = _run_cli("put", str(missing), key, cwd=tmp_path, env=env)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"ctrlupload: error: Storage upload failed for '{key}': Source file not found: {missing}\n"
    )
    assert not (store / key).exists()


@pytest.mark.parametrize("key", ["../escape.mp4", "/videos/abs.mp4", "videos//double.mp4"])
def test_put_with_a_bad_key_exits_1_and_stores_nothing(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    key: str,
) -> None:
    source = make_file(1000, "video.mp4")
    store = cli_env / "store"
    monkeypatch.setenv("STORAGE_PROVIDER", "local")
    monkeypatch.setenv("STORAGE_LOCAL_ROOT", str(store))

    status = cli.main(["put", str(source), key])

    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert err.startswith(f"ctrlupload: error: Storage upload failed for '{key}': key must")
    assert err.count("\n") == 1
    assert not store.exists() or not any(store.rglob("*.mp4"))


def test_put_with_backend_presigned_uploads_through_the_reference_server(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    reference_server: ReferenceServer,
) -> None:
    source = make_file(2 * MIB + 1, "video.mp4")
    key = "videos/V-1/S-1/JOB-1/video.mp4"
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", reference_server.base_url)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", reference_server.token)

    status = cli.main(["put", str(source), key])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"{reference_server.base_url}/files/{key}\n"
    assert err == ""
    row = reference_server.db.get(key)
    assert row is not None
    assert row.size_bytes == 2 * MIB + 1
    assert row.etag == f'"{hashlib.md5(source.read_bytes()).hexdigest()}"'
    stored = reference_server.config.data_dir / "objects" / key
    assert stored.read_bytes() == source.read_bytes()


def test_put_with_a_wrong_token_exits_1_naming_the_backend_refusal(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    reference_server: ReferenceServer,
) -> None:
    source = make_file(1000, "video.mp4")
    key = "videos/V-1/S-1/JOB-1/video.mp4"
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", reference_server.base_url)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", "wrong-token")

    status = cli.main(["put", str(source), key])

    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert err.startswith(f"ctrlupload: error: Storage upload failed for '{key}': ")
    assert "401" in err
    assert "wrong-token" not in err
    assert reference_server.db.get(key) is None


@pytest.mark.parametrize(
    ("flags", "drawn"),
    [((), True), (("--no-progress",), False)],
    ids=["terminal", "terminal-no-progress"],
)
def test_put_draws_progress_only_on_a_terminal_without_no_progress(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_file: Callable[..., Path],
    flags: tuple[str, ...],
    drawn: bool,
) -> None:
    source = make_file(MIB, "video.mp4")
    monkeypatch.setenv("STORAGE_PROVIDER", "local")
    monkeypatch.setenv("STORAGE_LOCAL_ROOT", str(cli_env / "store"))
    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = _TTYStringIO()
    monkeypatch.setattr(sys, "stderr", terminal)

    status = cli.main(["put", *flags, str(source), "videos/V-1/S-1/JOB-1/video.mp4"])

    assert status == 0
    if drawn:
        assert "video.mp4 [" in terminal.getvalue()
        assert "100.0% 1.0/1.0 MiB" in terminal.getvalue()
        assert terminal.getvalue().endswith("\n")
    else:
        assert terminal.getvalue() == ""


def test_text_progress_without_tqdm_throttles_and_always_draws_the_final_100_percent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    # A frozen clock: every call after the first lands inside the 0.1 s redraw interval.
    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    stream = io.StringIO()
    bar = cli._TextProgress("video.mp4", stream)
    assert bar._tqdm is None

    bar(0, 4 * MIB)
    bar(2 * MIB, 4 * MIB)
    bar(4 * MIB, 4 * MIB)
    bar.close()

    frames = stream.getvalue().split("\r")[1:]
    assert [frame.split("] ")[1].split("%")[0].strip() for frame in frames] == ["0.0", "100.0"]
    assert frames[-1] == f"video.mp4 [{'#' * 30}] 100.0% 4.0/4.0 MiB\n"


def test_text_progress_of_an_empty_file_shows_100_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = io.StringIO()
    bar = cli._TextProgress("empty.srt", stream)

    bar(0, 0)
    bar.close()

    assert "100.0% 0.0/0.0 MiB" in stream.getvalue()


def test_put_resume_goes_up_in_parts_with_a_checkpoint(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    reference_server: ReferenceServer,
) -> None:
    source = make_file(MIB + 3, "video.mp4")
    key = "videos/V-1/S-1/JOB-R/video.mp4"
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", reference_server.base_url)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", reference_server.token)
    monkeypatch.setenv("STORAGE_RESUME_DIR", str(cli_env / "resume"))

    status = cli.main(["put", "--resume", str(source), key])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"{reference_server.base_url}/files/{key}\n"
    row = reference_server.db.get(key)
    assert row is not None
    # Under the multipart threshold, so without --resume this would be one PUT; with
    # it the upload goes in parts (the ETag of a one-part upload ends "-1").
    assert row.etag.endswith('-1"'), row.etag
    assert (cli_env / "resume").is_dir()

    assert cli.main(["put", str(source), key.replace("JOB-R", "JOB-P")]) == 0
    plain = reference_server.db.get(key.replace("JOB-R", "JOB-P"))
    assert plain is not None
    assert plain.etag == f'"{hashlib.md5(source.read_bytes()).hexdigest()}"'


def test_put_shows_each_retry_on_stderr(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    backend: FakeBackend,
) -> None:
    source = make_file(1000, "thumb.jpg")
    backend.inject(PRESIGN_PATH, Status(503), Status(503))
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", backend.base_url)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("STORAGE_RETRY_BACKOFF_S", "0")

    status = cli.main(["put", str(source), "videos/V-1/S-1/JOB-1/thumb.jpg"])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.startswith("https://cdn.example.test/")
    assert err.splitlines() == [
        f"ctrlupload: POST {backend.base_url}{PRESIGN_PATH}: retrying in 0.0 s "
        f"(attempt {n}/5): HTTP 503"
        for n in (2, 3)
    ]
    assert TOKEN not in err


def test_put_retry_lines_go_above_the_progress_bar(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_file: Callable[..., Path],
    backend: FakeBackend,
) -> None:
    source = make_file(MIB, "video.mp4")
    backend.storage.inject(Status(503))
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", backend.base_url)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("STORAGE_RETRY_BACKOFF_S", "0")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = _TTYStringIO()
    monkeypatch.setattr(sys, "stderr", terminal)

    status = cli.main(["put", str(source), "videos/V-1/S-1/JOB-1/video.mp4"])

    assert status == 0
    lines = terminal.getvalue().split("\n")
    retry = next(i for i, line in enumerate(lines) if "retrying in" in line)
    # The retry stands on a line of its own, the bar goes on below it.
    assert lines[retry].startswith("ctrlupload: PUT ")
    assert lines[retry].endswith(": retrying in 0.0 s (attempt 2/5): HTTP 503")
    assert "100.0% 1.0/1.0 MiB" in lines[retry + 1]
    assert terminal.getvalue().endswith("\n")


@pytest.mark.parametrize(
    ("env", "said"),
    [
        (
            {"BACKEND_BASE_URL": "http://backend:8080"},
            "BACKEND_BASE_URL is set but STORAGE_PROVIDER is local (the default)",
        ),
        (
            {
                "STORAGE_PROVIDER": "local",
                "BACKEND_BASE_URL": "http://backend:8080",
                "BACKEND_SERVICE_TOKEN": "tok-123456",
            },
            "BACKEND_BASE_URL and BACKEND_SERVICE_TOKEN are set but STORAGE_PROVIDER=local",
        ),
    ],
    ids=["default-provider", "explicit-local"],
)
def test_put_warns_when_backend_settings_are_set_but_the_provider_is_local(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    env: dict[str, str],
    said: str,
) -> None:
    source = make_file(100, "thumb.jpg")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STORAGE_LOCAL_ROOT", str(cli_env / "store"))

    status = cli.main(["put", str(source), "videos/V-1/S-1/JOB-1/thumb.jpg"])

    out, err = capsys.readouterr()
    assert status == 0
    assert out.startswith("file://")
    assert err == (
        f"ctrlupload: warning: {said}; set STORAGE_PROVIDER=backend_presigned to use the backend\n"
    )
    assert "tok-123456" not in err


# -- misc ------------------------------------------------------------------------------


def test_python_m_ctrlupload_version_prints_the_package_version(tmp_path: Path) -> None:
    done = _run_cli("--version", cwd=tmp_path, env=_settings_free_env())

    assert done.returncode == 0
    assert done.stdout == f"ctrlupload {ctrlupload.__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([])

    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_serve_s3_store_without_a_bucket_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    done = _run_cli("serve", "--port", "0", "--store", "s3", cwd=tmp_path, env=_settings_free_env())

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "ctrlupload: error: cannot start the backend: "
        "the s3 store needs a bucket (--s3-bucket / STORAGE_S3_BUCKET)\n"
    )


def test_serve_signing_secret_from_a_file_or_the_environment_survives_a_restart(
    tmp_path: Path,
) -> None:
    secret = "s" * 40
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    key = "videos/V-CLI/S-1/JOB-5/thumb.jpg"
    args = ("--port", "0", "--signing-secret-file", str(secret_file))
    # A data dir of its own each time: the key must come from the flag or the variable.
    with ServeProcess(tmp_path / "one", env=_settings_free_env(), cwd=tmp_path, args=args) as one:
        assert one.token is not None
        presign = presign_put(one.base_url, one.token, key, "image/jpeg", 3)
        first_base = one.base_url
    assert not (tmp_path / "one" / "signing.key").exists()
    env = _settings_free_env(CTRLUPLOAD_SIGNING_SECRET=secret)
    with ServeProcess(tmp_path / "two", env=env, cwd=tmp_path) as two:
        # The host is not signed: the URL works against the new server's address.
        url = presign["upload_url"].replace(first_base, two.base_url, 1)
        stored = requests.put(url, data=b"jpg", headers=presign["headers"], timeout=10)
        assert stored.status_code == 200, stored.text
        assert two.stop() == 0


def test_serve_refuses_a_short_signing_secret(tmp_path: Path) -> None:
    done = _run_cli(
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
        env=_settings_free_env(CTRLUPLOAD_SIGNING_SECRET="short"),
    )
    assert done.returncode == 1
    assert "CTRLUPLOAD_SIGNING_SECRET is 5 bytes; it needs at least 32" in done.stderr
    assert "short" not in done.stderr.replace("is 5 bytes", "")
    assert "Traceback" not in done.stderr


#: Each numeric flag of serve: values below and past its bounds, and the largest it takes.
_SERVE_BOUNDS = [
    ("--port", "-1", "65536", "65535"),
    ("--url-expiry-s", "0", "604801", "604800"),
    ("--max-put-bytes", "0", str(5 * 1024**4 + 1), str(5 * 1024**4)),
    ("--max-object-bytes", "0", str(5 * 1024**4 + 1), str(5 * 1024**4)),
    ("--min-part-bytes", "0", str(5 * 1024**3 + 1), str(5 * 1024**3)),
    ("--part-bytes", "0", str(5 * 1024**3 + 1), str(5 * 1024**3)),
    ("--threads", "0", "4097", "4096"),
    ("--max-connections", "0", "1000001", "1000000"),
    ("--backlog", "0", "100000000000000000000", "65535"),
    ("--header-timeout-s", "0", "1e300", "86400"),
    ("--idle-timeout-s", "0", "1e300", "86400"),
    ("--shutdown-timeout-s", "-0.5", "1e300", "86400"),
]


@pytest.mark.parametrize(
    ("flag", "too_small", "too_large", "largest"),
    _SERVE_BOUNDS,
    ids=[bounds[0] for bounds in _SERVE_BOUNDS],
)
def test_serve_numeric_flags_out_of_bounds_are_usage_errors(
    capsys: pytest.CaptureFixture[str], flag: str, too_small: str, too_large: str, largest: str
) -> None:
    parser = cli._parser()

    for value in (too_small, too_large, "x"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["serve", flag, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"ctrlupload serve: error: argument {flag}: '{value}' " in err
        assert "Traceback" not in err
    args = parser.parse_args(["serve", flag, largest])
    assert float(getattr(args, _dest(parser, flag))) == float(largest)


def _dest(parser: Any, flag: str) -> str:
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return next(a.dest for a in serve._actions if flag in a.option_strings)


def test_serve_with_a_huge_backlog_exits_2_without_a_traceback(tmp_path: Path) -> None:
    done = _run_cli(
        "serve", "--port", "0", "--backlog", str(2**70), cwd=tmp_path, env=_settings_free_env()
    )

    assert done.returncode == 2
    assert done.stdout == ""
    assert "argument --backlog: " in done.stderr
    assert "Traceback" not in done.stderr


def test_put_no_overwrite_refuses_an_existing_object_through_the_reference_server(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_file: Callable[..., Path],
    reference_server: ReferenceServer,
) -> None:
    first = make_file(1000, "first.mp4")
    second = make_file(2000, "second.mp4")
    key = "videos/V-1/S-1/JOB-1/video.mp4"
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", reference_server.base_url)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", reference_server.token)

    assert cli.main(["put", "--no-overwrite", str(first), key]) == 0
    capsys.readouterr()
    status = cli.main(["put", "--no-overwrite", str(second), key])

    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert "an object already exists at" in err and err.count("\n") == 1
    stored = reference_server.config.data_dir / "objects" / key
    assert stored.read_bytes() == first.read_bytes()
