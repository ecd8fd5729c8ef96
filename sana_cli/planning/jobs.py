"""What is asked and what is made: Request (generate), BatchDefaults (batch), the load options
(LoadOptions, and PixelOptions, the part of them that decides pixels) and ImageJob, one image fully
resolved. The per-image fields of Request, BatchDefaults and ImageJob come from the field table.

Pure Python (no torch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, make_dataclass

from ..errors import UsageError
from ..inputs.values import check_finite
from . import fields as table
from .fields import OPTIONAL_FIELDS, PER_IMAGE_FIELDS, PIXEL_FIELDS, QUANTIZE_CHOICES, SUMMARY_OMITS


_DTYPES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
           "fp32": "fp32", "float32": "fp32"}


_EXACT_DECODES = ("auto", "full", "strips", "patch-conv")  # equal to a full decode up to float rounding


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


class _Job:
    """What an ImageJob does with its fields (the fields come from the field table)."""

    def params(self) -> dict:
        """The per-image inputs that decide the pixels (with the model and `pixels`, the key); the
        optional ones only when used."""
        return {name: record_value(getattr(self, name)) for name in PIXEL_FIELDS
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


def record_value(value):
    """A field as its records show it: a LoRA set as a list of {id, sha256, scale}."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return [{"id": identity, "sha256": digest, "scale": scale} for identity, digest, scale in value]
    return value


def as_loras(value) -> tuple:
    """A LoRA set from a record (a list of {id, sha256, scale}) or as a job holds it."""
    if not value:
        return ()
    return tuple((item["id"], item["sha256"], item["scale"]) if isinstance(item, dict) else tuple(item)
                 for item in value)


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
