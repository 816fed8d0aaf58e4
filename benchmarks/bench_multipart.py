"""Multipart uploads: speed and memory, a per-connection cap, and resume after a kill.

Run from the repository root::

    python benchmarks/bench_multipart.py --json docs/bench_multipart.json

Issue 4's "Numbers", measured in one run against the reference backend
(``python -m ctrlupload serve``, local store) in a separate process:

1. **Speed and memory.** A 2 GiB random file goes to the server on loopback, single
   stream (STORAGE_MULTIPART=never) and multipart (STORAGE_MULTIPART=always, with each
   ``--concurrency``, 4 and 8 by default), in interleaved rounds (``--rounds``, 3);
   the table shows medians. Every upload runs in a fresh client process. After imports,
   provider creation and a 1 KiB warm-up upload, the client resets its VmHWM and
   reports its VmRSS as the baseline; a separate sampler process then reads the
   client's VmRSS every ``--sample-ms`` (10) ms during the upload, and the client reads
   its own VmHWM at the end. Growth = max(sampled peak, VmHWM) - baseline. Targets:
   multipart >= 0.8x single stream; growth <= 64 MiB + concurrency x 1 MiB.
2. **Per-connection cap.** A throttling TCP proxy (``tests/support/throttle_proxy.py``,
   in its own process) caps each connection at ``--cap-mib`` (20) MiB/s per direction,
   the way S3 caps one stream. The server runs with ``--public-url`` set to the proxy,
   so its presigned upload URLs point there, and the client's BACKEND_BASE_URL is the
   proxy too: every byte the server receives is counted at the proxy. First the proxy
   alone is calibrated with raw sockets (1 and 8 connections into a counting sink), then
   a ``--cap-size-mib`` (512) file goes up single stream and 8-way multipart, interleaved,
   ``--cap-rounds`` (3) rounds. Target: 8-way >= 6x single stream.
3. **Resume.** A client process uploads a ``--resume-size-mib`` (1024) file with
   ``resume=True`` and concurrency ``--resume-concurrency`` (4) through the proxy. It
   reports progress on its stdout; once it reports >= ``--kill-at`` (50 %), this process
   SIGKILLs it. After the proxy has closed the killed connections, its counters are
   zeroed and a second process runs the same ``put_file(..., resume=True)``. The bytes
   the proxy forwarded to the server during that second run must be <= 55 % of the
   file. The stored object's MD5 must equal the source's, a checkpoint must exist after
   the kill and be gone after the resume. ``--resume-rounds`` (3) independent rounds;
   every one must meet the target.

Every stored object is checked: size always, MD5 against the source in the first round of
each variant (all of them in section 3). Objects are deleted through the backend after
each upload, and ``os.sync()`` runs before each, so no upload pays for the previous one's
page-cache writeback. Each run also records the CPU time of the client, the server, the
proxy and of everything else on the machine (kernel writeback threads, other processes:
a large "other" figure means the run competed with something). Markdown tables go to
stdout, progress to stderr, every number to ``--json``. Exit status 1 when a check fails
or a target is missed.

``--single-only`` runs sections 1 and 2 without multipart (and skips 3): a self-test
of the harness for a client without multipart support.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import requests  # noqa: E402
from bench_reference_backend import (  # noqa: E402
    Sampler,
    file_md5,
    machine_facts,
    proc_cpu_s,
    proc_status,
    reset_peak_rss,
    serve_env,
    traceback_count,
)

from ctrlupload import BackendPresignedStorageProvider, Settings  # noqa: E402
from tests.support.serve_process import ServeProcess, child_env  # noqa: E402
from tests.support.throttle_proxy import CountingSink, ThrottleProxyProcess  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
CONTENT_TYPE = "video/mp4"
#: Issue 4's memory target: 64 MiB + concurrency x 1 MiB (single stream: 64 MiB).
RSS_BASE_BOUND_MIB = 64.0
RSS_PER_PART_MIB = 1.0
SPEED_TARGET = 0.8
CAP_TARGET = 6.0
RESUME_TARGET = 0.55
_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_")


# -- the client child process --------------------------------------------------------------


def client_main(spec: dict[str, Any]) -> int:
    """One upload in a fresh interpreter; JSON lines on stdout, "go" on stdin.

    Events: ``ready`` (baseline taken), ``progress`` (every ``progress_step_bytes``),
    then ``done`` or ``error``.
    """
    lock = threading.Lock()

    def emit(**event: Any) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    settings = Settings.from_mapping(spec["settings"])
    with BackendPresignedStorageProvider(settings) as storage:
        storage.put_file(spec["warm_path"], spec["warm_key"], CONTENT_TYPE)
        gc.collect()
        time.sleep(0.2)
        pid = os.getpid()
        hwm_reset = reset_peak_rss(pid)
        baseline = proc_status(pid)
        emit(event="ready", rss_kib=baseline["VmRSS"], hwm_reset=hwm_reset)
        if sys.stdin.readline().strip() != "go":
            return 2

        step = spec.get("progress_step_bytes") or 0
        state = {"calls": 0, "last": -1, "backwards": 0, "next": step, "total": 0}

        def progress(done: int, total: int) -> None:
            with lock:
                state["calls"] += 1
                if done < state["last"]:
                    state["backwards"] += 1
                state["last"] = done
                state["total"] = total
                report = step and (done >= state["next"] or done == total)
                if report:
                    state["next"] = (done // step + 1) * step
            if report:
                emit(event="progress", done=done, total=total, at=time.perf_counter())

        kwargs: dict[str, Any] = {"progress": progress}
        if spec.get("resume"):
            kwargs["resume"] = True
        cpu_before = time.process_time()
        started = time.perf_counter()
        try:
            result = storage.put_file(spec["path"], spec["key"], CONTENT_TYPE, **kwargs)
        except Exception as exc:
            emit(
                event="error",
                error=f"{type(exc).__name__}: {exc}",
                seconds=time.perf_counter() - started,
            )
            return 1
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_before
        after = proc_status(pid)
        emit(
            event="done",
            seconds=seconds,
            started_at=started,
            cpu_s=cpu_s,
            etag=result.etag,
            url=result.url,
            size_bytes=result.size_bytes,
            vmhwm_kib=after["VmHWM"],
            rss_after_kib=after["VmRSS"],
            progress_calls=state["calls"],
            progress_last=state["last"],
            progress_total=state["total"],
            progress_backwards=state["backwards"],
        )
    return 0


def run_client(
    spec: dict[str, Any],
    *,
    cwd: Path,
    sample_ms: float,
    kill_at: float | None = None,
    on_ready: Callable[[], None] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run :func:`client_main` in a fresh interpreter, sampling its VmRSS from outside.

    ``on_ready`` runs after the child's warm-up upload, just before the measured one
    starts (the proxy's counters are zeroed there). With ``kill_at`` (a fraction),
    SIGKILL the child when it reports that much progress.
    """
    drop = [name for name in os.environ if name.startswith(_SETTING_PREFIXES)]
    # Write back what earlier uploads left dirty, so this one does not pay for them.
    os.sync()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "_client", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=child_env(drop=drop),
        cwd=cwd,
    )
    assert process.stdin is not None and process.stdout is not None
    stderr: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    events: list[dict[str, Any]] = []
    ready: dict[str, Any] | None = None
    sampler: Sampler | None = None
    killed: dict[str, Any] | None = None
    try:
        for line in process.stdout:
            if not line.startswith("{"):
                stderr.append(f"[stdout] {line}")
                continue
            event = json.loads(line)
            if event["event"] == "ready":
                ready = event
                if on_ready is not None:
                    on_ready()
                sampler = Sampler(process.pid, sample_ms / 1000)
                process.stdin.write("go\n")
                process.stdin.flush()
            elif event["event"] == "progress":
                events.append(event)
                if (
                    kill_at is not None
                    and killed is None
                    and event["done"] >= kill_at * event["total"]
                ):
                    os.kill(process.pid, signal.SIGKILL)
                    killed = {"done": event["done"], "total": event["total"]}
            else:
                events.append(event)
        process.wait(30)
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait(10)
        samples = sampler.stop() if sampler is not None else []
        reader.join(10)
    final = next((e for e in events if e["event"] in ("done", "error")), None)
    result: dict[str, Any] = {
        "exit_code": process.returncode,
        "killed": killed,
        "baseline_rss_mib": ready["rss_kib"] / KIB if ready else None,
        "samples": len(samples),
        "stderr": "".join(stderr)[-20_000:],
        "progress_events": sum(e["event"] == "progress" for e in events),
        "last_progress": next(
            (e["done"] for e in reversed(events) if e["event"] == "progress"), None
        ),
    }
    if final is not None:
        result.update({k: v for k, v in final.items() if k != "event"})
        result["ok"] = final["event"] == "done"
    else:
        result["ok"] = False
        result["error"] = result.get("error") or f"no result (exit {process.returncode})"
    if ready is not None and samples:
        sampled_peak = max(rss for _, rss, _ in samples)
        hwm = final.get("vmhwm_kib") if final and ready["hwm_reset"] else None
        peak = max(sampled_peak, hwm or 0)
        result.update(
            {
                "sampled_peak_rss_mib": sampled_peak / KIB,
                "vmhwm_rss_mib": None if hwm is None else hwm / KIB,
                "rss_growth_mib": (peak - ready["rss_kib"]) / KIB,
                "peak_threads": max(threads for _, _, threads in samples),
            }
        )
    return result


# -- helpers -----------------------------------------------------------------------------


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes; returns their MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    block = 64 * MIB
    with open(path, "wb") as handle:
        left = size
        while left:
            data = os.urandom(min(block, left))
            digest.update(data)
            handle.write(data)
            left -= len(data)
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def client_settings(
    base_url: str,
    token: str,
    *,
    concurrency: int | None,
    part_mib: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The child's settings: multipart never (``concurrency`` None) or always.

    ``part_mib`` sets STORAGE_MULTIPART_PART_BYTES; None keeps the library's default.
    """
    settings: dict[str, Any] = {
        "STORAGE_PROVIDER": "backend_presigned",
        "BACKEND_BASE_URL": base_url,
        "BACKEND_SERVICE_TOKEN": token,
        # The client's default cap (100 MB) refuses large renders; see the README.
        "VIDEO_MAX_UPLOAD_BYTES": 64 * GIB,
    }
    if concurrency is None:
        settings["STORAGE_MULTIPART"] = "never"
    else:
        settings["STORAGE_MULTIPART"] = "always"
        settings["STORAGE_MULTIPART_CONCURRENCY"] = concurrency
        if part_mib is not None:
            settings["STORAGE_MULTIPART_PART_BYTES"] = part_mib * MIB
    settings.update(extra or {})
    return settings


def delete_object(base_url: str, token: str, key: str) -> None:
    requests.post(
        f"{base_url}/internal/storage/delete",
        json={"object_key": key},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).raise_for_status()


def verify_object(
    data_dir: Path, key: str, size: int, md5: str | None, result: dict[str, Any]
) -> dict[str, Any]:
    """Check the stored file: size always, content when ``md5`` is given."""
    stored = data_dir / "objects" / key
    checks: dict[str, Any] = {"stored_size_ok": stored.is_file() and stored.stat().st_size == size}
    if md5 is not None:
        checks["stored_md5_ok"] = stored.is_file() and file_md5(stored) == md5
    checks["result_size_ok"] = result.get("size_bytes") == size
    checks["progress_ok"] = (
        result.get("progress_last") == size and result.get("progress_backwards") == 0
    )
    checks["verified"] = all(checks.values())
    return checks


def machine_cpu_s() -> tuple[float, float, float]:
    """(busy, iowait, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, _idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, iowait / ticks, steal / ticks


class CpuMeter:
    """CPU time of the server (and proxy) and of the whole machine from :meth:`mark` on.

    :meth:`mark` runs when the client is ready (after its warm-up upload), so the
    warm-up is not counted; with a proxy it also zeroes the proxy's counters.
    """

    def __init__(self, server_pid: int, proxy: ThrottleProxyProcess | None = None) -> None:
        self._server_pid = server_pid
        self._proxy = proxy
        self.mark()

    def _now(self) -> tuple[float, ...]:
        proxy_s = (
            proc_cpu_s(self._proxy.pid) if self._proxy is not None and self._proxy.pid else 0.0
        )
        return (time.monotonic(), proc_cpu_s(self._server_pid), proxy_s, *machine_cpu_s())

    def mark(self) -> None:
        if self._proxy is not None:
            self._proxy.reset()
        self._mark = self._now()

    def since_mark(self) -> dict[str, float]:
        now = self._now()
        wall, server, proxy, busy, iowait, steal = (
            b - a for a, b in zip(self._mark, now, strict=True)
        )
        cpus = len(os.sched_getaffinity(0))
        return {
            "server_cpu_s": server,
            "proxy_cpu_s": proxy,
            "machine_busy_s": busy,
            "machine_iowait_s": iowait,
            "machine_steal_s": steal,
            "machine_busy_pct": 100 * busy / (wall * cpus) if wall else float("nan"),
        }


def other_cpu_s(run: dict[str, Any]) -> float:
    """Machine CPU time during a run that neither the client, the server nor the proxy used.

    Kernel threads (page writeback, soft interrupts) and any other process on the machine:
    a large figure means the run competed with something.
    """
    if not run.get("ok"):
        return float("nan")
    mine = run["cpu_s"] + run["server_cpu_s"] + run["proxy_cpu_s"]
    return float(run["machine_busy_s"] - mine)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mib_s(size: int, seconds: float) -> float:
    return size / MIB / seconds if seconds else float("nan")


def variant_name(concurrency: int | None) -> str:
    return "single stream" if concurrency is None else f"multipart x{concurrency}"


def rss_bound_mib(concurrency: int | None) -> float:
    return RSS_BASE_BOUND_MIB + RSS_PER_PART_MIB * (concurrency or 0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarize(
    runs: list[dict[str, Any]], size: int, concurrency: int | None, *, verified: bool = True
) -> dict[str, Any]:
    ok = [run for run in runs if run["ok"]]
    seconds = [run["seconds"] for run in ok]
    growth = [run["rss_growth_mib"] for run in ok if "rss_growth_mib" in run]
    return {
        "variant": variant_name(concurrency),
        "concurrency": concurrency,
        "runs": len(runs),
        "ok": len(ok),
        "median_s": median(seconds),
        "median_mib_s": mib_s(size, median(seconds)) if seconds else float("nan"),
        "seconds": seconds,
        "median_client_cpu_s": median([run["cpu_s"] for run in ok]),
        "median_server_cpu_s": median([run.get("server_cpu_s", float("nan")) for run in ok]),
        "median_proxy_cpu_s": median([run.get("proxy_cpu_s", float("nan")) for run in ok]),
        "median_machine_busy_pct": median(
            [run.get("machine_busy_pct", float("nan")) for run in ok]
        ),
        "median_other_cpu_s": median([run.get("other_cpu_s", float("nan")) for run in ok]),
        "max_machine_steal_s": max(
            (run.get("machine_steal_s", float("nan")) for run in ok), default=float("nan")
        ),
        "max_rss_growth_mib": max(growth, default=float("nan")),
        "rss_growth_mib": growth,
        "rss_bound_mib": rss_bound_mib(concurrency),
        "etag_example": ok[0]["etag"] if ok else None,
        "verified": verified and all(run.get("checks", {}).get("verified") for run in runs),
    }


# -- 1. speed and memory on loopback -------------------------------------------------------


def bench_speed(args: argparse.Namespace, workdir: Path, variants: list[int | None]) -> dict:
    size = args.size_mib * MIB
    source = workdir / "render-speed.bin"
    log(f"[speed] writing {args.size_mib} MiB of random data to {source}")
    md5 = write_random(source, size)
    warm = workdir / "warm.bin"
    data_dir = workdir / "speed-backend"
    rounds: list[dict[str, Any]] = []
    with ServeProcess(data_dir, env=serve_env(), cwd=workdir) as serve:
        assert serve.token is not None
        log(f"[speed] server pid {serve.pid} at {serve.base_url}")
        for round_index in range(args.rounds):
            for concurrency in variants:
                key = f"videos/V-MP/S-SPEED/JOB-{round_index}-{concurrency or 1}/render.mp4"
                spec = {
                    "settings": client_settings(
                        serve.base_url,
                        serve.token,
                        concurrency=concurrency,
                        part_mib=args.part_mib,
                    ),
                    "path": str(source),
                    "key": key,
                    "warm_path": str(warm),
                    "warm_key": f"videos/V-MP/S-WARM/JOB-{round_index}-{concurrency or 1}/w.mp4",
                }
                cpu = CpuMeter(serve.pid)
                run = run_client(spec, cwd=workdir, sample_ms=args.sample_ms, on_ready=cpu.mark)
                run.update(cpu.since_mark())
                run["other_cpu_s"] = other_cpu_s(run)
                run["round"] = round_index
                run["concurrency"] = concurrency
                run["checks"] = verify_object(
                    data_dir, key, size, md5 if round_index == 0 else None, run
                )
                if run["ok"]:
                    delete_object(serve.base_url, serve.token, key)
                rounds.append(run)
                log(
                    f"[speed] round {round_index} {variant_name(concurrency)}: "
                    + (
                        f"{run['seconds']:.2f} s, {mib_s(size, run['seconds']):.0f} MiB/s, "
                        f"RSS +{run.get('rss_growth_mib', float('nan')):.1f} MiB, "
                        f"checks {run['checks']}"
                        if run["ok"]
                        else f"FAILED: {run.get('error')} {run['stderr'][-2000:]}"
                    )
                )
        exit_code = serve.stop(signal.SIGTERM, timeout_s=10)
        server_stderr = serve.stderr
    source.unlink()
    summary = [summarize([r for r in rounds if r["concurrency"] == c], size, c) for c in variants]
    single = next((s for s in summary if s["concurrency"] is None), None)
    for row in summary:
        row["vs_single"] = (
            single["median_s"] / row["median_s"] if single and row["median_s"] else None
        )
        row["speed_met"] = row["concurrency"] is None or (
            row["vs_single"] is not None and row["vs_single"] >= SPEED_TARGET
        )
        row["rss_met"] = row["max_rss_growth_mib"] <= row["rss_bound_mib"]
    return {
        "size_bytes": size,
        "source_md5": md5,
        "rounds": rounds,
        "summary": summary,
        "server_exit_code": exit_code,
        "server_tracebacks": traceback_count(server_stderr),
        "server_stderr": server_stderr[-20_000:],
    }


# -- 2. per-connection cap -----------------------------------------------------------------


def calibrate_proxy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Raw sockets through the proxy into a counting sink: what the proxy itself delivers."""
    size = args.calibration_mib * MIB
    rows = []
    sink = CountingSink()
    try:
        with ThrottleProxyProcess(
            "127.0.0.1", sink.port, rate_bytes_per_s=args.cap_mib * MIB
        ) as proxy:
            for connections in (1, 8):
                before = len(sink.received)

                def send() -> None:
                    with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
                        block = bytes(MIB)
                        for _ in range(size // MIB):
                            conn.sendall(block)
                        conn.shutdown(socket.SHUT_WR)
                        conn.recv(1)

                threads = [threading.Thread(target=send) for _ in range(connections)]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(300)
                seconds = time.perf_counter() - started
                sink.join()
                received = sink.received[before:]
                rows.append(
                    {
                        "connections": connections,
                        "mib_each": args.calibration_mib,
                        "seconds": seconds,
                        "aggregate_mib_s": connections * size / MIB / seconds,
                        "per_connection_mib_s": size / MIB / seconds,
                        "cap_mib_s": args.cap_mib,
                        "bytes_ok": received == [size] * connections,
                    }
                )
                log(f"[cap] calibration: {rows[-1]}")
    finally:
        sink.close()
    return rows


class ProxiedServer:
    """The reference backend behind the throttling proxy: URLs and uploads go through it."""

    def __init__(self, args: argparse.Namespace, workdir: Path, name: str) -> None:
        self.data_dir = workdir / f"{name}-backend"
        self.server_port = free_port()
        self.proxy = ThrottleProxyProcess(
            "127.0.0.1", self.server_port, rate_bytes_per_s=args.cap_mib * MIB
        )
        self.serve: ServeProcess | None = None
        self._workdir = workdir

    def __enter__(self) -> ProxiedServer:
        self.proxy.start()
        self.serve = ServeProcess(
            self.data_dir,
            env=serve_env(),
            args=("--port", str(self.server_port), "--public-url", self.proxy.url),
            cwd=self._workdir,
        ).start()
        assert self.serve.base_url == self.proxy.url, self.serve.base_url
        return self

    @property
    def token(self) -> str:
        assert self.serve is not None and self.serve.token is not None
        return self.serve.token

    @property
    def direct_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def __exit__(self, *exc_info: object) -> None:
        if self.serve is not None:
            self.serve.kill()
        self.proxy.stop()


def bench_cap(args: argparse.Namespace, workdir: Path, variants: list[int | None]) -> dict:
    calibration = calibrate_proxy(args)
    size = args.cap_size_mib * MIB
    source = workdir / "render-cap.bin"
    log(f"[cap] writing {args.cap_size_mib} MiB of random data to {source}")
    md5 = write_random(source, size)
    warm = workdir / "warm.bin"
    rounds: list[dict[str, Any]] = []
    with ProxiedServer(args, workdir, "cap") as server:
        assert server.serve is not None
        log(f"[cap] server pid {server.serve.pid} at {server.direct_url}, proxy {server.proxy.url}")
        for round_index in range(args.cap_rounds):
            for concurrency in variants:
                key = f"videos/V-MP/S-CAP/JOB-{round_index}-{concurrency or 1}/render.mp4"
                spec = {
                    "settings": client_settings(
                        server.proxy.url,
                        server.token,
                        concurrency=concurrency,
                        part_mib=args.part_mib,
                    ),
                    "path": str(source),
                    "key": key,
                    "warm_path": str(warm),
                    "warm_key": f"videos/V-MP/S-WARM/CAP-{round_index}-{concurrency or 1}/w.mp4",
                }
                cpu = CpuMeter(server.serve.pid, server.proxy)
                run = run_client(spec, cwd=workdir, sample_ms=args.sample_ms, on_ready=cpu.mark)
                run.update(cpu.since_mark())
                run["other_cpu_s"] = other_cpu_s(run)
                server.proxy.wait_idle(5)
                stats = server.proxy.stats()
                run["proxy"] = proxy_summary(stats)
                run["round"] = round_index
                run["concurrency"] = concurrency
                run["checks"] = verify_object(
                    server.data_dir, key, size, md5 if round_index == 0 else None, run
                )
                if run["ok"]:
                    delete_object(server.direct_url, server.token, key)
                rounds.append(run)
                log(
                    f"[cap] round {round_index} {variant_name(concurrency)}: "
                    + (
                        f"{run['seconds']:.2f} s, {mib_s(size, run['seconds']):.1f} MiB/s, "
                        f"{run['proxy']['upload_connections']} upload connections, "
                        f"checks {run['checks']}"
                        if run["ok"]
                        else f"FAILED: {run.get('error')} {run['stderr'][-2000:]}"
                    )
                )
        assert server.serve is not None
        exit_code = server.serve.stop(signal.SIGTERM, timeout_s=10)
        server_stderr = server.serve.stderr
    source.unlink()
    summary = [summarize([r for r in rounds if r["concurrency"] == c], size, c) for c in variants]
    single = next((s for s in summary if s["concurrency"] is None), None)
    for row in summary:
        row["vs_single"] = (
            single["median_s"] / row["median_s"] if single and row["median_s"] else None
        )
        row["cap_met"] = row["concurrency"] is None or (
            row["vs_single"] is not None and row["vs_single"] >= CAP_TARGET
        )
    return {
        "size_bytes": size,
        "cap_mib_s": args.cap_mib,
        "calibration": calibration,
        "rounds": rounds,
        "summary": summary,
        "server_exit_code": exit_code,
        "server_tracebacks": traceback_count(server_stderr),
        "server_stderr": server_stderr[-20_000:],
    }


def is_upload(target: str) -> bool:
    """A presigned PUT of the local store: ``/upload/KEY`` or ``/upload-part/ID/N``."""
    return target.startswith(("/upload/", "/upload-part/"))


def part_number(target: str) -> int | None:
    """The part number of a presigned part URL: ``/upload-part/ID/N`` or ``?partNumber=N``."""
    url = urlsplit(target)
    if url.path.startswith("/upload-part/"):
        last = url.path.rstrip("/").rsplit("/", 1)[-1]
        return int(last) if last.isdigit() else None
    query = parse_qs(url.query)
    for name in ("partNumber", "part_number"):
        if name in query and query[name][0].isdigit():
            return int(query[name][0])
    return None


def proxy_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Totals of a proxy snapshot, split into uploads (PUT /upload/...) and API calls."""
    uploads = []
    api = []
    upload_connections = set()
    for conn in stats["connections"]:
        for record in conn["requests"]:
            if is_upload(record["target"]):
                uploads.append(record)
                upload_connections.add(conn["number"])
            else:
                api.append(record)
    return {
        "bytes_to_server": stats["bytes_up"],
        "bytes_to_client": stats["bytes_down"],
        "head_bytes": stats["head_bytes"],
        "body_bytes": stats["body_bytes"],
        "unparsed_bytes": stats["unparsed_bytes"],
        "connections": stats["connections_total"],
        "connections_open": stats["connections_open"],
        "upload_connections": len(upload_connections),
        "upload_requests": len(uploads),
        "upload_body_bytes": sum(r["body_bytes"] for r in uploads),
        "uploads_complete": sum(r["body_bytes"] == r["content_length"] for r in uploads),
        "uploads_cut_off": sum(r["body_bytes"] != r["content_length"] for r in uploads),
        "upload_part_numbers": sorted(
            n for n in (part_number(r["target"]) for r in uploads) if n is not None
        ),
        "cut_off_parts": [
            {"part": part_number(r["target"]), "sent_bytes": r["body_bytes"]}
            for r in uploads
            if r["body_bytes"] != r["content_length"]
        ],
        "cut_off_bytes": sum(
            r["body_bytes"] for r in uploads if r["body_bytes"] != r["content_length"]
        ),
        # Every request in start order: connection, start and end (s since the proxy's
        # counters were zeroed), what it was, body MiB, s held back by the cap, s waiting
        # for the server to read.
        "timeline": sorted(
            [
                (
                    conn["number"],
                    round(record["started_s"], 3),
                    None if record["finished_s"] is None else round(record["finished_s"], 3),
                    f"{record['method']} {urlsplit(record['target']).path}",
                    round(record["body_bytes"] / MIB, 3),
                    round(record["throttled_s"], 3),
                    round(record["drain_s"], 3),
                )
                for conn in stats["connections"]
                for record in conn["requests"]
            ],
            key=lambda row: row[1],
        ),
        "api_requests": len(api),
        "api_calls": [
            f"{r['method']} {urlsplit(r['target']).path}"
            for r in sorted(api, key=lambda r: r["started_s"])
        ],
        "api_body_bytes": sum(r["body_bytes"] for r in api),
    }


# -- 3. resume after SIGKILL ----------------------------------------------------------------


def resume_round(
    args: argparse.Namespace,
    server: ProxiedServer,
    workdir: Path,
    source: Path,
    md5: str,
    round_index: int,
) -> dict[str, Any]:
    """Kill an upload at ``--kill-at``, resume it in a new process, count what it sends."""
    size = source.stat().st_size
    resume_dir = workdir / f"resume-checkpoints-{round_index}"
    key = f"videos/V-MP/S-RESUME/JOB-{round_index}/render.mp4"
    spec = {
        "settings": client_settings(
            server.proxy.url,
            server.token,
            concurrency=args.resume_concurrency,
            part_mib=args.part_mib,
            extra={"STORAGE_RESUME_DIR": str(resume_dir)},
        ),
        "path": str(source),
        "key": key,
        "warm_path": str(workdir / "warm.bin"),
        "warm_key": f"videos/V-MP/S-WARM/RESUME-{round_index}-0/w.mp4",
        "resume": True,
        "progress_step_bytes": max(MIB, size // 400),
    }
    log(f"[resume] round {round_index}: first run, killed at {args.kill_at:.0%}")
    first = run_client(
        spec,
        cwd=workdir,
        sample_ms=args.sample_ms,
        kill_at=args.kill_at,
        on_ready=server.proxy.reset,
    )
    # The dead client's last bytes may still sit in socket buffers: let the proxy pass
    # them on and close, so none of them is counted against the resumed run.
    first["proxy_drained"] = server.proxy.wait_idle(30)
    first["proxy"] = proxy_summary(server.proxy.stats())
    checkpoints_after_kill = sorted(p.name for p in resume_dir.rglob("*") if p.is_file())
    log(f"[resume] killed run: killed={first['killed']} proxy={first['proxy']}")

    spec = {**spec, "warm_key": f"videos/V-MP/S-WARM/RESUME-{round_index}-1/w.mp4"}
    log(f"[resume] round {round_index}: second run, resume=True")
    second = run_client(spec, cwd=workdir, sample_ms=args.sample_ms, on_ready=server.proxy.reset)
    server.proxy.wait_idle(10)
    second["proxy"] = proxy_summary(server.proxy.stats())
    log(f"[resume] resumed run: ok={second['ok']} proxy={second['proxy']}")
    second["checks"] = verify_object(server.data_dir, key, size, md5, second)
    checkpoints_after = sorted(p.name for p in resume_dir.rglob("*") if p.is_file())
    if second["ok"]:
        delete_object(server.direct_url, server.token, key)
    sent = second["proxy"]["bytes_to_server"]
    return {
        "round": round_index,
        "first": first,
        "second": second,
        "checkpoints_after_kill": checkpoints_after_kill,
        "checkpoints_after_resume": checkpoints_after,
        "resumed_bytes_to_server": sent,
        "resumed_fraction": sent / size,
        "resumed_upload_body_fraction": second["proxy"]["upload_body_bytes"] / size,
        "resume_met": bool(second["ok"] and sent / size <= RESUME_TARGET),
        "verified": bool(
            first["killed"]
            and second["ok"]
            and second["checks"]["verified"]
            and checkpoints_after_kill
            and not checkpoints_after
        ),
    }


def bench_resume(args: argparse.Namespace, workdir: Path) -> dict:
    size = args.resume_size_mib * MIB
    source = workdir / "render-resume.bin"
    log(f"[resume] writing {args.resume_size_mib} MiB of random data to {source}")
    md5 = write_random(source, size)
    with ProxiedServer(args, workdir, "resume") as server:
        assert server.serve is not None
        rounds = [
            resume_round(args, server, workdir, source, md5, index)
            for index in range(args.resume_rounds)
        ]
        exit_code = server.serve.stop(signal.SIGTERM, timeout_s=10)
        server_stderr = server.serve.stderr
    source.unlink()
    fractions = [r["resumed_fraction"] for r in rounds if r["second"]["ok"]]
    return {
        "size_bytes": size,
        "source_md5": md5,
        "concurrency": args.resume_concurrency,
        "kill_at": args.kill_at,
        "rounds": rounds,
        "median_resumed_fraction": median(fractions),
        "max_resumed_fraction": max(fractions, default=float("nan")),
        "resume_met": bool(rounds) and all(r["resume_met"] for r in rounds),
        "verified": bool(rounds) and all(r["verified"] for r in rounds),
        "server_exit_code": exit_code,
        "server_tracebacks": traceback_count(server_stderr),
        "server_stderr": server_stderr[-20_000:],
    }


# -- report --------------------------------------------------------------------------------


def compact(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    runs: list[str] = []
    for number in numbers:
        if runs and "-" not in runs[-1] and int(runs[-1]) == number - 1:
            runs[-1] = f"{runs[-1]}-{number}"
        elif runs and "-" in runs[-1] and int(runs[-1].split("-")[1]) == number - 1:
            runs[-1] = f"{runs[-1].split('-')[0]}-{number}"
        else:
            runs.append(str(number))
    return ", ".join(runs) or "none"


def fmt(value: float | None, spec: str = ".2f") -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return format(value, spec)


def met(flag: bool) -> str:
    return "met" if flag else "**MISSED**"


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    lines = [
        f"# Multipart benchmark ({facts['date']})",
        "",
        f"Machine: {facts['cpu_model']}, {facts['nproc']} CPUs ({facts['affinity_cpus']} usable), "
        f"{facts['mem_total']} RAM, Linux {facts['kernel']}; CPython {facts['python']}, "
        f"requests {facts['requests']}, urllib3 {facts['urllib3']}, "
        f"ctrlupload {facts['ctrlupload']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Preferred part size {report['part_bytes'] / MIB:.0f} MiB"
        + (" (the library's default)" if report["parameters"]["part_mib"] is None else "")
        + "; load average at the start "
        + ", ".join(f"{value:.2f}" for value in report["loadavg_at_start"])
        + ".",
        "",
    ]
    verdicts = report["verdicts"]
    if verdicts:
        lines += ["| target | measured | |", "|---|---|---|"]
        lines += [f"| {v['target']} | {v['measured']} | {met(v['met'])} |" for v in verdicts]
        lines.append("")

    speed = report.get("speed")
    if speed:
        lines += [
            f"## 1. Speed and memory: {speed['size_bytes'] // MIB} MiB to the local store "
            f"on loopback ({report['parameters']['rounds']} interleaved rounds, medians)",
            "",
            "| variant | median s | MiB/s | vs single | client CPU s | server CPU s "
            "| other CPU s | machine busy % | RSS growth MiB (max) | bound MiB | ok | verified "
            "| ETag |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for row in speed["summary"]:
            lines.append(
                f"| {row['variant']} | {fmt(row['median_s'])} | {fmt(row['median_mib_s'], '.0f')} "
                f"| {fmt(row['vs_single'])} | {fmt(row['median_client_cpu_s'], '.1f')} "
                f"| {fmt(row['median_server_cpu_s'], '.1f')} "
                f"| {fmt(row['median_other_cpu_s'], '.1f')} "
                f"| {fmt(row['median_machine_busy_pct'], '.0f')} "
                f"| **{fmt(row['max_rss_growth_mib'], '.1f')}** | {row['rss_bound_mib']:.0f} "
                f"| {row['ok']}/{row['runs']} | {row['verified']} | `{row['etag_example']}` |"
            )
        lines += [
            "",
            "Per round (s): "
            + "; ".join(
                f"{row['variant']} " + ", ".join(f"{s:.2f}" for s in row["seconds"])
                for row in speed["summary"]
            ),
            "",
            "RSS growth per round (MiB): "
            + "; ".join(
                f"{row['variant']} " + ", ".join(f"{g:.1f}" for g in row["rss_growth_mib"])
                for row in speed["summary"]
            ),
            "",
        ]

    cap = report.get("cap")
    if cap:
        lines += [
            f"## 2. Per-connection cap: {cap['cap_mib_s']:.0f} MiB/s per connection "
            "(throttling proxy)",
            "",
            "Proxy calibration, raw sockets into a counting sink:",
            "",
            "| connections | MiB each | s | aggregate MiB/s | per connection MiB/s | bytes ok |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for row in cap["calibration"]:
            lines.append(
                f"| {row['connections']} | {row['mib_each']} | {row['seconds']:.2f} "
                f"| {row['aggregate_mib_s']:.1f} | {row['per_connection_mib_s']:.1f} "
                f"| {row['bytes_ok']} |"
            )
        lines += [
            "",
            f"{cap['size_bytes'] // MIB} MiB through the proxy "
            f"({report['parameters']['cap_rounds']} interleaved rounds, medians):",
            "",
            "| variant | median s | MiB/s | vs single | upload connections | upload requests "
            "| client CPU s | server CPU s | proxy CPU s | other CPU s | machine busy % "
            "| RSS growth MiB | ok | verified |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in cap["summary"]:
            runs = [r for r in cap["rounds"] if r["concurrency"] == row["concurrency"] and r["ok"]]
            conns = sorted({r["proxy"]["upload_connections"] for r in runs})
            reqs = sorted({r["proxy"]["upload_requests"] for r in runs})
            lines.append(
                f"| {row['variant']} | {fmt(row['median_s'])} | {fmt(row['median_mib_s'], '.1f')} "
                f"| **{fmt(row['vs_single'])}** | {', '.join(map(str, conns))} "
                f"| {', '.join(map(str, reqs))} | {fmt(row['median_client_cpu_s'], '.1f')} "
                f"| {fmt(row['median_server_cpu_s'], '.1f')} "
                f"| {fmt(row['median_proxy_cpu_s'], '.1f')} "
                f"| {fmt(row['median_other_cpu_s'], '.1f')} "
                f"| {fmt(row['median_machine_busy_pct'], '.0f')} "
                f"| {fmt(row['max_rss_growth_mib'], '.1f')} | {row['ok']}/{row['runs']} "
                f"| {row['verified']} |"
            )
        lines.append("")

    resume = report.get("resume")
    if resume:
        size = resume["size_bytes"]
        lines += [
            f"## 3. Resume: {size // MIB} MiB, concurrency {resume['concurrency']}, "
            f"SIGKILL at {resume['kill_at']:.0%} progress "
            f"({len(resume['rounds'])} rounds)",
            "",
            "| round | run | progress reported | bytes to server MiB | % of file "
            "| upload bodies MiB | parts complete / cut off | API calls | s | result |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in resume["rounds"]:
            killed = row["first"]["killed"] or {}
            for name, run in (("killed", row["first"]), ("resumed", row["second"])):
                proxy = run["proxy"]
                progress = killed.get("done") if name == "killed" else run.get("progress_last")
                shown = None if progress is None else 100 * progress / size
                outcome = "killed" if run["killed"] else ("ok" if run["ok"] else run.get("error"))
                lines.append(
                    f"| {row['round']} | {name} | {fmt(shown, '.1f')} % "
                    f"| {proxy['bytes_to_server'] / MIB:.1f} "
                    f"| **{100 * proxy['bytes_to_server'] / size:.1f}** "
                    f"| {proxy['upload_body_bytes'] / MIB:.1f} "
                    f"| {proxy['uploads_complete']} / {proxy['uploads_cut_off']} "
                    f"| {proxy['api_requests']} | {fmt(run.get('seconds'))} | {outcome} |"
                )
        lines.append("")
        for row in resume["rounds"]:
            first, second = row["first"], row["second"]
            cut = first["proxy"]["cut_off_parts"]
            checks = second.get("checks", {})
            lines += [
                f"Round {row['round']}: at the kill {len(cut)} parts were in flight, "
                f"{first['proxy']['cut_off_bytes'] / MIB:.1f} MiB of them already at the "
                "server and lost (a part counts only once complete)"
                + (
                    " ("
                    + ", ".join(f"part {c['part']}: {c['sent_bytes'] / MIB:.1f} MiB" for c in cut)
                    + ")"
                    if cut
                    else ""
                )
                + f". The resumed run sent parts {compact(second['proxy']['upload_part_numbers'])} "
                f"and called {', '.join(second['proxy']['api_calls'])}. Stored MD5 equals the "
                f"source: {checks.get('stored_md5_ok')}; checkpoint files after the kill "
                f"{len(row['checkpoints_after_kill'])}, after the resumed run "
                f"{len(row['checkpoints_after_resume'])}.",
                "",
            ]
    return "\n".join(lines)


def build_verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    verdicts = []
    speed = report.get("speed")
    if speed:
        single = next((r for r in speed["summary"] if r["concurrency"] is None), None)
        for row in speed["summary"]:
            if row["concurrency"] is not None and single:
                verdicts.append(
                    {
                        "target": f"{row['variant']} >= {SPEED_TARGET}x single stream "
                        f"({speed['size_bytes'] // MIB} MiB, loopback)",
                        "measured": f"{fmt(row['vs_single'])}x ({fmt(row['median_mib_s'], '.0f')} "
                        f"vs {fmt(single['median_mib_s'], '.0f')} MiB/s)",
                        "met": row["speed_met"],
                    }
                )
        for row in speed["summary"]:
            verdicts.append(
                {
                    "target": f"{row['variant']}: peak client RSS growth "
                    f"<= {row['rss_bound_mib']:.0f} MiB",
                    "measured": f"{fmt(row['max_rss_growth_mib'], '.1f')} MiB",
                    "met": row["rss_met"],
                }
            )
    cap = report.get("cap")
    if cap:
        single = next((r for r in cap["summary"] if r["concurrency"] is None), None)
        for row in cap["summary"]:
            if row["concurrency"] is not None and single:
                verdicts.append(
                    {
                        "target": f"{row['variant']} >= {CAP_TARGET}x single stream at "
                        f"{cap['cap_mib_s']:.0f} MiB/s per connection",
                        "measured": f"{fmt(row['vs_single'])}x ({fmt(row['median_mib_s'], '.1f')} "
                        f"vs {fmt(single['median_mib_s'], '.1f')} MiB/s)",
                        "met": row["cap_met"],
                    }
                )
    resume = report.get("resume")
    if resume:
        verdicts.append(
            {
                "target": f"resumed run sends <= {RESUME_TARGET:.0%} of the file "
                f"(bytes the server received; every one of {len(resume['rounds'])} rounds)",
                "measured": ", ".join(
                    f"{100 * r['resumed_fraction']:.1f} %" for r in resume["rounds"]
                ),
                "met": resume["resume_met"],
            }
        )
        verdicts.append(
            {
                "target": "resumed object byte-identical, checkpoint deleted",
                "measured": ", ".join(str(r["verified"]) for r in resume["rounds"]),
                "met": resume["verified"],
            }
        )
    return verdicts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(json.loads(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="write the full results here as JSON")
    parser.add_argument("--size-mib", type=int, default=2048, help="section 1 file (2048)")
    parser.add_argument("--rounds", type=int, default=3, help="section 1 rounds (3)")
    parser.add_argument(
        "--concurrency", default="4,8", help="section 1 multipart concurrencies (4,8)"
    )
    parser.add_argument("--cap-mib", type=float, default=20.0, help="MiB/s per connection (20)")
    parser.add_argument("--cap-size-mib", type=int, default=512, help="section 2 file (512)")
    parser.add_argument("--cap-rounds", type=int, default=3, help="section 2 rounds (3)")
    parser.add_argument(
        "--cap-concurrency", type=int, default=8, help="section 2 multipart concurrency (8)"
    )
    parser.add_argument(
        "--calibration-mib", type=int, default=64, help="MiB per raw proxy connection (64)"
    )
    parser.add_argument("--resume-size-mib", type=int, default=1024, help="section 3 file (1024)")
    parser.add_argument("--resume-concurrency", type=int, default=4, help="section 3 (4)")
    parser.add_argument("--resume-rounds", type=int, default=3, help="section 3 rounds (3)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill at this progress (0.5)")
    parser.add_argument(
        "--part-mib",
        type=int,
        help="STORAGE_MULTIPART_PART_BYTES in MiB for every multipart upload "
        "(default: the library's default)",
    )
    parser.add_argument("--sample-ms", type=float, default=10.0, help="RSS sampling period (10)")
    parser.add_argument(
        "--sections", default="speed,cap,resume", help="which sections to run (all)"
    )
    parser.add_argument(
        "--single-only",
        action="store_true",
        help="self-test without multipart: single stream in sections 1-2, no section 3",
    )
    parser.add_argument("--workdir", type=Path, help="where to put files (default: a temp dir)")
    args = parser.parse_args(argv)
    sections = {part.strip() for part in args.sections.split(",") if part.strip()}
    if args.single_only:
        speed_variants: list[int | None] = [None]
        cap_variants: list[int | None] = [None]
        sections.discard("resume")
    else:
        speed_variants = [None] + [int(c) for c in args.concurrency.split(",") if c.strip()]
        cap_variants = [None, args.cap_concurrency]

    facts = machine_facts()
    log(f"machine: {json.dumps(facts)}")
    part_bytes = (
        args.part_mib * MIB
        if args.part_mib
        else Settings.model_fields["storage_multipart_part_bytes"].default
    )
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "part_bytes": part_bytes,
        "loadavg_at_start": os.getloadavg(),
        "machine": facts,
        "parameters": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench_multipart.", dir=args.workdir) as scratch:
        workdir = Path(scratch)
        (workdir / "warm.bin").write_bytes(os.urandom(KIB))
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "speed": lambda: bench_speed(args, workdir, speed_variants),
            "cap": lambda: bench_cap(args, workdir, cap_variants),
            "resume": lambda: bench_resume(args, workdir),
        }
        for name, run in runners.items():
            if name in sections:
                started = time.perf_counter()
                report[name] = run()
                report[name]["section_wall_s"] = time.perf_counter() - started
    report["verdicts"] = build_verdicts(report)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    checks_ok = all(
        all(row["verified"] and row["ok"] == row["runs"] for row in report[name]["summary"])
        and report[name]["server_exit_code"] == 0
        for name in ("speed", "cap")
        if name in report
    ) and ("resume" not in report or report["resume"]["verified"])
    targets_ok = all(v["met"] for v in report["verdicts"])
    return 0 if checks_ok and targets_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
