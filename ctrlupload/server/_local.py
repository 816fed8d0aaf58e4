"""The embedded local object store: files on disk, uploads through signed URLs.

Upload URLs point at the reference backend's own ``PUT /upload/{key}`` and are signed
with HMAC-SHA256 over everything S3's SigV4 presigning binds for a PUT: method, key,
content type, content length and expiry. A URL for one key, type or length is useless
for another, and an expired one is refused, the way S3 refuses it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import quote, urlencode

from ._store import ObjectInfo, PresignedPut

#: Bytes read from the request and written to disk at a time.
RECEIVE_BLOCK_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class UploadGrant:
    """What a signed upload URL allows, recovered from the request."""

    key: str
    content_type: str
    content_length: int
    expires_at: int


class UploadRejected(Exception):
    """The PUT does not match its signature, or came too late.

    Attributes:
        status: HTTP status to answer.
        code: S3-style error code (``AccessDenied``, ``SignatureDoesNotMatch``...).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class IncompleteBody(Exception):
    """The client sent fewer bytes than it announced (it went away mid-upload)."""


def string_to_sign(grant: UploadGrant) -> bytes:
    """The canonical text a signature covers: method, key, type, length and expiry."""
    return "\n".join(
        ["PUT", grant.key, grant.content_type, str(grant.content_length), str(grant.expires_at)]
    ).encode("utf-8")


class LocalObjectStore:
    """Objects as files under ``data_dir/objects``; thread-safe.

    Args:
        data_dir: Root directory; ``objects/`` and ``staging/`` are made under it.
        base_url: The server's external URL, for upload and public URLs.
        signing_secret: HMAC key for upload URLs; random (per process) by default.
        clock: Seconds since the epoch; tests move it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        base_url: str,
        *,
        signing_secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.objects_dir = self.data_dir / "objects"
        self.staging_dir = self.data_dir / "staging"
        self.meta_dir = self.data_dir / "meta"
        for folder in (self.objects_dir, self.staging_dir, self.meta_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Leftovers of a server that was killed mid-upload: nobody can finish them.
        # (One server per data directory.)
        for stale in self.staging_dir.glob("*.part"):
            with contextlib.suppress(OSError):
                stale.unlink()
        self.base_url = base_url.rstrip("/")
        self._secret = signing_secret or secrets.token_bytes(32)
        self._clock = clock
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalObjectStore(data_dir={str(self.data_dir)!r}, base_url={self.base_url!r})"

    def _path(self, key: str) -> Path:
        return self.objects_dir.joinpath(*key.split("/"))

    def _meta_path(self, key: str) -> Path:
        return self.meta_dir.joinpath(*key.split("/"))

    def _sign(self, grant: UploadGrant) -> str:
        return hmac.new(self._secret, string_to_sign(grant), hashlib.sha256).hexdigest()

    def presign_put(
        self, key: str, content_type: str, content_length: int, expires_sec: int
    ) -> PresignedPut:
        """Sign a URL for one PUT of exactly this key, content type and length."""
        grant = UploadGrant(key, content_type, content_length, int(self._clock()) + expires_sec)
        query = urlencode({"expires": grant.expires_at, "signature": self._sign(grant)})
        return PresignedPut(
            upload_url=f"{self.base_url}/upload/{quote(key, safe='/')}?{query}",
            headers={"Content-Type": content_type},
            expires_sec=expires_sec,
        )

    def public_url(self, key: str) -> str:
        """The server's download URL for ``key``."""
        return f"{self.base_url}/files/{quote(key, safe='/')}"

    def authorize(
        self,
        key: str,
        *,
        content_type: str,
        content_length: int,
        expires: str | None,
        signature: str | None,
    ) -> UploadGrant:
        """Check an upload request against its signature, like S3 does.

        Raises:
            UploadRejected: 403 ``AccessDenied`` when unsigned or expired, 403
                ``SignatureDoesNotMatch`` when anything signed differs.
        """
        if not expires or not signature:
            raise UploadRejected(403, "AccessDenied", "Query-string authentication required")
        try:
            expires_at = int(expires)
        except ValueError:
            raise UploadRejected(403, "AccessDenied", "Invalid expiry") from None
        grant = UploadGrant(key, content_type, content_length, expires_at)
        if not hmac.compare_digest(self._sign(grant), signature):
            raise UploadRejected(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided (key, Content-Type and Content-Length are signed)",
            )
        if self._clock() > expires_at:
            raise UploadRejected(403, "AccessDenied", "Request has expired")
        return grant

    def receive(self, grant: UploadGrant, body: BinaryIO) -> ObjectInfo:
        """Stream exactly ``grant.content_length`` bytes to disk and publish atomically.

        Raises:
            IncompleteBody: The body ended early; nothing is stored.
        """
        target = self._path(grant.key)
        md5 = hashlib.md5(usedforsecurity=False)
        fd, temp_name = _mkstemp(self.staging_dir)
        temp_path = Path(temp_name)
        try:
            with open(fd, "wb", buffering=0) as handle:
                remaining = grant.content_length
                while remaining:
                    block = body.read(min(remaining, RECEIVE_BLOCK_BYTES))
                    if not block:
                        raise IncompleteBody(
                            f"body ended {remaining} bytes short of {grant.content_length}"
                        )
                    md5.update(block)
                    handle.write(block)
                    remaining -= len(block)
                os.fsync(handle.fileno())
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp_path, target)
            except OSError as exc:
                if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
                    raise UploadRejected(
                        400,
                        "InvalidArgument",
                        "the local store cannot hold this key (a segment is too long, or "
                        "it collides with an object or folder of the same name)",
                    ) from exc
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                temp_path.unlink()
            raise
        info = ObjectInfo(size_bytes=grant.content_length, etag=f'"{md5.hexdigest()}"')
        self._write_meta(grant.key, target, info)
        return info

    def _write_meta(self, key: str, target: Path, info: ObjectInfo) -> None:
        """Remember the ETag beside the object, tied to the file's size and mtime."""
        stat = target.stat()
        meta = self._meta_path(key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = _mkstemp(self.staging_dir)
        with open(fd, "w", encoding="ascii") as handle:
            handle.write(f"{info.etag} {stat.st_size} {stat.st_mtime_ns}")
        os.replace(temp_name, meta)

    def _read_meta(self, key: str, stat: os.stat_result) -> ObjectInfo | None:
        try:
            etag, size, mtime_ns = self._meta_path(key).read_text(encoding="ascii").split()
        except (OSError, ValueError):
            return None
        if int(size) != stat.st_size or int(mtime_ns) != stat.st_mtime_ns:
            return None  # the file changed behind our back: recompute
        return ObjectInfo(size_bytes=stat.st_size, etag=etag)

    def head(self, key: str) -> ObjectInfo | None:
        """Size and MD5 ETag of the stored file, or None."""
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                known = self._read_meta(key, stat)
                if known is not None:
                    return known
                md5 = hashlib.md5(usedforsecurity=False)
                while block := handle.read(RECEIVE_BLOCK_BYTES):
                    md5.update(block)
        except OSError as exc:
            if _means_absent(exc):
                return None
            raise
        return ObjectInfo(size_bytes=stat.st_size, etag=f'"{md5.hexdigest()}"')

    def open(self, key: str) -> BinaryIO | None:
        """Open the stored file for reading, or None when absent."""
        try:
            return open(self._path(key), "rb")
        except OSError as exc:
            if _means_absent(exc):
                return None
            raise

    def delete(self, key: str) -> None:
        """Remove the file; a missing file is fine."""
        for path in (self._path(key), self._meta_path(key)):
            try:
                path.unlink()
            except OSError as exc:
                if not _means_absent(exc):
                    raise


def _means_absent(exc: OSError) -> bool:
    """No object can be stored at this path: missing, a directory, or a name too long."""
    return exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)


def _mkstemp(folder: Path) -> tuple[int, str]:
    while True:
        name = str(folder / f"{secrets.token_hex(8)}.part")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
