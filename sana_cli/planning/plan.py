"""Requests in, a Plan out: every image to make, its size, seed and path, and the GPU batches.

Pure Python (no torch): `--dry-run` prints a Plan, and tests check planning without a model.

Sizes: sana-cli renders exactly the size asked for. diffusers' resolution binning would render the
4K model's 1024x1024 request at 4096x4096 and shrink it (16x the work), so we never bin. Instead a
size far from the model's native scale (outside 0.5x-2x its pixel count) or outside the 1:4-4:1
aspect range the models were trained on is refused with a suggestion, unless --force-size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import unicodedata
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path

from ..errors import UsageError
from ..inputs.values import (
    _clip,
    check_count,
    check_finite,
    check_prompt,
    check_scale,
    check_seed,
)
from ..models import modelref, presets
from ..models.modelref import ModelRef
from . import fields as table
from .fields import KEY_SKIPS as _KEY_SKIPS
from .fields import DECODE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES  # noqa: F401 (planning's names)
from .fields import OPTIONAL_FIELDS, PER_IMAGE_FIELDS, PIXEL_FIELDS, PLANNING_INPUTS, SUMMARY_OMITS

SIZE_MULTIPLE = 32
MIN_SIDE = 32
MAX_SIDE = 8192  # the largest side in any Sana bin table (2048x8192 in the 4K table)
MAX_PIXELS = 4096 * 4096
SCALE_RANGE = (0.5, 2.0)  # allowed pixel-count ratio to the model's native size
ASPECT_RANGE = (0.25, 4.0)  # height / width, as in diffusers' bin tables
MAX_IMAGES = 10000  # images for one prompt (-n) or one batch row (n)
MAX_BATCH_SIZE = 256  # images in one GPU batch
MAX_BATCH_IMAGES = 1_000_000  # images in one batch run: each planned image costs memory before any renders
KEY_SCHEMA = 2  # bump when what goes into job_key changes, so old images are not taken for new ones
_DTYPES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
           "fp32": "fp32", "float32": "fp32"}
_EXACT_DECODES = ("auto", "full", "strips", "patch-conv")  # equal to a full decode up to float rounding
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_OUTPUT_DIR = "sana-out"
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _dataclass_fields(rows) -> list[tuple]:
    """(name, annotation, dataclass field) for rows of the field table, with their defaults."""
    return [(row.name, row.type) if row.default is table.REQUIRED else (row.name, row.type, field(default=row.default))
            for row in rows]


# What one user asked for with `sana generate` (or the API's generate): the prompt's per-image fields
# from the field table, and how to run them.
Request = make_dataclass("Request", [
    *_dataclass_fields(row for row in table.REQUEST_FIELDS if row.name == "prompt"),
    ("model", "str | None", field(default=None)),
    *_dataclass_fields(row for row in table.REQUEST_FIELDS if row.name != "prompt"),
    ("output", "str | None", field(default=None)),
    ("overwrite", "bool", field(default=False)),
    ("force_size", "bool", field(default=False)),
    ("revision", "str | None", field(default=None)),
    ("batch_size", "int | None", field(default=None)),
    ("offline", "bool", field(default=False)),  # resolve hub LoRAs from the cache only
])
Request.__module__ = __name__
Request.__doc__ = "What one user asked for with `sana generate` (or one batch row, once expanded)."


@dataclass(frozen=True)
class PixelOptions:
    """The load and decode options that change pixels: the one list of them. Each goes into every
    image's job key (normalised: key_fields) and into its metadata (as asked: `pixel_options`), so
    a resumed batch never takes an image made with other options for done. A new option that can
    change a pixel belongs here; one that cannot (offload, compile, memory limits) does not."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    fp8: bool = False
    decode: str = "auto"
    quantize: str | None = None  # int8 | nf4; `fp8` becomes fp8=True (see quantize_choice)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UsageError(f"unsupported --device {self.device!r}; use auto, cuda, cuda:N or cpu")
        if self.dtype not in _DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}; use auto, bf16, fp16 or fp32")
        quantize, fp8 = quantize_choice(self.quantize, self.fp8)
        object.__setattr__(self, "quantize", quantize)
        object.__setattr__(self, "fp8", fp8)

    def key_fields(self) -> dict:
        """Normalised: the GPU index and the choice among exact decodes do not change pixels. `quantize`
        only when set, so the keys of images made without it stay what they were."""
        decode = self.decode if self.decode.split(":")[0] not in _EXACT_DECODES else "exact"
        return {"device": self.device.split(":")[0], "dtype": _DTYPES[self.dtype], "fp8": bool(self.fp8),
                "decode": decode, **self._quantize_field()}

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "fp8": bool(self.fp8), "decode": self.decode,
                **self._quantize_field()}

    def _quantize_field(self) -> dict:
        return {"quantize": self.quantize} if self.quantize else {}


def quantize_choice(quantize: str | None, fp8: bool) -> tuple[str | None, bool]:
    """(quantize, fp8) checked and normalised: `fp8` is the --fp8 mode (torchao fp8 weights and activations),
    so --quantize fp8 sets fp8 and leaves quantize unset; int8 or nf4 beside --fp8 is a usage error."""
    if quantize is None:
        return None, bool(fp8)
    if quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"unknown --quantize {quantize!r}; use {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "fp8":
        return None, True
    if fp8:
        raise UsageError(f"--quantize {quantize} conflicts with --fp8; choose one weight format",
                         hint="--fp8 is the same as --quantize fp8")
    return quantize, False


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: built once (by the CLI, or from the public API's keyword arguments) and
    passed whole through the API to the loader. Torch-free, so planning can use it before loading.
    Its pixel-deciding part is `pixels()`; the rest (offload, compile, memory cap) never changes a pixel."""

    device: str = "auto"  # auto | cuda | cpu | cuda:N
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 (and the long names)
    offline: bool = False
    allow_pickle: bool = False
    low_memory: bool = False  # accelerate model CPU offload: one component on the GPU at a time
    compile: str | bool = "auto"  # auto | on | off, or a bool; `auto` is decided per plan, and is off without one
    fp8: bool = False
    quantize: str | None = None  # int8 | fp8 | nf4: the transformer's weights (fp8 is the same as fp8=True)
    verbose: bool = False  # let diffusers / transformers log (for --debug)
    max_memory_gib: float | None = None  # --max-memory: a cap on device memory that `auto` plans within
    only: tuple[str, ...] | None = None  # load just these components (`sana decode` needs only the VAE)

    def __post_init__(self) -> None:
        if self.max_memory_gib is not None:  # the API's max_memory: the same check as the option's type
            check_finite("max_memory", self.max_memory_gib)
            if not self.max_memory_gib > 0:
                raise UsageError(f"--max-memory must be more than 0 GiB, got {self.max_memory_gib:g}")
        if self.quantize == "fp8":  # the loader knows one spelling of fp8; pixels() checks the rest
            object.__setattr__(self, "quantize", None)
            object.__setattr__(self, "fp8", True)

    def pixels(self, decode: str = "auto") -> PixelOptions:
        """The pixel-deciding subset with a decode strategy (checked: bad values are usage errors)."""
        return PixelOptions(device=self.device, dtype=self.dtype, fp8=self.fp8, decode=decode, quantize=self.quantize)

    def decode_for(self, decode: str) -> str:
        """--low-memory decodes in strips unless a strategy was chosen: with CPU offload the GPU looks
        empty to the `auto` estimate, which would pick a full decode."""
        return "strips" if self.low_memory and decode == "auto" else decode

    def compiles(self) -> bool:
        """Whether to torch.compile when no plan decides `auto` (then it stays off)."""
        return self.compile is True or self.compile == "on"


# What an image is: the field table's pixel-deciding rows (PIXEL_FIELDS, in record order). With the
# model and the PixelOptions they are exactly what the key hashes, and every record of an image (its
# metadata, its manifest line, the JSON summary) lists them in this order. The optional ones
# (OPTIONAL_FIELDS) are left out of an image's records and key while they are unused (None or empty), so
# the images made before they existed keep their keys and resume; a path is not in the key (KEY_SKIPS),
# its file's hash is; PER_IMAGE_FIELDS may differ within one GPU batch, the rest may not.


class _Job:
    """What an ImageJob does with its fields (the fields come from the field table)."""

    def params(self) -> dict:
        """The per-image inputs that decide the pixels (with the model and `pixels`, the key); the
        optional ones only when used."""
        return {name: _plain(getattr(self, name)) for name in PIXEL_FIELDS
                if name not in OPTIONAL_FIELDS or getattr(self, name) not in (None, ())}

    def summary(self) -> dict:
        """The short form for JSON output: position, the pixel-deciding fields but long ones, path, key."""
        params = {name: value for name, value in self.params().items() if name not in SUMMARY_OMITS}
        return {"index": self.index, "row": self.row, **params, "path": self.path, "key": self.key}

    def record(self, output_dir: str) -> dict:
        """The full record for a manifest line: position, key, file (relative to output_dir), every
        pixel-deciding field and the load options the key was made with."""
        return {"index": self.index, "row": self.row, "key": self.key, "file": os.path.relpath(self.path, output_dir),
                **self.params(), "pixel_options": self.pixels.to_dict()}

    def group_key(self) -> tuple:
        return tuple(getattr(self, name) for name in PIXEL_FIELDS if name not in PER_IMAGE_FIELDS)


def _job_default(row) -> object:
    return () if row.type == "tuple" else None


# One image to make, fully resolved: its position, the required pixel fields, its path and key and
# the load options the key was made with, then the optional pixel fields (unused: None or empty).
ImageJob = make_dataclass("ImageJob", [
    ("index", "int"),
    ("row", "int"),  # the line number in a batch file; 0 for generate
    *[(row.name, row.type) for row in table.FIELDS if row.pixels and not row.optional],
    ("path", "str"),
    ("key", "str"),  # hash of everything that decides the pixels; the batch manifest matches on it
    ("pixels", "PixelOptions", field(default=PixelOptions())),
    *[(row.name, row.type, field(default=_job_default(row))) for row in table.FIELDS if row.pixels and row.optional],
], bases=(_Job,), frozen=True)
ImageJob.__module__ = __name__
ImageJob.__doc__ = "One image to make, fully resolved."


def _plain(value):
    """A field as its records show it: a LoRA set as a list of {id, sha256, scale}."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return [{"id": identity, "sha256": digest, "scale": scale} for identity, digest, scale in value]
    return value


def _as_loras(value) -> tuple:
    """A LoRA set from a record (a list of {id, sha256, scale}) or as a job holds it."""
    if not value:
        return ()
    return tuple((item["id"], item["sha256"], item["scale"]) if isinstance(item, dict) else tuple(item)
                 for item in value)


def make_job(model: ModelRef, pixels: PixelOptions, *, index: int, row: int, path: str, **params) -> ImageJob:
    """An ImageJob with its key computed from the model, the load options and its PIXEL_FIELDS."""
    params = {**params, "loras": _as_loras(params.get("loras"))}
    key_params = {name: _plain(value) for name, value in params.items()
                  if name not in OPTIONAL_FIELDS or value not in (None, ())}
    return ImageJob(index=index, row=row, path=path, key=job_key(model, pixels, **key_params), pixels=pixels,
                    **params)


def resolve_params(model: ModelRef, *, force_size: bool, command_line: bool, offline: bool = False,
                   **given) -> tuple[dict, list[str]]:
    """Defaults and checks of one image's pixel-deciding fields (all but the seed: the field table's
    PLANNING_INPUTS, given by name), the same for `sana generate` and a batch row: (fields, notes).
    `command_line` words the errors for generate's options (a batch row's come from the row and the
    batch defaults). A row of the table without a rule of its own is taken as given: its default when
    unset, its range checked."""
    unknown = sorted(set(given) - set(PLANNING_INPUTS))
    if unknown:
        raise TypeError(f"resolve_params() got unknown field(s) {', '.join(unknown)}")
    given = {name: given.get(name, _unset(table.BY_NAME[name])) for name in PLANNING_INPUTS}
    plain = {}
    for row in table.FIELDS:
        if row.name in PLANNING_INPUTS and row.resolve is None:
            value = row.default if given[row.name] is None else given[row.name]
            if value is not None and row.range is not None:
                table.check_range(row, value, row.option if command_line else f"'{row.column or row.name}'")
            plain[row.name] = value
    prompt, negative_prompt, pag_scale, pag_layers = (given["prompt"], given["negative_prompt"], given["pag_scale"],
                                                     given["pag_layers"])
    width, height, steps, guidance = given["width"], given["height"], given["steps"], given["guidance"]
    loras, controlnet, control_image, control_scale = (given["loras"], given["controlnet"], given["control_image"],
                                                       given["control_scale"])
    image, strength = given["image"], given["strength"]
    prompt = check_prompt(prompt)
    check_prompt(negative_prompt, "the negative prompt", allow_empty=True)
    width, height, notes = resolve_size(model, width, height, force_size)
    steps = model.steps if steps is None else steps
    guidance = model.guidance if guidance is None else guidance
    check_steps_guidance(model, steps, guidance)
    check_pag(model, pag_scale)
    if command_line and pag_layers and not pag_scale:
        raise UsageError("--pag-layers needs --pag-scale above 0")
    if negative_prompt and not model.uses_cfg:
        raise UsageError(f"{model.name} (SANA-Sprint) has no negative prompt"
                         + ("; drop --negative-prompt" if command_line else ""))
    pag_layers = (pag_layers or model.pag_layers) if pag_scale > 0 else None
    if pag_layers is not None:
        presets.check_pag_layers(pag_layers, transformer_layers(model), model.name)
    extra = resolve_inputs(model, size=(width, height), pag_scale=pag_scale, loras=loras, controlnet=controlnet,
                           control_image=control_image, control_scale=control_scale, image=image, strength=strength,
                           offline=offline, command_line=command_line)
    return dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                guidance=float(guidance), pag_scale=float(pag_scale), pag_layers=pag_layers, **extra, **plain), notes


def _unset(row):
    """What resolve_params takes for a field not given: the table's default, or None for a required one."""
    return None if row.default is table.REQUIRED else row.default


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


def resolve_inputs(model: ModelRef, *, size: tuple[int, int] | None = None, pag_scale, loras, controlnet,
                   control_image, control_scale, image, strength, offline: bool, command_line: bool) -> dict:
    """The LoRA, ControlNet and image-to-image fields of a job, checked (files hashed, headers and
    configs compared with the model) before anything loads."""
    from ..inputs import controlnet as control
    from ..inputs import images as inputs
    from ..inputs import lora

    option = (lambda name: f"--{name.replace('_', '-')}") if command_line else (lambda name: f"'{name}'")
    extra: dict = {"loras": lora.resolve_all(loras, model, offline=offline) if loras else ()}
    if control_image is not None and controlnet is None:
        raise UsageError(f"{option('control_image')} needs --controlnet")
    if control_scale is not None and controlnet is None:
        raise UsageError(f"{option('control_scale')} needs --controlnet")
    if controlnet is not None:
        source = control.resolve_controlnet(controlnet, model)
        if pag_scale > 0:
            raise UsageError("a ControlNet cannot be combined with PAG (diffusers has no pipeline for both)")
        if control_image is None:
            raise UsageError(f"--controlnet needs a control image ({option('control_image')} IMAGE)")
        path, digest = inputs.check_image(control_image, option("control_image"), size)
        scale = control.check_control_scale(1.0 if control_scale is None else control_scale)
        extra.update(controlnet=source, control_image=path, control_image_sha256=digest, control_scale=scale)
        content = control.controlnet_digest(source)
        if content is not None:
            extra["controlnet_sha256"] = content
    if strength is not None and image is None:
        raise UsageError(f"{option('strength')} needs {option('image')}")
    if image is not None:
        control.check_takes_image(model)
        path, digest = inputs.check_image(image, option("image"), size)
        extra.update(image=path, image_sha256=digest,
                     strength=control.check_strength(0.6 if strength is None else strength))
    return extra


@dataclass
class Plan:
    """Everything a runner needs, and everything --dry-run shows."""

    command: str
    model: ModelRef
    jobs: list[ImageJob]
    groups: list[list[int]]  # indices into jobs; each inner list is one GPU batch
    output_dir: str
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)
    seed_rule: str = ""
    force_size: bool = False
    seeds_drawn: bool = False  # no --seed: a run draws its own seeds when it starts, so a dry run cannot show them

    def to_dict(self) -> dict:
        """JSON-ready form (the --dry-run --json output)."""
        return {
            "command": self.command,
            "model": {"name": self.model.name, "source": self.model.source, "pipeline": self.model.pipeline,
                      "revision": self.model.revision, "native_size": self.model.native_size},
            "output_dir": self.output_dir,
            "seed_rule": self.seed_rule,
            "seeds_drawn_at_run_time": self.seeds_drawn,
            "images": [asdict(job) for job in self.jobs],
            "groups": [[self.jobs[i].index for i in group] for group in self.groups],
            "notes": self.notes,
        }

    def describe(self) -> str:
        """Human-readable plan for --dry-run."""
        lines = [f"model:   {self.model.describe()}", f"output:  {self.output_dir}"]
        if self.seed_rule:
            lines.append(f"seeds:   {self.seed_rule}")
        if self.seeds_drawn:
            lines.append("note:    no --seed: the seeds (and the file names made from them) below are this dry run's "
                         "draw; a real run draws its own when it starts (pass --seed N to fix them)")
        lines.append(f"images:  {len(self.jobs)} in {len(self.groups)} GPU batch(es)")
        for number, group in enumerate(self.groups, 1):
            first = self.jobs[group[0]]
            pag = f", PAG {first.pag_scale} on {first.pag_layers}" if first.pag_scale > 0 else ""
            pag += "".join(f", LoRA {identity} x{scale:g}" for identity, _, scale in first.loras)
            if first.controlnet:
                pag += f", ControlNet {first.controlnet} x{first.control_scale:g} on {first.control_image}"
            if first.image:
                pag += f", from {first.image} at strength {first.strength:g}"
            lines.append(f"batch {number}: {first.width}x{first.height} rendered as asked (no resize), "
                         f"{first.steps} steps, guidance {first.guidance}{pag}")
            for i in group:
                job = self.jobs[i]
                lines.append(f"  #{job.index} row {job.row} seed {job.seed} -> {job.path}  {_clip(job.prompt)}")
        lines += [f"note:    {note}" for note in self.notes]
        return "\n".join(lines)


def check_loaded_model(plan: Plan, ref: ModelRef) -> None:
    """Re-check, against the model as loaded, what planning could not know before loading (a hub model
    not in the cache has no config to plan with): the same checks as planning, on every job."""
    if plan.model.native_size is not None and plan.model.pipeline is not None:
        return
    from ..inputs import controlnet as control

    for job in plan.jobs:
        check_steps_guidance(ref, job.steps, job.guidance)
        check_pag(ref, job.pag_scale)
        resolve_size(ref, job.width, job.height, force=plan.force_size)
        if job.controlnet:
            control.check_takes_controlnet(ref)
        if job.image:
            control.check_takes_image(ref)


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


def draw_seed() -> int:
    return secrets.randbelow(2**32)


def slugify(text: str, max_chars: int = 40) -> str:
    """A file-name-safe stem from a prompt: Unicode letters and digits kept, anything else a dash."""
    text = unicodedata.normalize("NFKC", text).lower()
    slug = re.sub(r"[^\w]+|_+", "-", text).strip("-")[:max_chars].strip("-")
    slug = slug or "image"
    return slug + "_" if slug.upper() in _WINDOWS_RESERVED else slug


def job_key(model: ModelRef, pixels: PixelOptions | None = None, **params) -> str:
    """A short hash of everything that decides an image's pixels: the model, the image's own
    parameters (ImageJob.params) and the load options that change pixels (PixelOptions)."""
    params = {name: value for name, value in params.items() if name not in _KEY_SKIPS}
    if params.get("loras"):
        params["loras"] = [[lora["sha256"], lora["scale"]] for lora in params["loras"]]
    data = {"key_schema": KEY_SCHEMA, "model": model.source, "revision": model.revision, **params,
            **(pixels or PixelOptions()).key_fields()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def image_format(path: str) -> str:
    """PIL format name for a path's extension; anything else is a usage error."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise UsageError(f"cannot write '{suffix or path}' images", hint="use .png, .jpg or .webp")
    return IMAGE_SUFFIXES[suffix]


def group_jobs(jobs: list[ImageJob], batch_size: int) -> list[list[int]]:
    """Jobs with equal size / steps / guidance / PAG go together, in order of first appearance,
    then split into GPU batches of at most batch_size. Deterministic for a given job list."""
    buckets: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        buckets.setdefault(job.group_key(), []).append(i)
    return [members[start:start + batch_size] for members in buckets.values()
            for start in range(0, len(members), batch_size)]


# ---- generate --------------------------------------------------------------------------------------

def default_batch_size(width: int, height: int) -> int:
    """Images per GPU batch: 4 at 1024px and below, fewer above, one at 4K."""
    return max(1, min(4, (1024 * 1024 * 4) // (width * height)))


def model_for(request: Request) -> ModelRef:
    """The model a request names; without --model, the default family member nearest its size."""
    name = request.model
    if name is None and (request.width or request.height):
        width = check_side("width", request.width or request.height)
        height = check_side("height", request.height or request.width)
        name = presets.for_size(width, height).name
    return modelref.resolve(name, revision=request.revision)


def rekey(plan: Plan, pixels: PixelOptions) -> Plan:
    """The plan with every job keyed for these load options (the run's, whatever planning assumed)."""
    if all(job.pixels == pixels for job in plan.jobs):
        return plan
    jobs = [ImageJob(**{**job.__dict__, "pixels": pixels, "key": job_key(plan.model, pixels, **job.params())})
            for job in plan.jobs]
    return Plan(**{**plan.__dict__, "jobs": jobs})


def plan_generate(request: Request, model: ModelRef, pixels: PixelOptions | None = None) -> Plan:
    """Resolve a `sana generate` request into a Plan. Raises UsageError for anything invalid."""
    pixels = pixels or PixelOptions()
    prompt = check_prompt(request.prompt)
    check_prompt(request.negative_prompt, "the negative prompt", allow_empty=True)
    check_count("--num-images", request.num_images, 1, MAX_IMAGES)
    if request.batch_size is not None:
        check_count("--batch-size", request.batch_size, 1, MAX_BATCH_SIZE)
    params, notes = resolve_params(model, **{name: getattr(request, name) for name in PLANNING_INPUTS},
                                   force_size=request.force_size, command_line=True, offline=request.offline)
    width, height = params["width"], params["height"]
    first_seed = check_seed(request.seed) if request.seed is not None else draw_seed()
    seeds = [check_seed(first_seed + k) for k in range(request.num_images)]
    paths = _generate_paths(request, prompt, seeds)
    if not request.overwrite:
        for path in paths:
            if os.path.lexists(path):
                raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it, or -o elsewhere")
    check_with_pixels(params, pixels)
    jobs = [make_job(model, pixels, index=index, row=0, path=path, seed=seed, **params)
            for index, (seed, path) in enumerate(zip(seeds, paths), 1)]
    batch_size = request.batch_size if request.batch_size is not None else default_batch_size(width, height)
    rule = "as given" if request.seed is not None else "drawn at random"
    if len(seeds) > 1:
        rule += ", +1 for each further image"
    return Plan(command="generate", model=model, jobs=jobs, groups=group_jobs(jobs, batch_size),
                output_dir=str(Path(paths[0]).parent), overwrite=request.overwrite, notes=notes, seed_rule=rule,
                force_size=request.force_size, seeds_drawn=request.seed is None)


def _generate_paths(request: Request, prompt: str, seeds: list[int]) -> list[str]:
    """-o is a file (its extension picks the format) or a directory; default ./sana-out/<slug>-<seed>.png."""
    target = request.output or DEFAULT_OUTPUT_DIR
    if Path(target).name.lower() in IMAGE_SUFFIXES and not os.path.isdir(target):
        # '.png' is a hidden name without a suffix to Python: it would become a directory
        raise UsageError(f"-o {target!r} has an extension but no file name",
                         hint="give a name such as cat.png, or a directory ending in /")
    as_dir = target.endswith(("/", os.sep)) or os.path.isdir(target) or not Path(target).suffix
    if as_dir:
        stem = slugify(prompt)
        return [os.path.join(target, f"{stem}-{seed}.png") for seed in seeds]
    image_format(target)
    if len(seeds) == 1:
        return [target]
    base = Path(target)
    return [str(base.with_name(f"{base.stem}-{k}{base.suffix}")) for k in range(1, len(seeds) + 1)]


# ---- batch -----------------------------------------------------------------------------------------

SEED_RULE = ("a row's own seed (+1 per extra image), else the first 4 bytes of sha256 of "
             "'sana-cli-seed-v1', the base seed, the row's name (or prompt), its occurrence among rows with "
             "that name (or prompt) and the image number: independent of position, batch size, shard and resume")
_NAME_FORBIDDEN = set('/\\<>:"|?*')


# Options that apply to every row of a batch unless the row overrides them: the field table's rows that
# `sana batch` takes as options, and the batch's own.
BatchDefaults = make_dataclass("BatchDefaults", [
    *_dataclass_fields(table.DEFAULTS_FIELDS),
    ("base_seed", "int", field(default=0)),
    ("extension", "str", field(default=".png")),
    ("force_size", "bool", field(default=False)),
    ("offline", "bool", field(default=False)),
])
BatchDefaults.__module__ = __name__
BatchDefaults.__doc__ = "Options that apply to every row unless the row overrides them."


def derive_seed(base: int, identity: str, occurrence: int, image: int) -> int:
    """The documented batch seed rule (SEED_RULE)."""
    digest = hashlib.sha256(f"sana-cli-seed-v1\0{base}\0{identity}\0{occurrence}\0{image}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


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


def plan_batch(rows, model: ModelRef, defaults: BatchDefaults, output_dir: str, *, batch_size: int | None = None,
               shard: tuple[int, int] | None = None, overwrite: bool = False,
               pixels: PixelOptions | None = None) -> tuple[Plan, list]:
    """Rows (from batchfile.load) to a Plan of the valid rows, and a RowError for each invalid one."""
    from .batchfile import RowError

    pixels = pixels or PixelOptions()
    if batch_size is not None:
        check_count("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    check_seed(defaults.base_seed, "--seed")
    total = sum(row.get("n", 1) if isinstance(row.get("n", 1), int) and row.get("n", 1) > 0 else 1 for row in rows)
    if total > MAX_BATCH_IMAGES:
        raise UsageError(f"the batch asks for {total} images; one run makes at most {MAX_BATCH_IMAGES}",
                         hint="split the file")
    check_prompt(defaults.negative_prompt, "the negative prompt", allow_empty=True)

    extension = defaults.extension if defaults.extension.startswith(".") else "." + defaults.extension
    image_format("x" + extension)
    jobs: list[ImageJob] = []
    errors: list[RowError] = []
    occurrences: dict[str, int] = {}
    for row in rows:
        try:
            jobs.extend(_row_jobs(row, model, defaults, extension, output_dir, occurrences, len(jobs), pixels))
        except UsageError as exc:
            errors.append(RowError(row.line, exc.line()))
    jobs = _disambiguate(jobs)
    sizes = {(job.width, job.height) for job in jobs}
    size = batch_size if batch_size is not None else min((default_batch_size(w, h) for w, h in sizes), default=1)
    groups = group_jobs(jobs, size)
    bad = {e.line for e in errors}
    notes = sorted({note for row in rows if row.line not in bad for note in _size_notes(row, model, defaults)})
    if shard is not None:
        index, count = shard
        groups = [group for number, group in enumerate(groups) if number % count == index]
        notes.append(f"shard {index}/{count}: {len(groups)} GPU batch(es) of this run's {len(jobs)} images")
        kept = [i for group in groups for i in group]
        position = {old: new for new, old in enumerate(kept)}
        jobs = [jobs[i] for i in kept]
        groups = [[position[i] for i in group] for group in groups]
    return Plan(command="batch", model=model, jobs=jobs, groups=groups, output_dir=output_dir, overwrite=overwrite,
                notes=notes, seed_rule=SEED_RULE, force_size=defaults.force_size), errors


def check_with_pixels(params: dict, pixels: PixelOptions) -> None:
    """What the load options rule out: a LoRA is fused into the transformer's weights, which fp8, int8 and
    nf4 replace with quantized tensors that cannot take it."""
    if pixels.fp8 and params.get("loras"):
        raise UsageError("--lora cannot be combined with --fp8 (a LoRA is fused into the transformer's weights, "
                         "which fp8 replaces)")
    if pixels.quantize and params.get("loras"):
        raise UsageError(f"--lora cannot be combined with --quantize {pixels.quantize} (a LoRA is fused into the "
                         f"transformer's weights, which {pixels.quantize} replaces)")


def _row_jobs(row, model, defaults, extension, output_dir, occurrences, start, pixels) -> list[ImageJob]:
    check_prompt(row.prompt)
    check_prompt(row.get("negative_prompt", ""), "the negative prompt", allow_empty=True)
    if row.get("size") is not None and (row.get("width") is not None or row.get("height") is not None):
        raise UsageError("'size' conflicts with 'width'/'height'")
    if row.get("size") is not None:
        check_side("'size'", row.get("size"))
    given = {}
    for field_ in table.FIELDS:  # the row's column, else the batch default, else the field's default
        if field_.name in PLANNING_INPUTS:
            fallback = getattr(defaults, field_.name) if field_.in_defaults else _unset(field_)
            given[field_.name] = row.get(field_.column, fallback) if field_.column else fallback
    given.update(prompt=row.prompt, width=row.get("width", row.get("size", defaults.width)),
                 height=row.get("height", row.get("size", defaults.height)), pag_scale=float(given["pag_scale"]),
                 # --controlnet serves the rows that have a control image; the others run plain
                 controlnet=defaults.controlnet if given["control_image"] is not None else None)
    params, _ = resolve_params(model, **given, force_size=defaults.force_size, command_line=False,
                               offline=defaults.offline)
    check_with_pixels(params, pixels)
    prompt = params["prompt"]
    count = row.get("n", 1)
    if count < 1 or count > MAX_IMAGES:
        raise UsageError(f"'n' must be 1..{MAX_IMAGES}, got {count}")
    name = check_name(row.get("name")) if row.get("name") is not None else None
    identity = name if name is not None else prompt
    occurrence = occurrences.get(identity, 0)
    occurrences[identity] = occurrence + 1
    own_seed = row.get("seed")
    jobs = []
    for image in range(count):
        if own_seed is not None:
            seed = check_seed(own_seed + image)
        else:
            seed = derive_seed(defaults.base_seed, identity, occurrence, image)
        if name is not None:
            stem = name if count == 1 else f"{name}-{image + 1}"
        else:
            stem = f"{row.line:05d}-{slugify(prompt, 48)}-{seed}"
        jobs.append(make_job(model, pixels, index=start + len(jobs) + 1, row=row.line,
                             path=os.path.join(output_dir, stem + extension), seed=seed, **params))
    return jobs


def _size_notes(row, model, defaults) -> list[str]:
    try:
        return resolve_size(model, row.get("width", row.get("size", defaults.width)),
                            row.get("height", row.get("size", defaults.height)), defaults.force_size)[2]
    except UsageError:
        return []


def _disambiguate(jobs: list[ImageJob]) -> list[ImageJob]:
    """Give colliding file names (ignoring case) -2, -3 ... suffixes, in plan order."""
    seen: set[str] = set()
    result = []
    for job in jobs:
        path = Path(job.path)
        candidate, number = path, 1
        while str(candidate).casefold() in seen:
            number += 1
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        seen.add(str(candidate).casefold())
        result.append(job if candidate == path else ImageJob(**{**job.__dict__, "path": str(candidate)}))
    return result
