"""What every command does around its work: load options, attaching to a server, results on stdout,
one-line failures on stderr, and SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback

import click

from ..errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    Interrupted,
    SanaError,
)
from ..terminal import json_text, printable



def attach(model, load, keep_latents: bool, display, jobs=(), controlnet: str | None = None):
    """The server this run goes to (a RemoteModel), or None to run here. SANA_SERVER that cannot be
    reached is exit 4; a run a server cannot do the same way (see client.attach_blocker) stays here."""
    from ..server import client

    endpoint = client.discover(note=lambda message: display.log(f"sana: {message}"))
    if endpoint is None:
        return None
    blocker = client.attach_blocker(model, load, keep_latents=keep_latents, jobs=jobs, controlnet=controlnet)
    if blocker is not None:
        display.log(f"sana: not using the server at {endpoint.describe()}: {blocker}; rendering here")
        return None
    # Said when the first image goes to the server: a fully resumed batch renders nothing anywhere.
    return client.remote_model(endpoint, model, load,
                               announce=lambda: display.log(f"sana: rendering on the server at {endpoint.describe()}"))


def load_options(device, dtype, offline, allow_pickle, low_memory, compile_mode, fp8, max_memory, debug,
                  quantize=None):
    """The model options of a command as one LoadOptions, built once and passed whole to the API."""
    from ..planning.plan import LoadOptions

    return LoadOptions(device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, low_memory=low_memory,
                       compile=compile_mode, fp8=fp8, max_memory_gib=max_memory, verbose=debug, quantize=quantize)


# ---- shared plumbing -------------------------------------------------------------------------------
#
# The output contract: stdout gets the results only (paths, or exactly one JSON object with --json,
# for every outcome); stderr gets one `sana: error:` line on failure. Losing either stream (closed,
# a pipe whose reader left, a full disk) never loses an image or a record: log lines are dropped,
# and a result that cannot be printed is exit 1 with the line on stderr if stderr still works.

state = {"json_started": False, "entry": False}


class StdoutLost(Exception):
    """stdout could not be written; the work on disk is complete."""


def out(text: str) -> None:
    try:
        click.echo(text)
    except (OSError, ValueError) as exc:
        from ..reporting.progress import discard

        discard(sys.stdout)
        raise StdoutLost(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None


def emit_json(data) -> None:
    state["json_started"] = True  # whatever happens next, no second object follows this one
    out(json_text(data))  # strict: never NaN or Infinity; control characters as \u escapes


def echo_result(path: str) -> None:
    """A result path on stdout: as is for scripts, escaped when a person sees it on a terminal."""
    out(printable(path) if sys.stdout.isatty() else path)


def print_plan(plan, json_output: bool) -> None:
    if json_output:
        emit_json({"ok": True, "dry_run": True, **plan.to_dict()})
    else:
        out(printable(plan.describe(), keep_newlines=True))


def results_phase() -> None:
    """The outcome is decided and about to be printed: from here a late SIGINT/SIGTERM can neither
    interleave a second JSON object nor turn a reported success into 130/143."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding application): nothing to guard
            pass


@contextlib.contextmanager
def reporting(json_output: bool, debug: bool):
    """Turn errors into one stderr line (and a JSON error object with --json) and the right exit code."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    state["json_started"] = False
    try:
        yield
    except StdoutLost as exc:
        fail(f"cannot write the results to stdout ({exc}); nothing written to disk was lost", EXIT_FAILED, False,
              debug)
    except SanaError as exc:
        for row in (exc.details or {}).get("invalid_rows", [])[3:]:  # the first three are in the message
            err(f"sana: line {row['line']}: {row['error']}")
        fail(exc.line(), exc.exit_code, json_output, debug, details=exc.details)
    except click.UsageError as exc:
        fail(exc.format_message(), EXIT_USAGE, json_output, debug)
    except KeyboardInterrupt as exc:
        fail("interrupted", 128 + (getattr(exc, "signal_number", None) or signal.SIGINT), json_output, debug)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line and exit 1
        from ..engine.vae import is_out_of_memory

        if is_out_of_memory(exc):
            message = "out of memory; try --decode strips, --low-memory, a smaller --batch-size or size"
        else:
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        fail(message, 1, json_output, debug, hint=None if debug else "run with --debug for the traceback")
    finally:
        if not state["entry"]:  # called in-process (tests, embedding): give the handlers back
            for sig, handler in saved.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)


def err(line: str) -> None:
    """A line on stderr (control characters escaped), or nothing if stderr is closed or broken."""
    try:
        click.echo(printable(line), err=True)
    except (OSError, ValueError):
        from ..reporting.progress import discard

        discard(sys.stderr)


def fail(message: str, code: int, json_output: bool, debug: bool, hint: str | None = None,
          details: dict | None = None):
    results_phase()  # the outcome is decided: a signal now must not interrupt reporting it
    if debug:
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
    if json_output and not state["json_started"]:
        with contextlib.suppress(StdoutLost):
            emit_json({"ok": False, "error": message, "exit_code": code, **(details or {})})
    err(f"sana: error: {message}" + (f" ({hint})" if hint else ""))
    sys.exit(code)


class SignalAbort(KeyboardInterrupt):
    """The second SIGINT/SIGTERM: abort now, exiting 128 + its number."""

    def __init__(self, signal_number: int):
        super().__init__()
        self.signal_number = signal_number


@contextlib.contextmanager
def graceful_signals(stop, display, what: str):
    """First SIGINT/SIGTERM: ask the runner to stop cleanly. Second: abort at once. The handlers stay
    until the results are printed (then signals are ignored), so a signal that arrives after the
    run can never kill the process with the default action between the work and its report."""
    running = [True]

    def handler(signum, frame):
        if stop.requested:
            raise SignalAbort(signum)
        stop.request(signum)
        name = signal.Signals(signum).name
        display.log(f"sana: {name} received, {what} (send it again to abort)" if running[0] else
                     f"sana: {name} received; the images are written, finishing the report (send it again to abort)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        number = getattr(exc, "signal_number", None) or stop.signal_number or signal.SIGINT
        raise Interrupted("aborted; nothing partial was written", signal_number=number) from None
    finally:
        running[0] = False
