"""The `sana generate` (or, for a video, `sana video`) command that makes an image again, from the `sana`
metadata inside it.

One table, OPTIONS, maps every metadata field that decides the pixels to the option that sets it, and
NOT_OPTIONS names every other field with the reason it needs no option. A test generates images over
the whole parameter space and checks that each field of their metadata is in one of the two, so a
field added to the metadata cannot be left out of the command without a test failing; a field neither
table knows (an image from a newer sana-cli) is reported as a warning.

The metadata is untrusted (anyone can write it into a file): every value is type-checked, the command
is quoted for a POSIX shell, text holding control or invisible characters is written with visible
`$'\\u202e'` escapes (bash, zsh, ksh), and the prompt comes after `--`, so a prompt starting with `-` is
never read as an option.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SanaError, UsageError
from ..models import modelref, presets
from ..terminal import has_unsafe, is_unsafe
from . import fields, plan

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # metadata (torch) name -> --dtype
DECODE_FAMILIES = tuple(choice for choice in fields.DECODE_CHOICES if choice != "auto")  # "strips:64" -> strips
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:[0-9]{1,3})?", re.ASCII)


class BadMetadata(UsageError):
    """The image's metadata cannot be turned into a command (exit 2)."""


@dataclass(frozen=True)
class Option:
    field: str  # the metadata key
    option: str  # the `sana generate` option
    value: Callable[[object, dict], str | bool | None]  # metadata value (and all metadata) -> option value;
    #                                                      None omits the option, True is a flag


def _int(value, meta):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("a whole number")
    return str(value)


def _number(value, meta):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("a finite number")
    return repr(float(value))  # the shortest text that reads back as the same float


def _text(value, meta):
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("text")
    return value


def _pag_scale(value, meta):
    return _number(value, meta) if value else None


def _pag_layers(value, meta):
    return _text(value, meta) if meta.get("pag_scale") else None


def _dtype(value, meta):
    if value is None:
        return None
    if value not in DTYPES:
        raise ValueError(f"one of {', '.join(DTYPES)}")
    return DTYPES[value]


def _device(value, meta):
    if value is None:
        return None
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError("a device such as cpu or cuda")
    return value


def _decode(value, meta):
    if value is None:
        return None
    family = value.split(":", 1)[0] if isinstance(value, str) else None
    if family not in DECODE_FAMILIES:
        raise ValueError(f"a decode strategy ({', '.join(DECODE_FAMILIES)})")
    return family


def _flag(value, meta):
    if value is None or value is False:
        return None
    if value is not True:
        raise ValueError("true or false")
    return True


def _fp8(value, meta):
    """--fp8 as asked, from the pixel options the image was keyed on."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("an object")
    return _flag(value.get("fp8"), meta)


def _loras(value, meta):
    """One --lora ID:SCALE per LoRA, in the order fused. The hash is checked when the command runs: a
    changed file makes another key, so it is not taken for this image."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("a list of LoRAs")
    specs = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"].strip():
            raise ValueError("a list of LoRAs, each with an id")
        specs.append(f"{item['id']}:{_number(item.get('scale'), meta)}")
    return specs


def _path(value, meta):
    """An input image or ControlNet, as recorded (an absolute path, a name or a hub id)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError("a path or name")
    return value


def _optional_number(value, meta):
    return None if value is None else _number(value, meta)


def _optional_int(value, meta):
    return None if value is None else _int(value, meta)


def _quantize(value, meta):
    """--quantize as asked (int8 or nf4; fp8 is recorded as --fp8), from the pixel options."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("an object")
    quantize = value.get("quantize")
    if quantize is None:
        return None
    if quantize not in ("int8", "nf4"):
        raise ValueError("a --quantize value (int8 or nf4)")
    return quantize


def _revision(value, meta):
    """The exact commit when the metadata has it (the branch may have moved since), else the revision."""
    if _is_local(meta):
        return None  # --revision applies to hub models only
    pinned = meta.get("commit") or value
    if pinned is None:
        return None
    if not isinstance(pinned, str) or not re.fullmatch(r"[\w.\-/]{1,200}", pinned, re.ASCII) or ".." in pinned:
        raise ValueError("a branch, tag or commit")
    return pinned


# The rules a row of the field table names (its `reproduce`): metadata value -> option value.
RULES: dict[str, Callable[[object, dict], str | bool | list | None]] = {
    "int": _int, "number": _number, "text": _text, "optional_number": _optional_number, "optional_int": _optional_int,
    "path": _path,
    "loras": _loras, "pag_scale": _pag_scale, "pag_layers": _pag_layers,
}
# The options that are not per-image fields: the model's revision and the load options that decide pixels.
_LOAD_OPTIONS = (
    Option("revision", "--revision", _revision),
    Option("dtype", "--dtype", _dtype),
    Option("device", "--device", _device),
    Option("decode", "--decode", _decode),
    Option("pixel_options", "--fp8", _fp8),
    Option("pixel_options", "--quantize", _quantize),
)
# The order commands were printed in before the field table; an option not named here comes last.
_PRINT_ORDER = ("--revision", "--width", "--height", "--steps", "--guidance", "--seed", "--negative-prompt",
                "--pag-scale", "--pag-layers", "--dtype", "--device", "--decode", "--fp8", "--lora", "--controlnet",
                "--control-image", "--control-scale", "--image", "--strength", "--quantize")


def _options() -> tuple[Option, ...]:
    made = [Option(row.name, row.option, RULES[row.reproduce]) for row in fields.FIELDS if row.reproduce]
    made += _LOAD_OPTIONS
    return tuple(sorted(made, key=lambda option: (_PRINT_ORDER.index(option.option) if option.option in _PRINT_ORDER
                                                  else len(_PRINT_ORDER) + made.index(option))))


# Every metadata field that decides the pixels -> the option that sets it, in the order printed: the
# field table's rows with a reproduce rule, and the load options. The model and the prompt are handled
# by model_argument() and the final `-- PROMPT`.
OPTIONS: tuple[Option, ...] = _options()

# Every other field, and why it needs no option of its own.
NOT_OPTIONS = {
    "prompt": "the positional PROMPT, after --",
    "model": "--model (model_argument)",
    "model_id": "--model, for a local directory (model_argument)",
    "commit": "--revision pins it (_revision)",
    "sana_cli": "the version that wrote the file",
    "key": "a hash of the fields above",
    "rendered": "equal to width x height: sana-cli renders the size asked for",
    "pipeline": "follows from the model",
    "scheduler": "follows from the model",
    "chi": "always on",
    "intermediate_timesteps": "follows from the model and steps",
    "generator": "follows from the device",
    "versions": "library versions, for the record",
    "key_schema": "the version of the key's recipe",
    "decode_device": "`sana decode --device` finished the image on another kind of device than the run; the "
                     "command reproduces the run, which decodes where it denoises",
    "run_key": "the key the run planned, for an image `sana decode` finished on another kind of device",
    "control_image_sha256": "checked when the command runs: another file gives another key",
    "controlnet_sha256": "checked when the command runs: another directory content gives another key",
    "image_sha256": "checked when the command runs: another file gives another key",
    "mask_sha256": "checked when the command runs: another file gives another key",
    "frame": "the frame's number in its video (a `sana video --frames-dir` PNG): the command makes the video",
}


def model_argument(meta: dict) -> tuple[str, bool]:
    """The --model value and whether it is a local path. A preset or hub id is passed as named; a
    local directory by the absolute path it was loaded from. A missing or malformed model is
    BadMetadata, never `--model None`."""
    name, source = meta.get("model"), meta.get("model_id")
    if not isinstance(name, str) or not name.strip():
        raise BadMetadata("its sana metadata names no model, so no command can reproduce it")
    if presets.find(name) is not None:
        return presets.find(name).name, False
    if isinstance(source, str) and source.startswith("/"):
        return source, True
    if modelref.is_hub_id(name):
        return name, False
    raise BadMetadata(f"its sana metadata names the model {name!r}, which is neither a preset, a hub id nor an "
                      "absolute directory")


def _is_local(meta: dict) -> bool:
    try:
        return model_argument(meta)[1]
    except BadMetadata:
        return False


def unknown_fields(meta: dict) -> list[str]:
    """Fields this version knows nothing about: the command may not reproduce them."""
    known = {o.field for o in OPTIONS} | set(NOT_OPTIONS)
    return sorted(str(k) for k in meta if k not in known)


def needs_force_size(model: str, revision: str | None, width: int, height: int, *, video: bool = False) -> bool:
    """Whether `sana generate` would refuse this size for this model without --force-size. When the
    model cannot be resolved here (not cached, not on this machine) it is assumed to: the flag only
    permits a size, it never changes pixels."""
    try:
        ref = modelref.resolve(model, revision=revision)
    except SanaError:
        return True
    if video:
        from .video import check_video_size, video_defaults

        try:
            check_video_size(ref, video_defaults(ref), width, height, False)
        except UsageError:
            return True
        return False
    if ref.native_size is None:
        return True
    try:
        plan.resolve_size(ref, width, height, False)
    except UsageError:
        return True
    return False


def command_parts(meta: dict, output: str | None = None) -> list[tuple[str, bool]]:
    """The command as (argument, force quotes) pairs. Raises BadMetadata for anything malformed."""
    model, local = model_argument(meta)
    prompt = meta.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadMetadata("its sana metadata has no prompt")
    video = meta.get("frames") is not None
    parts: list[tuple[str, bool]] = [("sana", False), ("video" if video else "generate", False), ("--model", False),
                                     (model, local)]
    values: dict[str, str] = {}
    for option in OPTIONS:
        try:
            value = option.value(meta.get(option.field), meta)
        except ValueError as exc:
            raise BadMetadata(f"its sana metadata has an invalid {option.field!r} (expected {exc})") from None
        if value is None:
            continue
        values[option.field] = value
        for one in value if isinstance(value, list) else [value]:  # a repeatable option: once per value
            parts.append((option.option, False))
            if one is not True:
                parts.append((one, False))
    if "width" not in values or "height" not in values:
        raise BadMetadata("its sana metadata has no width and height")
    if needs_force_size(model, values.get("revision"), int(values["width"]), int(values["height"]), video=video):
        parts.append(("--force-size", False))
    if output:
        parts += [("-o", False), (output, False)]
    parts += [("--", False), (prompt, False)]
    return parts


def reproduce_command(meta: dict, image_path: str | None = None) -> str:
    """The `sana generate` command line that makes this image again, into a sibling file (the
    original name is taken, and sana never overwrites)."""
    output = None
    if image_path:
        path = Path(image_path)
        output = str(path.with_name(f"{path.stem}-again{path.suffix}"))
    return " ".join(shell_quote(text, force=force) for text, force in command_parts(meta, output))


def shell_quote(text: str, *, force: bool = False) -> str:
    """text as one shell word. Plain text: shlex.quote (single quotes when needed, always with
    force). Text with control, bidi or invisible characters: $'...' with each of them escaped, so
    the line on screen is the line that runs (bash, zsh and ksh read $'...')."""
    if not has_unsafe(text):
        quoted = shlex.quote(text)
        return quoted if quoted.startswith("'") or not force else "'" + text + "'"
    out = []
    for char in text:
        code = ord(char)
        if char in "\\'":
            out.append("\\" + char)
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif char == "!":
            out.append("\\x21")  # never a history expansion in an interactive shell
        elif is_unsafe(char):
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "$'" + "".join(out) + "'"
