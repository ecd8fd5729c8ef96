"""`sana serve`: keep models warm behind an HTTP API."""

from __future__ import annotations

import sys

import click

from ..errors import (
    UsageError,
)
from .options import EPILOG, FiniteFloat
from .running import reporting


def parse_duration(ctx, param, value):
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


@click.command(epilog=EPILOG)
@click.option("-m", "--model", "models", multiple=True, metavar="NAME",
              help="Load this model up front (repeatable); the first is the default of API requests without one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of the HTTP port. Anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8723, show_default=True, help="HTTP port (0: any).")
@click.option("--keep-alive", callback=parse_duration, default="forever", show_default=True, metavar="DURATION",
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
    with reporting(False, debug):
        from ..server.http_io import is_loopback

        if not is_loopback(host) and not api_key:
            raise UsageError(f"--host {host} is not a loopback address: set --api-key (or SANA_API_KEY) to serve "
                             "other machines")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty")
        from ..api import check_cache_dir
        from ..cache import cache_root
        from ..models.modelref import resolve
        from ..planning.plan import LoadOptions
        from ..server.running import serve as run_server

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
