"""`sana info`: what an image's metadata says, and the command that makes it again."""

from __future__ import annotations


import click

from ..errors import (
    UsageError,
)
from ..terminal import json_text, printable
from .running import emit_json, out, reporting


@click.command()
@click.argument("image", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@click.option("--command", "as_command", is_flag=True,
              help="Print the `sana generate` (or `sana video`) command that reproduces it.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def info(image, json_output, as_command, debug):
    """Show the generation parameters embedded in a FILE: an image (PNG, JPEG or WebP) or a video (MP4 or WebM).

    Text from the image is shown with control and invisible characters escaped; --json is strict
    JSON; --command prints a command quoted for the shell, with the prompt after `--`.
    """
    with reporting(json_output, debug):
        from ..storage.media import read_metadata

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
            out(command)
        elif json_output:
            emit_json(meta)
        else:
            if meta["parameters"]:
                out(printable(meta["parameters"], keep_newlines=True))
            if meta["sana"]:
                out(json_text(meta["sana"], indent=2, sort_keys=True))


def reproduce_command(meta: dict, image_path: str | None = None) -> str:
    """The `sana generate` command line that makes this image again (see sana_cli.reproduce)."""
    from ..planning.reproduce import reproduce_command as build

    return build(meta, image_path)
