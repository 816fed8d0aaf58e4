"""The checksum pass: CRC64NVMEs of a source, computed before the bytes are signed.

A checksum that storage verifies must be signed into the URL, so it is known before
the PUT: a single PUT reads its source once for the CRC, then once to send it. A
multipart upload overlaps the two: :class:`PartChecksums` computes part N+1's CRC on a
helper thread while part N is sent, a bounded number of parts ahead, and the whole
object's CRC is combined from the parts' (no third read).

Reads go through :meth:`SourceReader.read_into` into one reused buffer (``preadv``
for a file on disk), never through a map of the file: a file that shrinks under a
map would kill the process with SIGBUS.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .. import _checksum
from .._errors import SourceFileError, UploadCancelled
from ..protocol import Part
from ._streams import SourceReader

__all__ = ["PartChecksums", "crc_of"]


def crc_of(
    source: SourceReader,
    offset: int,
    length: int,
    cancel: threading.Event | None = None,
    buffer: bytearray | None = None,
) -> int:
    """The CRC64NVME of ``length`` bytes of ``source`` at ``offset``.

    Raises:
        SourceFileError: The source could not be read, or ended early.
        UploadCancelled: ``cancel`` was set.
    """

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise UploadCancelled(source.key)

    value = _checksum.crc_of_range(
        source.read_into, offset, length, buffer=buffer, before_block=check_cancel
    )
    if value is None:
        raise SourceFileError(
            source.key,
            "Source file changed during upload: it ended early while its checksum was computed",
        )
    return value


class PartChecksums:
    """Each part's CRC64NVME, in part order, on a helper thread ahead of the senders.

    :meth:`get` waits for a part's value. The helper stays at most ``ahead`` parts
    past the highest part asked for, so a long file is not read far ahead of the
    network. Use it as a context manager: leaving stops the helper.

    Args:
        source: What is uploaded.
        parts: The parts to checksum, in the order they will be asked for.
        ahead: How many parts past the last one asked for may be computed.
        cancel: Stops the helper (and :meth:`get` raises) when set.
    """

    def __init__(
        self,
        source: SourceReader,
        parts: Sequence[Part],
        ahead: int,
        cancel: threading.Event | None = None,
    ) -> None:
        self._source = source
        self._parts = list(parts)
        self._index = {part.number: index for index, part in enumerate(self._parts)}
        self._ahead = max(1, ahead)
        self._cancel = cancel
        self._values: dict[int, int] = {}
        self._wanted = -1  # the highest index asked for
        self._error: BaseException | None = None
        self._stopped = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ctrlupload-crc", daemon=True)

    def __enter__(self) -> PartChecksums:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify_all()
        self._thread.join()

    def get(self, number: int) -> int:
        """Part ``number``'s CRC, once computed.

        Raises:
            SourceFileError: The source could not be read, or ended early.
            UploadCancelled: ``cancel`` was set.
        """
        index = self._index[number]
        with self._ready:
            self._wanted = max(self._wanted, index)
            self._ready.notify_all()
            while number not in self._values:
                if self._error is not None:
                    raise self._error
                if self._stopped:
                    raise UploadCancelled(self._source.key)
                self._ready.wait()
            return self._values[number]

    def encoded(self, number: int) -> str:
        """Part ``number``'s CRC as S3 spells it."""
        return _checksum.encode(self.get(number))

    def _run(self) -> None:
        largest = max((p.length for p in self._parts), default=1)
        buffer = bytearray(min(_checksum.READ_BLOCK_BYTES, largest))
        for index, part in enumerate(self._parts):
            with self._ready:
                while not self._stopped and index > self._wanted + self._ahead:
                    self._ready.wait()
                if self._stopped:
                    return
            try:
                value = crc_of(self._source, part.offset, part.length, self._cancel, buffer)
            except BaseException as error:  # noqa: BLE001 - handed to every get()
                with self._ready:
                    self._error = error
                    self._ready.notify_all()
                return
            with self._ready:
                self._values[part.number] = value
                self._ready.notify_all()
