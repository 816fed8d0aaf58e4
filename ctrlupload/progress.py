"""Ready-made progress callbacks: a tqdm bar and periodic log lines.

Pass one as ``progress=`` to ``put_file``, ``put_object`` or ``upload_render``::

    from ctrlupload.progress import LogProgress, TqdmProgress

    storage.put_file("out/video.mp4", key, progress=TqdmProgress("video"))
    storage.put_file("out/video.mp4", key, progress=LogProgress(every_s=10, label="video"))

Both are callbacks (``progress(bytes_done, bytes_total)``) with the optional
``on_end(ok)`` hook, which ctrlupload calls once when the upload call ends: the bar
turns red, the log says where the upload failed. Both take calls from any thread.

An object follows one upload at a time; passed to several uploads one after another,
it shows each in turn (a new bar, a new set of lines). For a whole render use one with
``upload_render``, which reports every asset as one stream.

:class:`TqdmProgress` needs tqdm (``pip install 'ctrlupload[progress]'``); in a Jupyter
notebook with ipywidgets it draws a widget (``tqdm.auto``). :class:`LogProgress` needs
nothing: it writes INFO lines on the ``ctrlupload`` logger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from ._errors import StorageConfigError

__all__ = ["LogProgress", "TqdmProgress"]

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

#: How tqdm's own text around the bar is laid out, with our byte figures in it.
_BAR_FORMAT: Final = (
    "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


def _unit_for(size: float) -> tuple[str, float]:
    """The 1024-based unit a figure of ``size`` bytes reads best in, and its size."""
    scale = 1.0
    for unit in _UNITS[:-1]:
        if abs(size) < 1024 * scale:
            return unit, scale
        scale *= 1024
    return _UNITS[-1], scale


def _in_unit(value: float, unit: str, scale: float) -> str:
    return f"{value:.0f}" if unit == "B" else f"{value / scale:.1f}"


def _size(value: float) -> str:
    """``value`` bytes as e.g. ``12.0 MiB`` or ``300 B``."""
    unit, scale = _unit_for(value)
    return f"{_in_unit(value, unit, scale)} {unit}"


def _done_of_total(done: float, total: float) -> str:
    """Both figures in the total's unit: ``12.0 MiB of 200.0 MiB``."""
    unit, scale = _unit_for(total)
    return f"{_in_unit(done, unit, scale)} {unit} of {_in_unit(total, unit, scale)} {unit}"


def _rate(bytes_moved: float, seconds: float) -> str:
    return f"{_size(bytes_moved / seconds)}/s"


_bar_classes: tuple[Any, Any] | None = None


def _tqdm_bar_classes() -> tuple[Any, Any]:
    """tqdm's ``tqdm.auto`` bar (a widget in Jupyter), with 1024-based byte labels.

    tqdm's own ``unit_scale`` labels read ``MB`` for 1024-based figures; this bar fills
    the ``n_fmt``, ``total_fmt`` and ``rate_fmt`` fields of its format with ``KiB``,
    ``MiB`` and ``GiB`` figures instead. The second class draws a zero-byte upload: a
    bar of one step (a bar of zero steps never looks full), labelled ``0/0 B``.
    """
    global _bar_classes
    if _bar_classes is not None:
        return _bar_classes
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError as exc:
        raise StorageConfigError(
            "TqdmProgress needs tqdm: pip install 'ctrlupload[progress]'"
        ) from exc

    def format_dict(self: Any) -> dict[str, Any]:
        figures: dict[str, Any] = tqdm.format_dict.fget(self)
        if self.ctrlupload_empty:
            return {**figures, "n_fmt": "0", "total_fmt": "0 B", "rate_fmt": "0 B/s"}
        done, total = figures["n"], figures["total"] or 0
        unit, scale = _unit_for(total)
        elapsed, rate = figures["elapsed"], figures["rate"]
        if rate is None:
            rate = (done - figures["initial"]) / elapsed if elapsed else None
        return {
            **figures,
            "n_fmt": _in_unit(done, unit, scale),
            "total_fmt": f"{_in_unit(total, unit, scale)} {unit}",
            "rate_fmt": f"{_size(rate)}/s" if rate else "? B/s",
        }

    bar = type(
        "CtrluploadBar", (tqdm,), {"format_dict": property(format_dict), "ctrlupload_empty": False}
    )
    empty_bar = type("CtrluploadEmptyBar", (bar,), {"ctrlupload_empty": True})
    _bar_classes = (bar, empty_bar)
    return _bar_classes


class TqdmProgress:
    """A tqdm progress bar for an upload, in a terminal or (as a widget) in Jupyter.

    The bar appears on the first report, when the total is known, counts in 1024-based
    units (``3.4/8.0 MiB``, ``45.3 MiB/s``), and closes green once the upload is
    confirmed (``bytes_done == bytes_total``). If the upload fails or is cancelled,
    ``on_end(False)`` closes it red where it stopped. A zero-byte upload ends in a full
    bar too. Usable as a context manager, which closes the bar on exit.

    Args:
        label: The text before the bar (tqdm's ``desc``).
        **tqdm_kwargs: Passed on to tqdm, e.g. ``file=``, ``leave=``, ``position=``,
            ``ncols=``, ``mininterval=``.

    Raises:
        StorageConfigError: tqdm is not installed (``pip install 'ctrlupload[progress]'``).
    """

    def __init__(self, label: str = "upload", **tqdm_kwargs: Any) -> None:
        self._bar_class, self._empty_bar_class = _tqdm_bar_classes()
        self.label = label
        self._tqdm_kwargs = tqdm_kwargs
        self._bar: Any = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def bar(self) -> Any:
        """The current (or last) tqdm bar; ``None`` before the first report."""
        return self._bar

    @property
    def closed(self) -> bool:
        """True once the bar has been closed (and before any bar exists: False)."""
        return self._closed

    def __call__(self, bytes_done: int, bytes_total: int) -> None:
        with self._lock:
            if self._bar is None or self._closed:
                self._open(bytes_total)
            bar = self._bar
            if bar.ctrlupload_empty or bytes_total == 0:
                if bytes_done >= bytes_total:
                    self._finish_locked(ok=True)
                return
            if bar.total != bytes_total:
                bar.total = bytes_total
                bar.refresh()
            if bytes_done > bar.n:
                bar.update(bytes_done - bar.n)
            if bytes_done >= bytes_total:
                self._finish_locked(ok=True)

    def on_end(self, ok: bool) -> None:
        """Close the bar: green if ``ok`` (full), red where it stopped otherwise."""
        with self._lock:
            if self._closed:
                return
            if self._bar is None:
                if not ok:
                    return  # failed before the first report: there is no bar to show
                self._open(0)
            self._finish_locked(ok=ok)

    def close(self) -> None:
        """Close the bar as it stands (no colour change); idempotent."""
        with self._lock:
            if self._bar is not None and not self._closed:
                self._bar.close()
                self._closed = True

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.on_end(False)
        self.close()

    def __repr__(self) -> str:
        state = "no bar yet" if self._bar is None else ("closed" if self._closed else "open")
        return f"TqdmProgress(label={self.label!r}, {state})"

    def _open(self, total: int) -> None:
        kwargs: dict[str, Any] = {
            "desc": self.label,
            "unit": "B",
            "unit_scale": True,
            "unit_divisor": 1024,
            "bar_format": _BAR_FORMAT,
            **self._tqdm_kwargs,
        }
        if total == 0:
            self._bar = self._empty_bar_class(total=1, **kwargs)
        else:
            self._bar = self._bar_class(total=total, **kwargs)
        self._closed = False

    def _finish_locked(self, *, ok: bool) -> None:
        bar = self._bar
        if ok:
            if bar.n < bar.total:
                bar.update(bar.total - bar.n)
            bar.colour = "green"
        else:
            bar.colour = "red"
        bar.close()
        self._closed = True


class LogProgress:
    """Progress as INFO lines on the ``ctrlupload`` logger, at most every ``every_s``.

    A line such as ``upload: 12.0 MiB of 200.0 MiB (6%), 45.3 MiB/s`` (the rate over the last
    interval) comes at most every ``every_s`` seconds while bytes flow, and one line
    always ends the upload: ``upload: done, 200.0 MiB in 4.4 s (45.3 MiB/s)``, or from
    ``on_end(False)`` ``upload: failed at 12.0 MiB of 200.0 MiB (6%) after 3.1 s``.

    Args:
        every_s: Least time between two progress lines, in seconds.
        label: The text that starts each line.
        logger: Where the lines go (default: the ``ctrlupload`` logger).
        clock: Seconds from a monotonic clock (for tests; default ``time.monotonic``).
    """

    def __init__(
        self,
        every_s: float = 5.0,
        label: str = "upload",
        logger: logging.Logger | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_s < 0:
            raise StorageConfigError(f"LogProgress: every_s must be >= 0, got {every_s!r}")
        self.every_s = every_s
        self.label = label
        self._logger = logger if logger is not None else logging.getLogger("ctrlupload")
        self._clock = clock
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._started: float | None = None
        self._first_done = 0
        self._done = 0
        self._total = 0
        self._last_line_at = 0.0
        self._last_line_done = 0
        self._ended = False

    def __call__(self, bytes_done: int, bytes_total: int) -> None:
        with self._lock:
            now = self._clock()
            if self._ended:
                self._reset()  # the same object, passed to the next upload
            if self._started is None:
                self._started = self._last_line_at = now
                self._first_done = self._last_line_done = bytes_done
            self._done, self._total = max(self._done, bytes_done), bytes_total
            if bytes_done >= bytes_total:
                self._end_locked(ok=True, now=now)
            elif now - self._last_line_at >= self.every_s:
                interval = now - self._last_line_at
                rate = f", {_rate(self._done - self._last_line_done, interval)}" if interval else ""
                self._logger.info(
                    "%s: %s (%s)%s",
                    self.label,
                    _done_of_total(self._done, self._total),
                    self._percent(),
                    rate,
                )
                self._last_line_at, self._last_line_done = now, self._done

    def on_end(self, ok: bool) -> None:
        """Write the closing line, unless the upload's final report already did."""
        with self._lock:
            if not self._ended:
                self._end_locked(ok=ok, now=self._clock())

    def _end_locked(self, *, ok: bool, now: float) -> None:
        self._ended = True
        if self._started is None:
            if ok:
                self._logger.info("%s: done", self.label)
            else:
                self._logger.info("%s: failed before the first byte was sent", self.label)
            return
        elapsed = now - self._started
        if ok:
            moved = self._total - self._first_done
            rate = f" ({_rate(moved, elapsed)})" if elapsed > 0 and moved > 0 else ""
            self._logger.info(
                "%s: done, %s in %.1f s%s", self.label, _size(self._total), elapsed, rate
            )
        else:
            self._logger.info(
                "%s: failed at %s (%s) after %.1f s",
                self.label,
                _done_of_total(self._done, self._total),
                self._percent(),
                elapsed,
            )

    def _percent(self) -> str:
        return f"{100 * self._done // self._total}%" if self._total else "100%"

    def __repr__(self) -> str:
        return f"LogProgress(every_s={self.every_s!r}, label={self.label!r})"
