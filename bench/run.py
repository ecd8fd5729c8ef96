"""Benchmark sana-cli against the model card recipe, side by side, in one run.

    python bench/run.py --scale tiny                                   # CPU smoke test, < 1 min
    python bench/run.py --scale full --device cuda --checkpoints DIR   # the GPU run

For each workload it measures three sides on the same prompt, seed and size:

  recipe  the model card code as written: from_pretrained(dir, variant="bf16", torch_dtype=bf16),
          .to(device), vae and text encoder .to(bf16), patch_conv.convert_model(vae, splits=32) for
          the 4K model (sample_size 128), pipe(prompt=..., height, width, guidance_scale,
          num_inference_steps, generator=torch.Generator(device).manual_seed(seed))[0][0], image.save()
  api     sana-cli's Python API: sana_cli.api.load(dir, device=, dtype="bf16") once (warm), then
          Session.generate(...) writing the PNG
  cli     the `sana generate ... --json` command as a fresh process (python -m sana_cli with this
          checkout on PYTHONPATH), timed from outside: cold start to PNG on disk

Workloads (--workloads): 4k (4096x4096, 4K model, 20 steps, guidance 5.0), 1024 (1024x1024,
1024 model, 20 steps, 4.5), batch (64 prompts at 1024: the recipe loops 64 pipe calls; the
sana side is sana_batch_workload(), filled in when `sana batch` lands), sprint (Sprint 1.6B, 2
steps, 1024). --scale tiny runs the same workloads with tiny random models at their native sizes.

Per side: end-to-end seconds (median of --repeats after --warmup), stage times (text encode,
denoise, decode, write, measured the same way for recipe and api), peak memory, images/s, and
the difference of its images from the recipe's (PSNR, max abs diff on uint8). Results go to
bench/results/<date>_<device>_<scale>.json and .md (or --results DIR).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):  # this checkout's sana_cli, and the sibling bench modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common  # noqa: E402
import make_checkpoints  # noqa: E402

PROMPT = "a cyberpunk cat with a neon sign that says sana"  # every word is in the tokenizer's vocabulary
SEED = 42
WORKLOAD_KEYS = ("4k", "1024", "batch", "sprint")

# What the recipe side runs, recorded verbatim in the results (MODEL_DIR etc. filled in per workload).
RECIPE_CODE = """\
pipe = {cls}.from_pretrained({model_dir!r}{variant}, torch_dtype=torch.bfloat16)
pipe.to({device!r})
pipe.vae.to(torch.bfloat16)
pipe.text_encoder.to(torch.bfloat16)
if pipe.transformer.config.sample_size == 128:
    pipe.vae = patch_conv.convert_model(pipe.vae, splits=32)
{loop}image = pipe(prompt={prompt}, height={height}, width={width}, guidance_scale={guidance},
{indent}             num_inference_steps={steps},
{indent}             generator=torch.Generator(device={device!r}).manual_seed({seed}){binning})[0][0]
{indent}image.save({path})"""


def recipe_code(workload: "Workload", model_dir, device, *, variant: str | None, cls: str, binning: bool,
                cast_text_encoder: bool = True) -> str:
    """The recipe code exactly as recipe_side runs it, for the results."""
    batch = workload.prompts > 1
    code = RECIPE_CODE.format(
        cls=cls, model_dir=str(model_dir), variant=f", variant={variant!r}" if variant else "", device=device.type,
        loop="for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):\n    " if batch else "",
        indent="    " if batch else "", prompt="prompt" if batch else repr(PROMPT), height=workload.height,
        width=workload.width, guidance=workload.guidance, steps=workload.steps, seed="seed" if batch else SEED,
        binning="" if binning else ", use_resolution_binning=False",
        path='f"{i:03d}.png"' if batch else '"image.png"')
    if not cast_text_encoder:
        code = code.replace("pipe.text_encoder.to(torch.bfloat16)\n", "")
    return code


@dataclass(frozen=True)
class Workload:
    key: str
    model: str  # make_checkpoints model key
    width: int
    height: int
    steps: int
    guidance: float
    prompts: int = 1
    force_size: bool = False  # tiny 4k only: render below the model's native size

    def prompt_list(self) -> list[str]:
        return [PROMPT] if self.prompts == 1 else batch_prompts(self.prompts)

    def seeds(self) -> list[int]:
        return [SEED + i for i in range(self.prompts)]


def workloads(scale: str, batch_prompts_count: int | None = None, size: int | None = None,
              steps: int | None = None) -> dict[str, Workload]:
    """Full: the benchmark's sizes (4096px, 1024px, a 1024px batch, Sprint). Tiny: 128x128 everywhere,
    the native size of the tiny 1024 and Sprint models (sample_size 32 x VAE ratio 4). The tiny 4K
    model (sample_size 128) is native 512, but bf16 convolutions are slow on a CPU, so it renders
    128x128 too (--force-size)."""
    if scale == "full":
        big, small, count = 4096, 1024, batch_prompts_count or 64
    else:
        big, small, count = 128, 128, batch_prompts_count or 2
    chosen = {"4k": Workload("4k", "4k", big, big, 20, 5.0, force_size=scale == "tiny"),
              "1024": Workload("1024", "1024", small, small, 20, 4.5),
              "batch": Workload("batch", "1024", small, small, 20, 4.5, prompts=count),
              "sprint": Workload("sprint", "sprint", small, small, 2, 4.5)}
    if steps is not None:  # a quick check with fewer steps (--steps); Sprint's 2 are its model's
        chosen = {key: w if key == "sprint" else replace(w, steps=steps) for key, w in chosen.items()}
    if size is not None:  # a quick check at another size (--size): sana-cli needs force_size for it
        chosen = {key: replace(w, width=size, height=size, force_size=w.force_size or size != w.width)
                  for key, w in chosen.items()}
    return chosen


def batch_prompts(count: int) -> list[str]:
    """count distinct prompts made of words the tokenizer knows (deterministic)."""
    subjects = ["cat", "dog", "fox", "panda", "bird", "horse", "robot", "astronaut"]
    scenes = ["in the snow", "on the beach", "in a forest", "in the city at night", "under the moon",
              "near a river", "in a garden", "in space"]
    styles = ["photo", "painting", "digital art", "ink drawing"]
    prompts = []
    for i in range(count):
        subject, scene = subjects[i % len(subjects)], scenes[(i // len(subjects)) % len(scenes)]
        style = styles[(i // (len(subjects) * len(scenes))) % len(styles)]
        prompts.append(f"a {style} of a {subject} {scene}")
    return prompts


def binned_size(sample_size: int, width: int, height: int, sprint: bool = False) -> tuple[int, int] | None:
    """(width, height) diffusers renders with use_resolution_binning=True, or None where the
    pipeline would raise (Sprint supports binning only for sample_size 32)."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    bins = {128: ASPECT_RATIO_4096_BIN, 64: ASPECT_RATIO_2048_BIN, 32: ASPECT_RATIO_1024_BIN,
            16: ASPECT_RATIO_512_BIN}
    if sprint and sample_size != 32 or sample_size not in bins:
        return None
    h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins[sample_size])
    return int(w), int(h)


# ---- stage timing --------------------------------------------------------------------------------

class StageClock:
    """Stage boundaries of a pipeline call, taken the same way for the recipe and for sana-cli:
    text encode = pipe.encode_prompt; denoise = first to last transformer call of an image;
    decode = the VAE decoder's first conv_in to its last conv_out (covers full, strips, tiled and
    patch_conv). On CUDA the marks are CUDA events (no host synchronisation inside the run),
    on CPU perf_counter readings."""

    def __init__(self, pipe, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.pipe = pipe
        self.handles = []
        original = pipe.encode_prompt

        def encode_prompt(*args, **kwargs):
            self.mark("encode_start")
            value = original(*args, **kwargs)
            self.mark("encode_end")
            return value

        pipe.encode_prompt = encode_prompt
        transformer = pipe.transformer
        self.handles.append(transformer.register_forward_pre_hook(lambda *a: self.mark("step_start")))
        self.handles.append(transformer.register_forward_hook(lambda *a: self.mark("step_end")))
        decoder = pipe.vae.decoder
        conv_in = decoder.conv_in.conv2d if hasattr(decoder.conv_in, "conv2d") else decoder.conv_in
        conv_out = decoder.conv_out.conv2d if hasattr(decoder.conv_out, "conv2d") else decoder.conv_out
        self.handles.append(conv_in.register_forward_pre_hook(lambda *a: self.mark("decode_start")))
        self.handles.append(conv_out.register_forward_hook(lambda *a: self.mark("decode_end")))

    def mark(self, name: str) -> None:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def reset(self) -> None:
        self.marks = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.pipe.__dict__.pop("encode_prompt", None)
        self.pipe = None

    def stages(self) -> dict:
        """Seconds per stage, summed over the images of the window. Marks "image_end" close an image
        (the pipeline call returned); "write_start"/"write_end" bracket an image.save()."""
        if self.cuda:
            self.torch.cuda.synchronize()
            first = self.marks[0][1]
            times = [(name, first.elapsed_time(event) / 1000.0) for name, event in self.marks]
        else:
            first = self.marks[0][1]
            times = [(name, value - first) for name, value in self.marks]
        totals = {"encode": 0.0, "denoise": 0.0, "decode": 0.0}
        if any(name == "write_end" for name, _ in times):
            totals["write"] = 0.0
        opened: dict[str, float] = {}
        last: dict[str, float] = {}

        def close(stage: str, start_key: str, end_key: str) -> None:
            if start_key in opened and end_key in last:
                totals[stage] += max(0.0, last[end_key] - opened[start_key])
            opened.pop(start_key, None)
            last.pop(end_key, None)

        for name, value in times:
            if name in ("encode_start", "write_start"):
                opened[name] = value
            elif name == "encode_end":
                last[name] = value
                close("encode", "encode_start", "encode_end")
            elif name == "write_end":
                last[name] = value
                close("write", "write_start", "write_end")
            elif name in ("step_start", "decode_start"):
                if name == "decode_start":
                    close("denoise", "step_start", "step_end")
                opened.setdefault(name, value)
            elif name in ("step_end", "decode_end"):
                last[name] = value
            elif name == "image_end":
                close("denoise", "step_start", "step_end")
                close("decode", "decode_start", "decode_end")
        close("denoise", "step_start", "step_end")
        close("decode", "decode_start", "decode_end")
        return {key: round(value, 4) for key, value in totals.items()}


# ---- measuring -----------------------------------------------------------------------------------

@dataclass
class Side:
    """One side of a workload: what ran and what it cost."""

    side: str
    status: str = "ok"  # ok | failed | skipped
    seconds: float | None = None  # end to end, median of the measured runs
    runs: list[float] = field(default_factory=list)
    images: int = 0
    images_per_second: float | None = None
    stages: dict = field(default_factory=dict)  # seconds per stage of the median run
    reported: dict = field(default_factory=dict)  # sana-cli's own RunOutcome timings
    load_seconds: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    baseline_memory_bytes: int | None = None  # at the start of the measured call (model loaded)
    decode: str | None = None
    text_encoder_rope_dtype: str | None = None  # Gemma's rotary inv_freq buffer (see recipe_side)
    outputs: list[str] = field(default_factory=list)
    diff_vs_recipe: dict = field(default_factory=dict)
    diff_vs_recipe_no_te_cast: dict = field(default_factory=dict)
    command: str | None = None
    note: str | None = None
    error: str | None = None


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure_in_process(side: Side, run_once: Callable[[], dict], device, *, warmup: int, repeats: int,
                       clock: StageClock | None = None, warm: Callable[[], object] | None = None) -> Side:
    """Call warm() (default run_once) warmup times unmeasured, then run_once() repeats times measured.
    run_once returns {"outputs": [paths], "images": n, optional "decode", "reported"}. Keeps the
    median run's stages."""
    for _ in range(warmup):
        (warm or run_once)()
    runs = []
    for _ in range(repeats):
        if clock is not None:
            clock.reset()
            clock.mark("start")
        with _common.PeakMemory(device) as memory:
            _sync(device)
            started = time.perf_counter()
            info = run_once()
            _sync(device)
            seconds = time.perf_counter() - started
        stages = clock.stages() if clock is not None else {}
        runs.append((seconds, stages, memory, info))
    ordered = sorted(runs, key=lambda run: run[0])
    seconds, stages, memory, info = ordered[(len(ordered) - 1) // 2]
    side.seconds = round(seconds, 4)
    side.runs = [round(run[0], 4) for run in runs]
    side.images = info.get("images", len(info.get("outputs", [])))
    side.images_per_second = round(side.images / seconds, 4) if seconds > 0 else None
    side.stages = dict(stages, total=round(seconds, 4))
    side.reported = info.get("reported", {})
    side.decode = info.get("decode", side.decode)
    side.outputs = [str(path) for path in info.get("outputs", [])]
    side.peak_memory_bytes = max((run[2].peak or 0) for run in runs) or None
    side.memory_kind = memory.kind
    side.baseline_memory_bytes = memory.baseline
    return side


def run_cli(side: Side, argv: list[str], device, *, repeats: int = 1, outputs: list[str]) -> Side:
    """Run a sana command as a fresh process `repeats` times; wall time measured from outside."""
    side.command = shlex.join(argv)
    runs = []
    for _ in range(repeats):
        child = _common.run_child(argv, env=_common.child_env(), cwd=str(REPO))
        if child["returncode"] != 0:
            side.status = "failed"
            side.error = (child["stderr"].strip().splitlines() or ["(no stderr)"])[-1]
            side.note = child["stdout"].strip()[-500:] or None
            return side
        runs.append(child)
    ordered = sorted(runs, key=lambda child: child["seconds"])
    child = ordered[(len(ordered) - 1) // 2]
    report = json.loads(child["stdout"])
    side.seconds = round(child["seconds"], 4)
    side.runs = [round(c["seconds"], 4) for c in runs]
    side.images = len(report.get("images", []))
    side.images_per_second = round(side.images / child["seconds"], 4)
    timings = report.get("timings", {})
    side.reported = timings
    side.load_seconds = timings.get("load")
    side.stages = {key: timings[key] for key in ("encode", "denoise", "decode", "write") if key in timings}
    side.stages["startup_and_load"] = round(child["seconds"] - timings.get("total", 0.0), 4)
    side.stages["total"] = side.seconds
    if device.type == "cuda":
        side.peak_memory_bytes = report.get("peak_memory_bytes")
        side.memory_kind = "cuda max_memory_allocated (the CLI's own report, during its run)"
    else:
        side.peak_memory_bytes = child["peak_rss_bytes"]
        side.memory_kind = "peak RSS of the process (wait4 ru_maxrss), load included"
    side.decode = ",".join(sorted({image.get("decode") or "?" for image in report.get("images", [])}))
    side.outputs = [image["path"] for image in report.get("images", [])] or outputs
    return side


# ---- the three sides -----------------------------------------------------------------------------

def rope_dtype(pipe) -> str | None:
    rotary = getattr(getattr(pipe.text_encoder, "rotary_emb", None), "inv_freq", None)
    return None if rotary is None else str(rotary.dtype).removeprefix("torch.")


def recipe_side(workload: Workload, model_dir: Path, device, out_dir: Path, *, warmup: int, repeats: int,
                notes: list[str], cast_text_encoder: bool = True) -> Side:
    """The model card recipe, as written (see RECIPE_CODE).

    With cast_text_encoder=False it skips `pipe.text_encoder.to(torch.bfloat16)`. That line does
    more than it seems: from_pretrained(torch_dtype=bf16) keeps Gemma's rotary-embedding buffer
    inv_freq in fp32, and .to() casts it to bf16, which changes the prompt embeddings and so every
    pixel. sana-cli does not make that call, so this variant is the one it can match exactly."""
    import diffusers
    import patch_conv
    import torch

    spec = make_checkpoints.MODELS[workload.model]
    side = Side("recipe" if cast_text_encoder else "recipe_no_te_cast")
    kwargs = {"torch_dtype": torch.bfloat16}
    if spec.variant:
        kwargs["variant"] = spec.variant
    started = time.perf_counter()
    pipe = getattr(diffusers, spec.pipeline).from_pretrained(str(model_dir), **kwargs)
    pipe.to(device)
    pipe.vae.to(torch.bfloat16)
    if cast_text_encoder:
        pipe.text_encoder.to(torch.bfloat16)
    else:
        side.note = "the recipe without pipe.text_encoder.to(torch.bfloat16): Gemma's rotary inv_freq stays fp32"
    side.text_encoder_rope_dtype = rope_dtype(pipe)
    if pipe.transformer.config.sample_size == 128:
        pipe.vae = patch_conv.convert_model(pipe.vae, splits=32)
        side.decode = "patch_conv splits=32 (model card)"
    else:
        side.decode = "vae.decode (pipeline)"
    _sync(device)
    side.load_seconds = round(time.perf_counter() - started, 3)
    pipe.set_progress_bar_config(disable=True)  # no effect on what is computed

    binned = binned_size(pipe.transformer.config.sample_size, workload.width, workload.height,
                         sprint=spec.pipeline == "SanaSprintPipeline")
    call_kwargs = {}
    if binned != (workload.width, workload.height):
        # Only the tiny models get here: binning would render another size and resize the result,
        # so the recipe is called at the exact size instead (the one change to it).
        call_kwargs["use_resolution_binning"] = False
    side.command = recipe_code(workload, model_dir, device, variant=spec.variant, cls=spec.pipeline,
                               binning=not call_kwargs, cast_text_encoder=cast_text_encoder)
    if cast_text_encoder:
        would = f"render {binned[0]}x{binned[1]} and resize" if binned else "raise"
        notes.append(f"recipe as written: binning maps {workload.width}x{workload.height} to itself"
                     if not call_kwargs else
                     f"recipe called with use_resolution_binning=False: with binning it would {would} "
                     f"for {workload.width}x{workload.height}")
    prompts, seeds = workload.prompt_list(), workload.seeds()
    paths = [out_dir / (f"{i:03d}.png" if workload.prompts > 1 else "image.png") for i in range(workload.prompts)]
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock(pipe, device)

    def run_once(limit: int | None = None) -> dict:
        for prompt, seed, path in list(zip(prompts, seeds, paths))[:limit]:
            image = pipe(prompt=prompt, height=workload.height, width=workload.width,
                         guidance_scale=workload.guidance, num_inference_steps=workload.steps,
                         generator=torch.Generator(device=device).manual_seed(seed), **call_kwargs)[0][0]
            clock.mark("image_end")
            clock.mark("write_start")
            image.save(path)
            clock.mark("write_end")
        return {"outputs": paths, "images": len(paths)}

    try:
        # A batch warms up on one image: 64 more would add nothing but time.
        measure_in_process(side, run_once, device, warmup=warmup, repeats=repeats, clock=clock,
                           warm=lambda: run_once(limit=1))
    finally:
        clock.remove()
        pipe = None  # release the model before the next side loads
        release(device)
    return side


def _loaded_session(model_dir: Path, device) -> tuple[Side, object]:
    """The API side's model, loaded once in bf16; its load time goes on the side."""
    from sana_cli import api

    side = Side("api")
    _sync(device)
    started = time.perf_counter()
    session = api.load(str(model_dir), device=device.type, dtype="bf16")
    _sync(device)
    side.load_seconds = round(time.perf_counter() - started, 3)
    side.text_encoder_rope_dtype = rope_dtype(session.loaded.pipe)
    return side, session


def api_side(workload: Workload, model_dir: Path, device, out_dir: Path, *, warmup: int, repeats: int,
             decode: str) -> Side:
    """sana-cli's Python API with the model loaded once."""

    side, session = _loaded_session(model_dir, device)
    path = out_dir / "image.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock(session.loaded.pipe, device)

    def run_once() -> dict:
        result = session.generate(PROMPT, width=workload.width, height=workload.height, steps=workload.steps,
                                  guidance=workload.guidance, seed=SEED, output=str(path), overwrite=True,
                                  decode=decode, force_size=workload.force_size)
        clock.mark("image_end")
        return {"outputs": [image.written.path for image in result.images], "images": len(result.images),
                "decode": ",".join(sorted({image.decode for image in result.images})),
                "reported": dict(result.outcome.timings, peak_memory_bytes=result.outcome.peak_memory_bytes)}

    try:
        measure_in_process(side, run_once, device, warmup=warmup, repeats=repeats, clock=clock)
        # The write happens on sana-cli's writer thread, outside the clock's view: take its own figure.
        side.stages["write"] = side.reported.get("write")
    finally:
        clock.remove()
        session = None  # release the model before the next side loads
        release(device)
    return side


def cli_argv(workload: Workload, model_dir: Path, device, path: Path, decode: str) -> list[str]:
    return [sys.executable, "-m", "sana_cli", "generate", PROMPT, "--model", str(model_dir),
            "--width", str(workload.width), "--height", str(workload.height), "--steps", str(workload.steps),
            "--guidance", str(workload.guidance), "--seed", str(SEED), "-o", str(path), "--overwrite",
            "--device", device.type, "--dtype", "bf16", "--decode", decode, "--json", "--quiet"] + (
                ["--force-size"] if workload.force_size else [])


def cli_side(workload: Workload, model_dir: Path, device, out_dir: Path, *, repeats: int, decode: str) -> Side:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "image.png"
    return run_cli(Side("cli"), cli_argv(workload, model_dir, device, path, decode), device, repeats=repeats,
                   outputs=[str(path)])


def sana_batch_workload(model_dir: Path, prompts: list[str], seeds: list[int], *, width: int, height: int,
                        steps: int, guidance: float, device, out_dir: Path, warmup: int, repeats: int,
                        decode: str, force_size: bool = False) -> list[Side]:
    """The batch workload through `sana batch`: image i is prompts[i] with seeds[i] (given per row, so
    the work equals the recipe's loop), in GPU batches of sana-cli's default size, prompts encoded
    once per batch, PNGs written on the background thread. Returns the warm API side (model loaded
    once, Session.batch) and the cold CLI side (a fresh `sana batch` process)."""
    from sana_cli.planning.plan import BatchDefaults

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = out_dir / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "seed": s, "name": f"{i:04d}"}, ensure_ascii=False) + "\n"
                            for i, (p, s) in enumerate(zip(prompts, seeds))))
    one_row = out_dir / "warm.jsonl"
    one_row.write_text(rows.read_text().splitlines()[0] + "\n")
    defaults = BatchDefaults(width=width, height=height, steps=steps, guidance=guidance, force_size=force_size)

    side, session = _loaded_session(model_dir, device)
    clock = StageClock(session.loaded.pipe, device)
    counter = iter(range(10**6))

    def run_once(source: Path = rows) -> dict:
        target = out_dir / "api" / f"run-{next(counter)}"  # a fresh directory: a rerun would resume
        result = session.batch(str(source), output_dir=str(target), defaults=defaults, decode=decode)
        if result.failed:
            raise RuntimeError(f"sana batch failed: {result.failed[0].error}")
        return {"outputs": [image.written.path for image in result.written], "images": len(result.written),
                "decode": ",".join(sorted({image.decode for image in result.written})),
                "reported": dict(result.outcome.timings, peak_memory_bytes=result.outcome.peak_memory_bytes)}

    try:
        measure_in_process(side, run_once, device, warmup=warmup, repeats=repeats, clock=clock,
                           warm=lambda: run_once(one_row))
        side.stages["write"] = side.reported.get("write")
    finally:
        clock.remove()
        session = None  # release the model before the next side loads
        release(device)
    argv = [sys.executable, "-m", "sana_cli", "batch", str(rows), "--model", str(model_dir), "--width", str(width),
            "--height", str(height), "--steps", str(steps), "--guidance", str(guidance), "-o", str(out_dir / "cli"),
            "--device", device.type, "--dtype", "bf16", "--decode", decode, "--json", "--quiet"]
    cli = run_cli(Side("cli"), argv + (["--force-size"] if force_size else []), device, repeats=1,
                  outputs=[str(out_dir / "cli" / f"{i:04d}.png") for i in range(len(prompts))])
    return [side, cli]


def batch_sana_sides(workload: Workload, model_dir: Path, device, out_dir: Path, *, warmup: int, repeats: int,
                     decode: str) -> list[Side]:
    try:
        return sana_batch_workload(model_dir, workload.prompt_list(), workload.seeds(), width=workload.width,
                                   height=workload.height, steps=workload.steps, guidance=workload.guidance,
                                   device=device, out_dir=out_dir, warmup=warmup, repeats=repeats, decode=decode,
                                   force_size=workload.force_size)
    except NotImplementedError as exc:
        note = f"skipped: sana_batch_workload() is not implemented yet ({exc})"
        return [Side("api", status="skipped", note=note), Side("cli", status="skipped", note=note)]


# ---- driver --------------------------------------------------------------------------------------

def run_workload(workload: Workload, checkpoints: Path, device, work: Path, args, log) -> dict:
    model_dir = make_checkpoints.model_dir(checkpoints, workload.model)
    record = {"workload": workload.key, **asdict(workload), "model_dir": str(model_dir),
              "prompt": PROMPT if workload.prompts == 1 else None, "seeds": workload.seeds(),
              "notes": [], "sides": {}}
    if workload.prompts > 1:
        record["prompt_list"] = workload.prompt_list()
    notes = record["notes"]
    out = work / workload.key
    sides: list[Side] = []

    def attempt(name: str, function, *fargs, **fkwargs):
        log(f"[{workload.key}] {name} ...")
        try:
            value = function(*fargs, **fkwargs)
        except Exception as exc:  # noqa: BLE001 - a failed side is reported, the run goes on
            release(device)
            log(traceback.format_exc())
            return [Side(name, status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])]
        return value if isinstance(value, list) else [value]

    repeats = args.batch_repeats if workload.prompts > 1 else args.repeats
    sides += attempt("recipe", recipe_side, workload, model_dir, device, out / "recipe", warmup=args.warmup,
                     repeats=repeats, notes=notes)
    if args.exactness and workload.prompts == 1:
        sides += attempt("recipe_no_te_cast", recipe_side, workload, model_dir, device, out / "recipe_no_te_cast",
                         warmup=0, repeats=1, notes=notes, cast_text_encoder=False)
    if workload.key == "batch":
        sides += attempt("sana batch", batch_sana_sides, workload, model_dir, device, out, warmup=args.warmup,
                         repeats=repeats, decode=args.decode)
    else:
        sides += attempt("api", api_side, workload, model_dir, device, out / "api", warmup=args.warmup,
                         repeats=args.repeats, decode=args.decode)
        sides += attempt("cli", cli_side, workload, model_dir, device, out / "cli", repeats=args.cli_repeats,
                         decode=args.decode)
    if workload.force_size:
        notes.append("sana-cli called with force_size (--force-size): the size is not near the model's native one")
    references = {s.side: s for s in sides if s.side in ("recipe", "recipe_no_te_cast") and s.status == "ok"}
    for side in sides:
        for name, reference in references.items():
            if side.status == "ok" and side is not reference:
                setattr(side, f"diff_vs_{name}", _diff(reference, side))
        record["sides"][side.side] = asdict(side)
        log(f"[{workload.key}] {side.side}: {side.status} {side.seconds} s "
            f"{_common.gib(side.peak_memory_bytes)} {side.diff_vs_recipe or ''} {side.error or side.note or ''}")
    return record


def _diff(reference: Side, side: Side) -> dict:
    if len(side.outputs) != len(reference.outputs):
        return {"error": f"{len(side.outputs)} images vs {len(reference.outputs)} from {reference.side}"}
    return _common.combine_comparisons([_common.compare_images(a, b) for a, b in zip(reference.outputs, side.outputs)])


def markdown(results: dict) -> str:
    device = results["device"]
    v = results["versions"]
    lines = [f"# sana-cli benchmark: {results['scale']} scale on {device['name']}", "",
             f"- command: `{results['command']}`",
             f"- date: {results['date']}",
             f"- device: {device['name']}" + (f" (CUDA {device.get('cuda')}, capability {device.get('capability')})"
                                              if device["type"] == "cuda" else "")
             + f"; host CPU {device['cpu']}, {device['cpu_cores']} cores, {_common.gib(device['memory_bytes'])} RAM",
             f"- versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, transformers "
             f"{v['transformers']}, patch_conv {v['patch_conv']}, sana-cli {results['sana_cli']['version']} "
             f"({(results['sana_cli'].get('git_commit') or '?')[:10]}"
             f"{', sana_cli/ modified' if results['sana_cli'].get('sana_cli_modified') else ''})",
             f"- checkpoints: random weights, {results['checkpoints']['scale']} scale, bf16 "
             f"(bench/make_checkpoints.py); dtype bf16 on every side; warm-up {results['settings']['warmup']}, "
             f"median of {results['settings']['repeats']} (recipe, api), {results['settings']['cli_repeats']} cold "
             f"CLI run(s)",
             f"- load average at start / end: {results.get('load_average_at_start')} / "
             f"{results.get('load_average_at_end')} (other work on the machine skews CPU timings)", "",
             "Stage times in seconds. recipe/api: stage boundaries from hooks (CUDA events on GPU); "
             "cli: the CLI's own --json timings, plus process start + load measured from outside. "
             "Peak memory: " + ("torch.cuda.max_memory_allocated (weights included)."
                                if device["type"] == "cuda" else
                                "peak RSS of the process (recipe/api: during the measured call, model loaded; "
                                "cli: whole process, load included)."), "",
             "| workload | side | end-to-end s | images/s | encode | denoise | decode | write | load s | peak memory "
             "| decode | vs recipe: PSNR dB (max abs diff) | vs recipe w/o TE cast | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]

    def number(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"

    def diff_cell(diff: dict) -> str:
        if not diff:
            return "—"
        if "error" in diff:
            return diff["error"]
        if diff["identical"]:
            return "identical (0)"
        return f"{number(diff['psnr_db'], 2)} ({diff['max_abs_diff']})"

    for record in results["workloads"]:
        label = f"{record['workload']} {record['width']}x{record['height']}, {record['steps']} steps" + (
            f", {record['prompts']} prompts" if record["prompts"] > 1 else "")
        for name, side in record["sides"].items():
            stages = side.get("stages") or {}
            note = side.get("error") or side.get("note") or ""
            if side["status"] != "ok":
                note = f"**{side['status']}**: {note}"
            lines.append("| " + " | ".join([
                label, name, number(side.get("seconds")), number(side.get("images_per_second")),
                number(stages.get("encode")), number(stages.get("denoise")), number(stages.get("decode")),
                number(stages.get("write")), number(side.get("load_seconds"), 2),
                _common.gib(side.get("peak_memory_bytes")), side.get("decode") or "—",
                "(reference)" if name == "recipe" else diff_cell(side.get("diff_vs_recipe")),
                "(reference)" if name == "recipe_no_te_cast" else diff_cell(side.get("diff_vs_recipe_no_te_cast")),
                note.replace("|", "/")]) + " |")
        for note in record["notes"]:
            lines.append(f"| {label} | note | | | | | | | | | | | | {note.replace('|', '/')} |")
    lines += ["", "Recipe code (per workload, exactly as run, in each recipe side's `command` in the JSON):", "",
              "```python",
              results["recipe_code"], "```", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for full, cpu for tiny)")
    parser.add_argument("--workloads", default=",".join(WORKLOAD_KEYS), help="comma list of 4k,1024,batch,sprint")
    parser.add_argument("--checkpoints", default=None,
                        help="checkpoint dir (make_checkpoints.py layout); missing models are written there first "
                             "(default bench/checkpoints/<scale>)")
    parser.add_argument("--results", default=str(HERE / "results"), help="where the JSON and markdown go")
    parser.add_argument("--work", default=None, help="where images are written (default: a temp dir)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs before measuring (recipe, api)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured runs, median reported (recipe, api; default 3 full, 1 tiny)")
    parser.add_argument("--cli-repeats", type=int, default=1, help="cold CLI processes, median reported")
    parser.add_argument("--batch-repeats", type=int, default=1, help="measured runs of the whole batch workload")
    parser.add_argument("--batch-prompts", type=int, default=None,
                        help="prompts in the batch workload (64 full, 4 tiny)")
    parser.add_argument("--size", type=int, default=None,
                        help="render every workload at SIZExSIZE instead (quick checks only: not the full "
                             "workloads; sana-cli then runs with force_size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps of the 4k, 1024 and batch workloads instead of 20 (quick checks only: "
                             "not the full workloads; Sprint keeps its 2)")
    parser.add_argument("--decode", default="auto", help="sana-cli decode strategy for api and cli (default auto)")
    parser.add_argument("--no-exactness", dest="exactness", action="store_false",
                        help="skip the extra recipe run without the text-encoder cast (one image per workload)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if args.scale == "full" else "cpu")
    args.repeats = args.repeats or (3 if args.scale == "full" else 1)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOAD_KEYS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOAD_KEYS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from sana_cli.engine.loading import import_runtime

    import_runtime()  # quiet diffusers / transformers logging, as the CLI does
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 4

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    checkpoints = Path(args.checkpoints or HERE / "checkpoints" / args.scale).resolve()
    chosen = workloads(args.scale, args.batch_prompts, args.size, args.steps)
    needed = sorted({chosen[key].model for key in args.workloads}, key=make_checkpoints.MODEL_KEYS.index)
    manifest = make_checkpoints.build(checkpoints, needed, args.scale, device=device.type, log=log)
    work = Path(args.work or tempfile.mkdtemp(prefix="sana-bench-")).resolve()
    log(f"run.py: images under {work}")
    date = _common.now()
    results = {"schema": 1, "command": _common.command_line(["bench/run.py", *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
               "python": sys.executable, "date": date.isoformat(), "scale": args.scale,
               "device": _common.describe_device(device), "versions": _common.versions(),
               "sana_cli": _common.sana_cli_info(), "load_average_at_start": _common.load_average(),
               "checkpoints": {"path": str(checkpoints), "scale": manifest.get("scale"),
                               "seed": manifest.get("seed")},
               "settings": {"warmup": args.warmup, "repeats": args.repeats, "cli_repeats": args.cli_repeats,
                            "batch_repeats": args.batch_repeats,
                            "dtype": "bfloat16", "decode": args.decode, "seed": SEED},
               "recipe_code": recipe_code(chosen[args.workloads[0]], "MODEL_DIR", device, variant="bf16",
                                          cls="SanaPipeline", binning=True),
               "workloads": []}
    for key in args.workloads:
        results["workloads"].append(run_workload(chosen[key], checkpoints, device, work, args, log))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_at_end"] = _common.load_average()
    name = f"{date:%Y-%m-%d}_{_common.slug(results['device']['name'])}_{args.scale}"
    if list(args.workloads) != list(WORKLOAD_KEYS):
        name += "_" + "-".join(args.workloads)
    results_dir = Path(args.results)
    stem, number = name, 1
    while (results_dir / f"{name}.json").exists():  # never overwrite an earlier run of the same day
        number += 1
        name = f"{stem}_{number}"
    _common.write_json(results_dir / f"{name}.json", results)
    (results_dir / f"{name}.md").write_text(markdown(results))
    log(f"run.py: {results['seconds']} s; wrote {results_dir / name}.json and .md")
    print(results_dir / f"{name}.json")
    failed = [f"{r['workload']}/{s}" for r in results["workloads"] for s, side in r["sides"].items()
              if side["status"] == "failed"]
    if failed:
        log(f"run.py: failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
