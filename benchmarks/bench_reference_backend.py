"""Reference backend under load: concurrent streamed uploads, memory, hang-ups.

Run from the repository root::

    python benchmarks/bench_reference_backend.py --json docs/bench_reference_backend.json

Issue 3 asks that the reference backend "holds up under 32 concurrent streamed uploads
of 64 MiB with memory that does not grow with body size", and that "a client that
disconnects mid-PUT leaves no partial object and no row". One run checks both:

1. For each body size (``--sizes-mib``, 8 and 64 by default) a fresh
   ``python -m ctrlupload serve --port 0`` (local store, SQLite, data dir in a temp
   dir) runs in its own process. After one warm-up upload, its VmRSS is the baseline
   and its VmHWM is reset (``/proc/PID/clear_refs``). Then ``--uploads`` (32) distinct
   files go up at once from a ``ThreadPoolExecutor`` of ``--workers`` (32) threads
   sharing one ``BackendPresignedStorageProvider`` (STORAGE_MAX_CONNECTIONS = workers,
   STORAGE_VERIFY_MD5 on): presign, streamed PUT, complete. A separate sampler process
   reads the server's VmRSS and thread count every ``--sample-ms`` (10) ms; VmHWM after
   the run is the kernel's exact peak. Afterwards every object file must have the
   right size, every SQLite row the right size and ETag, and staging/ must be empty.
   Memory that does not grow with body size shows as the same growth for 8 MiB and
   64 MiB bodies, far below the bytes in flight.
2. Disconnect mid-PUT, on the last server: a raw socket sends the head of a really
   presigned PUT announcing 64 MiB, then 1 MiB of body; once the server has staged
   that MiB the client closes (FIN, then in a second round aborts with RST). Then no
   object file, no row and nothing in staging/ may remain, a ``complete`` for the key
   must be refused with 409, and the server must still take a full upload.

The server is stopped with SIGTERM and must exit 0. Everything the server printed on
stderr is kept in the JSON; lines that start a traceback are counted in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402

import ctrlupload  # noqa: E402
from ctrlupload import BackendPresignedStorageProvider, Settings, StorageResult  # noqa: E402
from ctrlupload.server._local import RECEIVE_BLOCK_BYTES  # noqa: E402
from tests.support.raw_client import hang_up, presign_put, start_partial_put  # noqa: E402
from tests.support.serve_process import ServeProcess, child_env  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
KEY = "videos/V-LOAD/S-{size}M/JOB-{index:02d}/video.mp4"
GONE_KEY = "videos/V-LOAD/S-GONE/JOB-{variant}/video.mp4"
#: What one streaming upload may hold: the block being received plus the previous one,
#: which ``block = body.read(...)`` keeps alive until the new one is in.
PER_UPLOAD_BOUND_BYTES = 2 * RECEIVE_BLOCK_BYTES
#: Allocator and thread-stack slack on top of the per-upload bound.
SLACK_MIB = 16.0
_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_")


# -- /proc -------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and Threads, from /proc/PID/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                found[name] = int(value.split()[0])
    return found


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _sampler_main(pid: int, interval_s: float, conn: Connection) -> None:
    """Sample the server every ``interval_s`` until told to stop; send the samples back."""
    samples: list[tuple[float, int, int]] = []
    started = time.monotonic()
    next_tick = started
    conn.send("ready")
    while not conn.poll():
        with contextlib.suppress(OSError, KeyError):
            status = proc_status(pid)
            samples.append((time.monotonic() - started, status["VmRSS"], status["Threads"]))
        next_tick += interval_s
        time.sleep(max(0.0, next_tick - time.monotonic()))
    conn.send(samples)


class Sampler:
    """A separate process sampling another one's VmRSS, clear of this process's GIL."""

    def __init__(self, pid: int, interval_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_sampler_main, args=(pid, interval_s, child), daemon=True
        )
        self._process.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("sampler did not start")

    def stop(self) -> list[tuple[float, int, int]]:
        self._conn.send("stop")
        samples: list[tuple[float, int, int]] = self._conn.recv()
        self._process.join(10)
        return samples


# -- helpers ---------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) / MIB:.1f} GiB"
                break
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "mem_total": mem_total,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "requests": requests.__version__,
        "urllib3": importlib.metadata.version("urllib3"),
        "ctrlupload": ctrlupload.__version__,
    }


def write_sources(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` files of ``size`` bytes: one random body, made distinct by a prefix."""
    body = bytearray(os.urandom(size))
    paths = []
    for index in range(count):
        body[:16] = index.to_bytes(16, "big")
        path = folder / f"render-{index:02d}.mp4"
        path.write_bytes(body)
        paths.append(path)
    return paths


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def serve_env() -> dict[str, str]:
    drop = [name for name in os.environ if name.startswith(_SETTING_PREFIXES)]
    return child_env(drop=drop)


def provider_for(serve: ServeProcess, workers: int) -> BackendPresignedStorageProvider:
    assert serve.token is not None
    return BackendPresignedStorageProvider(
        Settings.from_mapping(
            {
                "STORAGE_PROVIDER": "backend_presigned",
                "BACKEND_BASE_URL": serve.base_url,
                "BACKEND_SERVICE_TOKEN": serve.token,
                "STORAGE_MAX_CONNECTIONS": workers,
                "STORAGE_VERIFY_MD5": True,
                # The client's default cap (100 MB) would refuse --sizes-mib over 95.
                "VIDEO_MAX_UPLOAD_BYTES": 5 * 1024 * MIB,
            }
        )
    )


def read_rows(db_path: Path) -> dict[str, tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT object_key, size_bytes, etag FROM assets").fetchall()
    return {key: (size, etag) for key, size, etag in rows}


def traceback_count(text: str) -> int:
    return sum(line.startswith("Traceback (most recent call last)") for line in text.splitlines())


def mib(kib: float) -> float:
    return kib / KIB


# -- 1. concurrent uploads ---------------------------------------------------------------


def bench_concurrent(
    serve: ServeProcess,
    data_dir: Path,
    sources: list[Path],
    size_mib: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    keys = [KEY.format(size=size_mib, index=index) for index in range(len(sources))]
    with provider_for(serve, args.workers) as storage:
        # Warm-up: imports, first connections and the SQLite file exist before the baseline.
        warm = data_dir.parent / "warm.bin"
        warm.write_bytes(os.urandom(MIB))
        storage.put_file(warm, "videos/V-LOAD/S-WARM/JOB-0/warm.mp4")
        time.sleep(0.3)
        baseline = proc_status(serve.pid)
        hwm_reset = reset_peak_rss(serve.pid)
        cpu_before = proc_cpu_s(serve.pid)
        sampler = Sampler(serve.pid, args.sample_ms / 1000)

        errors: list[str] = []
        results: dict[str, StorageResult] = {}

        # Every worker waits for the others, so all bodies are in flight together even
        # when they are small enough to finish before the last thread would start.
        all_started = threading.Barrier(min(args.workers, len(sources)), timeout=60)

        def upload(index: int) -> None:
            try:
                if index < all_started.parties:
                    all_started.wait()
                results[keys[index]] = storage.put_file(sources[index], keys[index])
            except Exception as exc:
                errors.append(f"{keys[index]}: {type(exc).__name__}: {exc}")

        started = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(upload, range(len(sources))))
        wall_s = time.perf_counter() - started

        samples = sampler.stop()
        after = proc_status(serve.pid)
        cpu_s = proc_cpu_s(serve.pid) - cpu_before

    rows = read_rows(data_dir / "assets.sqlite3")
    objects_ok = rows_ok = 0
    for source, key in zip(sources, keys, strict=True):
        expected_size = source.stat().st_size
        stored = data_dir / "objects" / key
        if stored.is_file() and stored.stat().st_size == expected_size:
            objects_ok += 1
        result = results.get(key)
        expected_etag = f'"{file_md5(source)}"'
        if (
            rows.get(key) == (expected_size, expected_etag)
            and result is not None
            and result.etag == expected_etag
        ):
            rows_ok += 1
    staging_left = len(list((data_dir / "staging").iterdir()))

    sampled_peak_kib = max((rss for _, rss, _ in samples), default=0)
    peak_kib = max(sampled_peak_kib, after["VmHWM"] if hwm_reset else 0)
    intervals = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    total_bytes = sum(source.stat().st_size for source in sources)
    # Peak RSS in each quarter of the run: flat when memory does not build up per byte.
    quarters = [0, 0, 0, 0]
    for at, rss, _ in samples:
        quarter = min(3, int(4 * at / wall_s)) if wall_s else 0
        quarters[quarter] = max(quarters[quarter], rss)
    return {
        "body_mib": size_mib,
        "uploads": len(sources),
        "workers": args.workers,
        "total_mib": total_bytes / MIB,
        "wall_s": wall_s,
        "aggregate_mib_s": total_bytes / MIB / wall_s,
        "server_cpu_s": cpu_s,
        "baseline_rss_mib": mib(baseline["VmRSS"]),
        "sampled_peak_rss_mib": mib(sampled_peak_kib),
        "vmhwm_peak_rss_mib": mib(after["VmHWM"]) if hwm_reset else None,
        "peak_rss_mib": mib(peak_kib),
        "growth_mib": mib(peak_kib - baseline["VmRSS"]),
        "rss_after_mib": mib(after["VmRSS"]),
        "peak_rss_by_quarter_mib": [mib(kib) for kib in quarters],
        "peak_threads": max((threads for _, _, threads in samples), default=0),
        "samples": len(samples),
        "mean_sample_interval_ms": 1000 * sum(intervals) / len(intervals) if intervals else None,
        "errors": errors,
        "objects_ok": objects_ok,
        "rows_ok": rows_ok,
        "staging_left": staging_left,
        "server_tracebacks": traceback_count(serve.stderr),
    }


# -- 2. disconnect mid-PUT -------------------------------------------------------------


def bench_disconnect(serve: ServeProcess, data_dir: Path, *, reset: bool) -> dict[str, Any]:
    assert serve.token is not None
    variant = "rst" if reset else "fin"
    key = GONE_KEY.format(variant=variant)
    announced = 64 * MIB
    staging = data_dir / "staging"
    tracebacks_before = traceback_count(serve.stderr)
    presign = presign_put(serve.base_url, serve.token, key, "video/mp4", announced)
    conn = start_partial_put(presign["upload_url"], presign["headers"], announced, MIB)
    deadline = time.monotonic() + 10
    staged = False
    try:
        while time.monotonic() < deadline and not staged:
            staged = any(part.stat().st_size >= MIB for part in staging.glob("*.part"))
            time.sleep(0.005)
    finally:
        hung_up_at = time.perf_counter()
        hang_up(conn, reset=reset)
    cleaned = False
    while time.monotonic() < deadline and not cleaned:
        cleaned = not any(staging.iterdir())
        time.sleep(0.005)
    cleanup_s = time.perf_counter() - hung_up_at
    time.sleep(0.2)  # "after a moment": let anything late land before looking
    complete = requests.post(
        f"{serve.base_url}/internal/storage/complete",
        json={
            "object_key": key,
            "etag": '"00000000000000000000000000000000"',
            "size_bytes": announced,
            "content_type": "video/mp4",
            "public_url": presign["public_url"],
        },
        headers={"Authorization": f"Bearer {serve.token}"},
        timeout=10,
    )
    row_absent = key not in read_rows(data_dir / "assets.sqlite3")
    object_absent = not (data_dir / "objects" / key).exists()
    staging_left = len(list(staging.iterdir()))
    healthy = requests.get(f"{serve.base_url}/healthz", timeout=10).status_code == 200
    return {
        "variant": variant,
        "announced_mib": announced / MIB,
        "sent_mib": 1,
        "staged_before_hang_up": staged,
        "cleanup_s": cleanup_s if cleaned else None,
        "object_absent": object_absent,
        "row_absent": row_absent,
        "staging_left": staging_left,
        "complete_status": complete.status_code,
        "server_healthy_after": healthy,
        "server_tracebacks": traceback_count(serve.stderr) - tracebacks_before,
        "ok": staged
        and cleaned
        and object_absent
        and row_absent
        and staging_left == 0
        and complete.status_code == 409
        and healthy,
    }


# -- report ----------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    lines = [
        f"# bench_reference_backend ({facts['date']})",
        "",
        f"Machine: {facts['cpu_model']}, nproc {facts['nproc']}, {facts['mem_total']} RAM, "
        f"Linux {facts['kernel']}; Python {facts['python']}, requests {facts['requests']}, "
        f"urllib3 {facts['urllib3']}, ctrlupload {facts['ctrlupload']}",
        "",
        f"Command: `{report['command']}`",
        "",
        "## 1. Concurrent streamed uploads (server = `python -m ctrlupload serve`, local store)",
        "",
        "| body | uploads x workers | total MiB | wall s | aggregate MiB/s | server CPU s "
        "| server RSS baseline MiB | peak MiB (sampled / VmHWM) | growth MiB "
        "| peak threads | errors | objects ok | rows ok | staging left | server tracebacks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["concurrent"]:
        hwm = row["vmhwm_peak_rss_mib"]
        lines.append(
            f"| {row['body_mib']} MiB | {row['uploads']} x {row['workers']} "
            f"| {row['total_mib']:.0f} | {row['wall_s']:.2f} | {row['aggregate_mib_s']:.0f} "
            f"| {row['server_cpu_s']:.1f} | {row['baseline_rss_mib']:.1f} "
            f"| {row['sampled_peak_rss_mib']:.1f} / {'n/a' if hwm is None else f'{hwm:.1f}'} "
            f"| **{row['growth_mib']:.1f}** | {row['peak_threads']} | {len(row['errors'])} "
            f"| {row['objects_ok']}/{row['uploads']} | {row['rows_ok']}/{row['uploads']} "
            f"| {row['staging_left']} | {row['server_tracebacks']} |"
        )
    verdict = report["verdict"]
    lines += [
        "",
        f"Samples every {report['parameters']['sample_ms']} ms from a separate process "
        f"(mean interval "
        + ", ".join(
            f"{row['mean_sample_interval_ms']:.1f} ms"
            for row in report["concurrent"]
            if row["mean_sample_interval_ms"] is not None
        )
        + "); growth = max(sampled peak, VmHWM) - baseline VmRSS after a warm-up upload.",
        "",
        f"Memory vs body size: growth {verdict['growth_smallest_mib']:.1f} MiB with "
        f"{verdict['smallest_body_mib']} MiB bodies, {verdict['growth_largest_mib']:.1f} MiB "
        f"with {verdict['largest_body_mib']} MiB bodies ({verdict['body_ratio']:.0f}x the "
        f"bytes, {verdict['growth_ratio']:.2f}x the growth); bound {verdict['bound_mib']:.0f} "
        f"MiB = {report['parameters']['workers']} uploads x "
        f"{PER_UPLOAD_BOUND_BYTES // MIB} MiB receive blocks + {SLACK_MIB:.0f} MiB slack, "
        f"vs {verdict['largest_in_flight_mib']:.0f} MiB of bodies in flight: "
        f"**{'bounded by concurrency, not body size' if verdict['bounded'] else 'NOT BOUNDED'}**",
        "",
        "## 2. Client disconnects mid-PUT (signed for 64 MiB, 1 MiB sent, then hang-up)",
        "",
        "| hang-up | staged 1 MiB first | cleanup s | object absent | row absent "
        "| staging left | complete answered | healthy after | server tracebacks | result |",
        "|---|---|---:|---|---|---:|---:|---|---:|---|",
    ]
    for row in report["disconnect"]:
        cleanup = "never" if row["cleanup_s"] is None else f"{row['cleanup_s']:.3f}"
        lines.append(
            f"| {row['variant'].upper()} | {row['staged_before_hang_up']} | {cleanup} "
            f"| {row['object_absent']} | {row['row_absent']} | {row['staging_left']} "
            f"| {row['complete_status']} | {row['server_healthy_after']} "
            f"| {row['server_tracebacks']} | {'ok' if row['ok'] else 'FAILED'} |"
        )
    lines += [
        "",
        "Server exits after SIGTERM: "
        + ", ".join(str(code) for code in report["server_exit_codes"])
        + f"; tracebacks on server stderr in all: {report['server_tracebacks']} "
        "(all from the hang-ups in section 2: the server reports a client's hang-up as its own "
        "failure)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="write the full results here as JSON")
    parser.add_argument(
        "--sizes-mib", default="8,64", help="body sizes to compare, comma-separated (8,64)"
    )
    parser.add_argument("--uploads", type=int, default=32, help="uploads per size (32)")
    parser.add_argument("--workers", type=int, default=32, help="client threads (32)")
    parser.add_argument("--sample-ms", type=float, default=10.0, help="RSS sampling period (10)")
    parser.add_argument("--workdir", type=Path, help="where to put files (default: a temp dir)")
    args = parser.parse_args(argv)
    sizes = sorted(int(part) for part in args.sizes_mib.split(","))

    facts = machine_facts()
    print(f"machine: {json.dumps(facts)}", file=sys.stderr)
    concurrent: list[dict[str, Any]] = []
    disconnect: list[dict[str, Any]] = []
    exit_codes: list[int | None] = []
    server_stderr: list[str] = []
    for size_mib in sizes:
        with tempfile.TemporaryDirectory(
            prefix="bench_reference_backend.", dir=args.workdir
        ) as scratch:
            workdir = Path(scratch)
            sources_dir = workdir / "sources"
            sources_dir.mkdir()
            print(
                f"writing {args.uploads} x {size_mib} MiB sources to {sources_dir}",
                file=sys.stderr,
            )
            sources = write_sources(sources_dir, args.uploads, size_mib * MIB)
            data_dir = workdir / "backend"
            with ServeProcess(data_dir, env=serve_env(), cwd=workdir) as serve:
                print(f"server pid {serve.pid} at {serve.base_url}", file=sys.stderr)
                row = bench_concurrent(serve, data_dir, sources, size_mib, args)
                concurrent.append(row)
                print(f"{size_mib} MiB: {json.dumps(row)}", file=sys.stderr)
                if size_mib == sizes[-1]:
                    for reset in (False, True):
                        result = bench_disconnect(serve, data_dir, reset=reset)
                        disconnect.append(result)
                        print(f"disconnect: {json.dumps(result)}", file=sys.stderr)
                exit_codes.append(serve.stop(signal.SIGTERM, timeout_s=10))
                server_stderr.append(serve.stderr)

    smallest, largest = concurrent[0], concurrent[-1]
    bound_mib = args.workers * PER_UPLOAD_BOUND_BYTES / MIB + SLACK_MIB
    verdict = {
        "smallest_body_mib": smallest["body_mib"],
        "largest_body_mib": largest["body_mib"],
        "body_ratio": largest["body_mib"] / smallest["body_mib"],
        "growth_smallest_mib": smallest["growth_mib"],
        "growth_largest_mib": largest["growth_mib"],
        "growth_ratio": largest["growth_mib"] / max(smallest["growth_mib"], 0.1),
        "bound_mib": bound_mib,
        "largest_in_flight_mib": largest["body_mib"] * min(largest["uploads"], args.workers),
        "bounded": all(row["growth_mib"] <= bound_mib for row in concurrent),
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": facts,
        "parameters": {
            "sizes_mib": sizes,
            "uploads": args.uploads,
            "workers": args.workers,
            "sample_ms": args.sample_ms,
        },
        "concurrent": concurrent,
        "disconnect": disconnect,
        "verdict": verdict,
        "server_exit_codes": exit_codes,
        "server_tracebacks": sum(traceback_count(text) for text in server_stderr),
        "server_stderr": server_stderr,
    }
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    passed = (
        all(
            not row["errors"]
            and row["objects_ok"] == row["uploads"]
            and row["rows_ok"] == row["uploads"]
            and row["staging_left"] == 0
            for row in concurrent
        )
        and all(row["ok"] for row in disconnect)
        and verdict["bounded"]
        and all(code == 0 for code in exit_codes)
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
