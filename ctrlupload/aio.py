"""asyncio facade: await uploads without blocking the event loop.

::

    from ctrlupload.aio import get_storage_provider

    async with get_storage_provider() as storage:
        result = await storage.put_file("out/video.mp4", key)

:class:`AsyncStorageProvider` wraps any (synchronous) provider. Each call runs the
provider's own method on a worker thread of a pool the facade owns, so the loop keeps
running while bytes go out; what is uploaded, retried and raised is exactly what the
sync call does. Errors come through unchanged: the same
:class:`~ctrlupload.StorageUploadError` subclasses, with the same messages.

Cancellation: cancelling the task that awaits a call (``task.cancel()``,
``asyncio.timeout``, a failing ``TaskGroup`` sibling) sets the ``cancel`` event of the
sync call, which stops at its next block and cleans up as
:class:`~ctrlupload.UploadCancelled` does (a multipart upload is aborted,
``upload_render`` deletes what it had stored). The awaiting task waits for the worker
thread to finish that, without blocking the loop and through further cancels, then
gets :class:`asyncio.CancelledError`: once it has control back, nothing of the call is
still running. A cancel that comes after storage confirmed the upload cannot undo it:
the task still gets ``CancelledError`` and the object stays stored. A call still
queued for a worker (see ``max_workers``) is dropped without starting.

Progress callbacks are called on worker threads, never on the loop's thread. A
callback that touches the loop or asyncio objects must hand over with
``loop.call_soon_threadsafe``. The call runs in a copy of the awaiting task's context
variables (as with :func:`asyncio.to_thread`); threads it starts for multipart parts or
render assets do not inherit them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from . import RenderUpload, upload_render
from ._errors import StorageError
from ._settings import Settings
from .engine._engine import StorageResult
from .engine._streams import ProgressCallback
from .providers import BaseStorageProvider, ObjectData
from .providers import get_storage_provider as _get_sync_provider

__all__ = ["DEFAULT_MAX_WORKERS", "AsyncStorageProvider", "get_storage_provider"]

#: Calls run at once by default; more wait for a free worker thread.
DEFAULT_MAX_WORKERS: Final = 8

_T = TypeVar("_T")


class AsyncStorageProvider:
    """Awaitable versions of a provider's calls, each run on a worker thread.

    Args:
        provider: Any provider (:class:`~ctrlupload.BaseStorageProvider`); the facade
            owns it from now on and closes it in :meth:`aclose`.
        max_workers: How many calls run at once; further calls wait for a free worker.
            Each call may use more threads of its own (multipart parts, the assets of
            ``upload_render``).

    Use it as ``async with``: on exit it waits for calls still running, then closes
    the provider (see :meth:`aclose`).
    """

    def __init__(
        self, provider: BaseStorageProvider, *, max_workers: int = DEFAULT_MAX_WORKERS
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.provider = provider
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="ctrlupload-aio"
        )
        self._lock = threading.Lock()
        self._running: dict[concurrent.futures.Future[Any], threading.Event] = {}
        self._closed = False
        self._provider_closed = False

    def __repr__(self) -> str:
        return f"AsyncStorageProvider({self.provider!r})"

    # -- uploads -------------------------------------------------------------------------

    async def put_file(
        self,
        path: str | os.PathLike[str],
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        resume: bool = False,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload the file at ``path`` as ``key``; the provider's ``put_file``.

        ``progress`` is called on a worker thread. Cancelling the awaiting task stops
        the upload as the sync call's ``cancel`` event does: a multipart upload is
        aborted, resumable or not.

        Raises:
            StorageUploadError: As the provider's ``put_file``.
            StorageError: The facade is closed.
            asyncio.CancelledError: The task was cancelled; the upload has stopped.
        """
        return await self._call(
            self.provider.put_file,
            path,
            key,
            content_type,
            progress,
            resume=resume,
            overwrite=overwrite,
        )

    async def put_object(
        self,
        data: ObjectData,
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload bytes or a seekable binary file object; the provider's ``put_object``.

        A file object is read on a worker thread; do not use it until the call is over.

        Raises:
            StorageUploadError: As the provider's ``put_object``.
            StorageError: The facade is closed.
            asyncio.CancelledError: The task was cancelled; the upload has stopped.
        """
        return await self._call(
            self.provider.put_object, data, key, content_type, progress, overwrite=overwrite
        )

    async def upload_render(
        self,
        video_id: str,
        script_id: str,
        job_id: str,
        *,
        video: str | os.PathLike[str],
        subtitles: str | os.PathLike[str] | None = None,
        thumbnail: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        max_workers: int = 3,
        overwrite: bool = True,
    ) -> RenderUpload:
        """Upload a render's assets all-or-nothing; :func:`ctrlupload.upload_render`.

        Cancelling the awaiting task stops every asset and deletes those already
        stored before the ``CancelledError`` reaches the task.

        Raises:
            RenderUploadError: As :func:`ctrlupload.upload_render`.
            StorageError: The facade is closed.
            asyncio.CancelledError: The task was cancelled; nothing of the render is kept.
        """
        return await self._call(
            upload_render,
            self.provider,
            video_id,
            script_id,
            job_id,
            video=video,
            subtitles=subtitles,
            thumbnail=thumbnail,
            progress=progress,
            max_workers=max_workers,
            overwrite=overwrite,
        )

    async def delete(self, key: str) -> None:
        """Delete ``key``; the provider's ``delete`` (a missing key is not an error).

        A delete cannot be stopped half-way: cancelling the awaiting task waits for it
        to end, then raises ``CancelledError``.

        Raises:
            StorageUploadError: As the provider's ``delete`` (phase ``delete``).
            StorageError: The facade is closed.
        """
        await self._call(self.provider.delete, key, cancellable=False)

    def get_url(self, key: str) -> str:
        """The public URL of ``key``: the provider's ``get_url`` (no I/O, not awaited)."""
        return self.provider.get_url(key)

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Refuse new calls, wait for the running ones, then close the provider.

        Running calls are left to finish (cancel their tasks to stop them). If the
        task awaiting ``aclose`` is cancelled, the running calls are cancelled instead
        (their awaiters get :class:`~ctrlupload.UploadCancelled`); either way the
        provider is closed and no call is running once this returns or raises.
        Calling it again does nothing.
        """
        with self._lock:
            self._closed = True
            running = dict(self._running)

        def cancel_running() -> None:
            for cancel in running.values():
                cancel.set()

        cancelled = await _wait_for(running, on_cancel=cancel_running)
        cancelled = await self._close_provider() or cancelled
        if cancelled:
            raise asyncio.CancelledError

    def close(self) -> None:
        """:meth:`aclose` for code without a loop: blocks until running calls are done.

        Never call it on a loop's thread while calls run: it would block the loop.
        """
        with self._lock:
            self._closed = True
            running = list(self._running)
        concurrent.futures.wait(running)
        with self._lock:
            if self._provider_closed:
                return
            self._provider_closed = True
        try:
            self.provider.close()
        finally:
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _close_provider(self) -> bool:
        """Close the provider on a worker thread (once); True if cancelled meanwhile."""
        with self._lock:
            if self._provider_closed:
                return False
            self._provider_closed = True
        job = self._executor.submit(self.provider.close)
        try:
            cancelled = await _wait_for([job])
        finally:
            self._executor.shutdown(wait=False)
        job.result()
        return cancelled

    # -- running calls -------------------------------------------------------------------

    async def _call(
        self,
        function: Callable[..., _T],
        /,
        *args: Any,
        cancellable: bool = True,
        **kwargs: Any,
    ) -> _T:
        """Run ``function(*args, **kwargs, cancel=event)`` on a worker thread."""
        cancel = threading.Event()
        if cancellable:
            kwargs["cancel"] = cancel
        # Like asyncio.to_thread: the call sees the caller's context variables.
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        with self._lock:
            if self._closed:
                raise StorageError(f"{type(self).__name__} is closed")
            job = self._executor.submit(call)
            self._running[job] = cancel
        job.add_done_callback(self._forget)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            cancel.set()
            job.cancel()  # a call still queued never starts
            await _wait_for([job])
            raise

    def _forget(self, job: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._running.pop(job, None)


async def _wait_for(
    jobs: Iterable[concurrent.futures.Future[Any]],
    on_cancel: Callable[[], None] | None = None,
) -> bool:
    """Wait until every job is over, however often this task is cancelled meanwhile.

    Their outcomes are left to whoever awaits them. On the first cancel, ``on_cancel``
    is called, and waiting goes on.

    Returns:
        Whether the task was cancelled while it waited: the caller raises
        ``CancelledError`` once it has cleaned up.
    """
    waiters = [asyncio.wrap_future(job) for job in jobs if not job.done()]
    cancelled = False
    while not all(waiter.done() for waiter in waiters):
        try:
            # asyncio.wait never cancels what it waits for, nor raises what they raise.
            await asyncio.wait(waiters)
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    for waiter in waiters:
        if not waiter.cancelled():
            waiter.exception()  # retrieved: no "exception was never retrieved" warning
    return cancelled


def get_storage_provider(
    settings: Settings | None = None, *, max_workers: int = DEFAULT_MAX_WORKERS
) -> AsyncStorageProvider:
    """Build the provider that ``STORAGE_PROVIDER`` names and wrap it.

    The same settings as :func:`ctrlupload.get_storage_provider` (by default the
    environment and ``.env``).

    Raises:
        StorageConfigError: As :func:`ctrlupload.get_storage_provider`.
    """
    return AsyncStorageProvider(_get_sync_provider(settings), max_workers=max_workers)
