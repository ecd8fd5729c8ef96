"""What a run reports, with no torch import, so the API and the CLI can use these types before
(or without) loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..planning.plan import ImageJob
from ..storage.media import Written


class StopToken:
    """Set from a signal handler; the runner checks it between steps and batches."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def request(self, signal_number: int) -> None:
        if self.signal_number is None:
            self.signal_number = signal_number

    @property
    def requested(self) -> bool:
        return self.signal_number is not None


@dataclass
class RunOptions:
    decode: str = "auto"
    abort_in_flight: bool = False  # generate: stop mid-denoise; batch: finish the current batch
    max_sequence_length: int = 300
    fail_fast: bool = False  # stop at the first failed image
    max_memory_bytes: int | None = None  # --max-memory: the budget `auto` decodes within
    keep_latents: bool = False  # keep NAME.latents.safetensors beside each image even when its decode works
    # job -> the denoising steps (1-based) after which to send a Preview event of it; None: no previews
    previews: Callable[[ImageJob, int], tuple] | None = None


@dataclass
class ImageResult:
    job: ImageJob
    written: Written | None = None
    decode: str | None = None
    fallbacks: tuple[str, ...] = ()
    seconds: float = 0.0  # this image's share of encode + denoise, plus its own decode
    error: str | None = None
    error_exit_code: int | None = None
    retried_alone: bool = False  # its GPU batch failed, so it was redone at batch size 1

    @property
    def ok(self) -> bool:
        return self.written is not None

    def to_dict(self) -> dict:
        data = self.job.summary()
        if self.ok:
            data.update(sha256=self.written.sha256, bytes=self.written.bytes, decode=self.decode,
                        seconds=round(self.seconds, 4))
            if self.fallbacks:
                data["decode_fallbacks"] = list(self.fallbacks)
            if self.retried_alone:
                data["retried_alone"] = True
        else:
            data["error"] = self.error
        return data


@dataclass
class RunOutcome:
    results: list[ImageResult] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    stopped_by: int | None = None  # signal number
    peak_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated: what tensors held
    peak_reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved: what the caching allocator held
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results if not r.ok]
