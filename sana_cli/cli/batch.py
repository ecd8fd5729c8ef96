"""`sana batch`: a prompts file to many images, resumable, with a manifest and an optional report."""

from __future__ import annotations


import click

from ..errors import (
    GenerationError,
    Interrupted,
    PartialFailure,
)
from .options import EPILOG, field_values, image_options, input_options, model_options
from .running import (attach, echo_result, emit_json, err, graceful_signals, load_options, print_plan,
                      reporting, results_phase)


def parse_shard(ctx, param, value):
    if value is None:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not I/N (for example 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r}: N must be at least 1 and I in 0..N-1 (shards count from 0)")
    return index, count


@click.command(epilog=EPILOG)
@click.argument("file", metavar="FILE")
@click.option("-o", "--output-dir", envvar="SANA_OUTPUT_DIR", show_envvar=True, default="sana-out",
              show_default=True, metavar="DIR", help="Where images and results.jsonl go.")
@image_options["batch"]
@click.option("--seed", "base_seed", type=int, default=0, show_default=True, metavar="N",
              help="Base seed for rows without their own seed (see README: seeds).")
@click.option("--ext", "extension", type=click.Choice(["png", "jpg", "webp", "mp4", "webm"]), default="png",
              show_default=True, help="Format of the files (a SANA-Video model: mp4 unless webm).")
@click.option("--batch-size", type=int, metavar="N", help="Images per GPU batch. Default: 4 at 1024px, 1 at 4K.")
@click.option("--shard", callback=parse_shard, metavar="I/N",
              help="Render only slice I of N (0-based), for job arrays. The union of all slices equals the whole run.")
@click.option("--input-format", type=click.Choice(["auto", "txt", "jsonl", "csv"]), default="auto",
              show_default=True, help="Format of FILE (auto: by extension; stdin: by content).")
@click.option("--skip-invalid", is_flag=True, help="Report invalid rows and render the rest (default: refuse all).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed image (exit 1).")
@click.option("--overwrite", is_flag=True, help="Redo every image, replacing existing files.")
@click.option("--force-size", is_flag=True, help="Allow sizes far from the model's native scale.")
@input_options["batch"]
@click.option("--report", is_flag=True,
              help="Write index.html (a gallery with thumbnails, failures highlighted, relative links) in the output "
                   "directory, and append a Markdown summary to $GITHUB_STEP_SUMMARY when it is set.")
@model_options
def batch(file, output_dir, base_seed, extension, batch_size, shard, input_format, skip_invalid, fail_fast, overwrite,
          force_size, report, model, revision, offline, device, dtype, decode, low_memory, compile_mode, max_memory,
          keep_latents, fp8, quantize, allow_pickle, no_server, dry_run, json_output, quiet, debug, **per_image):
    """Render every prompt of FILE (.txt, .jsonl or .csv; '-' reads stdin) into --output-dir.

    \b
    .txt:   one prompt per line; blank lines and lines starting with # are skipped.
    .jsonl: {"prompt": ..., "negative_prompt", "seed", "size" | "width"/"height",
            "steps", "guidance", "pag_scale", "name", "n", "lora" (one, or a list),
            "control_image", "control_scale", "image", "strength", "mask"} per line; with a SANA-Video
            model a row is a video: "frames", "fps", "motion_score" too, "image" its first frame.
    .csv:   a header row with the same field names.

    Every row is checked before anything loads. Rerunning the same command resumes: finished images are
    kept, missing ones made. Paths of written images go to stdout (or one JSON summary with --json).
    """
    with reporting(json_output, debug):
        from ..planning.plan import BatchDefaults
        from ..reporting.progress import progress_interval

        progress_interval()
        load = load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                             quantize)
        pixels = load.pixels(decode)
        defaults = BatchDefaults(base_seed=base_seed, extension="." + extension, force_size=force_size, offline=offline,
                                 **field_values(per_image))
        common = dict(model=model, output_dir=output_dir, defaults=defaults, batch_size=batch_size, shard=shard,
                      overwrite=overwrite, skip_invalid=skip_invalid, input_format=input_format, revision=revision)
        if dry_run:
            from ..api import plan_batch_file

            plan, invalid, _ = plan_batch_file(file, pixels=pixels, **common)
            for error in invalid:
                err(f"sana: skipping invalid {error}")
            print_plan(plan, json_output)
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
            # rows' input images and LoRAs travel as bytes; a local --controlnet directory keeps the run here;
            # videos render in this process: a server does not take them yet
            remote = None if launched_processes() or ref.is_video else attach(
                ref, load, keep_latents, display, controlnet=defaults.controlnet)
            session = None if remote is None else Session(remote)
        stop = StopToken()
        try:
            with graceful_signals(stop, display, "finishing the current GPU batch"):
                result = run_batch(file, fail_fast=fail_fast, decode=decode, options=load, keep_latents=keep_latents,
                                   events=display, stop=stop, session=session, **common)
        finally:
            display.close()
        for error in result.invalid_rows:
            display.log(f"sana: skipped invalid row: {error}")
        summary = result.to_dict()
        if report and result.is_main_process:
            summary["report"] = write_report(output_dir, summary, display, overwrite=overwrite)
        results_phase()
        if json_output:
            emit_json(summary)
        else:
            for image in result.written:
                echo_result(image.written.path)
        display.log(batch_summary(result))
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
            raise error  # with --json, the summary above is the one JSON object: fail adds none


def write_report(output_dir: str, summary: dict, display, overwrite: bool = False) -> dict | None:
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


def batch_summary(result) -> str:
    parts = [f"{len(result.written)} written", f"{result.already_done} already done"]
    if result.failed:
        parts.append(f"{len(result.failed)} failed")
    if result.invalid_rows:
        parts.append(f"{len(result.invalid_rows)} invalid row(s) skipped")
    timings = result.to_dict()["timings"]
    rate = result.to_dict()["images_per_second"]
    speed = f" in {timings.get('total', 0):.1f} s ({rate:.2f} img/s)" if rate else ""
    return f"sana: {len(result.plan.jobs)} image(s): {', '.join(parts)}{speed}; manifest {result.manifest}"
