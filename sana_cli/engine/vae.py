"""VAE decode strategies for the DC-AE, with an out-of-memory fallback.

- full:       `vae.decode` as diffusers does it. Fastest; at 4096x4096 in bf16 it peaks near 35 GiB.
- strips:     exact low-memory decode. The DC-AE decoder's low-resolution stages hold global linear
              attention, but its high-resolution stages are only convolutions, nearest upsampling and
              per-pixel RMSNorm. We run the attention stages whole, then the local tail on horizontal
              strips with a halo wider than the tail's receptive field, and crop each strip's halo
              away. The result equals a full decode up to floating-point reassociation.
- patch-conv: the model card's helper, `patch_conv.convert_model(vae, splits=N)`, applied for the
              decode and undone afterwards. It only splits convolutions whose input has 2^30 or more
              elements, and it did not lower peak memory on torch 2.11 (measured at 4096x4096 on an H100).
- tiled:      diffusers' `vae.enable_tiling` with 1024px tiles and a 128px overlap (the NVlabs
              4K setting). Not exact: tiles see only part of the attention context and are blended.

We always decode outside the pipeline (output_type="latent"), so diffusers' habit of turning a decode
OOM into `UnboundLocalError: image` never reaches the user.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

STRATEGIES = ("auto", "full", "strips", "patch-conv", "tiled")
# Peak bytes per output pixel of a full bf16 decode (34.6 GiB at 4096x4096, measured on an H100).
FULL_DECODE_BYTES_PER_PIXEL_BF16 = 34.6 * 2**30 / (4096 * 4096)
# In rows of the tail's input feature map. Measured on the full-size DC-AE (bench/results/decode-cpu_*):
# below ~16 rows memory stops falling (the attention stages' floor) while time keeps growing.
MIN_STRIP_ROWS = 8
TILE_SIZE = 1024  # NVlabs' 4K setting: 1024px tiles, stride 896 (an eighth overlaps)


@dataclass(frozen=True)
class Decoded:
    image: torch.Tensor  # (B, 3, H, W) in the VAE's dtype, range [-1, 1]
    strategy: str  # what actually ran, e.g. "full", "strips:64", "tiled:1024"
    fallbacks: tuple[str, ...] = ()  # strategies that ran out of memory first


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, the CPU allocator failing, or diffusers' OOM-turned-UnboundLocalError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, UnboundLocalError):
        return "image" in str(exc)
    text = str(exc).lower()
    # oneDNN (CPU convolutions) reports a failed scratchpad allocation as "could not create a primitive";
    # cuDNN, cuBLAS and cuSOLVER report their workspace allocations as *_STATUS_ALLOC_FAILED, cuFFT as
    # CUFFT_ALLOC_FAILED, and a cudaMalloc outside the caching allocator as "CUDA error: out of memory".
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                      "could not create a primitive", "status_alloc_failed",
                                      "cufft_alloc_failed"))


def decode(vae, latents: torch.Tensor, strategy: str = "auto", *, strip_rows: int | None = None,
           tile_size: int = TILE_SIZE, free_bytes: int | None = None) -> Decoded:
    """Decode scaled latents (already divided by the VAE scaling factor, in the VAE dtype).

    On out-of-memory, falls back to strips, then to ever thinner strips, before giving up."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decode strategy {strategy!r}")
    if strategy == "auto":
        ratio = spatial_ratio(vae)
        strategy, strip_rows = choose(vae, latents.shape[-2] * ratio, latents.shape[-1] * ratio,
                                      latents.shape[0], free_bytes)
    if strategy == "strips" and strip_rows is None:
        strip_rows = default_strip_rows(vae, latents.shape[-2])
    fallbacks: list[str] = []
    while True:
        out_of_memory = False
        try:
            image, label = _run(vae, latents, strategy, strip_rows, tile_size)
            return Decoded(image, label, tuple(fallbacks))
        except Exception as exc:  # noqa: BLE001 - anything but an OOM is re-raised
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the traceback's tensors are already freed
            fallbacks.append(f"strips:{strip_rows}" if strategy == "strips" else strategy)
            release_memory()
            strategy, strip_rows = _next_attempt(vae, latents, strategy, strip_rows)


def _next_attempt(vae, latents, strategy: str, rows: int | None) -> tuple[str, int]:
    if strategy != "strips" and strip_decodable(vae):
        return "strips", default_strip_rows(vae, latents.shape[-2])
    if strategy == "strips" and rows // 2 >= MIN_STRIP_ROWS:
        return "strips", rows // 2
    raise torch.OutOfMemoryError(f"VAE decode ran out of memory (last tried {strategy}"
                                 + (f" with {rows}-row strips)" if strategy == "strips" else ")"))


def _run(vae, latents, name, rows, tile_size):
    if name == "full":
        return _full(vae, latents), "full"
    if name == "strips":
        return strip_decode(vae, latents, rows), f"strips:{rows}"
    if name == "patch-conv":
        splits = patch_conv_splits(latents.shape[-2])
        with patched_convs(vae, splits):
            return _full(vae, latents), f"patch-conv:{splits}"
    if name == "tiled":
        return tiled_decode(vae, latents, tile_size), f"tiled:{tile_size}"
    raise ValueError(name)


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spatial_ratio(vae) -> int:
    return 2 ** (len(vae.config.decoder_block_out_channels) - 1)


# ---- choosing ----------------------------------------------------------------------------------------

def free_memory_bytes(device: torch.device, cuda=None) -> int:
    """Free memory on the device that will decode (CUDA: what the driver has free plus the blocks this process's
    caching allocator holds unused, which the driver counts as taken but the decode can use as they are;
    CPU: MemAvailable). The cache is not emptied to read this: emptying it before every decode made each
    next GPU batch allocate its memory from the driver again, and synchronised the device. It is emptied
    only where a fallback needs the memory back (release_memory). `cuda` is torch.cuda (a stand-in in tests)."""
    if device.type == "cuda":
        cuda = cuda or torch.cuda
        free, _total = cuda.mem_get_info(device)
        cached = cuda.memory_reserved(device) - cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def in_use_bytes(device: torch.device, cuda=None) -> int:
    """What this process already holds on the device (CUDA: allocated tensors, as the caching allocator's unused
    blocks count as free in free_memory_bytes and are handed back before a capped allocation fails; CPU: RSS)."""
    if device.type == "cuda":
        return int((cuda or torch.cuda).memory_allocated(device))
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budget_bytes(free: int, max_memory: int | None, in_use: int) -> int:
    """Memory a decode may plan with: what is free, and under --max-memory no more than the budget less
    what the process already holds."""
    if max_memory is None:
        return free
    return max(0, min(free, max_memory - in_use))


def full_decode_bytes(vae, height: int, width: int, batch: int = 1) -> int:
    """Estimated peak of a full decode: the measured 4096x4096 bf16 figure of the DC-AE, scaled by
    pixels, dtype size and the width of the decoder's last stage (128 channels in the DC-AE), which
    holds the largest activations."""
    element = torch.finfo(next(vae.parameters()).dtype).bits // 8
    width_ratio = vae.config.decoder_block_out_channels[0] / 128
    return int(FULL_DECODE_BYTES_PER_PIXEL_BF16 * element / 2 * width_ratio * height * width * batch)


def choose(vae, height: int, width: int, batch: int = 1, free_bytes: int | None = None) -> tuple[str, int | None]:
    """auto: a full decode when it fits in 85% of free memory, else strips sized to fit."""
    if free_bytes is None:
        free_bytes = free_memory_bytes(next(vae.parameters()).device)
    budget = int(free_bytes * 0.85)
    needed = full_decode_bytes(vae, height, width, batch)
    if needed <= budget or not strip_decodable(vae):
        return "full", None
    tail_rows = height // _tail_scale(vae)  # rows of the tail's input feature map
    per_row = needed / tail_rows
    rows = max(MIN_STRIP_ROWS, min(tail_rows, int(budget / per_row)))
    return "strips", rows


# ---- full and tiled ----------------------------------------------------------------------------------

def _full(vae, latents):
    with _tiling(vae, False):
        return vae.decode(latents, return_dict=False)[0]


@contextlib.contextmanager
def _tiling(vae, enabled: bool, tile_size: int = TILE_SIZE):
    saved = (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width,
             vae.tile_sample_stride_height, vae.tile_sample_stride_width)
    if enabled:
        vae.enable_tiling(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
                          tile_sample_stride_height=tile_size - tile_size // 8,
                          tile_sample_stride_width=tile_size - tile_size // 8)
    else:
        vae.use_tiling = False
    try:
        yield
    finally:
        (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
         vae.tile_sample_stride_width) = saved
        vae.tile_latent_min_height = vae.tile_sample_min_height // vae.spatial_compression_ratio
        vae.tile_latent_min_width = vae.tile_sample_min_width // vae.spatial_compression_ratio


def tiled_decode(vae, latents, tile_size: int = TILE_SIZE):
    """diffusers tiling with tile_size tiles overlapping by an eighth (inexact: see module docstring)."""
    if tile_size % (8 * spatial_ratio(vae)):
        raise ValueError(f"tile size {tile_size} must be a multiple of {8 * spatial_ratio(vae)}")
    with _tiling(vae, True, tile_size):
        return vae.decode(latents, return_dict=False)[0]


# ---- patch_conv ------------------------------------------------------------------------------------

def patch_conv_splits(latent_height: int, largest: int = 32) -> int:
    """The largest split count <= largest that divides every conv input height in the decoder.
    Decoder heights are latent_height * 2^k, so any divisor of latent_height is valid
    (patch_conv asserts h % splits == 0)."""
    return max(d for d in range(1, min(largest, latent_height) + 1) if latent_height % d == 0)


@contextlib.contextmanager
def patched_convs(vae, splits: int):
    """Apply patch_conv.convert_model to the decoder for the duration, then put the convs back."""
    from patch_conv import PatchConv2d, convert_model

    convert_model(vae.decoder, splits=splits)
    try:
        yield
    finally:
        for module in vae.decoder.modules():
            for name, child in list(module.named_children()):
                if isinstance(child, PatchConv2d):
                    setattr(module, name, child.conv2d)


# ---- strips ------------------------------------------------------------------------------------------

def _tail(vae) -> list[nn.Module] | None:
    """The decoder's local high-resolution stages in execution order, or None if there are none.

    Local means every block is an upsample or a ResBlock with a per-pixel norm; the first stage
    that is not (an EfficientViT attention stage) and everything before it runs whole."""
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d, ResBlock

    decoder = vae.decoder
    local = 0
    for stage in decoder.up_blocks:  # up_blocks[0] is the last stage to run (highest resolution)
        if all(isinstance(m, DCUpBlock2d) or (isinstance(m, ResBlock) and m.norm_type in ("rms_norm",
                                                                                          "batch_norm"))
               for m in stage):
            local += 1
        else:
            break
    if local == 0 or not isinstance(decoder.conv_out, (nn.Conv2d, DCUpBlock2d)):
        return None
    return [decoder.up_blocks[i] for i in reversed(range(local))]


def strip_decodable(vae) -> bool:
    return _tail(vae) is not None


def _tail_scale(vae) -> int:
    """How much the tail upsamples its input."""
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

    modules = [m for stage in _tail(vae) for m in stage] + [vae.decoder.conv_out]
    return 2 ** sum(isinstance(m, DCUpBlock2d) for m in modules)


def tail_halo(vae) -> int:
    """Rows of context each strip needs on each side, in tail-input rows: the receptive-field radius
    of the tail's convolutions (each conv at scale s reaches k//2 rows of its own resolution,
    i.e. (k//2)/s input rows), rounded up, plus one row of margin."""
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d, ResBlock

    scale, radius = 1, 0.0
    for module in [m for stage in _tail(vae) for m in stage] + [vae.decoder.conv_out]:
        if isinstance(module, DCUpBlock2d):
            if module.interpolate:
                scale *= 2
                radius += _reach(module.conv) / scale
            else:
                radius += _reach(module.conv) / scale
                scale *= 2
        elif isinstance(module, ResBlock):
            radius += (_reach(module.conv1) + _reach(module.conv2)) / scale
        elif isinstance(module, nn.Conv2d):
            radius += _reach(module) / scale
    return math.ceil(radius) + 1


def _reach(conv: nn.Conv2d) -> int:
    return (conv.kernel_size[0] // 2) * conv.dilation[0]


def default_strip_rows(vae, latent_height: int) -> int:
    """Strips of about 512 output rows, or a quarter of the image when that is smaller."""
    scale = _tail_scale(vae)
    tail_rows = latent_height * spatial_ratio(vae) // scale
    return max(MIN_STRIP_ROWS, min(512 // scale, max(1, tail_rows // 4)))


def _head(vae, latents):
    """The decoder up to the tail's input: conv_in (+ shortcut) and the global stages."""
    decoder = vae.decoder
    local = len(_tail(vae))
    if decoder.in_shortcut:
        x = latents.repeat_interleave(decoder.in_shortcut_repeats, dim=1,
                                      output_size=latents.shape[1] * decoder.in_shortcut_repeats)
        hidden = decoder.conv_in(latents) + x
    else:
        hidden = decoder.conv_in(latents)
    for stage in reversed(decoder.up_blocks[local:]):
        hidden = stage(hidden)
    return hidden


def _run_tail(vae, hidden):
    decoder = vae.decoder
    for stage in _tail(vae):
        hidden = stage(hidden)
    hidden = decoder.norm_out(hidden.movedim(1, -1)).movedim(-1, 1)
    hidden = decoder.conv_act(hidden)
    return decoder.conv_out(hidden)


@torch.no_grad()
def strip_decode(vae, latents: torch.Tensor, rows: int) -> torch.Tensor:
    """Exact low-memory decode: the head whole, the local tail strip by strip (rows tail-input rows
    per strip, plus a halo on each side that is cropped away)."""
    if _tail(vae) is None:
        raise ValueError("this VAE has no local high-resolution stages to decode in strips")
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None:  # accelerate CPU offload: bring the VAE onto the GPU as decode() would
        hook.pre_forward(vae)
    hidden = _head(vae, latents)
    halo, scale = tail_halo(vae), _tail_scale(vae)
    total = hidden.shape[-2]
    out = None
    for start in range(0, total, rows):
        stop = min(total, start + rows)
        lo, hi = max(0, start - halo), min(total, stop + halo)
        piece = _run_tail(vae, hidden[:, :, lo:hi])
        if out is None:
            out = piece.new_empty((piece.shape[0], piece.shape[1], total * scale, piece.shape[-1]))
        out[:, :, start * scale:stop * scale] = piece[:, :, (start - lo) * scale:(stop - lo) * scale]
        del piece
    return out
