"""The work queue of `sana serve`: fair first-come order, a short gathering window in which requests that
share a model, load options and decode run together in GPU batches, and an LRU cache of loaded models
(keep-alive and a memory budget).

One thread renders (one GPU, one run at a time); HTTP handlers only queue work and read its messages.
A request's jobs keep their own seeds, so batching changes its pixels by batched rounding at most.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import EnvironmentProblem, SanaError
from ..planning.plan import ImageJob, LoadOptions, Plan, default_batch_size, group_jobs
from .wire import batch_event, done_event, error_event, result_event, step_event, text_event

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
    inputs: dict = field(default_factory=dict)  # sha256 -> the server's copy of an input file the request sent
    release: Callable[[], None] | None = None  # lets go of those copies once the work is finished
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def finish(self) -> None:
        """The work is over (rendered, failed, dropped): its input files may be evicted from now on."""
        release, self.release = self.release, None
        if release is not None:
            release()
        self.finished.set()

    def family(self) -> tuple:
        """Work of one family can share GPU batches: same model, load options and decode."""
        return (self.ref.source, self.ref.revision, self.options, self.options.decode_for(self.decode))


def log(message: str) -> None:
    try:
        print(f"sana serve: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _model_bytes(loaded) -> int:
    """What a loaded model's weights hold on the device its budget is for (its own: the GPU, or the CPU for a
    model that runs there). Each tensor counts at its stored size: a torchao int8 or fp8 tensor reports its
    original dtype but stores int8 data and scales, a bitsandbytes one packed data and a state. Tensors
    elsewhere count nothing (a text encoder released to `meta`). Under --low-memory on a GPU every weight
    lives on the CPU and one component at a time comes to the GPU: the largest one is what it holds there."""
    from ..engine.quantize import storage_bytes

    kind = getattr(loaded.device, "type", "cpu")
    offloaded = kind == "cuda" and bool(getattr(loaded.options, "low_memory", False))
    sizes = []
    for component in getattr(loaded.pipe, "components", {}).values():
        if not callable(getattr(component, "parameters", None)) or not callable(getattr(component, "buffers", None)):
            continue  # the tokenizer, the scheduler
        tensors = [*component.parameters(), *component.buffers()]
        sizes.append(sum(storage_bytes(t) for t in tensors if offloaded or t.device.type == kind))
    return max(sizes, default=0) if offloaded else sum(sizes)


# Loads of different models never overlap: diffusers builds each model inside accelerate's init_empty_weights,
# which swaps nn.Module.register_parameter for the whole process while it runs, so a second load at the same
# time builds its modules on `meta`, and two interleaved swaps can leave the swap in place for good. One load
# at a time also keeps the peak memory of loading to one model's.
_ONE_LOAD_AT_A_TIME = threading.Lock()


@dataclass(eq=False)
class _Entry:
    loaded: object  # LoadedModel
    size: int  # bytes counted against the budget (_model_bytes)
    used: float  # time.monotonic() of the last use
    users: int = 0  # runs rendering with it now: while any does, it is never unloaded


@dataclass
class _Waiting:
    deadline: float
    said: bool = False


@dataclass(eq=False)
class _Loading:
    """A load in progress: every thread that asks for the same key waits for it and gets its model (or its error)."""

    done: bool = False
    loaded: object = None
    error: BaseException | None = None


class ModelCache:
    """Loaded models by (model, revision, load options), least recently used first. A model idle
    longer than keep_alive, or the oldest ones while the total exceeds the memory budget, are unloaded.

    One load per key: a second request for a model that is loading waits for that load and gets the same
    model. A model in use (a run renders with it: `use`) is never unloaded; one the budget would unload goes
    when its run ends. Under a budget, a load waits while other models are in use, as it may need their
    memory (a model's size is known only once loaded, so one never loaded here may need the whole budget);
    it says so in the log, and after `wait_seconds` refuses (exit 4, HTTP 503) naming what still renders."""

    def __init__(self, *, keep_alive: float | None, budget_bytes: int | None, wait_seconds: float = 600.0):
        self.keep_alive = keep_alive
        self.budget_bytes = budget_bytes
        self.wait_seconds = wait_seconds
        self._models: collections.OrderedDict = collections.OrderedDict()  # key -> _Entry
        self._loading: dict[tuple, _Loading] = {}
        self._sizes: dict[tuple, int] = {}  # the size of every key loaded so far, to plan the next load of it
        self._cond = threading.Condition()

    @staticmethod
    def key(ref, options: LoadOptions) -> tuple:
        # Where weights come from (offline) and logging do not change the loaded model.
        return (ref.source, ref.revision, replace(options, compile=options.compiles(), verbose=False, offline=False))

    def get(self, ref, options: LoadOptions):
        """The loaded model for (ref, options), loading it if needed (POST /load, models loaded up front)."""
        return self._acquire(ref, options, hold=False)

    @contextlib.contextmanager
    def use(self, ref, options: LoadOptions):
        """The loaded model, held in use until the block ends: nothing unloads it meanwhile."""
        loaded = self._acquire(ref, options, hold=True)
        try:
            yield loaded
        finally:
            self._release(self.key(ref, options))

    def _acquire(self, ref, options: LoadOptions, *, hold: bool):
        key = self.key(ref, options)
        waiting = _Waiting(deadline=time.monotonic() + self.wait_seconds)
        with self._cond:
            while True:
                entry = self._models.get(key)
                if entry is not None:
                    self._models.move_to_end(key)
                    entry.used = time.monotonic()
                    entry.users += hold
                    return entry.loaded
                loading = self._loading.get(key)
                if loading is not None:
                    while not loading.done:  # another thread loads this very model: take what it loads
                        self._cond.wait()
                    if loading.error is not None:
                        raise loading.error
                    continue
                if self._room(key, ref, waiting):
                    break
            loading = self._loading[key] = _Loading()
        try:
            loaded, size = self._load(ref, options)
        except BaseException as exc:
            with self._cond:
                loading.error, loading.done = exc, True
                del self._loading[key]
                self._cond.notify_all()
            raise
        with self._cond:
            self._models[key] = _Entry(loaded, size, time.monotonic(), users=int(hold))
            self._sizes[key] = size
            loading.loaded, loading.done = loaded, True
            del self._loading[key]
            self._cond.notify_all()
            evicted = self._evict(keep=key)
        _release_memory(evicted)
        return loaded

    def _load(self, ref, options: LoadOptions):
        from ..engine.loading import load

        with _ONE_LOAD_AT_A_TIME:
            log(f"loading {ref.describe()}")
            started = time.perf_counter()
            loaded = load(ref, replace(options, verbose=False))
            size = _model_bytes(loaded)
        log(f"loaded {ref.name} in {time.perf_counter() - started:.1f} s ({size / 2**30:.2f} GiB of weights)")
        return loaded, size

    def _room(self, key: tuple, ref, waiting: "_Waiting") -> bool:
        """Under a budget, whether the models in use leave room for this load; if not, wait a while on the
        condition (the caller holds it) and say False, or refuse once the wait is over."""
        if self.budget_bytes is None:
            return True
        need = self._sizes.get(key, self.budget_bytes)
        busy = [entry for k, entry in self._models.items() if entry.users and k != key]
        if not busy or sum(entry.size for entry in busy) + need <= self.budget_bytes:
            return True
        names = ", ".join(sorted({entry.loaded.ref.name for entry in busy}))
        left = waiting.deadline - time.monotonic()
        if left <= 0:
            raise EnvironmentProblem(
                f"cannot load {ref.name} within the --max-memory budget: {names} still rendering after "
                f"{self.wait_seconds:g} s", hint="try again when the running work is done, or raise --max-memory")
        if not waiting.said:
            log(f"waiting for {names} to finish rendering before loading {ref.name} (the --max-memory budget may "
                "need its memory)")
            waiting.said = True
        self._cond.wait(min(left, 1.0))
        return False

    def _release(self, key: tuple) -> None:
        with self._cond:
            entry = self._models.get(key)
            if entry is None:
                return
            entry.users -= 1
            entry.used = time.monotonic()
            evicted = self._evict() if not entry.users else []
            self._cond.notify_all()  # a load may be waiting for this model's memory
        _release_memory(evicted)

    def has(self, key: tuple) -> bool:
        with self._cond:
            return key in self._models

    def peek(self, ref, options: LoadOptions):
        """The loaded model for these, or None (never loads)."""
        with self._cond:
            entry = self._models.get(self.key(ref, options))
        return entry.loaded if entry is not None else None

    def loaded_names(self) -> list[str]:
        with self._cond:
            return sorted({entry.loaded.ref.name for entry in self._models.values()})

    def expire(self) -> None:
        with self._cond:
            evicted = self._evict()
        _release_memory(evicted)

    def _evict(self, keep: tuple | None = None) -> list:
        """Unload, least recently used first, what is idle past keep-alive or what the budget has no room for;
        never a model in use, nor `keep` (just loaded), nor for the budget the most recently used one. Returns the
        unloaded models (freed outside the lock)."""
        now = time.monotonic()
        evicted = []
        newest = next(reversed(self._models), None)  # a model alone over the budget stays: it was asked for
        for key in list(self._models):
            entry = self._models[key]
            if key == keep or entry.users:
                continue
            over_budget = self.budget_bytes is not None and self._total() > self.budget_bytes and key != newest
            idle = self.keep_alive is not None and now - entry.used > self.keep_alive
            if over_budget or idle:
                del self._models[key]
                evicted.append(entry.loaded)
                log(f"unloaded {entry.loaded.ref.name} ({'over the memory budget' if over_budget else 'idle'})")
        if self.budget_bytes is not None and self._total() > self.budget_bytes:
            busy = sorted({e.loaded.ref.name for e in self._models.values() if e.users})
            if busy:
                log(f"over the memory budget while {', '.join(busy)} renders; the least recently used model is "
                    "unloaded when its run ends")
        return evicted

    def _total(self) -> int:
        return sum(entry.size for entry in self._models.values())


def _release_memory(evicted: list) -> None:
    if not evicted:
        return
    evicted.clear()  # the last references, so the collector can free their weights
    from ..engine.vae import release_memory

    release_memory()


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
        self._loading: set[tuple] = set()  # model keys a loader thread is loading now
        self._cond = threading.Condition()
        self.accepting = True
        self._numbers = itertools.count(1)
        self.dead: str | None = None  # why the rendering thread stopped; it never stops otherwise
        self.on_death: Callable[[str], None] | None = None  # the server's way to exit when it does
        self._thread = threading.Thread(target=self._watched, name="sana-scheduler", daemon=True)
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
                work.finish()
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

    def _watched(self) -> None:
        """The rendering loop under a watchdog: if it ever ends by an exception, nothing would render the
        queue again, so every waiting request is answered 503 and the server is told to exit."""
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - whatever stopped it, say so and end the server
            self._die(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                      .rstrip(": "))

    def _die(self, reason: str) -> None:
        with self._cond:
            self.dead = reason
            self.accepting = False
            pending = self._queue + [work for work in self._running if work not in self._queue]
            self._queue, self._running = [], []
        message = f"the server's work queue stopped ({reason}); the server is exiting"
        for work in pending:
            _send(work, error_event(message, 4, 503))
            work.finish()
        if self.on_death is not None:
            self.on_death(reason)

    def _loop(self) -> None:
        while True:
            with self._cond:
                ready = self._ready_family() is not None
                if not ready:
                    self._cond.wait(timeout=1.0)
                    idle = not self._queue
            if not ready:
                if idle:  # unloading frees memory slowly: never while holding the queue's lock
                    self.models.expire()
                continue
            time.sleep(self.window)  # the gathering window: requests arriving now join this run
            with self._cond:
                family = self._ready_family()
                if family is None:
                    continue
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
                    work.finish()

    def _ready_family(self):
        """(Under the lock) the family of the first queued work whose model is loaded; a model that is
        not is loaded by a loader thread meanwhile, so a slow load (a hub lookup timing out, a download)
        holds only the requests for that model, never the queue."""
        for work in self._queue:
            key = self.models.key(work.ref, work.options)
            if self.models.has(key):
                return work.family()
            if key not in self._loading:
                self._loading.add(key)
                threading.Thread(target=self._load, args=(work.ref, work.options, key), name="sana-loader",
                                 daemon=True).start()
        return None

    def _load(self, ref, options: LoadOptions, key: tuple) -> None:
        try:
            self.models.get(ref, options)
        except BaseException as exc:  # noqa: BLE001 - the requests for this model get the error
            with self._cond:
                failed = [w for w in self._queue if self.models.key(w.ref, w.options) == key]
                for work in failed:
                    self._queue.remove(work)
            self._fail(failed, exc)
            for work in failed:
                work.finish()
        finally:
            with self._cond:
                self._loading.discard(key)
                self._cond.notify_all()

    def _fail(self, works: list[Work], exc: BaseException) -> None:
        if isinstance(exc, SanaError):
            message, code = exc.line(), exc.exit_code
        else:
            message, code = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", 1
        status = 503 if isinstance(exc, EnvironmentProblem) else 400 if code == 2 else 500
        log(f"run failed: {message}")
        for work in works:
            _send(work, error_event(message, code, status))

    def _render(self, works: list[Work]) -> None:
        works = [w for w in works if not w.cancelled.is_set()]
        if not works:
            return
        first = works[0]
        with self.models.use(first.ref, first.options) as loaded:  # never unloaded while it renders
            self._render_with(loaded, works)

    def _render_with(self, loaded, works: list[Work]) -> None:
        from ..engine.runner import run
        from ..reporting.events import BatchStarted, ImageFailed, ImageWritten, Noted, Preview, Step, Warned
        from ..reporting.results import RunOptions, StopToken

        first = works[0]
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
                    _send(work, batch_event(event.number, event.total, indices))
            elif isinstance(event, Step):
                for work in current:
                    _send(work, step_event(event.step, event.total))
            elif isinstance(event, Preview):
                work, index = owner[event.job.index]
                _send(work, {"type": "partial", "index": index, "step": event.step, "total": event.total,
                             "image": event.image})
            elif isinstance(event, (ImageWritten, ImageFailed)):
                result = event.result
                work, index = owner[result.job.index]
                if work.cancelled.is_set():
                    _discard(result.job.path)
                else:
                    _send(work, result_event(result, index))
            elif isinstance(event, (Warned, Noted)):
                for work in works:
                    _send(work, text_event("warning" if isinstance(event, Warned) else "note", event.message))

        stop = StopToken()
        with self._cond:
            self._stop = stop
        def previews(job, total: int) -> tuple:
            return preview_steps(owner[job.index][0].partial_images, total)

        options = RunOptions(decode=loaded.options.decode_for(first.decode), abort_in_flight=True,
                             previews=previews if any(w.partial_images for w in works) else None)
        # The input files the requests sent, by sha256 (and by the name a job gives each, where one name means
        # one file in this run): the only input files this run may open.
        from ..inputs.supplied import supplying
        from .wire import file_refs

        names: dict = {}
        for job in jobs:
            for _, value, digest in file_refs(job):
                names.setdefault(value, set()).add(digest)
        with supplying({digest: path for work in works for digest, path in work.inputs.items()}, names):
            outcome = run(plan, loaded, options, events=events, stop=stop, keep_text_encoder=True)
        done = done_event(outcome, loaded.describe())
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
