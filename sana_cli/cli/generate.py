"""`sana generate`: one prompt to one or more images."""

from __future__ import annotations


import click

from .options import EPILOG, FINITE, input_options, model_options
from .running import (attach, echo_result, emit_json, graceful_signals, load_options, print_plan,
                      reporting, results_phase)


@click.command(epilog=EPILOG)
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
@input_options
@model_options
def generate(prompt, size, width, height, steps, guidance, negative_prompt, seed, num_images, pag_scale, pag_layers,
             output, overwrite, force_size, batch_size, loras, controlnet, control_image, control_scale, image,
             strength, model, revision, offline, device, dtype, decode, low_memory, compile_mode, max_memory,
             keep_latents, fp8, quantize, allow_pickle, no_server, dry_run, json_output, quiet, debug):
    """Make images from one PROMPT ('-' reads it from stdin).

    Paths of written images go to stdout, one per line (or one JSON object with --json);
    progress and logs go to stderr.
    """
    with reporting(json_output, debug):
        from ..planning.plan import Request, check_side, model_for, plan_generate
        from ..reporting.progress import progress_interval

        progress_interval()
        load = load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
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
            print_plan(plan, json_output)
            return
        from ..api import run_plan
        from ..reporting.progress import ProgressDisplay
        from ..reporting.results import StopToken

        display = ProgressDisplay(len(plan.jobs), quiet=quiet)
        from ..server.wire import uses_input_files

        remote = None if no_server else attach(plan.model, load, keep_latents, display,
                                                input_files=any(uses_input_files(job) for job in plan.jobs))
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
