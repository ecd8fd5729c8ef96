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

from ..models.tiny import (
    CONTROLNET,
    FLOW_DPM_CONFIG,
    GEMMA2_CONFIG,
    VAE_CONFIG,
    VARIANTS,
    VIDEO_VAE_CONFIG,
    controlnet_config,
    tiny_path,
    transformer_config,
)

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
    if variant == "video":
        return build_video(directory)
    import torch
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaSprintPipeline,
        SanaTransformer2DModel,
        SCMScheduler,
    )
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


def build_video(directory: str | Path):
    """The tiny SANA-Video pipeline (SanaVideoPipeline: 3-D transformer, Wan VAE, the tiny Gemma and
    tokenizer), saved to directory. Image-to-video uses the same components (SanaImageToVideoPipeline)."""
    import torch
    from diffusers import AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(**GEMMA2_CONFIG, vocab_size=len(tokenizer), attn_implementation="eager"))
    torch.manual_seed(0)
    transformer = SanaVideoTransformer3DModel(**transformer_config("video"))
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VIDEO_VAE_CONFIG)
    scheduler = DPMSolverMultistepScheduler(**FLOW_DPM_CONFIG, flow_shift=8.0)
    pipeline = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=scheduler)
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
