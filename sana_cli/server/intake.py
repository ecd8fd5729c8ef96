"""What a request to `sana serve` becomes before it queues: the model and load options it names (never a
path on this machine), an attached CLI's jobs checked by the planning code that made them, and an OpenAI
images request planned as the CLI plans a generate. Failures are ApiErrors with the CLI's message text."""

from __future__ import annotations

import secrets
from pathlib import Path

from ..errors import SanaError, UsageError
from ..inputs.values import check_seed
from ..models import presets
from ..planning.fields import PLANNING_INPUTS
from ..planning.plan import (
    IMAGE_SUFFIXES,
    PIXEL_FIELDS,
    LoadOptions,
    Request,
    job_key,
    model_for,
    plan_generate,
    resolve_params,
)
from .http_io import from_sana
from .openai_images import MAX_PROMPT_CHARS, OUTPUT_FORMATS, ApiError
from .state import ServerConfig
from .wire import short
from .wire import file_refs, files_from_wire, job_from_wire, load_from_wire, unsendable
from .work_queue import Scheduler, Work

NOT_A_PATH = "'model' must be a preset name or a hub id (org/name): the server never opens a client's path"


def no_path(name) -> None:
    """A model a client names is a preset or a hub id, checked before anything looks at the disk, so no
    answer tells which paths exist on this machine."""
    from ..models.modelref import looks_like_path

    if isinstance(name, str) and presets.find(name) is None and looks_like_path(name):
        raise ApiError(400, NOT_A_PATH, param="model")


def model_and_options(body: dict):
    from ..models.modelref import resolve

    name, revision = body.get("model"), body.get("revision")
    if not isinstance(name, str) or (revision is not None and not isinstance(revision, str)):
        raise ApiError(400, "'model' must be a model name and 'revision' text", param="model")
    no_path(name)
    try:
        ref = resolve(name, revision=revision)
    except SanaError as exc:
        raise ApiError(404, exc.line(), param="model", code="model_not_found", exit_code=exc.exit_code) from None
    if ref.kind == "local":
        raise ApiError(400, NOT_A_PATH, param="model")
    load = body.get("load") or {}
    try:
        options = load_from_wire(load) if isinstance(load, dict) else None
        if options is None:
            raise UsageError("'load' must be an object")
        options.pixels()
    except SanaError as exc:
        raise from_sana(exc, "load") from None
    except TypeError as exc:
        raise ApiError(400, f"bad load options: {exc}", param="load") from None
    return ref, options


def attached_work(state, body: dict) -> Work:
    """POST /jobs: the attached CLI's planned jobs, each checked, and the input files they name, each
    hashed, as one Work (blocking: planning reads configs and files; run it off the event loop)."""
    ref, options = model_and_options(body)
    decode = body.get("decode", "auto")
    force_size = body.get("force_size") is True
    wire = body.get("jobs")
    if not isinstance(wire, list) or not wire:
        raise ApiError(400, "'jobs' must be a non-empty list", param="jobs")
    try:
        files = files_from_wire(body.get("files"))
    except SanaError as exc:
        raise from_sana(exc, "files") from None
    store = state.config.inputs
    kept = store.keep(files)  # pinned until the work is finished
    try:
        if not isinstance(decode, str):
            raise UsageError("'decode' must be text")
        pixels = options.pixels(options.decode_for(decode))
        planned = checked_jobs(ref, wire, pixels, force_size, state.config.scratch_dir, kept)
        check_pag_layers(state.scheduler, ref, options, planned)
        needed = {digest for job in planned for _, _, digest in file_refs(job)}
        if set(kept) - needed:
            raise UsageError("'files' holds a file no job names")
    except SanaError as exc:
        store.release(kept)
        raise from_sana(exc, "jobs") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        store.release(kept)
        raise ApiError(400, f"a job is malformed: {type(exc).__name__}: {exc}"[:500], param="jobs") from None
    return Work(ref=ref, options=options, decode=decode, jobs=planned, sink=None, force_size=force_size,
                label=f"attached run of {len(planned)} image(s)", inputs=kept,
                release=lambda: store.release(kept))


def checked_jobs(ref, wire: list, pixels, force_size: bool, scratch: Path, files: dict | None = None) -> list:
    """Every job of an attached run checked (blocking: planning reads configs; run it off the event loop)."""
    return [checked_job(ref, item, pixels, force_size, scratch, files or {}) for item in wire]


def checked_job(ref, item: dict, pixels, force_size: bool, scratch: Path, files: dict | None = None):
    """A job from an attached CLI, checked by the same planning code: its fields must be what
    resolve_params makes of them, its seed valid, its key the hash of its fields. Its input files are
    read from `files` ({sha256: the server's copy}, as sent): planning hashes them again, so a job whose
    sha256 is not that of the bytes sent for it is refused; a path of the client's is never opened."""
    from ..inputs.supplied import supplying

    if not isinstance(item, dict):
        raise UsageError("a job must be an object")
    item = dict(item)
    ext = item.pop("ext", ".png")
    if ext not in IMAGE_SUFFIXES:
        raise UsageError(f"unsupported image format {ext!r}")
    if len(str(item.get("prompt", ""))) > MAX_PROMPT_CHARS:
        raise UsageError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    job = job_from_wire(item, str(scratch / f"{secrets.token_hex(16)}{ext}"))
    if job.pixels != pixels:
        raise UsageError("a job's pixel options differ from its load options")
    check_seed(job.seed)
    problem = unsendable(job)
    if problem is not None:
        raise UsageError(f"{problem}; run it with --no-server")
    refs = file_refs(job)
    names: dict = {}
    for _, value, digest in refs:
        if not isinstance(value, str) or not isinstance(digest, str) or digest not in (files or {}):
            raise UsageError(f"the input file {short(value, 200)} was not sent with the job (a server never opens "
                             "a client's path)")
        names.setdefault(value, set()).add(digest)
    if any(len(digests) > 1 for digests in names.values()):
        raise UsageError("a job names one input file with two different contents")
    fields_ = [name for name in PIXEL_FIELDS if name != "seed"]
    with supplying({digest: (files or {})[digest] for _, _, digest in refs}, names):
        resolved, _ = resolve_params(ref, **{name: getattr(job, name) for name in PLANNING_INPUTS},
                                     force_size=force_size, command_line=False)
    if any(_plain(resolved.get(name)) != _plain(getattr(job, name)) for name in fields_):
        raise UsageError("a job's fields are not the ones planning makes of them")
    if job_key(ref, job.pixels, **job.params()) != job.key:
        raise UsageError("a job's key does not match its fields")
    return job




def _plain(value):
    """Lists and tuples alike, as JSON makes them."""
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def check_pag_layers(scheduler: Scheduler, ref, options: LoadOptions, jobs) -> None:
    """PAG layers a loaded model does not have are refused before anything queues (diffusers would find
    out mid-run); a model not loaded yet is checked when it loads, still before its denoise."""
    layers = {job.pag_layers for job in jobs if job.pag_layers}
    if not layers:
        return
    from ..planning.plan import check_pag_layers_syntax

    for value in layers:
        check_pag_layers_syntax(value)
    loaded = scheduler.models.peek(ref, options)
    if loaded is not None:
        for value in layers:
            loaded.check_pag_layers(value)


def openai_work(asked, config: ServerConfig, scheduler: Scheduler, uploads: dict | None = None) -> tuple[Work, dict]:
    """An OpenAI images request as a planned Work (the CLI's planning and messages) and the fields of
    its answer. `uploads` ({field: Upload}, an edit's files) are kept by sha256 and planned as the files of
    those fields under their uploaded names: the input-image checks of a file, on the server's copy."""
    import hashlib

    from ..inputs.supplied import supplying
    from . import openai_images as openai_api

    files, names, named = {}, {}, {}
    for field, upload in (uploads or {}).items():
        data = openai_api.openai_mask(upload.data) if field == "mask" else upload.data
        digest = hashlib.sha256(data).hexdigest()
        files[digest] = data
        named[field] = openai_api.upload_name(upload, digest)
        names.setdefault(named[field], set()).add(digest)
    kept = config.inputs.keep(files)  # pinned until the work is finished
    try:
        with supplying(kept, names):
            work, answer = _openai_work(asked, config, scheduler, named)
    except BaseException:
        config.inputs.release(kept)
        raise
    work.inputs, work.release = kept, lambda: config.inputs.release(kept)
    return work, answer


def _openai_work(asked, config: ServerConfig, scheduler: Scheduler, named: dict) -> tuple[Work, dict]:
    from . import openai_images as openai_api

    model = asked.model or (config.models[0] if config.models else None)
    if model is not None:
        model = config.aliases.resolve(model)
    no_path(model)
    request = Request(prompt=asked.prompt, model=model, width=asked.width, height=asked.height,
                      num_images=asked.n, output=None, **asked.sana, **named)
    try:
        ref = model_for(request)
    except SanaError as exc:
        raise ApiError(404, exc.line(), param="model", code="model_not_found") from None
    if ref.kind == "local":
        raise ApiError(400, NOT_A_PATH, param="model")
    width, height, note = openai_api.size_for(ref, asked)
    steps = openai_api.steps_for(ref, asked)
    # Lossy output at an asked compression is rendered as PNG and encoded after, keeping its metadata.
    suffix = ".png" if asked.output_compression is not None else OUTPUT_FORMATS[asked.output_format]
    direct = asked.response_format == "url" and asked.output_compression is None
    directory = config.output_dir if direct else config.scratch_dir
    request.width, request.height, request.steps = width, height, steps
    request.output = str(directory / f"{secrets.token_hex(16)}{suffix}")
    try:
        plan = plan_generate(request, ref, config.load.pixels(config.load.decode_for("auto")))
        check_pag_layers(scheduler, ref, config.load, plan.jobs)
    except SanaError as exc:
        raise from_sana(exc, openai_api.param_of(exc.message) if isinstance(exc, UsageError) else None) from None
    first = plan.jobs[0]
    fields_ = {"size": f"{first.width}x{first.height}", "output_format": asked.output_format,
               "quality": openai_api.answer_quality(ref, first.steps), "background": "opaque"}
    if note:
        fields_["size_note"] = note
    answer = {"response_format": asked.response_format, "output_format": asked.output_format,
              "output_compression": asked.output_compression, "fields": fields_}
    work = Work(ref=ref, options=config.load, decode="auto", jobs=plan.jobs, sink=None,
                label=f"images request of {asked.n} image(s)", partial_images=asked.partial_images)
    return work, answer
