"""Upload a small sample render with whatever provider the environment configures.

With no configuration at all this uses the ``local`` provider and writes under
``./storage``; set ``STORAGE_PROVIDER=backend_presigned`` plus ``BACKEND_BASE_URL`` and
``BACKEND_SERVICE_TOKEN`` (in the environment or ``.env``) to go through a backend.

    python examples/render_upload.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ctrlupload import StorageUploadError, get_storage_provider, render_asset_key

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
    with tempfile.TemporaryDirectory() as tmp, get_storage_provider() as storage:
        assets = make_sample_render(Path(tmp))
        print(f"provider: {storage!r}")

        def upload(item: tuple[str, Path]) -> str:
            asset, path = item
            key = render_asset_key("V-001", "S-001", job, asset)  # type: ignore[arg-type]
            started = time.perf_counter()
            result = storage.put_file(path, key)
            took = time.perf_counter() - started
            return f"{result.key}  {result.size_bytes:>9} bytes  {took:6.3f}s  {result.url}"

        try:
            # One provider, shared by a thread pool, the way renderers use it.
            with ThreadPoolExecutor(max_workers=3) as pool:
                for line in pool.map(upload, assets.items()):
                    print(line)
        except StorageUploadError as exc:
            print(f"error [{exc.code}]: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
