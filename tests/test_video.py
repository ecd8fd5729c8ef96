"""`sana video`: the tiny SANA-Video model, planning (frames and sizes against the VAE's factors), the
pipeline calls against diffusers' own, and the MP4 / WebM files read back by PyAV."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def video_model(tiny_models):
    """The tiny SANA-Video model loaded through the loader `sana video` uses."""
    from sana_cli.engine.loading import load
    from sana_cli.models import modelref
    from sana_cli.planning.plan import LoadOptions

    return load(modelref.resolve("tiny-video"), LoadOptions(device="cpu"))


def test_tiny_video_model_loads_and_makes_frames(video_model, tiny_models):
    """The tiny model is a real SanaVideoPipeline (3-D transformer, Wan VAE, tiny Gemma) saved with
    save_pretrained; loaded by the loader, a plain pipeline call on it gives frames of the size asked."""
    import torch
    from diffusers import AutoencoderKLWan, SanaVideoPipeline, SanaVideoTransformer3DModel

    assert (tiny_models["video"] / "model_index.json").is_file()
    pipe = video_model.pipe
    assert isinstance(pipe, SanaVideoPipeline)
    assert isinstance(pipe.transformer, SanaVideoTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert video_model.ref.is_video
    frames = pipe(prompt="a cat running", height=64, width=96, frames=9, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(1), use_resolution_binning=False, output_type="np").frames
    assert frames.shape == (1, 9, 64, 96, 3)
    assert np.isfinite(frames).all() and frames.std() > 0.01
    assert not np.array_equal(frames[0, 0], frames[0, 8])  # frames differ over time
