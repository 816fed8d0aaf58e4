"""Soak under faults: many threads, many uploads, a share of every exchange faulted.

Run from the repository root::

    python benchmarks/bench_soak.py --json docs/bench_soak.json

The reference backend (``python -m ctrlupload serve``, local store) runs in its own
process behind ``tests/support/fault_proxy.py``, also in its own process. The proxy
carries every exchange, the API calls and the storage PUTs (the server signs URLs that
point at it), and faults ``--fault-rate`` (5 %) of them at random: a reset before the
request reaches the server, a lost answer (the server did the work), an answer cut
mid-body, a stall, a close with no answer. ``--threads`` (32) threads share one
provider and make ``--uploads`` (10,000) uploads with distinct keys: mostly small files
(``--small-kib``, 1 to 256 KiB), and every ``--multipart-every`` (100) th one an
11 MiB multipart upload in 5 MiB parts.

Afterwards every upload is checked against the backend's own data directory and
database:

* **corrupt**: reported stored, but the stored bytes differ from the source;
* **lost**: reported stored, but no object or no record;
* **raw**: an exception that is not a ``StorageError`` reached the caller;
* **failed**: a ``StorageError``; then the upload must have left no record, except when
  the backend recorded it and every answer saying so was lost (counted apart, as
  "failed but recorded", with the stored bytes checked);
* **pending uploads**: multipart uploads the backend still holds open at the end.

Targets (issue 7): 0 corrupt, 0 lost, 0 raw, at most 0.1 % failed. Exit status 1 when
one is missed. Progress goes to stderr, a markdown table to stdout, every number to
``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_multipart import free_port  # noqa: E402
from bench_reference_backend import machine_facts, serve_env  # noqa: E402

from ctrlupload import BackendPresignedStorageProvider, Settings, StorageError  # noqa: E402
from tests.support.serve_process import ServeProcess  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
FAILED_TARGET = 0.001


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_sources(folder: Path, count: int, max_kib: int, multipart_bytes: int) -> list[Path]:
    """``count`` small random files (1 KiB to ``max_kib`` KiB) and one multipart-size one."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        size = 1024 * (1 + (index * 7919) % max_kib)
        path = folder / f"small-{index}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    big = folder / "multipart.bin"
    big.write_bytes(os.urandom(multipart_bytes))
    paths.append(big)
    return paths


class ProxyProcess:
    """tests/support/fault_proxy.py in its own process."""

    def __init__(self, upstream: str, rate: float, seed: int, stats: Path) -> None:
        self.stats = stats
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fault_proxy",
                "--upstream",
                upstream,
                "--rate",
                str(rate),
                "--seed",
                str(seed),
                "--stats",
                str(stats),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.base_url = self._process.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            raise RuntimeError("the fault proxy did not start")

    def stop(self) -> dict[str, Any]:
        self._process.send_signal(signal.SIGTERM)
        self._process.wait(30)
        result: dict[str, Any] = json.loads(self.stats.read_text())
        return result


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sources = write_sources(workdir / "sources", 200, args.small_kib, 11 * MIB)
    digests = {path: md5_file(path) for path in sources}
    data_dir = workdir / "backend"
    port = free_port()
    proxy = ProxyProcess(f"127.0.0.1:{port}", args.fault_rate, args.seed, workdir / "proxy.json")
    server = ServeProcess(
        data_dir,
        env=serve_env(),
        args=["--port", str(port), "--public-url", proxy.base_url],
        cwd=workdir,
    ).start()
    assert server.token is not None
    settings = Settings.from_mapping(
        {
            "STORAGE_PROVIDER": "backend_presigned",
            "BACKEND_BASE_URL": proxy.base_url,
            "BACKEND_SERVICE_TOKEN": server.token,
            "STORAGE_RETRY_ATTEMPTS": 5,
            "STORAGE_RETRY_BACKOFF_S": 0.05,
            "STORAGE_RETRY_BACKOFF_MAX_S": 1,
            "STORAGE_CONNECT_TIMEOUT_S": 5,
            "STORAGE_READ_TIMEOUT_S": args.read_timeout_s,
            "STORAGE_MAX_CONNECTIONS": args.threads,
            "STORAGE_MULTIPART_THRESHOLD_BYTES": 5 * MIB,
            "STORAGE_MULTIPART_PART_BYTES": 5 * MIB,
            "STORAGE_RESUME_DIR": str(workdir / "resume"),
            "VIDEO_MAX_UPLOAD_BYTES": 64 * MIB,
        }
    )
    outcomes: dict[int, tuple[str, str]] = {}
    lock = threading.Lock()
    done = [0]

    def one(index: int, provider: BackendPresignedStorageProvider) -> None:
        multipart = index % args.multipart_every == args.multipart_every - 1
        source = sources[-1] if multipart else sources[index % (len(sources) - 1)]
        key = f"videos/V-{index}/S-1/J-1/video.mp4"
        try:
            provider.put_file(source, key)
            outcome = ("stored", "")
        except StorageError as exc:
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # the target: none of these
            outcome = ("raw", f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
        with lock:
            outcomes[index] = outcome
            done[0] += 1
            if done[0] % 1000 == 0:
                log(f"{done[0]} uploads done")

    log(f"{args.uploads} uploads on {args.threads} threads, {args.fault_rate:.0%} faulted")
    started = time.monotonic()
    try:
        with (
            BackendPresignedStorageProvider(settings) as provider,
            ThreadPoolExecutor(args.threads) as pool,
        ):
            for future in [pool.submit(one, i, provider) for i in range(args.uploads)]:
                future.result()
        elapsed = time.monotonic() - started
    finally:
        proxy_stats = proxy.stop()
        server.stop()
    log(f"uploads finished in {elapsed:.1f} s; checking every one")
    db = sqlite3.connect(data_dir / "assets.sqlite3")
    rows = {
        key: (etag, size)
        for key, etag, size in db.execute("SELECT object_key, etag, size_bytes FROM assets")
    }
    pending = db.execute(
        "SELECT COUNT(*) FROM multipart_uploads WHERE completed_at IS NULL"
    ).fetchone()[0]
    db.close()
    held_dir = data_dir / "staging" / "multipart"
    held = len(list(held_dir.iterdir())) if held_dir.exists() else 0
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for index, (status, detail) in sorted(outcomes.items()):
        multipart = index % args.multipart_every == args.multipart_every - 1
        source = sources[-1] if multipart else sources[index % (len(sources) - 1)]
        key = f"videos/V-{index}/S-1/J-1/video.mp4"
        stored = data_dir / "objects" / key
        if status == "raw":
            verdict = "raw"
        elif status == "stored":
            if key not in rows or not stored.exists():
                verdict = "lost"
            elif md5_file(stored) != digests[source]:
                verdict = "corrupt"
            else:
                verdict = "stored"
        elif key in rows:
            ok = stored.exists() and md5_file(stored) == digests[source]
            verdict = "failed_but_recorded" if ok else "corrupt"
        else:
            verdict = "failed"
        counts[verdict] += 1
        if verdict != "stored":
            examples.setdefault(verdict, [])
            if len(examples[verdict]) < 5:
                examples[verdict].append(detail)
    failed = counts["failed"] + counts["failed_but_recorded"]
    result = {
        "machine": machine_facts(),
        "options": vars(args),
        "elapsed_s": round(elapsed, 1),
        "uploads": args.uploads,
        "multipart_uploads": sum(
            1 for i in range(args.uploads) if i % args.multipart_every == args.multipart_every - 1
        ),
        "counts": dict(counts),
        "failed_rate": failed / args.uploads,
        "pending_uploads": max(pending, held),
        "proxy": proxy_stats,
        "examples": examples,
    }
    result["targets_met"] = (
        counts["corrupt"] == 0
        and counts["lost"] == 0
        and counts["raw"] == 0
        and result["failed_rate"] <= FAILED_TARGET
    )
    return result


def report(result: dict[str, Any]) -> str:
    counts = result["counts"]
    faulted = result["proxy"]["exchanges"] - result["proxy"]["by_fault"].get("none", 0)
    lines = [
        "| uploads | multipart | exchanges | faulted | s | stored | corrupt | lost | raw "
        "| failed | failed but recorded | failed % | pending uploads |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['uploads']} | {result['multipart_uploads']} | "
        f"{result['proxy']['exchanges']} | {faulted} | {result['elapsed_s']} | "
        f"{counts.get('stored', 0)} | {counts.get('corrupt', 0)} | {counts.get('lost', 0)} | "
        f"{counts.get('raw', 0)} | {counts.get('failed', 0)} | "
        f"{counts.get('failed_but_recorded', 0)} | {100 * result['failed_rate']:.3f} | "
        f"{result['pending_uploads']} |",
        "",
        "Faults applied: "
        + ", ".join(f"{name} {n}" for name, n in sorted(result["proxy"]["by_fault"].items())),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--small-kib", type=int, default=256)
    parser.add_argument("--multipart-every", type=int, default=100)
    parser.add_argument("--read-timeout-s", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_soak.", dir=args.workdir) as scratch:
        result = run(args, Path(scratch))
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not result["targets_met"]:
        log(f"TARGET MISSED: {result['counts']}, examples {result['examples']}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
