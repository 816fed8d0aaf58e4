"""The ``ctrlupload`` command: ``serve``, ``put`` and ``demo``.

Failures print the error's message and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from ._errors import StorageConfigError, StorageError
from ._keys import render_asset_key
from ._settings import Settings
from ._version import __version__
from .providers import BackendPresignedStorageProvider, get_storage_provider

if TYPE_CHECKING:
    from .server import ReferenceServer, ServerConfig

EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
        return status
    except StorageError as exc:
        print(f"ctrlupload: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("ctrlupload: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlupload",
        description="Stream render output to S3 through backend-issued presigned URLs.",
    )
    parser.add_argument("--version", action="version", version=f"ctrlupload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve(commands)

    put = commands.add_parser("put", help="upload one file with the configured provider")
    put.add_argument("file", type=Path)
    put.add_argument("key")
    put.add_argument("--content-type", help="default: from the key's extension")
    put.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    put.set_defaults(run=_put)

    demo = commands.add_parser(
        "demo", help="run presign -> PUT -> complete end to end against an embedded backend"
    )
    demo.add_argument("--video-mib", type=int, default=4, help="size of the sample video (4)")
    demo.add_argument(
        "--data-dir", type=Path, help="keep the backend's data here (default: a temp dir)"
    )
    demo.set_defaults(run=_demo)

    conformance = commands.add_parser(
        "conformance",
        help="check a backend against the internal storage API contract",
        description=(
            "Run every contract check against the backend at BASE_URL (token from "
            "BACKEND_SERVICE_TOKEN, paths from BACKEND_STORAGE_*_PATH) and print PASS, "
            "FAIL or SKIP per check. Exit status 0 only if the backend conforms."
        ),
    )
    conformance.add_argument("base_url", metavar="BASE_URL", help="e.g. http://backend:8080")
    conformance.add_argument(
        "--skip-multipart", action="store_true", help="skip the optional multipart checks"
    )
    conformance.add_argument(
        "--skip-put-refusals",
        action="store_true",
        help="do not expect storage to refuse a PUT with another Content-Type or length "
        "(for S3 emulators that check no signatures, such as moto)",
    )
    conformance.set_defaults(run=_conformance_cmd)
    return parser


# -- serve -----------------------------------------------------------------------------


def _add_serve(commands: Any) -> None:
    from .server import ServerConfig, ServerLimits

    defaults, limits = ServerConfig(), ServerLimits()
    serve = commands.add_parser(
        "serve",
        help="run the reference backend",
        description="Run the reference backend: the internal storage API, on cheroot.",
        formatter_class=_DefaultsShown,
    )
    where = serve.add_argument_group("where")
    where.add_argument("--host", default=defaults.host, help="address to bind")
    where.add_argument("--port", type=_port, default=defaults.port, help="port to bind; 0 = any")
    where.add_argument(
        "--public-url", help="URL clients reach this server at (default: http://HOST:PORT)"
    )
    store = serve.add_argument_group("store")
    store.add_argument(
        "--store",
        choices=("local", "s3"),
        default=defaults.store,
        help="local: files under DATA_DIR; s3: a bucket (pip install 'ctrlupload[s3]')",
    )
    store.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.data_dir,
        help="objects (local store), the SQLite rows and the signing key; one server each",
    )
    store.add_argument(
        "--db-path", type=Path, help="SQLite file of asset rows (default: DATA_DIR/assets.sqlite3)"
    )
    store.add_argument(
        "--signing-secret-file",
        type=Path,
        help="HMAC key of the local store's upload URLs (at least 32 bytes); URLs issued "
        "before a restart keep working while the key stays the same (default: "
        "$CTRLUPLOAD_SIGNING_SECRET, else DATA_DIR/signing.key, made on first start)",
    )
    store.add_argument(
        "--sync-parts",
        action=argparse.BooleanOptionalAction,
        default=defaults.sync_parts,
        help="fsync each multipart part as it arrives (local store), to survive power loss",
    )
    for flag, env in (
        ("--s3-bucket", "STORAGE_S3_BUCKET"),
        ("--s3-endpoint-url", "STORAGE_S3_ENDPOINT_URL"),
        ("--s3-region", "STORAGE_S3_REGION"),
        ("--s3-public-base-url", "STORAGE_S3_PUBLIC_BASE_URL"),
    ):
        store.add_argument(
            flag, default=os.environ.get(env), help=f"s3 store (default: ${env}, if set)"
        )
    api = serve.add_argument_group("uploads")
    for flag, field, help_text in _UPLOAD_FLAGS:
        api.add_argument(
            flag,
            dest=field,
            metavar=flag[2:].upper().replace("-", "_"),
            type=_positive_int,
            default=getattr(defaults, field),
            help=help_text,
        )
    http = serve.add_argument_group("HTTP server limits")
    for field, kind, help_text in _LIMIT_FLAGS:
        flag = "--" + field.replace("_", "-")
        http.add_argument(flag, type=kind, default=getattr(limits, field), help=help_text)
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one line per request on stderr: method, path without query, status, bytes "
        "in and out, duration",
    )
    serve.set_defaults(run=_serve)


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``; options without one say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


#: serve's upload flags: the flag, the ServerConfig field it sets, its help.
_UPLOAD_FLAGS: Final = (
    ("--url-expiry-s", "expires_sec", "lifetime of presigned URLs"),
    ("--max-put-bytes", "max_content_length", "largest single PUT presign accepts (S3: 5 GiB)"),
    (
        "--max-object-bytes",
        "max_object_bytes",
        "largest multipart upload initiate accepts (S3: 5 TiB)",
    ),
    ("--min-part-bytes", "min_part_bytes", "smallest part but the last (S3: 5 MiB)"),
    ("--part-bytes", "default_part_bytes", "part size answered when a client asks for none"),
)
#: serve's HTTP limit flags (``--`` + the field's name): the ServerLimits field, its
#: type, its help.
_LIMIT_FLAGS: Final[tuple[tuple[str, Callable[[str], object], str], ...]] = (
    ("threads", _positive_int, "requests served at once"),
    (
        "max_connections",
        _positive_int,
        "open connections at most (also bounded by ulimit -n); at the cap the idlest one is closed",
    ),
    ("backlog", _positive_int, "listen() backlog"),
    ("header_timeout_s", _positive_float, "time from a request's first byte to its last header"),
    ("idle_timeout_s", _positive_float, "silence allowed between requests or mid-body"),
    (
        "shutdown_timeout_s",
        _non_negative_float,
        "on SIGTERM or Ctrl-C, how long requests in flight may finish",
    ),
)


def _signing_secret(args: argparse.Namespace) -> bytes | None:
    """The secret from --signing-secret-file or $CTRLUPLOAD_SIGNING_SECRET; None: the store's."""
    secret_file: Path | None = args.signing_secret_file
    if secret_file is not None:
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as exc:
            raise StorageConfigError(
                f"cannot read --signing-secret-file {args.signing_secret_file}: "
                f"{exc.strerror or exc}"
            ) from None
        source = f"--signing-secret-file {args.signing_secret_file}"
    elif os.environ.get("CTRLUPLOAD_SIGNING_SECRET"):
        secret = str(os.environ["CTRLUPLOAD_SIGNING_SECRET"]).encode("utf-8")
        source = "CTRLUPLOAD_SIGNING_SECRET"
    else:
        return None
    if len(secret) < MIN_SIGNING_SECRET_BYTES:
        raise StorageConfigError(
            f"the signing secret from {source} is {len(secret)} bytes; it needs at least "
            f"{MIN_SIGNING_SECRET_BYTES}"
        )
    return secret


#: The shortest signing secret ``serve`` takes: 256 bits, as HMAC-SHA256's key.
MIN_SIGNING_SECRET_BYTES = 32


def _serve_config(args: argparse.Namespace, token: str | None) -> ServerConfig:
    from .server import ServerConfig, ServerLimits

    return ServerConfig(
        host=args.host,
        port=args.port,
        store=args.store,
        data_dir=args.data_dir,
        db_path=args.db_path,
        token=token,
        public_url=args.public_url,
        signing_secret=_signing_secret(args),
        s3_bucket=args.s3_bucket,
        s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region,
        s3_public_base_url=args.s3_public_base_url,
        sync_parts=args.sync_parts,
        limits=ServerLimits(**{field: getattr(args, field) for field, _, _ in _LIMIT_FLAGS}),
        **{field: getattr(args, field) for _, field, _ in _UPLOAD_FLAGS},
    )


def _serve(args: argparse.Namespace) -> int:
    from .server import ReferenceServer

    settings = Settings.from_env()
    secret = settings.backend_service_token
    token = secret.get_secret_value() if secret else None
    _log_to_stderr(access_log=args.access_log)
    try:
        server = ReferenceServer(_serve_config(args, token))
    except (OSError, ValueError, StorageError, ImportError) as exc:
        print(f"ctrlupload: error: cannot start the backend: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        server.store.check()  # fail now on an unreachable bucket or an unwritable folder
    except StorageError as exc:
        server.stop()
        print(f"ctrlupload: error: cannot start the backend: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _stop_on_sigterm(server)  # before announcing: a supervisor may stop us right after
    host, port = server.address
    print(
        f"ctrlupload reference backend ({args.store} store) serving on {host}:{port}; "
        f"{server.limits_text()}",
        flush=True,
    )
    print("# for the renderer's shell:", flush=True)
    print("export STORAGE_PROVIDER=backend_presigned", flush=True)
    print(f"export BACKEND_BASE_URL={shlex.quote(server.base_url)}", flush=True)
    if token is None:
        # Generated here, so the operator has no other way to learn it.
        print(f"export BACKEND_SERVICE_TOKEN={shlex.quote(server.token)}", flush=True)
    else:
        print("# BACKEND_SERVICE_TOKEN: the one in this server's environment", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print("ctrlupload reference backend stopped", flush=True)
    return 0


def _log_to_stderr(*, access_log: bool) -> None:
    """Server logs (and the access log, unless turned off) as lines on stderr; once."""
    server_logger = logging.getLogger("ctrlupload.server")
    if not any(getattr(handler, "ctrlupload_serve", False) for handler in server_logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.ctrlupload_serve = True  # type: ignore[attr-defined]
        server_logger.addHandler(handler)
    server_logger.setLevel(logging.INFO)
    logging.getLogger("ctrlupload.server.access").setLevel(
        logging.INFO if access_log else logging.WARNING
    )


def _stop_on_sigterm(server: ReferenceServer) -> None:
    def handle(signum: int, frame: object) -> None:
        # shutdown() must come from another thread than the serving one.
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, handle)


# -- put -------------------------------------------------------------------------------


def _put(args: argparse.Namespace) -> int:
    show_progress = not args.no_progress and sys.stderr.isatty()
    with get_storage_provider() as storage:
        bar = _progress_bar(args.file.name, sys.stderr) if show_progress else None
        try:
            result = storage.put_file(
                args.file, args.key, content_type=args.content_type, progress=bar
            )
        finally:
            if bar is not None:
                bar.close()
    print(result.url)
    return 0


class _TextProgress:
    """A progress line on a terminal; tqdm's bar when ``ctrlupload[progress]`` is there."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = label
        self._stream = stream
        self._tqdm: Any = None
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._tqdm = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=stream)
        self._last_draw = 0.0

    def __call__(self, bytes_done: int, bytes_total: int) -> None:
        if self._tqdm is not None:
            self._tqdm.total = bytes_total
            self._tqdm.update(bytes_done - self._tqdm.n)
            return
        now = time.monotonic()
        if bytes_done < bytes_total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        percent = 100.0 if bytes_total == 0 else 100.0 * bytes_done / bytes_total
        width = 30
        filled = int(width * percent / 100)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (width - filled)}] {percent:5.1f}% "
            f"{bytes_done / 1048576:.1f}/{bytes_total / 1048576:.1f} MiB"
        )
        self._stream.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._stream.write("\n")
            self._stream.flush()


def _progress_bar(label: str, stream: TextIO) -> _TextProgress:
    return _TextProgress(label, stream)


# -- conformance -----------------------------------------------------------------------


def _conformance_cmd(args: argparse.Namespace) -> int:
    from ._conformance import run_conformance

    settings = Settings.from_env()
    token = settings.backend_service_token
    if token is None:
        print(
            "ctrlupload: error: BACKEND_SERVICE_TOKEN is not set: "
            "the conformance check needs the backend's service token",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return run_conformance(
        args.base_url,
        token.get_secret_value(),
        settings=settings,
        out=sys.stdout,
        skip_multipart=args.skip_multipart,
        skip_put_refusals=args.skip_put_refusals,
    )


# -- demo ------------------------------------------------------------------------------

_SUBTITLES = (
    "1\n00:00:00,000 --> 00:00:02,500\nctrlupload demo: rendered on this machine\n\n"
    "2\n00:00:02,500 --> 00:00:05,000\nstored through a presigned URL\n"
)


def _sample_render(folder: Path, video_mib: int) -> dict[str, Path]:
    video = folder / "video.mp4"
    with open(video, "wb") as handle:
        for _ in range(video_mib):
            handle.write(os.urandom(1024 * 1024))
    subtitles = folder / "subtitles.srt"
    subtitles.write_text(_SUBTITLES, encoding="utf-8")
    thumbnail = folder / "thumb.jpg"
    thumbnail.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(30_000) + b"\xff\xd9")
    return {"video": video, "subtitles": subtitles, "thumbnail": thumbnail}


def _demo(args: argparse.Namespace) -> int:
    try:
        from .server import WSGIServer  # noqa: F401 - cheroot is there, or say how to get it
    except ImportError as exc:
        print(f"ctrlupload: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    from .server import ReferenceServer, ServerConfig

    with tempfile.TemporaryDirectory(prefix="ctrlupload-demo-") as scratch:
        data_dir = args.data_dir or Path(scratch) / "backend"
        render_dir = Path(scratch) / "render"
        render_dir.mkdir()
        assets = _sample_render(render_dir, args.video_mib)
        with ReferenceServer(ServerConfig(port=0, data_dir=data_dir)) as server:
            print(f"reference backend: {server.base_url} (local store in {data_dir})")
            settings = Settings.from_mapping(
                {
                    "STORAGE_PROVIDER": "backend_presigned",
                    "BACKEND_BASE_URL": server.base_url,
                    "BACKEND_SERVICE_TOKEN": server.token,
                }
            )
            job_id = time.strftime("JOB-%Y%m%d-%H%M%S")
            failures = 0
            with BackendPresignedStorageProvider(settings) as storage:
                for asset, path in assets.items():
                    key = render_asset_key("V-DEMO", "S-001", job_id, asset)  # type: ignore[arg-type]
                    started = time.perf_counter()
                    result = storage.put_file(path, key)
                    took = time.perf_counter() - started
                    with urllib.request.urlopen(result.url, timeout=30) as response:  # noqa: S310
                        downloaded = response.read()
                    same = downloaded == path.read_bytes()
                    digest = hashlib.md5(downloaded, usedforsecurity=False).hexdigest()
                    failures += not same
                    print(
                        f"  {'ok  ' if same else 'DIFF'} {result.key}  {result.size_bytes:>9} B"
                        f"  {took * 1000:7.1f} ms  md5 {digest}"
                        f"\n       {result.url}"
                    )
            print("asset rows recorded by complete (SQLite):")
            for row in server.db.all():
                print(
                    f"  {row.object_key}  etag={row.etag}  size_bytes={row.size_bytes}"
                    f"  content_type={row.content_type}  created_at={row.created_at}"
                )
    if failures:
        print(f"demo FAILED: {failures} download(s) differ from the upload", file=sys.stderr)
        return EXIT_FAILURE
    print("demo ok: every asset went presign -> PUT -> complete and came back byte-identical")
    return 0


__all__ = ["main"]
