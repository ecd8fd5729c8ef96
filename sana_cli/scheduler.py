"""The work queue of `sana serve`: fair first-come order, a short gathering window in which requests that
share a model, load options and decode run together in GPU batches, and an LRU cache of loaded models
(keep-alive and a memory budget).

One thread renders (one GPU, one run at a time); HTTP handlers only queue work and read its messages.
A request's jobs keep their own seeds, so batching changes its pixels by batched rounding at most.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from .errors import EnvironmentProblem, SanaError
from .plan import ImageJob, LoadOptions, Plan, default_batch_size, group_jobs

Message = dict  # what a request's sink receives: {"type": "batch" | "step" | "image" | "failed" | "warning" | ...}


class QueueFull(Exception):
    """More requests wait than the queue holds (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and takes no new work (HTTP 503)."""


@dataclass(eq=False)
class Work:
    """One request's jobs, with the server paths they render to and where its messages go."""

    ref: object  # ModelRef
    options: LoadOptions
    decode: str
    jobs: list[ImageJob]  # paths are the server's; index is the request's own numbering
    sink: Callable[[Message], None]
    label: str = ""
    force_size: bool = False
    partial_images: int = 0  # previews per image while it renders (OpenAI streaming), at evenly spaced steps
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def family(self) -> tuple:
        """Work of one family can share GPU batches: same model, load options and decode."""
        return (self.ref.source, self.ref.revision, self.options, self.options.decode_for(self.decode))


def log(message: str) -> None:
    try:
        print(f"sana serve: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _model_bytes(loaded) -> int:
    """What a loaded model's weights hold (parameters and buffers of every component)."""
    total = 0
    for component in getattr(loaded.pipe, "components", {}).values():
        for tensors in (getattr(component, "parameters", None), getattr(component, "buffers", None)):
            if tensors is None:
                continue
            with _quiet():
                total += sum(t.numel() * t.element_size() for t in tensors())
    return total


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, (TypeError, AttributeError))


class ModelCache:
    """Loaded models by (model, revision, load options), least recently used first. A model idle
    longer than keep_alive, or the oldest ones while the total exceeds the memory budget, are unloaded
    (never the one in use)."""

    def __init__(self, *, keep_alive: float | None, budget_bytes: int | None):
        self.keep_alive = keep_alive
        self.budget_bytes = budget_bytes
        self._models: collections.OrderedDict = collections.OrderedDict()  # key -> [loaded, bytes, last used]
        self.lock = threading.Lock()

    @staticmethod
    def key(ref, options: LoadOptions) -> tuple:
        # Where weights come from (offline) and logging do not change the loaded model.
        return (ref.source, ref.revision, replace(options, compile=options.compiles(), verbose=False, offline=False))

    def get(self, ref, options: LoadOptions):
        from .pipeline import load

        key = self.key(ref, options)
        with self.lock:
            entry = self._models.get(key)
            if entry is not None:
                self._models.move_to_end(key)
                entry[2] = time.monotonic()
                return entry[0]
        log(f"loading {ref.describe()}")
        started = time.perf_counter()
        loaded = load(ref, replace(options, verbose=False))
        size = _model_bytes(loaded)
        log(f"loaded {ref.name} in {time.perf_counter() - started:.1f} s ({size / 2**30:.2f} GiB of weights)")
        with self.lock:
            self._models[key] = [loaded, size, time.monotonic()]
            self._evict(keep=key)
        return loaded

    def peek(self, ref, options: LoadOptions):
        """The loaded model for these, or None (never loads)."""
        with self.lock:
            entry = self._models.get(self.key(ref, options))
        return entry[0] if entry is not None else None

    def loaded_names(self) -> list[str]:
        with self.lock:
            return sorted({entry[0].ref.name for entry in self._models.values()})

    def expire(self) -> None:
        with self.lock:
            self._evict()

    def _evict(self, keep: tuple | None = None) -> None:
        now = time.monotonic()
        evicted = False
        for key in list(self._models):
            if key == keep:
                continue
            loaded, size, used = self._models[key]
            over_budget = self.budget_bytes is not None and self._total() > self.budget_bytes
            idle = self.keep_alive is not None and now - used > self.keep_alive
            if over_budget or idle:
                del self._models[key]
                evicted = True
                log(f"unloaded {loaded.ref.name} ({'over the memory budget' if over_budget else 'idle'})")
        if not evicted:
            return
        from .decode import release_memory

        release_memory()

    def _total(self) -> int:
        return sum(entry[1] for entry in self._models.values())


class Scheduler:
    """Queues work, gathers what can share GPU batches for `window` seconds, renders on one thread."""

    def __init__(self, *, window: float = 0.2, max_queue: int = 64, max_batch: int | None = None,
                 models: ModelCache | None = None):
        self.window = window
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.models = models or ModelCache(keep_alive=None, budget_bytes=None)
        self._queue: list[Work] = []
        self._running: list[Work] = []
        self._cond = threading.Condition()
        self.accepting = True
        self._numbers = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="sana-scheduler", daemon=True)
        self._thread.start()

    # ---- called from request handlers ----
    def submit(self, work: Work) -> None:
        with self._cond:
            if not self.accepting:
                raise Draining()
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(work)
            self._cond.notify_all()

    def cancel(self, work: Work) -> None:
        """The client went away: queued work is dropped; running work finishes unseen (and a run whose
        every request went away stops at its next step)."""
        if work.finished.is_set():
            return
        work.cancelled.set()
        with self._cond:
            if work in self._queue:
                self._queue.remove(work)
                work.finished.set()
                log(f"dropped {work.label} ({len(work.jobs)} image(s)): the client went away while it was queued")
            elif work in self._running:
                log(f"{work.label}: the client went away while it was rendering; its images are discarded")
                if all(w.cancelled.is_set() for w in self._running) and self._stop is not None:
                    self._stop.request(15)

    def stop_accepting(self) -> None:
        with self._cond:
            self.accepting = False

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---- the rendering thread ----
    _stop = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait(timeout=1.0)
                    if not self._queue:
                        self.models.expire()
            time.sleep(self.window)  # the gathering window: requests arriving now join this run
            with self._cond:
                if not self._queue:
                    continue
                family = self._queue[0].family()
                works = [w for w in self._queue if w.family() == family]
                for work in works:
                    self._queue.remove(work)
                self._running = works
            try:
                self._render(works)
            except BaseException as exc:  # noqa: BLE001 - one failed run must never stop the server
                self._fail(works, exc)
            finally:
                with self._cond:
                    self._running = []
                    self._stop = None
                for work in works:
                    work.finished.set()

    def _fail(self, works: list[Work], exc: BaseException) -> None:
        if isinstance(exc, SanaError):
            message, code = exc.line(), exc.exit_code
        else:
            message, code = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", 1
        status = 503 if isinstance(exc, EnvironmentProblem) else 400 if code == 2 else 500
        log(f"run failed: {message}")
        for work in works:
            _send(work, {"type": "error", "message": message, "exit_code": code, "status": status})

    def _render(self, works: list[Work]) -> None:
        from .events import BatchStarted, ImageFailed, ImageWritten, Noted, Preview, Step, Warned
        from .results import RunOptions, StopToken
        from .runner import run

        works = [w for w in works if not w.cancelled.is_set()]
        if not works:
            return
        first = works[0]
        loaded = self.models.get(first.ref, first.options)
        jobs, owner = [], {}
        for work in works:
            for job in work.jobs:
                merged = replace(job, index=len(jobs) + 1)
                owner[merged.index] = (work, job.index)
                jobs.append(merged)
        cap = self.max_batch or min(default_batch_size(j.width, j.height) for j in jobs)
        groups = group_jobs(jobs, cap)
        plan = Plan(command="serve", model=loaded.ref, jobs=jobs, groups=groups,
                    output_dir=os.path.dirname(jobs[0].path), force_size=any(w.force_size for w in works))
        run_number = next(self._numbers)
        labels = ", ".join(w.label for w in works[:2]) + (f" and {len(works) - 2} more" if len(works) > 2 else "")
        log(f"run {run_number}: {len(jobs)} image(s) from {len(works)} request(s) ({labels}) in {len(groups)} "
            f"GPU batch(es)")
        current: list[Work] = []

        def events(event) -> None:
            if isinstance(event, BatchStarted):
                members = {}
                for job in event.jobs:
                    work, index = owner[job.index]
                    members.setdefault(id(work), (work, []))[1].append(index)
                current[:] = [work for work, _ in members.values()]
                log(f"run {run_number} GPU batch {event.number}/{event.total}: {len(event.jobs)} image(s) from "
                    f"{len(members)} request(s), {event.jobs[0].width}x{event.jobs[0].height}, "
                    f"{event.jobs[0].steps} steps")
                for work, indices in members.values():
                    _send(work, {"type": "batch", "number": event.number, "total": event.total, "indices": indices})
            elif isinstance(event, Step):
                for work in current:
                    _send(work, {"type": "step", "step": event.step, "total": event.total})
            elif isinstance(event, Preview):
                work, index = owner[event.job.index]
                _send(work, {"type": "partial", "index": index, "step": event.step, "total": event.total,
                             "image": event.image})
            elif isinstance(event, (ImageWritten, ImageFailed)):
                result = event.result
                work, index = owner[result.job.index]
                message = {"type": "image" if result.ok else "failed", "index": index, "decode": result.decode,
                           "fallbacks": list(result.fallbacks), "seconds": round(result.seconds, 4),
                           "retried_alone": result.retried_alone, "path": result.job.path, "seed": result.job.seed,
                           "key": result.job.key}
                if not result.ok:
                    message.update(error=result.error, exit_code=result.error_exit_code or 1)
                if work.cancelled.is_set():
                    _discard(result.job.path)
                else:
                    _send(work, message)
            elif isinstance(event, (Warned, Noted)):
                for work in works:
                    _send(work, {"type": "warning" if isinstance(event, Warned) else "note",
                                 "message": event.message})

        stop = StopToken()
        with self._cond:
            self._stop = stop
        def previews(job, total: int) -> tuple:
            return preview_steps(owner[job.index][0].partial_images, total)

        options = RunOptions(decode=loaded.options.decode_for(first.decode), abort_in_flight=True,
                             previews=previews if any(w.partial_images for w in works) else None)
        outcome = run(plan, loaded, options, events=events, stop=stop, keep_text_encoder=True)
        done = {"type": "done", "timings": outcome.timings, "model": loaded.describe(),
                "peak_memory_bytes": outcome.peak_memory_bytes, "peak_reserved_bytes": outcome.peak_reserved_bytes}
        log(f"run {run_number}: done in {outcome.timings.get('total', 0.0):.2f} s")
        for work in works:
            _send(work, done)


def preview_steps(count: int, total: int) -> tuple:
    """The steps after which `count` previews of a `total`-step render are made: evenly spaced, never the
    last step (the image itself follows it); fewer when there are fewer steps."""
    return tuple(sorted({round(k * total / (count + 1)) for k in range(1, count + 1)} - {0, total}))


def _send(work: Work, message: Message) -> None:
    if work.cancelled.is_set():
        return
    try:
        work.sink(message)
    except Exception:  # noqa: BLE001 - a vanished client never fails the run
        work.cancelled.set()


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
