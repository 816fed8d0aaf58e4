"""Uploads to S3 (a loopback moto server): ctrlupload's two S3 paths against boto3's own.

Run from the repository root::

    python benchmarks/bench_s3.py --json /tmp/bench_s3.json

One moto standalone server (``ThreadedMotoServer`` on 127.0.0.1, this script in
``--moto`` mode, in its own process) holds one fresh bucket for the run. Four clients
upload to it, each in a fresh interpreter (this script in ``--child`` mode):

1. ``ctrlupload_s3``: ``ctrlupload.S3StorageProvider`` (``STORAGE_PROVIDER=s3``,
   ``STORAGE_S3_ENDPOINT_URL`` = moto, ``STORAGE_S3_REGION=us-east-1``), every upload
   setting at its default: files of 64 MiB and more go multipart, 8 MiB parts, 4 at
   a time, MD5 check on.
2. ``boto3_upload_file``: ``client.upload_file`` (s3transfer) with the default
   ``TransferConfig`` (multipart from 8 MiB, 8 MiB parts, 10 threads per transfer),
   on one client built with ``signature_version="s3v4"`` and path-style addressing,
   botocore's checksum defaults left alone.
3. ``backend_presigned``: ``BackendPresignedStorageProvider`` against the reference
   backend, ``python -m ctrlupload serve --store s3`` on the same moto bucket, in its
   own process (started once for the run). The backend presigns; the bytes go from the
   client straight to moto.
4. ``boto3_when_required``: variant 2 with ``request_checksum_calculation`` and
   ``response_checksum_validation`` set to ``when_required``, as ctrlupload's own boto3
   client is (``ctrlupload/_s3.py``). A control, not a contender: with botocore's
   default (``when_supported``) CreateMultipartUpload asks for CRC32 part checksums;
   without (ctrlupload, and this variant) moto 5.2's CompleteMultipartUpload computes a
   full-object checksum instead (``MultipartChecksumBuilder``, FULL_OBJECT), copying
   the whole object twice more, which doubles moto's CPU for a large upload. Variant 4
   shows how much of the gap between 1 and 2 that accounts for. ``--variants`` picks
   the variants.

Workloads: one ``--big-mib`` (2048) file, and ``--small-count`` (100) files of
``--small-kib`` (1024) each, uploaded by a pool of ``--threads`` (8) threads sharing one
provider (one boto3 client for variants 2 and 4, each thread calling ``upload_file``;
s3transfer's own threads then serve one file each, and none of the 1 MiB files goes
multipart). ``--rounds`` (3) rounds of the small set and ``--big-rounds`` (2) of the big
file; every round runs the clients one after the other, and the tables show medians. Odd
rounds run the previous round's order backwards, so each client follows a different one
each time: how long moto takes to complete a large upload depends on what it did just
before (after a ``boto3_upload_file`` run the next 2 GiB completion took 23 to 28 s
instead of 19 to 20 s in one test). Before the first round of each workload, this
process uploads it once with boto3 (checksums ``when_required``, so through moto's
costlier completion), unmeasured, and deletes it (``--no-warmup`` skips that): the first
large upload into a fresh moto runs about half as fast as later ones.

Each client child builds its provider or client, makes one 1 KiB warm-up upload, then
takes its baseline: ``ru_maxrss``, and VmRSS after resetting VmHWM
(``/proc/self/clear_refs``). While it uploads, a thread samples its VmRSS every
``--sample-ms`` (10) ms. Growth is reported three ways: ``ru_maxrss`` after minus
before (0 when the upload never went above the interpreter's earlier peak), the
sampled VmRSS peak minus the baseline, and VmHWM minus the baseline. The client times
the uploads with ``perf_counter`` and its CPU with ``getrusage`` (user + sys, every
thread). This process reads the CPU time of moto and of serve from ``/proc/PID/stat``
just before it tells the child to start and just after the child reports, and the
machine's busy time from ``/proc/stat``; "other" is the machine's busy time less the
client's, moto's, serve's and this harness's. Moto's CPU as a share of one core shows
whether moto is the limit (the Python server holds a GIL, so about 100 % is all it can
use); serve's CPU shows what the backend costs. For the big file the child also notes
when the last byte was handed over (ctrlupload's last progress report below the size,
which it reaches only once complete succeeded; s3transfer's ``Callback`` bytes reaching
the size), which splits the wall time into sending the parts and the tail after them:
the last answers and CompleteMultipartUpload, which moto spends seconds on for a large
object (it copies the parts into one buffer in Python).

Every upload is checked before it counts: HEAD must show the source's size, every
small object's ETag must be the source's MD5, the big object's the multipart ETag
computed from the source (part size read back with ``HEAD ?partNumber=1``), and the
ETag a ctrlupload client reported must equal the stored one. After each run every
object is deleted (and any multipart upload aborted); moto's VmRSS and the bytes of
the temp files it holds open (``/proc/PID/fd``; its ``TMPDIR`` is in the scratch dir)
are recorded then, to show its memory and disk stay bounded over the run.

moto's per-request log (werkzeug's logger) is turned off; the reference backend keeps
its default access log. Credentials are fake values in the children's environment
(``AWS_EC2_METADATA_DISABLED=true``, no shared config or credentials files); they and
the backend's token are never printed or written to the JSON. Markdown tables go to
stdout, progress to stderr, every raw number and the machine facts to ``--json``. Exit
status 1 when an upload failed or a check did not pass.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
REGION = "us-east-1"
CONTENT_TYPE = "video/mp4"
#: Fake credentials for moto, which does not check them. Never printed.
FAKE_ACCESS_KEY_ID = "AKIABENCHS3FAKE00000"
FAKE_SECRET_ACCESS_KEY = "bench-s3-fake-secret-not-a-credential"
VARIANTS = ("ctrlupload_s3", "boto3_upload_file", "backend_presigned", "boto3_when_required")
DEFAULT_VARIANTS = VARIANTS
LABELS = {
    "ctrlupload_s3": "ctrlupload `S3StorageProvider`",
    "boto3_upload_file": "boto3 `upload_file` (s3transfer)",
    "backend_presigned": "ctrlupload `backend_presigned` + `serve --store s3`",
    "boto3_when_required": "boto3 `upload_file`, checksums `when_required`",
}
WORKLOADS = ("small", "big")
KEY = "videos/V-S3BENCH/S-{run}/{variant}-r{round}/JOB-{index:03d}/video.mp4"
WARM_KEY = "videos/V-S3BENCH/S-{run}/{variant}-r{round}/warm/video.mp4"
CHILD_TIMEOUT_S = 600.0
_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_", "AWS_")

_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# -- /proc -------------------------------------------------------------------------------


def proc_cpu_s(pid: int | str) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int | str) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and Threads, from /proc/PID/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                found[name] = int(value.split()[0])
    return found


def reset_peak_rss(pid: int | str) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def open_temp_files(pid: int) -> dict[str, float]:
    """The regular files a process holds open: how many, and their bytes in MiB.

    moto keeps every object (and every part) larger than 5 MiB in an unnamed temp file,
    so these are its disk use.
    """
    count, size = 0, 0
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                info = os.stat(f"/proc/{pid}/fd/{name}")
                if (info.st_mode & 0o170000) == 0o100000:
                    count += 1
                    size += info.st_size
    return {"open_files": count, "open_file_mib": size / MIB}


# -- moto (``--moto``) -------------------------------------------------------------------


def moto_main() -> int:
    """moto's standalone S3 server on 127.0.0.1 until stdin closes; prints its port."""
    import logging

    from moto.server import ThreadedMotoServer

    # One log line per request would cost moto CPU that no S3 server spends.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()
    server.stop()
    return 0


class MotoProcess:
    """This script in ``--moto`` mode, in a child process with its own ``TMPDIR``."""

    def __init__(self, env: dict[str, str], tmpdir: Path, stderr: IO[str]) -> None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--moto"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**env, "TMPDIR": str(tmpdir)},
            cwd=tmpdir,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"moto said {line!r} instead of its port")
        self.pid = self.process.pid
        self.endpoint_url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> int | None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None


# -- the client (``--child``) ------------------------------------------------------------


class RssSampler(threading.Thread):
    """This process's VmRSS every ``interval_s``, from /proc/self/statm, on a thread."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self._interval_s = interval_s
        self._halt = threading.Event()
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // KIB
        self.peak_kib = 0
        self.samples = 0

    def run(self) -> None:
        with open("/proc/self/statm", "rb") as handle:
            while True:
                handle.seek(0)
                rss_kib = int(handle.read().split()[1]) * self._page_kib
                self.peak_kib = max(self.peak_kib, rss_kib)
                self.samples += 1
                if self._halt.wait(self._interval_s):
                    return

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class SendTracker:
    """When the last byte of one upload was handed over, from its progress reports.

    ctrlupload reports ``progress(done, total)`` as it sends, but reaches ``total`` only
    once the upload is confirmed (after complete), so its last byte is its last report
    below ``total``. s3transfer calls ``Callback(bytes)`` as it reads the file for
    sending; its last byte is where the sum reaches the size. What follows the last byte
    (the last answers and the completion call) is the upload's tail.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.at: float | None = None
        self._lock = threading.Lock()

    def progress(self, done: int, total: int) -> None:
        if done < total:
            self.at = time.perf_counter()

    def callback(self, amount: int) -> None:
        with self._lock:
            self.sent += amount
            if self.sent >= self.total and self.at is None:
                self.at = time.perf_counter()


Upload = Callable[[str, str, SendTracker | None], str | None]


def make_uploader(spec: dict[str, Any]) -> tuple[Upload, Any]:
    """``upload(path, key, tracker) -> ETag or None`` and the object to close."""
    variant = spec["variant"]
    if variant in ("boto3_upload_file", "boto3_when_required"):
        import boto3
        from botocore.config import Config

        checksums: dict[str, str] = {}
        if variant == "boto3_when_required":
            # What ctrlupload's own boto3 client asks for (see ctrlupload/_s3.py).
            checksums = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=spec["endpoint_url"],
            region_name=REGION,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **checksums),
        )
        bucket = spec["bucket"]

        def upload_boto3(path: str, key: str, tracker: SendTracker | None) -> str | None:
            client.upload_file(
                path,
                bucket,
                key,
                ExtraArgs={"ContentType": CONTENT_TYPE},
                Callback=tracker.callback if tracker is not None else None,
            )
            return None

        return upload_boto3, client

    from ctrlupload import BackendPresignedStorageProvider, S3StorageProvider, Settings

    storage: Any
    if variant == "ctrlupload_s3":
        storage = S3StorageProvider(
            Settings.from_mapping(
                {
                    "STORAGE_PROVIDER": "s3",
                    "STORAGE_S3_BUCKET": spec["bucket"],
                    "STORAGE_S3_ENDPOINT_URL": spec["endpoint_url"],
                    "STORAGE_S3_REGION": REGION,
                    "VIDEO_MAX_UPLOAD_BYTES": 64 * GIB,
                }
            )
        )
    elif variant == "backend_presigned":
        storage = BackendPresignedStorageProvider(
            Settings.from_mapping(
                {
                    "STORAGE_PROVIDER": "backend_presigned",
                    "BACKEND_BASE_URL": spec["backend_base_url"],
                    "BACKEND_SERVICE_TOKEN": spec["backend_token"],
                    "VIDEO_MAX_UPLOAD_BYTES": 64 * GIB,
                }
            )
        )
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def upload_ctrlupload(path: str, key: str, tracker: SendTracker | None) -> str | None:
        progress = tracker.progress if tracker is not None else None
        etag: str | None = storage.put_file(path, key, CONTENT_TYPE, progress).etag
        return etag

    return upload_ctrlupload, storage


def child_main() -> int:
    """One measured run in a fresh interpreter: the spec on stdin, JSON lines on stdout.

    stdin: the spec (one JSON line), then ``go`` once the parent has read its meters.
    stdout: ``ready`` (after the warm-up, with the baseline), then ``done`` or ``error``.
    """

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    spec = json.loads(sys.stdin.readline())
    upload, closer = make_uploader(spec)
    try:
        upload(spec["warm_path"], spec["warm_key"], None)
        gc.collect()
        time.sleep(0.2)
        baseline_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm_reset = reset_peak_rss("self")
        baseline_kib = proc_status("self")["VmRSS"]
        emit(event="ready", hwm_reset=hwm_reset)
        if sys.stdin.readline().strip() != "go":
            return 2
        paths, keys = spec["paths"], spec["keys"]
        # The tail after the last byte is measured for a single upload only.
        tracker = SendTracker(os.path.getsize(paths[0])) if len(paths) == 1 else None

        def one(index: int) -> dict[str, Any]:
            try:
                return {"etag": upload(paths[index], keys[index], tracker), "error": None}
            except Exception as exc:
                return {"etag": None, "error": f"{type(exc).__name__}: {exc}"}

        sampler = RssSampler(spec["sample_ms"] / 1000)
        sampler.start()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        if len(paths) == 1:
            results = [one(0)]
        else:
            with ThreadPoolExecutor(spec["threads"]) as pool:
                results = list(pool.map(one, range(len(paths))))
        wall_s = time.perf_counter() - started
        sent_s = tracker.at - started if tracker is not None and tracker.at else None
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        sampler.stop()
        status = proc_status("self")
    except Exception as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        closer.close()
    emit(
        event="done",
        wall_s=wall_s,
        last_byte_s=sent_s,
        tail_s=wall_s - sent_s if sent_s is not None else None,
        user_s=usage_after.ru_utime - usage_before.ru_utime,
        sys_s=usage_after.ru_stime - usage_before.ru_stime,
        baseline_rss_mib=baseline_kib / KIB,
        maxrss_growth_mib=(usage_after.ru_maxrss - baseline_maxrss_kib) / KIB,
        sampled_growth_mib=(sampler.peak_kib - baseline_kib) / KIB,
        vmhwm_growth_mib=(status["VmHWM"] - baseline_kib) / KIB if hwm_reset else None,
        peak_rss_mib=max(sampler.peak_kib, status["VmHWM"] if hwm_reset else 0) / KIB,
        samples=sampler.samples,
        threads_after=status["Threads"],
        results=results,
    )
    return 0


# -- the harness -------------------------------------------------------------------------


def children_env(scratch: Path) -> dict[str, str]:
    """The environment of every child: this checkout importable, no settings, fake keys."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(_SETTING_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
    )
    env.update(
        {
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
        }
    )
    return env


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(64 * MIB, left))
            handle.write(block)
            left -= len(block)


def write_small_sources(folder: Path, count: int, size: int) -> list[tuple[Path, str]]:
    """``count`` distinct random files of ``size`` bytes, with their MD5s."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for index in range(count):
        body = os.urandom(size)
        path = folder / f"small-{index:03d}.bin"
        path.write_bytes(body)
        sources.append((path, hashlib.md5(body, usedforsecurity=False).hexdigest()))
    return sources


class EtagOracle:
    """The ETag S3 gives a file uploaded in parts of a given size (0: one PUT)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: dict[int, str] = {}

    def etag(self, part_bytes: int) -> str:
        if part_bytes not in self._cache:
            whole = hashlib.md5(usedforsecurity=False)
            parts: list[bytes] = []
            with open(self.path, "rb") as handle:
                while True:
                    chunk = handle.read(part_bytes or 64 * MIB)
                    if not chunk:
                        break
                    if part_bytes:
                        parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
                    else:
                        whole.update(chunk)
            if part_bytes:
                joined = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
                self._cache[part_bytes] = f'"{joined}-{len(parts)}"'
            else:
                self._cache[part_bytes] = f'"{whole.hexdigest()}"'
        return self._cache[part_bytes]


def verify(
    s3: Any,
    bucket: str,
    keys: list[str],
    sizes: list[int],
    md5s: list[str | None],
    oracle: EtagOracle | None,
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """HEAD every object: size, ETag against the source, ETag against the client's."""
    checks = {"objects": len(keys), "size_ok": 0, "etag_checked": 0, "etag_ok": 0}
    checks.update({"client_etag_checked": 0, "client_etag_ok": 0, "part_bytes": None})
    problems: list[str] = []
    for index, key in enumerate(keys):
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            problems.append(f"{key}: HEAD {type(exc).__name__}: {exc}")
            continue
        stored = head["ETag"]
        if head["ContentLength"] == sizes[index]:
            checks["size_ok"] += 1
        else:
            problems.append(f"{key}: {head['ContentLength']} bytes, not {sizes[index]}")
        expected = None
        if md5s[index] is not None:
            expected = f'"{md5s[index]}"'
        elif oracle is not None:
            part_bytes = 0
            if "-" in stored:
                first = s3.head_object(Bucket=bucket, Key=key, PartNumber=1)
                part_bytes = first["ContentLength"]
            checks["part_bytes"] = part_bytes
            expected = oracle.etag(part_bytes)
        if expected is not None:
            checks["etag_checked"] += 1
            if stored == expected:
                checks["etag_ok"] += 1
            else:
                problems.append(f"{key}: ETag {stored}, the source's is {expected}")
        reported = results[index].get("etag") if index < len(results) else None
        if reported is not None:
            checks["client_etag_checked"] += 1
            if reported.strip('"') == stored.strip('"'):
                checks["client_etag_ok"] += 1
            else:
                problems.append(f"{key}: the client reported ETag {reported}, S3 has {stored}")
    checks["problems"] = problems
    checks["verified"] = (
        not problems
        and checks["size_ok"] == len(keys)
        and checks["etag_ok"] == checks["etag_checked"] > 0
    )
    return checks


def empty_bucket(s3: Any, bucket: str) -> dict[str, int]:
    """Delete every object and abort every multipart upload in the bucket."""
    deleted = aborted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):
            s3.delete_objects(
                Bucket=bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
            )
            deleted += len(keys[start : start + 1000])
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        aborted += 1
    return {"deleted": deleted, "aborted": aborted}


class Meters:
    """CPU seconds of moto, serve, this harness and the whole machine, and the clock."""

    def __init__(self, moto_pid: int, serve_pid: int) -> None:
        self._moto_pid = moto_pid
        self._serve_pid = serve_pid

    def read(self) -> dict[str, float]:
        times = os.times()
        return {
            "clock_s": time.monotonic(),
            "moto_cpu_s": proc_cpu_s(self._moto_pid),
            "serve_cpu_s": proc_cpu_s(self._serve_pid),
            "harness_cpu_s": times.user + times.system,
            "machine_busy_s": machine_busy_s(),
        }

    @staticmethod
    def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


def run_child(
    spec: dict[str, Any], env: dict[str, str], cwd: Path, meters: Meters, moto: MotoProcess
) -> dict[str, Any]:
    """Run one client child; returns its report plus moto's and serve's CPU meanwhile."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        assert process.stdin is not None and process.stdout is not None
        timer = threading.Timer(CHILD_TIMEOUT_S, process.kill)
        timer.start()
        result: dict[str, Any] = {}
        try:
            process.stdin.write(json.dumps(spec) + "\n")
            process.stdin.flush()
            before: dict[str, float] | None = None
            for line in process.stdout:
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if event["event"] == "ready":
                    reset_peak_rss(moto.pid)
                    result["moto_rss_before_mib"] = proc_status(moto.pid)["VmRSS"] / KIB
                    before = meters.read()
                    process.stdin.write("go\n")
                    process.stdin.flush()
                elif event["event"] in ("done", "error"):
                    if before is not None:
                        result.update(Meters.since(before, meters.read()))
                    moto_status = proc_status(moto.pid)
                    result["moto_peak_rss_mib"] = moto_status["VmHWM"] / KIB
                    result["moto_rss_after_mib"] = moto_status["VmRSS"] / KIB
                    result["moto_threads_after"] = moto_status["Threads"]
                    result.update({k: v for k, v in event.items() if k != "event"})
                    result["ok"] = event["event"] == "done"
            process.wait(30)
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait(10)
        stderr.seek(0)
        result["child_stderr"] = stderr.read()[-5000:]
    result["exit_code"] = process.returncode
    if "ok" not in result:
        result["ok"] = False
        result["error"] = f"no result (exit {process.returncode})"
    return result


def run_round(
    workload: str,
    variant: str,
    round_index: int,
    context: dict[str, Any],
) -> dict[str, Any]:
    """One client child on one workload, checked, then the bucket emptied."""
    params = context["params"]
    sources: list[tuple[Path, str | None]] = context["sources"][workload]
    keys = [
        KEY.format(run=context["run_id"], variant=variant, round=round_index, index=index)
        for index in range(len(sources))
    ]
    spec: dict[str, Any] = {
        "variant": variant,
        "endpoint_url": context["moto"].endpoint_url,
        "bucket": context["bucket"],
        "paths": [str(path) for path, _ in sources],
        "keys": keys,
        "threads": params["threads"],
        "sample_ms": params["sample_ms"],
        "warm_path": str(context["warm_path"]),
        "warm_key": WARM_KEY.format(run=context["run_id"], variant=variant, round=round_index),
    }
    if variant == "backend_presigned":
        spec["backend_base_url"] = context["serve"].base_url
        spec["backend_token"] = context["serve"].token
    os.sync()
    result = run_child(spec, context["env"], context["scratch"], context["meters"], context["moto"])
    sizes = [path.stat().st_size for path, _ in sources]
    total = sum(sizes)
    result.update({"workload": workload, "variant": variant, "round": round_index})
    result.update({"files": len(sources), "total_mib": total / MIB})
    results = result.pop("results", [])
    errors = [f"{keys[i]}: {item['error']}" for i, item in enumerate(results) if item["error"]]
    result["errors"] = errors
    if result["ok"]:
        wall = result["wall_s"]
        result["mib_s"] = total / MIB / wall
        result["files_s"] = len(sources) / wall
        result["client_cpu_s"] = result["user_s"] + result["sys_s"]
        result["client_core_pct"] = 100 * result["client_cpu_s"] / wall
        result["moto_core_pct"] = 100 * result["moto_cpu_s"] / wall
        result["serve_core_pct"] = 100 * result["serve_cpu_s"] / wall
        result["other_cpu_s"] = result["machine_busy_s"] - (
            result["client_cpu_s"]
            + result["moto_cpu_s"]
            + result["serve_cpu_s"]
            + result["harness_cpu_s"]
        )
    held = open_temp_files(context["moto"].pid)
    result["moto_files_before_cleanup"] = held["open_files"]
    result["moto_file_mib_before_cleanup"] = held["open_file_mib"]
    result["checks"] = verify(
        context["s3"],
        context["bucket"],
        keys,
        sizes,
        [md5 for _, md5 in sources],
        context["oracle"] if workload == "big" else None,
        results,
    )
    result["verified"] = result["ok"] and not errors and result["checks"]["verified"]
    result["cleanup"] = empty_bucket(context["s3"], context["bucket"])
    gc_wait = time.monotonic() + 5
    while time.monotonic() < gc_wait:  # moto frees a deleted object's file on its own
        held = open_temp_files(context["moto"].pid)
        if held["open_files"] <= context["moto_idle_files"]:
            break
        time.sleep(0.1)
    result["moto_files_after_cleanup"] = held["open_files"]
    result["moto_file_mib_after_cleanup"] = held["open_file_mib"]
    result["moto_rss_after_cleanup_mib"] = proc_status(context["moto"].pid)["VmRSS"] / KIB
    result["scratch_free_gib"] = shutil.disk_usage(context["scratch"]).free / GIB
    return result


def round_order(variants: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """The variants in round ``round_index``: odd rounds reverse the previous one's order.

    Each variant then follows a different one in consecutive rounds: how long moto takes
    to complete a large upload depends on what it did just before.
    """
    shift = (round_index // 2) % len(variants)
    order = variants[shift:] + variants[:shift]
    return order[::-1] if round_index % 2 else order


def warm_up(workload: str, context: dict[str, Any]) -> dict[str, Any]:
    """One unmeasured upload of the workload from this process (boto3), then deleted.

    The first large upload into a fresh moto runs markedly slower than later ones; this
    keeps that out of whichever variant happens to go first. The harness's client asks
    for checksums only when required, so the warm-up goes the way of variants 1, 3 and 4
    through moto's completion, the one that needs the most memory.
    """
    s3, bucket = context["s3"], context["bucket"]
    started = time.perf_counter()
    paths = [path for path, _ in context["sources"][workload]]
    with ThreadPoolExecutor(context["params"]["threads"]) as pool:
        list(
            pool.map(
                lambda path: s3.upload_file(str(path), bucket, f"warmup/{workload}/{path.name}"),
                paths,
            )
        )
    seconds = time.perf_counter() - started
    cleanup = empty_bucket(s3, bucket)
    log(f"warm-up {workload}: {len(paths)} files in {seconds:.1f} s (unmeasured)")
    return {"workload": workload, "files": len(paths), "seconds": seconds, **cleanup}


# -- report ------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for workload in WORKLOADS:
        for variant in VARIANTS:
            mine = [r for r in runs if r["workload"] == workload and r["variant"] == variant]
            if not mine:
                continue
            ok = [r for r in mine if r["verified"]]

            def med(name: str, ok: list[dict[str, Any]] = ok) -> float | None:
                return median([r[name] for r in ok if r.get(name) is not None])

            wall = med("wall_s")
            last_byte = med("last_byte_s")
            rows.append(
                {
                    "workload": workload,
                    "variant": variant,
                    "rounds": len(mine),
                    "verified": len(ok),
                    "files": mine[0]["files"],
                    "total_mib": mine[0]["total_mib"],
                    "median_wall_s": wall,
                    "median_mib_s": mine[0]["total_mib"] / wall if wall else None,
                    "median_files_s": mine[0]["files"] / wall if wall else None,
                    "mib_s_rounds": [r.get("mib_s") for r in mine],
                    "median_last_byte_s": last_byte,
                    "median_mib_s_to_last_byte": (
                        mine[0]["total_mib"] / last_byte if last_byte else None
                    ),
                    "median_tail_s": med("tail_s"),
                    "median_client_cpu_s": med("client_cpu_s"),
                    "median_client_core_pct": med("client_core_pct"),
                    "median_moto_cpu_s": med("moto_cpu_s"),
                    "median_moto_core_pct": med("moto_core_pct"),
                    "median_serve_cpu_s": med("serve_cpu_s"),
                    "median_serve_core_pct": med("serve_core_pct"),
                    "median_other_cpu_s": med("other_cpu_s"),
                    "max_maxrss_growth_mib": max(
                        (r["maxrss_growth_mib"] for r in ok), default=None
                    ),
                    "max_sampled_growth_mib": max(
                        (r["sampled_growth_mib"] for r in ok), default=None
                    ),
                    "max_vmhwm_growth_mib": max(
                        (r["vmhwm_growth_mib"] for r in ok if r["vmhwm_growth_mib"] is not None),
                        default=None,
                    ),
                    "median_baseline_rss_mib": med("baseline_rss_mib"),
                    "max_moto_peak_rss_mib": max(
                        (r["moto_peak_rss_mib"] for r in ok), default=None
                    ),
                }
            )
    return rows


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    params = report["parameters"]
    versions = facts["versions"]
    lines = [
        f"# bench_s3 ({facts['date']})",
        "",
        f"Machine: {facts['cpu_model']}, nproc {facts['nproc']}, {facts['mem_total']} RAM; "
        f"`{facts['uname']}`; Python {facts['python']}; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + f"; load average at start {facts['load_average_start']}, at end "
        f"{report['load_average_end']}",
        "",
        f"Command: `{report['command']}`, at {facts['git_commit'][:12]}"
        + (
            " (uncommitted: " + ", ".join(facts["uncommitted_library_files"]) + ")"
            if facts["uncommitted_library_files"]
            else ""
        )
        + f"; wall time of the whole run {report['run_s']:.0f} s",
        "",
        f"Workloads: small = {params['small_count']} x {params['small_kib']} KiB from "
        f"{params['threads']} threads sharing one provider/client ({params['rounds']} rounds); "
        f"big = 1 x {params['big_mib']} MiB ({params['big_rounds']} rounds). Medians of the "
        "verified rounds; RSS growth is the largest of the rounds. Core % = CPU s / wall s. "
        + (
            "One unmeasured boto3 upload of each workload ran before its first round."
            if params["warmup"]
            else "No warm-up upload."
        ),
        "",
        "| workload | client | verified | MiB/s | files/s | wall s | client CPU s (core %) "
        "| moto CPU s (core %) | serve CPU s (core %) | other CPU s | client RSS growth MiB: "
        "ru_maxrss / sampled VmRSS / VmHWM | moto peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['workload']} | {LABELS[row['variant']]} | {row['verified']}/{row['rounds']} "
            f"| {fmt(row['median_mib_s'])} "
            f"| {fmt(row['median_files_s']) if row['workload'] == 'small' else ''} "
            f"| {fmt(row['median_wall_s'], '.2f')} "
            f"| {fmt(row['median_client_cpu_s'], '.2f')} "
            f"({fmt(row['median_client_core_pct'], '.0f')}) "
            f"| {fmt(row['median_moto_cpu_s'], '.2f')} ({fmt(row['median_moto_core_pct'], '.0f')}) "
            f"| {fmt(row['median_serve_cpu_s'], '.2f')} "
            f"({fmt(row['median_serve_core_pct'], '.0f')}) "
            f"| {fmt(row['median_other_cpu_s'], '.2f')} "
            f"| {fmt(row['max_maxrss_growth_mib'])} / {fmt(row['max_sampled_growth_mib'])} / "
            f"{fmt(row['max_vmhwm_growth_mib'])} | {fmt(row['max_moto_peak_rss_mib'], '.0f')} |"
        )
    big_rows = [row for row in report["summary"] if row["workload"] == "big"]
    if big_rows:
        lines += [
            "",
            "The big upload, split at its last byte (ctrlupload's last progress report below "
            "the size, s3transfer's Callback bytes reaching it): sending the parts, then the "
            "tail, which is mostly CompleteMultipartUpload in moto.",
            "",
            "| client | wall s | last byte sent at s | MiB/s to the last byte | tail s |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in big_rows:
            lines.append(
                f"| {LABELS[row['variant']]} | {fmt(row['median_wall_s'], '.2f')} "
                f"| {fmt(row['median_last_byte_s'], '.2f')} "
                f"| {fmt(row['median_mib_s_to_last_byte'])} | {fmt(row['median_tail_s'], '.2f')} |"
            )
    lines += [
        "",
        "Every run, in the order run (moto's memory and open temp files after the bucket was "
        "emptied):",
        "",
        "| # | workload | round | client | MiB/s | tail s | client CPU s | moto CPU s "
        "| serve CPU s "
        "| other CPU s | RSS growth MiB (sampled) | moto RSS after cleanup MiB "
        "| moto temp files (MiB) before / after cleanup | checks |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for number, run in enumerate(report["runs"], 1):
        checks = run["checks"]
        verdict = (
            f"ok: {checks['size_ok']}/{checks['objects']} sizes, "
            f"{checks['etag_ok']}/{checks['etag_checked']} ETags"
            + (f" (parts {checks['part_bytes'] // MIB} MiB)" if checks["part_bytes"] else "")
            if run["verified"]
            else "FAILED: "
            + "; ".join((run["errors"] + checks["problems"])[:2] or [run.get("error", "?")])
        )
        lines.append(
            f"| {number} | {run['workload']} | {run['round']} | {run['variant']} "
            f"| {fmt(run.get('mib_s'))} | {fmt(run.get('tail_s'), '.2f')} "
            f"| {fmt(run.get('client_cpu_s'), '.2f')} "
            f"| {fmt(run.get('moto_cpu_s'), '.2f')} | {fmt(run.get('serve_cpu_s'), '.2f')} "
            f"| {fmt(run.get('other_cpu_s'), '.2f')} | {fmt(run.get('sampled_growth_mib'))} "
            f"| {run['moto_rss_after_cleanup_mib']:.0f} "
            f"| {run['moto_files_before_cleanup']} ({run['moto_file_mib_before_cleanup']:.0f}) / "
            f"{run['moto_files_after_cleanup']} ({run['moto_file_mib_after_cleanup']:.0f}) "
            f"| {verdict} |"
        )
    serve = report["serve"]
    lines += [
        "",
        f"serve: exit {serve['exit_code']} on SIGTERM, {serve['tracebacks']} tracebacks on "
        f"stderr. moto: exit {report['moto']['exit_code']}.",
    ]
    return "\n".join(lines)


def machine_facts(scratch: Path) -> dict[str, Any]:
    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    cpu_model = mem_total = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu_model = next(
            (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
            cpu_model,
        )
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) / MIB:.1f} GiB"
    versions = {}
    for name in ("boto3", "botocore", "s3transfer", "moto", "werkzeug", "urllib3", "requests"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import ctrlupload

    versions["ctrlupload"] = ctrlupload.__version__
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "uname": run("uname", "-a") or " ".join(platform.uname()),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "mem_total": mem_total,
        "python": sys.version.split()[0],
        "versions": versions,
        "awscrt_installed": importlib.util.find_spec("awscrt") is not None,
        "git_commit": run("git", "rev-parse", "HEAD"),
        "uncommitted_library_files": [
            line[3:] for line in run("git", "status", "--short", "ctrlupload").splitlines()
        ],
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
        "scratch": str(scratch),
        "scratch_free_gib_start": shutil.disk_usage(scratch).free / GIB,
    }


def traceback_count(text: str) -> int:
    return sum(line.startswith("Traceback") for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--moto", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--big-mib", type=int, default=2048, help="the big file (0: skip)")
    parser.add_argument("--big-rounds", type=int, default=2, help="rounds of the big file")
    parser.add_argument("--small-count", type=int, default=100, help="small files (0: skip)")
    parser.add_argument("--small-kib", type=int, default=1024, help="size of each small file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the small set")
    parser.add_argument("--threads", type=int, default=8, help="threads for the small set")
    parser.add_argument("--sample-ms", type=float, default=10.0, help="client VmRSS sampling")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the unmeasured boto3 upload of each workload before its first round",
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: the temp dir)")
    parser.add_argument("--json", type=Path, help="write every number here as JSON")
    args = parser.parse_args(argv)
    if args.moto:
        return moto_main()
    if args.child:
        return child_main()
    variants = tuple(name.strip() for name in args.variants.split(",") if name.strip())
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")

    import boto3
    from botocore.config import Config

    from tests.support.serve_process import ServeProcess

    params = {
        key: getattr(args, key)
        for key in ("big_mib", "big_rounds", "small_count", "small_kib", "rounds", "threads")
    }
    params.update(
        {
            "sample_ms": args.sample_ms,
            "variants": list(variants),
            "warmup": args.warmup,
            "small_concurrency": "a ThreadPoolExecutor of `threads` sharing one provider or "
            "one boto3 client; each thread calls put_file / upload_file",
            "ctrlupload_settings": "defaults (multipart from 64 MiB, 8 MiB parts, 4 at a "
            "time, MD5 check on), VIDEO_MAX_UPLOAD_BYTES=64 GiB",
            "boto3_settings": "TransferConfig() defaults; Config(signature_version='s3v4', "
            "s3={'addressing_style': 'path'}); ExtraArgs ContentType",
        }
    )
    started = time.monotonic()
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S") + f"-{os.getpid()}"
    bucket = f"bench-s3-{run_id}"
    with (
        tempfile.TemporaryDirectory(prefix="bench_s3.", dir=args.workdir) as scratch_name,
        open(Path(scratch_name) / "moto.stderr", "w+", encoding="utf-8") as moto_stderr,
    ):
        scratch = Path(scratch_name)
        facts = machine_facts(scratch)
        log(f"machine: {json.dumps(facts)}")
        env = children_env(scratch)
        warm_path = scratch / "warm.bin"
        warm_path.write_bytes(os.urandom(KIB))
        sources: dict[str, list[tuple[Path, str | None]]] = {"small": [], "big": []}
        oracle = None
        if args.small_count:
            log(f"writing {args.small_count} x {args.small_kib} KiB")
            sources["small"] = list(
                write_small_sources(scratch / "small", args.small_count, args.small_kib * KIB)
            )
        if args.big_mib:
            log(f"writing {args.big_mib} MiB")
            big = scratch / "big.bin"
            write_random(big, args.big_mib * MIB)
            sources["big"] = [(big, None)]
            oracle = EtagOracle(big)

        moto = MotoProcess(env, scratch / "moto-tmp", moto_stderr)
        log(f"moto at {moto.endpoint_url}, pid {moto.pid}")
        s3 = boto3.session.Session(
            aws_access_key_id=FAKE_ACCESS_KEY_ID,
            aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
            region_name=REGION,
        ).client(
            "s3",
            endpoint_url=moto.endpoint_url,
            # when_required: the warm-up then takes moto's costlier completion path (see
            # variant 4), so moto has been at its largest once before any measured run.
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        s3.create_bucket(Bucket=bucket)
        serve = ServeProcess(
            scratch / "serve-data",
            env=env,
            args=(
                "--port",
                "0",
                "--store",
                "s3",
                "--s3-bucket",
                bucket,
                "--s3-endpoint-url",
                moto.endpoint_url,
                "--s3-region",
                REGION,
            ),
            cwd=scratch,
            ready_timeout_s=30.0,
        )
        report: dict[str, Any] = {
            "command": " ".join(["python", *sys.argv]),
            "machine": facts,
            "parameters": params,
            "bucket": bucket,
            "runs": [],
            "warmup": [],
        }
        try:
            serve.start()
            if not serve.token:
                raise RuntimeError("serve did not print BACKEND_SERVICE_TOKEN=...")
            log(f"serve at {serve.base_url}, pid {serve.pid}")
            context: dict[str, Any] = {
                "params": params,
                "run_id": run_id,
                "bucket": bucket,
                "moto": moto,
                "serve": serve,
                "s3": s3,
                "env": env,
                "scratch": scratch,
                "sources": sources,
                "oracle": oracle,
                "warm_path": warm_path,
                "meters": Meters(moto.pid, serve.pid),
                "moto_idle_files": open_temp_files(moto.pid)["open_files"],
            }
            report["moto_idle"] = {
                **open_temp_files(moto.pid),
                "rss_mib": proc_status(moto.pid)["VmRSS"] / KIB,
            }
            plan = [("small", index) for index in range(args.rounds if args.small_count else 0)]
            plan += [("big", index) for index in range(args.big_rounds if args.big_mib else 0)]
            for workload, round_index in plan:
                if round_index == 0 and args.warmup:
                    report["warmup"].append(warm_up(workload, context))
                for variant in round_order(variants, round_index):
                    run = run_round(workload, variant, round_index, context)
                    report["runs"].append(run)
                    log(
                        f"{workload} round {round_index} {variant}: "
                        f"{fmt(run.get('mib_s'))} MiB/s, verified {run['verified']}, "
                        f"client CPU {fmt(run.get('client_cpu_s'), '.2f')} s, moto CPU "
                        f"{fmt(run.get('moto_cpu_s'), '.2f')} s, serve CPU "
                        f"{fmt(run.get('serve_cpu_s'), '.2f')} s, moto RSS after cleanup "
                        f"{run['moto_rss_after_cleanup_mib']:.0f} MiB, errors "
                        f"{(run['errors'] + run['checks']['problems'])[:2]}"
                    )
        finally:
            serve_exit = serve.stop() if serve.process is not None else None
            serve_stderr = serve.stderr if serve.process is not None else ""
            with contextlib.suppress(Exception):
                empty_bucket(s3, bucket)
                s3.delete_bucket(Bucket=bucket)
            s3.close()
            moto_exit = moto.stop()
            moto_stderr.seek(0)
            moto_log = moto_stderr.read()
        report["serve"] = {
            "exit_code": serve_exit,
            "tracebacks": traceback_count(serve_stderr),
            "stderr_lines": len(serve_stderr.splitlines()),
            "stderr_tail": serve_stderr[-10000:],
        }
        report["moto"] = {
            "exit_code": moto_exit,
            "tracebacks": traceback_count(moto_log),
            "stderr_tail": moto_log[-10000:],
        }
    report["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    report["run_s"] = time.monotonic() - started
    report["summary"] = summarize(report["runs"])
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = [run for run in report["runs"] if not run["verified"]]
    return 1 if failed or not report["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
