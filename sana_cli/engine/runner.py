"""Execute a Plan on a loaded model: encode prompts, denoise each GPU batch, decode each job into its frames, hand
them to a background writer. The only module that drives torch through a whole run.

Memory plan: when every prompt of a one-shot run can be encoded up front, the text encoder is
encoded first and then released, so the transformer and the decode never share the GPU with Gemma.
Signals: the first SIGINT/SIGTERM asks the run to stop (after the current GPU batch in a batch run,
at the next denoising step in generate); nothing partial is ever written.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from ..errors import GenerationError, SanaError
from ..inputs.controlnet import kept_steps
from ..planning.keys import claim_group
from ..planning.plan import KEY_SCHEMA, ImageJob, Plan
from ..reporting.events import (
    BatchStarted,
    EventSink,
    ImageFailed,
    ImageWritten,
    Noted,
    Preview,
    Step,
    Warned,
    no_events,
)
from ..reporting.results import ImageResult, RunOptions, RunOutcome, StopToken
from ..storage import latents as keeping
from ..storage import media
from ..version import __version__
from . import lora
from . import vae as decoding
from .families import adapter_for, pipeline_of
from .loading import LoadedModel

ENCODE_AHEAD_MAX = 256  # prompts; ~2.8 MB of bf16 embeddings each with CFG


class Writer:
    """Encodes and writes each job's frames on a background thread so the GPU never waits for PNG encoding.
    The queue is short, so at most a couple of decoded jobs wait in memory.

    The thread never dies: a failing image write fails that image; a failing record of it (the
    manifest cannot be written: disk full) is fatal, and from then on the thread only drains the
    queue, so the main thread is never left waiting on a dead consumer and signals keep working."""

    def __init__(self, *, overwrite: bool, on_written: Callable[[ImageResult], None], frames_dir: str | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._overwrite = overwrite
        self._frames_dir = frames_dir  # also keep a video's frames as PNGs here (sana video --frames-dir)
        self._on_written = on_written
        self.failure: BaseException | None = None  # what stopped the results from being recorded
        self._thread = threading.Thread(target=self._loop, name="sana-writer", daemon=True)
        self._thread.start()
        self.seconds = 0.0
        self.submitted: set[int] = set()  # job indices handed over, so a retry never writes twice

    def submit(self, result: ImageResult, frames: media.Frames, meta: dict) -> None:
        self._put((result, frames, meta))
        self.submitted.add(result.job.index)

    def _put(self, item) -> None:
        while True:
            if self.failure is not None or not self._thread.is_alive():
                raise _WriterFailed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        while self._thread.is_alive():
            self._thread.join(0.2)

    def error(self) -> SanaError | None:
        """The fatal failure as a one-line error, once the thread is closed."""
        if self.failure is None:
            return None
        if isinstance(self.failure, SanaError):
            return self.failure
        return GenerationError(f"cannot record the results: {_describe_failure(self.failure)}",
                               hint="the images written so far are kept; rerun the same command to resume")

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.failure is not None:
                continue  # nothing more is written once results cannot be recorded
            result, frames, meta = item
            started = time.perf_counter()
            try:
                result.written = media.write(frames, result.job.path, meta, overwrite=self._overwrite)
                if self._frames_dir is not None and frames.kind == "video":
                    media.write_frames(frames, self._frames_dir, result.job.path, meta, overwrite=self._overwrite)
            except SanaError as exc:
                result.error, result.error_exit_code = exc.line(), exc.exit_code
            except Exception as exc:  # noqa: BLE001 - a write failure fails this image only
                result.error = f"cannot write {result.job.path}: {exc}"
            self.seconds += time.perf_counter() - started
            try:
                self._on_written(result)
            except BaseException as exc:  # noqa: BLE001 - recording failed: stop the run, keep draining
                self.failure = exc


class _WriterFailed(Exception):
    """Raised in the main thread when the writer can no longer record results."""


def run(plan: Plan, loaded: LoadedModel, options: RunOptions | None = None, *, events: EventSink = no_events,
        stop: StopToken | None = None, keep_text_encoder: bool = True,
        on_result: Callable[[ImageResult], None] | None = None, done: frozenset[int] = frozenset(),
        claim: Callable[[list[ImageJob], list[bool]], tuple[list[bool], bool]] | None = None) -> RunOutcome:
    """Run every GPU batch of the plan. `done` holds positions in plan.jobs that already have their
    image: a batch whose images all exist is skipped, and a partly done batch is rendered whole (so
    its pixels equal an uninterrupted run's) with only the missing images written. A failed batch is
    retried one image at a time; what still fails is recorded and the run goes on (unless fail_fast).

    `claim(jobs, wanted)` (several processes on one directory) says which wanted images this process
    may write, and whether some are held by another live process; those batches are revisited at
    the end until their holders are done.

    `keep_text_encoder=False` (a one-shot run) lets the runner encode every prompt first and release the
    text encoder before denoising; a Session keeps it for later calls."""
    options = options or RunOptions()
    stop = stop or StopToken()
    events = _never_raising(events)
    outcome = RunOutcome()
    timings = {"encode": 0.0, "denoise": 0.0, "decode": 0.0}
    started = time.perf_counter()
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    lock = threading.Lock()
    pending = [group for group in plan.groups if any(i not in done for i in group)]

    def warn(event) -> None:
        if isinstance(event, Warned) and event.message not in outcome.warnings:
            outcome.warnings.append(event.message)
        events(event)

    def written(result: ImageResult) -> None:
        with lock:
            outcome.results.append(result)
        if on_result is not None:
            on_result(result)
        events(ImageWritten(result) if result.ok else ImageFailed(result))

    def failed(job: ImageJob, failure: tuple[str, int], *, alone: bool) -> None:
        written(ImageResult(job=job, error=failure[0], error_exit_code=failure[1], retried_alone=alone))

    def halted() -> bool:
        return stop.requested or (options.fail_fast and bool(outcome.failed)) or writer.failure is not None

    tried: set[int] = set()  # positions this process rendered or handed to a holder

    def render(number: int, group: list[int], embeds) -> bool:
        """Render one GPU batch (its wanted images); True when another process holds some of them."""
        jobs, write, busy = claim_group(plan.jobs, group, done, tried, claim)
        if not any(write):
            return busy
        events(BatchStarted(number=number + 1, total=len(pending), jobs=tuple(jobs)))
        failure = _attempt(_run_group, loaded, jobs, write=write, embeddings=embeds, options=options, events=warn,
                           stop=stop, writer=writer, timings=timings, on_failed=failed)
        if failure is None:
            return busy
        if len(jobs) == 1:
            failed(jobs[0], failure, alone=False)
            return busy
        for position, (job, wanted) in enumerate(zip(jobs, write)):  # isolate the failing image(s) alone
            if not wanted or job.index in writer.submitted or halted():
                continue
            # Each retry takes its row of the batch's embeddings: once the text encoder is released,
            # a retry cannot encode again.
            single = _attempt(_run_group, loaded, [job], write=[True], embeddings=_row(embeds, position),
                              options=options, events=warn, stop=stop, writer=writer, timings=timings,
                              retried_alone=True, on_failed=failed)
            if single is not None:
                failed(job, single, alone=True)
        return busy

    sets = {plan.jobs[i].loras for group in pending for i in group}
    # A model kept for later calls, or a run with several LoRA sets (no LoRA counts as one: going back to it
    # unfuses), must be able to restore the base weights.
    loaded.lora_restorable = loaded.lora_restorable or keep_text_encoder or len(sets) > 1
    lora.prepare(loaded, sets, restorable=loaded.lora_restorable)  # a LoRA that does not fit: exit 2, no image
    for job in {plan.jobs[i].controlnet: plan.jobs[i] for group in pending for i in group}.values():
        loaded.pipeline_for_job(job)  # likewise a ControlNet
    writer = Writer(overwrite=plan.overwrite, on_written=written, frames_dir=plan.frames_dir)
    embeddings: dict[int, tuple] = {}
    try:
        if not keep_text_encoder and sum(map(len, pending)) <= ENCODE_AHEAD_MAX:
            _encode_ahead(loaded, plan, pending, options=options, events=warn, stop=stop, embeddings=embeddings,
                          timings=timings)
        waiting = []
        for number, group in enumerate(pending):
            if halted():
                break
            embeds = embeddings.pop(number, None)
            if render(number, group, embeds):
                waiting.append((number, group, embeds))  # the text encoder may be gone: keep its embeddings
        if waiting and not halted():
            count = sum(len(group) for _, group, _ in waiting)
            events(Noted(f"waiting for another process to finish image(s) of {len(waiting)} GPU batch(es) "
                         f"({count} image(s)) it claimed"))
        while waiting and not halted():  # batches whose images other processes were rendering
            time.sleep(0.5)
            waiting = [entry for entry in waiting if not halted() and render(*entry)]
    except (_Aborted, _WriterFailed):
        pass
    finally:
        writer.close()
    if writer.error() is not None:
        raise writer.error()
    outcome.stopped_by = stop.signal_number
    timings["write"] = writer.seconds
    timings["total"] = time.perf_counter() - started
    outcome.timings = {key: round(value, 4) for key, value in timings.items()}
    if loaded.device.type == "cuda":
        outcome.peak_memory_bytes = torch.cuda.max_memory_allocated(loaded.device)
        outcome.peak_reserved_bytes = torch.cuda.max_memory_reserved(loaded.device)
    outcome.results.sort(key=lambda r: r.job.index)
    return outcome


def _encode_ahead(loaded, plan, pending, *, options, events, stop, embeddings, timings) -> None:
    """Encode every group's prompts, then release the text encoder. If encoding runs out of memory, keep
    the text encoder and let each remaining group encode its own prompts (and retry) as it comes."""
    for number, group in enumerate(pending):
        if stop.requested:
            return
        try:
            embeddings[number], seconds = _timed(_encode, loaded, jobs=[plan.jobs[i] for i in group],
                                                 options=options, events=events)
        except Exception as exc:  # noqa: BLE001 - only out of memory is survivable here
            if not decoding.is_out_of_memory(exc):
                raise
            out_of_memory = True
        else:
            out_of_memory = False
            timings["encode"] += seconds
        if out_of_memory:  # outside the except block, so the traceback's tensors are already freed
            decoding.release_memory()
            return
    loaded.free_text_encoder()


def _row(encoded: tuple | None, position: int) -> tuple | None:
    """One image's share of a GPU batch's prompt embeddings (each tensor's row `position`), or None."""
    if encoded is None:
        return None
    return tuple(None if t is None else t[position:position + 1] for t in encoded)


def _never_raising(events: EventSink) -> EventSink:
    """Progress output must never fail an image: a closed or broken stderr loses lines, not work."""

    def safe(event) -> None:
        try:
            events(event)
        except Exception:  # noqa: BLE001
            pass

    return safe


class _Aborted(Exception):
    pass


def _attempt(function, loaded, jobs, **kwargs) -> tuple[str, int] | None:
    """Run one GPU batch; on failure return (message, exit code) instead of the exception, so the
    traceback (and the tensors its frames hold) is gone before anything is retried."""
    try:
        function(loaded, jobs, **kwargs)
        return None
    except (_Aborted, _WriterFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - recorded per image; the run goes on
        failure = _failure(exc)
    decoding.release_memory()
    return failure


NON_FINITE_LATENTS = ("the denoised latents hold NaN or infinity (a LoRA, guidance or weights that overflow?); no "
                      "image was written")


class NonFinite(GenerationError):
    """A result that is NaN or infinite somewhere: written, it would be a black or garbled image passed off
    as a success. The image fails (exit 1, or its batch row), nothing is written."""


def _failure(exc: Exception) -> tuple[str, int]:
    return (exc.line(), exc.exit_code) if isinstance(exc, SanaError) else (_describe_failure(exc), 1)


def _keep(loaded: LoadedModel, job: ImageJob, latents: torch.Tensor) -> str:
    return keeping.save(job.path, latents, image_metadata(loaded, job, None),
                        str(loaded.pipe.vae.dtype).removeprefix("torch."))


def _kept_failure(loaded: LoadedModel, job: ImageJob, latents: torch.Tensor, failure: tuple[str, int]):
    """A decode that failed after every fallback: keep the finished denoise beside the planned image."""
    message, code = failure
    try:
        kept = _keep(loaded, job, latents)
    except Exception as exc:  # noqa: BLE001 - the decode's failure is the one to report
        return f"{message}; the denoised latents could not be kept either: {exc}", code
    return f"{message}; the denoised latents are kept in {kept} (finish the image with `sana decode {kept}`)", code


def _sync(loaded: LoadedModel) -> None:
    """CUDA work is asynchronous: wait for it before reading a clock, or stage times smear."""
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def _timed(function, loaded: LoadedModel, **kwargs):
    started = time.perf_counter()
    value = function(loaded, **kwargs)
    _sync(loaded)
    return value, time.perf_counter() - started


def _describe_failure(exc: Exception) -> str:
    if decoding.is_out_of_memory(exc):
        return ("out of memory; try --decode strips, a smaller --batch-size, --low-memory, "
                "or a smaller size")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _warn_truncation(pipe, jobs: list[ImageJob], budget: int, events: EventSink) -> None:
    """Gemma reads at most max_sequence_length tokens of a prompt (the pipeline truncates silently)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    for job in jobs:
        count = len(tokenizer(job.prompt, add_special_tokens=False).input_ids)
        if count > budget:
            which = f"the prompt of row {job.row}" if job.row else "the prompt"
            events(Warned(f"{which} is {count} tokens; the text encoder reads the first {budget} "
                          "and ignores the rest"))


@torch.no_grad()
def _encode(loaded: LoadedModel, *, jobs: list[ImageJob], options: RunOptions, events: EventSink = no_events) -> tuple:
    """Prompt embeddings for a GPU batch, exactly as the pipeline would compute them itself."""
    pipe = loaded.pipeline_for(jobs[0].pag_layers)  # encoding is the same in every pipeline of a family
    loaded.check_placement()
    if loaded.text_encoder_freed:
        raise RuntimeError("internal error: the text encoder was released before every prompt was encoded")
    _warn_truncation(pipe, jobs, options.max_sequence_length - 2, events)
    return adapter_for(loaded.ref, jobs[0]).encode(pipe, jobs, max_sequence_length=options.max_sequence_length)


def _run_group(loaded: LoadedModel, jobs: list[ImageJob], *, write: list[bool], embeddings, options: RunOptions,
               events: EventSink, stop: StopToken, writer: Writer, timings: dict, retried_alone: bool = False,
               on_failed: Callable | None = None) -> None:
    first = jobs[0]
    batch_started = time.perf_counter()
    if embeddings is None:
        embeddings, seconds = _timed(_encode, loaded, jobs=jobs, options=options, events=events)
        timings["encode"] += seconds

    total = denoising_steps(first)
    wanted = [set(options.previews(job, total)) for job in jobs] if options.previews else None

    def on_step(pipeline, step, timestep, callback_kwargs):
        events(Step(step=step + 1, total=total))
        if wanted and callback_kwargs.get("latents") is not None:
            for position, job in enumerate(jobs):
                if step + 1 in wanted[position] and write[position]:
                    image = _preview(loaded, callback_kwargs["latents"][position:position + 1])
                    if image is not None:
                        events(Preview(job=job, step=step + 1, total=total, image=image))
        if stop.requested and options.abort_in_flight:
            pipeline._interrupt = True
        return {}

    generators = [torch.Generator(loaded.generator_device).manual_seed(job.seed) for job in jobs]
    started = time.perf_counter()
    pipe = loaded.prepare_call(first)  # sets every piece of per-call component state, checks placement
    kwargs = adapter_for(loaded.ref, first).build_call(jobs, embeddings, generators=generators, on_step=on_step,
                                                       pipe=pipe)
    with torch.no_grad():
        latents = pipe(**kwargs)[0]
    loaded.check_placement()
    _sync(loaded)
    timings["denoise"] += time.perf_counter() - started
    if stop.requested and options.abort_in_flight:
        raise _Aborted()
    shared = (time.perf_counter() - batch_started) / len(jobs)
    for position, job in enumerate(jobs):
        if not write[position]:
            continue  # its image exists from an earlier run; rendered only to keep the batch intact
        started = time.perf_counter()
        one = latents[position:position + 1]
        failure = None
        if not bool(torch.isfinite(one).all()):  # a black image from NaN is not a success, nor worth keeping
            error = NonFinite(NON_FINITE_LATENTS)
            if on_failed is None:
                raise error
            on_failed(job, _failure(error), alone=retried_alone)
            continue
        try:
            frames, decoded = decode_frames(loaded, one, options.decode, options.max_memory_bytes, job=job)
        except Exception as exc:  # noqa: BLE001 - every fallback is spent; keep the denoise, not the traceback
            if on_failed is None:
                raise
            failure = _failure(exc)
        if failure is not None:
            decoding.release_memory()
            on_failed(job, _kept_failure(loaded, job, one, failure), alone=retried_alone)
            continue
        if options.keep_latents:
            _keep(loaded, job, one)
        _sync(loaded)
        seconds = time.perf_counter() - started
        timings["decode"] += seconds
        result = ImageResult(job=job, decode=decoded.strategy, fallbacks=decoded.fallbacks, seconds=shared + seconds,
                             retried_alone=retried_alone)
        writer.submit(result, frames, image_metadata(loaded, job, decoded.strategy))
    del latents


def denoising_steps(job: ImageJob) -> int:
    """The steps a job's pipeline call runs: all of them, or with a start image the ones its strength keeps."""
    if job.image and not job.frames:  # a video's image is its first frame, not a start to denoise from
        return kept_steps(job.steps, job.strength)
    return job.steps


PREVIEW_LATENT_SIDE = 8  # a preview's larger latent side: 256 px with Sana's 32x DC-AE, whatever the image's size


@torch.no_grad()
def _preview(loaded: LoadedModel, latents: torch.Tensor):
    """A cheap approximate image of mid-denoise latents: averaged down to at most PREVIEW_LATENT_SIDE latent
    pixels a side (keeping the aspect ratio) and decoded whole by the model's VAE, so a preview of a 4096x4096
    image costs a 256-px decode. None if it fails: a preview never fails a run."""
    try:
        vae = loaded.pipe.vae
        height, width = latents.shape[-2:]
        scale = min(1.0, PREVIEW_LATENT_SIDE / max(height, width))
        small = torch.nn.functional.adaptive_avg_pool2d(
            latents.to(vae.dtype), (max(1, round(height * scale)), max(1, round(width * scale))))
        decoded = vae.decode(small / vae.config.scaling_factor, return_dict=False)[0]
        return loaded.pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    except Exception:  # noqa: BLE001 - previews are best effort
        return None


@torch.no_grad()
def decode_frames(loaded: LoadedModel, latents: torch.Tensor, strategy: str,
                  max_memory_bytes: int | None = None, *, job: ImageJob | None = None) -> tuple[media.Frames, object]:
    """Decode one job's latents exactly as the pipeline would (cast, unscale, decode, postprocess) into its
    frames (one, for an image; a video job's all) and the decode's account (strategy, fallbacks). `auto` picks
    its strategy within free memory and, when given, the --max-memory budget."""
    if job is not None and job.frames:
        return decode_video(loaded, latents, strategy, fps=job.fps)
    vae = loaded.pipe.vae
    latents = latents.to(vae.dtype)
    free = None
    if strategy == "auto":
        free = decoding.budget_bytes(decoding.free_memory_bytes(loaded.device), max_memory_bytes,
                                     decoding.in_use_bytes(loaded.device))
    if not bool(torch.isfinite(latents).all()):
        raise NonFinite(NON_FINITE_LATENTS)
    decoded = decoding.decode(vae, latents / vae.config.scaling_factor, strategy, free_bytes=free)
    if not bool(torch.isfinite(decoded.image).all()):  # postprocess would write NaN as black, silently
        raise NonFinite(f"the decoded image holds NaN or infinity (the VAE overflowed in {vae.dtype}); no image "
                        "was written", hint="try --dtype fp32")
    frames = loaded.pipe.image_processor.postprocess(decoded.image, output_type="pil")
    return media.Frames(tuple(frames)), decoded


@torch.no_grad()
def decode_video(loaded: LoadedModel, latents: torch.Tensor, strategy: str, *, fps: int) -> tuple[media.Frames, object]:
    """A video's latents (1, C, F, H, W) to its frames exactly as SanaVideoPipeline decodes them: cast to the VAE's
    dtype, un-normalise with the Wan VAE's latents_mean and latents_std, decode, postprocess. `tiled` uses the Wan
    VAE's own tiling for this call alone (less memory, not exact); anything else decodes whole."""
    vae = loaded.pipe.vae
    latents = latents.to(vae.dtype)
    if not bool(torch.isfinite(latents).all()):
        raise NonFinite(NON_FINITE_LATENTS)
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(latents.device,
                                                                                           latents.dtype)
    tiled = strategy.split(":")[0] == "tiled"
    if tiled:
        vae.enable_tiling()
    try:
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    finally:
        if tiled:
            vae.disable_tiling()
    if not bool(torch.isfinite(video).all()):
        raise NonFinite(f"the decoded video holds NaN or infinity (the VAE overflowed in {vae.dtype}); no video "
                        "was written", hint="the Wan VAE runs in fp32 unless --dtype says otherwise")
    frames = loaded.pipe.video_processor.postprocess_video(video, output_type="pil")[0]
    return media.Frames(tuple(frames), kind="video", fps=fps), decoding.Decoded(
        image=video, strategy="tiled" if tiled else "full")


def image_metadata(loaded: LoadedModel, job: ImageJob, decode_strategy: str) -> dict:
    """Everything needed to reproduce the image. No timestamps or host names, so equal work gives
    byte-identical files whichever process, shard or GPU index made them."""
    model = loaded.describe()
    run = {"sana_cli": __version__, "key": job.key, "rendered": f"{job.width}x{job.height}",
           "decode": decode_strategy, "chi": True, "device": loaded.device.type, "key_schema": KEY_SCHEMA,
           "pixel_options": job.pixels.to_dict(), "pipeline": pipeline_of(job, model["pipeline"])}
    return merge_metadata(job=job.params(), model=model, run=run, family=adapter_for(loaded.ref, job).metadata(job))


# The model facts the run states more exactly: the device type it ran on (the model says cuda:0; an image
# made on any GPU says cuda) and the pipeline that made this image (PAG, ControlNet and img2img are built
# from the loaded one). Every other key belongs to one part only.
RUN_REFINES = ("device", "pipeline")


def merge_metadata(*, job: dict, model: dict, run: dict, family: dict) -> dict:
    """One image's metadata, one flat document (as every sana-cli image has had) from four parts that
    each own their keys: the job's pixel-deciding fields, the model's facts, the run's facts and the
    pipeline family's. A key in two parts is refused, never silently overwritten (a job field named like
    a model fact would lose its value, and with it the image's record of what made it); the one
    exception is RUN_REFINES, where the run's value replaces the model's."""
    owner: dict[str, str] = {}
    for part, values in (("job field", job), ("model fact", model), ("run fact", run), ("family fact", family)):
        for key in values:
            refines = part == "run fact" and owner.get(key) == "model fact" and key in RUN_REFINES
            if key in owner and not refines:
                raise RuntimeError(f"internal error: the metadata key {key!r} is both a {owner[key]} and a {part}")
            owner[key] = part
    return {**job, **model, **run, **family}
