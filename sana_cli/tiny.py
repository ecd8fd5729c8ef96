"""The built-in tiny model: real diffusers Sana pipelines made of tiny random components.

Built deterministically offline (fixed seeds, a word-level tokenizer trained in-process), saved
once with `save_pretrained` under the user cache, and then loaded through the same
`from_pretrained` path as a hub model. Its images are noise-like: it exists so that every code
path (Sana, PAG, Sprint, the Sprint-teacher config, decoding, writing) runs on a CPU in seconds.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

from .cache import cache_root

VERSION = "v1"  # bump when the recipe changes, so stale caches are not reused
VARIANTS = ("sana", "sprint", "teacher")
CONTROLNET = "controlnet"  # a SanaControlNetModel matching the tiny Sana transformer (a model, not a pipeline)

# Words the tokenizer knows (anything else maps to <unk>). Prompts in tests and examples use them.
_WORD_TEXT = """a an the of and with in on at to for from by is are this that it its as or
cat dog fox panda bird fish horse cyberpunk neon sign city street night day sky sea mountain forest
tree flower river lake snow rain sun moon star cloud light dark red green blue yellow white black
orange purple pink gold silver cute small big old new beautiful portrait photo painting drawing ink
style art digital cinematic lighting detailed high quality eating bamboo sitting standing running
flying under over near inside outside house castle car robot astronaut space planet ocean beach
desert garden window door table cup coffee book girl boy man woman face eyes hair hat wearing
that says sana hello world"""
_WORDS = _WORD_TEXT.split()


# The tiny components (bench/make_checkpoints.py --scale tiny builds its models from these too).
GEMMA2_CONFIG = dict(head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64,
                     max_position_embeddings=8192, num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2)
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
    num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=32)
# Three decoder stages (two ResBlock stages, one attention stage) so the strip decoder has a real
# high-resolution tail to split, as in the full DC-AE.
VAE_CONFIG = dict(
    in_channels=3, latent_channels=4, attention_head_dim=2,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
    upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
# Flow-DPM-Solver: the scheduler_config.json of the Sana hub repos (flow_shift is per model).
FLOW_DPM_CONFIG = dict(
    algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="flow_prediction",
    use_flow_sigmas=True, final_sigmas_type="zero", lower_order_final=True, timestep_spacing="linspace",
    num_train_timesteps=1000)


def tiny_path(variant: str) -> Path:
    return cache_root() / f"tiny-{VERSION}" / variant


def ensure(variant: str) -> Path:
    """The directory of a tiny model, building it the first time. Safe when several processes
    race: each builds in its own temp dir and only one rename wins."""
    if variant not in (*VARIANTS, CONTROLNET):
        raise ValueError(f"unknown tiny variant {variant!r}")
    final = tiny_path(variant)
    marker = "config.json" if variant == CONTROLNET else "model_index.json"
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{variant}.build-", dir=final.parent))
    try:
        build(variant, staging)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def transformer_config(variant: str) -> dict:
    """The tiny transformer's config for a variant (what build() makes), without torch."""
    config = dict(TRANSFORMER_CONFIG)
    if variant == "sprint":
        config.update(qk_norm="rms_norm_across_heads", guidance_embeds=True, guidance_embeds_scale=0.1)
    elif variant == "teacher":
        # The Sprint teacher: qk_norm and a dense timestep embedding fed t in [0, 1] (timestep_scale).
        config.update(qk_norm="rms_norm_across_heads", timestep_scale=0.001)
    return config


def controlnet_config() -> dict:
    """A SanaControlNetModel config with the tiny Sana transformer's sizes and one block."""
    keys = ("in_channels", "num_attention_heads", "attention_head_dim", "num_cross_attention_heads",
            "cross_attention_head_dim", "cross_attention_dim", "caption_channels", "sample_size", "patch_size")
    return {**{key: TRANSFORMER_CONFIG[key] for key in keys}, "out_channels": TRANSFORMER_CONFIG["out_channels"],
            "num_layers": 1}


def build_controlnet(directory: str | Path):
    """The tiny ControlNet, saved to directory. diffusers zero-initialises a ControlNet's input and output
    projections (a fresh one changes nothing); here they get small random weights, as training gives them,
    so the control image really changes the pixels."""
    import torch
    from diffusers import SanaControlNetModel

    torch.manual_seed(0)
    model = SanaControlNetModel(**controlnet_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (model.input_block, *model.controlnet_blocks):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
    model.save_pretrained(directory)
    return model


def build_lora(directory: str | Path, *, variant: str = "sana", seed: int = 1, rank: int = 2,
               targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """A LoRA for a tiny transformer, made with peft and saved with diffusers' save_lora_weights (the
    format a trained Sana LoRA has). Its lora_B is random, not zero as a fresh one's, so it changes pixels.
    Returns the weights file."""
    import torch
    from diffusers import SanaPipeline, SanaTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(**transformer_config(variant))
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False))
    SanaPipeline.save_lora_weights(str(directory), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return Path(directory) / "pytorch_lora_weights.safetensors"


def build(variant: str, directory: str | Path):
    """Build a tiny pipeline of the given variant and save it to directory; returns the pipeline."""
    if variant == CONTROLNET:
        return build_controlnet(directory)
    import torch
    from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaSprintPipeline,
                           SanaTransformer2DModel, SCMScheduler)
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(**GEMMA2_CONFIG, vocab_size=len(tokenizer), attn_implementation="eager"))
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(**transformer_config(variant))
    torch.manual_seed(0)
    vae = AutoencoderDC(**VAE_CONFIG)
    if variant == "sprint":
        scheduler = SCMScheduler(prediction_type="trigflow", sigma_data=0.5)
        pipeline = SanaSprintPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                      transformer=transformer, scheduler=scheduler)
    else:
        scheduler = DPMSolverMultistepScheduler(**FLOW_DPM_CONFIG, flow_shift=3.0)
        pipeline = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                transformer=transformer, scheduler=scheduler)
    pipeline.save_pretrained(directory)
    return pipeline


def _tokenizer():
    """A word-level tokenizer trained in-process on a fixed corpus (the CHI text plus _WORDS)."""
    from diffusers import SanaPipeline
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default or []
    corpus = [" ".join(_WORDS)] + list(chi)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
