"""Denoised latents kept beside an image's planned path, and finishing them into that image later.

A denoise is the expensive part of an image. When its decode still fails after every fallback (or with
--keep-latents, always), the latents go to NAME.latents.safetensors next to NAME.png, with the image's
metadata and the VAE's dtype, written atomically. `sana decode NAME.latents.safetensors` loads only the
VAE, decodes them as the run would have and writes NAME.png with the same pixels and metadata. Decoded on
another kind of device than the run's (`--device cpu` for a CUDA run), the metadata says so and the image
gets a key of its own (decoded_metadata).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

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

    from .output import atomic_write_bytes

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
    from .plan import IMAGE_SUFFIXES, check_side
    from .safeio import BadSafetensors, read_safetensors_header

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
            or any(ord(ch) < 32 for ch in image) or Path(image).suffix.lower() not in IMAGE_SUFFIXES:
        raise refuse(f"its image name {image!r} is not a plain .png, .jpg or .webp file name")
    if set(tensors) != {"latents"}:
        raise refuse(f"it holds {', '.join(map(repr, sorted(tensors))) or 'no tensor'}, not one tensor 'latents'")
    dtype, shape, _ = tensors["latents"]
    if dtype not in _LATENT_DTYPES or len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise refuse(f"its latents are {dtype} {list(shape)}, not one image's (1, C, h, w) in a float dtype")
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
    scale = width // shape[3]
    if scale < 1 or scale & (scale - 1) or shape[3] * scale != width or shape[2] * scale != height:
        raise refuse(f"its latents are {shape[3]}x{shape[2]}, which no VAE decodes into the {width}x{height} "
                     "its metadata records")
    if shape[1] > MAX_CHANNELS:
        raise refuse(f"its latents have {shape[1]} channels; a Sana VAE has 32")
    return meta, info["vae_dtype"], image


def check_fits(kept: Kept, vae) -> None:
    """The latents against the loaded VAE: its channels, and its scale times their size equal to the size
    the metadata records, so what is decoded is the image the metadata describes."""
    channels = int(vae.config.latent_channels)
    scale = int(getattr(vae, "spatial_compression_ratio", 0) or 2 ** (len(vae.config.decoder_block_out_channels) - 1))
    _, got, h, w = tuple(kept.latents.shape)
    width, height = kept.meta["width"], kept.meta["height"]
    if got != channels or (w * scale, h * scale) != (width, height):
        raise UsageError(f"the latents ({got} channels, {w}x{h}) do not fit the VAE of {kept.meta['model_id']} "
                         f"({channels} channels, {scale}x): they would not decode into the {width}x{height} image "
                         "their metadata records")


def finish(path: str, *, output: str | None = None, decode: str = "auto", device: str | None = None,
           overwrite: bool = False, offline: bool = False, max_memory: float | None = None, verbose: bool = False):
    """Decode a kept latents file into its image: (WrittenImage, metadata). Loads only the VAE, in the
    dtype and on the kind of device the run used (unless `device` says otherwise)."""
    from .modelref import resolve
    from .output import ensure_directory, write_image
    from .pipeline import load
    from .plan import LoadOptions
    from .plan import image_format
    from .runner import decode_to_pil

    kept = read(path)
    target = output or kept.image
    if output is not None and (output.endswith("/") or Path(output).is_dir()):
        target = str(Path(output) / Path(kept.image).name)
    image_format(target)
    if Path(target).exists() and not overwrite:
        raise UsageError(f"{target} already exists", hint="pass --overwrite to replace it, or -o elsewhere")
    meta = kept.meta
    ref = resolve(meta["model_id"], revision=meta.get("revision"))
    loaded = load(ref, LoadOptions(device=device or meta.get("device") or "auto", dtype=_SHORT[kept.vae_dtype],
                                   offline=offline, max_memory_gib=max_memory, verbose=verbose, only=("vae",)))
    ensure_directory(str(Path(target).parent))  # after every refusal loading can make: a refused run makes none
    budget = None if max_memory is None else int(max_memory * 2**30)
    check_fits(kept, loaded.pipe.vae)
    image, decoded = decode_to_pil(loaded, kept.latents.to(loaded.device), decode, budget)
    meta = decoded_metadata(meta, decoded.strategy, loaded.device.type)
    return write_image(image, target, meta, overwrite=overwrite), meta


def decoded_metadata(meta: dict, strategy: str, device_type: str) -> dict:
    """The run's metadata for the image a kept latents file became. Decoded on the kind of device the run
    used, it is the run's own (same pixels, same key). Decoded on another kind (`--device cpu` for a CUDA
    run), the decode may round differently, so the metadata says where (`decode_device`), keeps the run's key
    as `run_key`, and takes a key of its own: the image is never taken for the run's on resume."""
    meta = {**meta, "decode": strategy}
    ran = str(meta.get("device") or "").split(":")[0]
    if ran and device_type != ran:
        run_key = meta.get("key")
        meta.update(decode_device=device_type, run_key=run_key,
                    key=hashlib.sha256(json.dumps({"run_key": run_key, "decode_device": device_type},
                                                  sort_keys=True).encode()).hexdigest()[:16])
    return meta
