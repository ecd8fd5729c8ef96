"""Write random-weight Sana checkpoints with the published configs, as diffusers directories.

    python bench/make_checkpoints.py --out bench/checkpoints/full --models 4k,1024,sprint --scale full
    python bench/make_checkpoints.py --out /tmp/ckpt-tiny --scale tiny

Each model directory is written with `save_pretrained` (model_index.json, one folder per
component), so loading goes through `from_pretrained` exactly as for the real hub repositories:

    OUT/sana-1600m-4k      SanaPipeline        variant "bf16"   (Sana_1600M_4Kpx_BF16_diffusers)
    OUT/sana-1600m-1024    SanaPipeline        variant "bf16"   (Sana_1600M_1024px_BF16_diffusers)
    OUT/sana-sprint-1.6b   SanaSprintPipeline  no variant       (Sana_Sprint_1.6B_1024px_diffusers)

The text encoder (Gemma-2 2B), the DC-AE and the tokenizer are the same in every model, as in the
real repositories (up to DC-AE 1.0 vs 1.1, which share one architecture), so they are written once
under OUT/components/ and each model links to them. A shared component holds its weights under
the variant name (`model.bf16.safetensors`) plus a plain-name symlink to the same file, so both
`from_pretrained(dir, variant="bf16")` and `from_pretrained(dir)` (Sprint) find them.

Weights: random, in bf16, materialised fast (modules are built on the meta device, then each
parameter is filled in place): linear and embedding weights N(0, 0.02), conv weights N(0, 1/(3 fan_in))
(the spread of torch's default init), biases 0, norm weights 1 (Gemma's RMSNorm, which scales by
1 + w, gets 0), scale_shift_table N(0, 1/dim) as diffusers initialises it. The magnitudes keep every
activation finite in bf16 (`--check` runs each model on a small input to show it).

The tokenizer is not Gemma's (no hub here): it is sana_cli.engine.tiny_build's word-level tokenizer, trained
in-process. Prompt token counts therefore differ from Gemma's SentencePiece, so text-encode time
is approximate; the embedding table still has Gemma's 256000 rows.

`--scale tiny` writes the same three models with tiny widths (as sana_cli.engine.tiny_build), for the CI smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmark this checkout's sana_cli, not an installed copy

from sana_cli.models import tiny  # noqa: E402 - after the path fix above; torch-free at import

SEED = 20260101
MODEL_KEYS = ("4k", "1024", "sprint")
SHARED = ("tokenizer", "text_encoder", "vae")

# ---- configs -------------------------------------------------------------------------------------

# SanaTransformer2DModel, 1600M (its hub config.json): 70 heads x 32, 20 layers, cross 20 x 112 = 2240, caption 2304.
TRANSFORMER_1600M = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, dropout=0.0, attention_bias=False, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6)
TRANSFORMER_TINY = {k: v for k, v in tiny.TRANSFORMER_CONFIG.items() if k != "sample_size"}

# Gemma-2 2B (google/gemma-2-2b): the Sana text encoder is its Gemma2Model.
GEMMA2_2B = dict(
    hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    intermediate_size=9216, vocab_size=256000, max_position_embeddings=8192, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=10000.0,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.02)
GEMMA2_TINY = tiny.GEMMA2_CONFIG  # vocab_size is set to the tokenizer's length

# DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers, its hub config.json).
DCAE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
DCAE_TINY = tiny.VAE_CONFIG  # two local ResBlock stages and an attention stage (ratio 4)

FLOW_DPM = tiny.FLOW_DPM_CONFIG  # the hub scheduler_config.json of the Sana repos


@dataclass(frozen=True)
class ModelSpec:
    key: str
    directory: str
    pipeline: str  # diffusers class name
    variant: str | None
    transformer: dict
    scheduler: str  # "dpm" or "scm"
    flow_shift: float | None = None
    hub_repo: str = ""
    notes: tuple[str, ...] = field(default=())


MODELS = {
    "4k": ModelSpec("4k", "sana-1600m-4k", "SanaPipeline", "bf16",
                    dict(sample_size=128, interpolation_scale=2.0), "dpm", flow_shift=6.0,
                    hub_repo="Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers"),
    "1024": ModelSpec("1024", "sana-1600m-1024", "SanaPipeline", "bf16",
                      dict(sample_size=32, interpolation_scale=None), "dpm", flow_shift=3.0,
                      hub_repo="Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers"),
    "sprint": ModelSpec("sprint", "sana-sprint-1.6b", "SanaSprintPipeline", None,
                        dict(sample_size=32, interpolation_scale=None, qk_norm="rms_norm_across_heads",
                             guidance_embeds=True, guidance_embeds_scale=0.1, timestep_scale=1.0), "scm",
                        hub_repo="Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers"),
}


def model_dir(out: str | Path, key: str) -> Path:
    return Path(out) / MODELS[key].directory


# ---- fast random init -----------------------------------------------------------------------------

def _init_value(module, name: str, shape, dtype, device, generator):
    """A freshly initialised tensor for parameter `name` of `module` (see the module docstring)."""
    import torch
    from torch import nn

    value = torch.empty(shape, dtype=dtype, device=device)
    kind = type(module).__name__
    if kind == "Gemma2RMSNorm":  # output = x * (1 + weight)
        return value.zero_()
    if "Norm" in kind:
        return value.fill_(1.0) if name == "weight" else value.zero_()
    if name == "bias":
        return value.zero_()
    if name == "scale_shift_table":
        return value.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=generator)
    if isinstance(module, nn.Conv2d) and name == "weight":
        fan_in = shape[1] * shape[2] * shape[3]
        return value.normal_(0.0, 1.0 / math.sqrt(3.0 * fan_in), generator=generator)
    if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
        return value.normal_(0.0, 0.02, generator=generator)
    raise TypeError(f"no init rule for {kind}.{name} {tuple(shape)}")


def materialise(model, *, seed: int, dtype, device: str = "cpu"):
    """Replace every meta parameter of `model` with a random `dtype` tensor drawn on `device` and kept
    on the CPU. Buffers (rotary frequencies, positional tables) were computed at construction and
    stay as they are; none of them is saved."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                value = _init_value(module, name, param.shape, dtype, device, generator)
                module._parameters[name] = torch.nn.Parameter(value.cpu(), requires_grad=False)
    return model.eval()


def build_component(cls, config: dict, *, seed: int, dtype, device: str = "cpu", config_class=None,
                    empty: bool = False):
    """cls(**config) (or cls(config_class(**config)) for transformers models) with random weights
    (or, with empty, left on the meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers (rotary, pos-embed) computed for real
        model = cls(config_class(**config)) if config_class is not None else cls(**config)
    return model if empty else materialise(model, seed=seed, dtype=dtype, device=device)


def tokenizer():
    from sana_cli.engine.tiny_build import _tokenizer

    return _tokenizer()


def text_encoder(scale: str, vocab_size: int, *, dtype, device: str = "cpu", empty: bool = False):
    from transformers import Gemma2Config, Gemma2Model

    config = dict(GEMMA2_2B) if scale == "full" else dict(GEMMA2_TINY, vocab_size=vocab_size)
    return build_component(Gemma2Model, config, seed=SEED + 1, dtype=dtype, device=device, config_class=Gemma2Config,
                           empty=empty)


def vae(scale: str, *, dtype, device: str = "cpu", empty: bool = False):
    from diffusers import AutoencoderDC

    return build_component(AutoencoderDC, DCAE_F32C32 if scale == "full" else DCAE_TINY, seed=SEED + 2,
                           dtype=dtype, device=device, empty=empty)


def transformer(spec: ModelSpec, scale: str, *, dtype, device: str = "cpu"):
    from diffusers import SanaTransformer2DModel

    base = TRANSFORMER_1600M if scale == "full" else TRANSFORMER_TINY
    seed = SEED + 10 + MODEL_KEYS.index(spec.key)
    return build_component(SanaTransformer2DModel, {**base, **spec.transformer}, seed=seed, dtype=dtype,
                           device=device)


def scheduler(spec: ModelSpec):
    from diffusers import DPMSolverMultistepScheduler, SCMScheduler

    if spec.scheduler == "scm":
        return SCMScheduler(prediction_type="trigflow", sigma_data=0.5)
    return DPMSolverMultistepScheduler(**FLOW_DPM, flow_shift=spec.flow_shift)


# ---- writing --------------------------------------------------------------------------------------

def _add_plain_names(directory: Path, variant: str) -> None:
    """Give every `name.<variant>.ext` file a plain-name symlink, for loads without a variant."""
    for path in sorted(directory.iterdir()):
        marker = f".{variant}."
        if marker in path.name:
            plain = directory / path.name.replace(marker, ".")
            if not plain.exists():
                plain.symlink_to(path.name)


def _save(model, directory: Path, variant: str | None) -> None:
    kwargs = dict(variant=variant, max_shard_size="50GB")  # one file per component, as small repos have
    model.save_pretrained(directory, **kwargs)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build(out: str | Path, models=MODEL_KEYS, scale: str = "full", *, device: str = "cpu", force: bool = False,
          log=print) -> dict:
    """Write the requested model directories (and the shared components) under `out`. Existing
    complete directories are kept unless force. Returns the manifest (also written to out/manifest.json)."""
    import diffusers
    import torch
    import transformers

    if scale not in ("full", "tiny"):
        raise ValueError(f"scale must be full or tiny, not {scale!r}")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_KEYS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("scale", scale) != scale:
        raise ValueError(f"{out} holds {manifest['scale']} checkpoints; use another --out for {scale}")
    manifest.update(scale=scale, seed=SEED, dtype="bfloat16", init_device=device,
                    versions={"torch": torch.__version__, "diffusers": diffusers.__version__,
                              "transformers": transformers.__version__})
    manifest.setdefault("models", {})
    dtype = torch.bfloat16
    components = out / "components"
    todo = [m for m in models if force or not (model_dir(out, m) / "model_index.json").is_file()]
    if not todo:
        log(f"make_checkpoints: {', '.join(models)} already in {out}")
        return manifest

    started = time.perf_counter()
    tok = tokenizer()
    shared = {"tokenizer": tok}
    if force or not (components / "done").is_file():
        if components.exists():
            shutil.rmtree(components)
        components.mkdir(parents=True)
        log(f"make_checkpoints: text encoder ({scale})")
        shared["text_encoder"] = text_encoder(scale, len(tok), dtype=dtype, device=device)
        log(f"make_checkpoints: DC-AE ({scale})")
        shared["vae"] = vae(scale, dtype=dtype, device=device)
        tok.save_pretrained(components / "tokenizer")
        for name in ("text_encoder", "vae"):
            _save(shared[name], components / name, "bf16")
            _add_plain_names(components / name, "bf16")
        (components / "done").write_text("complete\n")
    else:  # reuse the written components; model_index.json needs only their classes
        shared["text_encoder"] = text_encoder(scale, len(tok), dtype=dtype, empty=True)
        shared["vae"] = vae(scale, dtype=dtype, empty=True)

    for key in todo:
        spec = MODELS[key]
        target = model_dir(out, key)
        log(f"make_checkpoints: {target.name} ({spec.pipeline}, {scale})")
        if target.exists():
            shutil.rmtree(target)
        staging = target.with_name(f".{target.name}.partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        model = transformer(spec, scale, dtype=dtype, device=device)
        _save(model, staging / "transformer", spec.variant)
        sched = scheduler(spec)
        sched.save_pretrained(staging / "scheduler")
        for name in SHARED:
            (staging / name).symlink_to(Path("..") / "components" / name, target_is_directory=True)
        cls = getattr(diffusers, spec.pipeline)
        pipe = cls(tokenizer=tok, text_encoder=shared["text_encoder"], vae=shared["vae"], transformer=model,
                   scheduler=sched)
        pipe.save_config(staging)  # model_index.json, exactly as DiffusionPipeline.save_pretrained writes it
        del pipe, model
        os.rename(staging, target)
        manifest["models"][key] = {"directory": target.name, "pipeline": spec.pipeline, "variant": spec.variant,
                                   "stands_in_for": spec.hub_repo, "transformer": {**spec.transformer},
                                   "flow_shift": spec.flow_shift, "scheduler": type(sched).__name__,
                                   "transformer_bytes": _dir_bytes(target / "transformer")}
    manifest["component_bytes"] = {name: _dir_bytes(components / name) for name in SHARED}
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"make_checkpoints: done in {manifest['build_seconds']} s -> {out}")
    return manifest


# ---- checking -------------------------------------------------------------------------------------

def check(out: str | Path, models=MODEL_KEYS, log=print) -> dict:
    """Load each model dir with from_pretrained (variant as the real repo) on the CPU and run every
    component on a small input in bf16; every output must be finite. Returns per-model stats."""
    import diffusers
    import torch

    stats = {}
    for key in models:
        spec = MODELS[key]
        kwargs = {"torch_dtype": torch.bfloat16}
        if spec.variant:
            kwargs["variant"] = spec.variant
        started = time.perf_counter()
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(model_dir(out, key), **kwargs)
        load_seconds = time.perf_counter() - started
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt("a cat", device="cpu", complex_human_instruction=None,
                                              max_sequence_length=16, **({} if spec.variant is None else
                                                                          {"do_classifier_free_guidance": False}))[:2]
            channels = pipe.transformer.config.in_channels
            latents = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
            t = torch.tensor([500.0])
            extra = {"guidance": torch.tensor([4.5])} if pipe.transformer.config.guidance_embeds else {}
            noise = pipe.transformer(latents, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                     timestep=t, return_dict=False, **extra)[0]
            image = pipe.vae.decode(latents[:, :pipe.vae.config.latent_channels] / pipe.vae.config.scaling_factor,
                                    return_dict=False)[0]
        entry = {"load_seconds": round(load_seconds, 1)}
        for name, tensor in (("text_encoder", embeds), ("transformer", noise), ("vae", image)):
            tensor = tensor.float()
            entry[name] = {"finite": bool(torch.isfinite(tensor).all()), "std": round(tensor.std().item(), 4),
                           "absmax": round(tensor.abs().max().item(), 4)}
        stats[key] = entry
        log(f"check {key}: {json.dumps(entry)}")
        del pipe
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "checkpoints" / "full"),
                        help="where to write (default bench/checkpoints/full, git-ignored)")
    parser.add_argument("--models", default=",".join(MODEL_KEYS), help="comma list of 4k,1024,sprint")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cpu",
                        help="where to draw the random weights (cuda is much faster); they are saved from the CPU")
    parser.add_argument("--force", action="store_true", help="rewrite directories that already exist")
    parser.add_argument("--check", action="store_true",
                        help="afterwards, load each model with from_pretrained and check its outputs are finite")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    build(args.out, models, args.scale, device=args.device, force=args.force)
    if args.check:
        stats = check(args.out, models)
        if not all(v["finite"] for entry in stats.values() for k, v in entry.items() if isinstance(v, dict)):
            print("make_checkpoints: non-finite outputs", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
