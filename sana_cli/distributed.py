"""Several processes on one batch through Hugging Face accelerate's process state.

`accelerate launch --multi_gpu --num_processes N -m sana_cli batch ...` or `torchrun --nproc_per_node N
-m sana_cli batch ...` start N copies; each takes every N-th GPU batch (combined with --shard, the
slices nest), writes its own images and its own manifest, and the main process folds the manifests
into results.jsonl at the end. Without CUDA the state is created with PartialState(cpu=True), which
is what lets the multi-process launch work on a CPU-only machine (gloo backend).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Processes:
    index: int
    count: int
    device: str  # "cuda:N" or "cpu"
    state: object = None  # accelerate PartialState, for the final barrier

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def launched_processes() -> Processes | None:
    """The process group when launched with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(index=state.process_index, count=state.num_processes, device=str(state.device), state=state)


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
