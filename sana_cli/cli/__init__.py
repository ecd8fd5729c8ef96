"""The `sana` command: parses options, calls the API, prints results. Nothing else lives here.

torch, diffusers and transformers are imported only inside commands that load a model, so
`sana --help`, `sana models` and `--dry-run` start instantly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback

import click

from ..errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_USAGE,
    GenerationError,
    Interrupted,
    PartialFailure,
    SanaError,
    UsageError,
)
from ..terminal import json_text, printable
from ..version import __version__

DECODE_CHOICES = ("auto", "full", "strips", "patch-conv", "tiled")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.version_option(__version__, "-V", "--version", prog_name="sana-cli")
def cli() -> None:
    """Run NVIDIA's Sana text-to-image models from the command line.

    \b
      sana generate "a cyberpunk cat with a neon sign" --size 4096
      sana generate "a red fox" --model tiny --seed 1 --json
      sana models
    """


def _model_options(function):
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
                     type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
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
        click.option("--quantize", type=click.Choice(["int8", "fp8", "nf4"]), metavar="int8|fp8|nf4",
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


def _input_options(function):
    """LoRA, ControlNet and image-to-image: what `generate` makes, or every row of `batch` by default."""
    options = [
        click.option("--lora", "loras", multiple=True, metavar="PATH_OR_HUB_ID[:SCALE]",
                     help="A LoRA (.safetensors file, a directory holding one, or hub id org/name[@REV]) fused into "
                          "the transformer, scale -4..4 (default 1). Repeat for several."),
        click.option("--controlnet", metavar="NAME|ID|DIR",
                     help="A SanaControlNetModel (tiny-controlnet, hub id or directory); needs --control-image."),
        click.option("--control-image", metavar="IMAGE", help="The ControlNet's control image (PNG, JPEG or WebP)."),
        click.option("--control-scale", type=FINITE, metavar="X",
                     help="ControlNet conditioning scale, 0-2 (default 1)."),
        click.option("--image", metavar="IMAGE",
                     help="Start from this image (image-to-image; SANA-Sprint models). Resized to cover the size "
                          "and centre-cropped."),
        click.option("--strength", type=FINITE, metavar="X",
                     help="How far image-to-image moves from --image, 0-1 (default 0.6)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@cli.command(epilog=EPILOG)
@click.argument("prompt")
@click.option("-s", "--size", type=int, metavar="N", help="Square size in pixels (multiple of 32).")
@click.option("-W", "--width", type=int, metavar="N", help="Width in pixels (multiple of 32).")
@click.option("-H", "--height", type=int, metavar="N", help="Height in pixels (multiple of 32).")
@click.option("--steps", type=int, metavar="N", help="Denoising steps. Default: the model's (20; Sprint 2).")
@click.option("-g", "--guidance", type=FINITE, metavar="X", help="Guidance scale. Default: the model's (4.5; 4K 5.0).")
@click.option("--negative-prompt", default="", metavar="TEXT", help="What to steer away from.")
@click.option("--seed", type=int, metavar="N",
              help="Seed of the first image (drawn at random if omitted); +1 per image.")
@click.option("-n", "--num-images", type=int, default=1, show_default=True, metavar="N", help="Images to make.")
@click.option("--pag-scale", type=FINITE, default=0.0, metavar="X",
              help="Perturbed-attention guidance scale; > 0 uses SanaPAGPipeline (model card: 2.0).")
@click.option("--pag-layers", metavar="LAYERS",
              help="Comma-separated layer patterns for PAG, each matching a transformer_blocks.N of the model. "
                   "Default: the model's (transformer_blocks.8; the tiny models transformer_blocks.1).")
@click.option("-o", "--output", envvar="SANA_OUTPUT_DIR", show_envvar=True, metavar="PATH",
              help="Image file (.png/.jpg/.webp) or directory. Default: ./sana-out/<prompt>-<seed>.png")
@click.option("--overwrite", is_flag=True, help="Replace existing files (never done otherwise).")
@click.option("--force-size", is_flag=True, help="Render a size far from the model's native scale anyway.")
@click.option("--batch-size", type=int, metavar="N", help="Images per GPU batch with -n. Default: by size.")
@_input_options
@_model_options
def generate(prompt, size, width, height, steps, guidance, negative_prompt, seed, num_images, pag_scale, pag_layers,
             output, overwrite, force_size, batch_size, loras, controlnet, control_image, control_scale, image,
             strength, model, revision, offline, device, dtype, decode, low_memory, compile_mode, max_memory,
             keep_latents, fp8, quantize, allow_pickle, no_server, dry_run, json_output, quiet, debug):
    """Make images from one PROMPT ('-' reads it from stdin).

    Paths of written images go to stdout, one per line (or one JSON object with --json);
    progress and logs go to stderr.
    """
    with _reporting(json_output, debug):
        from ..planning.plan import Request, check_side, model_for, plan_generate
        from ..reporting.progress import progress_interval

        progress_interval()
        load = _load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                             quantize)
        pixels = load.pixels(decode)
        if prompt == "-":
            from ..planning.batchfile import read_prompt_stdin

            prompt = read_prompt_stdin()
        if size is not None and (width is not None or height is not None):
            raise click.UsageError("--size conflicts with --width/--height; give one or the other")
        if size is not None:
            check_side("--size", size)  # its own name in its errors, not "width"
        request = Request(prompt=prompt, model=model, width=width if size is None else size,
                          height=height if size is None else size, steps=steps, guidance=guidance,
                          negative_prompt=negative_prompt, seed=seed, num_images=num_images, pag_scale=pag_scale,
                          pag_layers=pag_layers, output=output, overwrite=overwrite, force_size=force_size,
                          revision=revision, batch_size=batch_size, loras=tuple(loras), controlnet=controlnet,
                          control_image=control_image, control_scale=control_scale, image=image, strength=strength,
                          offline=offline)
        plan = plan_generate(request, model_for(request), pixels)
        if dry_run:
            _print_plan(plan, json_output)
            return
        from ..api import run_plan
        from ..reporting.progress import ProgressDisplay
        from ..reporting.results import StopToken

        display = ProgressDisplay(len(plan.jobs), quiet=quiet)
        from ..server.client import uses_input_files

        remote = None if no_server else _attach(plan.model, load, keep_latents, display,
                                                input_files=any(uses_input_files(job) for job in plan.jobs))
        stop = StopToken()
        try:
            with _graceful_signals(stop, display, "stopping at the next step"):
                result = run_plan(plan, load, decode=decode, keep_latents=keep_latents, events=display, stop=stop,
                                  abort_in_flight=True, loaded=remote)
        finally:
            display.close()
        _results_phase()
        if json_output:
            _emit_json(result.to_dict())
        else:
            for image in result.images:
                _echo_result(image.written.path)
            seeds = ", ".join(str(image.job.seed) for image in result.images)
            seconds = result.outcome.timings["total"] + result.load_seconds
            display.log(f"sana: {len(result.images)} image(s) in {seconds:.1f} s "
                         f"(seed {seeds}; decode {result.images[0].decode})")


def _attach(model, load, keep_latents: bool, display, input_files: bool = False):
    """The server this run goes to (a RemoteModel), or None to run here. SANA_SERVER that cannot be
    reached is exit 4; a run a server cannot do the same way (see client.attach_blocker) stays here."""
    from ..server import client

    endpoint = client.discover(note=lambda message: display.log(f"sana: {message}"))
    if endpoint is None:
        return None
    blocker = client.attach_blocker(model, load, keep_latents=keep_latents, input_files=input_files)
    if blocker is not None:
        display.log(f"sana: not using the server at {endpoint.describe()}: {blocker}; rendering here")
        return None
    # Said when the first image goes to the server: a fully resumed batch renders nothing anywhere.
    return client.remote_model(endpoint, model, load,
                               announce=lambda: display.log(f"sana: rendering on the server at {endpoint.describe()}"))


def _load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                  quantize=None):
    """The model options of a command as one LoadOptions, built once and passed whole to the API."""
    from ..planning.plan import LoadOptions

    return LoadOptions(device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, low_memory=low_memory,
                       compile=compile_mode, fp8=fp8, max_memory_gib=max_memory, verbose=debug, quantize=quantize)


def _parse_shard(ctx, param, value):
    if value is None:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not I/N (for example 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r}: N must be at least 1 and I in 0..N-1 (shards count from 0)")
    return index, count


@cli.command(epilog=EPILOG)
@click.argument("file", metavar="FILE")
@click.option("-o", "--output-dir", envvar="SANA_OUTPUT_DIR", show_envvar=True, default="sana-out",
              show_default=True, metavar="DIR", help="Where images and results.jsonl go.")
@click.option("-s", "--size", type=int, metavar="N", help="Default square size for rows without one.")
@click.option("-W", "--width", type=int, metavar="N", help="Default width.")
@click.option("-H", "--height", type=int, metavar="N", help="Default height.")
@click.option("--steps", type=int, metavar="N", help="Default steps (the model's if omitted).")
@click.option("-g", "--guidance", type=FINITE, metavar="X", help="Default guidance scale.")
@click.option("--negative-prompt", default="", metavar="TEXT", help="Default negative prompt.")
@click.option("--pag-scale", type=FINITE, default=0.0, metavar="X",
              help="Default PAG scale (> 0 uses SanaPAGPipeline).")
@click.option("--pag-layers", metavar="LAYERS",
              help="Layer patterns for PAG, as for generate. Default: the model's (transformer_blocks.8; the tiny "
                   "models transformer_blocks.1).")
@click.option("--seed", "base_seed", type=int, default=0, show_default=True, metavar="N",
              help="Base seed for rows without their own seed (see README: seeds).")
@click.option("--ext", "extension", type=click.Choice(["png", "jpg", "webp"]), default="png", show_default=True,
              help="Image format of the files.")
@click.option("--batch-size", type=int, metavar="N", help="Images per GPU batch. Default: 4 at 1024px, 1 at 4K.")
@click.option("--shard", callback=_parse_shard, metavar="I/N",
              help="Render only slice I of N (0-based), for job arrays. The union of all slices equals the whole run.")
@click.option("--input-format", type=click.Choice(["auto", "txt", "jsonl", "csv"]), default="auto",
              show_default=True, help="Format of FILE (auto: by extension; stdin: by content).")
@click.option("--skip-invalid", is_flag=True, help="Report invalid rows and render the rest (default: refuse all).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed image (exit 1).")
@click.option("--overwrite", is_flag=True, help="Redo every image, replacing existing files.")
@click.option("--force-size", is_flag=True, help="Allow sizes far from the model's native scale.")
@_input_options
@click.option("--report", is_flag=True,
              help="Write index.html (a gallery with thumbnails, failures highlighted, relative links) in the output "
                   "directory, and append a Markdown summary to $GITHUB_STEP_SUMMARY when it is set.")
@_model_options
def batch(file, output_dir, size, width, height, steps, guidance, negative_prompt, pag_scale, pag_layers, base_seed,
          extension, batch_size, shard, input_format, skip_invalid, fail_fast, overwrite, force_size, loras, controlnet,
          control_image, control_scale, image, strength, report, model,
          revision, offline, device, dtype, decode, low_memory, compile_mode, max_memory, keep_latents, fp8,
          quantize, allow_pickle, no_server, dry_run, json_output,
          quiet, debug):
    """Render every prompt of FILE (.txt, .jsonl or .csv; '-' reads stdin) into --output-dir.

    \b
    .txt:   one prompt per line; blank lines and lines starting with # are skipped.
    .jsonl: {"prompt": ..., "negative_prompt", "seed", "size" | "width"/"height",
            "steps", "guidance", "pag_scale", "name", "n", "lora" (one, or a list),
            "control_image", "control_scale", "image", "strength"} per line.
    .csv:   a header row with the same field names.

    Every row is checked before anything loads. Rerunning the same command resumes: finished images are
    kept, missing ones made. Paths of written images go to stdout (or one JSON summary with --json).
    """
    with _reporting(json_output, debug):
        from ..planning.plan import BatchDefaults, check_side
        from ..reporting.progress import progress_interval

        progress_interval()
        load = _load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                             quantize)
        pixels = load.pixels(decode)
        if size is not None and (width is not None or height is not None):
            raise click.UsageError("--size conflicts with --width/--height; give one or the other")
        if size is not None:
            check_side("--size", size)
        defaults = BatchDefaults(width=width if size is None else size, height=height if size is None else size,
                                 steps=steps, guidance=guidance, negative_prompt=negative_prompt, pag_scale=pag_scale,
                                 pag_layers=pag_layers, base_seed=base_seed, extension="." + extension,
                                 force_size=force_size, loras=tuple(loras), controlnet=controlnet,
                                 control_image=control_image, control_scale=control_scale, image=image,
                                 strength=strength, offline=offline)
        common = dict(model=model, output_dir=output_dir, defaults=defaults, batch_size=batch_size, shard=shard,
                      overwrite=overwrite, skip_invalid=skip_invalid, input_format=input_format, revision=revision)
        if dry_run:
            from ..api import plan_batch_file

            plan, invalid, _ = plan_batch_file(file, pixels=pixels, **common)
            for error in invalid:
                _err(f"sana: skipping invalid {error}")
            _print_plan(plan, json_output)
            return
        from ..api import batch as run_batch
        from ..reporting.progress import ProgressDisplay
        from ..reporting.results import StopToken

        display = ProgressDisplay(0, quiet=quiet)  # the total arrives with the "plan" event
        session = None
        if not no_server:
            from ..api import Session
            from ..engine.distributed import launched_processes
            from ..planning.plan import Request, model_for

            ref = model_for(Request(prompt="", model=model, width=defaults.width, height=defaults.height,
                                    revision=revision))
            # rows may name LoRAs or images too: the server refuses those rows, saying to use --no-server
            input_files = bool(loras or controlnet or control_image or image)
            remote = None if launched_processes() else _attach(ref, load, keep_latents, display,
                                                               input_files=input_files)
            session = None if remote is None else Session(remote)
        stop = StopToken()
        try:
            with _graceful_signals(stop, display, "finishing the current GPU batch"):
                result = run_batch(file, fail_fast=fail_fast, decode=decode, options=load, keep_latents=keep_latents,
                                   events=display, stop=stop, session=session, **common)
        finally:
            display.close()
        for error in result.invalid_rows:
            display.log(f"sana: skipped invalid row: {error}")
        summary = result.to_dict()
        if report and result.is_main_process:
            summary["report"] = _write_report(output_dir, summary, display, overwrite=overwrite)
        _results_phase()
        if json_output:
            _emit_json(summary)
        else:
            for image in result.written:
                _echo_result(image.written.path)
        display.log(_batch_summary(result))
        error = None
        if result.stopped_by is not None:
            error = Interrupted(f"interrupted; {len(result.written)} image(s) written this run, manifest flushed",
                                signal_number=result.stopped_by, hint="rerun the same command to resume")
        elif result.failed:
            rows = ", ".join(str(r.job.row) for r in result.failed[:10])
            message = f"{len(result.failed)} image(s) failed (line(s) {rows}): {result.failed[0].error}"
            error = (GenerationError(message, hint="rerun the same command to retry") if fail_fast else
                     PartialFailure(message, hint="rerun the same command to retry the failed rows"))
        if error is not None:
            raise error  # with --json, the summary above is the one JSON object: _fail adds none


def _write_report(output_dir: str, summary: dict, display, overwrite: bool = False) -> dict | None:
    """The gallery and the CI step summary; a failure here is a warning, not the batch's exit code."""
    from ..storage.gallery import write_report

    try:
        written = write_report(output_dir, summary, overwrite=overwrite)
    except OSError as exc:
        display.log(f"sana: warning: could not write the report: {exc}")
        return None
    display.log(f"sana: gallery {written['gallery']}"
                 + ("; step summary appended to $GITHUB_STEP_SUMMARY" if written["step_summary"] else ""))
    return written


def _batch_summary(result) -> str:
    parts = [f"{len(result.written)} written", f"{result.already_done} already done"]
    if result.failed:
        parts.append(f"{len(result.failed)} failed")
    if result.invalid_rows:
        parts.append(f"{len(result.invalid_rows)} invalid row(s) skipped")
    timings = result.to_dict()["timings"]
    rate = result.to_dict()["images_per_second"]
    speed = f" in {timings.get('total', 0):.1f} s ({rate:.2f} img/s)" if rate else ""
    return f"sana: {len(result.plan.jobs)} image(s): {', '.join(parts)}{speed}; manifest {result.manifest}"


def _parse_duration(ctx, param, value):
    """--keep-alive: 30s, 5m, 2h, a number of seconds, or `forever`."""
    if value is None or value.strip().lower() in ("forever", "inf", "-1"):
        return None
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value.lower())
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration (30s, 5m, 2h, seconds, or forever)")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds > 10 * 365 * 86400:  # a 400-digit number reads as infinity; `forever` says it plainly
        raise click.BadParameter(f"{value!r} is more than ten years (say `forever` to keep models loaded)")
    return seconds


@cli.command(epilog=EPILOG)
@click.option("-m", "--model", "models", multiple=True, metavar="NAME",
              help="Load this model up front (repeatable); the first is the default of API requests without one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of the HTTP port. Anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8723, show_default=True, help="HTTP port (0: any).")
@click.option("--keep-alive", callback=_parse_duration, default="forever", show_default=True, metavar="DURATION",
              help="Unload a model unused this long (30s, 5m, 2h, or forever).")
@click.option("--max-memory", type=FiniteFloat(min=0, min_open=True), metavar="GiB",
              help="Memory budget of the loaded models' weights; least recently used ones are unloaded past it.")
@click.option("--api-key", envvar="SANA_API_KEY", show_envvar=True, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every request (the Unix socket too).")
@click.option("--batch-window", type=FiniteFloat(0, 10), default=0.2, show_default=True, metavar="SECONDS",
              help="How long a request waits for others to share its GPU batch.")
@click.option("--max-queue", type=click.IntRange(1, 100000), default=64, show_default=True, metavar="N",
              help="Requests that may wait; more are answered 429.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Accept this name in the Host header too (repeatable); without --api-key only loopback names "
                   "and --host are accepted (DNS rebinding).")
@click.option("--alias", "aliases", multiple=True, metavar="NAME=MODEL",
              help="Answer OpenAI requests for model NAME with MODEL (repeatable), e.g. dall-e-3=sana-1600m-1024; "
                   "NAME may be a pattern: 'dall-e-*=MODEL', or '*=MODEL' for every unknown name.")
@click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", show_envvar=True,
              help="Use only the local Hugging Face cache.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def serve(models, host, port, keep_alive, max_memory, api_key, batch_window, max_queue, aliases, offline, debug,
          allow_hosts=()):
    """Keep models loaded and serve them: `sana generate` and `sana batch` of this user attach to it
    through a user-only Unix socket, and the HTTP port speaks OpenAI's images API.

    \b
      sana serve --model sana-1600m-1024 &
      for i in 1 2 3; do sana generate "a lighthouse, take $i" --seed $i; done
    \b
    SIGTERM/SIGINT: finish the work in flight, refuse new work (503), exit 0; a second one stops at once.
    """
    with _reporting(False, debug):
        from .server import is_loopback

        if not is_loopback(host) and not api_key:
            raise UsageError(f"--host {host} is not a loopback address: set --api-key (or SANA_API_KEY) to serve "
                             "other machines")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty")
        from ..api import check_cache_dir
        from ..cache import cache_root
        from ..models.modelref import resolve
        from ..planning.plan import LoadOptions
        from .server import serve as run_server

        check_cache_dir()
        from ..server.openai_images import Aliases

        for name in models:
            resolve(name)  # an unknown name is exit 2 before anything binds
        alias_map = Aliases.parse(aliases)
        for alias, target in alias_map.pairs:
            if resolve(target).kind == "local":  # the HTTP API never names a path on this machine
                raise UsageError(f"--alias {alias}={target}: the model must be a preset or a hub id (org/name)")
        code = run_server(host=host, port=port, models=list(models), keep_alive=keep_alive, aliases=alias_map,
                          max_memory_gib=max_memory, api_key=api_key, window=batch_window, max_queue=max_queue,
                          output_dir=cache_root() / "serve-images", load=LoadOptions(offline=offline),
                          allow_hosts=tuple(allow_hosts))
        sys.exit(code)


@cli.command()
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def models(json_output):
    """List the model presets."""
    from ..models.presets import PRESETS

    if json_output:
        _emit_json([{"name": p.name, "repo": p.repo, "pipeline": p.pipeline, "params": p.params,
                     "native_size": p.native_size, "dtype": p.dtype, "variant": p.variant, "steps": p.steps,
                     "guidance": p.guidance, "flow_shift": p.flow_shift, "pag": p.supports_pag,
                     "aliases": list(p.aliases), "description": p.description} for p in PRESETS])
        return
    rows = [("NAME", "PARAMS", "SIZE", "PIPELINE", "STEPS", "CFG", "REPO")]
    rows += [(p.name, p.params, str(p.native_size), p.pipeline, str(p.steps), str(p.guidance), p.repo)
             for p in PRESETS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@cli.command(name="decode", epilog=EPILOG)
@click.argument("file", metavar="FILE.latents.safetensors")
@click.option("-o", "--output", metavar="PATH",
              help="Image file or directory. Default: the image the run planned, beside FILE.")
@click.option("--decode", "strategy", default="auto", show_default=True, type=click.Choice(DECODE_CHOICES),
              help="VAE decode strategy (as for generate).")
@click.option("--device", default=None, metavar="auto|cuda|cuda:N|cpu",
              help="Where to decode. Default: the kind of device the run used (same pixels).")
@click.option("--max-memory", type=FiniteFloat(min=0, min_open=True), envvar="SANA_MAX_MEMORY",
              show_envvar=True, metavar="GiB", help="Cap on GPU memory, as for generate.")
@click.option("--overwrite", is_flag=True, help="Replace an existing image.")
@click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", help="Use only the local Hugging Face cache.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object on stdout, nothing else.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or log lines on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def decode_command(file, output, strategy, device, max_memory, overwrite, offline, json_output, quiet, debug):
    """Finish an image from the denoised latents a run kept (NAME.latents.safetensors): loads only the VAE
    and writes the image with the pixels and metadata the run would have written."""
    with _reporting(json_output, debug):
        from ..engine.decode_kept import finish

        written, meta = finish(file, output=output, decode=strategy, device=device, overwrite=overwrite,
                               offline=offline, max_memory=max_memory, verbose=debug)
        if json_output:
            _emit_json({"ok": True, "command": "decode", "latents": file, "path": written.path,
                        "sha256": written.sha256, "bytes": written.bytes, "decode": meta["decode"]})
        else:
            _echo_result(written.path)


@cli.command()
@click.option("-m", "--model", envvar="SANA_MODEL", metavar="NAME|HUB_ID|DIR",
              help="Also check that this model can be loaded here (cached, when offline).")
@click.option("--gpu", "require_gpu", is_flag=True, help="Fail (exit 4) when no CUDA GPU is usable.")
@click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", help="Check as if offline (HF_HUB_OFFLINE).")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def doctor(model, require_gpu, offline, json_output, debug):
    """Check this machine: versions, GPU and free memory, caches, which presets are downloaded.

    Exits 4, with the command that fixes it, when something needed is missing.
    """
    with _reporting(json_output, debug):
        from ..engine.doctor import diagnose, format_text

        diagnosis = diagnose(model, require_gpu=require_gpu, offline=True if offline else None)
        _out(json_text(diagnosis) if json_output else printable(format_text(diagnosis), keep_newlines=True))
        failed = [check for check in diagnosis["checks"] if not check["ok"] and check.get("exit_code")]
        if diagnosis["exit_code"]:
            first = failed[0] if failed else {"detail": "a check failed", "fix": None}
            click.echo(printable(f"sana: error: {first['detail']}"
                                 + (f" (fix: {first['fix']})" if first.get("fix") else "")), err=True)
            sys.exit(diagnosis["exit_code"])


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@click.option("--command", "as_command", is_flag=True, help="Print the `sana generate` command that reproduces it.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def info(image, json_output, as_command, debug):
    """Show the generation parameters embedded in an IMAGE (PNG, JPEG or WebP).

    Text from the image is shown with control and invisible characters escaped; --json is strict
    JSON; --command prints a command quoted for the shell, with the prompt after `--`.
    """
    with _reporting(json_output, debug):
        from ..storage.images import read_metadata

        meta = read_metadata(image)
        if not meta["parameters"] and not meta["sana"]:
            raise UsageError(f"{image} has no generation metadata")
        if as_command:
            if not meta["sana"]:
                raise UsageError(f"{image} has no sana metadata to rebuild a command from")
            from ..planning.reproduce import BadMetadata, model_argument, unknown_fields

            try:
                command = reproduce_command(meta["sana"], image)
                model, local = model_argument(meta["sana"])
            except BadMetadata as exc:
                raise UsageError(f"{image}: {exc.message}") from None
            unknown = unknown_fields(meta["sana"])
            if unknown:
                click.echo(printable(f"sana: warning: {image} records {', '.join(unknown)}, which this sana-cli "
                                     "does not know; the command may not reproduce it exactly"), err=True)
            if local:
                click.echo(printable(f"sana: note: the image names the local model directory {model}; check that "
                                     "it is the model you mean before running the command"), err=True)
            _out(command)
        elif json_output:
            _emit_json(meta)
        else:
            if meta["parameters"]:
                _out(printable(meta["parameters"], keep_newlines=True))
            if meta["sana"]:
                _out(json_text(meta["sana"], indent=2, sort_keys=True))


def reproduce_command(meta: dict, image_path: str | None = None) -> str:
    """The `sana generate` command line that makes this image again (see sana_cli.reproduce)."""
    from ..planning.reproduce import reproduce_command as build

    return build(meta, image_path)


# ---- shared plumbing -------------------------------------------------------------------------------
#
# The output contract: stdout gets the results only (paths, or exactly one JSON object with --json,
# for every outcome); stderr gets one `sana: error:` line on failure. Losing either stream (closed,
# a pipe whose reader left, a full disk) never loses an image or a record: log lines are dropped,
# and a result that cannot be printed is exit 1 with the line on stderr if stderr still works.

_state = {"json_started": False, "entry": False}


class _StdoutLost(Exception):
    """stdout could not be written; the work on disk is complete."""


def _out(text: str) -> None:
    try:
        click.echo(text)
    except (OSError, ValueError) as exc:
        from ..reporting.progress import discard

        discard(sys.stdout)
        raise _StdoutLost(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None


def _emit_json(data) -> None:
    _state["json_started"] = True  # whatever happens next, no second object follows this one
    _out(json_text(data))  # strict: never NaN or Infinity; control characters as \u escapes


def _echo_result(path: str) -> None:
    """A result path on stdout: as is for scripts, escaped when a person sees it on a terminal."""
    _out(printable(path) if sys.stdout.isatty() else path)


def _print_plan(plan, json_output: bool) -> None:
    if json_output:
        _emit_json({"ok": True, "dry_run": True, **plan.to_dict()})
    else:
        _out(printable(plan.describe(), keep_newlines=True))


def _results_phase() -> None:
    """The outcome is decided and about to be printed: from here a late SIGINT/SIGTERM can neither
    interleave a second JSON object nor turn a reported success into 130/143."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding application): nothing to guard
            pass


@contextlib.contextmanager
def _reporting(json_output: bool, debug: bool):
    """Turn errors into one stderr line (and a JSON error object with --json) and the right exit code."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _state["json_started"] = False
    try:
        yield
    except _StdoutLost as exc:
        _fail(f"cannot write the results to stdout ({exc}); nothing written to disk was lost", EXIT_FAILED, False,
              debug)
    except SanaError as exc:
        for row in (exc.details or {}).get("invalid_rows", [])[3:]:  # the first three are in the message
            _err(f"sana: line {row['line']}: {row['error']}")
        _fail(exc.line(), exc.exit_code, json_output, debug, details=exc.details)
    except click.UsageError as exc:
        _fail(exc.format_message(), EXIT_USAGE, json_output, debug)
    except KeyboardInterrupt as exc:
        _fail("interrupted", 128 + (getattr(exc, "signal_number", None) or signal.SIGINT), json_output, debug)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line and exit 1
        from ..engine.vae import is_out_of_memory

        if is_out_of_memory(exc):
            message = "out of memory; try --decode strips, --low-memory, a smaller --batch-size or size"
        else:
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _fail(message, 1, json_output, debug, hint=None if debug else "run with --debug for the traceback")
    finally:
        if not _state["entry"]:  # called in-process (tests, embedding): give the handlers back
            for sig, handler in saved.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)


def _err(line: str) -> None:
    """A line on stderr (control characters escaped), or nothing if stderr is closed or broken."""
    try:
        click.echo(printable(line), err=True)
    except (OSError, ValueError):
        from ..reporting.progress import discard

        discard(sys.stderr)


def _fail(message: str, code: int, json_output: bool, debug: bool, hint: str | None = None,
          details: dict | None = None):
    _results_phase()  # the outcome is decided: a signal now must not interrupt reporting it
    if debug:
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
    if json_output and not _state["json_started"]:
        with contextlib.suppress(_StdoutLost):
            _emit_json({"ok": False, "error": message, "exit_code": code, **(details or {})})
    _err(f"sana: error: {message}" + (f" ({hint})" if hint else ""))
    sys.exit(code)


class _SignalAbort(KeyboardInterrupt):
    """The second SIGINT/SIGTERM: abort now, exiting 128 + its number."""

    def __init__(self, signal_number: int):
        super().__init__()
        self.signal_number = signal_number


@contextlib.contextmanager
def _graceful_signals(stop, display, what: str):
    """First SIGINT/SIGTERM: ask the runner to stop cleanly. Second: abort at once. The handlers stay
    until the results are printed (then signals are ignored), so a signal that arrives after the
    run can never kill the process with the default action between the work and its report."""
    running = [True]

    def handler(signum, frame):
        if stop.requested:
            raise _SignalAbort(signum)
        stop.request(signum)
        name = signal.Signals(signum).name
        display.log(f"sana: {name} received, {what} (send it again to abort)" if running[0] else
                     f"sana: {name} received; the images are written, finishing the report (send it again to abort)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        number = getattr(exc, "signal_number", None) or stop.signal_number or signal.SIGINT
        raise Interrupted("aborted; nothing partial was written", signal_number=number) from None
    finally:
        running[0] = False


def _standard_streams() -> None:
    """Make sure descriptors 0-2 are open (on /dev/null when the caller closed them, as `2>&-`
    does), so no image or manifest ever gets descriptor 1 or 2 and receives stray output."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115


_BOOLEAN_WORDS = {"", "0", "1", "true", "false", "t", "f", "yes", "no", "y", "n", "on", "off"}


def _command_name(args: list[str]) -> str | None:
    return next((arg for arg in args if not arg.startswith("-")), None)


def _wants_json(args: list[str]) -> bool:
    """--json among the options (before a `--`) or from SANA_<COMMAND>_JSON, for errors found while
    parsing them."""
    if "--json" in (args[:args.index("--")] if "--" in args else args):
        return True
    command = cli.commands.get(_command_name(args) or "")
    for param in command.params if command is not None else ():
        if "--json" in getattr(param, "opts", ()):
            value = os.environ.get(_envvar(command, param), "")
            return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")
    return False


def _envvar(command, param) -> str:
    """The variable Click reads for an option (auto_envvar_prefix SANA)."""
    return f"SANA_{command.name.upper().replace('-', '_')}_{param.name.upper()}"


def _check_flag_environment(args: list[str]) -> None:
    """A SANA_<COMMAND>_<FLAG> value that is not a boolean word is a usage error (Click would take
    'maybe' for false and go on silently)."""
    command = cli.commands.get(_command_name(args) or "")
    if command is None:
        return
    for param in command.params:
        if isinstance(param, click.Option) and param.is_flag and param.name and not param.envvar:
            name = _envvar(command, param)
            value = os.environ.get(name)
            if value is not None and value.strip().lower() not in _BOOLEAN_WORDS:
                raise click.UsageError(f"{name}={value!r} is not a yes/no value (use 1 or 0, true or false, "
                                       "yes or no, on or off)")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: Click's usage errors as one line (and one JSON object with --json) and
    exit code 2."""
    _state["entry"] = True
    _state["json_started"] = False
    _standard_streams()
    args = list(sys.argv[1:] if argv is None else argv)
    json_output = _wants_json(args)
    try:
        _check_flag_environment(args)
        code = cli.main(args=args, prog_name="sana", standalone_mode=False, auto_envvar_prefix="SANA")
    except click.exceptions.NoArgsIsHelpError as exc:
        with contextlib.suppress(_StdoutLost):
            _out(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(f"{exc.format_message()}{where}", EXIT_USAGE, json_output, False)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code, json_output, False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C before a command took over
        _fail("interrupted", EXIT_SIGINT, json_output, False)
    except (BrokenPipeError, _StdoutLost) as exc:  # help or a listing into a closed pipe
        from ..reporting.progress import discard

        discard(sys.stdout)
        _fail(f"cannot write the results to stdout ({getattr(exc, 'strerror', None) or exc})", EXIT_FAILED, False,
              False)
    sys.exit(code if isinstance(code, int) else 0)
