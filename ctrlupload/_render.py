"""A render's assets as one unit: :func:`upload_render`.

Seed §9: a render job stores ``video.mp4``, ``subtitles.srt`` and ``thumb.jpg`` under
``videos/{video_id}/{script_id}/{job_id}/``. This module uploads them concurrently and
all or nothing: the backend records none of them until every asset's bytes are in
storage, then all of them in one call (``complete-set``) where it offers that call, or
one by one where it does not (the seed's backends). If any asset fails, or the caller
cancels, the others are stopped and whatever was stored is deleted again.

Thread safety: :func:`upload_render` may be called from any number of threads with one
provider; each call has its own worker pool, stop event and progress total.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._errors import (
    InvalidKeyError,
    RenderUploadError,
    StorageConfigError,
    StorageUploadError,
    UploadCancelled,
)
from ._keys import RenderAsset, guess_content_type, render_asset_key
from ._units import format_rate, format_size
from .engine._engine import StagedUpload, StorageResult, check_size_limit
from .engine._streams import (
    CallbackFailed,
    ProgressCallback,
    ProgressTracker,
    SourceReader,
    open_source,
    report_end,
)
from .providers._base import BaseStorageProvider, EngineProvider, ProviderBase

__all__ = ["RenderUpload", "upload_render"]

logger = logging.getLogger("ctrlupload")

#: The assets of a render, in the order they are reported and recorded.
ASSETS: Final[tuple[RenderAsset, ...]] = ("video", "subtitles", "thumbnail")
_T = TypeVar("_T")
#: How often a retry wait looks at the caller's cancel event.
_CANCEL_POLL_S: Final = 0.05


@dataclass(frozen=True)
class RenderUpload:
    """What :func:`upload_render` stored: one :class:`StorageResult` per asset given.

    Attributes:
        video: The video.
        subtitles: The subtitles, or None if none were given.
        thumbnail: The thumbnail, or None if none was given.
    """

    video: StorageResult | None
    subtitles: StorageResult | None = None
    thumbnail: StorageResult | None = None

    def as_dict(self) -> dict[str, dict[str, Any] | None]:
        """A JSON-ready mapping of asset name to its result's fields (or None)."""
        return {
            asset: None if result is None else dataclasses.asdict(result)
            for asset, result in ((a, getattr(self, a)) for a in ASSETS)
        }


class _Stop(threading.Event):
    """Set when the render must stop: an asset failed, or the caller's event is set.

    It is what the assets' uploads check before each block and wait on between
    retries, so the caller's event stops them as promptly as in ``put_file``.
    """

    def __init__(self, caller: threading.Event | None) -> None:
        super().__init__()
        self._caller = caller

    def is_set(self) -> bool:
        return super().is_set() or (self._caller is not None and self._caller.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        if self._caller is None:
            return super().wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = _CANCEL_POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            super().wait(min(left, _CANCEL_POLL_S))
        return True

    @property
    def by_caller(self) -> bool:
        return self._caller is not None and self._caller.is_set()


class _RenderProgress:
    """One progress total over every asset; reaches it when the render is recorded."""

    def __init__(self, callback: ProgressCallback | None, sizes: Mapping[str, int]) -> None:
        self._tracker = ProgressTracker(sum(sizes.values()), callback)
        self._seen = dict.fromkeys(sizes, 0)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._tracker.start()

    def for_asset(self, asset: str) -> ProgressCallback:
        def report(done: int, total: int) -> None:
            with self._lock:
                delta = done - self._seen[asset]
                self._seen[asset] = max(done, self._seen[asset])
            self._tracker.add(delta)

        return report

    def finish(self) -> None:
        self._tracker.finish()


def upload_render(
    storage: BaseStorageProvider,
    video_id: str,
    script_id: str,
    job_id: str,
    *,
    video: str | os.PathLike[str],
    subtitles: str | os.PathLike[str] | None = None,
    thumbnail: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    max_workers: int = 3,
    overwrite: bool = True,
) -> RenderUpload:
    """Upload a render's files under ``videos/{video_id}/{script_id}/{job_id}/``.

    The assets upload concurrently. Nothing is recorded until every asset's bytes are
    in storage; then all are recorded together (``complete-set``, one transaction) or,
    with a backend that lacks that call, one by one. If an asset fails after its
    retries, the others stop and every asset already stored is deleted (best effort:
    what the cleanup did is noted on the error and logged).

    Args:
        storage: Any provider; ``backend_presigned`` and ``s3``/``minio`` record the
            set together, ``local`` writes the files.
        video_id: The video's id: non-empty, no ``/``, not ``.`` or ``..``.
        script_id: The script's id, under the same rules.
        job_id: The render job's id, under the same rules.
        video: The video file (``video.mp4``).
        subtitles: The subtitles file (``subtitles.srt``), if any.
        thumbnail: The thumbnail file (``thumb.jpg``), if any.
        progress: ``progress(bytes_done, bytes_total)`` over all assets together; see
            :class:`~ctrlupload.ProgressCallback` (its ``on_end`` is called once).
        cancel: Set it from any thread to stop the render; stored assets are deleted
            and :class:`~ctrlupload.UploadCancelled` is raised.
        max_workers: Assets uploaded at once (each may send several parts at once).
        overwrite: False to refuse replacing objects already at the render's keys, as
            for ``put_file``; the asset that finds one fails with a
            :class:`~ctrlupload.RenderUploadError` whose cause is the
            :class:`~ctrlupload.ObjectExistsError`, and the objects already there are
            left as they are.

    Returns:
        The stored assets.

    Raises:
        InvalidKeyError: An id breaks the key rules (before any network call).
        RenderUploadError: An asset failed; ``.asset`` names it, the message is that
            asset's own (the seed's text), and the original error is the cause.
        UploadCancelled: ``cancel`` was set.
    """
    try:
        result = _upload_render(
            storage,
            (video_id, script_id, job_id),
            {"video": video, "subtitles": subtitles, "thumbnail": thumbnail},
            progress,
            cancel,
            max_workers,
            overwrite,
        )
    except CallbackFailed as failed:  # the progress callback's own error, unchanged
        report_end(progress, False)
        raise failed.error from None
    except BaseException:
        report_end(progress, False)
        raise
    report_end(progress, True)
    return result


def _upload_render(
    storage: BaseStorageProvider,
    ids: tuple[str, str, str],
    files: Mapping[RenderAsset, str | os.PathLike[str] | None],
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
    max_workers: int,
    overwrite: bool,
) -> RenderUpload:
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise StorageConfigError(f"max_workers must be a positive int, not {max_workers!r}")
    if files["video"] is None:
        raise InvalidKeyError(render_asset_key(*ids, "video"), "a render needs its video")
    keys = {asset: render_asset_key(*ids, asset) for asset in ASSETS if files[asset] is not None}
    started = time.monotonic()
    with _Sources(keys, files) as sources:
        if isinstance(storage, ProviderBase):
            storage._check_open()
            limit = storage.settings.video_max_upload_bytes
            for asset, source in sources.items():
                try:
                    check_size_limit(source.key, source.size, limit)
                except StorageUploadError as error:
                    raise _render_error(asset, error) from error
        if cancel is not None and cancel.is_set():
            raise UploadCancelled(keys["video"])
        total = _RenderProgress(progress, {a: s.size for a, s in sources.items()})
        total.start()
        if isinstance(storage, EngineProvider):
            results = _staged_render(storage, sources, total, cancel, max_workers, overwrite)
        else:
            paths = {asset: files[asset] for asset in sources}
            results = _plain_render(storage, sources, paths, total, cancel, max_workers, overwrite)
        total.finish()
    size = sum(result.size_bytes for result in results.values())
    took = time.monotonic() - started
    logger.info(
        "uploaded render %s: %d assets, %s in %.2f s (%s)",
        "/".join(ids),
        len(results),
        format_size(size),
        took,
        format_rate(size, took),
    )
    return RenderUpload(**results)


class _Sources:
    """Every asset's file opened (and checked) before any network call."""

    def __init__(
        self,
        keys: Mapping[RenderAsset, str],
        files: Mapping[RenderAsset, str | os.PathLike[str] | None],
    ) -> None:
        self._keys = keys
        self._files = files
        self._open: dict[RenderAsset, SourceReader] = {}

    def __enter__(self) -> dict[RenderAsset, SourceReader]:
        try:
            for asset, key in self._keys.items():
                path = self._files[asset]
                assert path is not None
                try:
                    self._open[asset] = open_source(key, path)
                except StorageUploadError as error:
                    raise _render_error(asset, error) from error
        except BaseException:
            self.__exit__()
            raise
        return self._open

    def __exit__(self, *exc_info: object) -> None:
        for source in self._open.values():
            source.close()


def _render_error(asset: str, error: StorageUploadError) -> RenderUploadError:
    if isinstance(error, RenderUploadError):
        return error
    return RenderUploadError(
        error.key,
        error.reason,
        asset=asset,
        phase=error.phase,
        status_code=error.status_code,
    )


def _staged_render(
    storage: EngineProvider,
    sources: Mapping[RenderAsset, SourceReader],
    total: _RenderProgress,
    cancel: threading.Event | None,
    max_workers: int,
    overwrite: bool,
) -> dict[RenderAsset, StorageResult]:
    """Stage every asset, then record them together; undo everything on failure."""
    engine = storage.engine
    stop = _Stop(cancel)

    def stage(asset: RenderAsset) -> StagedUpload:
        source = sources[asset]
        return engine.stage(
            source,
            source.key,
            guess_content_type(source.key),
            total.for_asset(asset),
            None,
            stop,
            overwrite,
        )

    staged = _run_assets(list(sources), stage, stop, max_workers, engine.discard)
    order = [asset for asset in ASSETS if asset in staged]
    try:
        if stop.is_set():
            raise UploadCancelled(staged[order[0]].key)
        recorded = engine.commit_set([staged[asset] for asset in order])
    except BaseException as error:  # noqa: BLE001 - undone, then raised as the caller sees it
        failed = _asset_named_in(error, {a: staged[a].key for a in order}) or order[0]
        raised, cause = _outward(failed, error, stop)
        for asset in order:
            engine.discard(staged[asset], raised)
        if cause is None:
            raise raised from None if raised is not error else error.__cause__
        raise raised from cause
    return dict(zip(order, recorded, strict=True))


def _plain_render(
    storage: BaseStorageProvider,
    sources: Mapping[RenderAsset, SourceReader],
    paths: Mapping[RenderAsset, str | os.PathLike[str] | None],
    total: _RenderProgress,
    cancel: threading.Event | None,
    max_workers: int,
    overwrite: bool,
) -> dict[RenderAsset, StorageResult]:
    """Any other provider (``local``): put each file; delete what was put on failure."""
    stop = _Stop(cancel)

    def put(asset: RenderAsset) -> StorageResult:
        path = paths[asset]
        assert path is not None
        return storage.put_file(
            path,
            sources[asset].key,
            progress=total.for_asset(asset),
            cancel=stop,
            overwrite=overwrite,
        )

    def remove(result: StorageResult, error: BaseException | None) -> None:
        try:
            storage.delete(result.key)
        except StorageUploadError as delete_error:
            logger.warning("could not delete %s after a failure: %s", result.key, delete_error)
            if error is not None:
                error.add_note(f"Deleting {result.key} also failed: {delete_error}")
            return
        if error is not None:
            error.add_note(f"{result.key} was stored and has been deleted again.")

    results = _run_assets(list(sources), put, stop, max_workers, remove)
    if stop.is_set():
        error = UploadCancelled(results[next(iter(results))].key)
        for result in results.values():
            remove(result, error)
        raise error
    return results


def _run_assets(
    assets: list[RenderAsset],
    work: Callable[[RenderAsset], _T],
    stop: _Stop,
    max_workers: int,
    undo: Callable[[_T, BaseException | None], None],
) -> dict[RenderAsset, _T]:
    """Run ``work`` for every asset at once. On the first failure (or Ctrl-C while
    waiting) stop the others, wait for them, ``undo`` what succeeded, and raise the
    failure as the caller should see it."""
    pool = ThreadPoolExecutor(min(max_workers, len(assets)), thread_name_prefix="ctrlupload-asset")
    futures: dict[Future[_T], RenderAsset] = {}
    interrupted: BaseException | None = None
    try:
        for asset in assets:
            futures[pool.submit(work, asset)] = asset
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C: stop and clean up, then re-raise
        interrupted = exc
    if interrupted is None and all(_error_of(f) is None for f in futures):
        pool.shutdown(wait=True)
        return {asset: future.result() for future, asset in futures.items()}
    stop.set()
    pool.shutdown(wait=True, cancel_futures=True)
    done = {
        asset: future.result()
        for future, asset in futures.items()
        if future.done() and not future.cancelled() and future.exception() is None
    }
    if interrupted is not None:
        raised, cause = interrupted, None
    else:
        failures = [(asset, e) for f, asset in futures.items() if (e := _error_of(f)) is not None]
        raised, cause = _outward(*_first_failure(failures), stop)
    for result in done.values():
        undo(result, raised)
    if cause is None:
        raise raised
    raise raised from cause


def _error_of(future: Future[Any]) -> BaseException | None:
    if not future.done() or future.cancelled():
        return None
    return future.exception()


def _first_failure(
    failures: list[tuple[RenderAsset, BaseException]],
) -> tuple[RenderAsset, BaseException]:
    """The failure that caused the stop, not the cancellations it caused."""
    real = [(a, e) for a, e in failures if not isinstance(e, UploadCancelled)]
    return (real or failures)[0]


def _outward(
    asset: str, error: BaseException, stop: _Stop
) -> tuple[BaseException, BaseException | None]:
    """What the caller sees, and the cause to chain (None: raise it as it is): the
    progress callback's own error, UploadCancelled, or a RenderUploadError carrying
    the asset's message."""
    while isinstance(error, CallbackFailed):
        error = error.error
    if isinstance(error, UploadCancelled):
        if stop.by_caller:
            return error, None
        return UploadCancelled(error.key, "another asset failed"), error
    if isinstance(error, StorageUploadError) and not isinstance(error, RenderUploadError):
        return _render_error(asset, error), error
    return error, None


def _asset_named_in(error: BaseException, keys: Mapping[RenderAsset, str]) -> RenderAsset | None:
    """The asset a recording failure is about: the set-level complete's message names
    the object at fault; a one-by-one record fails with that object's key."""
    if not isinstance(error, StorageUploadError):
        return None
    for asset, key in keys.items():
        if f"'{key}'" in error.reason or f'"{key}"' in error.reason:
            return asset
    for asset, key in keys.items():
        if error.key == key:
            return asset
    return None
