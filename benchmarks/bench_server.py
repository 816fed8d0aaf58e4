"""The reference backend's HTTP server: cheroot (``_http.py``) against the old gateway.

Run from the repository root::

    python benchmarks/bench_server.py --json docs/bench_server.json

Issue 8 replaced the hand-written ``http.server`` gateway (``ctrlupload/server/_wsgi.py``,
deleted in 29f3ff7) with cheroot (``ctrlupload/server/_http.py``). This script runs the
same app (``ReferenceBackend`` + ``LocalObjectStore`` + ``AssetDB`` on a temp data dir)
on each server and measures, in one run:

1. **32 concurrent 64 MiB uploads.** 32 threads share one
   ``BackendPresignedStorageProvider`` (``STORAGE_MAX_CONNECTIONS=32``, one PUT per file:
   ``STORAGE_MULTIPART=never``; client MD5 check off so the client spends little CPU)
   and upload 32 distinct files at once (presign, streamed PUT, complete). Aggregate
   MiB/s, the server's CPU time, and its memory: VmRSS after a warm-up upload, then the
   peak (VmHWM, reset through ``/proc/PID/clear_refs``, and VmRSS sampled every 10 ms by
   a separate process). Rounds alternate old and new, each on a fresh server; the table
   shows medians.
2. **10 KiB uploads per second.** 8 threads share one provider and upload a 10 KiB file
   (presign, PUT, complete) under fresh keys for a fixed time.
3. **Idle connections.** N TCP connections that never send a byte are opened (N = 50,
   100, 200, 400, 800, then the server's descriptor limit, 1024), then one
   ``GET /healthz`` on a fresh connection is timed. The largest N for which it answered
   200 within 1 s is the result. Each step also records how many of the idle
   connections the server still held, its threads, RSS and CPU% over 1 s. Then, on a
   fresh server with ``RLIMIT_NOFILE=256``: 250 idle connections, the server's CPU% over
   3 s, one ``GET /healthz``, and again after the idle connections are closed.

Each server runs in its own process (this script with ``--serve old|new --data-dir D``),
so its RSS and CPU come from ``/proc`` and the client does not share its GIL. The
server's soft ``RLIMIT_NOFILE`` is set to 1024 (256 for the last test) before it starts.
The old gateway is loaded from git history (``git show eadcdf3:ctrlupload/server/_wsgi.py``),
its one relative import made absolute.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import importlib.util
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(REPO_ROOT), str(REPO_ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_multipart import machine_cpu_s  # noqa: E402
from bench_reference_backend import (  # noqa: E402
    Sampler,
    file_md5,
    machine_facts,
    proc_cpu_s,
    proc_status,
    reset_peak_rss,
    write_sources,
)

from ctrlupload import BackendPresignedStorageProvider, Settings  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
TOKEN = "bench-server-token-0123456789"
OLD_REVISION = "eadcdf3"
OLD_PATH = "ctrlupload/server/_wsgi.py"
VARIANTS = ("old", "new")
SERVER_NOFILE = 1024
SMALL_NOFILE = 256
SMALL_NOFILE_IDLE = 250
HEALTHZ_TARGET_S = 1.0
HEALTHZ_TIMEOUT_S = 5.0
BIG_KEY = "videos/V-SRV/S-{round}{variant}/JOB-{index:02d}/video.mp4"
SMALL_KEY = "videos/V-SRV/S-{round}{variant}/JOB-{thread}-{count}/thumb.jpg"


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# -- the server side (``--serve``) -----------------------------------------------------


def load_old_gateway(folder: Path) -> ModuleType:
    """The deleted ``_wsgi.py`` from git history, importable on its own."""
    source = subprocess.run(
        ["git", "show", f"{OLD_REVISION}:{OLD_PATH}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    relative = "from .._redact import"
    if relative not in source:
        raise RuntimeError(f"{OLD_PATH}@{OLD_REVISION} no longer has {relative!r}")
    path = folder / "old_wsgi_gateway.py"
    path.write_text(source.replace(relative, "from ctrlupload._redact import"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_wsgi_gateway", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def serve_main(variant: str, data_dir: Path) -> int:
    """Run the reference backend on the ``variant`` server until SIGTERM."""
    from ctrlupload.server import AssetDB, LocalObjectStore, ReferenceBackend

    with tempfile.TemporaryDirectory(prefix="bench_server.module.") as scratch:
        if variant == "old":
            server_class: Any = load_old_gateway(Path(scratch)).WSGIServer
        else:
            from ctrlupload.server._http import WSGIServer as server_class
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        server = server_class(None, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{server.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        db = AssetDB(data_dir / "assets.sqlite3")
        store = LocalObjectStore(data_dir, base_url)
        server.set_app(ReferenceBackend(token=TOKEN, store=store, db=db))
        print(f"PORT {server.port}", flush=True)
        stop.wait()
        server.stop()
        db.close()
    return 0


class ServerProcess:
    """This script in ``--serve`` mode, in a child process with its own fd limit."""

    def __init__(self, variant: str, data_dir: Path, nofile: int, stderr: IO[str]) -> None:
        self.variant = variant
        self.nofile = nofile

        def limit_fds() -> None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
        )
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", variant, "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=data_dir.parent,
            env=env,
            text=True,
            preexec_fn=limit_fds,
        )
        assert self.process.stdout is not None
        ready = selectors.DefaultSelector()
        ready.register(self.process.stdout, selectors.EVENT_READ)
        if not ready.select(30):
            self.process.kill()
            raise RuntimeError(f"{variant} server did not announce its port within 30 s")
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"{variant} server said {line!r} instead of its port")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.pid = self.process.pid

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.stop()


# -- client helpers ----------------------------------------------------------------------


def provider(server: ServerProcess, connections: int) -> BackendPresignedStorageProvider:
    return BackendPresignedStorageProvider(
        Settings.from_mapping(
            {
                "STORAGE_PROVIDER": "backend_presigned",
                "BACKEND_BASE_URL": server.base_url,
                "BACKEND_SERVICE_TOKEN": TOKEN,
                "STORAGE_MAX_CONNECTIONS": connections,
                "STORAGE_VERIFY_MD5": False,
                # One PUT per upload: 64 MiB is the default multipart threshold.
                "STORAGE_MULTIPART": "never",
                "VIDEO_MAX_UPLOAD_BYTES": 5 * 1024 * MIB,
            }
        )
    )


def cpu_pct(pid: int, seconds: float) -> float:
    before = proc_cpu_s(pid)
    time.sleep(seconds)
    return 100 * (proc_cpu_s(pid) - before) / seconds


class OtherCpu:
    """CPU time the server, this client and everything else spent from :meth:`mark` on.

    "Other" is the whole machine's busy time less the server's and this process's: other
    engineers' jobs, kernel threads. A large figure means the round competed for the CPU.
    """

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        times = os.times()
        return proc_cpu_s(self._pid), times.user + times.system, machine_cpu_s()[0]

    def stop(self) -> dict[str, float]:
        end = self._read()
        pairs = zip(end, self._start, strict=True)
        server, client, busy = (after - before for after, before in pairs)
        return {
            "server_cpu_s": server,
            "client_cpu_s": client,
            "machine_busy_s": busy,
            "other_cpu_s": busy - server - client,
        }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def git_facts() -> dict[str, Any]:
    """The commit under test, and the library's files that differ from it."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        ).stdout.rstrip("\n")

    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "uncommitted_library_files": [
            line[3:] for line in git("status", "--short", "ctrlupload").splitlines()
        ],
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- 1. concurrent large uploads ---------------------------------------------------------


def bench_big(
    variant: str,
    round_index: int,
    sources: list[Path],
    digests: list[str],
    scratch: Path,
    stderr: IO[str],
) -> dict[str, Any]:
    data_dir = scratch / f"big-{variant}-{round_index}"
    keys = [
        BIG_KEY.format(round=round_index, variant=variant, index=index)
        for index in range(len(sources))
    ]
    errors: list[str] = []
    etags: dict[int, str | None] = {}
    with ServerProcess(variant, data_dir, SERVER_NOFILE, stderr) as server:
        with provider(server, len(sources)) as storage:
            warm = scratch / "warm.bin"
            warm.write_bytes(os.urandom(MIB))
            storage.put_file(warm, f"videos/V-SRV/S-WARM/JOB-{variant}{round_index}/video.mp4")
            time.sleep(0.3)
            baseline = proc_status(server.pid)
            hwm_reset = reset_peak_rss(server.pid)
            meter = OtherCpu(server.pid)
            sampler = Sampler(server.pid, 0.01)
            start_together = threading.Barrier(len(sources), timeout=60)

            def upload(index: int) -> None:
                try:
                    start_together.wait()
                    etags[index] = storage.put_file(sources[index], keys[index]).etag
                except Exception as exc:
                    errors.append(f"{keys[index]}: {type(exc).__name__}: {exc}")

            started = time.perf_counter()
            with ThreadPoolExecutor(len(sources)) as pool:
                list(pool.map(upload, range(len(sources))))
            wall_s = time.perf_counter() - started
            cpu = meter.stop()
            samples = sampler.stop()
            after = proc_status(server.pid)
        exit_code = server.stop()
    stored_ok = sum(
        (data_dir / "objects" / key).is_file()
        and (data_dir / "objects" / key).stat().st_size == source.stat().st_size
        and etags.get(index) == f'"{digests[index]}"'
        for index, (key, source) in enumerate(zip(keys, sources, strict=True))
    )
    shutil.rmtree(data_dir, ignore_errors=True)
    total = sum(source.stat().st_size for source in sources)
    sampled_peak_kib = max((rss for _, rss, _ in samples), default=0)
    peak_kib = max(sampled_peak_kib, after["VmHWM"] if hwm_reset else 0)
    return {
        "variant": variant,
        "round": round_index,
        "uploads": len(sources),
        "body_mib": sources[0].stat().st_size / MIB,
        "total_mib": total / MIB,
        "wall_s": wall_s,
        "mib_s": total / MIB / wall_s,
        **cpu,
        "baseline_rss_mib": baseline["VmRSS"] / KIB,
        "peak_rss_mib": peak_kib / KIB,
        "sampled_peak_rss_mib": sampled_peak_kib / KIB,
        "vmhwm_mib": after["VmHWM"] / KIB if hwm_reset else None,
        "growth_mib": (peak_kib - baseline["VmRSS"]) / KIB,
        "peak_threads": max((threads for _, _, threads in samples), default=0),
        "errors": errors,
        "stored_ok": stored_ok,
        "exit_code": exit_code,
        "load_average_after": load_average(),
    }


# -- 2. small uploads --------------------------------------------------------------------


def bench_small(
    variant: str,
    round_index: int,
    small_file: Path,
    threads: int,
    seconds: float,
    scratch: Path,
    stderr: IO[str],
) -> dict[str, Any]:
    data_dir = scratch / f"small-{variant}-{round_index}"
    counts = [0] * threads
    errors: list[str] = []
    with ServerProcess(variant, data_dir, SERVER_NOFILE, stderr) as server:
        with provider(server, threads) as storage:
            for count in range(2 * threads):  # warm-up: connections, SQLite, imports
                storage.put_file(
                    small_file,
                    SMALL_KEY.format(round=round_index, variant=variant, thread="w", count=count),
                )
            meter = OtherCpu(server.pid)
            start_together = threading.Barrier(threads, timeout=60)
            deadline: list[float] = []

            def worker(thread: int) -> None:
                if start_together.wait() == 0:
                    deadline.append(time.perf_counter() + seconds)
                start_together.wait()
                while time.perf_counter() < deadline[0]:
                    key = SMALL_KEY.format(
                        round=round_index, variant=variant, thread=thread, count=counts[thread]
                    )
                    try:
                        storage.put_file(small_file, key)
                    except Exception as exc:
                        errors.append(f"{key}: {type(exc).__name__}: {exc}")
                        return
                    counts[thread] += 1

            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(worker, range(threads)))
            wall_s = time.perf_counter() - started
            cpu = meter.stop()
        exit_code = server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    uploads = sum(counts)
    return {
        "variant": variant,
        "round": round_index,
        "threads": threads,
        "wall_s": wall_s,
        "uploads": uploads,
        "uploads_s": uploads / wall_s,
        "server_cpu_ms_per_upload": 1000 * cpu["server_cpu_s"] / uploads if uploads else None,
        **cpu,
        "errors": errors,
        "exit_code": exit_code,
    }


# -- 3. idle connections -----------------------------------------------------------------


def accept_queue(port: int) -> int | None:
    """Connections waiting in the kernel for the server's ``accept`` (LISTEN rx_queue)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 4 and fields[1] == local and fields[3] == "0A":
                return int(fields[4].split(":")[1], 16)
    return None


def wait_accepted(port: int, timeout_s: float = 0.5) -> None:
    """Wait until the server has taken what is queued for ``accept`` (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while (accept_queue(port) or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.001)


def open_idle(port: int, count: int, held: list[socket.socket], batch: int = 4) -> int:
    """Add ``count`` connections that send nothing to ``held``; return how many connected.

    They are opened a few at a time, and each batch waits until the server has accepted
    it (0.5 s at most), so that a server with a short listen backlog (the old one's is
    5) does not drop SYNs only because this loop outpaces its accept loop: a dropped SYN
    costs the client a 1 s retransmission. A batch that does not connect within 3 s
    means the server stopped accepting: opening stops there.
    """
    connected = 0
    while connected < count:
        wait_accepted(port)
        pending = []
        for _ in range(min(batch, count - connected)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                return connected
            pending.append(sock)
        waiting = selectors.DefaultSelector()
        for sock in pending:
            waiting.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 3
        done: list[socket.socket] = []
        while len(done) < len(pending) and time.monotonic() < deadline:
            for key, _ in waiting.select(max(0.0, deadline - time.monotonic())):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                waiting.unregister(ready)
                if ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.append(ready)
                else:
                    ready.close()
                    pending.remove(ready)
        waiting.close()
        held.extend(done)
        connected += len(done)
        if len(done) < len(pending) or not pending:
            for sock in pending:
                if sock not in done:
                    sock.close()
            return connected
    return connected


def still_open(held: list[socket.socket]) -> int:
    """How many of the idle connections the server has not closed."""
    alive = 0
    for sock in held:
        try:
            alive += sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def healthz(port: int) -> dict[str, Any]:
    """Time one ``GET /healthz`` on a fresh connection, from connect to the status line."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HEALTHZ_TIMEOUT_S) as sock:
            sock.settimeout(max(0.01, HEALTHZ_TIMEOUT_S - (time.perf_counter() - started)))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            answer = b""
            while b"\r\n" not in answer:
                block = sock.recv(4096)
                if not block:
                    break
                answer += block
    except OSError as exc:
        return {
            "status": None,
            "latency_s": None,
            "error": f"{type(exc).__name__}: {exc}",
            "waited_s": time.perf_counter() - started,
        }
    latency = time.perf_counter() - started
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return {
        "status": status,
        "latency_s": latency,
        "error": None if status else f"answer {status_line!r}",
        "waited_s": latency,
    }


def within_target(probe: dict[str, Any]) -> bool:
    return bool(probe["status"] == 200 and probe["latency_s"] <= HEALTHZ_TARGET_S)


def close_all(held: list[socket.socket]) -> None:
    for sock in held:
        sock.close()
    held.clear()


def bench_idle(variant: str, steps: list[int], scratch: Path, stderr: IO[str]) -> dict[str, Any]:
    data_dir = scratch / f"idle-{variant}"
    rows: list[dict[str, Any]] = []
    held: list[socket.socket] = []
    with ServerProcess(variant, data_dir, SERVER_NOFILE, stderr) as server:
        before = {"fds": server.open_fds(), "probe": healthz(server.port)}
        try:
            for wanted in steps:
                opened = open_idle(server.port, wanted - len(held), held)
                time.sleep(0.3)
                status = proc_status(server.pid)
                row: dict[str, Any] = {
                    "idle_wanted": wanted,
                    "idle_connected": len(held),
                    "opened_this_step": opened,
                    "idle_still_open": still_open(held),
                    "server_fds": server.open_fds(),
                    "server_threads": status["Threads"],
                    "server_rss_mib": status["VmRSS"] / KIB,
                    "server_cpu_pct_1s": cpu_pct(server.pid, 1.0),
                    "probe": healthz(server.port),
                }
                row["ok"] = within_target(row["probe"])
                rows.append(row)
                log(f"idle {variant} {json.dumps(row)}")
                if not row["ok"]:
                    break
        finally:
            close_all(held)
        time.sleep(0.5)
        recovered = healthz(server.port)
        exit_code = server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    passed = [row["idle_wanted"] for row in rows if row["ok"]]
    return {
        "variant": variant,
        "nofile": SERVER_NOFILE,
        "before": before,
        "steps": rows,
        "largest_ok": max(passed) if passed else 0,
        "after_close": recovered,
        "exit_code": exit_code,
    }


def bench_fd_exhaustion(
    variant: str, idle: int, cpu_seconds: float, scratch: Path, stderr: IO[str]
) -> dict[str, Any]:
    data_dir = scratch / f"nofile-{variant}"
    held: list[socket.socket] = []
    with ServerProcess(variant, data_dir, SMALL_NOFILE, stderr) as server:
        fds_before = server.open_fds()
        try:
            connected = open_idle(server.port, idle, held)
            time.sleep(0.3)
            status = proc_status(server.pid)
            result: dict[str, Any] = {
                "variant": variant,
                "nofile": SMALL_NOFILE,
                "idle_wanted": idle,
                "idle_connected": connected,
                "server_fds_before": fds_before,
                "server_fds": server.open_fds(),
                "idle_still_open": still_open(held),
                "server_threads": status["Threads"],
                "server_cpu_pct": cpu_pct(server.pid, cpu_seconds),
                "cpu_window_s": cpu_seconds,
                "probe": healthz(server.port),
            }
            result["idle_still_open_after_probe"] = still_open(held)
        finally:
            close_all(held)
        time.sleep(0.5)
        result["after_close"] = healthz(server.port)
        result["cpu_pct_after_close"] = cpu_pct(server.pid, 1.0)
        result["exit_code"] = server.stop()
    result["ok"] = within_target(result["probe"])
    shutil.rmtree(data_dir, ignore_errors=True)
    log(f"nofile {variant} {json.dumps(result)}")
    return result


# -- report ------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def probe_text(probe: dict[str, Any]) -> str:
    if probe["status"] is None:
        return f"no answer in {probe['waited_s']:.1f} s"
    return f"{probe['status']} in {1000 * probe['latency_s']:.1f} ms"


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    summary = report["summary"]
    params = report["parameters"]
    lines = [
        f"# bench_server ({facts['date']})",
        "",
        f"Machine: {facts['cpu_model']}, nproc {facts['nproc']}, {facts['mem_total']} RAM, "
        f"Linux {facts['kernel']}; Python {facts['python']}, requests {facts['requests']}, "
        f"urllib3 {facts['urllib3']}, cheroot {facts['cheroot']}; load average at start "
        f"{facts['load_average_start']}, at end {report['load_average_end']}",
        "",
        f"Command: `{report['command']}`, at {facts['git_head']}"
        + (
            " (uncommitted: " + ", ".join(facts["uncommitted_library_files"]) + ")"
            if facts["uncommitted_library_files"]
            else ""
        ),
        "",
        "| measure | old (`_wsgi.py`, http.server) | new (`_http.py`, cheroot) | new / old |",
        "|---|---:|---:|---:|",
    ]

    def row(name: str, key: str, spec: str = ".1f") -> None:
        old, new = summary["old"][key], summary["new"][key]
        ratio = f"{new / old:.2f}" if old and new is not None else "n/a"
        lines.append(f"| {name} | {fmt(old, spec)} | {fmt(new, spec)} | {ratio} |")

    row(
        f"{params['big_uploads']} x {params['big_mib']} MiB at once: aggregate MiB/s (median)",
        "big_mib_s",
        ".0f",
    )
    row("  server CPU s per round (median)", "big_server_cpu_s")
    row("  CPU s of other processes per round (median)", "big_other_cpu_s")
    row("  server RSS after warm-up, MiB (median)", "big_baseline_rss_mib")
    row("  server peak RSS, MiB (max of rounds)", "big_peak_rss_mib")
    row("  server threads at peak (max)", "big_peak_threads", ".0f")
    row(
        f"10 KiB presign+PUT+complete, {params['small_threads']} threads: uploads/s (median)",
        "small_uploads_s",
        ".0f",
    )
    row("  server CPU ms per upload (median)", "small_server_cpu_ms", ".2f")
    row(
        f"largest N idle connections with /healthz 200 within 1 s (nofile {SERVER_NOFILE})",
        "idle_largest_ok",
        ".0f",
    )
    fd = {result["variant"]: result for result in report["fd_exhaustion"]}
    if fd:
        lines.append(
            f"| nofile {SMALL_NOFILE}, {params['nofile_idle']} idle: /healthz "
            f"| {probe_text(fd['old']['probe'])} | {probe_text(fd['new']['probe'])} | |"
        )
        lines.append(
            f"|   server CPU % over {params['nofile_cpu_s']:g} s "
            f"| {fd['old']['server_cpu_pct']:.0f} | {fd['new']['server_cpu_pct']:.0f} | |"
        )
        lines.append(
            "|   idle connections connected / still open "
            f"| {fd['old']['idle_connected']} / {fd['old']['idle_still_open']} "
            f"| {fd['new']['idle_connected']} / {fd['new']['idle_still_open']} | |"
        )
        lines.append(
            "|   /healthz once the idle ones are closed "
            f"| {probe_text(fd['old']['after_close'])} | {probe_text(fd['new']['after_close'])} | |"
        )

    lines += [
        "",
        "Large uploads, every round:",
        "",
        "| round | server | wall s | MiB/s | server CPU s | client CPU s | other CPU s "
        "| RSS after warm-up MiB | peak RSS MiB | growth MiB | peak threads | stored ok "
        "| errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for item in report["big"]:
        lines.append(
            f"| {item['round']} | {item['variant']} | {item['wall_s']:.2f} | {item['mib_s']:.0f} "
            f"| {item['server_cpu_s']:.1f} | {item['client_cpu_s']:.1f} "
            f"| {item['other_cpu_s']:.1f} | {item['baseline_rss_mib']:.1f} "
            f"| {item['peak_rss_mib']:.1f} | {item['growth_mib']:.1f} | {item['peak_threads']} "
            f"| {item['stored_ok']}/{item['uploads']} | {len(item['errors'])} |"
        )
    lines += [
        "",
        "Small uploads, every round:",
        "",
        "| round | server | uploads | uploads/s | server CPU ms/upload | other CPU s | errors |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for item in report["small"]:
        lines.append(
            f"| {item['round']} | {item['variant']} | {item['uploads']} "
            f"| {item['uploads_s']:.0f} | {fmt(item['server_cpu_ms_per_upload'], '.2f')} "
            f"| {item['other_cpu_s']:.1f} | {len(item['errors'])} |"
        )
    lines += [
        "",
        f"Idle connections (server nofile {SERVER_NOFILE}), one fresh `GET /healthz` after each "
        "step:",
        "",
        "| server | N wanted | connected | still open | server fds | threads | RSS MiB "
        "| CPU % (1 s) | /healthz |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for idle in report["idle"]:
        for step in idle["steps"]:
            lines.append(
                f"| {idle['variant']} | {step['idle_wanted']} | {step['idle_connected']} "
                f"| {step['idle_still_open']} | {step['server_fds']} | {step['server_threads']} "
                f"| {step['server_rss_mib']:.1f} | {step['server_cpu_pct_1s']:.0f} "
                f"| {probe_text(step['probe'])} |"
            )
    lines += ["", "Verdict: " + report["verdict"]["text"]]
    return "\n".join(lines)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        big = [item for item in report["big"] if item["variant"] == variant]
        small = [item for item in report["small"] if item["variant"] == variant]
        idle = [item for item in report["idle"] if item["variant"] == variant]
        summary[variant] = {
            "big_mib_s": median([item["mib_s"] for item in big]),
            "big_mib_s_rounds": [item["mib_s"] for item in big],
            "big_server_cpu_s": median([item["server_cpu_s"] for item in big]),
            "big_other_cpu_s": median([item["other_cpu_s"] for item in big]),
            "big_baseline_rss_mib": median([item["baseline_rss_mib"] for item in big]),
            "big_peak_rss_mib": max((item["peak_rss_mib"] for item in big), default=None),
            "big_peak_threads": max((item["peak_threads"] for item in big), default=None),
            "small_uploads_s": median([item["uploads_s"] for item in small]),
            "small_server_cpu_ms": median(
                [item["server_cpu_ms_per_upload"] for item in small if item["uploads"]]
            ),
            "idle_largest_ok": idle[0]["largest_ok"] if idle else None,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, help="write every number here as JSON")
    parser.add_argument("--rounds", type=int, help="rounds per server (3; --quick 1)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: /dev/shm)")
    args = parser.parse_args(argv)
    if args.serve:
        if args.data_dir is None:
            parser.error("--serve needs --data-dir")
        return serve_main(args.serve, args.data_dir)

    quick = args.quick
    params = {
        "quick": quick,
        "rounds": args.rounds or (1 if quick else 3),
        "big_uploads": 8 if quick else 32,
        "big_mib": 8 if quick else 64,
        "small_kib": 10,
        "small_threads": 8,
        "small_seconds": 2.0 if quick else 10.0,
        "idle_steps": [50, 200] if quick else [50, 100, 200, 400, 800, SERVER_NOFILE],
        "server_nofile": SERVER_NOFILE,
        "nofile_idle": SMALL_NOFILE_IDLE,
        "nofile_cpu_s": 1.0 if quick else 3.0,
        "client_md5_check": False,
        "client_max_connections": "uploads (big), threads (small)",
    }
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4 * SERVER_NOFILE + 256)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    facts = {
        **machine_facts(),
        "cheroot": importlib.metadata.version("cheroot"),
        "load_average_start": load_average(),
        "client_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "old_gateway": f"{OLD_REVISION}:{OLD_PATH}",
        **git_facts(),
    }
    log(f"machine: {json.dumps(facts)}")
    base = args.workdir
    if base is None:
        shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
        need = 3 * params["big_uploads"] * params["big_mib"] * MIB
        base = Path("/dev/shm") if shm and shm.free > need else None
    facts["scratch"] = str(base or tempfile.gettempdir())
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": facts,
        "parameters": params,
        "big": [],
        "small": [],
        "idle": [],
        "fd_exhaustion": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench_server.", dir=base) as scratch_name,
        open(Path(scratch_name) / "servers.stderr", "w+", encoding="utf-8") as stderr,
    ):
        scratch = Path(scratch_name)
        sources_dir = scratch / "sources"
        sources_dir.mkdir()
        log(f"writing {params['big_uploads']} x {params['big_mib']} MiB sources to {sources_dir}")
        sources = write_sources(sources_dir, params["big_uploads"], params["big_mib"] * MIB)
        digests = [file_md5(path) for path in sources]
        small_file = scratch / "thumb.jpg"
        small_file.write_bytes(os.urandom(params["small_kib"] * KIB))

        def each_round(run: Callable[[str, int], dict[str, Any]], into: list[Any]) -> None:
            for round_index in range(params["rounds"]):
                order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    result = run(variant, round_index)
                    into.append(result)
                    log(f"{variant} round {round_index}: {json.dumps(result)}")

        each_round(
            lambda variant, index: bench_big(variant, index, sources, digests, scratch, stderr),
            report["big"],
        )
        each_round(
            lambda variant, index: bench_small(
                variant,
                index,
                small_file,
                params["small_threads"],
                params["small_seconds"],
                scratch,
                stderr,
            ),
            report["small"],
        )
        for variant in VARIANTS:
            report["idle"].append(bench_idle(variant, params["idle_steps"], scratch, stderr))
        for variant in VARIANTS:
            report["fd_exhaustion"].append(
                bench_fd_exhaustion(
                    variant, SMALL_NOFILE_IDLE, params["nofile_cpu_s"], scratch, stderr
                )
            )
        stderr.seek(0)
        report["server_stderr"] = stderr.read()[-20000:]

    report["load_average_end"] = load_average()
    report["summary"] = summary = summarize(report)
    old_speed, new_speed = summary["old"]["big_mib_s"], summary["new"]["big_mib_s"]
    holds = new_speed >= old_speed
    report["verdict"] = {
        "new_upload_throughput_not_below_old": holds,
        "text": (
            f"new upload throughput {new_speed:.0f} MiB/s vs old {old_speed:.0f} MiB/s "
            f"(medians of {params['rounds']} rounds): "
            + ("**not below the old one: met**" if holds else "**BELOW the old one: missed**")
        ),
    }
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failures = [item for item in report["big"] + report["small"] if item["errors"]]
    return 0 if holds and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
