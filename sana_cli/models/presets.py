"""The Sana model family as data: one row per checkpoint, no if-chains elsewhere.

Sources: the NVlabs model zoo, the diffusers Sana docs and the hub configs of each repository.
``variant`` is the weight file suffix to ask for:
the BF16 repos ship ``*.bf16.safetensors``, the older repos ``*.fp16.safetensors``, and Sprint and
SANA 1.5 ship plain files only (asking them for a variant fails).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

from ..errors import UsageError

# Pipelines sana-cli knows how to drive (the class name in model_index.json).
SANA = "SanaPipeline"
SANA_PAG = "SanaPAGPipeline"
SANA_SPRINT = "SanaSprintPipeline"
SANA_VIDEO = "SanaVideoPipeline"  # text-to-video; its checkpoints also serve SanaImageToVideoPipeline
SUPPORTED_PIPELINES = (SANA, SANA_PAG, SANA_SPRINT, SANA_VIDEO)


@dataclass(frozen=True)
class Preset:
    """One checkpoint and the settings its authors recommend."""

    name: str
    repo: str  # hub id, or "tiny:<variant>" for the built-in offline model
    pipeline: str
    dtype: str  # weights dtype on CUDA: "bfloat16" or "float16"
    variant: str | None
    native_size: int  # the side length the model was trained at
    steps: int
    guidance: float
    flow_shift: float | None = None  # enforced on the DPM-Solver scheduler when set
    pag_layers: str = "transformer_blocks.8"
    min_steps: int = 1
    max_steps: int = 1000
    aliases: tuple[str, ...] = ()
    description: str = ""
    params: str = ""  # parameter count, for `sana models`
    tags: tuple[str, ...] = field(default=())
    video: "VideoDefaults | None" = None  # a SANA-Video checkpoint's defaults (None for an image model)

    @property
    def is_tiny(self) -> bool:
        return self.repo.startswith("tiny:")

    @property
    def supports_pag(self) -> bool:
        return pag_supported(self.pipeline, tags=self.tags)

    @property
    def uses_cfg(self) -> bool:
        return self.pipeline != SANA_SPRINT


@dataclass(frozen=True)
class VideoDefaults:
    """What a SANA-Video model card runs by default, and its VAE's factors (Wan: 4 frames a latent after
    the first, 8 pixels a side)."""

    width: int
    height: int
    frames: int
    fps: int
    motion_score: int = 30
    temporal_factor: int = 4
    spatial_factor: int = 8


# The model card's negative prompt (SANA-Video_2B_480p_diffusers, and the diffusers pipeline's example).
VIDEO_CARD_NEGATIVE_PROMPT = (
    "A chaotic sequence with misshapen, deformed limbs in heavy motion blur, sudden disappearance, jump cuts, jerky "
    "movements, rapid shot changes, frames out of sync, inconsistent character shapes, temporal artifacts, jitter, "
    "and ghosting effects, creating a disorienting visual experience.")


def pag_supported(pipeline: str | None, *, timestep_scale: float = 1.0, tags: tuple[str, ...] = ()) -> bool:
    """The one rule for whether a model can use perturbed-attention guidance: a Sana (or Sana PAG)
    checkpoint whose transformer has no timestep_scale, because SanaPAGPipeline ignores that scale (so
    the Sprint teacher, which has one, cannot use PAG), and not marked no-pag. Sprint has no PAG pipeline."""
    return pipeline in (SANA, SANA_PAG) and float(timestep_scale) == 1.0 and "no-pag" not in tags


def check_pag_layers(text: str, num_layers: int | None, model: str) -> list[str]:
    """The layers of --pag-layers (comma-separated patterns), checked by diffusers' own rule (PAGMixin): each
    pattern must compile and `re.search` at least one self-attention layer of the transformer, one named
    transformer_blocks.N.attn1, where a pattern ending in a number never matches a longer one (blocks.1 is
    not blocks.10). Checked while planning from the transformer's config (num_layers; None when it is not
    readable before loading: then the patterns alone, and again after loading) so a pattern that names no
    layer is exit 2 before any weight loads, not a ValueError halfway through a run."""
    import re

    layers = [layer.strip() for layer in (text or "").split(",") if layer.strip()]
    if not layers:
        raise UsageError(f"--pag-layers {text!r} names no layer", hint="for example transformer_blocks.8")
    names = [f"transformer_blocks.{block}.attn1" for block in range(num_layers or 0)]
    for layer in layers:
        try:
            pattern = re.compile(layer)
        except (re.error, RecursionError, OverflowError) as exc:
            raise UsageError(f"--pag-layers {layer!r} is not a valid pattern ({exc})") from None
        if num_layers is None:
            continue
        last = layer.split(".")[-1]
        if not any(pattern.search(name) and not (last.isnumeric() and name.split(".")[-1].isnumeric()
                                                 and last == name.split(".")[-1]) for name in names):
            raise UsageError(f"--pag-layers {layer!r} matches no self-attention layer of {model}",
                             hint=f"it has transformer_blocks.0 to transformer_blocks.{num_layers - 1}")
    return layers


PRESETS: tuple[Preset, ...] = (
    Preset(name="sana-4k", repo="Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers", pipeline=SANA, dtype="bfloat16",
           variant="bf16", native_size=4096, steps=20, guidance=5.0, flow_shift=6.0, aliases=("4k", "sana-1600m-4k"),
           params="1.6B", description="Sana 1600M, 4096px, BF16"),
    Preset(name="sana-2k", repo="Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers", pipeline=SANA, dtype="bfloat16",
           variant="bf16", native_size=2048, steps=20, guidance=4.5, flow_shift=3.0, aliases=("2k", "sana-1600m-2k"),
           params="1.6B", description="Sana 1600M, 2048px, BF16"),
    Preset(name="sana-1600m-1024", repo="Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", pipeline=SANA,
           dtype="bfloat16", variant="bf16", native_size=1024, steps=20, guidance=4.5, flow_shift=3.0,
           aliases=("sana", "sana-1024", "1024"), params="1.6B",
           description="Sana 1600M, 1024px, BF16 (the default model)"),
    Preset(name="sana-1600m-512", repo="Efficient-Large-Model/Sana_1600M_512px_diffusers", pipeline=SANA,
           dtype="float16", variant="fp16", native_size=512, steps=20, guidance=4.5, flow_shift=3.0,
           aliases=("sana-512", "512"), params="1.6B", description="Sana 1600M, 512px, FP16"),
    Preset(name="sana-600m-1024", repo="Efficient-Large-Model/Sana_600M_1024px_diffusers", pipeline=SANA,
           dtype="float16", variant="fp16", native_size=1024, steps=20, guidance=4.5, flow_shift=3.0,
           aliases=("sana-600m",), params="0.6B", description="Sana 600M, 1024px, FP16"),
    Preset(name="sana-600m-512", repo="Efficient-Large-Model/Sana_600M_512px_diffusers", pipeline=SANA, dtype="float16",
           variant="fp16", native_size=512, steps=20, guidance=4.5, flow_shift=3.0, params="0.6B",
           description="Sana 600M, 512px, FP16"),
    Preset(name="sana-multiling-1024", repo="Efficient-Large-Model/Sana_1600M_1024px_MultiLing_diffusers",
           pipeline=SANA, dtype="float16", variant="fp16", native_size=1024, steps=20, guidance=4.5, flow_shift=3.0,
           aliases=("multiling",), params="1.6B",
           description="Sana 1600M, 1024px, multilingual (English, Chinese, emoji), FP16"),
    Preset(name="sana-1.5-1.6b", repo="Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", pipeline=SANA,
           dtype="bfloat16", variant=None, native_size=1024, steps=20, guidance=4.5, aliases=("sana1.5", "sana-1.5"),
           params="1.6B", description="SANA 1.5 1.6B, 1024px, BF16"),
    Preset(name="sana-1.5-4.8b", repo="Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers", pipeline=SANA,
           dtype="bfloat16", variant=None, native_size=1024, steps=20, guidance=4.5, aliases=("sana1.5-4.8b",),
           params="4.8B", description="SANA 1.5 4.8B, 1024px, BF16"),
    Preset(name="sprint", repo="Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers", pipeline=SANA_SPRINT,
           dtype="bfloat16", variant=None, native_size=1024, steps=2, guidance=4.5, min_steps=1, max_steps=4,
           aliases=("sana-sprint", "sprint-1.6b"), params="1.6B",
           description="SANA-Sprint 1.6B student, 1-4 steps, 1024px"),
    Preset(name="sprint-0.6b", repo="Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers", pipeline=SANA_SPRINT,
           dtype="bfloat16", variant=None, native_size=1024, steps=2, guidance=4.5, min_steps=1, max_steps=4,
           params="0.6B", description="SANA-Sprint 0.6B student, 1-4 steps, 1024px"),
    Preset(name="sprint-teacher", repo="Efficient-Large-Model/SANA_Sprint_1.6B_1024px_teacher_diffusers", pipeline=SANA,
           dtype="bfloat16", variant=None, native_size=1024, steps=20, guidance=4.5, params="1.6B", tags=("no-pag",),
           description="SANA-Sprint 1.6B teacher (qk_norm, dense timestep embedding) through SanaPipeline"),
    Preset(name="tiny", repo="tiny:sana", pipeline=SANA, dtype="float32", variant=None, native_size=128, steps=4,
           guidance=4.5, flow_shift=3.0, pag_layers="transformer_blocks.1", params="tiny",
           description="built-in random tiny Sana, offline, for tests and CI (not a real model)"),
    Preset(name="tiny-sprint", repo="tiny:sprint", pipeline=SANA_SPRINT, dtype="float32", variant=None, native_size=128,
           steps=2, guidance=4.5, min_steps=1, max_steps=4, params="tiny",
           description="built-in random tiny SANA-Sprint student (qk_norm, guidance embeds)"),
    Preset(name="tiny-teacher", repo="tiny:teacher", pipeline=SANA, dtype="float32", variant=None, native_size=128,
           steps=4, guidance=4.5, flow_shift=3.0, params="tiny", tags=("no-pag",),
           description="built-in random tiny Sprint-teacher config (qk_norm, timestep_scale)"),
    # The card loads it with a bf16 dtype, then puts the VAE in fp32 and Gemma in bf16 (component_dtypes), and
    # keeps the scheduler as shipped (its flow-shift override is commented out).
    Preset(name="sana-video-2b-480p", repo="Efficient-Large-Model/SANA-Video_2B_480p_diffusers", pipeline=SANA_VIDEO,
           dtype="bfloat16", variant=None, native_size=480, steps=50, guidance=6.0, aliases=("sana-video",),
           params="2B", tags=("no-pag",), video=VideoDefaults(width=832, height=480, frames=81, fps=16),
           description="SANA-Video 2B, 480p, 81 frames at 16 fps; text- and image-to-video (`sana video`)"),
    Preset(name="tiny-video", repo="tiny:video", pipeline=SANA_VIDEO, dtype="float32", variant=None, native_size=64,
           steps=4, guidance=6.0, params="tiny", tags=("no-pag",),
           video=VideoDefaults(width=64, height=64, frames=9, fps=16),
           description="built-in random tiny SANA-Video (Wan VAE), for tests and CI (`sana video`)"),
)

_BY_NAME = {p.name: p for p in PRESETS}
_BY_ALIAS = {alias: p for p in PRESETS for alias in p.aliases}
_BY_REPO = {p.repo.lower(): p for p in PRESETS}

DEFAULT_MODEL = "sana-1600m-1024"
# Models `--size` picks from when no --model is given: the BF16 1600M family plus the 512px model.
SIZE_DEFAULTS = ("sana-1600m-512", "sana-1600m-1024", "sana-2k", "sana-4k")


def find(name: str) -> Preset | None:
    """The preset with this name, alias or hub repo id (case-insensitive), or None."""
    key = name.strip().lower()
    return _BY_NAME.get(key) or _BY_ALIAS.get(key) or _BY_REPO.get(key)


def suggest(name: str) -> str | None:
    """The nearest preset name, for 'did you mean' messages."""
    choices = [p.name for p in PRESETS] + list(_BY_ALIAS)
    match = difflib.get_close_matches(name.strip().lower(), choices, n=1, cutoff=0.5)
    if not match:
        return None
    return find(match[0]).name


def get(name: str) -> Preset:
    """Like find(), but an unknown name is a usage error with a suggestion."""
    preset = find(name)
    if preset is None:
        near = suggest(name)
        raise UsageError(f"unknown model preset '{name}'" + (f"; did you mean '{near}'?" if near else ""),
                         hint="`sana models` lists them")
    return preset


def for_size(width: int, height: int) -> Preset:
    """The default-family model whose native pixel count is nearest (in log scale) to width x height."""
    pixels = width * height
    return min((_BY_NAME[n] for n in SIZE_DEFAULTS),
               key=lambda p: abs(math.log(pixels / (p.native_size * p.native_size))))


# ---- dtypes ------------------------------------------------------------------------------------------

COMPONENTS = ("transformer", "text_encoder", "vae")
DTYPE_NAMES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}
DTYPE_RULE = ("auto runs each checkpoint in the dtype it ships in, on every device, as the model cards do: BF16 "
              "checkpoints in bf16; FP16 checkpoints with the transformer in fp16 and Gemma and the DC-AE in bf16 "
              "(they overflow in fp16); fp32-stored weights in bf16 on CUDA and fp32 on the CPU. --dtype fp16 "
              "likewise keeps Gemma and the DC-AE in bf16. SANA-Video's Wan VAE runs in fp32 under every --dtype, as "
              "its card loads it.")


def component_dtypes(checkpoint: str | None, requested: str, device_type: str, *,
                     video: bool = False) -> dict[str, str]:
    """The dtype name of each component (transformer, text_encoder, vae) for a checkpoint whose weights are
    stored in `checkpoint` ("bfloat16", "float16", "float32" or None when unknown), a --dtype value and a
    device type ("cuda" or "cpu"). Pure, so a plan or a job key can state it without loading anything."""
    if requested not in DTYPE_NAMES:
        raise UsageError(f"unknown --dtype {requested!r}; use auto, bf16, fp16 or fp32")
    wanted = DTYPE_NAMES[requested]
    if wanted == "auto":
        if checkpoint in ("bfloat16", "float16"):
            wanted = checkpoint
        else:  # fp32 files are storage, not a precision choice: Sana runs in bf16 on a GPU
            wanted = "bfloat16" if device_type == "cuda" else "float32"
    if wanted == "float16":
        dtypes = {"transformer": "float16", "text_encoder": "bfloat16", "vae": "bfloat16"}
    else:
        dtypes = dict.fromkeys(COMPONENTS, wanted)
    if video:  # the SANA-Video card runs its Wan VAE in fp32 whatever the transformer's dtype
        dtypes["vae"] = "float32"
    return dtypes


def fp8_refusal(dtypes: dict[str, str]) -> str | None:
    """Why --fp8 cannot run with these dtypes (torchao's per-row float8 needs bf16 transformer weights)."""
    if dtypes["transformer"] == "bfloat16":
        return None
    return f"--fp8 needs the transformer in bf16, not {dtypes['transformer']}"
