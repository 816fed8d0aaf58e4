"""Striped locks: one lock per name without a lock per name ever created."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterable, Iterator
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

    def _index(self, name: str) -> int:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return int.from_bytes(digest, "big") % len(self._locks)

    def __call__(self, name: str) -> threading.Lock:
        """The lock that guards ``name``."""
        return self._locks[self._index(name)]

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        """Hold the locks of all ``names`` at once, taken in one fixed order."""
        chosen = sorted({self._index(name) for name in names})
        with contextlib.ExitStack() as stack:
            for index in chosen:
                stack.enter_context(self._locks[index])
            yield
