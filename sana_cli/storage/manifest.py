"""The batch manifest (results.jsonl), claims and resume: which planned images are already done,
who renders which, and how per-process manifests are merged. No torch.

Several processes (on one host, or on hosts sharing a file system) may run on one output directory.
The rules that keep every record:
  * a manifest is only ever appended to, never rewritten or renamed over: each append takes an
    exclusive lock on the file (flock, which Linux maps to POSIX locks on NFS), starts on a fresh
    line if a killed writer left a torn one, writes the whole record and fsyncs it; readers skip
    lines that do not parse, so a torn line costs at most that one record (and the image itself
    is adopted from its embedded key on the next run);
  * sana-cli only touches files it made: its manifests have fixed names (results.jsonl,
    results.shard-I-of-N.jsonl, results[.shard-I-of-N].rank-P-of-Q.jsonl), are regular files
    (never followed through a symbolic link) and hold sana-cli records; anything else named like
    a manifest is refused, never repaired;
  * who renders which image is decided by claim files (`.<image>.sana-claim`, created with
    O_EXCL, removed once the image and its record are written); a claim whose process is gone is
    taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path

from ..errors import GenerationError, UsageError
from .files import STALE_SECONDS, _host, _writer_gone, sha256_file
from .media import read_metadata

MANIFEST = "results.jsonl"
_MANIFEST_NAME = re.compile(r"results(\.shard-\d+-of-\d+)?(\.rank-\d+-of-\d+)?\.jsonl\Z")
CLAIM_SUFFIX = ".sana-claim"


def manifest_name(shard: tuple[int, int] | None = None, rank: tuple[int, int] | None = None) -> str:
    """results.jsonl, or a per-shard / per-process file that never shares appends with another writer."""
    name = "results"
    if shard is not None:
        name += f".shard-{shard[0]}-of-{shard[1]}"
    if rank is not None:
        name += f".rank-{rank[0]}-of-{rank[1]}"
    return name + ".jsonl"


def is_manifest_name(name: str) -> bool:
    """Whether a file name is one sana-cli gives its manifests (results-notes.jsonl is not)."""
    return _MANIFEST_NAME.match(name) is not None


def _is_record(value) -> bool:
    return isinstance(value, dict) and value.get("event") in ("image", "error") and "key" in value and "file" in value


def _parse_lines(data: bytes) -> tuple[list[dict], bool]:
    """The records in a manifest's bytes, and whether the bytes are a sana-cli manifest at all:
    every line that parses is a sana-cli record, and there is at least one (or the only content
    is the torn start of the first record)."""
    records, foreign = [], False
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a torn line from a killed writer
        if _is_record(value):
            records.append(value)
        else:
            foreign = True
    ours = not foreign and (bool(records) or not data.strip() or
                            (b"\n" not in data.rstrip(b"\n") and data.lstrip().startswith(b'{"')))
    return records, ours


def _open_regular(path: Path, flags: int) -> int:
    """Open a manifest without following a symbolic link or blocking on a FIFO; only regular files."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file; sana-cli keeps its manifest there",
                         hint="move it away or use another --output-dir")
    return fd


def _read_fd(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def check_manifest(path: str | Path) -> None:
    """Refuse (exit 2, touching nothing) a manifest path that is a link, a directory, something
    other than a regular file, or a file sana-cli did not write."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # a new manifest (the directory is checked when it is created)
    hint = "move it away or use another --output-dir"
    if stat.S_ISLNK(mode):
        raise UsageError(f"{path} is a symbolic link; sana-cli writes its manifest only as a regular file in the "
                         "output directory and never follows a link", hint=hint)
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path} is a directory, not a sana-cli manifest", hint=hint)
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file, not a sana-cli manifest", hint=hint)
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except PermissionError as exc:
        raise UsageError(f"{path}: permission denied", hint=hint) from exc
    try:
        data = _read_fd(fd)
    finally:
        os.close(fd)
    if not _parse_lines(data)[1]:
        raise UsageError(f"{path} was not written by sana-cli (it holds lines that are not sana-cli records); "
                         "sana-cli never changes files it did not make", hint=hint)


@contextlib.contextmanager
def _locked(fd: int):
    """An exclusive lock on an open file, shared with every process that appends to it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        locked = True
    except OSError as exc:  # a file system without locks: appends of whole lines still land whole
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
        locked = False
    try:
        yield
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)


class Manifest:
    """One JSON object per line, appended under a lock, flushed and fsynced as each image is written
    or fails. A kill at any moment loses at most the line being written; the file is never rewritten."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_manifest(self.path)
        try:
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise GenerationError(f"cannot open the manifest {self.path}: {exc.strerror or exc}") from exc
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        self.append_bytes((json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))

    def append_bytes(self, data: bytes) -> None:
        """Append whole lines; a torn line left by a killed writer is closed first."""
        if not data:
            return
        with self._lock, _locked(self._fd):
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _read_manifest(path: Path) -> tuple[list[dict], bool]:
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except (OSError, UsageError):
        return [], False  # a link, a directory, unreadable: not ours to read
    try:
        return _parse_lines(_read_fd(fd))
    finally:
        os.close(fd)


def read_manifests(directory: str | Path) -> list[dict]:
    """Every record of every sana-cli manifest in the directory (all processes', in name order).
    Files that are links, not regular, or not written by sana-cli are skipped, never changed."""
    try:
        names = sorted(name for name in os.listdir(directory) if is_manifest_name(name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    records = []
    for name in names:
        found, ours = _read_manifest(Path(directory) / name)
        if ours:
            records.extend(found)
    return records


def merge_manifests(directory: str | Path, parts: list[str], target: str = MANIFEST) -> Path:
    """Append the records of per-process manifests to the target (never rewriting it), then delete
    the parts. A kill between the two leaves a record twice, which readers take as one."""
    directory = Path(directory)
    manifest = Manifest(directory / target)
    try:
        for name in parts:
            part = directory / name
            records, ours = _read_manifest(part)
            if not ours:
                continue
            try:
                manifest.append_bytes(b"".join((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode()
                                               for r in records))
            except OSError as exc:  # the part stays, so a rerun still reads its records
                raise GenerationError(f"cannot merge {part} into {manifest.path}: {exc.strerror or exc}",
                                      hint="free some space and rerun the same command") from exc
            try:
                part.unlink()
            except FileNotFoundError:
                pass
    finally:
        manifest.close()
    return directory / target


# ---- claims: who renders which image ---------------------------------------------------------------

def claim_path_for(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{CLAIM_SUFFIX}")


def _owner() -> str:
    return f"{_host()} {os.getpid()}"


def _claim_is_stale(content: str, age_seconds: float) -> bool:
    parts = content.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return age_seconds > STALE_SECONDS  # still being written, or not ours to judge yet
    host, pid = parts[0], int(parts[1])
    if host == _host() and pid == os.getpid():
        return False
    # A live process never holds a claim longer than STALE_SECONDS: past that its pid was reused.
    return _writer_gone(host, pid, age_seconds, alive_limit=STALE_SECONDS)


class Claims:
    """The images this process has claimed. A claim is an O_EXCL file beside the image; whoever
    creates it renders the image, and removes it once the image and its record are written."""

    def __init__(self) -> None:
        self._held: set[Path] = set()
        self._lock = threading.Lock()

    def take(self, image: str | Path) -> bool:
        """Claim an image; False when another live process holds it."""
        claim = claim_path_for(image)
        for _ in range(3):
            try:
                fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                if not stat.S_ISREG(_lstat_mode(claim)):
                    raise UsageError(f"{claim} is in the way: it is not a sana-cli claim file",
                                     hint="remove it, or use another --output-dir") from None
                if not _take_over_stale(claim):
                    return False
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a symbolic link in the claim's place
                    raise UsageError(f"{claim} is in the way: it is not a sana-cli claim file",
                                     hint="remove it, or use another --output-dir") from None
                raise
            try:
                os.write(fd, f"{_owner()} {secrets.token_hex(4)}\n".encode())
            finally:
                os.close(fd)
            with self._lock:
                self._held.add(claim)
            return True
        return False

    def release(self, image: str | Path) -> None:
        claim = claim_path_for(image)
        with self._lock:
            if claim not in self._held:
                return
            self._held.discard(claim)
        try:
            os.unlink(claim)
        except FileNotFoundError:
            pass

    def release_all(self) -> None:
        with self._lock:
            held, self._held = list(self._held), set()
        for claim in held:
            try:
                os.unlink(claim)
            except FileNotFoundError:
                pass


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return stat.S_IFREG  # gone meanwhile: try again


def _claim_content(claim: Path) -> tuple[str, float] | None:
    try:
        fd = os.open(claim, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, OSError):
        return None
    try:
        info = os.fstat(fd)
        return os.read(fd, 256).decode("utf-8", "replace"), time.time() - info.st_mtime
    finally:
        os.close(fd)


def _take_over_stale(claim: Path) -> bool:
    """Remove a claim whose process is gone. Moved aside first and checked again, so a claim that a
    live process created in the meantime is put back rather than removed."""
    found = _claim_content(claim)
    if found is None:
        return True  # it went away: try again
    content, age = found
    if not _claim_is_stale(content, age):
        return False
    aside = claim.with_name(claim.name + f".stale-{secrets.token_hex(4)}")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:
        return True
    moved = _claim_content(aside)
    if moved is not None and moved[0] != content:  # not the one we judged: give it back
        try:
            os.link(aside, claim)
        except OSError:
            pass
        os.unlink(aside)
        return False
    try:
        os.unlink(aside)
    except FileNotFoundError:
        pass
    return True


def remove_stale_claims(directory: str | Path) -> int:
    """Delete the claims of processes that are gone (left by kill -9)."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(CLAIM_SUFFIX) and entry.is_file(follow_symlinks=False):
            found = _claim_content(Path(entry.path))
            if found is not None and _claim_is_stale(*found) and _take_over_stale(Path(entry.path)):
                removed += 1
    return removed


def existing_outputs(jobs, output_dir: str | Path, records: list[dict], overwrite: bool):
    """Which planned images are already done. Returns (done positions, records to adopt, conflicts).

    Done: the file exists and matches its manifest record (same job key and sha256), or, when the
    manifest line was lost to a kill between rename and append, the file's own embedded job key
    matches (it is then adopted into the manifest). A file made with other settings is a conflict,
    unless overwrite, which redoes everything."""
    latest = {r.get("file"): r for r in records if r.get("event") == "image"}
    done: set[int] = set()
    adopt: list[dict] = []
    conflicts: list[str] = []
    if overwrite:
        return done, adopt, conflicts
    for position, job in enumerate(jobs):
        if not os.path.lexists(job.path):
            continue
        relative = os.path.relpath(job.path, output_dir)
        record = latest.get(relative)
        digest = sha256_file(job.path) if os.path.isfile(job.path) else None
        if record is not None and record.get("key") == job.key and record.get("sha256") == digest:
            done.add(position)
            continue
        try:
            embedded = read_metadata(job.path)["sana"] or {}
        except UsageError:
            embedded = {}
        if embedded.get("key") == job.key and digest is not None:
            done.add(position)
            made_with = {k: embedded.get(k) for k in ("model", "model_id", "revision", "commit", "pipeline", "dtype",
                                                      "device", "decode")}
            # pixel_options as the file records them (the key matched their normalised form only)
            adopt.append({**made_with, "event": "image", **job.record(str(output_dir)),
                          "pixel_options": embedded.get("pixel_options"), "sha256": digest,
                          "bytes": os.path.getsize(job.path), "adopted": True})
            continue
        conflicts.append(job.path)
    return done, adopt, conflicts
