"""`sana models`: the built-in model names."""

from __future__ import annotations


import click

from .running import emit_json, out


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def models(json_output):
    """List the model presets."""
    from ..models.presets import PRESETS

    if json_output:
        emit_json([{"name": p.name, "repo": p.repo, "pipeline": p.pipeline, "params": p.params,
                     "native_size": p.native_size, "dtype": p.dtype, "variant": p.variant, "steps": p.steps,
                     "guidance": p.guidance, "flow_shift": p.flow_shift, "pag": p.supports_pag,
                     "aliases": list(p.aliases), "description": p.description} for p in PRESETS])
        return
    rows = [("NAME", "PARAMS", "SIZE", "PIPELINE", "STEPS", "CFG", "REPO")]
    rows += [(p.name, p.params, str(p.native_size), p.pipeline, str(p.steps), str(p.guidance), p.repo)
             for p in PRESETS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
