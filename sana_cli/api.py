"""The Python API the CLI calls, and that users can call too.

    import sana_cli
    result = sana_cli.generate("a red fox in the snow", model="tiny", seed=7, output="fox.png")
    print(result.images[0].written.path)

    session = sana_cli.load("sana-1600m-1024")         # keep the model loaded
    for seed in range(4):
        session.generate("a lighthouse at dusk", seed=seed)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from .engine.distributed import reports_completion
from .engine.families import pipeline_of
from .engine.loading import LoadedModel
from .errors import EnvironmentProblem, GenerationError, Interrupted, PartialFailure, UsageError
from .models.modelref import ModelRef
from .planning.plan import LoadOptions, PixelOptions, Plan, Request, check_side, model_for, plan_generate, rekey
from .reporting.events import EventSink, Loading, Planned, no_events
from .reporting.results import ImageResult, RunOptions, RunOutcome, StopToken


@dataclass
class GenerateResult:
    plan: Plan
    outcome: RunOutcome
    model: dict  # LoadedModel.describe()
    load_seconds: float = 0.0

    @property
    def images(self) -> list[ImageResult]:
        return self.outcome.results

    def to_dict(self) -> dict:
        timings = {"load": round(self.load_seconds, 4), **self.outcome.timings}
        return {"ok": not self.outcome.failed, "command": self.plan.command, "model": self.model,
                "images": [r.to_dict() for r in self.outcome.results], "timings": timings,
                "peak_memory_bytes": self.outcome.peak_memory_bytes,
                "peak_reserved_bytes": self.outcome.peak_reserved_bytes, "notes": self.plan.notes,
                "warnings": self.outcome.warnings}


class Session:
    """A loaded model that stays in memory across calls (so its text encoder is never released)."""

    def __init__(self, loaded: LoadedModel, load_seconds: float = 0.0):
        self.loaded = loaded
        self.load_seconds = load_seconds

    @property
    def model(self) -> ModelRef:
        return self.loaded.ref

    def run(self, plan: Plan, *, decode: str = "auto", events: EventSink = no_events,
            stop: StopToken | None = None, abort_in_flight: bool = True, on_result=None,
            keep_latents: bool = False) -> RunOutcome:
        """Run a Plan on this model; returns its outcome (failures are recorded, not raised)."""
        check_plan_fits(plan, self.loaded.ref)
        decode = self.loaded.options.decode_for(decode)
        plan = rekey(plan, self.pixels(decode))
        options = RunOptions(decode=decode, abort_in_flight=abort_in_flight, max_memory_bytes=_budget(self.loaded),
                             keep_latents=keep_latents)
        return _run(plan, self.loaded, options, events=events, stop=stop, keep_text_encoder=True,
                    on_result=on_result)

    def pixels(self, decode: str = "auto") -> PixelOptions:
        """The pixel-deciding options of this loaded model with a decode strategy (for job keys)."""
        return self.loaded.options.pixels(decode)

    def batch(self, source: str, **options) -> "BatchResult":
        """`sana batch` on this loaded model; keyword arguments as for sana_cli.batch()."""
        return batch(source, session=self, **options)

    def generate(self, prompt: str, *, decode: str = "auto", events: EventSink = no_events,
                 stop: StopToken | None = None, keep_latents: bool = False, **request) -> GenerateResult:
        """Make and write images for one prompt; keyword arguments are Request fields (width,
        height, steps, guidance, negative_prompt, seed, num_images, pag_scale, output, loras,
        controlnet, control_image, control_scale, image, strength, ...). A session fuses the LoRAs
        each call asks for and restores the exact base weights when a later call asks for others."""
        request.setdefault("model", self.loaded.ref.name)
        request.setdefault("offline", self.loaded.options.offline)
        decode = self.loaded.options.decode_for(decode)
        plan = plan_generate(Request(prompt=prompt, **request), self.loaded.ref, self.pixels(decode))
        prepare_outputs(plan)
        outcome = self.run(plan, decode=decode, events=events, stop=stop, keep_latents=keep_latents)
        return _finish(plan, outcome, self.loaded, self.load_seconds)


LOAD_KEYWORDS = ("device", "dtype", "offline", "allow_pickle", "low_memory", "compile", "fp8", "max_memory",
                 "verbose", "quantize")


def load_options(options: LoadOptions | None = None, **keywords) -> LoadOptions:
    """The public functions' load keyword arguments (device, dtype, offline, allow_pickle, low_memory,
    compile, fp8, max_memory, verbose, quantize) as one LoadOptions; or `options` itself, given whole."""
    unknown = set(keywords) - set(LOAD_KEYWORDS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if options is not None:
        if keywords:
            raise TypeError("pass either options= or load keyword arguments, not both")
        return options
    if "max_memory" in keywords:
        keywords["max_memory_gib"] = keywords.pop("max_memory")
    return LoadOptions(**keywords)


def _split_load_keywords(request: dict) -> dict:
    """Take the load keyword arguments out of a function's **request."""
    return {name: request.pop(name) for name in LOAD_KEYWORDS if name in request}


def load(model: str | None = None, *, revision: str | None = None, options: LoadOptions | None = None,
         **load_keywords) -> Session:
    """Load a model (preset name, hub id or local directory) and keep it for repeated generation.
    `options` is a LoadOptions; or give its fields as keyword arguments (max_memory in GiB)."""
    from .models.modelref import resolve

    options = load_options(options, **load_keywords)
    ref = resolve(model, revision=revision)
    options.pixels()  # bad values are usage errors, before torch loads
    check_cache_dir()
    loaded, seconds = _load_timed(ref, options)
    return Session(loaded, seconds)


def generate(prompt: str, *, model: str | None = None, size: int | None = None, decode: str = "auto",
             options: LoadOptions | None = None, keep_latents: bool = False, events: EventSink = no_events,
             stop: StopToken | None = None, **request) -> GenerateResult:
    """One-shot: plan, load, generate, write. Raises GenerationError if any image failed and
    Interrupted if a signal stopped it. Keyword arguments are Request fields, or load options
    (as for load())."""
    options = load_options(options, **_split_load_keywords(request))
    if size is not None:
        check_side("size", size)
        request.setdefault("width", size)
        request.setdefault("height", size)
    request.setdefault("offline", options.offline)
    req = Request(prompt=prompt, model=model, **request)
    plan = plan_generate(req, model_for(req), options.pixels(options.decode_for(decode)))
    return run_plan(plan, options, decode=decode, keep_latents=keep_latents, events=events, stop=stop)


def video(prompt: str, *, model: str | None = None, decode: str = "auto", options: LoadOptions | None = None,
          keep_latents: bool = False, events: EventSink = no_events, stop: StopToken | None = None,
          **request) -> GenerateResult:
    """One-shot `sana video`: plan, load a SANA-Video model (default sana-video-2b-480p), render, write the MP4
    or WebM. Keyword arguments are VideoRequest fields (width, height, frames, fps, motion_score, steps,
    guidance, seed, negative_prompt, image, output, frames_dir, ...) or load options (as for load())."""
    from .planning.video import VideoRequest, model_for_video, plan_video

    options = load_options(options, **_split_load_keywords(request))
    req = VideoRequest(prompt=prompt, model=model, **request)
    plan = plan_video(req, model_for_video(req), options.pixels(options.decode_for(decode)))
    return run_plan(plan, options, decode=decode, keep_latents=keep_latents, events=events, stop=stop)


def run_plan(plan: Plan, options: LoadOptions | None = None, *, decode: str = "auto",
             events: EventSink = no_events, stop: StopToken | None = None, abort_in_flight: bool = True,
             on_result=None, loaded: LoadedModel | None = None, keep_latents: bool = False) -> GenerateResult:
    """Load the plan's model with `options` (unless `loaded` is given) and run the plan once; the
    model is not kept."""
    options = options or LoadOptions()
    stop = stop or StopToken()
    load_seconds = 0.0
    if loaded is None:
        plan = rekey(plan, options.pixels(options.decode_for(decode)))
        check_cache_dir()
        _preflight(plan.model, options)  # what refuses the run without loading, before any directory is made
    else:
        plan = rekey(plan, loaded.options.pixels(loaded.options.decode_for(decode)))
    prepare_outputs(plan)
    if loaded is None:
        loaded, load_seconds = _load_timed(plan.model, _compile_decided(options, plan), events)
    check_plan_fits(plan, loaded.ref)
    if stop.requested:
        raise Interrupted("interrupted before generation started", signal_number=stop.signal_number)
    run_options = RunOptions(decode=loaded.options.decode_for(decode), abort_in_flight=abort_in_flight,
                             max_memory_bytes=_budget(loaded), keep_latents=keep_latents)
    outcome = _run(plan, loaded, run_options, events=events, stop=stop, keep_text_encoder=False,
                  on_result=on_result)
    return _finish(plan, outcome, loaded, load_seconds)


def _load_timed(ref: ModelRef, options: LoadOptions, events: EventSink | None = None) -> tuple[LoadedModel, float]:
    """Load a model, telling `events` first; (the loaded model, seconds it took)."""
    from .engine.loading import load as load_model

    if events is not None:
        events(Loading(model=ref))
    started = time.perf_counter()
    loaded = load_model(ref, options)
    return loaded, time.perf_counter() - started


def _preflight(ref: ModelRef, options: LoadOptions) -> None:
    """pipeline.preflight: the refusals a load would make (no CUDA, no GPU for --fp8 or nf4, a model not
    cached offline), decided before the run creates a directory or a manifest."""
    from .engine.loading import preflight

    preflight(ref, options)


def _compile_decided(options: LoadOptions, plan: Plan, device: str | None = None) -> LoadOptions:
    """The options with `compile` settled for this plan (and, for one process of several, its device)."""
    compile = options.compile
    if compile == "auto" and options.quantize and options.low_memory:
        compile = "off"  # diffusers runs torchao's quantized weights under CPU offload, but not compiled
    settled = replace(options, compile=_want_compile(compile, plan, options.device))
    return settled if device is None else replace(settled, device=device)


def prepare_outputs(plan: Plan) -> None:
    """Create output directories before loading, so an unwritable place fails in a second, not after
    a model download."""
    from pathlib import Path

    from .storage.files import ensure_directory

    for directory in sorted({str(Path(job.path).parent) for job in plan.jobs}):
        ensure_directory(directory)


def _budget(loaded: LoadedModel) -> int | None:
    gib = loaded.options.max_memory_gib
    return None if gib is None else int(gib * 2**30)


def check_cache_dir() -> None:
    """sana-cli's cache (tiny models, compile cache) must be a directory if it exists: found before
    torch is imported, as an environment problem."""
    from .cache import cache_root

    root = cache_root()
    for path in (root, *root.parents):
        if os.path.lexists(path):
            if not os.path.isdir(path):
                raise EnvironmentProblem(f"the sana-cli cache {root} cannot be created: {path} is not a directory",
                                         hint="set SANA_CLI_CACHE to a writable directory")
            return


def _run(plan: Plan, loaded: LoadedModel, options: RunOptions, *, events: EventSink, stop: StopToken | None,
         keep_text_encoder: bool, on_result=None, done: frozenset[int] = frozenset(), claim=None) -> RunOutcome:
    if getattr(loaded, "remote", False):  # attached to `sana serve`: it renders, this process writes
        return loaded.run(plan, options, events=events, stop=stop, on_result=on_result, done=done, claim=claim)
    from .engine.runner import run

    return run(plan, loaded, options, events=events, stop=stop, keep_text_encoder=keep_text_encoder,
               on_result=on_result, done=done, claim=claim)


def _finish(plan: Plan, outcome: RunOutcome, loaded: LoadedModel, load_seconds: float) -> GenerateResult:
    result = GenerateResult(plan=plan, outcome=outcome, model=loaded.describe(), load_seconds=load_seconds)
    if outcome.stopped_by is not None:
        done = sum(r.ok for r in outcome.results)
        raise Interrupted(f"interrupted; {done} of {len(plan.jobs)} image(s) written, nothing partial left",
                          signal_number=outcome.stopped_by)
    if plan.command in ("generate", "video") and outcome.failed:
        first = outcome.failed[0]
        error = GenerationError(first.error or "generation failed")
        if first.error_exit_code:
            error.exit_code = first.error_exit_code
        raise error
    return result


def _want_compile(compile: str | bool, plan: Plan, device: str) -> bool:
    if isinstance(compile, bool):
        return compile
    if compile == "on":
        return True
    if compile == "off":
        return False
    import torch

    from .engine.speed import compile_pays_off

    return device != "cpu" and torch.cuda.is_available() and compile_pays_off(plan.jobs, plan.groups)


def check_plan_fits(plan: Plan, ref: ModelRef) -> None:
    """Re-check what planning could not know before loading (hub models not in the cache)."""
    from .planning.plan import check_loaded_model

    check_loaded_model(plan, ref)


# ---- batch -----------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What a batch run did. A batch never raises for failed rows: check .failed and .stopped_by."""

    plan: Plan
    output_dir: str
    manifest: str
    outcome: RunOutcome | None = None  # None when every image already existed
    model: dict | None = None
    already_done: int = 0
    invalid_rows: list = field(default_factory=list)
    removed_temp_files: int = 0
    load_seconds: float = 0.0
    source: str = ""
    is_main_process: bool = True  # False in the other processes of a multi-process launch
    already_done_paths: list[str] = field(default_factory=list)  # images an earlier run made

    @property
    def written(self) -> list[ImageResult]:
        return [r for r in self.outcome.results if r.ok] if self.outcome else []

    @property
    def failed(self) -> list[ImageResult]:
        return self.outcome.failed if self.outcome else []

    @property
    def stopped_by(self) -> int | None:
        return self.outcome.stopped_by if self.outcome else None

    def to_dict(self) -> dict:
        timings = {"load": round(self.load_seconds, 4), **(self.outcome.timings if self.outcome else {})}
        seconds = timings.get("total", 0.0)
        return {
            "ok": not self.failed and self.stopped_by is None, "command": "batch", "source": self.source,
            "output_dir": self.output_dir, "manifest": self.manifest, "model": self.model,
            "images_planned": len(self.plan.jobs), "written": len(self.written), "already_done": self.already_done,
            "failed": len(self.failed),
            "invalid_rows": [{"line": e.line, "error": e.message} for e in self.invalid_rows],
            "failures": [r.to_dict() for r in self.failed], "removed_temp_files": self.removed_temp_files,
            "stopped_by_signal": self.stopped_by, "timings": timings,
            "images_per_second": round(len(self.written) / seconds, 4) if seconds else None,
            "peak_memory_bytes": self.outcome.peak_memory_bytes if self.outcome else None,
            "peak_reserved_bytes": self.outcome.peak_reserved_bytes if self.outcome else None,
            "warnings": self.outcome.warnings if self.outcome else [],
            "images": [r.to_dict() for r in self.written],
            "already_done_paths": self.already_done_paths,
        }


def plan_batch_file(source: str, *, model: str | None = None, output_dir: str = "sana-out", defaults=None,
                    batch_size: int | None = None, shard: tuple[int, int] | None = None, overwrite: bool = False,
                    skip_invalid: bool = False, input_format: str = "auto", revision: str | None = None,
                    pixels: PixelOptions | None = None):
    """Read, check and plan a batch file without loading anything: (plan, invalid rows, source name)."""
    from .planning import batchfile
    from .planning.plan import BatchDefaults, plan_batch

    defaults = defaults or BatchDefaults()
    rows, invalid, name = batchfile.load(source, input_format)
    ref = model_for(Request(prompt="", model=model, width=defaults.width, height=defaults.height, revision=revision))
    if ref.is_video:  # a SANA-Video model: each row is a video
        from .planning.video import plan_video_batch

        plan, unplannable = plan_video_batch(rows, ref, defaults, output_dir, shard=shard, overwrite=overwrite,
                                             pixels=pixels)
    else:
        plan, unplannable = plan_batch(rows, ref, defaults, output_dir, batch_size=batch_size, shard=shard,
                                       overwrite=overwrite, pixels=pixels)
    invalid = batchfile.settle(invalid + unplannable, name, skip_invalid, len(rows) - len(unplannable))
    return plan, invalid, name


@reports_completion
def batch(source: str, *, model: str | None = None, output_dir: str = "sana-out", defaults=None,
          batch_size: int | None = None, shard: tuple[int, int] | None = None, overwrite: bool = False,
          skip_invalid: bool = False, fail_fast: bool = False, input_format: str = "auto",
          revision: str | None = None, decode: str = "auto", options: LoadOptions | None = None,
          events: EventSink = no_events, stop: StopToken | None = None, session: "Session | None" = None,
          keep_latents: bool = False, **load_keywords) -> BatchResult:
    """Render every row of a batch file into output_dir, resuming whatever an earlier run finished.

    results.jsonl in output_dir gets one line per image written or failed. Any number of processes
    may run on one directory at once (each image is claimed by the one that renders it; the
    manifest is appended under a lock). Launched with several processes (accelerate / torchrun),
    each takes its slice and the main one merges the manifests at the end. With `session`, its
    loaded model is used (and kept) instead of loading one; `model` then defaults to the session's.
    `options` is a LoadOptions; or give its fields as keyword arguments, as for load().

    A run that refuses (bad rows, files in the way, a manifest that is not sana-cli's) leaves the
    output directory exactly as it was.

    The steps: plan the file (this process's slice of it), check the manifests, resume (storage.batch_dir),
    refuse what cannot run, open the directory, render with claims and one manifest line per image, and,
    launched as several processes, gather them."""
    from .engine import distributed
    from .storage.batch_dir import BatchDirectory, resume
    from .storage.manifest import check_manifest, manifest_name

    options = load_options(options, **load_keywords)
    if session is not None:
        pixels = session.pixels(session.loaded.options.decode_for(decode))
    else:
        pixels = options.pixels(options.decode_for(decode))
    processes = distributed.launched_processes()
    if session is not None and model is None:
        model = session.loaded.ref.source if session.loaded.ref.kind == "local" else session.loaded.ref.name
    plan, invalid, name = plan_batch_file(
        source, model=model, output_dir=output_dir, defaults=defaults, batch_size=batch_size,
        shard=distributed.combine(shard, processes), overwrite=overwrite, skip_invalid=skip_invalid,
        input_format=input_format, revision=revision, pixels=pixels)
    rank = (processes.index, processes.count) if processes else None
    manifest_path = os.path.join(output_dir, manifest_name(shard, rank))
    check_manifest(manifest_path)
    check_manifest(os.path.join(output_dir, manifest_name(shard)))  # where per-process manifests are merged
    started_ns = time.time_ns()
    done, adopt = resume(plan.jobs, output_dir, overwrite)
    if len(done) < len(plan.jobs):
        _refuse_what_cannot_run(plan, done, options, session, processes)
    # Nothing in the directory has changed up to here.
    directory = BatchDirectory(output_dir, manifest_path, overwrite=overwrite, started_ns=started_ns)
    result = BatchResult(plan=plan, output_dir=output_dir, manifest=str(directory.manifest.path),
                         already_done=len(done), invalid_rows=invalid,
                         removed_temp_files=len(directory.removed_temp_files), source=name,
                         already_done_paths=[plan.jobs[i].path for i in sorted(done)])
    events(Planned(todo=len(plan.jobs) - len(done), done=len(done)))
    try:
        directory.adopt(adopt)
        if len(done) < len(plan.jobs):
            _render_batch(plan, result, directory, done, session=session, options=options, processes=processes,
                          decode=decode, fail_fast=fail_fast, keep_latents=keep_latents, events=events, stop=stop)
    finally:
        directory.close()
    if processes is not None:
        _gather_processes(result, processes, output_dir, shard)
    return result


def _refuse_what_cannot_run(plan: Plan, done: set, options: LoadOptions, session: "Session | None",
                            processes) -> None:
    """Before the directory changes: the cache and the device of an in-process load (preflight), or rows a
    server cannot render for an attached session."""
    from .engine import distributed

    if session is None:
        check_cache_dir()
        _preflight(plan.model, replace(options, device=distributed.device_for(options.device, processes)))
    if session is not None and getattr(session.loaded, "remote", False):
        from .server.wire import file_sources, unsendable

        todo = [job for i, job in enumerate(plan.jobs) if i not in done]
        problem = next((why for job in todo if (why := unsendable(job))), None)
        if problem is not None:
            raise UsageError(f"{problem}; run it with --no-server")
        file_sources(todo, options.offline)  # every input file within what a server is sent, before anything changes


def _render_batch(plan: Plan, result: BatchResult, directory, done: set, *, session: "Session | None",
                  options: LoadOptions, processes, decode: str, fail_fast: bool, keep_latents: bool,
                  events: EventSink, stop: StopToken | None) -> None:
    """The images not done yet: the model loaded (or the session's), each image claimed before it renders
    and recorded in the manifest as it is written or fails."""
    from .engine import distributed

    if session is not None:
        loaded = session.loaded
    else:
        loaded, result.load_seconds = _load_timed(
            plan.model, _compile_decided(options, plan, distributed.device_for(options.device, processes)), events)
    result.model = info = loaded.describe()
    check_plan_fits(plan, loaded.ref)

    def record(image: ImageResult) -> None:
        directory.record(image.job.path, lambda: _manifest_record(image, info, directory.output_dir))

    def made_meanwhile(job) -> None:
        result.already_done += 1
        result.already_done_paths.append(job.path)

    run_options = RunOptions(decode=loaded.options.decode_for(decode), abort_in_flight=False,
                             fail_fast=fail_fast, max_memory_bytes=_budget(loaded), keep_latents=keep_latents)
    result.outcome = _run(plan, loaded, run_options, events=events, stop=stop,
                          keep_text_encoder=session is not None, on_result=record, done=frozenset(done),
                          claim=lambda jobs, wanted: directory.claim(jobs, wanted, made_meanwhile))


def _gather_processes(result: BatchResult, processes, output_dir: str, shard: tuple[int, int] | None) -> None:
    """A launch of several processes: each says it finished; the main one waits for the others, merges their
    manifests into the shard's, and fails the batch (exit 3) when any process failed."""
    from .storage.manifest import manifest_name, merge_manifests

    processes.finish(output_dir)
    result.is_main_process = processes.is_main
    if processes.is_main:
        failures = processes.wait_for_ranks(output_dir)
        parts = [manifest_name(shard, (i, processes.count)) for i in range(processes.count)]
        merge_manifests(output_dir, parts, manifest_name(shard))
        if failures:
            index, error = failures[0]
            raise PartialFailure(f"{len(failures)} of {processes.count} processes failed (process {index}: "
                                 f"{error})", hint="rerun the same command to resume")
    result.manifest = os.path.join(output_dir, manifest_name(shard))


def _manifest_record(image: ImageResult, info: dict, output_dir: str) -> dict:
    from .storage.batch_dir import now

    record = {"event": "image" if image.ok else "error", **image.job.record(output_dir), "time": now()}
    if image.ok:
        record.update(sha256=image.written.sha256, bytes=image.written.bytes, decode=image.decode,
                      decode_fallbacks=list(image.fallbacks), retried_alone=image.retried_alone,
                      seconds=round(image.seconds, 4),
                      **{k: info[k] for k in ("model", "model_id", "revision", "commit", "pipeline", "dtype")},
                      device=info["device"])
        record["pipeline"] = pipeline_of(image.job, info["pipeline"])
    else:
        record["error"] = image.error
    return record
