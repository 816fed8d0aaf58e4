"""The embedded local object store: files on disk, uploads through signed URLs.

Upload URLs point at the reference backend's own ``PUT /upload/{key}`` and are signed
with HMAC-SHA256 over everything S3's SigV4 presigning binds for a PUT: method, key,
content type, content length, the signed checksum and condition headers, and expiry, as
a JSON array (:func:`string_to_sign`), so that no field can be crafted to shift text
into the next. A URL for one key, type or length is useless for another, and an expired
one is refused, the way S3 refuses it. A PUT must send exactly the headers its URL was
signed with: an ``x-amz-checksum-crc64nvme`` or ``If-None-Match`` the URL was not signed
for, or a signed one left out or changed, gets 403 ``SignatureDoesNotMatch``.

Integrity and conditions are checked as S3 checks them (issue 11). While a body
streams in, its CRC64NVME is computed along with its MD5 (when ``awscrt`` is installed:
:attr:`LocalObjectStore.signs_checksums`); a body that does not match its signed
checksum is refused with ``BadDigest`` and its staging file removed, so the object
already at the key is untouched. ``If-None-Match: *`` is checked when the body is in,
under the tree lock and with the rename, so of two conditional PUTs racing for a free
key exactly one is stored and the other gets ``PreconditionFailed``.

Multipart uploads follow S3 too. A part goes to ``PUT /upload-part/{upload_id}/{n}``,
signed over the method, key, upload id, part number, exact length and expiry (not the
content type: S3's UploadPart has none of its own). Layout under ``data_dir``::

    .lock                              flock'ed by the one store that owns the
                                       directory, and its pid
    signing.key                        the HMAC key of its URLs (32 bytes, mode 0600)
                                       unless one is given; kept across restarts
    objects/<key>                      the stored objects
    meta/<key>                         their ETags and checksums, "<etag> <size>
                                       <mtime ns> <inode> [<crc64nvme base64>]"
                                       (older metas have no checksum, some no inode)
    staging/<random>.part              bodies being received (swept at start)
    staging/multipart/<upload_id>/     one multipart upload (kept across restarts)
        data                           the parts, written in place: part n at
                                       (n - 1) * part_size (made at initiate)
        part_size                      the size of every part but the last
        checksum                       "CRC64NVME FULL_OBJECT" when the upload was
                                       declared with a checksum (absent otherwise)
        object_key                     the key it is for (written last, removed first)
        <n>.md5                        part n's record, "<md5 hex> <size> [<crc64nvme
                                       base64>]", written only once all its bytes are
                                       in ``data`` (and match their signed checksum)

An object's meta is written before the file is renamed to its key, and names the
file's inode, size and mtime, which the rename keeps. A meta that does not describe the
file now at the key (left by a crash before the rename, or by an older file) is
ignored, and the ETag is computed from the file instead. So a crash at any point of
publishing leaves the old object or the new one, whole, with its own ETag. Publishing
(meta, then mkdir and rename) and deleting (unlink, then prune) take one lock for a few
system calls, so the meta at a key is always that of the file there, even when writers
race. Deleting removes the folders it leaves empty (S3 has no folders: once ``a/b`` is
gone, ``a`` can be an object), and the lock keeps that from removing a folder a publish
has just made.

A part streams straight into its place in ``data``; its record is removed before its
bytes are written and written again once they all are, so a listed part is always
whole. Parts are not fsynced by default (``sync_parts``): they are intermediate data,
and syncing them as well as the assembled object doubles the disk writes. A killed
server process loses nothing either way. A power loss can keep a part's record while
its bytes never reached the disk, and the record, not the bytes, is what list-parts
and complete check; where power loss must be survived, run with ``sync_parts=True``.
``complete`` of consecutive whole parts truncates ``data`` to the
object's size, fsyncs it and renames it into ``objects/``; otherwise the parts are
copied in order into a new file first (kernel-side with ``copy_file_range`` where it
can). The object's CRC64NVME is combined from the parts' (no second read), and a
complete given the whole object's checksum refuses (``BadDigest``) parts that do not
add up to it before anything is published; a conditional complete finds the key taken
(``ObjectExists``) under the tree lock, with the rename, and the upload stays.
Nothing recreates ``data``: an upload folder that lists parts but has no ``data`` was
published by a completion that died before removing the folder, and it answers
``NoSuchUpload`` (the app then checks the stored object against the part list). (A
folder with neither was started by an older version, and gets an empty ``data``.)
A lock per upload (striped) orders part records, completion and abort.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat as stat_module
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final, Self
from urllib.parse import quote, urlencode

from .. import _checksum
from .._errors import StorageError
from ..protocol._contract import bare_etag
from ..protocol._parts import MAX_PARTS, multipart_etag
from ._locks import StripedLocks
from ._store import (
    BadDigest,
    IncompleteBody,
    InvalidPart,
    NoSuchUpload,
    ObjectExists,
    ObjectInfo,
    PartGrant,
    PartsPage,
    PresignedPut,
    StoredPart,
    UploadGrant,
    UploadRejected,
    page_parts,
)

#: Bytes read from the request and written to disk at a time.
RECEIVE_BLOCK_BYTES: Final = 1024 * 1024
#: Bytes one ``copy_file_range`` call moves while assembling parts.
COPY_BLOCK_BYTES: Final = 64 * 1024 * 1024
_UPLOAD_ID: Final = re.compile(r"[0-9a-f]{32}")
_KEY_FILE: Final = "object_key"
_PART_SIZE_FILE: Final = "part_size"
_DATA_FILE: Final = "data"
_CHECKSUM_FILE: Final = "checksum"
_DECLARED_CHECKSUM: Final = f"{_checksum.ALGORITHM} FULL_OBJECT"
_LOCK_FILE: Final = ".lock"
_SIGNING_KEY_FILE: Final = "signing.key"
#: Bytes of a new signing key: 256 bits, the size of an HMAC-SHA256 digest.
SIGNING_KEY_BYTES: Final = 32
# copy_file_range cannot serve these file pairs; plain reads and writes can.
_NO_KERNEL_COPY: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
)


#: Names the encoding of the signed text; a new encoding gets a new tag. v3 signs the
#: checksum and the condition (URLs signed by v2 no longer fit: they expire anyway).
SIGNING_VERSION: Final = "ctrlupload-local-v3"


def string_to_sign(grant: UploadGrant | PartGrant) -> bytes:
    """The canonical text a signature covers: method, key, type, length, headers, expiry.

    The signed headers are the ``x-amz-checksum-crc64nvme`` value (null when none is
    signed) and, for an object, ``If-None-Match`` (``*`` or null). A part's text also
    names the upload and part number instead of the content type, behind an
    ``UploadPart`` label. The fields are a JSON array behind a version tag: each string
    is quoted and escaped, so no choice of key or content type (a newline in either,
    say) makes one grant's text equal another's, and no object URL's signature fits a
    part's.
    """
    fields: list[str | int | None]
    if isinstance(grant, PartGrant):
        fields = [
            SIGNING_VERSION,
            "PUT",
            "UploadPart",
            grant.key,
            grant.upload_id,
            grant.part_number,
            grant.content_length,
            grant.checksum,
            grant.expires_at,
        ]
    else:
        fields = [
            SIGNING_VERSION,
            "PUT",
            "Object",
            grant.key,
            grant.content_type,
            grant.content_length,
            grant.checksum,
            "*" if grant.if_none_match else None,
            grant.expires_at,
        ]
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_BAD_SIGNATURE: Final = (
    "The request signature we calculated does not match the signature you provided "
    "(key, Content-Type, Content-Length, x-amz-checksum-crc64nvme and If-None-Match "
    "are signed)"
)
_BAD_PART_SIGNATURE: Final = (
    "The request signature we calculated does not match the signature you provided "
    "(key, upload id, part number, Content-Length and x-amz-checksum-crc64nvme are signed)"
)
_BAD_DIGEST: Final = "The CRC64NVME you specified did not match the calculated checksum."


class LocalObjectStore:
    """Objects as files under ``data_dir/objects``; thread-safe.

    Multipart uploads live in ``staging/multipart/`` and survive a restart: a client can
    resume one against a new server on the same ``data_dir`` (and ``signing_secret``, when
    one is given instead of the kept key).

    A store owns its ``data_dir`` until :meth:`close` (or until the process ends): it
    holds an exclusive ``flock`` on ``data_dir/.lock``, taken before anything else, so a
    second store or server on the same directory is refused before it could sweep the
    first one's staging files. Use it as a context manager, or call :meth:`close`.

    Args:
        data_dir: Root directory; ``objects/`` and ``staging/`` are made under it.
        base_url: The server's external URL, for upload and public URLs.
        signing_secret: HMAC key for upload URLs. By default the key kept in
            ``data_dir/signing.key`` (32 random bytes, mode 0600, made on first use), so
            URLs issued before a restart keep working until they expire.
        clock: Seconds since the epoch; tests move it.
        sync_parts: fsync every multipart part as it arrives, not only assembled objects.

    Raises:
        StorageError: Another store (in this process or another) holds ``data_dir``,
            or ``signing.key`` cannot be read or made, or holds too few bytes.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        base_url: str,
        *,
        signing_secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
        sync_parts: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.objects_dir = self.data_dir / "objects"
        self.staging_dir = self.data_dir / "staging"
        self.meta_dir = self.data_dir / "meta"
        # Made on the first multipart upload, so a store that never sees one keeps
        # staging/ empty between uploads.
        self.multipart_dir = self.staging_dir / "multipart"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _own_data_dir(self.data_dir)
        # Released by close(), or when the store is collected; the kernel drops it too
        # when the process dies, so a killed server leaves no stale lock.
        self._release = weakref.finalize(self, os.close, lock_fd)
        try:
            for folder in (self.objects_dir, self.staging_dir, self.meta_dir):
                folder.mkdir(parents=True, exist_ok=True)
            # Leftovers of a server that was killed mid-upload: nobody can finish them
            # (the lock says no other server is receiving them). Multipart uploads are
            # kept: clients resume them.
            for stale in self.staging_dir.glob("*.part"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            self._secret = signing_secret or _signing_key(self.data_dir / _SIGNING_KEY_FILE)
        except BaseException:
            self._release()
            raise
        self.base_url = base_url.rstrip("/")
        self._clock = clock
        self._sync_parts = sync_parts
        # Every change to objects/ and meta/ (publish: meta, mkdir, rename; delete:
        # unlink, rmdir) runs under this one lock. So the meta at a key is always that
        # of the file there, and a prune never removes a folder a publish has just made
        # for its rename. Each holds it for a few system calls, never for a body.
        self._tree_lock = threading.Lock()
        self._upload_lock = StripedLocks()
        self._part_lock = StripedLocks()

    def __repr__(self) -> str:
        return f"LocalObjectStore(data_dir={str(self.data_dir)!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        """Give up ``data_dir`` for another store; closing again does nothing.

        The store must not be used afterwards.
        """
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _path(self, key: str) -> Path:
        return self.objects_dir.joinpath(*key.split("/"))

    def _meta_path(self, key: str) -> Path:
        return self.meta_dir.joinpath(*key.split("/"))

    def _sign(self, grant: UploadGrant | PartGrant) -> str:
        return hmac.new(self._secret, string_to_sign(grant), hashlib.sha256).hexdigest()

    def _signature_fits(self, grant: UploadGrant | PartGrant, signature: str | None) -> bool:
        """Compare in constant time, as bytes: compare_digest refuses non-ASCII text."""
        supplied = str(signature).encode("utf-8", "surrogatepass")
        return hmac.compare_digest(self._sign(grant).encode("ascii"), supplied)

    @property
    def signs_checksums(self) -> bool:
        """Whether CRC64NVME checksums are signed and verified here (awscrt is installed)."""
        return _checksum.available()

    def _checked_checksum(self, checksum: str | None) -> str | None:
        """``checksum`` if it can be signed here; ValueError for one that cannot."""
        if checksum is None:
            return None
        if not self.signs_checksums:
            raise ValueError(f"this store cannot verify CRC64NVME: {_checksum.INSTALL_HINT}")
        if _checksum.decode(checksum) is None:
            raise ValueError("checksum must be the base64 of a CRC64NVME's eight bytes")
        return checksum

    def presign_put(
        self,
        key: str,
        content_type: str,
        content_length: int,
        expires_sec: int,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> PresignedPut:
        """Sign a URL for one PUT of exactly this key, content type and length.

        With ``checksum`` the body must match it; with ``if_none_match`` the PUT stores
        nothing if an object is at the key by then. Both headers are signed, and
        returned in ``headers``.

        Raises:
            ValueError: A checksum this store cannot verify (no awscrt) or not S3's
                spelling of a CRC64NVME.
        """
        grant = UploadGrant(
            key,
            content_type,
            content_length,
            int(self._clock()) + expires_sec,
            checksum=self._checked_checksum(checksum),
            if_none_match=if_none_match,
        )
        query = urlencode({"expires": grant.expires_at, "signature": self._sign(grant)})
        headers = {"Content-Type": content_type}
        if grant.checksum is not None:
            headers[_checksum.HEADER] = grant.checksum
        if if_none_match:
            headers["If-None-Match"] = "*"
        return PresignedPut(
            upload_url=f"{self.base_url}/upload/{quote(key, safe='/')}?{query}",
            headers=headers,
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
        checksum: str | None = None,
        if_none_match: str | None = None,
    ) -> UploadGrant:
        """Check an upload request against its signature, like S3 does.

        ``checksum`` and ``if_none_match`` are the request's ``x-amz-checksum-crc64nvme``
        and ``If-None-Match`` headers, None when absent; both are signed.

        Raises:
            UploadRejected: 403 ``AccessDenied`` when unsigned or expired, 403
                ``SignatureDoesNotMatch`` when anything signed differs (a signed header
                left out, or one the URL was not signed with), 400 ``InvalidRequest``
                for a signed checksum this store can no longer verify.
        """
        expires_at = _expiry(expires, signature)
        if if_none_match not in (None, "*"):
            # No URL of this store is signed for any other condition.
            raise UploadRejected(403, "SignatureDoesNotMatch", _BAD_SIGNATURE)
        grant = UploadGrant(
            key,
            content_type,
            content_length,
            expires_at,
            checksum=checksum,
            if_none_match=if_none_match == "*",
        )
        if not self._signature_fits(grant, signature):
            raise UploadRejected(403, "SignatureDoesNotMatch", _BAD_SIGNATURE)
        if self._clock() > grant.expires_at:
            raise UploadRejected(403, "AccessDenied", "Request has expired")
        _check_verifiable(grant.checksum)
        return grant

    def receive(self, grant: UploadGrant, body: BinaryIO) -> ObjectInfo:
        """Stream exactly ``grant.content_length`` bytes to disk and publish atomically.

        The body's CRC64NVME is computed on the way (when awscrt is installed) and kept
        in the object's meta.

        Raises:
            IncompleteBody: The body ended early; nothing is stored.
            BadDigest: The body does not match ``grant.checksum``; nothing is stored,
                and the object at the key (if any) is untouched.
            ObjectExists: ``grant.if_none_match``, and an object is at the key when the
                body is in; nothing is stored.
        """
        temp_path, md5_hex, crc, stat = self._receive_to_temp(body, grant.content_length, sync=True)
        try:
            if grant.checksum is not None and _checksum.decode(grant.checksum) != crc:
                raise BadDigest(_BAD_DIGEST)
            return self._publish(
                grant.key,
                stat,
                temp_path,
                f'"{md5_hex}"',
                None if crc is None else _checksum.encode(crc),
                if_none_match=grant.if_none_match,
            )
        except BaseException:
            with contextlib.suppress(OSError):
                temp_path.unlink()
            raise

    def _receive_to_temp(
        self, body: BinaryIO, length: int, *, sync: bool
    ) -> tuple[Path, str, int | None, os.stat_result]:
        """Stream exactly ``length`` bytes into a staging file.

        Returns:
            Its path, MD5, CRC64NVME (None without awscrt) and fstat.
        """
        md5 = hashlib.md5(usedforsecurity=False)
        crc: int | None = 0 if self.signs_checksums else None
        fd, temp_name = _mkstemp(self.staging_dir)
        temp_path = Path(temp_name)
        try:
            with open(fd, "wb", buffering=0) as handle:
                for block in _body_blocks(body, length):
                    md5.update(block)
                    if crc is not None:
                        crc = _checksum.crc64nvme(block, crc)
                    while block:
                        block = block[handle.write(block) :]
                if sync:
                    os.fsync(handle.fileno())
                stat = os.fstat(handle.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                temp_path.unlink()
            raise
        return temp_path, md5.hexdigest(), crc, stat

    # -- multipart uploads -----------------------------------------------------------

    def _upload_dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise NoSuchUpload(f"no multipart upload {upload_id!r}")
        return self.multipart_dir / upload_id

    def _open_upload(self, upload_id: str, key: str | None) -> tuple[Path, str]:
        """The upload's folder and key; the caller holds the upload's lock.

        Raises:
            NoSuchUpload: No such upload, or it is for another key than ``key``.
        """
        folder = self._upload_dir(upload_id)
        try:
            stored_key = (folder / _KEY_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise NoSuchUpload(f"no multipart upload {upload_id!r}") from None
        if key is not None and stored_key != key:
            raise NoSuchUpload(f"multipart upload {upload_id!r} is not for '{key}'")
        if not (folder / _DATA_FILE).exists():
            self._settle_missing_data(folder, upload_id)
        return folder, stored_key

    def _settle_missing_data(self, folder: Path, upload_id: str) -> None:
        """An upload without its data file: assembled already, or started by an older version.

        Completing renames the data file into ``objects/`` and only then removes the
        folder, so a folder that still lists parts but has no data file is one whose
        assembly was published before the process died: the upload is over. A folder
        with no part at all was made by a version that created the data file with the
        first part, and gets an empty one now. The caller holds the upload's lock.

        Raises:
            NoSuchUpload: The upload was assembled; its leftovers are removed.
        """
        if any(name.endswith(".md5") for name in os.listdir(folder)):
            _drop_upload(folder)
            raise NoSuchUpload(f"multipart upload {upload_id!r} was already completed")
        os.close(os.open(folder / _DATA_FILE, os.O_WRONLY | os.O_CREAT, 0o666))

    def create_multipart(
        self, key: str, content_type: str, part_size: int, *, checksum: bool = False
    ) -> str:
        """Start a multipart upload of ``key``; its id is 32 random hex digits.

        Parts are written in place, part ``n`` at ``(n - 1) * part_size`` of one data
        file, so that completing an upload of consecutive parts is a rename, not a copy.
        With ``checksum`` the upload is declared CRC64NVME ``FULL_OBJECT``: its parts may
        be signed with their own checksums, and list-parts reports them.

        Raises:
            ValueError: ``checksum`` without awscrt.
        """
        del content_type  # recorded by the backend; objects here keep no content type
        if checksum and not self.signs_checksums:
            raise ValueError(f"this store cannot verify CRC64NVME: {_checksum.INSTALL_HINT}")
        upload_id = secrets.token_hex(16)
        folder = self.multipart_dir / upload_id
        folder.mkdir(parents=True)
        # The data file first and the key last: an upload is listed only once complete.
        os.close(os.open(folder / _DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        files = [(_PART_SIZE_FILE, str(part_size))]
        if checksum:
            files.append((_CHECKSUM_FILE, _DECLARED_CHECKSUM))
        for name, text in [*files, (_KEY_FILE, key)]:
            fd, temp_name = _mkstemp(self.staging_dir)
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, folder / name)
        return upload_id

    def presign_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        content_length: int,
        expires_sec: int,
        *,
        checksum: str | None = None,
    ) -> PresignedPut:
        """Sign a URL for one PUT of this part of this upload, with exactly this length.

        With ``checksum`` the part's bytes must match it (the header is signed, and
        returned in ``headers``). The upload must have been declared with a checksum
        for the PUT to be taken, as S3 wants.

        Raises:
            ValueError: A checksum this store cannot verify.
        """
        grant = PartGrant(
            key,
            upload_id,
            part_number,
            content_length,
            int(self._clock()) + expires_sec,
            checksum=self._checked_checksum(checksum),
        )
        query = urlencode({"expires": grant.expires_at, "signature": self._sign(grant)})
        headers = {} if grant.checksum is None else {_checksum.HEADER: grant.checksum}
        return PresignedPut(
            upload_url=f"{self.base_url}/upload-part/{upload_id}/{part_number}?{query}",
            headers=headers,
            expires_sec=expires_sec,
        )

    def authorize_part(
        self,
        upload_id: str,
        part_number: int,
        *,
        content_length: int,
        expires: str | None,
        signature: str | None,
        checksum: str | None = None,
    ) -> PartGrant:
        """Check a part upload against its signature, like S3 does.

        ``checksum`` is the request's ``x-amz-checksum-crc64nvme`` (None when absent),
        covered by the signature.

        Raises:
            UploadRejected: 403 as for :meth:`authorize`, 400 ``InvalidArgument`` for
                a part number outside 1 to 10,000, or 400 ``InvalidRequest`` for a
                checksum on an upload not declared with one.
            NoSuchUpload: The upload does not exist (never started, aborted, completed).
        """
        if not 1 <= part_number <= MAX_PARTS:
            raise UploadRejected(
                400, "InvalidArgument", f"Part number must be an integer between 1 and {MAX_PARTS}"
            )
        expires_at = _expiry(expires, signature)
        with self._upload_lock(upload_id):
            folder, key = self._open_upload(upload_id, None)
            declared = _declares_checksum(folder)
        grant = PartGrant(key, upload_id, part_number, content_length, expires_at, checksum)
        if not self._signature_fits(grant, signature):
            raise UploadRejected(403, "SignatureDoesNotMatch", _BAD_PART_SIGNATURE)
        if self._clock() > expires_at:
            raise UploadRejected(403, "AccessDenied", "Request has expired")
        if checksum is not None and not declared:
            raise UploadRejected(
                400,
                "InvalidRequest",
                "Checksum Type mismatch occurred, expected checksum Type: null, "
                "actual checksum Type: crc64nvme",
            )
        _check_verifiable(checksum)
        return grant

    def receive_part(self, grant: PartGrant, body: BinaryIO) -> ObjectInfo:
        """Stream one part into its place in the upload's data file.

        The part's record (MD5, size and CRC64NVME) is removed before its bytes are
        written and written again only once all of them are (and match the signed
        checksum), so a part cut short, corrupted, or re-sent over an earlier copy, is
        never listed until it is whole.

        Returns:
            The part's size, ETag (its MD5, quoted) and CRC64NVME (without awscrt, None).

        Raises:
            IncompleteBody: The body ended early; the part is not held.
            BadDigest: The bytes do not match ``grant.checksum``; the part is not held.
            NoSuchUpload: The upload was aborted or completed meanwhile.
        """
        with self._upload_lock(grant.upload_id):
            folder, _ = self._open_upload(grant.upload_id, grant.key)
            part_size = self._part_size(folder)
        record = folder / f"{grant.part_number}.md5"
        # One writer per part at a time; other parts are written alongside.
        with self._part_lock(f"{grant.upload_id}/{grant.part_number}"):
            with contextlib.suppress(FileNotFoundError):
                record.unlink()
            try:
                # Never created here: a missing data file was assembled (or aborted).
                fd = os.open(folder / _DATA_FILE, os.O_WRONLY)
            except FileNotFoundError:
                raise NoSuchUpload(f"no multipart upload {grant.upload_id!r}") from None
            md5 = hashlib.md5(usedforsecurity=False)
            crc: int | None = 0 if self.signs_checksums else None
            try:
                offset = (grant.part_number - 1) * part_size
                for block in _body_blocks(body, grant.content_length):
                    md5.update(block)
                    if crc is not None:
                        crc = _checksum.crc64nvme(block, crc)
                    while block:
                        written = os.pwrite(fd, block, offset)
                        block = block[written:]
                        offset += written
                if self._sync_parts:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if grant.checksum is not None and _checksum.decode(grant.checksum) != crc:
                raise BadDigest(_BAD_DIGEST)  # its record is gone: the part is not held
            encoded = None if crc is None else _checksum.encode(crc)
            text = f"{md5.hexdigest()} {grant.content_length}"
            with self._upload_lock(grant.upload_id):
                self._open_upload(grant.upload_id, grant.key)  # not aborted meanwhile
                _write_small(
                    self.staging_dir, record, text if encoded is None else f"{text} {encoded}"
                )
        return ObjectInfo(grant.content_length, f'"{md5.hexdigest()}"', encoded)

    def _part_size(self, folder: Path) -> int:
        try:
            return int((folder / _PART_SIZE_FILE).read_text(encoding="ascii"))
        except (OSError, ValueError):
            raise NoSuchUpload(f"multipart upload in {folder.name} has no part size") from None

    def _part_info(self, folder: Path, part_number: int) -> StoredPart | None:
        """Part ``part_number`` as held (it has a record), or None.

        Its checksum is the CRC64NVME computed as it arrived (None in a record written
        without awscrt, or by an older version).
        """
        try:
            md5_hex, size, *crc = (
                (folder / f"{part_number}.md5").read_text(encoding="ascii").split()
            )
            checksum = crc[0] if len(crc) == 1 and _checksum.decode(crc[0]) is not None else None
            return StoredPart(part_number, f'"{md5_hex}"', int(size), checksum)
        except (OSError, ValueError):
            return None

    def list_parts(
        self, key: str, upload_id: str, *, part_number_marker: int = 0, max_parts: int = 1000
    ) -> PartsPage:
        """The parts this upload holds above ``part_number_marker``, ascending.

        Raises:
            NoSuchUpload: No such upload for this key.
        """
        with self._upload_lock(upload_id):
            folder, _ = self._open_upload(upload_id, key)
            numbers = sorted(
                int(stem)
                for stem, _, suffix in (name.partition(".") for name in os.listdir(folder))
                if suffix == "md5" and stem.isdigit() and str(int(stem)) == stem
            )
            wanted = [number for number in numbers if number > part_number_marker]
            # Read the records of this page only (and learn whether another follows).
            held = [self._part_info(folder, number) for number in wanted[: max_parts + 1]]
            parts = [part for part in held if part is not None]
            if not _declares_checksum(folder):
                # As S3: an upload without a checksum algorithm lists none.
                parts = [dataclasses.replace(part, checksum=None) for part in parts]
            return page_parts(parts, 0, max_parts)

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[StoredPart],
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Copy ``parts`` in order into the object, publish it atomically, drop the upload.

        Each part must still be held with the ETag and size given; the check and the
        copy run under the upload's lock, so a part re-sent meanwhile cannot slip in.
        The object's CRC64NVME is combined from its parts' (when awscrt is installed).

        Args:
            checksum: The whole object's CRC64NVME: the parts must add up to it.
            if_none_match: Publish only if no object is at the key (checked with the
                rename, under the tree lock).

        Raises:
            NoSuchUpload: No such upload for this key, or it was assembled already (a
                crash came after publishing and before the folder was removed).
            InvalidPart: A part is missing or differs from the one given.
            BadDigest: The parts do not add up to ``checksum``; nothing is published and
                the upload stays.
            ObjectExists: ``if_none_match`` and an object is at the key; nothing is
                published and the upload stays.
            UploadRejected: 400 ``InvalidArgument`` when the file system cannot hold the
                key.
        """
        # Part locks first, as receive_part takes them: no part is being written while
        # the data file is checked and published.
        part_names = [f"{upload_id}/{part.part_number}" for part in parts]
        with self._part_lock.hold(part_names), self._upload_lock(upload_id):
            folder, _ = self._open_upload(upload_id, key)
            held_parts = []
            for wanted in parts:
                held = self._part_info(folder, wanted.part_number)
                if held is None:
                    raise InvalidPart(f"part {wanted.part_number} was not uploaded")
                if (bare_etag(held.etag), held.size_bytes) != (
                    bare_etag(wanted.etag),
                    wanted.size_bytes,
                ):
                    raise InvalidPart(f"part {wanted.part_number} changed since it was listed")
                held_parts.append(held)
            part_size = self._part_size(folder)
            whole_crc = self._combined_crc(folder / _DATA_FILE, part_size, held_parts)
            if checksum is not None and (
                whole_crc is None or _checksum.decode(checksum) != whole_crc
            ):
                raise BadDigest(
                    "The parts do not add up to the CRC64NVME given for the whole object"
                    if whole_crc is not None
                    else "This store cannot compute CRC64NVME to check the whole object's"
                )
            whole = None if whole_crc is None else _checksum.encode(whole_crc)
            if if_none_match and self._holds_object(key):
                # Before the data file is cut to size: the upload stays as it was.
                raise ObjectExists(f"an object is already stored at '{key}'")
            total = sum(part.size_bytes for part in parts)
            in_place = all(
                part.part_number == index + 1
                and (part.size_bytes == part_size or index == len(parts) - 1)
                for index, part in enumerate(parts)
            )
            etag = multipart_etag([bare_etag(part.etag) for part in parts])
            data = folder / _DATA_FILE
            if in_place:
                # Parts 1..N already sit end to end: cut off anything past the last one.
                # Opened without O_CREAT: once published, the data file is gone, and a
                # new empty one would be padded out to the object's size with zeros.
                try:
                    fd = os.open(data, os.O_WRONLY)
                except FileNotFoundError:
                    raise NoSuchUpload(f"multipart upload {upload_id!r} is completed") from None
                try:
                    os.ftruncate(fd, total)
                    os.fsync(fd)
                    info = self._publish(
                        key, os.fstat(fd), data, etag, whole, if_none_match=if_none_match
                    )
                except BaseException:
                    # Not published: the parts past the last one lost their bytes to the
                    # truncation, so they must not stay listed.
                    _forget_parts_after(folder, len(parts))
                    raise
                finally:
                    os.close(fd)
            else:
                info = self._assemble_copy(
                    key, data, part_size, parts, etag, whole, if_none_match=if_none_match
                )
            _drop_upload(folder)
        return info

    def _combined_crc(self, data: Path, part_size: int, parts: Sequence[StoredPart]) -> int | None:
        """The CRC64NVME of ``parts`` end to end, combined from each part's own.

        A part recorded without its CRC (by an older version) is read from ``data``.
        None without awscrt, or if such a part's bytes are short.
        """
        if not self.signs_checksums:
            return None
        pieces: list[tuple[int, int]] = []
        with open(data, "rb", buffering=0) as source:

            def read_into(offset: int, view: memoryview) -> int:
                return os.preadv(source.fileno(), [view], offset)

            for part in parts:
                crc = None if part.checksum is None else _checksum.decode(part.checksum)
                if crc is None:
                    crc = _checksum.crc_of_range(
                        read_into,
                        (part.part_number - 1) * part_size,
                        part.size_bytes,
                    )
                    if crc is None:
                        return None
                pieces.append((crc, part.size_bytes))
        return _checksum.combine_all(pieces)

    def _holds_object(self, key: str) -> bool:
        """Whether a file is stored at ``key`` (a folder of that name is no object)."""
        try:
            return stat_module.S_ISREG(os.stat(self._path(key)).st_mode)
        except OSError as exc:
            if _means_absent(exc):
                return False
            raise

    def _assemble_copy(
        self,
        key: str,
        data: Path,
        part_size: int,
        parts: Sequence[StoredPart],
        etag: str,
        checksum: str | None,
        *,
        if_none_match: bool,
    ) -> ObjectInfo:
        """Copy non-consecutive parts out of the data file into the object, in order."""
        fd, temp_name = _mkstemp(self.staging_dir)
        temp_path = Path(temp_name)
        try:
            with open(fd, "wb", buffering=0) as out, open(data, "rb", buffering=0) as source:
                for wanted in parts:
                    source.seek((wanted.part_number - 1) * part_size)
                    copied = _copy_range(source.fileno(), out.fileno(), wanted.size_bytes)
                    if copied != wanted.size_bytes:
                        raise InvalidPart(f"part {wanted.part_number} is shorter than listed")
                os.fsync(out.fileno())
                return self._publish(
                    key,
                    os.fstat(out.fileno()),
                    temp_path,
                    etag,
                    checksum,
                    if_none_match=if_none_match,
                )
        except BaseException:
            with contextlib.suppress(OSError):
                temp_path.unlink()
            raise

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Remove the upload and its parts; an unknown upload (or another key's) is fine."""
        with self._upload_lock(upload_id):
            try:
                folder, _ = self._open_upload(upload_id, key)
            except NoSuchUpload:
                return
            _drop_upload(folder)

    def _publish(
        self,
        key: str,
        stat: os.stat_result,
        path: Path,
        etag: str,
        checksum: str | None,
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Rename the finished file ``path`` (``stat`` is its fstat) over the object at ``key``.

        With ``if_none_match``, an object already at the key is kept and nothing is
        published: the check is under the lock that orders every publish and delete,
        so it holds until the rename (of two conditional publishes, one wins).

        The meta goes first, tied to the file's own inode, size and mtime, which the
        rename keeps: a meta left by a crash before the rename describes no file at the
        key and is ignored, and once the file is at the key its meta is already there.
        Publishing and deleting are ordered (one lock), so that the meta at a key is that
        of the file at the key (two PUTs racing cannot leave one's meta beside the other's
        file, which would lose a multipart ETag: it cannot be recomputed from the bytes).

        Raises:
            UploadRejected: 400 when the file system cannot hold the key.
            ObjectExists: ``if_none_match`` and a file is at the key.
        """
        with self._tree_lock, _collisions_refused():
            if if_none_match and self._holds_object(key):
                raise ObjectExists(f"an object is already stored at '{key}'")
            self._write_meta(key, etag, stat, checksum)
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        return ObjectInfo(size_bytes=stat.st_size, etag=etag, checksum=checksum)

    def _write_meta(self, key: str, etag: str, stat: os.stat_result, checksum: str | None) -> None:
        """Remember the ETag and checksum of the file ``stat`` describes, atomically."""
        meta = self._meta_path(key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        _write_small(self.staging_dir, meta, _meta_text(etag, stat, checksum))

    def _read_meta(self, key: str, stat: os.stat_result) -> ObjectInfo | None:
        """The remembered ETag and checksum, if written for the very file ``stat`` describes."""
        try:
            etag, *tied = self._meta_path(key).read_text(encoding="ascii").split()
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        own = [str(stat.st_size), str(stat.st_mtime_ns), str(stat.st_ino)]
        checksum = None
        if len(tied) == 4 and _checksum.decode(tied[3]) is not None:
            checksum = tied.pop()
        # Older versions wrote no checksum, some no inode (and the meta after the rename).
        if tied not in (own, own[:2]):
            return None  # another file, or one changed behind our back: recompute
        return ObjectInfo(size_bytes=stat.st_size, etag=etag, checksum=checksum)

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of the stored file, or None."""
        opened = self.open(key)
        if opened is None:
            return None
        handle, info = opened
        handle.close()
        return info

    def check(self) -> None:
        """Fail at start-up if ``data_dir`` cannot take uploads.

        Raises:
            StorageError: A staging file cannot be created and removed there.
        """
        try:
            fd, name = _mkstemp(self.staging_dir)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StorageError(
                f"the local store cannot write under {self.data_dir}: {exc.strerror or exc}"
            ) from exc

    def open(self, key: str) -> tuple[BinaryIO, ObjectInfo] | None:
        """The stored file open for reading, with its size, ETag and checksum; None when absent.

        All describe the very file opened, even if the key is being replaced: the size
        is the open file's, and the meta counts only if it was written for that file
        (same inode, size and mtime). Otherwise the MD5 (and CRC64NVME, with awscrt)
        is computed from the open file, which is then rewound.
        """
        try:
            handle = open(self._path(key), "rb")  # noqa: SIM115 (the caller closes it)
        except OSError as exc:
            if _means_absent(exc):
                return None
            raise
        try:
            stat = os.fstat(handle.fileno())
            info = self._read_meta(key, stat)
            if info is None:
                md5_hex, crc = _digests_of(handle, crc=self.signs_checksums)
                checksum = None if crc is None else _checksum.encode(crc)
                info = ObjectInfo(stat.st_size, f'"{md5_hex}"', checksum)
                handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return handle, info

    def delete(self, key: str) -> None:
        """Remove the file and its meta, and the folders they leave empty.

        S3 has no folders: once ``a/b`` is deleted, ``a`` must be free to become an
        object. A missing file is fine.
        """
        with self._tree_lock:
            for root, path in (
                (self.objects_dir, self._path(key)),
                (self.meta_dir, self._meta_path(key)),
            ):
                try:
                    path.unlink()
                except OSError as exc:
                    if not _means_absent(exc):
                        raise
                _prune_empty_parents(root, path)


def _own_data_dir(data_dir: Path) -> int:
    """Lock ``data_dir/.lock`` for this store and write our pid in it; the open fd.

    Raises:
        StorageError: Another store holds the lock (its pid is in the message), or the
            lock file cannot be opened.
    """
    path = data_dir / _LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StorageError(
                f"data dir {data_dir} is in use by another ctrlupload server (pid {holder})"
            ) from None
        raise StorageError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _signing_key(path: Path) -> bytes:
    """The key kept at ``path``, made first if there is none; the caller owns the dir.

    A new key is written whole to a private temporary file (O_EXCL, mode 0600) and
    linked into place, so ``path`` never holds part of a key, and a key that is there
    is never replaced.

    Raises:
        StorageError: The key cannot be read or made, or holds too few bytes.
    """
    try:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = _make_signing_key(path)
    except OSError as exc:
        raise StorageError(f"cannot read or make {path}: {exc.strerror or exc}") from exc
    if len(key) < SIGNING_KEY_BYTES:
        raise StorageError(
            f"{path} holds {len(key)} bytes, not {SIGNING_KEY_BYTES}: remove it to make a "
            "new one (URLs signed with it stop working)"
        )
    return key


def _make_signing_key(path: Path) -> bytes:
    key = secrets.token_bytes(SIGNING_KEY_BYTES)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            return path.read_bytes()
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return key


def _body_blocks(body: BinaryIO, length: int) -> Iterator[memoryview]:
    """Exactly ``length`` bytes of ``body``, a block of up to 1 MiB at a time.

    A body that can ``readinto`` fills one buffer again and again (no allocation per
    block); each block is valid until the next is asked for.

    Raises:
        IncompleteBody: The body ended early.
    """
    buffer = memoryview(bytearray(min(length, RECEIVE_BLOCK_BYTES)))
    readinto = getattr(body, "readinto", None)
    remaining = length
    while remaining:
        want = min(remaining, RECEIVE_BLOCK_BYTES)
        if readinto is not None:
            got = readinto(buffer[:want]) or 0
            block = buffer[:got]
        else:
            block = memoryview(body.read(want))
            got = len(block)
        if not got:
            raise IncompleteBody(f"body ended {remaining} bytes short of {length}")
        yield block
        remaining -= got


def _expiry(expires: str | None, signature: str | None) -> int:
    """The URL's expiry in Unix seconds; 403 when it or the signature is missing."""
    if not expires or not signature:
        raise UploadRejected(403, "AccessDenied", "Query-string authentication required")
    try:
        return int(expires)
    except ValueError:
        raise UploadRejected(403, "AccessDenied", "Invalid expiry") from None


def _write_small(staging: Path, path: Path, text: str) -> None:
    """Replace a small text file atomically."""
    fd, temp_name = _mkstemp(staging)
    try:
        with open(fd, "w", encoding="ascii") as handle:
            handle.write(text)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


@contextlib.contextmanager
def _collisions_refused() -> Iterator[None]:
    """400 for a key the file system cannot hold as a path under ``objects/`` or ``meta/``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
            raise UploadRejected(
                400,
                "InvalidArgument",
                "the local store cannot hold this key (a segment is too long, or "
                "it collides with an object or folder of the same name)",
            ) from exc
        raise


def _meta_text(etag: str, stat: os.stat_result, checksum: str | None) -> str:
    text = f"{etag} {stat.st_size} {stat.st_mtime_ns} {stat.st_ino}"
    return text if checksum is None else f"{text} {checksum}"


def _declares_checksum(folder: Path) -> bool:
    """Whether the upload in ``folder`` was declared with a CRC64NVME."""
    try:
        return (folder / _CHECKSUM_FILE).read_text(encoding="ascii") == _DECLARED_CHECKSUM
    except (OSError, UnicodeDecodeError):
        return False


def _check_verifiable(checksum: str | None) -> None:
    """400 for a signed checksum this process cannot check (awscrt went missing)."""
    if checksum is not None and not _checksum.available():
        raise UploadRejected(
            400,
            "InvalidRequest",
            f"this store cannot verify x-amz-checksum-crc64nvme ({_checksum.INSTALL_HINT})",
        )


def _forget_parts_after(folder: Path, last: int) -> None:
    """Remove the records of the parts numbered above ``last``."""
    for name in os.listdir(folder):
        stem, _, suffix = name.partition(".")
        if suffix == "md5" and stem.isdigit() and int(stem) > last:
            with contextlib.suppress(OSError):
                (folder / name).unlink()


def _drop_upload(folder: Path) -> None:
    """Remove an upload's folder, its key first: a half-removed folder is no upload."""
    with contextlib.suppress(FileNotFoundError):
        (folder / _KEY_FILE).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _copy_range(source_fd: int, target_fd: int, length: int) -> int:
    """Append up to ``length`` bytes of ``source_fd`` to ``target_fd``; bytes copied.

    The kernel copies when it can (``copy_file_range``: no trip through user space, a
    reflink on some file systems), else blocks of 1 MiB go through memory. Never more
    than one block is held.
    """
    kernel_copy = getattr(os, "copy_file_range", None)
    copied = 0
    while copied < length:
        want = min(length - copied, COPY_BLOCK_BYTES)
        if kernel_copy is not None:
            try:
                moved = int(kernel_copy(source_fd, target_fd, want))
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel_copy = None
                continue
        else:
            block = os.read(source_fd, min(want, RECEIVE_BLOCK_BYTES))
            moved = len(block)
            view = memoryview(block)
            while view:
                view = view[os.write(target_fd, view) :]
        if moved == 0:
            break
        copied += moved
    return copied


def _prune_empty_parents(root: Path, path: Path) -> None:
    """Remove the folders above ``path`` that are empty, up to (not including) ``root``."""
    folder = path.parent
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or already gone): nothing above it is empty either
        folder = folder.parent


def _digests_of(handle: BinaryIO, *, crc: bool) -> tuple[str, int | None]:
    """The MD5 of the rest of ``handle``, and its CRC64NVME when ``crc``, in one read."""
    md5 = hashlib.md5(usedforsecurity=False)
    value: int | None = 0 if crc else None
    while block := handle.read(RECEIVE_BLOCK_BYTES):
        md5.update(block)
        if value is not None:
            value = _checksum.crc64nvme(block, value)
    return md5.hexdigest(), value


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
