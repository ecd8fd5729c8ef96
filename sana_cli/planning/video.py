"""`sana video` requests in, a Plan out: frames and size checked against what the SANA-Video model can make
(its Wan VAE's temporal and spatial factors), before anything loads.

Pure Python (no torch). A video is one job of the same Plan and ImageJob as an image, with the field table's
video rows (frames, fps, motion score) set; the engine and storage read those rows to make and write frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..inputs.values import check_prompt, check_seed
from ..models import modelref, presets
from ..models.modelref import ModelRef
from ..models.presets import VideoDefaults
from .checks import SCALE_RANGE, VIDEO_SUFFIXES, check_side, slugify, video_format
from .jobs import PixelOptions
from .keys import draw_seed, make_job
from .plan import DEFAULT_OUTPUT_DIR, Plan

MAX_SIDE = 2048  # the 720p bins' longest side is 1344; SANA-Video was trained at 480p and 720p
MAX_FRAMES = 1021  # 256 latent frames of the Wan VAE; the 2B model was trained at 81
MOTION_RANGE = (0, 100)
FPS_RANGE = (1, 120)
VIDEO_DECODES = ("auto", "full", "tiled")  # the Wan VAE decodes frame-causally, whole or tiled; it has no strips


@dataclass
class VideoRequest:
    """What one user asked for with `sana video`."""

    prompt: str
    model: str | None = None
    negative_prompt: str = ""
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    frames: int | None = None
    fps: int | None = None
    motion_score: int | None = None
    image: str | None = None  # the first frame (image-to-video)
    output: str | None = None
    overwrite: bool = False
    force_size: bool = False
    revision: str | None = None
    frames_dir: str | None = None  # also keep every frame as a PNG here


def video_defaults(model: ModelRef) -> VideoDefaults:
    """The model's video defaults: its preset's, else the SANA-Video 2B card's with the factors its VAE config
    states (a local or cached model). An image model is a usage error."""
    if not model.is_video:
        raise UsageError(f"{model.name} is an image model ({model.pipeline or 'pipeline unknown'}); `sana video` "
                         "runs SANA-Video models", hint="try --model sana-video-2b-480p (or tiny-video), or use "
                                                         "`sana generate` for images")
    if model.preset is not None and model.preset.video is not None:
        return model.preset.video
    base = presets.get("sana-video-2b-480p").video
    vae = _vae_config(model) or {}
    temporal, spatial = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 64 for v in (temporal, spatial)):
        raise UsageError(f"{model.name}'s vae/config.json has scale factors {temporal!r} and {spatial!r}, which "
                         "are not small whole numbers")
    return VideoDefaults(width=base.width, height=base.height, frames=base.frames, fps=base.fps,
                         temporal_factor=temporal, spatial_factor=spatial)


def _vae_config(model: ModelRef) -> dict | None:
    if model.kind == "local":
        return modelref._read_json(Path(model.source) / "vae" / "config.json")
    try:
        found = modelref.cached_file(model.source, "vae/config.json", model.revision)
    except (OSError, ValueError):
        return None
    return modelref._read_json(found) if found is not None else None


def check_frames(frames, defaults: VideoDefaults, option: str = "--frames") -> int:
    """A frame count the VAE can make: 1 + k x its temporal factor, at most MAX_FRAMES. The error names the
    nearest valid counts."""
    factor = defaults.temporal_factor
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise UsageError(f"{option} must be a whole number of frames, got {frames!r}")
    if frames < 1 or frames > MAX_FRAMES:
        raise UsageError(f"{option} must be 1..{MAX_FRAMES}, got {frames}")
    if (frames - 1) % factor:
        lower = frames - (frames - 1) % factor
        raise UsageError(f"{option} {frames} is not {factor}k+1 (the VAE makes {factor} frames from each latent "
                         "frame after the first)", hint=f"try {lower} or {lower + factor}")
    return frames


def check_video_size(model: ModelRef, defaults: VideoDefaults, width: int, height: int,
                     force: bool) -> tuple[int, int, list[str]]:
    """Sides that are multiples of 32 (the pipeline's rule; the VAE's 8x and the transformer's 2x patches
    divide it), within 32..MAX_SIDE, and, unless --force-size, within 0.5x-2x the pixel count of the
    model's default size. (width, height, notes)."""
    width = check_side("--width", width)
    height = check_side("--height", height)
    for name, value in (("--width", width), ("--height", height)):
        if value > MAX_SIDE:
            raise UsageError(f"{name} {value} is more than {MAX_SIDE}, larger than any SANA-Video size")
    native = defaults.width * defaults.height
    ratio = width * height / native
    notes: list[str] = []
    if not SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1]:
        if not force:
            raise UsageError(f"{model.name} makes {defaults.width}x{defaults.height} videos and {width}x{height} is "
                             f"{ratio:.2g}x its pixel count",
                             hint=f"try --width {defaults.width} --height {defaults.height} (or "
                                  f"{defaults.height}x{defaults.width}), or --force-size to render it anyway")
        notes.append(f"--force-size: rendering {width}x{height} with a {defaults.width}x{defaults.height} model")
    return width, height, notes


def check_positions(model: ModelRef, defaults: VideoDefaults, frames: int, width: int, height: int,
                    option=lambda name: f"--{name}") -> None:
    """The transformer's rotary positions (rope_max_seq_len per axis, from its config when readable) bound the
    latent frames and the patches a side: more would fail inside the transformer after loading."""
    try:
        config = modelref.transformer_config(model) or {}
    except (OSError, ValueError):
        config = {}
    limit = config.get("rope_max_seq_len", 1024 if config else None)
    patch = config.get("patch_size", (1, 2, 2))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1 or not isinstance(patch, (list, tuple)) \
            or len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
        return
    temporal, spatial = defaults.temporal_factor, defaults.spatial_factor
    if (frames - 1) // temporal + 1 > limit:
        most = (limit - 1) * temporal + 1
        raise UsageError(f"{option('frames')} {frames} is more than {model.name} can place in time ({limit} latent "
                         f"frames)", hint=f"at most {most}")
    for name, side, step in (("width", width, spatial * patch[2]), ("height", height, spatial * patch[1])):
        if side // step > limit:
            raise UsageError(f"{option(name)} {side} is more than {model.name} can place ({limit} patches of "
                             f"{step} pixels)", hint=f"at most {limit * step // 32 * 32}")


def check_in_range(option: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{option} must be {low}..{high}, got {value}")
    return value


def resolve_video(model: ModelRef, defaults: VideoDefaults, *, prompt, negative_prompt, width, height, steps,
                  guidance, frames, fps, motion_score, image, force_size: bool, option=lambda name: f"--{name}"
                  ) -> tuple[dict, list[str]]:
    """One video's pixel-deciding fields, checked, defaults filled (all but the seed), the same for `sana video`
    and a batch row: (fields, notes). `option` names a field in errors (an option, or a batch column)."""
    from ..inputs import images as inputs
    from .checks import check_steps_guidance

    prompt = check_prompt(prompt)
    negative_prompt = check_prompt(negative_prompt or "", "the negative prompt", allow_empty=True)
    frames = check_frames(defaults.frames if frames is None else frames, defaults, option("frames"))
    fps = check_in_range(option("fps"), defaults.fps if fps is None else fps, *FPS_RANGE)
    motion = check_in_range(option("motion-score"), defaults.motion_score if motion_score is None else motion_score,
                            *MOTION_RANGE)
    if width is None and height is None:
        width, height = defaults.width, defaults.height
    width, height = (width if width is not None else height), (height if height is not None else width)
    width, height, notes = check_video_size(model, defaults, width, height, force_size)
    check_positions(model, defaults, frames, width, height, option)
    steps = model.steps if steps is None else steps
    guidance = model.guidance if guidance is None else guidance
    check_steps_guidance(model, steps, guidance)
    extra: dict = {}
    if image is not None:
        path, digest = inputs.check_image(image, option("image"), (width, height))
        extra.update(image=path, image_sha256=digest)
    return dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                guidance=float(guidance), pag_scale=0.0, pag_layers=None, frames=frames, fps=fps, motion_score=motion,
                **extra), notes


def _check_decode(pixels: PixelOptions) -> None:
    if pixels.decode not in VIDEO_DECODES:
        raise UsageError(f"--decode {pixels.decode} is an image decode; a video decodes with "
                         f"{', '.join(VIDEO_DECODES)}", hint="tiled uses the Wan VAE's tiling (less memory, inexact)")


def plan_video(request: VideoRequest, model: ModelRef, pixels: PixelOptions | None = None) -> Plan:
    """Resolve a `sana video` request into a Plan of one job. Raises UsageError for anything invalid."""
    pixels = pixels or PixelOptions()
    defaults = video_defaults(model)
    _check_decode(pixels)
    params, notes = resolve_video(model, defaults, prompt=request.prompt, negative_prompt=request.negative_prompt,
                                  width=request.width, height=request.height, steps=request.steps,
                                  guidance=request.guidance, frames=request.frames, fps=request.fps,
                                  motion_score=request.motion_score, image=request.image,
                                  force_size=request.force_size)
    seed = check_seed(request.seed) if request.seed is not None else draw_seed()
    path = _video_path(request, params["prompt"], seed)
    if not request.overwrite and os.path.lexists(path):
        raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it, or -o elsewhere")
    if request.frames_dir is not None:
        _check_frames_dir(request.frames_dir, path, params["frames"], request.overwrite)
    job = make_job(model, pixels, index=1, row=0, path=path, seed=seed, **params)
    return Plan(command="video", model=model, jobs=[job], groups=[[0]], output_dir=str(Path(path).parent),
                overwrite=request.overwrite, notes=notes, seed_rule="as given" if request.seed is not None
                else "drawn at random", force_size=request.force_size, seeds_drawn=request.seed is None,
                frames_dir=request.frames_dir)


# The batch columns a video row may have; the others (LoRA, ControlNet, strength, PAG) are image-only.
VIDEO_COLUMNS = ("prompt", "negative_prompt", "seed", "size", "width", "height", "steps", "guidance", "name", "n",
                 "image", "frames", "fps", "motion_score")


def plan_video_batch(rows, model: ModelRef, defaults, output_dir: str, *, shard: tuple[int, int] | None = None,
                     overwrite: bool = False, pixels: PixelOptions | None = None) -> tuple[Plan, list]:
    """A batch file's rows as videos of a SANA-Video model: one job (and one GPU batch) per video, names and seeds
    by the batch rules (plan.SEED_RULE), the file type from --ext (mp4 or webm). (Plan, a RowError per bad row)."""
    from .batchfile import RowError
    from .checks import MAX_IMAGES, check_name
    from .keys import SEED_RULE, derive_seed

    pixels = pixels or PixelOptions()
    video = video_defaults(model)
    _check_decode(pixels)
    extension = defaults.extension if defaults.extension.startswith(".") else "." + defaults.extension
    if extension == ".png":  # --ext's default, for images
        extension = ".mp4"
    video_format("x" + extension)
    jobs, errors, occurrences = [], [], {}
    for row in rows:
        try:
            unknown = [column for column in row.overrides if column not in VIDEO_COLUMNS and
                       row.overrides[column] not in (None, ())]
            if unknown:
                raise UsageError(f"'{unknown[0]}' is for images; a video row takes {', '.join(VIDEO_COLUMNS)}")
            if row.get("size") is not None and (row.get("width") is not None or row.get("height") is not None):
                raise UsageError("'size' conflicts with 'width'/'height'")
            params, _ = resolve_video(
                model, video, prompt=row.prompt, negative_prompt=row.get("negative_prompt", defaults.negative_prompt),
                width=row.get("width", row.get("size", defaults.width)),
                height=row.get("height", row.get("size", defaults.height)),
                steps=row.get("steps", defaults.steps), guidance=row.get("guidance", defaults.guidance),
                frames=row.get("frames"), fps=row.get("fps"), motion_score=row.get("motion_score"),
                image=row.get("image", defaults.image), force_size=defaults.force_size,
                option=lambda name: f"'{name.replace('-', '_')}'")
            count = row.get("n", 1)
            if count < 1 or count > MAX_IMAGES:
                raise UsageError(f"'n' must be 1..{MAX_IMAGES}, got {count}")
            name = check_name(row.get("name")) if row.get("name") is not None else None
            identity = name if name is not None else params["prompt"]
            occurrence = occurrences.get(identity, 0)
            occurrences[identity] = occurrence + 1
            for number in range(count):
                seed = (check_seed(row.get("seed") + number) if row.get("seed") is not None
                        else derive_seed(defaults.base_seed, identity, occurrence, number))
                stem = (name if count == 1 else f"{name}-{number + 1}") if name is not None else \
                    f"{row.line:05d}-{slugify(params['prompt'], 48)}-{seed}"
                jobs.append(make_job(model, pixels, index=len(jobs) + 1, row=row.line,
                                     path=os.path.join(output_dir, stem + extension), seed=seed, **params))
        except UsageError as exc:
            errors.append(RowError(row.line, exc.line()))
    seen: set[str] = set()
    for position, job in enumerate(jobs):  # names that collide (ignoring case) get -2, -3 ..., as images do
        path, number, candidate = Path(job.path), 1, Path(job.path)
        while str(candidate).casefold() in seen:
            number += 1
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        seen.add(str(candidate).casefold())
        if candidate != path:
            jobs[position] = type(job)(**{**job.__dict__, "path": str(candidate)})
    groups = [[i] for i in range(len(jobs))]
    notes = []
    if shard is not None:
        index, count = shard
        groups = [group for number, group in enumerate(groups) if number % count == index]
        notes.append(f"shard {index}/{count}: {len(groups)} of this run's {len(jobs)} videos")
        kept = [group[0] for group in groups]
        jobs = [jobs[i] for i in kept]
        groups = [[i] for i in range(len(jobs))]
    return Plan(command="batch", model=model, jobs=jobs, groups=groups, output_dir=output_dir, overwrite=overwrite,
                notes=notes, seed_rule=SEED_RULE, force_size=defaults.force_size), errors


def _video_path(request: VideoRequest, prompt: str, seed: int) -> str:
    """-o is a file (.mp4 or .webm) or a directory; default ./sana-out/<slug>-<seed>.mp4."""
    target = request.output or DEFAULT_OUTPUT_DIR
    if Path(target).name.lower() in VIDEO_SUFFIXES and not os.path.isdir(target):
        raise UsageError(f"-o {target!r} has an extension but no file name", hint="give a name such as clip.mp4")
    if target.endswith(("/", os.sep)) or os.path.isdir(target) or not Path(target).suffix:
        return os.path.join(target, f"{slugify(prompt)}-{seed}.mp4")
    video_format(target)
    return target


def frame_paths(frames_dir: str, video_path: str, count: int) -> list[str]:
    """Where --frames-dir keeps a video's frames: <video name>-0001.png onwards."""
    stem = Path(video_path).stem
    return [os.path.join(frames_dir, f"{stem}-{number:04d}.png") for number in range(1, count + 1)]


def _check_frames_dir(frames_dir: str, video_path: str, count: int, overwrite: bool) -> None:
    if not isinstance(frames_dir, str) or not frames_dir.strip():
        raise UsageError("--frames-dir is empty")
    if os.path.lexists(frames_dir) and not os.path.isdir(frames_dir):
        raise UsageError(f"--frames-dir {frames_dir} is a file, not a directory")
    if not overwrite:
        taken = [path for path in frame_paths(frames_dir, video_path, count) if os.path.lexists(path)]
        if taken:
            raise UsageError(f"{taken[0]} already exists", hint="pass --overwrite to replace it, or another "
                                                                 "--frames-dir")


def model_for_video(request: VideoRequest) -> ModelRef:
    """The model a request names; without --model, SANA-Video 2B 480p."""
    return modelref.resolve(request.model or "sana-video-2b-480p", revision=request.revision)


__all__ = ["VideoRequest", "check_frames", "check_video_size", "frame_paths",
           "model_for_video", "plan_video", "plan_video_batch", "resolve_video", "video_defaults"]
