"""CRC64NVME checked by storage (issue 11): what it costs, against curl and against MD5.

Run from the repository root::

    python benchmarks/bench_checksum.py --json docs/bench_checksum.json

It needs nginx at ``/usr/sbin/nginx`` (Debian's ``nginx`` package), ``curl`` and the
``openssl`` CLI (else the ``cryptography`` package) for a throwaway certificate, and
awscrt (``ctrlupload[checksum]``). It is not part of CI.

One run, one random file (``--size-mib``, 1 GiB), one loopback nginx PUT sink
listening with plain http and with TLS (``bench_single_put.NginxSink``: it discards
the body and answers 200 with an ETag), and, over http and over https:

1. ``curl -T`` of the whole file (the reference);
2. ``put_file`` in one PUT (``STORAGE_MULTIPART=never``) with
   ``STORAGE_CHECKSUM=crc64nvme``: the client reads the file once for its CRC64NVME
   before it presigns (that pass is inside the timed call), sends the value in
   presign-put, and the PUT carries the signed ``x-amz-checksum-crc64nvme``; no MD5 runs
   while it sends. Target: >= 0.75x curl;
3. the same with ``STORAGE_CHECKSUM=md5``: MD5 of the bytes while they are sent,
   checked against the ETag (nginx answers the file's MD5, as S3 would);
4. multipart (``STORAGE_MULTIPART=always``, ``STORAGE_MULTIPART_CONCURRENCY=8``, the
   library's default part size) with crc64nvme: initiate declares a full-object
   CRC64NVME, every part URL carries its part's CRC, complete carries the whole
   object's. Target: >= 0.9x curl of the whole file;
5. the same multipart with md5: each part's MD5 against its ETag (nginx answers each
   part's own MD5, from a ``map`` on the part's URL path);
6. controls: the single PUT and the multipart upload with ``STORAGE_CHECKSUM=off``,
   so "vs off" shows what each check costs on top of the transfer itself.

Rounds are interleaved (``--rounds`` 5 after ``--warmup-rounds`` 1; the order of the
variants rotates every round and the two schemes alternate which goes first), the
tables show medians and the JSON every round. Each upload also records the CPU time of
the client (``getrusage``; curl's as a child), of nginx's worker and, as "other", what
the whole machine used (``/proc/stat``) besides them and the backends: other jobs on
this shared machine, kernel threads. Before each round the script waits (at most
``--idle-timeout-s``, 900) until the machine was less than ``--max-busy`` (10 %) busy
over 2 s; the wait and that figure are in the JSON. Each round also times, on this thread,
awscrt's ``crc64nvme`` and ``hashlib.md5`` over the page-cached file in 8 MiB reads
(the client's CRC block size), and ``crc64nvme`` over one 8 MiB buffer in memory as
often as the file has blocks (the compute alone). Then a fresh interpreter per case
(``bench_single_put.RSS_CHILD``) uploads the file with crc64nvme, single PUT and
multipart, over each scheme: peak RSS growth, ``ru_maxrss`` and VmRSS sampled every
5 ms, over the baseline after imports, provider creation and a tiny warm-up upload;
a second child per case samples resident minus shared pages (``statm``), i.e. the
anonymous memory without the page-cache pages of the file maps the client sends from.
Target: <= 64 MiB.

The backend is ``tests.support.servers.FakeBackend`` extended with what a backend that
takes on issue 11 answers: presign-put echoes ``x-amz-checksum-crc64nvme`` in its
``headers``; multipart initiate, presign-parts (each part's checksum in its headers),
list-parts, complete and abort; it runs in a spawned process, so it does not compete
for the client's GIL. nginx verifies nothing: it neither checks nor echoes the CRC.
What the benchmark checks instead: every checksum the client sent to the backend
(presign-put, each part, complete) against the CRC64NVME the harness computed itself
from the file, and every ``put_file`` result (integrity, checksum or ETag). A failed
check exits 1; so does a missed target (after the report and the JSON are written).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_multipart import machine_cpu_s  # noqa: E402
from bench_server import git_facts, load_average  # noqa: E402
from bench_single_put import (  # noqa: E402
    BIG_KEY,
    GIB,
    KIB,
    MIB,
    NGINX,
    RSS_CHILD,
    RSS_TARGET_MIB,
    TOKEN,
    Doubles,
    NginxSink,
    TlsFiles,
    Variant,
    _children_cpu_s,
    _Endpoint,
    _median,
    _restore_env,
    _self_cpu_s,
    ktls_facts,
    machine_facts,
    make_random_file,
    make_self_signed_cert,
    tls_session_facts,
)

from ctrlupload import BackendPresignedStorageProvider, Settings, _checksum  # noqa: E402
from ctrlupload.protocol._parts import DEFAULT_PART_BYTES, plan_parts  # noqa: E402
from tests.support.servers import (  # noqa: E402
    FakeBackend,
    StorageSink,
    _BackendHandler,
    _content_length,
    _decode_json,
)

SINGLE_TARGET = 0.75
MULTIPART_TARGET = 0.9
CONCURRENCY = 8
MULTIPART_PREFIX = "/internal/storage/multipart/"
READ_BYTES = 8 * MIB
SCHEMES = ("http", "https")
#: name -> (label, settings); every variant but curl is put_file.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "single_crc": (
        "put_file, one PUT, STORAGE_CHECKSUM=crc64nvme",
        {"storage_multipart": "never", "storage_checksum": "crc64nvme"},
    ),
    "single_md5": (
        "put_file, one PUT, STORAGE_CHECKSUM=md5",
        {"storage_multipart": "never", "storage_checksum": "md5"},
    ),
    "multipart_crc": (
        f"put_file, multipart, {CONCURRENCY} parts in flight, crc64nvme",
        {
            "storage_multipart": "always",
            "storage_multipart_concurrency": CONCURRENCY,
            "storage_checksum": "crc64nvme",
        },
    ),
    "multipart_md5": (
        f"put_file, multipart, {CONCURRENCY} parts in flight, md5",
        {
            "storage_multipart": "always",
            "storage_multipart_concurrency": CONCURRENCY,
            "storage_checksum": "md5",
        },
    ),
    "single_off": (
        "put_file, one PUT, STORAGE_CHECKSUM=off (control)",
        {"storage_multipart": "never", "storage_checksum": "off"},
    ),
    "multipart_off": (
        f"put_file, multipart, {CONCURRENCY} parts in flight, off (control)",
        {
            "storage_multipart": "always",
            "storage_multipart_concurrency": CONCURRENCY,
            "storage_checksum": "off",
        },
    ),
}


@dataclass
class MeteredVariant(Variant):
    """A Variant that also keeps, per round, the machine's CPU time no process of the
    run used (other jobs on the machine, kernel threads)."""

    other_cpu_s: list[float] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_idle(max_busy: float, timeout_s: float, window_s: float = 2.0) -> dict[str, float]:
    """Wait until the machine was busy less than ``max_busy`` (a fraction of all CPUs)
    over ``window_s``, at most ``timeout_s``: this VM is shared, and a round that
    starts while someone's test suite runs measures the suite."""
    cpus = len(os.sched_getaffinity(0))
    started = time.monotonic()
    while True:
        before = machine_cpu_s()[0]
        time.sleep(window_s)
        busy = (machine_cpu_s()[0] - before) / (window_s * cpus)
        waited = time.monotonic() - started
        if busy < max_busy or waited >= timeout_s:
            return {"waited_s": waited, "busy_fraction": busy}


# --------------------------------------------------------------------------- the file


def file_digests(path: Path, part_bytes: int) -> dict[str, Any]:
    """What the harness itself knows of the file: the whole CRC64NVME, and each part's
    CRC64NVME and MD5 for ``part_bytes`` parts."""
    whole = 0
    part_crcs, part_md5s = [], []
    with open(path, "rb", buffering=0) as handle:
        for part in plan_parts(path.stat().st_size, part_bytes):
            data = handle.read(part.length)
            crc = _checksum.crc64nvme(data)
            whole = _checksum.crc64nvme(data, whole)
            part_crcs.append(_checksum.encode(crc))
            part_md5s.append(hashlib.md5(data, usedforsecurity=False).hexdigest())
    return {
        "size": path.stat().st_size,
        "part_bytes": part_bytes,
        "crc": _checksum.encode(whole),
        "part_crcs": part_crcs,
        "part_md5s": part_md5s,
    }


def multipart_etag(md5s: list[str]) -> str:
    """S3's ETag of a multipart object: the MD5 of the parts' binary MD5s, ``-N``."""
    joined = b"".join(bytes.fromhex(md5) for md5 in md5s)
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(md5s)}"'


def hash_speed(path: Path, update: Callable[[memoryview], None]) -> float:
    """Seconds for ``update`` over the file in 8 MiB reads, on this thread."""
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            update(view[:n])
    return time.perf_counter() - started


def raw_speeds(path: Path, expected_crc: str) -> dict[str, float]:
    """One pass of each: awscrt crc64nvme and hashlib.md5 (the checks' own cost)."""
    state = {"crc": 0}
    md5 = hashlib.md5(usedforsecurity=False)

    def crc_update(view: memoryview) -> None:
        state["crc"] = _checksum.crc64nvme(view, state["crc"])

    crc_s = hash_speed(path, crc_update)
    md5_s = hash_speed(path, md5.update)
    if _checksum.encode(state["crc"]) != expected_crc:
        raise RuntimeError("CRC64NVME mismatch re-reading the test file")
    # The same bytes' worth of CRC over one 8 MiB buffer: the compute without the reads.
    block = memoryview(bytearray(os.urandom(READ_BYTES)))
    started = time.perf_counter()
    for _ in range(-(-path.stat().st_size // READ_BYTES)):
        _checksum.crc64nvme(block)
    memory_s = time.perf_counter() - started
    return {"crc64nvme_s": crc_s, "md5_s": md5_s, "crc64nvme_memory_s": memory_s}


# --------------------------------------------------------------------------- the backend


class _ChecksumHandler(_BackendHandler):
    """FakeBackend's presign-put, complete and delete, with the checksum echoed in
    presign-put's headers; plus the multipart calls, answered by ChecksumBackend."""

    _signed: dict[str, str] | None = None

    @property
    def _checksums(self) -> ChecksumBackend:
        return cast(ChecksumBackend, self._host)

    def _presign(self, payload: Any) -> None:
        if isinstance(payload, dict) and payload.get("checksum_algorithm") == _checksum.ALGORITHM:
            checksum = str(payload.get("checksum"))
            self._signed = {_checksum.HEADER: checksum}
            self._checksums.check(payload.get("content_length"), "presign-put", checksum)
        super()._presign(payload)

    def _reply(self, status: int, payload: Any, headers: Any = None) -> None:
        signed, self._signed = self._signed, None
        if signed and isinstance(payload, dict) and isinstance(payload.get("headers"), dict):
            payload["headers"].update(signed)
        super()._reply(status, payload, headers)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if not path.startswith(MULTIPART_PREFIX):
            super().do_POST()
            return
        headers = self._headers_dict()
        length = _content_length(headers)
        buffer = bytearray()
        if length is None or self._read_exactly(length, buffer)[0] < length:
            self.close_connection = True
            return
        backend = self._checksums
        if headers.get("authorization") != f"Bearer {backend.token}":
            self._reply(401, {"error": "unauthorized"})
            return
        payload = _decode_json(bytes(buffer))
        answer = backend.multipart(path.removeprefix(MULTIPART_PREFIX), payload)
        if answer is None:
            self._reply(404, {"error": "not_found"})
        else:
            self._reply(200, answer)


class ChecksumBackend(FakeBackend):
    """A FakeBackend that takes on issue 11's CRC64NVME, single PUT and multipart, and
    checks every checksum the client sends against ``expected`` (:func:`file_digests`)
    when the upload is of the big file."""

    _handler_class = _ChecksumHandler

    def __init__(self, storage: StorageSink, expected: dict[str, Any]) -> None:
        super().__init__(storage, token=TOKEN)
        self.expected = expected
        self.uploads: dict[str, dict[str, Any]] = {}
        self.mismatches: list[str] = []
        self.checked = 0
        self.multipart_completed = 0

    def check(
        self, size: Any, what: str, checksum: str, part: int | None = None, part_size: Any = None
    ) -> None:
        """Compare one checksum the client sent with the harness's (big file only)."""
        if size != self.expected["size"]:
            return
        if part is None:
            want = self.expected["crc"]
        elif part_size == self.expected["part_bytes"]:
            want = self.expected["part_crcs"][part - 1]
        else:
            return
        with self._lock:
            self.checked += 1
            if checksum != want:
                self.mismatches.append(f"{what}, part {part}: {checksum} != {want}")

    def multipart(self, action: str, payload: Any) -> dict[str, Any] | None:
        if not isinstance(payload, dict):
            return None
        if action == "initiate":
            return self._initiate(payload)
        if action == "presign-parts":
            return self._presign_parts(payload)
        if action == "list-parts":
            return {"parts": [], "is_truncated": False}
        if action == "complete":
            return self._complete(payload)
        if action == "abort":
            with self._lock:
                self.uploads.pop(str(payload.get("upload_id")), None)
            return {"status": "ok"}
        return None

    def _initiate(self, payload: dict[str, Any]) -> dict[str, Any]:
        upload_id = secrets.token_hex(8)
        crc = payload.get("checksum_algorithm") == _checksum.ALGORITHM
        with self._lock:
            self.uploads[upload_id] = {
                "size": payload.get("content_length"),
                "part_size": payload.get("part_size") or DEFAULT_PART_BYTES,
                "checksum": crc,
            }
        answer: dict[str, Any] = {
            "upload_id": upload_id,
            "part_size": self.uploads[upload_id]["part_size"],
            "expires_sec": self.expires_sec,
        }
        if crc and payload.get("checksum_type") == "FULL_OBJECT":
            answer.update(checksum_algorithm=_checksum.ALGORITHM, checksum_type="FULL_OBJECT")
        return answer

    def _presign_parts(self, payload: dict[str, Any]) -> dict[str, Any]:
        upload_id = str(payload.get("upload_id"))
        key = str(payload.get("object_key"))
        numbers: list[int] = payload.get("part_numbers") or []
        checksums: list[str] | None = payload.get("checksums")
        with self._lock:
            upload = dict(self.uploads.get(upload_id, {}))
        parts = []
        for index, number in enumerate(numbers):
            headers: dict[str, str] = {}
            if checksums is not None:
                headers[_checksum.HEADER] = checksums[index]
                self.check(
                    upload.get("size"), "presign-parts", checksums[index], number,
                    upload.get("part_size"),
                )  # fmt: skip
            parts.append(
                {
                    "part_number": number,
                    "upload_url": f"{self.storage.base_url}/parts/{number}/{quote(key)}"
                    f"?uploadId={upload_id}&partNumber={number}"
                    f"&X-Amz-Signature={secrets.token_hex(16)}",
                    "headers": headers,
                }
            )
        return {"parts": parts, "expires_sec": self.expires_sec}

    def _complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            upload = self.uploads.pop(str(payload.get("upload_id")), {})
            self.multipart_completed += 1
        checksum = payload.get("checksum")
        if checksum is not None:
            self.check(upload.get("size"), "multipart complete", str(checksum))
        etags = [str(part["etag"]).strip('"') for part in payload.get("parts", [])]
        answer = {
            "public_url": f"{self.public_base_url}/{payload.get('object_key')}",
            "etag": multipart_etag(etags),
        }
        if checksum is not None:
            answer["checksum"] = checksum
        return answer

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "checked": self.checked,
                "mismatches": list(self.mismatches),
                "completed": len(self.completed),
                "multipart_completed": self.multipart_completed,
                "errors": [repr(e) for e in self.errors],
            }


def _backends_main(conn: Connection, upload_urls: dict[str, str], expected: Any) -> None:
    """Child process: one ChecksumBackend per scheme, its upload URLs on nginx."""
    with contextlib.ExitStack() as stack:
        backends = {
            scheme: stack.enter_context(
                ChecksumBackend(cast(StorageSink, _Endpoint(url)), expected)
            )
            for scheme, url in upload_urls.items()
        }
        conn.send({scheme: backend.base_url for scheme, backend in backends.items()})
        while conn.recv() == "stats":
            conn.send({scheme: backend.stats() for scheme, backend in backends.items()})


class Backends(Doubles):
    """:func:`_backends_main` in a spawned process (Doubles' pipe, CPU and stop)."""

    def __init__(self, upload_urls: dict[str, str], expected: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=_backends_main,
            args=(child, upload_urls, expected),
            name="bench-backends",
            daemon=True,
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(30):
            raise RuntimeError("fake backends did not start")
        self.urls: dict[str, str] = self._conn.recv()


class PartEtagNginx(NginxSink):
    """The NginxSink, but a part's PUT (``/parts/N/...``) gets that part's MD5 as its
    ETag, as S3 answers, so the md5 multipart variant can check every part."""

    def __init__(
        self, workdir: Path, digests: dict[str, Any], md5_hex: str, tiny_md5: str, tls: TlsFiles
    ) -> None:
        super().__init__(workdir, md5_hex, tiny_md5, tls)
        marker = f"~warmup '\"{tiny_md5}\"';\n"
        conf = self.conf.read_text()
        if marker not in conf:
            raise RuntimeError("bench_single_put's nginx map changed: update PartEtagNginx")
        parts = "".join(
            f"        ~^/parts/{number}/ '\"{md5}\"';\n"
            for number, md5 in enumerate(digests["part_md5s"], 1)
        )
        self.conf.write_text(conf.replace(marker, marker + parts, 1))


# --------------------------------------------------------------------------- the rounds


def settings_for(backend_url: str, size: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "backend_base_url": backend_url,
        "backend_service_token": TOKEN,
        "video_max_upload_bytes": max(2 * size, 100 * MIB),
        **extra,
    }


def result_problem(name: str, result: Any, digests: dict[str, Any], md5_hex: str) -> str:
    """Why a put_file result is not what this variant must give, or ""."""
    if result.size_bytes != digests["size"]:
        return f"size {result.size_bytes}"
    if name.endswith("_off"):
        return "" if result.integrity == "none" else f"integrity {result.integrity}"
    if name.endswith("_crc"):
        if result.integrity != "crc64nvme" or result.checksum != digests["crc"]:
            return f"integrity {result.integrity}, checksum {result.checksum}"
        return ""
    etag = f'"{md5_hex}"' if name == "single_md5" else multipart_etag(digests["part_md5s"])
    if result.integrity != "md5" or result.etag != etag:
        return f"integrity {result.integrity}, etag {result.etag} (want {etag})"
    return ""


def bench_rounds(
    args: argparse.Namespace,
    big_file: Path,
    tiny_file: Path,
    digests: dict[str, Any],
    md5_hex: str,
    nginx: NginxSink,
    backends: Backends,
) -> tuple[dict[str, dict[str, MeteredVariant]], list[dict[str, float]]]:
    size = digests["size"]
    assert nginx.tls is not None and nginx.https_url is not None
    urls = {"http": nginx.base_url, "https": nginx.https_url}
    counter = iter(range(10**9))
    providers: dict[tuple[str, str], BackendPresignedStorageProvider] = {}

    cert = str(nginx.tls.cert)

    def curl(scheme: str) -> Callable[[], None]:
        tls = ["--cacert", cert] if scheme == "https" else []
        command = ["curl", "-sS", *tls, "-T", str(big_file), "-o", "/dev/null", f"{urls[scheme]}/x"]

        def run() -> None:
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"curl failed ({out.returncode}): {out.stderr.strip()}")

        return run

    def ours(scheme: str, name: str) -> Callable[[], None]:
        provider = providers[scheme, name]

        def run() -> None:
            result = provider.put_file(big_file, BIG_KEY.format(job=f"{name}-{next(counter)}"))
            problem = result_problem(name, result, digests, md5_hex)
            if problem:
                raise RuntimeError(f"{name} over {scheme}: {problem}")

        return run

    table: dict[str, dict[str, MeteredVariant]] = {}
    for scheme in SCHEMES:
        curl_label = "curl -T" + (" --cacert" if scheme == "https" else "") + " (reference)"
        table[scheme] = {"curl": MeteredVariant("curl", curl_label, curl(scheme))}
        for name, (label, extra) in VARIANTS.items():
            providers[scheme, name] = BackendPresignedStorageProvider(
                Settings(**settings_for(backends.urls[scheme], size, extra))
            )
            table[scheme][name] = MeteredVariant(name, label, ours(scheme, name))
    speeds: list[dict[str, float]] = []
    try:
        for (scheme, name), provider in providers.items():
            provider.put_file(tiny_file, BIG_KEY.format(job=f"{scheme}-{name}-warmup"))
        for round_no in range(-args.warmup_rounds, args.rounds):
            tag = "warm-up" if round_no < 0 else f"round {round_no + 1}"
            idle = wait_idle(args.max_busy, args.idle_timeout_s) if args.max_busy else {}
            if idle:
                log(
                    f"  {tag:>8} waited {idle['waited_s']:.0f} s for the machine "
                    f"({idle['busy_fraction']:.0%} busy)"
                )
            raw = raw_speeds(big_file, digests["crc"])
            log(
                f"  {tag:>8} raw: crc64nvme {size / GIB / raw['crc64nvme_s']:6.2f} GiB/s "
                f"({size / GIB / raw['crc64nvme_memory_s']:.2f} in memory), "
                f"md5 {size / GIB / raw['md5_s']:5.2f} GiB/s"
            )
            if round_no >= 0:
                speeds.append({**raw, **idle})
            for scheme in SCHEMES if round_no % 2 == 0 else SCHEMES[::-1]:
                order = list(table[scheme].values())
                shift = round_no % len(order)
                for variant in order[shift:] + order[:shift]:
                    run_variant(variant, scheme, tag, round_no >= 0, nginx, backends, size)
    finally:
        for provider in providers.values():
            provider.close()
    return table, speeds


def run_variant(
    variant: MeteredVariant,
    scheme: str,
    tag: str,
    keep: bool,
    nginx: NginxSink,
    backends: Backends,
    size: int,
) -> None:
    cpu_self, cpu_children = _self_cpu_s(), _children_cpu_s()
    cpu_nginx, cpu_backends, busy = nginx.worker_cpu_s(), backends.cpu_s(), machine_cpu_s()[0]
    started = time.perf_counter()
    variant.run()
    elapsed = time.perf_counter() - started
    busy = machine_cpu_s()[0] - busy
    client_cpu = (
        _children_cpu_s() - cpu_children if variant.name == "curl" else _self_cpu_s() - cpu_self
    )
    nginx_cpu = nginx.worker_cpu_s() - cpu_nginx
    other_cpu = busy - client_cpu - nginx_cpu - (backends.cpu_s() - cpu_backends)
    if keep:
        variant.seconds.append(elapsed)
        variant.client_cpu_s.append(client_cpu)
        variant.nginx_cpu_s.append(nginx_cpu)
        variant.other_cpu_s.append(other_cpu)
    log(
        f"  {tag:>8} {scheme:<5} {variant.name:<14} {elapsed:7.3f} s "
        f"{size / GIB / elapsed:6.2f} GiB/s  client CPU {client_cpu:5.2f} s  "
        f"nginx CPU {nginx_cpu:5.2f} s  other CPU {other_cpu:5.2f} s"
    )


def summarize(table: dict[str, dict[str, MeteredVariant]], size: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scheme, variants in table.items():
        curl_s = _median(variants["curl"].seconds)
        results[scheme] = {}
        for name, variant in variants.items():
            median_s = _median(variant.seconds)
            results[scheme][name] = {
                "label": variant.label,
                "seconds": variant.seconds,
                "median_s": median_s,
                "min_s": min(variant.seconds),
                "max_s": max(variant.seconds),
                "median_gib_s": size / GIB / median_s,
                "ratio_vs_curl": curl_s / median_s,
                "ratio_vs_curl_per_round": [
                    c / s for c, s in zip(variants["curl"].seconds, variant.seconds, strict=True)
                ],
                "client_cpu_s": variant.client_cpu_s,
                "median_client_cpu_s": _median(variant.client_cpu_s),
                "nginx_cpu_s": variant.nginx_cpu_s,
                "median_nginx_cpu_s": _median(variant.nginx_cpu_s),
                "other_cpu_s": variant.other_cpu_s,
                "median_other_cpu_s": _median(variant.other_cpu_s),
            }
        for mode in ("single", "multipart"):
            crc, md5 = results[scheme][f"{mode}_crc"], results[scheme][f"{mode}_md5"]
            off = results[scheme][f"{mode}_off"]
            crc["ratio_vs_md5"] = md5["median_s"] / crc["median_s"]
            for row in (crc, md5):
                row["ratio_vs_off"] = off["median_s"] / row["median_s"]
    return results


_STATM_RESIDENT = "return int(handle.read().split()[1]) * PAGE_KIB"
#: RSS_CHILD sampling resident minus shared pages (statm): anonymous memory only, without
#: the page-cache pages of the file maps the client sends from.
RSS_ANON_CHILD = RSS_CHILD.replace(
    _STATM_RESIDENT, "fields = handle.read().split()\n"
    "        return (int(fields[1]) - int(fields[2])) * PAGE_KIB",
)  # fmt: skip


def rss_child(child: str, cfg: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", child, json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{out.stderr}")
    data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


def bench_rss(big_file: Path, tiny_file: Path, backends: Backends) -> dict[str, Any]:
    """A fresh interpreter per case, crc64nvme: single PUT and multipart, each scheme;
    then one more per case sampling anonymous memory alone."""
    if _STATM_RESIDENT not in RSS_CHILD:
        raise RuntimeError("bench_single_put.RSS_CHILD changed: update RSS_ANON_CHILD")
    size = big_file.stat().st_size
    results: dict[str, Any] = {}
    for scheme in SCHEMES:
        for name in ("single_crc", "multipart_crc"):
            case = f"{scheme}_{name}"
            cfg = {
                "settings": settings_for(backends.urls[scheme], size, VARIANTS[name][1]),
                "tiny": str(tiny_file),
                "big": str(big_file),
                "key": BIG_KEY.replace("{job}", "rss-" + case + "-{job}"),
            }
            data = rss_child(RSS_CHILD, cfg)
            anon = rss_child(RSS_ANON_CHILD, cfg)
            growth = (data["peak_kib"] - data["baseline_kib"]) / KIB
            sampled = (data["sampled_peak_kib"] - data["baseline_now_kib"]) / KIB
            anon_growth = (anon["sampled_peak_kib"] - anon["baseline_now_kib"]) / KIB
            results[case] = {
                "vmrss_child": data,
                "anon_child": anon,
                "maxrss_growth_mib": growth,
                "sampled_growth_mib": sampled,
                "anon_sampled_growth_mib": anon_growth,
                "growth_mib": max(growth, sampled),
                "target_met": max(growth, sampled) <= RSS_TARGET_MIB,
            }
            log(
                f"  rss {case:<22} ru_maxrss +{growth:5.1f} MiB, VmRSS +{sampled:5.1f} MiB, "
                f"anonymous +{anon_growth:5.1f} MiB"
            )
    return results


# --------------------------------------------------------------------------- report


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for scheme in SCHEMES:
        for name, target in (("single_crc", SINGLE_TARGET), ("multipart_crc", MULTIPART_TARGET)):
            ratio = report["throughput"][scheme][name]["ratio_vs_curl"]
            rows.append(
                {
                    "target": f"{scheme}: {VARIANTS[name][0]} >= {target}x curl -T",
                    "measured": ratio,
                    "met": ratio >= target,
                }
            )
    for case, row in report["rss"].items():
        rows.append(
            {
                "target": f"RSS growth {case} <= {RSS_TARGET_MIB:.0f} MiB",
                "measured": row["growth_mib"],
                "met": row["target_met"],
            }
        )
    return rows


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    params = report["parameters"]
    raw = report["raw_speed"]
    lines = [
        f"# bench_checksum ({facts['date']}, {params['size_mib']} MiB, "
        f"{params['rounds']} rounds, at {facts['git_head']})",
        "",
        f"Machine: {facts['cpu_model']}, nproc {facts['nproc']}, {facts['mem_total']} RAM, "
        f"Linux {facts['kernel']}; Python {facts['python']}, awscrt {facts['awscrt']}, "
        f"urllib3 {facts['urllib3']}; {facts['curl']}; {facts['nginx']}; load average "
        f"{report['load_average_start']} at the start, {report['load_average_end']} at the end",
        "",
        "| scheme | variant | median s | min..max s | GiB/s | vs curl | vs md5 | vs off "
        "| client CPU s | nginx CPU s | other CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scheme, rows in report["throughput"].items():
        for row in rows.values():
            vs_md5, vs_off = (
                f"{row[name]:.2f}" if name in row else "—"
                for name in ("ratio_vs_md5", "ratio_vs_off")
            )
            lines.append(
                f"| {scheme} | {row['label']} | {row['median_s']:.3f} | "
                f"{row['min_s']:.3f}..{row['max_s']:.3f} | {row['median_gib_s']:.2f} | "
                f"{row['ratio_vs_curl']:.2f} | {vs_md5} | {vs_off} | "
                f"{row['median_client_cpu_s']:.2f} | {row['median_nginx_cpu_s']:.2f} | "
                f"{row['median_other_cpu_s']:.2f} |"
            )
    lines += [
        "",
        f"Raw, one core, 8 MiB reads of the page-cached file (median of {params['rounds']}): "
        f"awscrt crc64nvme {raw['crc64nvme_gib_s']:.2f} GiB/s, hashlib.md5 "
        f"{raw['md5_gib_s']:.2f} GiB/s ({raw['crc_vs_md5']:.1f}x); crc64nvme without the "
        f"reads (one 8 MiB buffer in memory) {raw['crc64nvme_memory_gib_s']:.2f} GiB/s.",
        "",
        "| RSS case (fresh interpreter) | ru_maxrss growth MiB | sampled VmRSS growth MiB "
        "| sampled anonymous growth MiB |",
        "|---|---:|---:|---:|",
    ]
    for case, row in report["rss"].items():
        lines.append(
            f"| {case} | {row['maxrss_growth_mib']:.1f} | {row['sampled_growth_mib']:.1f} | "
            f"{row['anon_sampled_growth_mib']:.1f} |"
        )
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    for row in report["verdicts"]:
        lines.append(
            f"| {row['target']} | {row['measured']:.2f} | {'met' if row['met'] else 'MISSED'} |"
        )
    checks = report["backend_checks"]
    lines += [
        "",
        f"Checksums the client sent, checked by the backend against the harness's: "
        f"{checks['checked']} (mismatches: {len(checks['mismatches'])}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="write every number here as JSON")
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (1024)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds (1)")
    parser.add_argument("--workdir", type=Path, help="where the file goes (default: temp dir)")
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.1,
        help="before each round, wait until the machine is below this busy fraction over "
        "2 s (0.1; 0 never waits)",
    )
    parser.add_argument(
        "--idle-timeout-s", type=float, default=900, help="longest wait per round (900)"
    )
    args = parser.parse_args(argv)
    if shutil.which("curl") is None or not os.access(NGINX, os.X_OK):
        parser.error(f"needs curl on PATH and {NGINX}")
    if not _checksum.available():
        parser.error(f"needs awscrt: {_checksum.INSTALL_HINT}")

    load_start = load_average()
    facts = {
        **machine_facts(),
        **git_facts(),
        "awscrt": importlib.metadata.version("awscrt"),
    }
    log(f"machine: {json.dumps(facts)}; load average {load_start}")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench_checksum.", dir=args.workdir)
            )
        )
        big_file, tiny_file = workdir / "big.bin", workdir / "tiny.bin"
        log(f"writing {args.size_mib} MiB of random bytes to {big_file}")
        md5_hex = make_random_file(big_file, args.size_mib * MIB)
        tiny = os.urandom(KIB)
        tiny_file.write_bytes(tiny)
        digests = file_digests(big_file, DEFAULT_PART_BYTES)
        nginx_dir = workdir / "nginx"
        nginx_dir.mkdir()
        tls_files = make_self_signed_cert(nginx_dir)
        # Read once when a Transport is built: set before any provider exists; the RSS
        # children inherit it. Restored when the run ends.
        stack.callback(_restore_env, "REQUESTS_CA_BUNDLE", os.environ.get("REQUESTS_CA_BUNDLE"))
        os.environ["REQUESTS_CA_BUNDLE"] = str(tls_files.cert)
        tiny_md5 = hashlib.md5(tiny, usedforsecurity=False).hexdigest()
        nginx = stack.enter_context(PartEtagNginx(nginx_dir, digests, md5_hex, tiny_md5, tls_files))
        assert nginx.tls_port is not None and nginx.https_url is not None
        tls_report = {
            "cert_tool": tls_files.tool,
            "session": tls_session_facts(nginx.tls_port, tls_files.cert),
            **ktls_facts(),
        }
        log(f"tls: {json.dumps(tls_report)}")
        backends = Backends({"http": nginx.base_url, "https": nginx.https_url}, digests)
        stack.callback(backends.close)

        table, speeds = bench_rounds(args, big_file, tiny_file, digests, md5_hex, nginx, backends)
        rss = bench_rss(big_file, tiny_file, backends)
        stats = backends.stats()
        nginx_errors = (nginx_dir / "error.log").read_text(errors="replace")

    size = digests["size"]
    crc_s = _median([s["crc64nvme_s"] for s in speeds])
    crc_memory_s = _median([s["crc64nvme_memory_s"] for s in speeds])
    md5_s = _median([s["md5_s"] for s in speeds])
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": facts,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "run_seconds": time.perf_counter() - started,
        "parameters": {
            "size_mib": args.size_mib,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
            "max_busy": args.max_busy,
            "idle_timeout_s": args.idle_timeout_s,
            "part_bytes": DEFAULT_PART_BYTES,
            "parts": len(digests["part_crcs"]),
            "concurrency": CONCURRENCY,
            "variants": {name: extra for name, (_, extra) in VARIANTS.items()},
        },
        "tls": tls_report,
        "throughput": summarize(table, size),
        "raw_speed": {
            "read_bytes": READ_BYTES,
            "rounds": speeds,
            "crc64nvme_gib_s": size / GIB / crc_s,
            "crc64nvme_memory_gib_s": size / GIB / crc_memory_s,
            "md5_gib_s": size / GIB / md5_s,
            "crc_vs_md5": md5_s / crc_s,
        },
        "rss": rss,
        "rss_target_mib": RSS_TARGET_MIB,
        "backend_checks": {
            "checked": sum(s["checked"] for s in stats.values()),
            "mismatches": [m for s in stats.values() for m in s["mismatches"]],
            "errors": [e for s in stats.values() for e in s["errors"]],
            "per_scheme": stats,
        },
        "nginx_error_log": nginx_errors[-4000:],
    }
    report["verdicts"] = verdicts(report)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON written to {args.json}")
    checks = report["backend_checks"]
    if checks["mismatches"] or checks["errors"] or not checks["checked"]:
        log(f"FAILED checks: {checks['mismatches'][:5]} {checks['errors'][:5]}")
        return 1
    return 0 if all(row["met"] for row in report["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
