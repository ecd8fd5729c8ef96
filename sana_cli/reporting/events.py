"""What a run tells whoever watches it, as typed events: the progress display on stderr, tests, and
any other consumer (a progress stream) dispatch on the event's type. Torch-free.

An EventSink is any callable taking one event. The runner never lets a sink's exception fail an image.
Order in a run: Planned (batch only), Loading (unless the model is already loaded), then per GPU batch
BatchStarted, Step per denoising step, and ImageWritten or ImageFailed per image; Warned and Noted at
any point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from ..models.modelref import ModelRef
    from ..planning.plan import ImageJob
    from .results import ImageResult


@dataclass(frozen=True)
class Planned:
    """A batch run knows its work: `todo` images to make, `done` already made by an earlier run."""

    todo: int
    done: int


@dataclass(frozen=True)
class Loading:
    """The model is about to load (it may download, compile or take minutes)."""

    model: ModelRef


@dataclass(frozen=True)
class Warned:
    """Something the user should know that does not stop the run (also in the run's `warnings`)."""

    message: str


@dataclass(frozen=True)
class Noted:
    """A plain status line (for example: waiting for another process)."""

    message: str


@dataclass(frozen=True)
class BatchStarted:
    """GPU batch `number` of `total` (1-based) starts on these jobs."""

    number: int
    total: int
    jobs: tuple[ImageJob, ...]


@dataclass(frozen=True)
class Step:
    """Denoising step `step` of `total` (1-based) of the current GPU batch is done."""

    step: int
    total: int


@dataclass(frozen=True)
class ImageWritten:
    """An image is on disk (result.written) and recorded."""

    result: ImageResult


@dataclass(frozen=True)
class ImageFailed:
    """An image failed for good (result.error); the run goes on unless it fails fast."""

    result: ImageResult


@dataclass(frozen=True)
class Preview:
    """A small approximate image of a job mid-denoise (asked for by RunOptions.previews): the latents after
    `step`, averaged down and decoded by the model's VAE. A PIL image; never written to disk."""

    job: ImageJob
    step: int
    total: int
    image: object


Event = Union[Planned, Loading, Warned, Noted, BatchStarted, Step, Preview, ImageWritten, ImageFailed]
EventSink = Callable[[Event], None]


def no_events(event: Event) -> None:
    """The default event sink: ignore everything."""
