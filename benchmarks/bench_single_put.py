"""Single-PUT benchmark: ctrlupload against curl, MD5 cost, peak RSS, small objects.

Run from the repository root::

    python benchmarks/bench_single_put.py --json docs/bench_single_put.json

What one run measures, side by side:

1. Throughput of ``put_file`` of one large random file (``--size-mib``, 1 GiB by
   default) to a loopback nginx PUT sink, against ``curl -T`` to the same sink. Runs
   are interleaved round by round (curl, ours, ours without MD5, ours with 16 KiB
   blocks); medians are reported. Our uploads presign and complete against a
   ``FakeBackend`` whose upload URLs point at nginx.
2. MD5 cost: single-core ``hashlib.md5`` over the same (page-cached) file in 1 MiB
   reads, against ``put_file`` with ``storage_verify_md5`` on and off.
3. Peak RSS growth of a fresh interpreter uploading the large file.
4. Small objects (10 KiB) through presign, PUT and complete against ``FakeBackend`` +
   ``StorageSink``, from one thread and from a thread pool sharing one provider, with
   the TCP connections each server accepted.

The nginx sink: ``return 200 ""`` with ``client_max_body_size 0`` makes nginx *discard*
the body. It answers as soon as the request head is in (after ``100 Continue`` when
the client asks for it) and keeps reading the body on the same connection in 4 KiB
``recv`` calls into a static buffer, never to memory or disk. The client still has to
push every byte: curl and urllib3 both write the whole body before they finish. At
most a socket buffer's worth (a few MiB) may still be unread by nginx when the client
stops the clock.

The fake servers run in a separate process so they do not share the client's GIL;
the client's CPU time (``getrusage``) is then the client alone.

``--tls``: nginx also listens with TLS, on a throwaway self-signed certificate for
127.0.0.1 made at run time in the scratch dir (``openssl`` CLI, else the
``cryptography`` package). The large-file upload URLs then are https, ctrlupload trusts
the certificate through ``REQUESTS_CA_BUNDLE`` (read once per Transport, so it is set
before any provider exists) and curl through ``--cacert``. Sections 1 to 3 then run over
https; a plain-http curl round is added as a reference for the cost of TLS. Section 4
(small objects against the Python ``StorageSink``) stays on plain http.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench_reference_backend import machine_facts as common_machine_facts  # noqa: E402

from ctrlupload import BackendPresignedStorageProvider, Settings  # noqa: E402
from tests.support.servers import FakeBackend, StorageSink  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TOKEN = "bench-token"
NGINX = "/usr/sbin/nginx"
BIG_KEY = "videos/V-BENCH/S-1/{job}/video.mp4"
MD5_TARGET = 0.9
RSS_TARGET_MIB = 64.0
TLS_HOST = "127.0.0.1"


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited before it accepted connections")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def ktls_facts() -> dict[str, Any]:
    """Whether kernel TLS could carry sendfile over TLS here (the benchmark does not use
    it): Python's ``ssl.OP_ENABLE_KTLS`` (3.12+) and whether a connected TCP socket
    accepts the kernel's ``tls`` upper-layer protocol (``TCP_ULP``)."""
    import ssl

    tcp_ulp = getattr(socket, "TCP_ULP", 31)  # 31 on Linux; Python 3.11 lacks the name
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()[:2], 5) as client,
    ):
        conn, _ = server.accept()
        with conn:
            try:
                client.setsockopt(socket.IPPROTO_TCP, tcp_ulp, b"tls")
                kernel_tls = "available (TCP_ULP tls accepted)"
            except OSError as exc:
                kernel_tls = f"unavailable (TCP_ULP tls: {exc.strerror or exc})"
    return {"op_enable_ktls": getattr(ssl, "OP_ENABLE_KTLS", None), "kernel_tls": kernel_tls}


def machine_facts() -> dict[str, Any]:
    """The shared machine facts, plus the baseline tools this benchmark compares with."""
    curl_version = subprocess.run(
        ["curl", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    nginx_version = subprocess.run(
        [NGINX, "-v"], capture_output=True, text=True, check=False
    ).stderr.strip()
    return {
        **common_machine_facts(),
        "python_impl": platform.python_implementation(),
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "curl": curl_version,
        "nginx": nginx_version,
    }


def make_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their MD5 hex."""
    digest = hashlib.md5(usedforsecurity=False)
    remaining = size
    with open(path, "wb") as handle:
        while remaining:
            block = os.urandom(min(MIB, remaining))
            digest.update(block)
            handle.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def md5_speed(path: Path, size: int) -> tuple[float, str]:
    """Hash ``path`` once in 1 MiB reads on this thread; return (seconds, hex)."""
    digest = hashlib.md5(usedforsecurity=False)
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    elapsed = time.perf_counter() - started
    return elapsed, digest.hexdigest()


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway self-signed certificate for 127.0.0.1 and its key, and how they
    were made."""

    cert: Path
    key: Path
    tool: str


def make_self_signed_cert(folder: Path) -> TlsFiles:
    """Write a self-signed P-256 certificate valid for IP 127.0.0.1 (and CN=127.0.0.1)
    into ``folder``, with the ``openssl`` CLI if there is one, else ``cryptography``."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is not None:
        out = subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", f"/CN={TLS_HOST}",
                "-addext", f"subjectAltName=IP:{TLS_HOST}",
                "-addext", "basicConstraints=critical,CA:TRUE",
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"openssl req failed ({out.returncode}): {out.stderr.strip()}")
        version = subprocess.run(
            [openssl, "version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return TlsFiles(cert, key, f"openssl CLI ({version})")
    try:
        import datetime as dt
        import ipaddress

        from cryptography import __version__ as cryptography_version
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise RuntimeError("--tls needs the openssl CLI or the cryptography package") from None
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_HOST)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(TLS_HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(cert, key, f"cryptography {cryptography_version}")


def tls_session_facts(port: int, cert: Path) -> dict[str, Any]:
    """What a Python client (ctrlupload's OpenSSL) and curl negotiate with nginx."""
    import ssl

    context = ssl.create_default_context(cafile=str(cert))
    with (
        socket.create_connection((TLS_HOST, port), 5) as raw,
        context.wrap_socket(raw, server_hostname=TLS_HOST) as tls,
    ):
        python_facts = {"version": tls.version(), "cipher": tls.cipher()}
    out = subprocess.run(
        ["curl", "-sS", "-v", "--cacert", str(cert), "-o", "/dev/null",
         "-T", "/dev/null", f"https://{TLS_HOST}:{port}/warmup-probe"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    curl_lines = [
        line.lstrip("* ").strip()
        for line in out.stderr.splitlines()
        if "SSL connection using" in line or "ALPN" in line
    ]
    return {"python_ssl": python_facts, "curl": curl_lines, "curl_returncode": out.returncode}


# --------------------------------------------------------------------------- nginx sink


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    # The big file's MD5, or the small file's for keys holding "warmup".
    map $uri $bench_etag {{
        default '"{md5}"';
        ~warmup '"{small_md5}"';
    }}

    server {{
        listen 127.0.0.1:{port};
{tls_directives}        client_max_body_size 0;
        client_body_buffer_size 1m;

        location / {{
            limit_except PUT {{ deny all; }}
            # "return" discards the request body (4 KiB recv calls, no disk, no
            # buffering) and answers at once.
            add_header ETag $bench_etag always;
            return 200 "";
        }}
    }}
}}
"""


NGINX_TLS_DIRECTIVES = """\
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
"""


class NginxSink:
    """nginx in the foreground as a subprocess, answering every PUT with a fixed ETag.

    With ``tls``, the same server also listens with TLS on ``tls_port``, and
    ``upload_base_url`` is the https one.
    """

    def __init__(
        self, workdir: Path, md5_hex: str, small_md5_hex: str, tls: TlsFiles | None = None
    ) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.tls = tls
        self.tls_port: int | None = None
        self.https_url: str | None = None
        tls_directives = ""
        if tls is not None:
            self.tls_port = _free_port()
            self.https_url = f"https://{TLS_HOST}:{self.tls_port}"
            tls_directives = NGINX_TLS_DIRECTIVES.format(
                tls_port=self.tls_port, cert=tls.cert, key=tls.key
            )
        self.upload_base_url = self.https_url or self.base_url
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(
                tmp=workdir,
                port=self.port,
                md5=md5_hex,
                small_md5=small_md5_hex,
                tls_directives=tls_directives,
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self.worker_pid: int | None = None

    def __enter__(self) -> NginxSink:
        log = open(self.workdir / "nginx.stdout", "wb")
        self._log = log
        self._proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(self.workdir),
                "-e",
                str(self.workdir / "error.log"),
                "-c",
                str(self.conf),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc = self._proc
        try:
            _wait_for_port(self.port, 10.0, lambda: proc.poll() is None)
            if self.tls_port is not None:
                _wait_for_port(self.tls_port, 10.0, lambda: proc.poll() is None)
        except RuntimeError:
            self.__exit__(None, None, None)
            errors = (self.workdir / "error.log").read_text(errors="replace")
            raise RuntimeError(f"nginx did not start:\n{errors}") from None
        deadline = time.monotonic() + 5
        while not (workers := _children_of(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.worker_pid = workers[0] if len(workers) == 1 else None
        return self

    def worker_cpu_s(self) -> float:
        return _proc_cpu_s(self.worker_pid) if self.worker_pid else float("nan")

    def __exit__(self, *exc_info: object) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- fake servers


@dataclass(frozen=True)
class _Endpoint:
    """All FakeBackend reads from its storage: where upload URLs point."""

    base_url: str


def _doubles_main(conn: Connection, nginx_url: str) -> None:
    """Child process: a StorageSink with its FakeBackend, and a FakeBackend for nginx."""
    nginx = cast(StorageSink, _Endpoint(nginx_url))
    with (
        StorageSink(keep_bodies=False) as sink,
        FakeBackend(sink, token=TOKEN) as small_backend,
        FakeBackend(nginx, token=TOKEN) as big_backend,
    ):
        conn.send(
            {
                "sink": sink.base_url,
                "small_backend": small_backend.base_url,
                "big_backend": big_backend.base_url,
            }
        )
        while conn.recv() == "stats":
            conn.send(
                {
                    "sink_connections": sink.connections_opened,
                    "small_backend_connections": small_backend.connections_opened,
                    "big_backend_connections": big_backend.connections_opened,
                    "sink_stored": len(sink.stored),
                    "sink_puts": len(sink.put_requests()),
                    "small_completed": len(small_backend.completed),
                    "big_completed": len(big_backend.completed),
                    "errors": [
                        repr(e) for e in (*sink.errors, *small_backend.errors, *big_backend.errors)
                    ],
                }
            )


class Doubles:
    """Runs :func:`_doubles_main` in a spawned process and talks to it over a pipe."""

    def __init__(self, nginx_url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=_doubles_main, args=(child, nginx_url), name="bench-doubles", daemon=True
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(30):
            raise RuntimeError("fake servers did not start")
        urls: dict[str, str] = self._conn.recv()
        self.sink_url = urls["sink"]
        self.small_backend_url = urls["small_backend"]
        self.big_backend_url = urls["big_backend"]

    def cpu_s(self) -> float:
        """CPU seconds the fake servers' process has used so far."""
        pid = self._proc.pid
        return _proc_cpu_s(pid) if pid is not None else float("nan")

    def stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        return cast(dict[str, Any], self._conn.recv())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()


def _settings(backend_url: str, size: int, **overrides: Any) -> Settings:
    return Settings(
        backend_base_url=backend_url,
        backend_service_token=TOKEN,
        video_max_upload_bytes=max(2 * size, 100 * MIB),
        **overrides,
    )


# --------------------------------------------------------------------------- 1 + 2: large PUT


@dataclass
class Variant:
    name: str
    label: str
    run: Callable[[], None]
    seconds: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    nginx_cpu_s: list[float] = field(default_factory=list)


def bench_large(
    args: argparse.Namespace,
    big_file: Path,
    tiny_file: Path,
    md5_hex: str,
    nginx: NginxSink,
    doubles: Doubles,
    md5_runs: list[float],
) -> dict[str, Any]:
    """Interleaved rounds of curl, our variants and the MD5 reference (into md5_runs)."""
    size = big_file.stat().st_size
    configs: dict[str, dict[str, Any]] = {
        "ours": {},
        "ours_md5_off": {"storage_verify_md5": False},
        "ours_block_16k": {"storage_send_block_bytes": 16 * KIB},
        "ours_block_16k_md5_off": {
            "storage_send_block_bytes": 16 * KIB,
            "storage_verify_md5": False,
        },
    }
    providers = {
        name: BackendPresignedStorageProvider(_settings(doubles.big_backend_url, size, **extra))
        for name, extra in configs.items()
    }
    counter = iter(range(10**9))

    def curl_to(base_url: str) -> Callable[[], None]:
        tls_args = (
            ["--cacert", str(nginx.tls.cert)]
            if nginx.tls is not None and base_url.startswith("https:")
            else []
        )
        command = ["curl", "-sS", *tls_args, "-T", str(big_file), "-o", "/dev/null"]

        def run() -> None:
            out = subprocess.run(
                [*command, f"{base_url}/x"], capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                raise RuntimeError(f"curl failed ({out.returncode}): {out.stderr.strip()}")

        return run

    def ours(name: str) -> Callable[[], None]:
        provider = providers[name]

        def run() -> None:
            key = BIG_KEY.format(job=f"{name}-{next(counter)}")
            result = provider.put_file(big_file, key)
            if result.size_bytes != size or result.etag != f'"{md5_hex}"':
                raise RuntimeError(f"unexpected result {result}")

        return run

    labels = {
        "ours": "put_file, 1 MiB blocks, MD5 on (defaults)",
        "ours_md5_off": "put_file, 1 MiB blocks, MD5 off",
        "ours_block_16k": "put_file, 16 KiB blocks (urllib3 default), MD5 on",
        "ours_block_16k_md5_off": "put_file, 16 KiB blocks, MD5 off",
    }
    scheme = "https" if nginx.https_url is not None else "http"
    if scheme == "https":
        labels = {name: f"{label}, https" for name, label in labels.items()}
    variants = [
        Variant(
            "curl",
            "curl -T (reference)" if scheme == "http" else "curl -T --cacert, https (reference)",
            curl_to(nginx.upload_base_url),
        )
    ]
    variants += [Variant(name, labels[name], ours(name)) for name in configs]
    if scheme == "https":
        # Plain http to the same nginx, for the cost of TLS; "vs curl" stays https curl.
        variants.append(
            Variant("curl_plain_http", "curl -T, plain http (TLS cost)", curl_to(nginx.base_url))
        )
    try:
        for name, provider in providers.items():
            provider.put_file(tiny_file, BIG_KEY.format(job=f"{name}-warmup"))
        for round_no in range(-args.warmup_rounds, args.rounds):
            # The MD5 reference runs in every round too, so it sees the same conditions.
            seconds, digest = md5_speed(big_file, size)
            if digest != md5_hex:
                raise RuntimeError("md5 mismatch re-reading the test file")
            if round_no >= 0:
                md5_runs.append(seconds)
            tag = "warm-up" if round_no < 0 else f"round {round_no + 1}"
            print(
                f"  {tag:>8} {'hashlib.md5':<15} {seconds:7.3f} s "
                f"{size / GIB / seconds:6.2f} GiB/s",
                file=sys.stderr,
            )
            for variant in variants:
                cpu_self, cpu_children = _self_cpu_s(), _children_cpu_s()
                cpu_nginx = nginx.worker_cpu_s()
                started = time.perf_counter()
                variant.run()
                elapsed = time.perf_counter() - started
                client_cpu = (
                    _children_cpu_s() - cpu_children
                    if variant.name.startswith("curl")
                    else _self_cpu_s() - cpu_self
                )
                nginx_cpu = nginx.worker_cpu_s() - cpu_nginx
                if round_no >= 0:
                    variant.seconds.append(elapsed)
                    variant.client_cpu_s.append(client_cpu)
                    variant.nginx_cpu_s.append(nginx_cpu)
                print(
                    f"  {tag:>8} {variant.name:<15} {elapsed:7.3f} s "
                    f"{size / GIB / elapsed:6.2f} GiB/s  client CPU {client_cpu:5.2f} s  "
                    f"nginx CPU {nginx_cpu:5.2f} s",
                    file=sys.stderr,
                )
    finally:
        for provider in providers.values():
            provider.close()

    curl_median = _median(variants[0].seconds)
    results: dict[str, Any] = {}
    for variant in variants:
        median_s = _median(variant.seconds)
        results[variant.name] = {
            "label": variant.label,
            "scheme": "http" if variant.name == "curl_plain_http" else scheme,
            "seconds": variant.seconds,
            "median_s": median_s,
            "median_gib_s": size / GIB / median_s,
            "ratio_vs_curl": curl_median / median_s,
            "client_cpu_s": variant.client_cpu_s,
            "median_client_cpu_s": _median(variant.client_cpu_s),
            "nginx_cpu_s": variant.nginx_cpu_s,
            "median_nginx_cpu_s": _median(variant.nginx_cpu_s),
        }
    return results


# --------------------------------------------------------------------------- 3: peak RSS


RSS_CHILD = textwrap.dedent(
    """\
    import json, os, resource, sys, threading

    from ctrlupload import BackendPresignedStorageProvider, Settings

    PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

    def maxrss_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def rss_now_kib():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_KIB

    cfg = json.loads(sys.argv[1])
    provider = BackendPresignedStorageProvider(Settings(**cfg["settings"]))
    provider.put_file(cfg["tiny"], cfg["key"].format(job="warmup"))
    baseline, baseline_now = maxrss_kib(), rss_now_kib()
    sampled = [baseline_now]
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            sampled.append(rss_now_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = provider.put_file(cfg["big"], cfg["key"].format(job="big"))
    done.set()
    sampler.join()
    peak = maxrss_kib()
    provider.close()
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak,
                      "baseline_now_kib": baseline_now, "sampled_peak_kib": max(sampled),
                      "samples": len(sampled), "size_bytes": result.size_bytes}))
    """
)


def bench_rss(big_file: Path, tiny_file: Path, doubles: Doubles) -> dict[str, Any]:
    size = big_file.stat().st_size
    results: dict[str, Any] = {}
    for name, extra in (("ours", {}), ("ours_md5_off", {"storage_verify_md5": False})):
        cfg = {
            "settings": {
                "backend_base_url": doubles.big_backend_url,
                "backend_service_token": TOKEN,
                "video_max_upload_bytes": max(2 * size, 100 * MIB),
                **extra,
            },
            "tiny": str(tiny_file),
            "big": str(big_file),
            "key": BIG_KEY.replace("{job}", "rss-" + name + "-{job}"),
        }
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, json.dumps(cfg)],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO_ROOT,
        )
        if out.returncode != 0:
            raise RuntimeError(f"RSS child failed:\n{out.stderr}")
        data = json.loads(out.stdout.strip().splitlines()[-1])
        baseline = data["baseline_kib"] / KIB
        peak = data["peak_kib"] / KIB
        results[name] = {
            "baseline_mib": baseline,
            "peak_mib": peak,
            "growth_mib": peak - baseline,
            "rss_at_baseline_mib": data["baseline_now_kib"] / KIB,
            "sampled_peak_rss_mib": data["sampled_peak_kib"] / KIB,
            "sampled_growth_mib": (data["sampled_peak_kib"] - data["baseline_now_kib"]) / KIB,
            "samples": data["samples"],
            "size_bytes": data["size_bytes"],
        }
    return results


# --------------------------------------------------------------------------- 4: small objects


def bench_small(args: argparse.Namespace, small_file: Path, doubles: Doubles) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode, threads in (("sequential", 1), (f"pool_{args.small_threads}", args.small_threads)):
        provider = BackendPresignedStorageProvider(
            _settings(doubles.small_backend_url, small_file.stat().st_size)
        )
        keys = [f"bench/small/{mode}/{i:06d}.bin" for i in range(args.small_count)]
        before = doubles.stats()
        servers_cpu = doubles.cpu_s()
        started = time.perf_counter()
        cpu = _self_cpu_s()
        try:
            if threads == 1:
                for key in keys:
                    provider.put_file(small_file, key)
            else:
                with ThreadPoolExecutor(threads, thread_name_prefix="bench-small") as pool:
                    for _ in pool.map(functools.partial(provider.put_file, small_file), keys):
                        pass
        finally:
            elapsed = time.perf_counter() - started
            cpu = _self_cpu_s() - cpu
            servers_cpu = doubles.cpu_s() - servers_cpu
            provider.close()
        after = doubles.stats()
        stored = after["sink_stored"] - before["sink_stored"]
        completed = after["small_completed"] - before["small_completed"]
        if stored != len(keys) or completed != len(keys) or after["errors"]:
            raise RuntimeError(
                f"small objects: {stored} stored, {completed} completed of {len(keys)}; "
                f"errors {after['errors']}"
            )
        results[mode] = {
            "threads": threads,
            "uploads": len(keys),
            "object_bytes": small_file.stat().st_size,
            "seconds": elapsed,
            "uploads_per_s": len(keys) / elapsed,
            "client_cpu_s": cpu,
            "client_cpu_ms_per_upload": 1000 * cpu / len(keys),
            "servers_cpu_s": servers_cpu,
            "servers_cpu_ms_per_upload": 1000 * servers_cpu / len(keys),
            "backend_connections": after["small_backend_connections"]
            - before["small_backend_connections"],
            "sink_connections": after["sink_connections"] - before["sink_connections"],
        }
        print(
            f"  small {mode:<12} {len(keys) / elapsed:8.1f} uploads/s, connections "
            f"backend {results[mode]['backend_connections']} "
            f"sink {results[mode]['sink_connections']}",
            file=sys.stderr,
        )
    return results


# --------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    params = report["parameters"]
    large = report["throughput"]
    md5 = report["md5"]
    rss = report["rss"]
    small = report["small_objects"]
    size_mib = params["size_mib"]
    per_round = md5["ratio_on_vs_md5_per_round"] or [float("nan")]
    tls = report.get("tls")
    over = " over https (TLS)" if tls else ""
    lines = [
        f"# bench_single_put ({facts['date']})",
        "",
        f"Machine: {facts['cpu_model']}, nproc {facts['nproc']}, {facts['mem_total']} RAM, "
        f"Linux {facts['kernel']}; Python {facts['python']}, requests {facts['requests']}, "
        f"urllib3 {facts['urllib3']}, ctrlupload {facts['ctrlupload']}; {facts['curl']}; "
        f"{facts['nginx']}",
        "",
        f"## 1. Throughput: {size_mib} MiB random file to loopback nginx{over} "
        f"(median of {params['rounds']} interleaved rounds)",
        "",
    ]
    if tls:
        session = tls["session"]
        python_ssl = session["python_ssl"]
        lines += [
            f"TLS: self-signed P-256 certificate for {TLS_HOST} made with {tls['cert_tool']}; "
            f"ctrlupload trusts it via REQUESTS_CA_BUNDLE, curl via --cacert. Negotiated: "
            f"Python ssl {python_ssl['version']} {python_ssl['cipher'][0]}; "
            f"curl {'; '.join(session['curl']) or 'unknown'}. "
            f"kTLS: ssl.OP_ENABLE_KTLS={tls['op_enable_ktls']}, "
            f"kernel TLS {tls['kernel_tls']}.",
            "",
        ]
    lines += [
        "| variant | median s | GiB/s | vs curl | client CPU s | nginx CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in large.values():
        lines.append(
            f"| {row['label']} | {row['median_s']:.3f} | {row['median_gib_s']:.2f} | "
            f"{row['ratio_vs_curl']:.2f} | {row['median_client_cpu_s']:.2f} | "
            f"{row['median_nginx_cpu_s']:.2f} |"
        )
    lines += [
        "",
        f"## 2. MD5 check cost{over}",
        "",
        "| measure | GiB/s |",
        "|---|---:|",
        f"| hashlib.md5, one core, 1 MiB reads, file in page cache | {md5['md5_gib_s']:.2f} |",
        f"| put_file, MD5 on (default) | {md5['ours_md5_on_gib_s']:.2f} |",
        f"| put_file, MD5 off | {md5['ours_md5_off_gib_s']:.2f} |",
        "",
        f"ours(MD5 on) / md5 speed = **{md5['ratio_on_vs_md5']:.2f}** (medians; per round "
        f"{min(per_round):.2f}..{max(per_round):.2f}; target >= {MD5_TARGET}: "
        f"{'met' if md5['target_met'] else 'MISSED'}); "
        f"ours(MD5 on) / ours(MD5 off) = {md5['ratio_on_vs_off']:.2f}",
        "",
        f"## 3. Peak RSS growth uploading {size_mib} MiB{over} (fresh interpreter)",
        "",
        "| variant | ru_maxrss baseline MiB | ru_maxrss peak MiB | growth MiB "
        "| VmRSS at baseline MiB | VmRSS sampled peak MiB | sampled growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rss.items():
        lines.append(
            f"| {name} | {row['baseline_mib']:.1f} | {row['peak_mib']:.1f} | "
            f"{row['growth_mib']:.1f} | {row['rss_at_baseline_mib']:.1f} | "
            f"{row['sampled_peak_rss_mib']:.1f} | {row['sampled_growth_mib']:.1f} |"
        )
    growth = rss["ours"]["growth_mib"]
    sampled = rss["ours"]["sampled_growth_mib"]
    worst = max(growth, sampled)
    lines += [
        "",
        f"growth with defaults = **{growth:.1f} MiB** ru_maxrss, {sampled:.1f} MiB sampled "
        f"VmRSS (target <= {RSS_TARGET_MIB:.0f} MiB: "
        f"{'met' if worst <= RSS_TARGET_MIB else 'MISSED'})",
        "",
        f"## 4. Small objects ({params['small_kib']} KiB, presign + PUT + complete, "
        "FakeBackend + StorageSink in another process)",
        "",
        "| mode | threads | uploads | s | uploads/s | client CPU ms/upload "
        "| servers CPU ms/upload | backend conns | sink conns |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, row in small.items():
        lines.append(
            f"| {mode} | {row['threads']} | {row['uploads']} | {row['seconds']:.2f} | "
            f"{row['uploads_per_s']:.0f} | {row['client_cpu_ms_per_upload']:.2f} | "
            f"{row['servers_cpu_ms_per_upload']:.2f} | {row['backend_connections']} | "
            f"{row['sink_connections']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="write the full results here as JSON")
    parser.add_argument("--size-mib", type=int, default=1024, help="large file size (1024)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds (1)")
    parser.add_argument("--small-count", type=int, default=2000, help="small uploads (2000)")
    parser.add_argument("--small-kib", type=int, default=10, help="small object KiB (10)")
    parser.add_argument("--small-threads", type=int, default=8, help="pool size (8)")
    parser.add_argument(
        "--workdir", type=Path, help="where to put the test files (default: a temp dir)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="upload the large file over https (nginx with a throwaway self-signed cert)",
    )
    args = parser.parse_args(argv)
    if shutil.which("curl") is None or not os.access(NGINX, os.X_OK):
        parser.error(f"needs curl on PATH and {NGINX}")

    facts = machine_facts()
    print(f"machine: {json.dumps(facts)}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench_single_put.", dir=args.workdir)
            )
        )
        size = args.size_mib * MIB
        big_file = workdir / "big.bin"
        small_file = workdir / "small.bin"
        print(f"writing {args.size_mib} MiB of random bytes to {big_file}", file=sys.stderr)
        md5_hex = make_random_file(big_file, size)
        small_bytes = os.urandom(args.small_kib * KIB)
        small_file.write_bytes(small_bytes)
        small_md5_hex = hashlib.md5(small_bytes, usedforsecurity=False).hexdigest()

        nginx_dir = workdir / "nginx"
        nginx_dir.mkdir()
        tls_files: TlsFiles | None = None
        tls_report: dict[str, Any] | None = None
        if args.tls:
            tls_files = make_self_signed_cert(nginx_dir)
            # Read once when a Transport is built: set before any provider exists. The
            # RSS child inherits it. Restored when the run ends.
            previous = os.environ.get("REQUESTS_CA_BUNDLE")
            os.environ["REQUESTS_CA_BUNDLE"] = str(tls_files.cert)
            stack.callback(_restore_env, "REQUESTS_CA_BUNDLE", previous)
        nginx = stack.enter_context(NginxSink(nginx_dir, md5_hex, small_md5_hex, tls_files))
        if tls_files is not None:
            assert nginx.tls_port is not None
            tls_report = {
                "cert_tool": tls_files.tool,
                "upload_base_url": nginx.upload_base_url,
                "ca_bundle_env": "REQUESTS_CA_BUNDLE",
                "session": tls_session_facts(nginx.tls_port, tls_files.cert),
                **ktls_facts(),
            }
            print(f"tls: {json.dumps(tls_report)}", file=sys.stderr)
        doubles = Doubles(nginx.upload_base_url)
        stack.callback(doubles.close)

        md5_runs: list[float] = []
        throughput = bench_large(args, big_file, small_file, md5_hex, nginx, doubles, md5_runs)
        rss = bench_rss(big_file, small_file, doubles)
        small = bench_small(args, small_file, doubles)
        nginx_errors = (nginx_dir / "error.log").read_text(errors="replace")

    md5_gib_s = size / GIB / _median(md5_runs)
    on = throughput["ours"]["median_gib_s"]
    off = throughput["ours_md5_off"]["median_gib_s"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": facts,
        "parameters": {
            "size_mib": args.size_mib,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
            "small_count": args.small_count,
            "small_kib": args.small_kib,
            "small_threads": args.small_threads,
            "tls": bool(args.tls),
        },
        "upload_scheme": "https" if args.tls else "http",
        "tls": tls_report,
        "throughput": throughput,
        "md5": {
            "seconds": md5_runs,
            "md5_gib_s": md5_gib_s,
            "ratio_on_vs_md5_per_round": [
                md5_s / ours_s
                for md5_s, ours_s in zip(md5_runs, throughput["ours"]["seconds"], strict=True)
            ],
            "ours_md5_on_gib_s": on,
            "ours_md5_off_gib_s": off,
            "ratio_on_vs_md5": on / md5_gib_s,
            "ratio_on_vs_off": on / off,
            "target": MD5_TARGET,
            "target_met": on / md5_gib_s >= MD5_TARGET,
        },
        "rss": rss,
        "rss_target_mib": RSS_TARGET_MIB,
        "small_objects": small,
        "nginx_error_log": nginx_errors[-4000:],
    }
    table = render(report)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
