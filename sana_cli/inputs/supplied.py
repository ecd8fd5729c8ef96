"""Input files given as bytes instead of opened at their path: how `sana serve` plans and renders the input
images and LoRAs of an attached CLI or an HTTP upload. The client read them (it has the user's permissions)
and sent their bytes; the server checked that they hash to what the client's plan says and keeps a local
copy of each. The server never opens a path a client names.

Inside `supplying(files, names)` every reader of an input file (input images, LoRA weights) asks
`local(path, digest)` for the file to open: the local copy of the bytes with that sha256 (or, without a
digest, of the one file that path was sent as), and for anything else a usage error, never the path
itself. Outside it (an in-process run) `local` is the path. The context is per thread (a contextvar):
one server request's files are never seen by another's planning.

Torch-free; imports only the shared errors module.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

from ..errors import UsageError


@dataclass(frozen=True)
class Supplied:
    files: dict  # sha256 -> the local copy of those bytes
    names: dict = field(default_factory=dict)  # a path as the client wrote it -> the sha256s it was sent as


_CURRENT: contextvars.ContextVar[Supplied | None] = contextvars.ContextVar("sana_supplied_files", default=None)


@contextlib.contextmanager
def supplying(files: dict, names: dict | None = None):
    """Readers of input files inside the block read these copies, and nothing else."""
    token = _CURRENT.set(Supplied(dict(files), {name: set(digests) for name, digests in (names or {}).items()}))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def active() -> bool:
    return _CURRENT.get() is not None


def local(path: str, digest: str | None = None, what: str = "an input file") -> str:
    """The file a reader opens for `path` (whose bytes hash to `digest`, when known)."""
    current = _CURRENT.get()
    if current is None:
        return path
    if digest is None:
        digests = current.names.get(path, set())
        digest = next(iter(digests)) if len(digests) == 1 else None
    found = current.files.get(digest) if digest is not None else None
    if found is None:
        raise UsageError(f"{what} {path} was not sent with the request (a server never opens a client's path)")
    return found
