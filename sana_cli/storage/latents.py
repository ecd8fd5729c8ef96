"""Denoised latents kept beside an image's planned path, and finishing them into that image later.

A denoise is the expensive part of an image. When its decode still fails after every fallback (or with
--keep-latents, always), the latents go to NAME.latents.safetensors next to NAME.png, with the image's
metadata and the VAE's dtype, written atomically. `sana decode NAME.latents.safetensors` loads only the
VAE, decodes them as the run would have and writes NAME.png with the same pixels and metadata. Decoded on
another kind of device than the run's (`--device cpu` for a CUDA run), the metadata says so and the image
gets a key of its own (decoded_metadata).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

FORMAT = "sana-cli-latents-v1"
SUFFIX = ".latents.safetensors"
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def path_for(image_path: str) -> str:
    """cat.png -> cat.latents.safetensors, in the same directory."""
    path = Path(image_path)
    return str(path.with_name(path.stem + SUFFIX))


def save(image_path: str, latents, meta: dict, vae_dtype: str) -> str:
    """Write one image's latents (1, C, h, w) with its metadata; returns the file's path."""
    from safetensors.torch import save

    from .files import atomic_write_bytes

    target = path_for(image_path)
    data = save({"latents": latents.detach().to("cpu").contiguous()},
                metadata={"format": FORMAT, "sana": json.dumps(meta, ensure_ascii=False, sort_keys=True),
                          "vae_dtype": vae_dtype, "image": Path(image_path).name})
    atomic_write_bytes(target, data, overwrite=True)
    return target


@dataclass
class Kept:
    latents: object  # torch.Tensor
    meta: dict
    vae_dtype: str
    image: str  # the planned image's path, beside the latents file


def read(path: str) -> Kept:
    """A kept latents file, checked whole (see check) before its tensor is read."""
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{path}: no such file")
    meta, vae_dtype, image = check(path)
    try:
        with safe_open(str(source), framework="pt") as handle:
            latents = handle.get_tensor("latents")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a sana latents file ({exc})") from exc
    check_finite(path, latents)
    return Kept(latents, meta, vae_dtype, str(source.with_name(image)))


def check_finite(path: str, latents) -> None:
    """Latents holding NaN or infinity decode into a black image that would pass for the run's: refused."""
    import torch

    if not bool(torch.isfinite(latents).all()):
        raise UsageError(f"{path}: its latents hold NaN or infinity, which decode into no image")


MAX_HEADER_BYTES = 16 * 2**20  # the metadata of one image: kilobytes
_LATENT_DTYPES = ("F32", "F16", "BF16")
MAX_CHANNELS = 1024
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def check(path: str) -> tuple[dict, str, str]:
    """(metadata, VAE dtype, image file name) of a kept latents file, read without torch and checked as the
    untrusted input it is, before a byte of its tensor is read: a safetensors file holding exactly one tensor
    `latents` of shape (1, C, h, w) in a float dtype, sana-cli's metadata (a JSON object naming the model, a
    size within generate's limits, a device), an image name that is a plain file name, and w x h times a
    power-of-two scale equal to the size the metadata records (the VAE's own scale and channels are checked
    once it is loaded: see check_fits). Anything else is a usage error, one line."""
    from ..planning.checks import VIDEO_SUFFIXES
    from ..planning.plan import IMAGE_SUFFIXES, check_side
    from ..safeio import BadSafetensors, read_safetensors_header

    def refuse(why: str) -> UsageError:
        return UsageError(f"{path} is not a sana latents file ({why})",
                          hint="sana decode reads the NAME.latents.safetensors a run kept")

    try:
        tensors, info = read_safetensors_header(path, MAX_HEADER_BYTES)
    except BadSafetensors as exc:
        raise refuse(str(exc)) from None
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    if info.get("format") != FORMAT or info.get("vae_dtype") not in _SHORT:
        raise UsageError(f"{path} is not a sana latents file", hint="sana decode reads NAME.latents.safetensors")
    try:
        meta = json.loads(info.get("sana", ""))
    except (ValueError, RecursionError):
        raise refuse("its metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise refuse("its metadata is not a JSON object")
    image = info.get("image", "")
    if not image or image != Path(image).name or image in (".", "..") or "\\" in image \
            or any(ord(ch) < 32 for ch in image) \
            or Path(image).suffix.lower() not in (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES):
        raise refuse(f"its image name {image!r} is not a plain .png, .jpg or .webp file name (.mp4 or .webm for a "
                     "video)")
    if set(tensors) != {"latents"}:
        raise refuse(f"it holds {', '.join(map(repr, sorted(tensors))) or 'no tensor'}, not one tensor 'latents'")
    dtype, shape, _ = tensors["latents"]
    video = Path(image).suffix.lower() in VIDEO_SUFFIXES  # a video's latents: (1, C, frames, h, w)
    if dtype not in _LATENT_DTYPES or len(shape) != (5 if video else 4) or shape[0] != 1 or min(shape) < 1:
        what = "one video's (1, C, F, h, w)" if video else "one image's (1, C, h, w)"
        raise refuse(f"its latents are {dtype} {list(shape)}, not {what} in a float dtype")
    if video:
        frames = meta.get("frames")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 4096:
            raise refuse(f"its metadata records {frames!r} frames")
        fps = meta.get("fps")
        if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 120:
            raise refuse(f"its metadata records {fps!r} frames per second")
        if not 1 <= shape[2] <= frames:
            raise refuse(f"its latents have {shape[2]} frames for the {frames} its metadata records")
    if not isinstance(meta.get("model_id"), str) or not meta["model_id"].strip():
        raise refuse("its metadata names no model")
    if meta.get("revision") is not None and not isinstance(meta["revision"], str):
        raise refuse("its metadata has a revision that is not text")
    device = meta.get("device")
    if device is not None and (not isinstance(device, str) or not _DEVICE.fullmatch(device)):
        raise refuse(f"its metadata records the device {device!r}")
    try:
        width, height = check_side("width", meta.get("width")), check_side("height", meta.get("height"))
    except UsageError as exc:
        raise refuse(f"its metadata: {exc.message}") from None
    scale = width // shape[-1]
    if scale < 1 or scale & (scale - 1) or shape[-1] * scale != width or shape[-2] * scale != height:
        raise refuse(f"its latents are {shape[-1]}x{shape[-2]}, which no VAE decodes into the {width}x{height} "
                     "its metadata records")
    if shape[1] > MAX_CHANNELS:
        raise refuse(f"its latents have {shape[1]} channels; a Sana VAE has 32")
    return meta, info["vae_dtype"], image
