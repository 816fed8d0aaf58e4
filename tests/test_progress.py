"""ctrlupload.progress: the tqdm bar and the log lines, fed by hand and by real uploads."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import (
    BackendPresignedStorageProvider,
    LocalStorageProvider,
    Settings,
    StorageUploadError,
    UploadCancelled,
    upload_render,
)
from ctrlupload.progress import LogProgress, TqdmProgress
from tests.conftest import TOKEN
from tests.support.servers import COMPLETE_PATH, FakeBackend, Status

MIB = 1024 * 1024
KEY = "videos/V-001/S-001/JOB-123/video.mp4"
REPO = Path(__file__).resolve().parents[1]

MakeFile = Callable[..., Path]


def text_bar(label: str = "video", **kwargs: Any) -> tuple[TqdmProgress, io.StringIO]:
    """A bar that draws into a string, every update (no tqdm rate limit)."""
    out = io.StringIO()
    return TqdmProgress(label, file=out, mininterval=0, **kwargs), out


def assert_full_and_green(progress: TqdmProgress, total: int) -> None:
    bar = progress.bar
    assert bar is not None
    assert progress.closed
    assert bar.total == total
    assert bar.n == total
    assert bar.colour == "green"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[str]]]:
    """The INFO messages on the ``ctrlupload`` logger that start with ``label``."""
    caplog.set_level(logging.INFO, logger="ctrlupload")

    def lines(label: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "ctrlupload" and r.getMessage().startswith(f"{label}:")
        ]

    yield lines


# --------------------------------------------------------------------- the extra


def test_importing_the_module_needs_no_tqdm_but_the_bar_names_the_extra() -> None:
    script = (
        "import sys\n"
        "sys.modules['tqdm'] = None\n"  # import tqdm now fails, as if not installed
        "from ctrlupload import StorageConfigError\n"
        "from ctrlupload.progress import LogProgress, TqdmProgress\n"
        "LogProgress()\n"
        "try:\n"
        "    TqdmProgress()\n"
        "except StorageConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "pip install 'ctrlupload[progress]'" in done.stdout


# --------------------------------------------------------------------- TqdmProgress


def test_bar_appears_with_the_total_counts_in_mib_and_closes_green() -> None:
    progress, out = text_bar()
    assert progress.bar is None
    total = 8 * MIB
    for done in range(0, total, MIB):
        progress(done, total)
        assert progress.bar.total == total
        assert not progress.closed
    progress(total, total)

    assert_full_and_green(progress, total)
    text = out.getvalue()
    assert "video:   0%" in text
    assert "0.0/8.0 MiB" in text
    assert "3.0/8.0 MiB" in text
    assert "video: 100%" in text
    assert re.search(r"8\.0/8\.0 MiB \[[^\]]* [\d.]+ [KMG]iB/s\]", text)
    assert "\x1b[32m" in text  # the final draw is green
    assert " MB" not in text and "MB/s" not in text


def test_sizes_read_in_the_unit_of_the_total() -> None:
    progress, out = text_bar("srt")
    progress(0, 700)
    progress(700, 700)
    progress_k, out_k = text_bar("jpg")
    progress_k(0, 30_000)
    progress_k(30_000, 30_000)

    assert "0/700 B" in out.getvalue()
    assert "700/700 B" in out.getvalue()
    assert "29.3/29.3 KiB" in out_k.getvalue()


def test_zero_byte_upload_ends_in_a_closed_full_bar() -> None:
    progress, out = text_bar("empty")
    progress(0, 0)

    assert_full_and_green(progress, 1)  # drawn as one step, full
    assert "empty: 100%" in out.getvalue()
    assert "0/0 B" in out.getvalue()


def test_on_end_true_without_any_report_shows_a_full_bar() -> None:
    progress, out = text_bar("quiet")
    progress.on_end(True)

    assert_full_and_green(progress, 1)
    assert "quiet: 100%" in out.getvalue()


def test_failure_closes_the_bar_red_where_it_stopped() -> None:
    progress, out = text_bar()
    progress(0, 4 * MIB)
    progress(MIB, 4 * MIB)
    progress.on_end(False)

    bar = progress.bar
    assert progress.closed
    assert bar.n == MIB
    assert bar.colour == "red"
    assert "\x1b[31m" in out.getvalue()
    assert "\x1b[32m" not in out.getvalue()


def test_failure_before_the_first_report_draws_nothing() -> None:
    progress, out = text_bar()
    progress.on_end(False)

    assert progress.bar is None
    assert out.getvalue() == ""


def test_on_end_after_the_bar_closed_changes_nothing() -> None:
    progress, _ = text_bar()
    progress(0, 10)
    progress(10, 10)
    bar = progress.bar
    progress.on_end(True)
    progress.on_end(False)

    assert progress.bar is bar
    assert_full_and_green(progress, 10)


def test_a_second_upload_gets_a_new_bar() -> None:
    progress, _ = text_bar()
    progress(0, 10)
    progress(10, 10)
    first = progress.bar
    progress(0, 20)
    assert progress.bar is not first
    assert not progress.closed
    progress(20, 20)

    assert first.n == 10
    assert_full_and_green(progress, 20)


def test_context_manager_closes_the_bar_and_an_error_turns_it_red() -> None:
    with text_bar()[0] as progress:
        progress(0, 10)
        progress(4, 10)
    assert progress.closed
    assert progress.bar.n == 4
    assert progress.bar.colour != "green"

    with pytest.raises(KeyError), text_bar()[0] as failing:
        failing(0, 10)
        raise KeyError("boom")
    assert failing.closed
    assert failing.bar.colour == "red"


def test_reports_from_many_threads_land_on_one_bar() -> None:
    progress, _ = text_bar()
    total = 8 * 1000
    progress(0, total)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def report(offset: int) -> None:
        barrier.wait()
        try:
            for step in range(1, 1000):
                progress(step * 8 - offset, total)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert progress.bar.n == total - 8
    assert not progress.closed
    progress(total, total)
    assert_full_and_green(progress, total)


def test_tqdm_kwargs_are_passed_through() -> None:
    progress, _ = text_bar(leave=False, ncols=60)
    progress(0, 10)
    assert progress.bar.leave is False
    assert progress.bar.ncols == 60
    assert progress.bar.desc == "video"


# --------------------------------------------------------------------- LogProgress


def test_log_lines_come_at_most_every_every_s(log_lines: Callable[[str], list[str]]) -> None:
    clock = Clock()
    progress = LogProgress(every_s=5.0, label="render", clock=clock)
    total = 200 * MIB
    progress(0, total)
    for second in range(1, 21):  # 2 MiB every half second, for 10 s
        clock.now += 0.5
        progress(second * 2 * MIB, total)

    assert log_lines("render") == [
        "render: 20.0 MiB of 200.0 MiB (10%), 4.0 MiB/s",
        "render: 40.0 MiB of 200.0 MiB (20%), 4.0 MiB/s",
    ]


def test_log_rate_is_over_the_last_interval(log_lines: Callable[[str], list[str]]) -> None:
    clock = Clock()
    progress = LogProgress(every_s=1.0, label="up", clock=clock)
    progress(0, 100 * MIB)
    clock.now += 1
    progress(10 * MIB, 100 * MIB)
    clock.now += 2
    progress(12 * MIB, 100 * MIB)

    assert log_lines("up") == [
        "up: 10.0 MiB of 100.0 MiB (10%), 10.0 MiB/s",
        "up: 12.0 MiB of 100.0 MiB (12%), 1.0 MiB/s",
    ]


def test_log_always_ends_with_done(log_lines: Callable[[str], list[str]]) -> None:
    clock = Clock()
    progress = LogProgress(every_s=60, label="video", clock=clock)
    progress(0, 10 * MIB)
    clock.now += 2
    progress(5 * MIB, 10 * MIB)
    clock.now += 2
    progress(10 * MIB, 10 * MIB)
    progress.on_end(True)  # the final report already wrote the closing line

    assert log_lines("video") == ["video: done, 10.0 MiB in 4.0 s (2.5 MiB/s)"]


def test_log_ends_with_failed_at(log_lines: Callable[[str], list[str]]) -> None:
    clock = Clock()
    progress = LogProgress(every_s=60, label="video", clock=clock)
    progress(0, 200 * MIB)
    clock.now += 3
    progress(12 * MIB, 200 * MIB)
    progress.on_end(False)
    progress.on_end(False)

    assert log_lines("video") == ["video: failed at 12.0 MiB of 200.0 MiB (6%) after 3.0 s"]


def test_log_failure_before_any_byte_and_zero_byte_done(
    log_lines: Callable[[str], list[str]],
) -> None:
    LogProgress(label="a", clock=Clock()).on_end(False)
    empty = LogProgress(label="b", clock=Clock())
    empty(0, 0)
    empty.on_end(True)

    assert log_lines("a") == ["a: failed before the first byte was sent"]
    assert log_lines("b") == ["b: done, 0 B in 0.0 s"]


def test_log_progress_goes_to_the_given_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="render.job")
    progress = LogProgress(label="x", logger=logging.getLogger("render.job"), clock=Clock())
    progress(0, 1)
    progress(1, 1)

    assert [(r.name, r.levelno) for r in caplog.records] == [("render.job", logging.INFO)]


def test_the_same_log_progress_follows_a_second_upload(
    log_lines: Callable[[str], list[str]],
) -> None:
    clock = Clock()
    progress = LogProgress(label="x", clock=clock)
    progress(0, 1024)
    clock.now += 1
    progress(1024, 1024)
    progress(0, 2048)
    clock.now += 1
    progress(2048, 2048)

    assert log_lines("x") == [
        "x: done, 1.0 KiB in 1.0 s (1.0 KiB/s)",
        "x: done, 2.0 KiB in 1.0 s (2.0 KiB/s)",
    ]


# --------------------------------------------------------------------- real uploads


def test_local_put_file_fills_the_bar(tmp_path: Path, make_file: MakeFile) -> None:
    storage = LocalStorageProvider(Settings(storage_local_root=tmp_path / "root"))
    source = make_file(3 * MIB + 5)
    progress, out = text_bar()

    storage.put_file(source, KEY, progress=progress)

    assert_full_and_green(progress, 3 * MIB + 5)
    assert "3.0/3.0 MiB" in out.getvalue()


def test_local_zero_byte_put_file_ends_in_a_full_bar(tmp_path: Path) -> None:
    storage = LocalStorageProvider(Settings(storage_local_root=tmp_path / "root"))
    source = tmp_path / "empty.srt"
    source.write_bytes(b"")
    progress, _ = text_bar()

    storage.put_file(source, "a/b.srt", progress=progress)

    assert_full_and_green(progress, 1)


@pytest.fixture
def reference_storage(reference_server: Any) -> Iterator[BackendPresignedStorageProvider]:
    """backend_presigned on the reference backend, multipart from 5 MiB, 3 parts at once."""
    settings = Settings.from_mapping(
        {
            "STORAGE_PROVIDER": "backend_presigned",
            "BACKEND_BASE_URL": reference_server.base_url,
            "BACKEND_SERVICE_TOKEN": reference_server.token,
            "STORAGE_MULTIPART_THRESHOLD_BYTES": 5 * MIB,
            "STORAGE_MULTIPART_PART_BYTES": 5 * MIB,
            "STORAGE_MULTIPART_CONCURRENCY": 3,
        }
    )
    with BackendPresignedStorageProvider(settings) as storage:
        yield storage


@pytest.mark.parametrize("size", [2 * MIB + 3, 12 * MIB + 1], ids=["single-put", "multipart"])
def test_backend_presigned_put_file_fills_the_bar(
    reference_storage: BackendPresignedStorageProvider, make_file: MakeFile, size: int
) -> None:
    source = make_file(size)
    progress, out = text_bar()

    reference_storage.put_file(source, KEY, progress=progress)

    assert_full_and_green(progress, size)
    assert f"{size / MIB:.1f}/{size / MIB:.1f} MiB" in out.getvalue()


def test_backend_presigned_log_lines_hold_no_secret(
    reference_server: Any,
    reference_storage: BackendPresignedStorageProvider,
    make_file: MakeFile,
    log_lines: Callable[[str], list[str]],
) -> None:
    size = 12 * MIB + 1
    progress = LogProgress(every_s=0, label="video")

    result = reference_storage.put_file(make_file(size), KEY, progress=progress)

    lines = log_lines("video")
    assert len(lines) >= 2
    assert re.fullmatch(r"video: done, 12\.0 MiB in \d+\.\d s \(\d+\.\d [KMG]iB/s\)", lines[-1])
    assert all(re.fullmatch(r"video: \d+\.\d MiB of 12\.0 MiB \(\d+%\).*", x) for x in lines[:-1])
    text = "\n".join(lines)
    for secret in (reference_server.token, "Signature", "signature=", "?", result.url):
        assert secret not in text


def test_a_failed_upload_turns_the_bar_red_and_logs_failed_at(
    make_provider: Callable[..., BackendPresignedStorageProvider],
    backend: FakeBackend,
    make_file: MakeFile,
    log_lines: Callable[[str], list[str]],
) -> None:
    # The bytes are stored, then the backend refuses to record them: the upload fails.
    backend.inject(COMPLETE_PATH, Status(400))
    storage = make_provider()
    size = 2 * MIB
    bar, out = text_bar()
    log = LogProgress(every_s=60, label="video")

    class Both:
        def __call__(self, done: int, total: int) -> None:
            bar(done, total)
            log(done, total)

        def on_end(self, ok: bool) -> None:
            bar.on_end(ok)
            log.on_end(ok)

    with pytest.raises(StorageUploadError):
        storage.put_file(make_file(size), KEY, progress=Both())

    assert bar.closed
    assert bar.bar.n < size
    assert bar.bar.colour == "red"
    assert "\x1b[32m" not in out.getvalue()
    (line,) = log_lines("video")
    assert re.fullmatch(r"video: failed at \d\.\d MiB of 2\.0 MiB \(\d+%\) after \d+\.\d s", line)
    assert TOKEN not in line


def render_files(make_file: MakeFile) -> dict[str, Path]:
    return {
        "video": make_file(12 * MIB + 1, "video.mp4"),
        "subtitles": make_file(700, "subtitles.srt"),
        "thumbnail": make_file(30_000, "thumb.jpg"),
    }


def test_upload_render_draws_one_bar_for_the_whole_render(
    reference_storage: BackendPresignedStorageProvider,
    make_file: MakeFile,
    log_lines: Callable[[str], list[str]],
) -> None:
    files = render_files(make_file)
    total = sum(path.stat().st_size for path in files.values())
    bar, out = text_bar("render")
    log = LogProgress(every_s=60, label="render")

    class Both:
        def __call__(self, done: int, total: int) -> None:
            bar(done, total)
            log(done, total)

        def on_end(self, ok: bool) -> None:
            bar.on_end(ok)
            log.on_end(ok)

    upload_render(reference_storage, "V-001", "S-001", "JOB-1", progress=Both(), **files)

    assert_full_and_green(bar, total)
    assert "render: 100%" in out.getvalue()
    assert "12.0/12.0 MiB" in out.getvalue()
    (line,) = log_lines("render")
    assert line.startswith("render: done, 12.0 MiB in ")


def test_a_cancelled_upload_render_closes_the_bar_red(
    reference_storage: BackendPresignedStorageProvider,
    make_file: MakeFile,
    log_lines: Callable[[str], list[str]],
) -> None:
    files = render_files(make_file)
    cancel = threading.Event()
    bar, out = text_bar("render")
    log = LogProgress(every_s=60, label="render")

    class CancelMidway:
        def __call__(self, done: int, total: int) -> None:
            bar(done, total)
            log(done, total)
            if done >= MIB:
                cancel.set()

        def on_end(self, ok: bool) -> None:
            bar.on_end(ok)
            log.on_end(ok)

    with pytest.raises(UploadCancelled):
        upload_render(
            reference_storage,
            "V-001",
            "S-001",
            "JOB-1",
            progress=CancelMidway(),
            cancel=cancel,
            **files,
        )

    assert bar.closed
    assert MIB <= bar.bar.n < bar.bar.total
    assert bar.bar.colour == "red"
    assert "\x1b[32m" not in out.getvalue()
    (line,) = log_lines("render")
    assert line.startswith("render: failed at ")
