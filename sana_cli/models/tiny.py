"""The built-in tiny models as data: their component configs and where they live. Torch-free; the
engine builds them (engine/tiny_build.py)."""

from __future__ import annotations

from pathlib import Path

from ..cache import cache_root

VERSION = "v1"  # bump when the recipe changes, so stale caches are not reused
VARIANTS = ("sana", "sprint", "teacher", "video")
CONTROLNET = "controlnet"  # a SanaControlNetModel matching the tiny Sana transformer (a model, not a pipeline)


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


# SANA-Video: a 3-D transformer over the Wan VAE's latents (16 channels, 4x in time, 8x in space, patches of
# 1x2x2), fed by the same tiny Gemma. The VAE is the smallest AutoencoderKLWan with the real one's factors.
VIDEO_TRANSFORMER_CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=8,
    mlp_ratio=2.5, sample_size=30, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
VIDEO_VAE_CONFIG = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                        temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=8)


def tiny_path(variant: str) -> Path:
    return cache_root() / f"tiny-{VERSION}" / variant


def transformer_config(variant: str) -> dict:
    """The tiny transformer's config for a variant (what build() makes), without torch."""
    if variant == "video":
        return dict(VIDEO_TRANSFORMER_CONFIG)
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
