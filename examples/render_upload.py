"""Upload a small sample render with whatever provider the environment configures.

With no configuration at all this uses the ``local`` provider and writes under
``./storage``; set ``STORAGE_PROVIDER=backend_presigned`` plus ``BACKEND_BASE_URL`` and
``BACKEND_SERVICE_TOKEN`` (in the environment or ``.env``) to go through a backend.

    python examples/render_upload.py

``upload_render`` sends the three files at once, all or nothing: if one fails, the
others are removed again. Ctrl-C cancels the same way.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from ctrlupload import (
    StorageConfigError,
    StorageError,
    UploadCancelled,
    get_storage_provider,
    upload_render,
)

SUBTITLES = "1\n00:00:00,000 --> 00:00:02,000\nHello from ctrlupload\n"


def make_sample_render(folder: Path) -> dict[str, Path]:
    """Write a fake render: a 4 MiB 'video', an srt and a 'thumbnail'."""
    video = folder / "video.mp4"
    video.write_bytes(os.urandom(4 * 1024 * 1024))
    subtitles = folder / "subtitles.srt"
    subtitles.write_text(SUBTITLES, encoding="utf-8")
    thumbnail = folder / "thumb.jpg"
    thumbnail.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(20_000) + b"\xff\xd9")
    return {"video": video, "subtitles": subtitles, "thumbnail": thumbnail}


def main() -> int:
    job = time.strftime("JOB-%Y%m%d-%H%M%S")
    try:
        storage = get_storage_provider()
    except StorageConfigError as exc:
        # A missing or bad setting: say which, without a traceback.
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    cancel = threading.Event()  # set it (from any thread) to stop and remove everything
    with tempfile.TemporaryDirectory() as tmp, storage:
        files = make_sample_render(Path(tmp))
        print(f"provider: {storage!r}")
        started = time.perf_counter()
        try:
            render = upload_render(
                storage,
                "V-001",
                "S-001",
                job,
                video=files["video"],
                subtitles=files["subtitles"],
                thumbnail=files["thumbnail"],
                cancel=cancel,
            )
        except UploadCancelled as exc:
            print(f"cancelled: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            # upload_render stopped the uploads and removed what they had stored.
            print("interrupted: nothing was kept", file=sys.stderr)
            return 130
        except StorageError as exc:
            code = getattr(exc, "code", "STORAGE_ERROR")
            print(f"error [{code}]: {exc}", file=sys.stderr)
            return 1
        took = time.perf_counter() - started
    for name, result in render.as_dict().items():
        if result is not None:
            print(f"{name:<10} {result['key']}  {result['size_bytes']:>9} bytes  {result['url']}")
    print(f"stored in {took:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
