"""`sana doctor`: can this machine run sana-cli."""

from __future__ import annotations

import sys

import click

from ..terminal import json_text, printable
from .running import out, reporting


@click.command()
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
    with reporting(json_output, debug):
        from ..engine.doctor import diagnose, format_text

        diagnosis = diagnose(model, require_gpu=require_gpu, offline=True if offline else None)
        out(json_text(diagnosis) if json_output else printable(format_text(diagnosis), keep_newlines=True))
        failed = [check for check in diagnosis["checks"] if not check["ok"] and check.get("exit_code")]
        if diagnosis["exit_code"]:
            first = failed[0] if failed else {"detail": "a check failed", "fix": None}
            click.echo(printable(f"sana: error: {first['detail']}"
                                 + (f" (fix: {first['fix']})" if first.get("fix") else "")), err=True)
            sys.exit(diagnosis["exit_code"])
