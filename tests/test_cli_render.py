"""``ctrlupload render`` and ``examples/render_upload.py``.

The reference backend serves in this process; the command runs in-process through
:func:`ctrlupload._cli.main` (stdout, stderr and exit status), or as a child process
where a real signal (Ctrl-C) or a real exit code matters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import _cli as cli
from ctrlupload.server import ReferenceServer, ServerConfig
from tests.conftest import wait_until
from tests.support.serve_process import REPO_ROOT, child_env
from tests.support.wsgi_host import WsgiHost

_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_")
_TIMEOUT_S = 60
MIB = 1024 * 1024
_KEY_DIR = "videos/V-1/S-1/JOB-7"
_LINE = re.compile(r"^(?P<asset>\w+) +(?P<key>videos/\S+)  (?P<size>.+?)  (?P<url>\S+)$")


class _TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ctrlupload setting in ``os.environ``, and ``tmp_path`` as the working dir."""
    for name in list(os.environ):
        if name.startswith(_SETTING_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def render_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "render"
    folder.mkdir()
    files = {
        "video": folder / "out.mp4",
        "subtitles": folder / "out.srt",
        "thumbnail": folder / "out.jpg",
    }
    files["video"].write_bytes(os.urandom(3 * MIB + 11))
    files["subtitles"].write_bytes(b"1\n00:00:00,000 --> 00:00:01,000\nhi\n")
    files["thumbnail"].write_bytes(b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9")
    return files


def _render_args(files: dict[str, Path], *extra: str) -> list[str]:
    """``render V-1 S-1 JOB-7`` with a ``--video``/``--subtitles``/``--thumbnail`` each."""
    flags = [part for asset, path in files.items() for part in (f"--{asset}", str(path))]
    return ["render", "V-1", "S-1", "JOB-7", *flags, *extra]


def _use_backend(monkeypatch: pytest.MonkeyPatch, base_url: str, token: str, **extra: str) -> None:
    values = {
        "STORAGE_PROVIDER": "backend_presigned",
        "BACKEND_BASE_URL": base_url,
        "BACKEND_SERVICE_TOKEN": token,
        **extra,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)


# -- success ---------------------------------------------------------------------------


def test_render_uploads_the_three_files_and_prints_a_line_each(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    reference_server: ReferenceServer,
    render_files: dict[str, Path],
) -> None:
    _use_backend(monkeypatch, reference_server.base_url, reference_server.token)

    status = cli.main(_render_args(render_files))

    out, err = capsys.readouterr()
    assert status == 0, err
    assert err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["video", "subtitles", "thumbnail"]
    assert lines[0] == (
        f"video      {_KEY_DIR}/video.mp4  3.0 MiB  "
        f"{reference_server.base_url}/files/{_KEY_DIR}/video.mp4"
    )
    for line, (asset, name) in zip(
        lines,
        {"video": "video.mp4", "subtitles": "subtitles.srt", "thumbnail": "thumb.jpg"}.items(),
        strict=True,
    ):
        match = _LINE.match(line)
        assert match, line
        assert match["asset"] == asset
        assert match["key"] == f"{_KEY_DIR}/{name}"
        assert match["url"] == f"{reference_server.base_url}/files/{_KEY_DIR}/{name}"
        row = reference_server.db.get(match["key"])
        assert row is not None
        data = render_files[asset].read_bytes()
        assert row.size_bytes == len(data)
        assert row.etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert "bytes  " in lines[1]  # a small file reads in bytes, not "0.0 MiB"


def test_render_json_prints_the_results_as_json(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    reference_server: ReferenceServer,
    render_files: dict[str, Path],
) -> None:
    _use_backend(monkeypatch, reference_server.base_url, reference_server.token)
    del render_files["thumbnail"]

    status = cli.main(_render_args(render_files, "--json"))

    out, err = capsys.readouterr()
    assert status == 0, err
    answer = json.loads(out)
    assert set(answer) == {"video", "subtitles", "thumbnail"}
    assert answer["thumbnail"] is None
    video = answer["video"]
    assert video["key"] == f"{_KEY_DIR}/video.mp4"
    assert video["url"] == f"{reference_server.base_url}/files/{_KEY_DIR}/video.mp4"
    assert video["size_bytes"] == 3 * MIB + 11
    assert video["content_type"] == "video/mp4"
    assert answer["subtitles"]["content_type"] == "application/x-subrip"
    assert reference_server.db.get(f"{_KEY_DIR}/thumb.jpg") is None


def test_render_draws_one_progress_bar_for_the_whole_render_on_a_terminal(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    render_files: dict[str, Path],
) -> None:
    monkeypatch.setenv("STORAGE_LOCAL_ROOT", str(cli_env / "store"))
    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = _TTYStringIO()
    monkeypatch.setattr(sys, "stderr", terminal)

    status = cli.main(_render_args(render_files))

    assert status == 0
    drawn = terminal.getvalue()
    total = sum(path.stat().st_size for path in render_files.values())
    assert drawn.startswith("\rJOB-7 [")
    assert drawn.endswith(f"] 100.0% {total / MIB:.1f}/{total / MIB:.1f} MiB\n")
    assert all(f"/{total / MIB:.1f} MiB" in frame for frame in drawn.split("\r")[1:])
    assert (cli_env / "store" / _KEY_DIR / "thumb.jpg").is_file()


def test_render_without_the_video_flag_is_a_usage_error(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["render", "V", "S", "J"])

    assert exited.value.code == 2
    assert "the following arguments are required: --video" in capsys.readouterr().err


# -- failure ---------------------------------------------------------------------------


@dataclass
class _Gate:
    """A WSGI wrapper around the reference backend that answers the video's PUTs
    itself (``status``, with ``Retry-After`` when given) and lets the rest through."""

    status: str
    retry_after: str | None = None
    refused: threading.Event = field(default_factory=threading.Event)
    passed: list[str] = field(default_factory=list)
    app: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] == "PUT" and path.endswith("/video.mp4"):
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            headers = [("Content-Type", "application/xml"), ("Content-Length", "0")]
            if self.retry_after is not None:
                headers.append(("Retry-After", self.retry_after))
            start_response(self.status, headers)
            self.refused.set()
            return [b""]
        answer = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] == "PUT":
            self.passed.append(path)
        return answer


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Callable[..., tuple[ReferenceServer, str, _Gate]]]:
    """The reference backend behind a :class:`_Gate`, which its upload URLs point at."""
    with_servers: list[Any] = []

    def make(status: str, retry_after: str | None = None) -> tuple[ReferenceServer, str, _Gate]:
        gate = _Gate(status, retry_after)
        host = WsgiHost(gate).__enter__()
        with_servers.append(host)
        server = ReferenceServer(
            ServerConfig(port=0, data_dir=tmp_path / "backend", public_url=host.base_url)
        ).__enter__()
        with_servers.append(server)
        gate.app = server.app
        return server, host.base_url, gate

    yield make
    for server in reversed(with_servers):
        server.__exit__(None, None, None)


def _stored_objects(server: ReferenceServer) -> list[Path]:
    objects = server.config.data_dir / "objects"
    return [path for path in objects.rglob("*") if path.is_file()] if objects.exists() else []


def test_a_failed_asset_fails_the_render_and_nothing_is_kept(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    gated: Callable[..., tuple[ReferenceServer, str, _Gate]],
    render_files: dict[str, Path],
) -> None:
    server, url, _ = gated("403 Forbidden")
    _use_backend(monkeypatch, url, server.token)

    status = cli.main(_render_args(render_files))

    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert err.startswith(f"ctrlupload: error: Storage upload failed for '{_KEY_DIR}/video.mp4': ")
    assert "403" in err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert server.db.all() == []
    assert _stored_objects(server) == []


def test_render_shows_each_retry_on_stderr(
    cli_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    gated: Callable[..., tuple[ReferenceServer, str, _Gate]],
    render_files: dict[str, Path],
) -> None:
    server, url, _ = gated("503 Service Unavailable")
    _use_backend(
        monkeypatch, url, server.token, STORAGE_RETRY_ATTEMPTS="3", STORAGE_RETRY_BACKOFF_S="0"
    )

    status = cli.main(_render_args(render_files))

    _, err = capsys.readouterr()
    assert status == 1
    retries = [line for line in err.splitlines() if "retrying in" in line]
    video_url = f"{url}/upload/{_KEY_DIR}/video.mp4"
    # The URL is shown without its query string (the signature).
    shown = re.escape(video_url) + r"(\?\[redacted\])?"
    assert len(retries) == 2, err
    for attempt, line in enumerate(retries, start=2):
        expected = rf"ctrlupload: PUT {shown}: retrying in 0\.0 s \(attempt {attempt}/3\): HTTP 503"
        assert re.fullmatch(expected, line), line
    assert "signature" not in err
    assert err.splitlines()[-1].startswith("ctrlupload: error: ")


def test_ctrl_c_cancels_the_render_removes_what_was_stored_and_exits_130(
    tmp_path: Path,
    gated: Callable[..., tuple[ReferenceServer, str, _Gate]],
    render_files: dict[str, Path],
) -> None:
    # The video's PUT is answered 503 with a minute's Retry-After: the command sits in
    # the retry wait, the other two assets in storage, until Ctrl-C.
    server, url, gate = gated("503 Service Unavailable", retry_after="60")
    env = _child_env(
        STORAGE_PROVIDER="backend_presigned",
        BACKEND_BASE_URL=url,
        BACKEND_SERVICE_TOKEN=server.token,
        STORAGE_RETRY_BACKOFF_MAX_S="60",
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "ctrlupload", *_render_args(render_files)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    waiting = threading.Event()

    def read_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            lines.append(line)
            if "retrying in" in line:
                waiting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        # The retry line is logged just before the wait starts.
        assert waiting.wait(_TIMEOUT_S), lines
        assert wait_until(lambda: len(gate.passed) == 2, timeout_s=_TIMEOUT_S), gate.passed
        assert len(_stored_objects(server)) == 2
        child.send_signal(signal.SIGINT)
        child.wait(_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    reader.join(_TIMEOUT_S)
    assert child.stdout is not None and child.stderr is not None
    out = child.stdout.read()
    child.stdout.close()
    child.stderr.close()
    err = "".join(lines)

    assert child.returncode == 130, err
    assert out == ""
    assert "Traceback" not in err
    assert "retrying in 60.0 s (attempt 2/5): HTTP 503" in err
    assert "ctrlupload: interrupted; cancelling the upload" in err
    assert err.splitlines()[-1] == "ctrlupload: cancelled"
    # The subtitles and thumbnail had reached storage; they are gone, and nothing was
    # recorded.
    assert _stored_objects(server) == [], err
    assert server.db.all() == []


# -- the example -----------------------------------------------------------------------

_EXAMPLE = REPO_ROOT / "examples" / "render_upload.py"


def _child_env(**overrides: str) -> dict[str, str]:
    drop = [name for name in os.environ if name.startswith(_SETTING_PREFIXES)]
    return child_env(overrides, drop=drop)


def _run_example(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(_EXAMPLE)],
        cwd=cwd,
        env=_child_env(**env),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"STORAGE_PROVIDER": "bogus"},
            "configuration error: Invalid setting STORAGE_PROVIDER",
        ),
        (
            {"STORAGE_PROVIDER": "backend_presigned"},
            "configuration error: BACKEND_BASE_URL must be set for "
            "STORAGE_PROVIDER=backend_presigned",
        ),
    ],
    ids=["bogus-provider", "no-base-url"],
)
def test_the_example_with_a_bad_configuration_says_so_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    done = _run_example(tmp_path, **env)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "storage").exists()


def test_the_example_uploads_a_render_with_the_local_provider(tmp_path: Path) -> None:
    done = _run_example(tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "provider: LocalStorageProvider(root='storage')"
    assert [line.split()[0] for line in lines[1:4]] == ["video", "subtitles", "thumbnail"]
    stored = sorted(path.name for path in (tmp_path / "storage").rglob("*") if path.is_file())
    assert stored == ["subtitles.srt", "thumb.jpg", "video.mp4"]
