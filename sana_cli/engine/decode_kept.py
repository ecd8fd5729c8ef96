"""`sana decode`: finishing kept latents into the image the run would have written, with the VAE only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UsageError
from ..storage.latents import _SHORT, Kept, read


def check_fits(kept: Kept, vae) -> None:
    """The latents against the loaded VAE: its channels, and its scale times their size equal to the size
    the metadata records, so what is decoded is the image the metadata describes."""
    video = kept.latents.dim() == 5  # a video's (1, C, F, h, w) for a Wan VAE
    if video != hasattr(vae.config, "z_dim"):
        raise UsageError(f"the latents are {'a video' if video else 'an image'}'s and {kept.meta['model_id']}'s VAE "
                         f"makes {'images' if video else 'videos'}")
    channels = int(vae.config.z_dim if video else vae.config.latent_channels)
    scale = int(getattr(vae, "spatial_compression_ratio", 0) or 2 ** (len(vae.config.decoder_block_out_channels) - 1))
    got, h, w = (kept.latents.shape[1], *kept.latents.shape[-2:])
    width, height = kept.meta["width"], kept.meta["height"]
    if video:
        temporal = int(vae.config.scale_factor_temporal)
        if (kept.meta["frames"] - 1) % temporal or (kept.meta["frames"] - 1) // temporal + 1 != kept.latents.shape[2]:
            raise UsageError(f"the latents' {kept.latents.shape[2]} frames do not decode into the "
                             f"{kept.meta['frames']} frames their metadata records")
    if got != channels or (w * scale, h * scale) != (width, height):
        raise UsageError(f"the latents ({got} channels, {w}x{h}) do not fit the VAE of {kept.meta['model_id']} "
                         f"({channels} channels, {scale}x): they would not decode into the {width}x{height} image "
                         "their metadata records")


def finish(path: str, *, output: str | None = None, decode: str = "auto", device: str | None = None,
           overwrite: bool = False, offline: bool = False, max_memory: float | None = None, verbose: bool = False):
    """Decode a kept latents file into its image: (Written, metadata). Loads only the VAE, in the
    dtype and on the kind of device the run used (unless `device` says otherwise)."""
    from ..models.modelref import resolve
    from ..planning.plan import LoadOptions
    from ..storage import media
    from ..storage.files import ensure_directory
    from .loading import load
    from .runner import decode_frames

    kept = read(path)
    target = output or kept.image
    if output is not None and (output.endswith("/") or Path(output).is_dir()):
        target = str(Path(output) / Path(kept.image).name)
    media.format_for(target)
    if Path(target).exists() and not overwrite:
        raise UsageError(f"{target} already exists", hint="pass --overwrite to replace it, or -o elsewhere")
    meta = kept.meta
    ref = resolve(meta["model_id"], revision=meta.get("revision"))
    loaded = load(ref, LoadOptions(device=device or meta.get("device") or "auto", dtype=_SHORT[kept.vae_dtype],
                                   offline=offline, max_memory_gib=max_memory, verbose=verbose, only=("vae",)))
    ensure_directory(str(Path(target).parent))  # after every refusal loading can make: a refused run makes none
    budget = None if max_memory is None else int(max_memory * 2**30)
    check_fits(kept, loaded.pipe.vae)
    if kept.latents.dim() == 5:
        from .runner import decode_video

        frames, decoded = decode_video(loaded, kept.latents.to(loaded.device), decode, fps=kept.meta.get("fps") or 16)
    else:
        frames, decoded = decode_frames(loaded, kept.latents.to(loaded.device), decode, budget)
    meta = decoded_metadata(meta, decoded.strategy, loaded.device.type)
    return media.write(frames, target, meta, overwrite=overwrite), meta


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
