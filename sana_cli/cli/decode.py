"""`sana decode`: finish an image from the latents a run kept."""

from __future__ import annotations


import click

from .options import DECODE_CHOICES, EPILOG, FiniteFloat
from .running import echo_result, emit_json, reporting


@click.command(name="decode", epilog=EPILOG)
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
    with reporting(json_output, debug):
        from ..engine.decode_kept import finish

        written, meta = finish(file, output=output, decode=strategy, device=device, overwrite=overwrite,
                               offline=offline, max_memory=max_memory, verbose=debug)
        if json_output:
            emit_json({"ok": True, "command": "decode", "latents": file, "path": written.path,
                        "sha256": written.sha256, "bytes": written.bytes, "decode": meta["decode"]})
        else:
            echo_result(written.path)
