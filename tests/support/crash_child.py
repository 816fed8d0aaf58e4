"""A local store that completes a multipart upload and freezes at its publish rename.

Run as ``python -m tests.support.crash_child DATA_DIR KEY UPLOAD_ID PARTS_JSON POINT``:
it opens the store on ``DATA_DIR`` and completes the upload with ``PARTS_JSON``
(``[[number, etag, size], ...]``). When the store renames a file into ``objects/``,
it prints ``frozen`` and blocks forever, either just ``before`` or just ``after`` the
rename (``POINT``), so that the parent can SIGKILL it at exactly that moment.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from ctrlupload.server import LocalObjectStore, StoredPart


def main() -> None:
    data_dir, key, upload_id, parts_json, point = sys.argv[1:6]
    store = LocalObjectStore(data_dir, "http://127.0.0.1:1")
    objects = Path(data_dir, "objects").resolve()
    real_replace = os.replace

    def frozen_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        publishing = Path(target).resolve().is_relative_to(objects)
        if publishing and point == "before":
            freeze()
        real_replace(source, target)
        if publishing and point == "after":
            freeze()

    os.replace = frozen_replace  # type: ignore[assignment]
    parts = [StoredPart(number, etag, size) for number, etag, size in json.loads(parts_json)]
    store.complete_multipart(key, upload_id, parts)
    print("completed", flush=True)


def freeze() -> None:
    print("frozen", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
