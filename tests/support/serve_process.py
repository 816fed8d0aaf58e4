"""``python -m ctrlupload serve`` in a child process, for CLI tests and benchmarks.

:class:`ServeProcess` starts the real command, reads its stdout until the
``BACKEND_BASE_URL=`` and ``BACKEND_SERVICE_TOKEN`` lines are in (or a timeout passes),
and collects everything the child writes to stdout and stderr on reader threads, so a
chatty child never blocks on a full pipe. Leaving the ``with`` block kills a child that
is still running; :meth:`ServeProcess.stop` is the graceful way out.

Stdlib only: the benchmark imports this too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["REPO_ROOT", "ServeProcess", "child_env"]


def _announcements(stdout: str) -> list[str]:
    """serve's lines with their shell dressing (``export ``, ``# ``) taken off."""
    return [line.removeprefix("export ").removeprefix("# ") for line in stdout.splitlines()]


REPO_ROOT = Path(__file__).resolve().parents[2]
_TOKEN_LINE = "BACKEND_SERVICE_TOKEN"
_URL_LINE = "BACKEND_BASE_URL="


def child_env(
    overrides: Mapping[str, str] | None = None, *, drop: Sequence[str] = ()
) -> dict[str, str]:
    """A copy of ``os.environ`` that imports this checkout, minus ``drop``, plus overrides."""
    env = {name: value for name, value in os.environ.items() if name not in drop}
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
    )
    env.update(overrides or {})
    return env


class ServeProcess:
    """The ``serve`` command in a child process.

    Args:
        data_dir: Passed as ``--data-dir``.
        env: The child's whole environment; :func:`child_env` (without
            BACKEND_SERVICE_TOKEN) by default.
        args: More command-line arguments after ``serve``.
        cwd: The child's working directory (so no stray ``.env`` is read).
        ready_timeout_s: How long to wait for the two announcement lines.
        preexec_fn: Run in the child before serve starts (to lower its limits, say).

    Attributes:
        base_url: The announced BACKEND_BASE_URL.
        token: The announced BACKEND_SERVICE_TOKEN, or None when it was not printed.
        token_line: The whole line that starts with BACKEND_SERVICE_TOKEN.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("--port", "0"),
        cwd: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 15.0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "ctrlupload",
            "serve",
            *args,
            "--data-dir",
            os.fspath(data_dir),
        ]
        self._env = dict(env) if env is not None else child_env(drop=[_TOKEN_LINE])
        self._cwd = cwd
        self._ready_timeout_s = ready_timeout_s
        self._preexec_fn = preexec_fn
        self._lock = threading.Condition()
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._readers: list[threading.Thread] = []
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.token: str | None = None
        self.token_line = ""

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def stdout(self) -> str:
        """Everything the child wrote to stdout so far."""
        with self._lock:
            return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        """Everything the child wrote to stderr so far."""
        with self._lock:
            return "".join(self._stderr)

    def start(self) -> ServeProcess:
        """Start the child and wait until it has announced its URL and token.

        Raises:
            RuntimeError: The child exited or stayed silent past the timeout.
        """
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self._env,
            preexec_fn=self._preexec_fn,
            cwd=self._cwd,
            text=True,
            bufsize=1,
        )
        pipes = ((self.process.stdout, self._stdout), (self.process.stderr, self._stderr))
        for stream, sink in pipes:
            reader = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + self._ready_timeout_s
        with self._lock:
            while not self._announced():
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and self._readers_done()):
                    break
                self._lock.wait(min(left, 0.05))
            ready = self._announced()
        if not ready:
            self.kill()
            raise RuntimeError(
                f"serve did not announce itself within {self._ready_timeout_s} s "
                f"(exit {self.process.returncode}); stdout={self.stdout!r} stderr={self.stderr!r}"
            )
        for line in _announcements(self.stdout):
            if line.startswith(_URL_LINE):
                self.base_url = line[len(_URL_LINE) :]
            elif line.startswith(_TOKEN_LINE):
                self.token_line = line
                if line.startswith(_TOKEN_LINE + "="):
                    self.token = line[len(_TOKEN_LINE) + 1 :]
        return self

    def _announced(self) -> bool:
        lines = _announcements("".join(self._stdout))
        return any(line.startswith(_URL_LINE) for line in lines) and any(
            line.startswith(_TOKEN_LINE) for line in lines
        )

    def _readers_done(self) -> bool:
        return not any(reader.is_alive() for reader in self._readers)

    def _pump(self, stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            with self._lock:
                sink.append(line)
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 5.0) -> int | None:
        """Send ``signum`` and wait up to ``timeout_s`` for the exit.

        Returns:
            The exit status, or None when the child was still running (it is then killed).
        """
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            status: int | None = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            status = None
            self.kill()
        for reader in self._readers:
            reader.join(timeout_s)
        return status

    def kill(self) -> None:
        """Kill the child if it still runs, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        for reader in self._readers:
            reader.join(5)
