"""A render's three assets: ``upload_render`` against three ``put_file`` calls in a row.

Run from the repository root::

    python benchmarks/bench_render.py --json docs/bench_render.json

Issue 10 added :func:`ctrlupload.upload_render`: a render's video, subtitles and
thumbnail go up concurrently and are recorded together, in one ``complete-set`` call
where the backend offers it, else one by one. This script measures, in one run, against
the reference backend (``python -m ctrlupload serve``, local store):

1. ``render_set``: ``upload_render(storage, ...)`` with the set-level complete.
2. ``render_fallback``: ``upload_render`` against a backend without it: the client's
   ``BACKEND_STORAGE_COMPLETE_SET_PATH`` points at a path serve does not serve, which
   answers 404, so the client records the assets one by one. The provider is fresh in
   every run, so every run pays the one 404 that a long-lived provider pays once.
3. ``sequential``: ``storage.put_file`` of the same three files, one after the other.

The render is one ``--video-mib`` (200) MiB ``video.mp4``, a ``--srt-kib`` (50) KiB
``subtitles.srt`` and a ``--jpg-kib`` (300) KiB ``thumb.jpg`` of random bytes, written
once to the scratch folder (``/dev/shm`` when it has room, else the temp dir, or
``--workdir``). Every client setting is at its default but ``VIDEO_MAX_UPLOAD_BYTES``
(1 GiB; its default, 100 MiB, refuses the video): the video goes multipart (threshold
64 MiB, 8 MiB parts, 4 at a time, MD5 check on), the other two in one PUT each;
``upload_render`` runs its default 3 asset workers.

Every run has its own serve process (started through ``tests/support/serve_process.py``,
which reads the generated token from serve's stdout, so it is never on a command line)
on a fresh data dir and a free port, and its own client interpreter (this script in
``--child`` mode; the spec, token included, on its stdin). ``--rounds`` (5) rounds run
the three variants each; odd rounds run the previous order backwards and the start
rotates, so no variant always follows the same one. The tables show medians.

The child builds its provider, uploads 1 KiB (``put_object``) as a warm-up, resets its
VmHWM (``/proc/self/clear_refs``) and reads its VmRSS as the baseline, then waits for
``go``. It times the upload with ``perf_counter``, its CPU (user + sys, all threads) with
``getrusage``, and samples its VmRSS every ``--sample-ms`` (10) ms; growth is the
larger of the sampled peak and VmHWM, minus the baseline. This process reads serve's
CPU time (``/proc/PID/stat``) and the machine's busy time (``/proc/stat``) at ``go`` and
at ``done``; "other CPU" is the machine's busy time less the client's, serve's and this
harness's: what anything else on the machine did meanwhile.

Calls are counted on the server: serve runs with ``--access-log`` (one line per request
on stderr: method, path, status, bytes in and out, duration). After the run serve is
stopped (SIGTERM) and every access line is classified by method and path. The first
three lines must be the warm-up (presign-put, its PUT, complete) and are left out, as are
the GETs of the checks below; what remains is the measured upload. Every retried
attempt would show as its own line. The client counts the backend calls it made too
(its transport's ``post_json``, spied on, with the HTTP attempts urllib3 reported); the
two counts must agree.

Checks, before a run counts: each stored object's bytes (``GET`` of the public URL the
client got) have the source's MD5; after serve stopped, its SQLite database holds a row
for each of the three keys (plus the warm-up's) with the source's size and the ETag the
client reported, and no multipart upload is left pending. Markdown tables go to stdout,
progress to stderr, every raw number and the machine facts to ``--json`` (the token is
never printed or written). Exit status 1 when a run failed a check.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import importlib.metadata
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
VARIANTS = ("render_set", "render_fallback", "sequential")
LABELS = {
    "render_set": "`upload_render`, set-level complete",
    "render_fallback": "`upload_render`, backend without complete-set",
    "sequential": "3 `put_file` calls in a row",
}
ASSETS = ("video", "subtitles", "thumbnail")
#: The client's complete-set path in ``render_fallback``: serve answers 404 there.
ABSENT_COMPLETE_SET_PATH = "/internal/storage/complete-set-not-served"
VIDEO_ID = "V-RENDERBENCH"
WARM_KEY = "videos/V-RENDERBENCH/warm/warm/thumb.jpg"
CHILD_TIMEOUT_S = 600.0
_SETTING_PREFIXES = ("STORAGE_", "BACKEND_", "VIDEO_", "AWS_")
#: serve's access-log line: ``<addr> <METHOD> <path> <status> in=N out=N X.Xms``.
_ACCESS = re.compile(
    r"ctrlupload\.server\.access: (?P<addr>\S+) (?P<method>\S+) (?P<path>\S+) "
    r"(?P<status>\S+) in=(?P<received>\d+) out=(?P<sent>\d+) (?P<ms>[\d.]+)ms$"
)
_API = "/internal/storage/"
#: Every kind of call, in the order the tables list them.
KINDS = (
    "presign-put",
    "complete",
    "complete-set",
    "complete-set (404, not served)",
    "multipart/initiate",
    "multipart/presign-parts",
    "multipart/list-parts",
    "multipart/complete",
    "multipart/abort",
    "delete",
    "PUT object",
    "PUT part",
)

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


class RssSampler(threading.Thread):
    """This process's VmRSS every ``interval_s``, from /proc/self/statm, on a thread."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self._interval_s = interval_s
        self._halt = threading.Event()
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // KIB
        self.peak_kib = 0

    def run(self) -> None:
        with open("/proc/self/statm", "rb") as handle:
            while True:
                handle.seek(0)
                self.peak_kib = max(self.peak_kib, int(handle.read().split()[1]) * self._page_kib)
                if self._halt.wait(self._interval_s):
                    return

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# -- the client (``--child``) ------------------------------------------------------------


class CallSpy:
    """The backend calls a provider makes: its transport's ``post_json``, spied on."""

    def __init__(self, transport: Any, base_url: str) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._prefix = base_url.rstrip("/")
        real = transport.post_json

        def post_json(url: str, payload: Any, **kwargs: Any) -> Any:
            result = real(url, payload, **kwargs)
            with self._lock:
                self.calls.append(
                    {
                        "path": url.removeprefix(self._prefix),
                        "status": result.status_code,
                        "attempts": result.attempts,
                    }
                )
            return result

        transport.post_json = post_json

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


def child_main() -> int:
    """One measured run in a fresh interpreter: the spec on stdin, JSON lines on stdout.

    stdin: the spec (one JSON line), then ``go`` once the parent has read its meters.
    stdout: ``ready`` (after the warm-up, with the baseline), then ``done`` or ``error``.
    """
    from ctrlupload import BackendPresignedStorageProvider, Settings, upload_render

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    spec = json.loads(sys.stdin.readline())
    values = {
        "STORAGE_PROVIDER": "backend_presigned",
        "BACKEND_BASE_URL": spec["base_url"],
        "BACKEND_SERVICE_TOKEN": spec["token"],
        "VIDEO_MAX_UPLOAD_BYTES": GIB,
    }
    if spec["variant"] == "render_fallback":
        values["BACKEND_STORAGE_COMPLETE_SET_PATH"] = ABSENT_COMPLETE_SET_PATH
    storage = BackendPresignedStorageProvider(Settings.from_mapping(values))
    try:
        spy = CallSpy(storage._transport, spec["base_url"])
        storage.put_object(os.urandom(KIB), WARM_KEY)
        warm_calls = spy.take()
        gc.collect()
        baseline_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm_reset = reset_peak_rss("self")
        baseline_kib = proc_status("self")["VmRSS"]
        emit(event="ready", hwm_reset=hwm_reset)
        if sys.stdin.readline().strip() != "go":
            return 2
        paths, keys = spec["paths"], spec["keys"]
        sampler = RssSampler(spec["sample_ms"] / 1000)
        sampler.start()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        asset_s: dict[str, float] = {}
        if spec["variant"] == "sequential":
            stored = {}
            for asset in ASSETS:
                began = time.perf_counter()
                stored[asset] = storage.put_file(paths[asset], keys[asset])
                asset_s[asset] = time.perf_counter() - began
        else:
            render = upload_render(
                storage,
                VIDEO_ID,
                spec["script_id"],
                spec["job_id"],
                video=paths["video"],
                subtitles=paths["subtitles"],
                thumbnail=paths["thumbnail"],
            )
            stored = {asset: getattr(render, asset) for asset in ASSETS}
        wall_s = time.perf_counter() - started
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        sampler.stop()
        status = proc_status("self")
        calls = spy.take()
    except Exception as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        storage.close()
    peak_kib = max(sampler.peak_kib, status["VmHWM"] if hwm_reset else 0)
    emit(
        event="done",
        wall_s=wall_s,
        asset_s=asset_s,
        user_s=usage_after.ru_utime - usage_before.ru_utime,
        sys_s=usage_after.ru_stime - usage_before.ru_stime,
        baseline_rss_mib=baseline_kib / KIB,
        peak_rss_mib=peak_kib / KIB,
        rss_growth_mib=(peak_kib - baseline_kib) / KIB,
        maxrss_growth_mib=(usage_after.ru_maxrss - baseline_maxrss_kib) / KIB,
        warm_calls=warm_calls,
        client_calls=calls,
        results={
            asset: {
                "key": result.key,
                "url": result.url,
                "size_bytes": result.size_bytes,
                "content_type": result.content_type,
                "etag": result.etag,
            }
            for asset, result in stored.items()
        },
    )
    return 0


# -- the harness -------------------------------------------------------------------------


def children_env() -> dict[str, str]:
    """The environment of serve and the clients: this checkout importable, no settings."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(_SETTING_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
    )
    return env


def write_random(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; its MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(16 * MIB, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def classify(method: str, path: str) -> str:
    """The kind of call an access-log line is."""
    if method == "PUT" and path.startswith("/upload-part/"):
        return "PUT part"
    if method == "PUT" and path.startswith("/upload/"):
        return "PUT object"
    if method == "POST" and path == ABSENT_COMPLETE_SET_PATH:
        return "complete-set (404, not served)"
    if method == "POST" and path.startswith(_API):
        return path[len(_API) :]
    return f"{method} {path}"


def access_lines(stderr: str) -> list[dict[str, Any]]:
    """serve's access-log lines, parsed, in the order written."""
    lines = []
    for line in stderr.splitlines():
        match = _ACCESS.search(line)
        if match:
            entry: dict[str, Any] = match.groupdict()
            entry["kind"] = classify(entry["method"], entry["path"])
            entry["ms"] = float(entry["ms"])
            entry["received"] = int(entry["received"])
            entry["sent"] = int(entry["sent"])
            lines.append(entry)
    return lines


def client_kind(path: str) -> str:
    return classify("POST", path)


class Meters:
    """CPU seconds of serve, this harness and the whole machine, and the clock."""

    def __init__(self, serve_pid: int) -> None:
        self._serve_pid = serve_pid

    def read(self) -> dict[str, float]:
        times = os.times()
        return {
            "clock_s": time.monotonic(),
            "serve_cpu_s": proc_cpu_s(self._serve_pid),
            "harness_cpu_s": times.user + times.system,
            "machine_busy_s": machine_busy_s(),
        }


def run_child(spec: dict[str, Any], env: dict[str, str], cwd: Path, meters: Meters) -> dict:
    """Run one client child; its report plus serve's and the machine's CPU meanwhile."""
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
                    before = meters.read()
                    process.stdin.write("go\n")
                    process.stdin.flush()
                elif event["event"] in ("done", "error"):
                    if before is not None:
                        after = meters.read()
                        result.update({name: after[name] - before[name] for name in before})
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


def download_md5(url: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=60) as answer:
        while block := answer.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def check_db(db_path: Path, run: dict[str, Any], sources: dict[str, Any]) -> list[str]:
    """The rows serve recorded: one per asset (and the warm-up), none pending."""
    problems: list[str] = []
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = {
            key: (etag, size)
            for key, etag, size in db.execute("SELECT object_key, etag, size_bytes FROM assets")
        }
        pending = db.execute(
            "SELECT COUNT(*) FROM multipart_uploads WHERE completed_at IS NULL"
        ).fetchone()[0]
    if set(rows) != {WARM_KEY, *(item["key"] for item in run["results"].values())}:
        problems.append(f"recorded keys {sorted(rows)}")
    for asset, item in run["results"].items():
        etag, size = rows.get(item["key"], (None, None))
        if size != sources[asset]["size"]:
            problems.append(f"{item['key']}: recorded {size} bytes")
        if (etag or "").strip('"') != (item["etag"] or "").strip('"'):
            problems.append(f"{item['key']}: recorded ETag {etag}, client got {item['etag']}")
    if pending:
        problems.append(f"{pending} multipart uploads left pending")
    return problems


def run_once(variant: str, round_index: int, context: dict[str, Any]) -> dict[str, Any]:
    """One fresh serve, one client child, the checks, the access log counted."""
    from ctrlupload import render_asset_key
    from tests.support.serve_process import ServeProcess

    scratch: Path = context["scratch"]
    sources = context["sources"]
    script_id, job_id = f"S-{context['run_id']}", f"{variant}-r{round_index}"
    data_dir = scratch / f"data-{variant}-r{round_index}"
    serve = ServeProcess(
        data_dir,
        env=context["env"],
        args=("--port", "0", "--access-log"),
        cwd=scratch,
        ready_timeout_s=30.0,
    )
    os.sync()
    result: dict[str, Any] = {
        "variant": variant,
        "round": round_index,
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }
    problems: list[str] = []
    try:
        serve.start()
        if not serve.token:
            raise RuntimeError("serve did not print BACKEND_SERVICE_TOKEN=...")
        spec = {
            "variant": variant,
            "base_url": serve.base_url,
            "token": serve.token,
            "script_id": script_id,
            "job_id": job_id,
            "paths": {asset: str(sources[asset]["path"]) for asset in ASSETS},
            "keys": {
                asset: render_asset_key(VIDEO_ID, script_id, job_id, asset) for asset in ASSETS
            },
            "sample_ms": context["sample_ms"],
        }
        result.update(run_child(spec, context["env"], scratch, Meters(serve.pid)))
        if result["ok"]:
            for asset, item in result["results"].items():
                if item["key"] != spec["keys"][asset]:
                    problems.append(f"{asset} stored as {item['key']}")
                if download_md5(item["url"]) != sources[asset]["md5"]:
                    problems.append(f"{item['key']}: stored bytes differ from the source")
    finally:
        result["serve_exit"] = serve.stop() if serve.process is not None else None
    stderr = serve.stderr
    result["serve_tracebacks"] = sum(line.startswith("Traceback") for line in stderr.splitlines())
    lines = access_lines(stderr)
    warm, measured = lines[:3], [line for line in lines[3:] if line["method"] != "GET"]
    warm_kinds = sorted(line["kind"] for line in warm)
    if warm_kinds != ["PUT object", "complete", "presign-put"] or not any(
        line["path"] == "/upload/" + WARM_KEY for line in warm
    ):
        problems.append(f"the first access lines are not the warm-up: {warm}")
    result["server_calls"] = dict(Counter(line["kind"] for line in measured))
    result["server_statuses"] = dict(
        Counter(f"{line['kind']} {line['status']}" for line in measured)
    )
    result["server_api_ms"] = sum(line["ms"] for line in measured if line["method"] == "POST")
    by_kind: dict[str, float] = {}
    for line in measured:
        by_kind[line["kind"]] = by_kind.get(line["kind"], 0.0) + line["ms"]
    result["server_ms_by_kind"] = by_kind
    client = result.pop("client_calls", [])
    result["client_calls"] = dict(Counter(client_kind(call["path"]) for call in client))
    result["client_attempts"] = sum(call["attempts"] for call in client)
    server_api = {k: n for k, n in result["server_calls"].items() if not k.startswith("PUT ")}
    if result["ok"] and server_api != result["client_calls"]:
        problems.append(f"server counted {server_api}, client {result['client_calls']}")
    if result["ok"]:
        problems += check_db(data_dir / "assets.sqlite3", result, sources)
        wall = result["wall_s"]
        result["client_cpu_s"] = result["user_s"] + result["sys_s"]
        result["other_cpu_s"] = result["machine_busy_s"] - (
            result["client_cpu_s"] + result["serve_cpu_s"] + result["harness_cpu_s"]
        )
        result["mib_s"] = context["total_bytes"] / MIB / wall
    if result["serve_exit"] != 0 or result["serve_tracebacks"]:
        problems.append(
            f"serve exit {result['serve_exit']}, {result['serve_tracebacks']} tracebacks"
        )
    result["problems"] = problems
    result["verified"] = result["ok"] and not problems
    shutil.rmtree(data_dir, ignore_errors=True)
    return result


def round_order(variants: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """Odd rounds reverse the previous round's order; the start rotates every two."""
    shift = (round_index // 2) % len(variants)
    order = variants[shift:] + variants[:shift]
    return order[::-1] if round_index % 2 else order


# -- report ------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summarize(runs: list[dict[str, Any]], variants: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        mine = [run for run in runs if run["variant"] == variant]
        ok = [run for run in mine if run["verified"]]

        def med(name: str, ok: list[dict[str, Any]] = ok) -> float | None:
            values = [run[name] for run in ok if run.get(name) is not None]
            return statistics.median(values) if values else None

        counts = [json.dumps(run["server_calls"], sort_keys=True) for run in ok]
        kinds = sorted({kind for run in ok for kind in run["server_ms_by_kind"]})
        small = [
            (run["asset_s"]["subtitles"] + run["asset_s"]["thumbnail"]) * 1000
            for run in ok
            if run.get("asset_s")
        ]
        rows.append(
            {
                "variant": variant,
                "runs": len(mine),
                "verified": len(ok),
                "median_wall_s": med("wall_s"),
                "wall_s_runs": [run.get("wall_s") for run in mine],
                "min_wall_s": min((run["wall_s"] for run in ok), default=None),
                "max_wall_s": max((run["wall_s"] for run in ok), default=None),
                "median_mib_s": med("mib_s"),
                "median_client_cpu_s": med("client_cpu_s"),
                "median_serve_cpu_s": med("serve_cpu_s"),
                "median_other_cpu_s": med("other_cpu_s"),
                "median_serve_api_ms": med("server_api_ms"),
                "max_rss_growth_mib": max((run["rss_growth_mib"] for run in ok), default=None),
                "median_peak_rss_mib": med("peak_rss_mib"),
                "server_calls": ok[0]["server_calls"] if ok else {},
                "server_statuses": ok[0]["server_statuses"] if ok else {},
                "median_server_ms_by_kind": {
                    kind: statistics.median(run["server_ms_by_kind"].get(kind, 0.0) for run in ok)
                    for kind in kinds
                },
                "median_small_assets_ms": statistics.median(small) if small else None,
                "calls_same_every_run": len(set(counts)) <= 1,
            }
        )
    return rows


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    summary = report["summary"]
    by = {row["variant"]: row for row in summary}
    lines = [
        f"# bench_render ({facts['date']})",
        "",
        f"Machine: {facts['cpu_model']}, nproc {facts['nproc']}, {facts['mem_total']} RAM; "
        f"`{facts['uname']}`; Python {facts['python']}; "
        + ", ".join(f"{name} {version}" for name, version in facts["versions"].items())
        + f"; load average at start {facts['load_average_start']}, at end "
        f"{report['load_average_end']}",
        "",
        f"Command: `{report['command']}`, at {facts['git_commit'][:12]}"
        + (
            " (uncommitted: " + ", ".join(facts["uncommitted_library_files"]) + ")"
            if facts["uncommitted_library_files"]
            else ""
        )
        + f"; scratch {facts['scratch']}; {report['run_s']:.0f} s in all",
        "",
        f"Render: {report['parameters']['sources']}",
        "",
        "| variant | runs ok | wall s (median) | min-max s | vs sequential | MiB/s "
        "| client CPU s "
        "| serve CPU s | other CPU s | client RSS growth MiB (max) | backend API calls "
        "| storage PUTs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = by.get("sequential", {}).get("median_wall_s")

    def vs(row: dict[str, Any]) -> str:
        if not base or row["median_wall_s"] is None:
            return "n/a"
        return f"{row['median_wall_s'] / base:.3f}"

    for row in summary:
        calls = row["server_calls"]
        api = sum(n for kind, n in calls.items() if not kind.startswith("PUT "))
        puts = sum(n for kind, n in calls.items() if kind.startswith("PUT "))
        lines.append(
            f"| {LABELS[row['variant']]} | {row['verified']}/{row['runs']} "
            f"| {fmt(row['median_wall_s'], '.3f')} "
            f"| {fmt(row['min_wall_s'], '.3f')}-{fmt(row['max_wall_s'], '.3f')} "
            f"| {vs(row)} "
            f"| {fmt(row['median_mib_s'], '.0f')} | {fmt(row['median_client_cpu_s'])} "
            f"| {fmt(row['median_serve_cpu_s'])} | {fmt(row['median_other_cpu_s'])} "
            f"| {fmt(row['max_rss_growth_mib'], '.1f')} | {api} | {puts} |"
        )
    lines += [
        "",
        "Requests serve logged per run, by kind (identical in every run: "
        + ", ".join(f"{v} {by[v]['calls_same_every_run']}" for v in by)
        + "):",
        "",
        "| call | " + " | ".join(LABELS[v] for v in by) + " |",
        "|---|" + "---:|" * len(by),
    ]
    for kind in KINDS:
        counts = [by[v]["server_calls"].get(kind, 0) for v in by]
        if any(counts):
            lines.append(f"| {kind} | " + " | ".join(str(n) for n in counts) + " |")
    lines += [
        "",
        "Time serve spent answering, by kind (ms, the sum per run as its access log has it, "
        "median of the runs):",
        "",
        "| call | " + " | ".join(LABELS[v] for v in by) + " |",
        "|---|" + "---:|" * len(by),
    ]
    for kind in KINDS:
        times = [by[v]["median_server_ms_by_kind"].get(kind) for v in by]
        if any(t is not None for t in times):
            lines.append(f"| {kind} | " + " | ".join(fmt(t, ".1f") for t in times) + " |")
    if "sequential" in by and by["sequential"]["median_small_assets_ms"] is not None:
        lines += [
            "",
            "In the sequential runs the two small files took "
            f"{by['sequential']['median_small_assets_ms']:.1f} ms together (median): what "
            "running them beside the video can save at most.",
        ]
    lines += [
        "",
        "Every run, in the order run:",
        "",
        "| # | round | variant | load avg | wall s | client CPU s | serve CPU s | other CPU s "
        "| RSS growth MiB | checks |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for number, run in enumerate(report["runs"], 1):
        verdict = (
            "ok"
            if run["verified"]
            else "FAILED: " + "; ".join((run["problems"] or [run.get("error", "?")])[:2])
        )
        lines.append(
            f"| {number} | {run['round']} | {run['variant']} | {run['load_average'][0]} "
            f"| {fmt(run.get('wall_s'), '.3f')} | {fmt(run.get('client_cpu_s'))} "
            f"| {fmt(run.get('serve_cpu_s'))} | {fmt(run.get('other_cpu_s'))} "
            f"| {fmt(run.get('rss_growth_mib'), '.1f')} | {verdict} |"
        )
    return "\n".join(lines)


def machine_facts(scratch: Path) -> dict[str, Any]:
    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.rstrip("\n")

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
    for name in ("requests", "urllib3", "cheroot", "pydantic"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import ctrlupload

    versions["ctrlupload"] = ctrlupload.__version__
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "uname": run("uname", "-a"),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "mem_total": mem_total,
        "python": sys.version.split()[0],
        "versions": versions,
        "git_commit": run("git", "rev-parse", "HEAD"),
        "uncommitted_library_files": [
            line[3:] for line in run("git", "status", "--short", "ctrlupload").splitlines()
        ],
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
        "scratch": str(scratch),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--video-mib", type=int, default=200, help="the video.mp4")
    parser.add_argument("--srt-kib", type=int, default=50, help="the subtitles.srt")
    parser.add_argument("--jpg-kib", type=int, default=300, help="the thumb.jpg")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every variant")
    parser.add_argument("--sample-ms", type=float, default=10.0, help="client VmRSS sampling")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: /dev/shm)")
    parser.add_argument("--json", type=Path, help="write every number here as JSON")
    args = parser.parse_args(argv)
    if args.child:
        return child_main()
    variants = tuple(name.strip() for name in args.variants.split(",") if name.strip())
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    sizes = {
        "video": args.video_mib * MIB,
        "subtitles": args.srt_kib * KIB,
        "thumbnail": args.jpg_kib * KIB,
    }
    names = {"video": "video.mp4", "subtitles": "subtitles.srt", "thumbnail": "thumb.jpg"}
    base = args.workdir
    if base is None:
        # The sources once, and one run's data dir: the stored video plus its parts.
        need = 4 * sum(sizes.values())
        if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need:
            base = Path("/dev/shm")
    started = time.monotonic()
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bench_render.", dir=base) as scratch_name:
        scratch = Path(scratch_name)
        facts = machine_facts(scratch)
        log(f"machine: {json.dumps(facts)}")
        sources: dict[str, Any] = {}
        for asset in ASSETS:
            path = scratch / "render" / names[asset]
            path.parent.mkdir(exist_ok=True)
            md5 = write_random(path, sizes[asset])
            sources[asset] = {"path": path, "size": sizes[asset], "md5": md5}
        context = {
            "scratch": scratch,
            "sources": sources,
            "env": children_env(),
            "run_id": run_id,
            "sample_ms": args.sample_ms,
            "total_bytes": sum(sizes.values()),
        }
        report: dict[str, Any] = {
            "command": " ".join(["python", *sys.argv]),
            "machine": facts,
            "parameters": {
                "rounds": args.rounds,
                "variants": list(variants),
                "sample_ms": args.sample_ms,
                "sources": ", ".join(
                    f"{names[a]} {sizes[a] / MIB:.3f} MiB"
                    if a == "video"
                    else f"{names[a]} {sizes[a] / KIB:.0f} KiB"
                    for a in ASSETS
                )
                + " (random bytes)",
                "sizes_bytes": sizes,
                "client_settings": "defaults (multipart from 64 MiB, 8 MiB parts, 4 at a "
                "time, MD5 check on; upload_render max_workers=3), "
                "VIDEO_MAX_UPLOAD_BYTES=1 GiB",
                "absent_complete_set_path": ABSENT_COMPLETE_SET_PATH,
            },
            "runs": [],
        }
        for round_index in range(args.rounds):
            for variant in round_order(variants, round_index):
                run = run_once(variant, round_index, context)
                report["runs"].append(run)
                log(
                    f"round {round_index} {variant}: wall {fmt(run.get('wall_s'))} s, client "
                    f"CPU {fmt(run.get('client_cpu_s'))} s, serve CPU "
                    f"{fmt(run.get('serve_cpu_s'))} s, calls {run['server_calls']}, "
                    f"verified {run['verified']} {run['problems'][:2] or run.get('error', '')}"
                )
    for run in report["runs"]:
        for item in run.get("results", {}).values():
            item.pop("url", None)  # a loopback URL of a server long gone
    report["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    report["run_s"] = time.monotonic() - started
    report["summary"] = summarize(report["runs"], variants)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = [run for run in report["runs"] if not run["verified"]]
    return 1 if failed or not report["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
