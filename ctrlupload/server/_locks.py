"""Striped locks: one lock per name without a lock per name ever created."""

from __future__ import annotations

import hashlib
import threading
from typing import Final

DEFAULT_STRIPES: Final = 64


class StripedLocks:
    """A fixed set of locks, picked by hashing a name.

    Two names may share a lock, which only costs them some waiting; the set never
    grows, however many multipart uploads come and go.

    Args:
        stripes: How many locks there are.
    """

    def __init__(self, stripes: int = DEFAULT_STRIPES) -> None:
        if stripes < 1:
            raise ValueError("stripes must be at least 1")
        self._locks = tuple(threading.Lock() for _ in range(stripes))

    def __call__(self, name: str) -> threading.Lock:
        """The lock that guards ``name``."""
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return self._locks[int.from_bytes(digest, "big") % len(self._locks)]
