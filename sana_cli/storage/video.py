"""The video codec: frames to MP4 (H.264, yuv420p: plays in every browser) or WebM (VP9) bytes with the
generation metadata in the container, and that metadata read back. PyAV (FFmpeg, with libx264 and libvpx, in
its wheel), no torch, no system ffmpeg. Files are written through storage.media (atomically, via storage.files).

Metadata: the container's `comment` tag holds the `sana` JSON document (MP4: the iTunes-style ©cmt atom in
moov/udta, which ffprobe shows as `comment`; WebM: a Matroska COMMENT tag), and `description` the A1111-style
parameters text, as PNG files hold them.

Deterministic: libx264 and libvpx run single-threaded with fixed settings and the muxers in bitexact mode (no
encoder version string, no creation time), so equal frames and metadata give equal bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import UsageError
from .images import a1111_parameters

CRF = {"MP4": 12, "WEBM": 12}  # near-lossless for both codecs (the frames of a 480p clip are a few MB)
MAX_METADATA_CHARS = 1 << 20  # a comment longer than this is not sana-cli's
MAX_VIDEO_BYTES = 4 << 30  # `sana info` opens no larger file


def encode_video(frames, fmt: str, meta: dict, quality: int = 95) -> bytes:
    """MP4 (H.264 yuv420p, faststart) or WebM (VP9 yuv420p) bytes of the frames at frames.fps, metadata inside.
    `quality` (the still formats' 0..100) is not used: each codec runs at its fixed near-lossless CRF."""
    import av

    images = frames.frames
    if not images:
        raise UsageError(f"cannot write an empty video as {fmt}")
    width, height = images[0].size
    if width % 2 or height % 2:
        raise UsageError(f"cannot write {width}x{height} frames as {fmt}: yuv420p needs even sides")
    fps = int(frames.fps or 16)
    container_format = {"MP4": "mp4", "WEBM": "webm"}[fmt]
    options = {"movflags": "+faststart"} if fmt == "MP4" else {}
    # faststart (the index first, so a browser plays while it downloads) rewrites the file by name: the
    # container is made in a private temp directory and its bytes handed back, to be written atomically.
    with tempfile.TemporaryDirectory(prefix="sana-video-") as directory:
        target = os.path.join(directory, f"video.{container_format}")
        _mux(av, images, fps, fmt, container_format, options, meta, target)
        with open(target, "rb") as handle:
            return handle.read()


def _mux(av, images, fps: int, fmt: str, container_format: str, options: dict, meta: dict, target: str) -> None:
    width, height = images[0].size
    with av.open(target, mode="w", format=container_format, options=options) as container:
        container.flags |= av.container.Flags.bitexact.value
        container.metadata["comment"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
        container.metadata["description"] = a1111_parameters(meta)
        if fmt == "MP4":
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": str(CRF[fmt]), "preset": "medium", "threads": "1"}
        else:
            stream = container.add_stream("libvpx-vp9", rate=fps)
            stream.options = {"crf": str(CRF[fmt]), "b": "0", "threads": "1", "row-mt": "0", "deadline": "good",
                              "cpu-used": "4"}
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        for image in images:
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video_metadata(path: str | Path) -> dict:
    """The metadata of a video sana-cli wrote: {'sana': dict|None, 'parameters': str|None} and the stream's
    facts. The file is untrusted: only a regular file of bounded size is opened, only its header is read
    (no frame is decoded), and the comment is bounded before it is parsed."""
    import av

    from ..safeio import open_regular

    try:
        with (open_regular(path, MAX_VIDEO_BYTES) as handle,
              av.open(handle, mode="r", metadata_errors="replace") as container):
            tags = dict(container.metadata)
            video = next((stream for stream in container.streams if stream.type == "video"), None)
            if video is None:
                raise UsageError(f"{path} holds no video stream")
            facts = {"format": container.format.name, "width": video.codec_context.width,
                     "height": video.codec_context.height, "codec": video.codec_context.name,
                     "fps": float(video.average_rate) if video.average_rate else None,
                     "frames": video.frames or None}
            tags.update({key: value for key, value in video.metadata.items() if key not in tags})
    except UsageError:
        raise
    except (OSError, ValueError, av.error.FFmpegError) as exc:
        raise UsageError(f"{path} is not a readable video: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    sana = _bounded(tags.get("comment") or tags.get("COMMENT"))
    parameters = _bounded(tags.get("description") or tags.get("DESCRIPTION"))
    try:
        sana_meta = json.loads(sana) if sana else None
    except (ValueError, RecursionError):
        sana_meta = None
    return {"path": str(path), **facts, "sana": sana_meta if isinstance(sana_meta, dict) else None,
            "parameters": parameters}


def _bounded(value) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_METADATA_CHARS else None


def first_frame(path: str | Path, max_pixels: int):
    """The first frame of a video file as an RGB PIL image (the gallery's thumbnail of a video). Untrusted: a
    regular file of bounded size, a frame of at most max_pixels, decoded by FFmpeg from the first packets only."""
    import av

    from ..safeio import open_regular

    try:
        with (open_regular(path, MAX_VIDEO_BYTES) as handle,
              av.open(handle, mode="r", metadata_errors="replace") as container):
            stream = next((stream for stream in container.streams if stream.type == "video"), None)
            if stream is None:
                raise UsageError(f"{path} holds no video stream")
            width, height = stream.codec_context.width, stream.codec_context.height
            if not 0 < width * height <= max_pixels:
                raise UsageError(f"{path} has {width}x{height} frames, more than the {max_pixels} pixels sana reads")
            for frame in container.decode(stream):
                return frame.to_image().convert("RGB")
    except UsageError:
        raise
    except (OSError, ValueError, av.error.FFmpegError) as exc:
        raise UsageError(f"{path} is not a readable video: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    raise UsageError(f"{path} holds no frame")
