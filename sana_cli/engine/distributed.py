"""Several processes on one batch through Hugging Face accelerate's process state.

`accelerate launch --multi_gpu --num_processes N -m sana_cli batch ...` or `torchrun --nproc_per_node N
-m sana_cli batch ...` start N copies; each takes every N-th GPU batch (combined with --shard, the
slices nest), writes its own images and its own manifest, and the main process folds the manifests
into results.jsonl at the end. Without CUDA the state is created with PartialState(cpu=True), which
is what lets the multi-process launch work on a CPU-only machine (gloo backend).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

# How often the main process looks for the other processes' completion files.
POLL_SECONDS = 0.2


@dataclass
class Processes:
    index: int
    count: int
    device: str  # "cuda:N" or "cpu"
    state: object = None  # accelerate PartialState
    token: str = ""  # names this launch's completion files (the same in every process)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def done_path(self, directory: str, index: int) -> Path:
        return Path(directory) / f".sana-done-{self.token}-{index}-of-{self.count}.json"

    def finish(self, directory: str, error: str | None = None) -> None:
        """Say that this process is done (with its error, if it failed), by a file in the output directory.

        Completion goes through files rather than a collective barrier: a process that finishes hours
        before the others (no rows, all done on resume) would hit the collective's timeout, and one that
        fails before the barrier would leave the others waiting on it."""
        from ..storage.files import atomic_write_bytes

        data = json.dumps({"index": self.index, "ok": error is None, "error": error}).encode()
        try:
            atomic_write_bytes(self.done_path(directory, self.index), data, overwrite=True)
        except OSError:
            pass  # an unwritable directory already failed this process; the main one then waits on a launcher

    def wait_for_ranks(self, directory: str, poll: float = POLL_SECONDS) -> list[tuple[int, str]]:
        """On the main process: wait until every process has finished; (index, error) of those that failed.
        The completion files are removed afterwards."""
        failures = []
        for index in range(self.count):
            path = self.done_path(directory, index)
            while not path.exists():
                time.sleep(poll)
            status = json.loads(path.read_text())
            if not status.get("ok"):
                failures.append((index, status.get("error") or "failed"))
        for index in range(self.count):
            self.done_path(directory, index).unlink(missing_ok=True)
        return failures


_launched: list = []


def launched_processes() -> Processes | None:
    """The process group when launched with more than one process, else None (one per process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not _launched:
        import torch
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        state = PartialState(cpu=not torch.cuda.is_available())
        # The only collective: at start, while every process is here, agree on a name for this launch.
        token = broadcast_object_list([secrets.token_hex(8) if state.process_index == 0 else None])[0]
        _launched.append(Processes(index=state.process_index, count=state.num_processes,
                                   device=str(state.device), state=state, token=token))
    return _launched[0]


def reports_completion(function):
    """Wrap a batch run so that a process that fails still writes its completion file (with the error)
    before the error propagates, and the main process never waits on it forever."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException as exc:
            processes = _launched[0] if _launched else None
            if processes is not None:
                line = exc.line() if hasattr(exc, "line") else f"{type(exc).__name__}: {exc}"
                processes.finish(kwargs.get("output_dir", "sana-out"), error=line or type(exc).__name__)
            raise

    return wrapper


def device_for(requested: str, processes: Processes | None) -> str:
    """The device a process runs on: under a multi-process launch, `auto` and a bare `cuda` mean this
    process's own GPU (cuda:LOCAL_RANK), never cuda:0 for every rank; an explicit cuda:N or cpu stays."""
    if processes is not None and requested in ("auto", "cuda"):
        return processes.device
    return requested


def combine(shard: tuple[int, int] | None, processes: Processes | None) -> tuple[int, int] | None:
    """Nest a --shard slice and the process slice: process p of P inside shard i of n takes
    slice i*P + p of n*P."""
    if processes is None:
        return shard
    index, count = shard or (0, 1)
    return index * processes.count + processes.index, count * processes.count
