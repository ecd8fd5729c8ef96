"""Option types and the option groups that several commands share, each declared once."""

from __future__ import annotations


import click

from ..planning import fields as table
from ..planning.fields import DECODE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES


class FiniteFloat(click.FloatRange):
    """The one float type of every option of every command: a number that is neither NaN nor infinite
    (Click's float and FloatRange take `nan`, `inf` and `1e999`, and NaN passes any range check), then
    checked against the range if one is given. A bad value is exit 2 while parsing, before anything runs."""

    name = "float"

    def convert(self, value, param, ctx):
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


FINITE = FiniteFloat()
EPILOG = """\b
Exit codes: 0 success, 1 generation failed, 2 bad usage or input, 3 batch partly
failed, 4 environment (no CUDA, model missing or not cached offline, missing
package), 130/143 interrupted by SIGINT/SIGTERM.
\b
Every option can also come from the environment as SANA_<COMMAND>_<OPTION>
(e.g. SANA_BATCH_BATCH_SIZE=8); SANA_MODEL and SANA_OUTPUT_DIR serve every command.
Shell completion: eval "$(_SANA_COMPLETE=bash_source sana)" (zsh_source, fish_source)."""


def model_options(function):
    options = [
        click.option("-m", "--model", envvar="SANA_MODEL", show_envvar=True, metavar="NAME|HUB_ID|DIR",
                     help="Preset (see `sana models`), hub repo id or local diffusers directory. "
                          "Default: picked from --size (512 -> sana-1600m-512, 1024 -> sana-1600m-1024, "
                          "2048 -> sana-2k, "
                          "4096 -> sana-4k)."),
        click.option("--revision", metavar="REV", help="Hub branch, tag or commit to load."),
        click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", show_envvar=True,
                     help="Use only the local Hugging Face cache; never touch the network."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cuda|cuda:N|cpu",
                     help="Where to run. Real models need CUDA unless you pass --device cpu."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(DTYPE_CHOICES),
                     help="Weights dtype. auto: the checkpoint's own on every device, as the model cards load "
                          "it: BF16 checkpoints in bf16; FP16 checkpoints with the transformer in fp16 and Gemma "
                          "and the DC-AE in bf16; fp32-stored weights (the tiny models) in bf16 on CUDA, fp32 on "
                          "the CPU. fp16 also keeps Gemma and the DC-AE in bf16 (they overflow in fp16)."),
        click.option("--decode", default="auto", show_default=True, type=click.Choice(DECODE_CHOICES),
                     help="VAE decode: full; strips (exact, low memory); patch-conv (model card helper); "
                          "tiled (diffusers tiling, inexact). auto: full when it fits in free memory, else strips."),
        click.option("--low-memory", is_flag=True,
                     help="Keep one model component on the GPU at a time (CPU offload) and decode in strips."),
        click.option("--compile", "compile_mode", default="auto", show_default=True,
                     type=click.Choice(["auto", "on", "off"]),
                     help="torch.compile the transformer (cached for later runs). auto: on for long GPU runs."),
        click.option("--max-memory", type=FiniteFloat(min=0, min_open=True), envvar="SANA_MAX_MEMORY",
                     show_envvar=True, metavar="GiB",
                     help="Cap on the GPU memory this run holds (the allocator never goes past it); auto plans "
                          "within it: the decode strategy, CPU offload when the weights do not fit, and a GPU "
                          "batch that does not fit is redone one image at a time. On the CPU it steers the "
                          "decode only. Default: no cap (all free memory)."),
        click.option("--keep-latents", is_flag=True,
                     help="Also keep each image's denoised latents as NAME.latents.safetensors (kept anyway when a "
                          "decode fails after every fallback); `sana decode` turns them into the image."),
        click.option("--fp8", is_flag=True,
                     help="fp8 linear layers via torchao (Hopper/Ada GPUs; changes pixels slightly)."),
        click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), metavar="|".join(QUANTIZE_CHOICES),
                     help="Store the transformer's weights quantized, computing in --dtype: int8 (torchao, any "
                          "device, about half the memory), fp8 (the same as --fp8), nf4 (bitsandbytes 4-bit, CUDA). "
                          "Changes pixels slightly."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow loading pickle (.bin) weights. Only for sources you trust."),
        click.option("--no-server", is_flag=True,
                     help="Render in this process even when a `sana serve` server runs (or SANA_SERVER names one)."),
        click.option("--dry-run", is_flag=True, help="Validate and print the plan; load nothing."),
        click.option("--json", "json_output", is_flag=True, help="Print one JSON object on stdout, nothing else."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or log lines on stderr."),
        click.option("--debug", is_flag=True, help="Show tracebacks for errors."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def field_options(command: str, group: str):
    """The per-image options of `command` (generate or batch) in `group` (image or input), made from the
    field table: one declaration serves both commands, with batch's help where its row has its own."""
    rows = table.options(command, group)

    def decorate(function):
        for row in reversed(rows):
            function = _option(row, command)(function)
        return function
    return decorate


def _option(row: table.Field, command: str):
    kind = row.type.split(" | ")[0]
    extra = {}
    if kind == "tuple":
        extra["multiple"] = True
    else:
        extra["type"] = {"int": int, "float": FINITE, "str": None}[kind]
        if row.default is not None:
            extra["default"] = row.default
    help_ = row.batch_help if command == "batch" and row.batch_help else row.help
    return click.option(*row.flags, row.name, metavar=row.metavar, show_default=row.show_default or None,
                        help=help_, **extra)


def field_values(given: dict) -> dict:
    """The table's fields from the values of field_options: --size stands for --width and --height."""
    values = dict(given)
    size = values.pop("size", None)
    if size is not None and (values.get("width") is not None or values.get("height") is not None):
        raise click.UsageError("--size conflicts with --width/--height; give one or the other")
    if size is not None:
        from ..planning.plan import check_side

        check_side("--size", size)  # its own name in its errors, not "width"
        values.update(width=size, height=size)
    if "loras" in values:
        values["loras"] = tuple(values["loras"])
    return values


image_options = {command: field_options(command, "image") for command in ("generate", "batch")}
input_options = {command: field_options(command, "input") for command in ("generate", "batch")}
