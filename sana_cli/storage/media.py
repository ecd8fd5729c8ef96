"""From decoded frames to a file: the one entry point every writer goes through. PIL only, no torch.

The engine hands over Frames (one frame for an image, many for a video, with fps where it applies);
`encode` turns them into the bytes of the format asked for, metadata inside, and `write` writes those
atomically to a path whose suffix names the format. A format is two rows: its suffix in
planning.plan.IMAGE_SUFFIXES (checked at plan time, before anything loads) and its encoder in ENCODERS
here. A video format adds exactly that: an encoder taking (frames, format, metadata, quality) beside
`_still`, and its suffix row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..planning.checks import media_format
from .files import Written, write_encoded
from .images import encode_image
from .video import encode_video

__all__ = ["ENCODERS", "Frames", "Written", "encode", "format_for", "read_metadata", "write", "write_encoded",
           "write_frames"]


@dataclass(frozen=True)
class Frames:
    """What one job's decode made: its frames (PIL images, one size) in order; `kind` says what they
    are ("image": one frame; "video": many, shown at `fps`)."""

    frames: tuple
    kind: str = "image"
    fps: float | None = None

    @classmethod
    def still(cls, image) -> "Frames":
        return cls((image,))

    def __len__(self) -> int:
        return len(self.frames)

    def describe(self) -> str:
        count = len(self.frames)
        return f"{count} frame{'' if count == 1 else 's'}" + (f" (a {self.kind})" if self.kind != "image" else "")


def _still(frames: Frames, fmt: str, meta: dict, quality: int) -> bytes:
    """PNG, JPEG and WebP hold one picture: exactly one frame, or a one-line refusal (never frame 0 alone)."""
    if len(frames) != 1:
        raise UsageError(f"cannot write {frames.describe()} as a {fmt} image: it holds exactly one frame",
                         hint="write a format that holds every frame")
    return encode_image(frames.frames[0], fmt, meta, quality=quality)


# Format name (planning.plan.IMAGE_SUFFIXES' values) -> encoder(frames, format, metadata, quality) -> bytes.
ENCODERS: dict[str, Callable[[Frames, str, dict, int], bytes]] = {"PNG": _still, "JPEG": _still, "WEBP": _still,
                                                                  "MP4": encode_video, "WEBM": encode_video}


def format_for(path: str | Path) -> str:
    """The format a path's suffix asks for; an unknown suffix is a usage error."""
    return media_format(str(path))


def encode(frames: Frames, fmt: str, meta: dict, *, quality: int = 95) -> bytes:
    """The bytes of `frames` in format `fmt`, with both metadata dialects where the format holds them.
    Deterministic: equal frames and metadata give equal bytes. `quality` is the lossy formats' (0..100)."""
    encoder = ENCODERS.get(fmt)
    if encoder is None:
        raise UsageError(f"cannot write {fmt} files")
    return encoder(frames, fmt, meta, quality)


def write(frames: Frames, path: str | Path, meta: dict, *, overwrite: bool, quality: int = 95) -> Written:
    """Encode in the format the path's suffix names and write atomically; its path, size and sha256."""
    return write_encoded(encode(frames, format_for(path), meta, quality=quality), path, overwrite=overwrite)


def write_frames(frames: Frames, directory: str | Path, video_path: str | Path, meta: dict, *,
                 overwrite: bool) -> list[Written]:
    """Each frame of a video as a PNG (metadata inside, plus its frame number) in `directory`, named after the
    video: <name>-0001.png onwards; each written atomically."""
    from ..planning.video import frame_paths
    from .files import ensure_directory

    ensure_directory(directory)
    written = []
    for number, (image, path) in enumerate(zip(frames.frames, frame_paths(str(directory), str(video_path),
                                                                         len(frames))), 1):
        data = encode_image(image, "PNG", {**meta, "frame": number})
        written.append(write_encoded(data, path, overwrite=overwrite))
    return written


def read_metadata(path: str | Path) -> dict:
    """The metadata of any file sana-cli writes, by its suffix: a video's container tags (storage.video) or an
    image's chunks (storage.images); both give {'sana': dict|None, 'parameters': str|None, ...}."""
    from ..planning.checks import VIDEO_SUFFIXES

    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        from .video import read_video_metadata

        return read_video_metadata(path)
    from .images import read_metadata as read_image_metadata

    return read_image_metadata(path)
