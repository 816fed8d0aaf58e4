"""LocalStorageProvider: atomic writes under a root, the same key rules, errors and progress."""

import hashlib
import os
import threading
from pathlib import Path

import pytest

from ctrlupload import (
    InvalidKeyError,
    LocalStorageProvider,
    Settings,
    SourceFileError,
    StorageError,
    UploadTooLargeError,
    get_storage_provider,
)
from tests.conftest import RecordingProgress

KEY = "videos/V-001/S-001/JOB-123/video.mp4"


@pytest.fixture
def local(tmp_path: Path) -> LocalStorageProvider:
    return LocalStorageProvider(Settings(storage_local_root=tmp_path / "root"))


def test_put_file_writes_under_the_root_with_progress(local, make_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = make_file(3 * 1024 * 1024 + 7)
    progress = RecordingProgress()
    result = local.put_file(source, KEY, progress=progress)
    stored = tmp_path / "root" / KEY
    assert stored.read_bytes() == source.read_bytes()
    assert result.size_bytes == source.stat().st_size
    assert result.content_type == "video/mp4"
    assert result.etag == f'"{hashlib.md5(source.read_bytes()).hexdigest()}"'
    assert result.url == stored.absolute().as_uri()
    progress.assert_honest(result.size_bytes)


def test_stored_files_get_ordinary_permissions(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    try:
        local.put_object(b"x", "a/b.jpg")
    finally:
        os.umask(old)
    assert (tmp_path / "root" / "a" / "b.jpg").stat().st_mode & 0o777 == 0o644


def test_put_object_overwrites_atomically_and_leaves_no_temp_files(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local.put_object(b"old", "a/b.srt")
    local.put_object(b"new contents", "a/b.srt")
    folder = tmp_path / "root" / "a"
    assert (folder / "b.srt").read_bytes() == b"new contents"
    assert sorted(p.name for p in folder.iterdir()) == ["b.srt"]


def test_zero_byte_object(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    progress = RecordingProgress()
    result = local.put_object(b"", "a/empty.srt", progress=progress)
    assert (tmp_path / "root" / "a" / "empty.srt").read_bytes() == b""
    assert result.etag == '"d41d8cd98f00b204e9800998ecf8427e"'
    assert progress.calls == [(0, 0)]


def test_failure_mid_write_keeps_the_old_object_and_no_temp(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local.put_object(b"previous", KEY)

    def explode(done: int, total: int) -> None:
        if done > 0:
            raise RuntimeError("renderer cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        local.put_object(os.urandom(5 * 1024 * 1024), KEY, progress=explode)
    folder = (tmp_path / "root" / KEY).parent
    assert (folder / "video.mp4").read_bytes() == b"previous"
    assert [p.name for p in folder.iterdir()] == ["video.mp4"]


def test_same_key_rules_as_the_backend(local) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidKeyError):
        local.put_object(b"x", "../escape.mp4")
    with pytest.raises(InvalidKeyError):
        local.delete("/abs")


def test_size_limit_applies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = LocalStorageProvider(Settings(storage_local_root=tmp_path, video_max_upload_bytes=10))
    with pytest.raises(UploadTooLargeError, match="exceeds limit"):
        local.put_object(b"x" * 11, "a/b.bin")
    assert not (tmp_path / "a").exists()


def test_missing_source_is_a_source_error(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceFileError, match="not found"):
        local.put_file(tmp_path / "absent.mp4", KEY)


def test_unwritable_root_is_a_storage_upload_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    local = LocalStorageProvider(Settings(storage_local_root=blocker))
    with pytest.raises(StorageError, match="Could not write under"):
        local.put_object(b"x", "a/b.bin")


def test_delete_is_idempotent(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local.put_object(b"x", KEY)
    local.delete(KEY)
    local.delete(KEY)
    assert not (tmp_path / "root" / KEY).exists()


def test_get_url_prefers_the_public_base_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = LocalStorageProvider(
        Settings(storage_local_root=tmp_path, storage_public_base_url="https://cdn.test")
    )
    assert local.get_url(KEY) == f"https://cdn.test/{KEY}"


def test_threads_sharing_one_local_provider_write_their_own_bodies(local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bodies = {f"t/{i}.bin": os.urandom(64 * 1024 + i) for i in range(32)}
    threads = [
        threading.Thread(target=local.put_object, args=(body, key)) for key, body in bodies.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key, body in bodies.items():
        assert (tmp_path / "root" / key).read_bytes() == body


def test_closed_provider_refuses_work(local) -> None:  # type: ignore[no-untyped-def]
    with local:
        pass
    with pytest.raises(StorageError, match="closed"):
        local.put_object(b"x", "a/b")


def test_local_is_the_default_provider(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STORAGE_PROVIDER", raising=False)
    assert isinstance(get_storage_provider(), LocalStorageProvider)
