"""`sana video`: one prompt to one video (SANA-Video), from text or from a first frame."""

from __future__ import annotations


import click

from .options import EPILOG, FINITE, field_options, model_options
from .running import echo_result, emit_json, graceful_signals, load_options, print_plan, reporting, results_phase


@click.command(epilog=EPILOG)
@click.argument("prompt")
@click.option("-W", "--width", type=int, metavar="N", help="Width in pixels (multiple of 32). Default: the model's "
                                                           "(832; tiny-video 64).")
@click.option("-H", "--height", type=int, metavar="N", help="Height in pixels (multiple of 32). Default: the "
                                                            "model's (480; tiny-video 64).")
@field_options("video", "video")
@click.option("--steps", type=int, metavar="N", help="Denoising steps. Default: the model's (50; tiny-video 4).")
@click.option("-g", "--guidance", type=FINITE, metavar="X", help="Guidance scale. Default: the model's (6.0).")
@click.option("--negative-prompt", metavar="TEXT", default="", help="What to steer away from.")
@click.option("--card-negative-prompt", is_flag=True,
              help="Use the model card's negative prompt (misshapen limbs, motion blur, jump cuts, jitter...).")
@click.option("--seed", type=int, metavar="N", help="Seed (drawn at random if omitted).")
@click.option("--image", metavar="IMAGE", help="First frame (image-to-video, SanaImageToVideoPipeline): PNG, JPEG "
                                                 "or WebP, resized to cover the size and centre-cropped.")
@click.option("-o", "--output", envvar="SANA_OUTPUT_DIR", show_envvar=True, metavar="PATH",
              help="Video file (.mp4: H.264; .webm: VP9) or directory. Default: ./sana-out/<prompt>-<seed>.mp4")
@click.option("--frames-dir", metavar="DIR", help="Also keep every frame as a PNG in DIR (<video name>-0001.png...).")
@click.option("--overwrite", is_flag=True, help="Replace existing files (never done otherwise).")
@click.option("--force-size", is_flag=True, help="Render a size far from the model's own anyway.")
@model_options
def video(prompt, width, height, steps, guidance, negative_prompt, card_negative_prompt, seed, image, output,
          frames_dir, overwrite, force_size, model, revision, offline, device, dtype, decode, low_memory,
          compile_mode, max_memory, keep_latents, fp8, quantize, allow_pickle, no_server, dry_run, json_output,
          quiet, debug, **per_video):
    """Make a video from one PROMPT ('-' reads it from stdin) with a SANA-Video model
    (default sana-video-2b-480p: 832x480, 81 frames at 16 fps, 50 steps, guidance 6).

    The path of the written video goes to stdout (or one JSON object with --json); progress and logs go to
    stderr. Videos render in this process (a `sana serve` server does not take them yet).
    """
    with reporting(json_output, debug):
        from ..errors import UsageError
        from ..models.presets import VIDEO_CARD_NEGATIVE_PROMPT
        from ..planning.video import VideoRequest, model_for_video, plan_video
        from ..reporting.progress import progress_interval

        progress_interval()
        load = load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                             quantize)
        pixels = load.pixels(decode)
        if card_negative_prompt:
            if negative_prompt:
                raise UsageError("--card-negative-prompt conflicts with --negative-prompt; give one or the other")
            negative_prompt = VIDEO_CARD_NEGATIVE_PROMPT
        if prompt == "-":
            from ..planning.batchfile import read_prompt_stdin

            prompt = read_prompt_stdin()
        request = VideoRequest(prompt=prompt, model=model, negative_prompt=negative_prompt, seed=seed, width=width,
                               height=height, steps=steps, guidance=guidance, image=image, output=output,
                               overwrite=overwrite, force_size=force_size, revision=revision, frames_dir=frames_dir,
                               **per_video)
        plan = plan_video(request, model_for_video(request), pixels)
        if dry_run:
            print_plan(plan, json_output)
            return
        from ..api import run_plan
        from ..reporting.progress import ProgressDisplay
        from ..reporting.results import StopToken

        display = ProgressDisplay(len(plan.jobs), quiet=quiet)
        stop = StopToken()
        try:
            with graceful_signals(stop, display, "stopping at the next step"):
                result = run_plan(plan, load, decode=decode, keep_latents=keep_latents, events=display, stop=stop,
                                  abort_in_flight=True)
        finally:
            display.close()
        results_phase()
        if json_output:
            emit_json(result.to_dict())
        else:
            for made in result.images:
                echo_result(made.written.path)
            seconds = result.outcome.timings["total"] + result.load_seconds
            job = plan.jobs[0]
            display.log(f"sana: {job.frames} frames at {job.fps} fps in {seconds:.1f} s (seed {job.seed})")
