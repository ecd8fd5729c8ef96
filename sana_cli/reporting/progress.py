"""What a run tells the person watching it, on stderr: a progress bar on a TTY, plain lines when
stderr is a log file (CI), nothing with --quiet. stdout is left to results."""

from __future__ import annotations

import os
import sys
import time

from ..terminal import printable
from .events import BatchStarted, Event, ImageFailed, ImageWritten, Loading, Noted, Planned, Step, Warned


def discard(stream) -> None:
    """Point a stream that can no longer be written (closed pipe, full disk) at /dev/null, so that
    the buffered text and the interpreter's final flush neither fail nor change the exit code."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


class ProgressDisplay:
    """Turns runner events into stderr output."""

    def __init__(self, total_images: int, *, quiet: bool = False, stream=None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        try:
            self.tty = self.stream.isatty()
        except (ValueError, AttributeError, OSError):
            self.tty = False
        self.total = total_images
        self.done = 0
        self.failed = 0
        self.started: float | None = None  # at the first batch, so loading does not count in img/s
        # Seconds between plain progress lines in logs (SANA_PROGRESS_INTERVAL, default 10).
        self.interval = interval if interval is not None else progress_interval()
        self._last_line = 0.0
        self._last_step_line = 0.0
        self._batch = ""
        self._bar = None

    def log(self, text: str) -> None:
        """Never raises: a closed or broken stderr (`2>&-`, `| head -1`) loses log lines, not work."""
        if self.quiet:
            return
        text = printable(text)  # prompts, paths and errors may hold terminal control characters
        try:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)
        except (OSError, ValueError):
            self.quiet = True
            self._bar = None
            discard(self.stream)

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if isinstance(event, Planned):
            self.total = event.todo
            if event.done:
                self.log(f"sana: resuming: {event.done} of {event.done + event.todo} image(s) already done")
        elif isinstance(event, Loading):
            self.log(f"sana: loading {event.model.describe()}")
        elif isinstance(event, Warned):
            self.log(f"sana: warning: {event.message}")
        elif isinstance(event, Noted):
            self.log(f"sana: {event.message}")
        elif isinstance(event, BatchStarted):
            self.started = self.started or time.perf_counter()
            self._batch = f"batch {event.number}/{event.total} "
            if self.tty and self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, unit="img", file=self.stream, dynamic_ncols=True, leave=False)
        elif isinstance(event, Step):
            if self._bar is not None:
                self._bar.set_postfix_str(f"step {event.step}/{event.total}", refresh=True)  # numbers only
            elif time.perf_counter() - self._last_step_line >= self.interval:
                self.log(f"sana: {self._batch}step {event.step}/{event.total}")
                self._last_step_line = time.perf_counter()
        elif isinstance(event, (ImageWritten, ImageFailed)):
            self._image(event.result, failed=isinstance(event, ImageFailed))

    def _image(self, result, *, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self._bar is not None:
            self._bar.update(1)
            if failed:
                self._bar.write(printable(f"sana: failed {result.job.path}: {result.error}"), file=self.stream)
            return
        now = time.perf_counter()
        if failed:
            self.log(f"sana: [{self.done}/{self.total}] failed {result.job.path}: {result.error}")
        elif self.total <= 20 or now - self._last_line >= self.interval or self.done == self.total:
            rate = self.done / max(now - (self.started or now), 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            self.log(f"sana: [{self.done}/{self.total}] wrote {result.written.path} "
                     f"({rate:.2f} img/s, ETA {eta:.0f} s)")
            self._last_line = now

    def close(self) -> None:
        if self._bar is not None:
            try:
                self._bar.close()
            except (OSError, ValueError):
                discard(self.stream)
            self._bar = None


def progress_interval() -> float:
    """SANA_PROGRESS_INTERVAL in seconds (default 10): a finite number, 0 or more."""
    import math

    from ..errors import UsageError

    raw = os.environ.get("SANA_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return 10.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"SANA_PROGRESS_INTERVAL must be a number of seconds, 0 or more, got {raw!r}")
    return value
