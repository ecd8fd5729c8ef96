"""The `sana` command: parses options, calls the API, prints results. Nothing else lives here.

torch, diffusers and transformers are imported only inside commands that load a model, so
`sana --help`, `sana models` and `--dry-run` start instantly.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from ..errors import EXIT_FAILED, EXIT_SIGINT, EXIT_USAGE
from ..version import __version__
from .options import EPILOG
from .running import StdoutLost, fail, out, state
from . import generate, batch, serve, models, decode, doctor, info, video


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.version_option(__version__, "-V", "--version", prog_name="sana-cli")
def cli() -> None:
    """Run NVIDIA's Sana text-to-image models from the command line.

    \b
      sana generate "a cyberpunk cat with a neon sign" --size 4096
      sana generate "a red fox" --model tiny --seed 1 --json
      sana models
    """


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
    state["entry"] = True
    state["json_started"] = False
    _standard_streams()
    args = list(sys.argv[1:] if argv is None else argv)
    json_output = _wants_json(args)
    try:
        _check_flag_environment(args)
        code = cli.main(args=args, prog_name="sana", standalone_mode=False, auto_envvar_prefix="SANA")
    except click.exceptions.NoArgsIsHelpError as exc:
        with contextlib.suppress(StdoutLost):
            out(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        fail(f"{exc.format_message()}{where}", EXIT_USAGE, json_output, False)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code, json_output, False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C before a command took over
        fail("interrupted", EXIT_SIGINT, json_output, False)
    except (BrokenPipeError, StdoutLost) as exc:  # help or a listing into a closed pipe
        from ..reporting.progress import discard

        discard(sys.stdout)
        fail(f"cannot write the results to stdout ({getattr(exc, 'strerror', None) or exc})", EXIT_FAILED, False,
              False)
    sys.exit(code if isinstance(code, int) else 0)


for _command in (generate.generate, batch.batch, serve.serve, models.models, decode.decode_command,
                 doctor.doctor, info.info, video.video):
    cli.add_command(_command)

