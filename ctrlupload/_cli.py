"""The ``ctrlupload`` command: ``serve``, ``put``, ``render``, ``doctor``, ``demo`` and
``conformance``.

Failures print the error's message and exit non-zero, without a traceback; Ctrl-C
during an upload cancels it (nothing it stored is kept) and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeVar

from ._doctor import backend_unused_warning, run_doctor
from ._errors import StorageConfigError, StorageError, UploadCancelled
from ._render import RenderUpload, upload_render
from ._settings import Settings
from ._units import format_size
from ._version import __version__
from .protocol import MAX_OBJECT_BYTES, MAX_PART_BYTES
from .providers import BackendPresignedStorageProvider, get_storage_provider

if TYPE_CHECKING:
    from .server import ReferenceServer, ServerConfig

EXIT_FAILURE = 1
#: The exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

_T = TypeVar("_T")


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
    except _Interrupted:
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("ctrlupload: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlupload",
        description="Stream render output to S3 through backend-issued presigned URLs.",
    )
    parser.add_argument("--version", action="version", version=f"ctrlupload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve(commands)

    put = commands.add_parser(
        "put",
        help="upload one file with the configured provider",
        description="Upload FILE as KEY with the provider the environment configures "
        "(STORAGE_PROVIDER) and print its URL. Retries show on stderr; Ctrl-C cancels.",
    )
    put.add_argument("file", type=Path)
    put.add_argument("key")
    put.add_argument("--content-type", help="default: from the key's extension")
    put.add_argument(
        "--resume",
        action="store_true",
        help="upload in parts and keep a checkpoint (STORAGE_RESUME_DIR), so running the "
        "same command again after a failure sends only the missing parts",
    )
    put.add_argument(
        "--no-overwrite",
        action="store_true",
        help="fail (exit 1) rather than replace an object already at KEY; storage enforces it",
    )
    put.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    put.set_defaults(run=_put)

    render = commands.add_parser(
        "render",
        help="upload a render's video, subtitles and thumbnail as one job",
        description="Upload a render's files under videos/VIDEO_ID/SCRIPT_ID/JOB_ID/ "
        "(video.mp4, subtitles.srt, thumb.jpg) at once, all or nothing: if one fails, "
        "or on Ctrl-C, none is kept. Prints one line per asset with its URL.",
    )
    render.add_argument("video_id", metavar="VIDEO_ID")
    render.add_argument("script_id", metavar="SCRIPT_ID")
    render.add_argument("job_id", metavar="JOB_ID")
    render.add_argument("--video", type=Path, required=True, metavar="FILE", help="the video")
    render.add_argument("--subtitles", type=Path, metavar="FILE", help="the subtitles (.srt)")
    render.add_argument("--thumbnail", type=Path, metavar="FILE", help="the thumbnail (.jpg)")
    render.add_argument(
        "--json", action="store_true", help="print the stored assets as JSON instead"
    )
    render.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    render.set_defaults(run=_render)

    doctor = commands.add_parser(
        "doctor",
        help="check the configuration and the storage it points at",
        description="Check the settings (misspelt names included) and the configured "
        "provider: for backend_presigned the backend's reachability, the service token, "
        "multipart, complete-set and the clock; for local the folder; for s3/minio the "
        "bucket. One line per check; exit status 0 only if none FAILs. Uploads nothing.",
    )
    doctor.set_defaults(run=_doctor)

    demo = commands.add_parser(
        "demo", help="run presign -> PUT -> complete end to end against an embedded backend"
    )
    demo.add_argument(
        "--video-mib",
        type=_non_negative_int,
        help="size of the sample video in MiB (default: 4, or VIDEO_MAX_UPLOAD_BYTES if "
        "that is less)",
    )
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
    for flag, field, kind, help_text in _UPLOAD_FLAGS:
        api.add_argument(
            flag,
            dest=field,
            metavar=flag[2:].upper().replace("-", "_"),
            type=kind,
            default=getattr(defaults, field),
            help=help_text,
        )
    http = serve.add_argument_group("HTTP server limits")
    for field, limit_kind, help_text in _LIMIT_FLAGS:
        flag = "--" + field.replace("_", "-")
        http.add_argument(flag, type=limit_kind, default=getattr(limits, field), help=help_text)
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


def _whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high``: argparse says which bound is broken."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{text!r} must be at most {high}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _seconds(*, zero_ok: bool) -> Callable[[str], float]:
    """A duration: more than 0 (or at least 0), at most :data:`MAX_SERVE_SECONDS`."""

    def parse(text: str) -> float:
        value = _float(text)
        if zero_ok and value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
        if not zero_ok and value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        if value > MAX_SERVE_SECONDS:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be at most {MAX_SERVE_SECONDS} (a day)"
            )
        return value

    return parse


#: The longest timeout serve takes: longer ones overflow the platform's timers.
MAX_SERVE_SECONDS: Final = 86_400
#: The longest presigned URL lifetime serve issues: 7 days, S3's limit.
MAX_URL_EXPIRY_S: Final = 7 * 86_400

#: serve's upload flags: the flag, the ServerConfig field it sets, its type, its help.
_UPLOAD_FLAGS: Final[tuple[tuple[str, str, Callable[[str], int], str], ...]] = (
    (
        "--url-expiry-s",
        "expires_sec",
        _whole(1, MAX_URL_EXPIRY_S),
        "lifetime of presigned URLs (at most 7 days, as on S3)",
    ),
    (
        "--max-put-bytes",
        "max_content_length",
        _whole(1, MAX_OBJECT_BYTES),
        "largest single PUT presign accepts (S3: 5 GiB)",
    ),
    (
        "--max-object-bytes",
        "max_object_bytes",
        _whole(1, MAX_OBJECT_BYTES),
        "largest multipart upload initiate accepts (S3: 5 TiB)",
    ),
    (
        "--min-part-bytes",
        "min_part_bytes",
        _whole(1, MAX_PART_BYTES),
        "smallest part but the last (S3: 5 MiB)",
    ),
    (
        "--part-bytes",
        "default_part_bytes",
        _whole(1, MAX_PART_BYTES),
        "part size answered when a client asks for none",
    ),
)
#: serve's HTTP limit flags (``--`` + the field's name): the ServerLimits field, its
#: type, its help. Each type has an upper bound, so that no value reaches the socket
#: layer that it cannot take (a listen() backlog past a C int, a timeout past time_t).
_LIMIT_FLAGS: Final[tuple[tuple[str, Callable[[str], object], str], ...]] = (
    ("threads", _whole(1, 4096), "requests served at once"),
    (
        "max_connections",
        _whole(1, 1_000_000),
        "open connections at most (also bounded by ulimit -n); at the cap the idlest one is closed",
    ),
    ("backlog", _whole(1, 65535), "listen() backlog"),
    (
        "header_timeout_s",
        _seconds(zero_ok=False),
        "time from a request's first byte to its last header",
    ),
    ("idle_timeout_s", _seconds(zero_ok=False), "silence allowed between requests or mid-body"),
    (
        "shutdown_timeout_s",
        _seconds(zero_ok=True),
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
        **{field: getattr(args, field) for _, field, _, _ in _UPLOAD_FLAGS},
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


# -- put and render --------------------------------------------------------------------


@contextlib.contextmanager
def _upload_session(label: str, no_progress: bool) -> Iterator[tuple[Any, Any]]:
    """The configured provider, a progress bar on a terminal (or None), and retry lines
    on stderr above it, for ``put`` and ``render``; all closed on exit."""
    settings = _client_settings()
    show_progress = not no_progress and sys.stderr.isatty()
    with get_storage_provider(settings) as storage:
        bar = _progress_bar(label, sys.stderr) if show_progress else None
        with _retry_lines(sys.stderr, bar):
            try:
                yield storage, bar
            finally:
                if bar is not None:
                    bar.close()


def _put(args: argparse.Namespace) -> int:
    with _upload_session(args.file.name, args.no_progress) as (storage, bar):
        if args.resume:
            # Ctrl-C interrupts the upload where it is and keeps it, with its
            # checkpoint, for the same command to resume; cancelling would abort.
            result = _resumable_put(storage, args, bar)
        else:
            result = _cancellable(
                lambda cancel: storage.put_file(
                    args.file,
                    args.key,
                    content_type=args.content_type,
                    progress=bar,
                    cancel=cancel,
                    overwrite=not args.no_overwrite,
                ),
                bar,
            )
    print(result.url)
    return 0


def _resumable_put(storage: Any, args: argparse.Namespace, bar: Any) -> Any:
    try:
        return storage.put_file(
            args.file,
            args.key,
            content_type=args.content_type,
            progress=bar,
            resume=True,
            overwrite=not args.no_overwrite,
        )
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(
            "ctrlupload: interrupted; the upload is kept: run the same command again to "
            "send only the missing parts",
            file=sys.stderr,
        )
        raise


def _render(args: argparse.Namespace) -> int:
    with _upload_session(args.job_id, args.no_progress) as (storage, bar):
        render = _cancellable(
            lambda cancel: upload_render(
                storage,
                args.video_id,
                args.script_id,
                args.job_id,
                video=args.video,
                subtitles=args.subtitles,
                thumbnail=args.thumbnail,
                progress=bar,
                cancel=cancel,
            ),
            bar,
        )
    if args.json:
        print(json.dumps(render.as_dict(), indent=2))
    else:
        for line in render_lines(render):
            print(line)
    return 0


def render_lines(render: RenderUpload) -> list[str]:
    """One line per stored asset: its name, key, size and URL."""
    lines = []
    for asset in ("video", "subtitles", "thumbnail"):
        result = getattr(render, asset)
        if result is not None:
            lines.append(
                f"{asset:<10} {result.key}  {format_size(result.size_bytes)}  {result.url}"
            )
    return lines


def _client_settings() -> Settings:
    """The settings from the environment, with a warning for BACKEND_* left unused."""
    settings = Settings.from_env()
    unused = backend_unused_warning(settings)
    if unused is not None:
        print(f"ctrlupload: warning: {unused}", file=sys.stderr)
    return settings


class _Interrupted(Exception):
    """Ctrl-C stopped an upload, which has cleaned up and said so: exit 130."""


def _cancellable(work: Callable[[threading.Event], _T], bar: _TextProgress | None) -> _T:
    """Run ``work(cancel)`` on a helper thread; Ctrl-C sets ``cancel`` and waits.

    The upload then stops and removes what it stored (a multipart upload is aborted;
    a render's stored assets are deleted) before the command exits 130. A second
    Ctrl-C leaves at once.
    """
    cancel = threading.Event()
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work(cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc
        finally:
            finished.set()

    # Waited for with an Event, not Thread.join: on CPython 3.11 a join interrupted by
    # Ctrl-C can leave the thread looking ended while it still runs, and the exit would
    # cut its cleanup short.
    threading.Thread(target=run, name="ctrlupload-upload", daemon=True).start()
    try:
        finished.wait()
    except KeyboardInterrupt:
        cancel.set()
        message = (
            "ctrlupload: interrupted; cancelling the upload and removing what it stored "
            "(Ctrl-C again to leave at once)"
        )
        if bar is not None:
            bar.write_line(message)
        else:
            print(message, file=sys.stderr, flush=True)
        finished.wait()
        if "result" in outcome:
            print(
                "ctrlupload: the upload had finished before it could be cancelled; it is kept",
                file=sys.stderr,
            )
            kept: _T = outcome["result"]
            return kept
        error = outcome.get("error")
        if error is not None and not isinstance(error, UploadCancelled):
            print(f"ctrlupload: error: {error}", file=sys.stderr)
        print("ctrlupload: cancelled", file=sys.stderr)
        raise _Interrupted from None
    if "error" in outcome:
        raise outcome["error"]
    result: _T = outcome["result"]
    return result


class _RetryLines(logging.Handler):
    """Each retry the transport makes, as a line on the terminal (above the bar)."""

    def __init__(self, stream: TextIO, bar: _TextProgress | None) -> None:
        super().__init__(logging.INFO)
        self._stream = stream
        self._bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"ctrlupload: {record.getMessage()}"
            if self._bar is not None:
                self._bar.write_line(line)
            else:
                self._stream.write(line + "\n")
                self._stream.flush()
        except Exception:  # noqa: BLE001 - logging must not break the upload
            self.handleError(record)


@contextlib.contextmanager
def _retry_lines(stream: TextIO, bar: _TextProgress | None) -> Iterator[None]:
    """Show ``ctrlupload.retry`` INFO records on ``stream`` while the block runs."""
    retry_logger = logging.getLogger("ctrlupload.retry")
    handler = _RetryLines(stream, bar)
    level = retry_logger.level
    retry_logger.addHandler(handler)
    if retry_logger.getEffectiveLevel() > logging.INFO:
        retry_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        retry_logger.removeHandler(handler)
        retry_logger.setLevel(level)


class _TextProgress:
    """A progress line on a terminal; tqdm's bar when ``ctrlupload[progress]`` is there."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = label
        self._stream = stream
        self._tqdm: Any = None
        self._lock = threading.Lock()
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._tqdm = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=stream)
        self._last_draw = 0.0
        self._mid_line = False

    def __call__(self, bytes_done: int, bytes_total: int) -> None:
        with self._lock:
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
            self._mid_line = True

    def write_line(self, text: str) -> None:
        """Print a whole line without mangling the bar (it is drawn again below)."""
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.write(text, file=self._stream)
                return
            if self._mid_line:
                self._stream.write("\n")
                self._mid_line = False
            self._stream.write(text + "\n")
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.close()
            elif self._mid_line:
                self._stream.write("\n")
                self._stream.flush()
                self._mid_line = False


def _progress_bar(label: str, stream: TextIO) -> _TextProgress:
    return _TextProgress(label, stream)


# -- doctor ----------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    return run_doctor(None, sys.stdout)


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


#: The sample thumbnail: a JPEG's first and last markers around random bytes.
_THUMBNAIL_BYTES: Final = 30_013
#: The sample video's size unless --video-mib says otherwise (or the limit is lower).
_DEFAULT_VIDEO_BYTES: Final = 4 * 1024 * 1024


def _sample_render(folder: Path, video_bytes: int) -> dict[str, Path]:
    video = folder / "video.mp4"
    with open(video, "wb") as handle:
        left = video_bytes
        while left:
            block = os.urandom(min(left, 1024 * 1024))
            handle.write(block)
            left -= len(block)
    subtitles = folder / "subtitles.srt"
    subtitles.write_text(_SUBTITLES, encoding="utf-8")
    thumbnail = folder / "thumb.jpg"
    marker, end = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\xff\xd9"
    thumbnail.write_bytes(marker + os.urandom(_THUMBNAIL_BYTES - len(marker) - len(end)) + end)
    return {"video": video, "subtitles": subtitles, "thumbnail": thumbnail}


def _demo_video_bytes(video_mib: int | None, limit: int) -> int:
    """The sample video's size; it and the other samples must fit ``limit``.

    Raises:
        StorageConfigError: A sample is over VIDEO_MAX_UPLOAD_BYTES; says what to change.
    """
    smallest = max(len(_SUBTITLES.encode("utf-8")), _THUMBNAIL_BYTES)
    if limit < smallest:
        raise StorageConfigError(
            f"VIDEO_MAX_UPLOAD_BYTES={limit} is less than the demo's {_THUMBNAIL_BYTES}-byte "
            f"thumbnail; raise VIDEO_MAX_UPLOAD_BYTES to at least {smallest}",
            variable="VIDEO_MAX_UPLOAD_BYTES",
        )
    if video_mib is None:
        return min(_DEFAULT_VIDEO_BYTES, limit)
    video_bytes = video_mib * 1024 * 1024
    if video_bytes > limit:
        raise StorageConfigError(
            f"--video-mib {video_mib} makes a {video_bytes}-byte video, more than "
            f"VIDEO_MAX_UPLOAD_BYTES={limit}; raise VIDEO_MAX_UPLOAD_BYTES or pass a "
            f"smaller --video-mib",
            variable="VIDEO_MAX_UPLOAD_BYTES",
        )
    return video_bytes


def _demo_settings(base_url: str, token: str) -> Settings:
    """The environment's client settings (limits, timeouts, multipart...), pointed at
    the embedded backend: its URL, token and default paths."""
    mine = Settings.from_env()
    values: dict[str, Any] = {
        str(field.alias): getattr(mine, name)
        for name, field in Settings.model_fields.items()
        if name in mine.model_fields_set
        and not name.startswith("backend_")
        and name != "storage_provider"
    }
    values.update(
        STORAGE_PROVIDER="backend_presigned",
        BACKEND_BASE_URL=base_url,
        BACKEND_SERVICE_TOKEN=token,
    )
    return Settings.from_mapping(values)


def _demo(args: argparse.Namespace) -> int:
    try:
        from .server import WSGIServer  # noqa: F401 - cheroot is there, or say how to get it
    except ImportError as exc:
        print(f"ctrlupload: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    from .server import ReferenceServer, ServerConfig

    limit = Settings.from_env().video_max_upload_bytes
    video_bytes = _demo_video_bytes(args.video_mib, limit)
    with tempfile.TemporaryDirectory(prefix="ctrlupload-demo-") as scratch:
        data_dir = args.data_dir or Path(scratch) / "backend"
        render_dir = Path(scratch) / "render"
        render_dir.mkdir()
        assets = _sample_render(render_dir, video_bytes)
        with ReferenceServer(ServerConfig(port=0, data_dir=data_dir)) as server:
            print(f"reference backend: {server.base_url} (local store in {data_dir})")
            settings = _demo_settings(server.base_url, server.token)
            job_id = time.strftime("JOB-%Y%m%d-%H%M%S")
            failures = 0
            with BackendPresignedStorageProvider(settings) as storage:
                started = time.perf_counter()
                render = upload_render(
                    storage,
                    "V-DEMO",
                    "S-001",
                    job_id,
                    video=assets["video"],
                    subtitles=assets["subtitles"],
                    thumbnail=assets["thumbnail"],
                )
                took = time.perf_counter() - started
            total = 0
            for asset, path in assets.items():
                result = getattr(render, asset)
                with urllib.request.urlopen(result.url, timeout=30) as response:  # noqa: S310
                    downloaded = response.read()
                same = downloaded == path.read_bytes()
                digest = hashlib.md5(downloaded, usedforsecurity=False).hexdigest()
                failures += not same
                total += result.size_bytes
                print(
                    f"  {'ok  ' if same else 'DIFF'} {result.key}  {result.size_bytes:>9} B"
                    f"  md5 {digest}\n       {result.url}"
                )
            print(
                f"upload_render stored {len(assets)} files ({format_size(total)}) "
                f"in {took * 1000:.1f} ms"
            )
            print("asset rows the backend recorded (SQLite):")
            for row in server.db.all():
                print(
                    f"  {row.object_key}  etag={row.etag}  size_bytes={row.size_bytes}"
                    f"  content_type={row.content_type}  created_at={row.created_at}"
                )
    if failures:
        print(f"demo FAILED: {failures} download(s) differ from the upload", file=sys.stderr)
        return EXIT_FAILURE
    print(
        "demo ok: every asset went presign -> PUT, the render was recorded together, and "
        "every asset came back byte-identical"
    )
    return 0


__all__ = ["main"]
