"""Writing files so that nothing half-written can ever exist: temp file, flush, fsync, rename, and
sweeping the temp files and claims a killed run left. No torch, no PIL."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import GenerationError, UsageError

TEMP_MARK = ".sana-tmp-"
STALE_SECONDS = 3600  # a claim or temp file of another host older than this is abandoned


def _host() -> str:
    return "".join(ch for ch in socket.gethostname() if ch.isalnum() or ch == "-")[:32] or "host"


def temp_path_for(path: str | Path) -> Path:
    """A hidden sibling temp name (host and pid inside) that a later run recognises as ours."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _abandoned(name: str, age_seconds: float) -> bool:
    """A temp file is left over when its process on this host is gone, or (other hosts sharing the
    directory) when it is more than an hour old: a live writer renames it within seconds."""
    try:
        host, pid, _ = name.split(TEMP_MARK, 1)[1].rsplit("-", 2)
        pid = int(pid)
    except ValueError:
        return age_seconds > STALE_SECONDS
    return _writer_gone(host, pid, age_seconds)


def _writer_gone(host: str, pid: int, age_seconds: float, *, alive_limit: float | None = None) -> bool:
    """Whether the process that wrote a temp or claim file is gone: on this host, when its pid is
    dead (or, with alive_limit, the file is older than a live writer ever keeps one, so the pid was
    reused); on another host sharing the directory, when the file is over STALE_SECONDS old."""
    if host != _host():
        return age_seconds > STALE_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return alive_limit is not None and age_seconds > alive_limit


def remove_stray_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files that killed runs left behind (never those of a writer still running)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.is_file(follow_symlinks=False) and is_temp_file(entry.name)):
            continue
        try:
            if _abandoned(entry.name, now - entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def ensure_directory(directory: str | Path) -> Path:
    """Create the output directory (and parents); an impossible one is a usage error."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UsageError(f"cannot create output directory {directory}: a file is in the way") from exc
    except OSError as exc:
        raise UsageError(f"cannot create output directory {directory}: {exc.strerror or exc}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {directory} is not writable")
    return directory


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool) -> None:
    """Write data to path via temp file + fsync + rename. Without overwrite an existing path is
    never replaced (FileExistsError), even if it appeared while we were writing."""
    path = Path(path)
    temp = temp_path_for(path)
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            _rename_no_replace(temp, path)
        _fsync_directory(path.parent)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class Written:
    """A file written whole: its path, size and sha256."""

    path: str
    bytes: int
    sha256: str


def write_encoded(data: bytes, path: str | Path, *, overwrite: bool) -> Written:
    """Atomically write already encoded media (made here or by a `sana serve` server); an existing path
    without overwrite is a usage error, any other failure a run-time one."""
    try:
        atomic_write_bytes(path, data, overwrite=overwrite)
    except FileExistsError as exc:
        raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it") from exc
    except OSError as exc:
        raise GenerationError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return Written(str(path), len(data), hashlib.sha256(data).hexdigest())


def _rename_no_replace(temp: Path, path: Path) -> None:
    try:
        os.link(temp, path)  # fails if path exists: no check-then-rename race
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):  # file system without hard links
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from exc
        os.replace(temp, path)
        return
    os.unlink(temp)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
