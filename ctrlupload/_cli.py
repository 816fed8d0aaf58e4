"""The ``ctrlupload`` command: ``serve``, ``put`` and ``demo``.

Failures print the error's message and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._errors import StorageError
from ._keys import render_asset_key
from ._settings import Settings
from ._version import __version__
from .providers import BackendPresignedStorageProvider, get_storage_provider

if TYPE_CHECKING:
    from .server import ReferenceServer

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

    serve = commands.add_parser("serve", help="run the reference backend")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind (8080; 0 = any)")
    serve.add_argument("--store", choices=("local", "s3"), default="local")
    serve.add_argument("--data-dir", type=Path, default=Path("ctrlupload-data"))
    serve.add_argument(
        "--db-path", type=Path, help="SQLite file of asset rows (default DATA_DIR/assets.sqlite3)"
    )
    serve.add_argument(
        "--public-url", help="URL clients reach this server at (default http://HOST:PORT)"
    )
    serve.add_argument("--s3-bucket", default=os.environ.get("STORAGE_S3_BUCKET"))
    serve.add_argument("--s3-endpoint-url", default=os.environ.get("STORAGE_S3_ENDPOINT_URL"))
    serve.add_argument("--s3-region", default=os.environ.get("STORAGE_S3_REGION"))
    serve.add_argument("--s3-public-base-url", default=os.environ.get("STORAGE_S3_PUBLIC_BASE_URL"))
    serve.set_defaults(run=_serve)

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
    return parser


# -- serve -----------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from .server import ReferenceServer, ServerConfig

    settings = Settings.from_env()
    token = settings.backend_service_token
    config = ServerConfig(
        host=args.host,
        port=args.port,
        store=args.store,
        data_dir=args.data_dir,
        db_path=args.db_path,
        token=token.get_secret_value() if token else None,
        public_url=args.public_url,
        s3_bucket=args.s3_bucket,
        s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region,
        s3_public_base_url=args.s3_public_base_url,
    )
    try:
        server = ReferenceServer(config)
    except (OSError, ValueError, StorageError) as exc:
        print(f"ctrlupload: error: cannot start the backend: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        server.store.check()  # fail now on an unreachable bucket or an unwritable folder
    except StorageError as exc:
        server.stop()
        print(f"ctrlupload: error: cannot start the backend: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _stop_on_sigterm(server)  # before announcing: a supervisor may stop us right after
    print(f"ctrlupload reference backend ({args.store} store) serving", flush=True)
    print(f"BACKEND_BASE_URL={server.base_url}", flush=True)
    if token is None:
        # Generated here, so the operator has no other way to learn it.
        print(f"BACKEND_SERVICE_TOKEN={server.token}", flush=True)
    else:
        print("BACKEND_SERVICE_TOKEN is taken from the environment", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print("ctrlupload reference backend stopped", flush=True)
    return 0


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
