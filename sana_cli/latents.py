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
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with safe_open(str(source), framework="pt") as handle:
            info = handle.metadata() or {}
            names = handle.keys()  # a safetensors handle, not a dict
            latents = handle.get_tensor("latents") if "latents" in names else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a sana latents file ({exc})") from exc
    if info.get("format") != FORMAT or latents is None or info.get("vae_dtype") not in _SHORT:
        raise UsageError(f"{path} is not a sana latents file", hint="sana decode reads NAME.latents.safetensors")
    return Kept(latents, json.loads(info["sana"]), info["vae_dtype"], str(source.with_name(info["image"])))


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
    ensure_directory(str(Path(target).parent))
    meta = kept.meta
    ref = resolve(meta["model_id"], revision=meta.get("revision"))
    loaded = load(ref, LoadOptions(device=device or meta.get("device") or "auto", dtype=_SHORT[kept.vae_dtype],
                                   offline=offline, max_memory_gib=max_memory, verbose=verbose, only=("vae",)))
    budget = None if max_memory is None else int(max_memory * 2**30)
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
