"""A batch's output directory as one run uses it, step by step: what earlier runs finished (resume), the
directory opened (stray temp files and stale claims cleared, the manifest opened), which images this process
renders (claims), and the manifest lines it appends. The rules themselves are in `manifest`."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Callable

from ..errors import GenerationError, UsageError
from .files import ensure_directory, remove_stray_temp_files
from .manifest import Claims, Manifest, existing_outputs, read_manifests, remove_stale_claims


def resume(jobs, output_dir: str, overwrite: bool) -> tuple[set[int], list[dict]]:
    """(positions already done, manifest records to adopt) of a planned batch; a file in the way that this
    batch did not make with these settings is bad usage. Reads only: nothing on disk changes."""
    done, adopt, conflicts = existing_outputs(jobs, output_dir, read_manifests(output_dir), overwrite)
    if conflicts:
        raise UsageError(f"{len(conflicts)} file(s) in {output_dir} were not made by this batch with these "
                         f"settings (first: {conflicts[0]})",
                         hint="use --overwrite to replace them, or another --output-dir")
    return done, adopt


class BatchDirectory:
    """The output directory of a run that has passed every check: opening it is the first change on disk.
    Close it (claims released, manifest closed) however the run ends."""

    def __init__(self, output_dir: str, manifest_path: str, *, overwrite: bool, started_ns: int):
        ensure_directory(output_dir)
        self.removed_temp_files = remove_stray_temp_files(output_dir)
        remove_stale_claims(output_dir)
        self.manifest = Manifest(manifest_path)
        self.claims = Claims()
        self.output_dir, self.overwrite, self.started_ns = output_dir, overwrite, started_ns

    def adopt(self, records: list[dict]) -> None:
        """Records of images an earlier run wrote but did not record (a kill between rename and append)."""
        try:
            for record in records:
                self.manifest.append({**record, "time": now()})
        except OSError as exc:
            raise GenerationError(f"cannot write the manifest {self.manifest.path}: {exc.strerror or exc}") from exc

    def claim(self, jobs, wanted, made_meanwhile: Callable) -> tuple[list[bool], bool]:
        """Which wanted images this process renders; True when another live process holds some. An image
        another process finished since this run looked is released and passed to made_meanwhile."""
        mine, busy = [], False
        for job, want in zip(jobs, wanted):
            if not want:
                mine.append(False)
            elif not self.claims.take(job.path):
                mine.append(False)
                busy = True
            elif was_made_meanwhile(job, self.overwrite, self.started_ns):
                self.claims.release(job.path)
                made_meanwhile(job)
                mine.append(False)
            else:
                mine.append(True)
        return mine, busy

    def record(self, path: str, make: Callable[[], dict]) -> None:
        """An image's manifest line (made by `make`), appended as it is written or fails; its claim released
        either way."""
        try:
            self.manifest.append(make())
        except OSError as exc:
            raise GenerationError(f"cannot write the manifest {self.manifest.path}: {exc.strerror or exc}",
                                  hint="the images written so far are kept; free some space and rerun "
                                       "the same command to resume") from exc
        finally:
            self.claims.release(path)

    def close(self) -> None:
        self.claims.release_all()
        self.manifest.close()


def was_made_meanwhile(job, overwrite: bool, started_ns: int) -> bool:
    """Whether another process made this image (with this key) since this run looked: then it is
    done, not to be rendered again. With overwrite, only files newer than this run's start count."""
    from .media import read_metadata

    try:
        info = os.lstat(job.path)
    except FileNotFoundError:
        return False
    if overwrite and info.st_mtime_ns < started_ns:
        return False
    try:
        return ((read_metadata(job.path)["sana"] or {}).get("key")) == job.key
    except UsageError:
        return False


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
