"""Sizes, names and the other checks planning makes before anything loads: sides and the model's
scale, steps and guidance, PAG, file names and formats, what the load options rule out.

Sizes: sana-cli renders exactly the size asked for. diffusers' resolution binning would render the
4K model's 1024x1024 request at 4096x4096 and shrink it (16x the work), so we never bin. Instead a
size far from the model's native scale (outside 0.5x-2x its pixel count) or outside the 1:4-4:1
aspect range the models were trained on is refused with a suggestion, unless --force-size.

Pure Python (no torch).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from ..errors import UsageError
from ..inputs.values import check_scale
from ..models import presets
from ..models.modelref import ModelRef
from .jobs import PixelOptions


SIZE_MULTIPLE = 32
MIN_SIDE = 32
MAX_SIDE = 8192  # the largest side in any Sana bin table (2048x8192 in the 4K table)
MAX_PIXELS = 4096 * 4096
SCALE_RANGE = (0.5, 2.0)  # allowed pixel-count ratio to the model's native size
ASPECT_RANGE = (0.25, 4.0)  # height / width, as in diffusers' bin tables
MAX_IMAGES = 10000  # images for one prompt (-n) or one batch row (n)
MAX_BATCH_SIZE = 256  # images in one GPU batch
MAX_BATCH_IMAGES = 1_000_000  # images in one batch run: each planned image costs memory before any renders
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = {".mp4": "MP4", ".webm": "WEBM"}  # `sana video`: H.264 in MP4, VP9 in WebM
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_LAYERS: dict[tuple, int | None] = {}  # one batch plans many rows of one model: read its config once


def transformer_layers(model: ModelRef) -> int | None:
    """The number of transformer blocks of a model, from its config when that is readable without loading
    (tiny, a local directory, a cached hub model), else None."""
    key = (model.kind, model.source, model.revision)
    if key not in _LAYERS:
        from ..models.modelref import transformer_config

        try:
            layers = (transformer_config(model) or {}).get("num_layers")
        except (OSError, ValueError):
            layers = None
        _LAYERS[key] = layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None
    return _LAYERS[key]


def check_side(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be a whole number of pixels, got {value!r}")
    if value <= 0:
        raise UsageError(f"{name} must be positive, got {value}")
    if value % SIZE_MULTIPLE:
        lower = max(SIZE_MULTIPLE, value - value % SIZE_MULTIPLE)
        raise UsageError(f"{name} {value} is not a multiple of {SIZE_MULTIPLE}",
                         hint=f"try {lower} or {lower + SIZE_MULTIPLE}")
    if value < MIN_SIDE or value > MAX_SIDE:
        raise UsageError(f"{name} {value} is outside {MIN_SIDE}..{MAX_SIDE}")
    return value


def resolve_size(model: ModelRef, width: int | None, height: int | None, force: bool) -> tuple[int, int, list[str]]:
    """Width and height to render, checked against the model's scale. Returns (w, h, notes)."""
    native = model.native_size
    if width is None and height is None:
        if native is None:
            raise UsageError(f"the native size of '{model.name}' is unknown until it is downloaded",
                             hint="pass --size or --width/--height")
        return native, native, []
    width = check_side("width", width if width is not None else height)
    height = check_side("height", height if height is not None else width)
    if width * height > MAX_PIXELS and not force:
        raise UsageError(f"{width}x{height} is more than the 4096x4096 pixels any Sana model renders",
                         hint="--force-size renders it anyway")
    aspect = height / width
    if not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1] and not force:
        raise UsageError(f"aspect ratio {width}x{height} is outside 1:4..4:1, which Sana was trained on",
                         hint="--force-size renders it anyway")
    notes: list[str] = []
    if native is None:
        notes.append("model config not cached yet: the size is checked against the model after loading")
        return width, height, notes
    ratio = width * height / (native * native)
    if not SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1]:
        if not force:
            better = presets.for_size(width, height)
            raise UsageError(
                f"{model.name} is a {native}px model and {width}x{height} is {ratio:.2g}x its pixel count",
                hint=f"use --model {better.name} for this size, or --force-size to render {width}x{height} "
                     f"with {model.name} anyway")
        notes.append(f"--force-size: rendering {width}x{height} with a {native}px model ({ratio:.2g}x its pixels)")
    return width, height, notes


def check_steps_guidance(model: ModelRef, steps: int, guidance: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UsageError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if steps > model.max_steps:
        raise UsageError(f"{model.name} takes {model.min_steps}-{model.max_steps} steps, got {steps}")
    check_scale("guidance", guidance)


def check_pag(model: ModelRef, pag_scale: float) -> None:
    check_scale("--pag-scale", pag_scale)
    if pag_scale > 0 and not model.supports_pag:
        raise UsageError(f"{model.name} cannot use PAG (perturbed-attention guidance)",
                         hint="PAG works with the SanaPipeline models; drop --pag-scale")


MAX_PAG_LAYERS_CHARS = 1000


def check_pag_layers_syntax(value) -> str:
    """PAG layers are comma-separated regular expressions matched against the transformer's module names
    (as diffusers does); each must compile. Whether the model has such layers is checked once it is loaded."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PAG_LAYERS_CHARS:
        raise UsageError(f"pag_layers must be comma-separated layer names of at most {MAX_PAG_LAYERS_CHARS} "
                         "characters")
    presets.check_pag_layers(value, None, "")  # each pattern compiles; the layers are checked on the model
    return value


def slugify(text: str, max_chars: int = 40) -> str:
    """A file-name-safe stem from a prompt: Unicode letters and digits kept, anything else a dash."""
    text = unicodedata.normalize("NFKC", text).lower()
    slug = re.sub(r"[^\w]+|_+", "-", text).strip("-")[:max_chars].strip("-")
    slug = slug or "image"
    return slug + "_" if slug.upper() in _WINDOWS_RESERVED else slug


def image_format(path: str) -> str:
    """PIL format name for a path's extension; anything else is a usage error."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise UsageError(f"cannot write '{suffix or path}' images", hint="use .png, .jpg or .webp")
    return IMAGE_SUFFIXES[suffix]


def video_format(path: str) -> str:
    """The container a video path's extension names; anything else is a usage error."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UsageError(f"cannot write '{suffix or path}' videos", hint="use .mp4 or .webm")
    return VIDEO_SUFFIXES[suffix]


def media_format(path: str) -> str:
    """The format of any path sana-cli writes: an image's or a video's."""
    suffix = Path(path).suffix.lower()
    return VIDEO_SUFFIXES[suffix] if suffix in VIDEO_SUFFIXES else image_format(path)


_NAME_FORBIDDEN = set('/\\<>:"|?*')


def check_name(name: str) -> str:
    """A row `name` is a file stem inside the output directory, portable to Linux, macOS and Windows."""
    stem = name.strip()
    if not stem:
        raise UsageError("'name' is empty")
    if any(ch in _NAME_FORBIDDEN or ord(ch) < 32 for ch in stem):
        raise UsageError(f"'name' {name!r} may not contain path separators or any of <>:\"|?* or control "
                         "characters (names stay inside the output directory)")
    from ..terminal import is_unsafe

    if any(is_unsafe(ch) for ch in stem):
        raise UsageError(f"'name' {name!r} may not contain invisible or direction-changing characters (right-to-left "
                         "overrides, zero-width spaces): a file name must read as what it is")
    if stem.startswith(".") or stem.endswith((".", " ")):
        raise UsageError(f"'name' {name!r} may not start with a dot or end with a dot or space")
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise UsageError(f"'name' {name!r} is a reserved device name on Windows")
    if len(stem.encode("utf-8")) > 200:
        raise UsageError(f"'name' is {len(stem.encode('utf-8'))} bytes; the limit is 200")
    return stem


def check_with_pixels(params: dict, pixels: PixelOptions) -> None:
    """What the load options rule out: a LoRA is fused into the transformer's weights, which fp8, int8 and
    nf4 replace with quantized tensors that cannot take it."""
    if pixels.fp8 and params.get("loras"):
        raise UsageError("--lora cannot be combined with --fp8 (a LoRA is fused into the transformer's weights, "
                         "which fp8 replaces)")
    if pixels.quantize and params.get("loras"):
        raise UsageError(f"--lora cannot be combined with --quantize {pixels.quantize} (a LoRA is fused into the "
                         f"transformer's weights, which {pixels.quantize} replaces)")
