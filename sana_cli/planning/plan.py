"""Requests in, a Plan out: every image to make, its size, seed and path, and the GPU batches.

Pure Python (no torch): `--dry-run` prints a Plan, and tests check planning without a model. The
types are in jobs, the checks in checks, keys and seeds in keys; the names the rest of sana_cli has
always imported from here are imported here too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..inputs.values import _clip, check_count, check_prompt, check_seed
from ..models import modelref, presets
from ..models.modelref import ModelRef
from . import fields as table
from .checks import (
    IMAGE_SUFFIXES,
    MAX_BATCH_IMAGES,
    MAX_BATCH_SIZE,
    MAX_IMAGES,
    check_name,
    check_pag,
    check_side,
    check_steps_guidance,
    check_with_pixels,
    image_format,
    resolve_size,
    slugify,
    transformer_layers,
)
from .fields import PLANNING_INPUTS
from .jobs import BatchDefaults, ImageJob, PixelOptions, Request
from .keys import SEED_RULE, default_batch_size, derive_seed, draw_seed, group_jobs, job_key, make_job

# What the rest of sana_cli (and its tests) import from here, from before the types, checks and keys had
# modules of their own.
from .checks import ASPECT_RANGE, SCALE_RANGE, SIZE_MULTIPLE, check_pag_layers_syntax  # noqa: F401, E402
from .fields import PIXEL_FIELDS  # noqa: F401, E402
from .jobs import LoadOptions, quantize_choice  # noqa: F401, E402
from .keys import KEY_SCHEMA  # noqa: F401, E402


DEFAULT_OUTPUT_DIR = "sana-out"


def resolve_params(model: ModelRef, *, force_size: bool, command_line: bool, offline: bool = False,
                   **given) -> tuple[dict, list[str]]:
    """Defaults and checks of one image's pixel-deciding fields (all but the seed: the field table's
    PLANNING_INPUTS, given by name), the same for `sana generate` and a batch row: (fields, notes).
    `command_line` words the errors for generate's options (a batch row's come from the row and the
    batch defaults). A row of the table without a rule of its own is taken as given: its default when
    unset, its range checked."""
    unknown = sorted(set(given) - set(PLANNING_INPUTS))
    if unknown:
        raise TypeError(f"resolve_params() got unknown field(s) {', '.join(unknown)}")
    given = {name: given.get(name, _unset(table.BY_NAME[name])) for name in PLANNING_INPUTS}
    plain = {}
    for row in table.FIELDS:
        if row.name in PLANNING_INPUTS and row.resolve is None:
            value = row.default if given[row.name] is None else given[row.name]
            if value is not None and row.range is not None:
                table.check_range(row, value, row.option if command_line else f"'{row.column or row.name}'")
            plain[row.name] = value
    prompt, negative_prompt, pag_scale, pag_layers = (given["prompt"], given["negative_prompt"], given["pag_scale"],
                                                     given["pag_layers"])
    width, height, steps, guidance = given["width"], given["height"], given["steps"], given["guidance"]
    loras, controlnet, control_image, control_scale = (given["loras"], given["controlnet"], given["control_image"],
                                                       given["control_scale"])
    image, strength, mask = given["image"], given["strength"], given["mask"]
    prompt = check_prompt(prompt)
    check_prompt(negative_prompt, "the negative prompt", allow_empty=True)
    width, height, notes = resolve_size(model, width, height, force_size)
    steps = model.steps if steps is None else steps
    guidance = model.guidance if guidance is None else guidance
    check_steps_guidance(model, steps, guidance)
    check_pag(model, pag_scale)
    if command_line and pag_layers and not pag_scale:
        raise UsageError("--pag-layers needs --pag-scale above 0")
    if negative_prompt and not model.uses_cfg:
        raise UsageError(f"{model.name} (SANA-Sprint) has no negative prompt"
                         + ("; drop --negative-prompt" if command_line else ""))
    pag_layers = (pag_layers or model.pag_layers) if pag_scale > 0 else None
    if pag_layers is not None:
        presets.check_pag_layers(pag_layers, transformer_layers(model), model.name)
    extra = resolve_inputs(model, size=(width, height), pag_scale=pag_scale, loras=loras, controlnet=controlnet,
                           control_image=control_image, control_scale=control_scale, image=image, strength=strength,
                           mask=mask, steps=steps, offline=offline, command_line=command_line)
    return dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                guidance=float(guidance), pag_scale=float(pag_scale), pag_layers=pag_layers, **extra, **plain), notes


def _unset(row):
    """What resolve_params takes for a field not given: the table's default, or None for a required one."""
    return None if row.default is table.REQUIRED else row.default


def resolve_inputs(model: ModelRef, *, size: tuple[int, int] | None = None, pag_scale, loras, controlnet,
                   control_image, control_scale, image, strength, mask=None, steps: int | None = None, offline: bool,
                   command_line: bool) -> dict:
    """The LoRA, ControlNet, image-to-image and inpainting fields of a job, checked (files hashed, headers and
    configs compared with the model, the strength against the steps) before anything loads."""
    from ..inputs import controlnet as control
    from ..inputs import images as inputs
    from ..inputs import lora

    option = (lambda name: f"--{name.replace('_', '-')}") if command_line else (lambda name: f"'{name}'")
    extra: dict = {"loras": lora.resolve_all(loras, model, offline=offline) if loras else ()}
    if control_image is not None and controlnet is None:
        raise UsageError(f"{option('control_image')} needs --controlnet")
    if control_scale is not None and controlnet is None:
        raise UsageError(f"{option('control_scale')} needs --controlnet")
    if controlnet is not None:
        source = control.resolve_controlnet(controlnet, model)
        if pag_scale > 0:
            raise UsageError("a ControlNet cannot be combined with PAG (diffusers has no pipeline for both)")
        if control_image is None:
            raise UsageError(f"--controlnet needs a control image ({option('control_image')} IMAGE)")
        path, digest = inputs.check_image(control_image, option("control_image"), size)
        scale = control.check_control_scale(1.0 if control_scale is None else control_scale)
        extra.update(controlnet=source, control_image=path, control_image_sha256=digest, control_scale=scale)
        content = control.controlnet_digest(source)
        if content is not None:
            extra["controlnet_sha256"] = content
    if strength is not None and image is None:
        raise UsageError(f"{option('strength')} needs {option('image')}")
    if mask is not None and image is None:
        raise UsageError(f"{option('mask')} needs {option('image')} (the image to inpaint)")
    if image is not None:
        strength = control.check_strength(0.6 if strength is None else strength)
        if steps is not None:
            control.check_kept_steps(steps, strength, option("strength"))
        path, digest = inputs.check_image(image, option("image"), size)
        extra.update(image=path, image_sha256=digest, strength=strength)
        if mask is not None:
            control.check_takes_mask(model)
            mask_path, mask_digest = inputs.check_mask(mask, option("mask"), path, option("image"), size, digest)
            extra.update(mask=mask_path, mask_sha256=mask_digest)
    return extra


@dataclass
class Plan:
    """Everything a runner needs, and everything --dry-run shows."""

    command: str
    model: ModelRef
    jobs: list[ImageJob]
    groups: list[list[int]]  # indices into jobs; each inner list is one GPU batch
    output_dir: str
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)
    seed_rule: str = ""
    force_size: bool = False
    seeds_drawn: bool = False  # no --seed: a run draws its own seeds when it starts, so a dry run cannot show them
    frames_dir: str | None = None  # `sana video --frames-dir`: also keep each video's frames as PNGs here

    def to_dict(self) -> dict:
        """JSON-ready form (the --dry-run --json output)."""
        return {
            "command": self.command,
            "model": {"name": self.model.name, "source": self.model.source, "pipeline": self.model.pipeline,
                      "revision": self.model.revision, "native_size": self.model.native_size},
            "output_dir": self.output_dir,
            "seed_rule": self.seed_rule,
            "seeds_drawn_at_run_time": self.seeds_drawn,
            "images": [asdict(job) for job in self.jobs],
            "groups": [[self.jobs[i].index for i in group] for group in self.groups],
            "notes": self.notes,
        }

    def describe(self) -> str:
        """Human-readable plan for --dry-run."""
        from ..inputs import controlnet as control

        lines = [f"model:   {self.model.describe()}", f"output:  {self.output_dir}"]
        if self.seed_rule:
            lines.append(f"seeds:   {self.seed_rule}")
        if self.seeds_drawn:
            lines.append("note:    no --seed: the seeds (and the file names made from them) below are this dry run's "
                         "draw; a real run draws its own when it starts (pass --seed N to fix them)")
        lines.append(f"images:  {len(self.jobs)} in {len(self.groups)} GPU batch(es)")
        for number, group in enumerate(self.groups, 1):
            first = self.jobs[group[0]]
            pag = f", PAG {first.pag_scale} on {first.pag_layers}" if first.pag_scale > 0 else ""
            pag += "".join(f", LoRA {identity} x{scale:g}" for identity, _, scale in first.loras)
            if first.controlnet:
                pag += f", ControlNet {first.controlnet} x{first.control_scale:g} on {first.control_image}"
            if first.frames:
                pag += f", {first.frames} frames at {first.fps} fps, motion score {first.motion_score}"
                pag += f", first frame {first.image}" if first.image else ""
            elif first.image:
                pag += (f", from {first.image} at strength {first.strength:g} (the last "
                        f"{control.kept_steps(first.steps, first.strength)} steps)")
            if first.mask:
                pag += f", repainting where {first.mask} is white"
            lines.append(f"batch {number}: {first.width}x{first.height} rendered as asked (no resize), "
                         f"{first.steps} steps, guidance {first.guidance}{pag}")
            for i in group:
                job = self.jobs[i]
                lines.append(f"  #{job.index} row {job.row} seed {job.seed} -> {job.path}  {_clip(job.prompt)}")
        lines += [f"note:    {note}" for note in self.notes]
        return "\n".join(lines)


def check_loaded_model(plan: Plan, ref: ModelRef) -> None:
    """Re-check, against the model as loaded, what planning could not know before loading (a hub model
    not in the cache has no config to plan with): the same checks as planning, on every job."""
    if plan.model.native_size is not None and plan.model.pipeline is not None:
        return
    from ..inputs import controlnet as control

    for job in plan.jobs:
        check_steps_guidance(ref, job.steps, job.guidance)
        check_pag(ref, job.pag_scale)
        resolve_size(ref, job.width, job.height, force=plan.force_size)
        if job.controlnet:
            control.check_takes_controlnet(ref)
        if job.image:
            control.check_kept_steps(job.steps, job.strength)
        if job.mask:
            control.check_takes_mask(ref)


def model_for(request: Request) -> ModelRef:
    """The model a request names; without --model, the default family member nearest its size."""
    name = request.model
    if name is None and (request.width or request.height):
        width = check_side("width", request.width or request.height)
        height = check_side("height", request.height or request.width)
        name = presets.for_size(width, height).name
    return modelref.resolve(name, revision=request.revision)


def rekey(plan: Plan, pixels: PixelOptions) -> Plan:
    """The plan with every job keyed for these load options (the run's, whatever planning assumed)."""
    if all(job.pixels == pixels for job in plan.jobs):
        return plan
    jobs = [ImageJob(**{**job.__dict__, "pixels": pixels, "key": job_key(plan.model, pixels, **job.params())})
            for job in plan.jobs]
    return Plan(**{**plan.__dict__, "jobs": jobs})


def plan_generate(request: Request, model: ModelRef, pixels: PixelOptions | None = None) -> Plan:
    """Resolve a `sana generate` request into a Plan. Raises UsageError for anything invalid."""
    pixels = pixels or PixelOptions()
    _refuse_video(model)
    prompt = check_prompt(request.prompt)
    check_prompt(request.negative_prompt, "the negative prompt", allow_empty=True)
    check_count("--num-images", request.num_images, 1, MAX_IMAGES)
    if request.batch_size is not None:
        check_count("--batch-size", request.batch_size, 1, MAX_BATCH_SIZE)
    # the rows a Request lacks (the video rows, which only `sana video` takes) stay unset
    params, notes = resolve_params(model, **{name: getattr(request, name) for name in PLANNING_INPUTS
                                             if hasattr(request, name)},
                                   force_size=request.force_size, command_line=True, offline=request.offline)
    width, height = params["width"], params["height"]
    first_seed = check_seed(request.seed) if request.seed is not None else draw_seed()
    seeds = [check_seed(first_seed + k) for k in range(request.num_images)]
    paths = _generate_paths(request, prompt, seeds)
    if not request.overwrite:
        for path in paths:
            if os.path.lexists(path):
                raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it, or -o elsewhere")
    check_with_pixels(params, pixels)
    jobs = [make_job(model, pixels, index=index, row=0, path=path, seed=seed, **params)
            for index, (seed, path) in enumerate(zip(seeds, paths), 1)]
    batch_size = request.batch_size if request.batch_size is not None else default_batch_size(width, height)
    rule = "as given" if request.seed is not None else "drawn at random"
    if len(seeds) > 1:
        rule += ", +1 for each further image"
    return Plan(command="generate", model=model, jobs=jobs, groups=group_jobs(jobs, batch_size),
                output_dir=str(Path(paths[0]).parent), overwrite=request.overwrite, notes=notes, seed_rule=rule,
                force_size=request.force_size, seeds_drawn=request.seed is None)


def _refuse_video(model: ModelRef) -> None:
    if model.is_video:
        raise UsageError(f"{model.name} is a SANA-Video model; it makes videos", hint=f"use `sana video --model "
                                                                                       f"{model.name} PROMPT`")


def _generate_paths(request: Request, prompt: str, seeds: list[int]) -> list[str]:
    """-o is a file (its extension picks the format) or a directory; default ./sana-out/<slug>-<seed>.png."""
    target = request.output or DEFAULT_OUTPUT_DIR
    if Path(target).name.lower() in IMAGE_SUFFIXES and not os.path.isdir(target):
        # '.png' is a hidden name without a suffix to Python: it would become a directory
        raise UsageError(f"-o {target!r} has an extension but no file name",
                         hint="give a name such as cat.png, or a directory ending in /")
    as_dir = target.endswith(("/", os.sep)) or os.path.isdir(target) or not Path(target).suffix
    if as_dir:
        stem = slugify(prompt)
        return [os.path.join(target, f"{stem}-{seed}.png") for seed in seeds]
    image_format(target)
    if len(seeds) == 1:
        return [target]
    base = Path(target)
    return [str(base.with_name(f"{base.stem}-{k}{base.suffix}")) for k in range(1, len(seeds) + 1)]


def plan_batch(rows, model: ModelRef, defaults: BatchDefaults, output_dir: str, *, batch_size: int | None = None,
               shard: tuple[int, int] | None = None, overwrite: bool = False,
               pixels: PixelOptions | None = None) -> tuple[Plan, list]:
    """Rows (from batchfile.load) to a Plan of the valid rows, and a RowError for each invalid one."""
    from .batchfile import RowError

    pixels = pixels or PixelOptions()
    _refuse_video(model)
    if batch_size is not None:
        check_count("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    check_seed(defaults.base_seed, "--seed")
    total = sum(row.get("n", 1) if isinstance(row.get("n", 1), int) and row.get("n", 1) > 0 else 1 for row in rows)
    if total > MAX_BATCH_IMAGES:
        raise UsageError(f"the batch asks for {total} images; one run makes at most {MAX_BATCH_IMAGES}",
                         hint="split the file")
    check_prompt(defaults.negative_prompt, "the negative prompt", allow_empty=True)

    extension = defaults.extension if defaults.extension.startswith(".") else "." + defaults.extension
    image_format("x" + extension)
    jobs: list[ImageJob] = []
    errors: list[RowError] = []
    occurrences: dict[str, int] = {}
    for row in rows:
        try:
            jobs.extend(_row_jobs(row, model, defaults, extension, output_dir, occurrences, len(jobs), pixels))
        except UsageError as exc:
            errors.append(RowError(row.line, exc.line()))
    jobs = _disambiguate(jobs)
    sizes = {(job.width, job.height) for job in jobs}
    size = batch_size if batch_size is not None else min((default_batch_size(w, h) for w, h in sizes), default=1)
    groups = group_jobs(jobs, size)
    bad = {e.line for e in errors}
    notes = sorted({note for row in rows if row.line not in bad for note in _size_notes(row, model, defaults)})
    if shard is not None:
        index, count = shard
        groups = [group for number, group in enumerate(groups) if number % count == index]
        notes.append(f"shard {index}/{count}: {len(groups)} GPU batch(es) of this run's {len(jobs)} images")
        kept = [i for group in groups for i in group]
        position = {old: new for new, old in enumerate(kept)}
        jobs = [jobs[i] for i in kept]
        groups = [[position[i] for i in group] for group in groups]
    return Plan(command="batch", model=model, jobs=jobs, groups=groups, output_dir=output_dir, overwrite=overwrite,
                notes=notes, seed_rule=SEED_RULE, force_size=defaults.force_size), errors


def _row_jobs(row, model, defaults, extension, output_dir, occurrences, start, pixels) -> list[ImageJob]:
    for row_ in table.FIELDS:  # the video rows' columns make no image
        if row_.group == "video" and row_.column and row.get(row_.column) is not None:
            raise UsageError(f"'{row_.column}' is for SANA-Video models; {model.name} makes images")
    check_prompt(row.prompt)
    check_prompt(row.get("negative_prompt", ""), "the negative prompt", allow_empty=True)
    if row.get("size") is not None and (row.get("width") is not None or row.get("height") is not None):
        raise UsageError("'size' conflicts with 'width'/'height'")
    if row.get("size") is not None:
        check_side("'size'", row.get("size"))
    given = {}
    for field_ in table.FIELDS:  # the row's column, else the batch default, else the field's default
        if field_.name in PLANNING_INPUTS:
            fallback = getattr(defaults, field_.name) if field_.in_defaults else _unset(field_)
            given[field_.name] = row.get(field_.column, fallback) if field_.column else fallback
    given.update(prompt=row.prompt, width=row.get("width", row.get("size", defaults.width)),
                 height=row.get("height", row.get("size", defaults.height)), pag_scale=float(given["pag_scale"]),
                 # --controlnet serves the rows that have a control image; the others run plain
                 controlnet=defaults.controlnet if given["control_image"] is not None else None)
    params, _ = resolve_params(model, **given, force_size=defaults.force_size, command_line=False,
                               offline=defaults.offline)
    check_with_pixels(params, pixels)
    prompt = params["prompt"]
    count = row.get("n", 1)
    if count < 1 or count > MAX_IMAGES:
        raise UsageError(f"'n' must be 1..{MAX_IMAGES}, got {count}")
    name = check_name(row.get("name")) if row.get("name") is not None else None
    identity = name if name is not None else prompt
    occurrence = occurrences.get(identity, 0)
    occurrences[identity] = occurrence + 1
    own_seed = row.get("seed")
    jobs = []
    for image in range(count):
        if own_seed is not None:
            seed = check_seed(own_seed + image)
        else:
            seed = derive_seed(defaults.base_seed, identity, occurrence, image)
        if name is not None:
            stem = name if count == 1 else f"{name}-{image + 1}"
        else:
            stem = f"{row.line:05d}-{slugify(prompt, 48)}-{seed}"
        jobs.append(make_job(model, pixels, index=start + len(jobs) + 1, row=row.line,
                             path=os.path.join(output_dir, stem + extension), seed=seed, **params))
    return jobs


def _size_notes(row, model, defaults) -> list[str]:
    try:
        return resolve_size(model, row.get("width", row.get("size", defaults.width)),
                            row.get("height", row.get("size", defaults.height)), defaults.force_size)[2]
    except UsageError:
        return []


def _disambiguate(jobs: list[ImageJob]) -> list[ImageJob]:
    """Give colliding file names (ignoring case) -2, -3 ... suffixes, in plan order."""
    seen: set[str] = set()
    result = []
    for job in jobs:
        path = Path(job.path)
        candidate, number = path, 1
        while str(candidate).casefold() in seen:
            number += 1
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        seen.add(str(candidate).casefold())
        result.append(job if candidate == path else ImageJob(**{**job.__dict__, "path": str(candidate)}))
    return result
