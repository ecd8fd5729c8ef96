"""The input files `sana serve` was sent (an attached CLI's images and LoRAs, an HTTP upload), kept by the
sha256 of their bytes: one private file each in the server's scratch directory, which the renderer opens
instead of a client's path (inputs.supplied). A file is pinned while a request that sent it is alive; the
others form a small cache, least recently used evicted first beyond MAX_FILES files or MAX_BYTES bytes, so
a LoRA many requests use stays while it is in use and nothing grows without bound."""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

MAX_FILES = 32
MAX_BYTES = 1 << 30


class InputStore:
    def __init__(self, directory: Path, *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES):
        self.directory = Path(directory)
        self.max_files, self.max_bytes = max_files, max_bytes
        self._sizes: collections.OrderedDict[str, int] = collections.OrderedDict()  # sha256 -> bytes, LRU first
        self._pins: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def path(self, digest: str) -> str:
        return str(self.directory / digest)

    def keep(self, files: dict) -> dict:
        """Store {sha256: bytes} (checked by the caller), pinned: {sha256: local path}. Blocking."""
        if files:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        kept = {}
        for digest, data in files.items():
            with self._lock:
                self._pins[digest] += 1
                present = digest in self._sizes
            if not present:
                temporary = self.directory / f".{digest}.{threading.get_ident()}.tmp"
                with open(temporary, "wb", opener=lambda p, f: os.open(p, f | os.O_EXCL, 0o600)) as handle:
                    handle.write(data)
                os.replace(temporary, self.path(digest))
            with self._lock:
                self._sizes[digest] = len(data)
                self._sizes.move_to_end(digest)
            kept[digest] = self.path(digest)
        self._evict()
        return kept

    def release(self, digests) -> None:
        """The request that pinned these is over: they may be evicted now."""
        with self._lock:
            for digest in digests:
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]
        self._evict()

    def held(self) -> list[str]:
        with self._lock:
            return list(self._sizes)

    def _evict(self) -> None:
        with self._lock:  # unlinked under the lock: a keep() of the same bytes waits, then writes them again
            for digest in list(self._sizes):
                if len(self._sizes) <= self.max_files and sum(self._sizes.values()) <= self.max_bytes:
                    break
                if self._pins.get(digest):
                    continue
                del self._sizes[digest]
                try:
                    os.unlink(self.path(digest))
                except OSError:
                    pass
