"""`sana generate`: one prompt to one or more images."""

from __future__ import annotations


import click

from .options import EPILOG, field_values, image_options, input_options, model_options
from .running import (attach, echo_result, emit_json, graceful_signals, load_options, print_plan,
                      reporting, results_phase)


@click.command(epilog=EPILOG)
@click.argument("prompt")
@image_options["generate"]
@click.option("-o", "--output", envvar="SANA_OUTPUT_DIR", show_envvar=True, metavar="PATH",
              help="Image file (.png/.jpg/.webp) or directory. Default: ./sana-out/<prompt>-<seed>.png")
@click.option("--overwrite", is_flag=True, help="Replace existing files (never done otherwise).")
@click.option("--force-size", is_flag=True, help="Render a size far from the model's native scale anyway.")
@click.option("--batch-size", type=int, metavar="N", help="Images per GPU batch with -n. Default: by size.")
@input_options["generate"]
@model_options
def generate(prompt, output, overwrite, force_size, batch_size, model, revision, offline, device, dtype, decode,
             low_memory, compile_mode, max_memory, keep_latents, fp8, quantize, allow_pickle, no_server, dry_run,
             json_output, quiet, debug, **per_image):
    """Make images from one PROMPT ('-' reads it from stdin).

    Paths of written images go to stdout, one per line (or one JSON object with --json);
    progress and logs go to stderr.
    """
    with reporting(json_output, debug):
        from ..planning.plan import Request, model_for, plan_generate
        from ..reporting.progress import progress_interval

        progress_interval()
        load = load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                             quantize)
        pixels = load.pixels(decode)
        if prompt == "-":
            from ..planning.batchfile import read_prompt_stdin

            prompt = read_prompt_stdin()
        request = Request(prompt=prompt, model=model, output=output, overwrite=overwrite, force_size=force_size,
                          revision=revision, batch_size=batch_size, offline=offline, **field_values(per_image))
        plan = plan_generate(request, model_for(request), pixels)
        if dry_run:
            print_plan(plan, json_output)
            return
        from ..api import run_plan
        from ..reporting.progress import ProgressDisplay
        from ..reporting.results import StopToken

        display = ProgressDisplay(len(plan.jobs), quiet=quiet)
        remote = None if no_server else attach(plan.model, load, keep_latents, display, jobs=plan.jobs)
        stop = StopToken()
        try:
            with graceful_signals(stop, display, "stopping at the next step"):
                result = run_plan(plan, load, decode=decode, keep_latents=keep_latents, events=display, stop=stop,
                                  abort_in_flight=True, loaded=remote)
        finally:
            display.close()
        results_phase()
        if json_output:
            emit_json(result.to_dict())
        else:
            for image in result.images:
                echo_result(image.written.path)
            seeds = ", ".join(str(image.job.seed) for image in result.images)
            seconds = result.outcome.timings["total"] + result.load_seconds
            display.log(f"sana: {len(result.images)} image(s) in {seconds:.1f} s "
                         f"(seed {seeds}; decode {result.images[0].decode})")
