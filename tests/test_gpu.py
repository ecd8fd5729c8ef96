"""CUDA paths: bf16 loading, the 4096 decode helper, --size 4096, PAG, Sprint, the memory plan and the
optimised modes against the default. Skipped without CUDA (CI has none); run with `pytest -m gpu` on a
GPU machine.

Full-size checks use random-weight checkpoints with the published configs, made by
`python bench/make_checkpoints.py --out DIR --scale full`; point SANA_TEST_CHECKPOINTS at DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import full_size_dcae

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CHECKPOINTS = Path(os.environ["SANA_TEST_CHECKPOINTS"]) if os.environ.get("SANA_TEST_CHECKPOINTS") else None
needs_checkpoints = pytest.mark.skipif(CHECKPOINTS is None or not CHECKPOINTS.is_dir(),
                                       reason="set SANA_TEST_CHECKPOINTS to bench/make_checkpoints.py output")
PROMPT = "a cyberpunk cat with a neon sign"
GiB = 2**30


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tiny_on_cuda_matches_a_direct_diffusers_call_in_bf16(tiny_dir, tmp_path):
    import sana_cli
    from diffusers import SanaPipeline

    result = sana_cli.generate(PROMPT, model=str(tiny_dir), seed=4, steps=3, output=str(tmp_path / "a.png"),
                               dtype="bf16")
    assert result.model["device"] == "cuda" and result.model["dtype"] == "bfloat16"
    pipe = SanaPipeline.from_pretrained(str(tiny_dir), dtype=torch.bfloat16).to("cuda")
    expected = pipe(prompt=PROMPT, num_inference_steps=3, height=128, width=128, guidance_scale=4.5,
                    generator=torch.Generator("cuda").manual_seed(4), use_resolution_binning=False).images[0]
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(expected))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sprint_on_cuda(tiny_models, tmp_path, steps):
    import sana_cli

    result = sana_cli.generate(PROMPT, model=str(tiny_models["sprint"]), seed=1, steps=steps,
                               output=str(tmp_path / "s.png"))
    assert result.images[0].ok and pixels(tmp_path / "s.png").std() > 0


def test_pag_on_cuda_changes_the_image(tiny_dir, tmp_path):
    import sana_cli

    plain = sana_cli.generate(PROMPT, model=str(tiny_dir), seed=2, output=str(tmp_path / "p0.png"))
    pag = sana_cli.generate(PROMPT, model=str(tiny_dir), seed=2, pag_scale=2.0, pag_layers="transformer_blocks.1",
                            output=str(tmp_path / "p2.png"))
    assert plain.images[0].ok and pag.images[0].ok
    assert not np.array_equal(pixels(tmp_path / "p0.png"), pixels(tmp_path / "p2.png"))


@pytest.fixture(scope="module")
def full_vae_bf16():
    return full_size_dcae().to("cuda", torch.bfloat16)


def _decode_peak(vae, z, strategy, **kwargs):
    from sana_cli.engine import vae as decode

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        result = decode.decode(vae, z, strategy, **kwargs)
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


def test_4096_decode_helper_strips_and_patch_conv_against_full(full_vae_bf16):
    """The 4096x4096 decode: strips within PSNR 40 dB of a full decode in bf16 at a quarter of its peak
    memory or less; patch_conv equal to full within the same tolerance."""
    z = torch.randn(1, 32, 128, 128, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    full, full_peak = _decode_peak(full_vae_bf16, z, "full")
    strips, strips_peak = _decode_peak(full_vae_bf16, z, "strips", strip_rows=64)
    patched, _ = _decode_peak(full_vae_bf16, z, "patch-conv")

    def to_uint8(t):
        return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()

    reference = to_uint8(full.image)
    assert strips.strategy == "strips:64" and patched.strategy == "patch-conv:32"
    assert psnr(to_uint8(strips.image), reference) >= 40
    assert psnr(to_uint8(patched.image), reference) >= 40
    assert strips_peak <= full_peak / 4, (strips_peak / GiB, full_peak / GiB)


def test_auto_decode_uses_strips_when_memory_is_short(full_vae_bf16):
    from sana_cli.engine import vae as decode

    z = torch.randn(1, 32, 128, 128).to("cuda", torch.bfloat16)
    result = decode.decode(full_vae_bf16, z, "auto", free_bytes=6 * GiB)
    assert result.strategy.startswith("strips:")


def test_text_encoder_is_released_after_encoding_in_one_shot_runs(tiny_dir, tmp_path):
    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import load
    from sana_cli.planning.plan import Request, plan_generate
    from sana_cli.engine.runner import run

    loaded = load(resolve(str(tiny_dir)))
    plan = plan_generate(Request(prompt=PROMPT, seed=1, output=str(tmp_path) + "/"), loaded.ref)
    run(plan, loaded, keep_text_encoder=False)
    assert loaded.text_encoder_freed
    assert all(p.device.type == "meta" for p in loaded.pipe.text_encoder.parameters())


@needs_checkpoints
def test_size_4096_end_to_end_with_the_full_size_4k_config(tmp_path, sana):
    model = CHECKPOINTS / "sana-1600m-4k"
    # Without a cap, auto uses what the card has (a full decode on an 80 GB card); the 12 GiB target is
    # what --max-memory 12 guarantees on any card.
    process = sana("generate", PROMPT, "--model", model, "--size", 4096, "--steps", 2, "--seed", 1, "-o",
                   tmp_path / "4k.png", "--max-memory", 12, "--json", check_json=True, timeout=900)
    assert process.returncode == 0, process.stderr
    image = process.json["images"][0]
    assert (image["width"], image["height"]) == (4096, 4096) and Image.open(tmp_path / "4k.png").size == (4096, 4096)
    assert process.json["model"]["dtype"] == "bfloat16"
    assert process.json["peak_memory_bytes"] <= process.json["peak_reserved_bytes"] <= 12 * GiB, \
        (process.json["peak_memory_bytes"] / GiB, process.json["peak_reserved_bytes"] / GiB)


@needs_checkpoints
def test_low_memory_mode_keeps_4096_under_8_gib(tmp_path, sana):
    process = sana("generate", PROMPT, "--model", CHECKPOINTS / "sana-1600m-4k", "--size", 4096, "--steps", 2,
                   "--seed", 1, "--low-memory", "-o", tmp_path / "low.png", "--json", check_json=True, timeout=900)
    assert process.returncode == 0, process.stderr
    assert process.json["images"][0]["decode"].startswith("strips:")
    assert process.json["peak_reserved_bytes"] <= 8 * GiB, process.json["peak_reserved_bytes"] / GiB


@needs_checkpoints
def test_pag_scale_2_with_the_full_size_1024_config(tmp_path, sana):
    process = sana("generate", PROMPT, "--model", CHECKPOINTS / "sana-1600m-1024", "--pag-scale", 2, "--guidance", 5,
                   "--steps", 4, "--seed", 1, "-o", tmp_path / "pag.png", "--json", check_json=True, timeout=900)
    assert process.returncode == 0, process.stderr
    assert process.json["images"][0]["pag_scale"] == 2.0


@needs_checkpoints
@pytest.mark.parametrize("mode", ["compile", "fp8"])
def test_speed_modes_stay_close_to_the_default(tmp_path, mode):
    import sana_cli

    model = str(CHECKPOINTS / "sana-1600m-1024")
    default = sana_cli.load(model).generate(PROMPT, seed=7, steps=8, output=str(tmp_path / "default.png"))
    if mode == "fp8":
        pytest.importorskip("torchao")
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("fp8 needs compute capability 8.9+")
    session = sana_cli.load(model, compile=mode == "compile", fp8=mode == "fp8")
    fast = session.generate(PROMPT, seed=7, steps=8, output=str(tmp_path / f"{mode}.png"))
    assert default.images[0].ok and fast.images[0].ok
    value = psnr(pixels(tmp_path / f"{mode}.png"), pixels(tmp_path / "default.png"))
    assert value >= (35 if mode == "compile" else 25), value


# ---- --quantize on CUDA ---------------------------------------------------------------------------------

def test_int8_on_cuda_matches_diffusers_and_offload_keeps_the_pixels(tiny_dir, tmp_path):
    """int8 weights quantized on the CPU as they load, then moved to the GPU (or moved in and out by the CPU
    offload of --low-memory): the pixels of diffusers and torchao called directly, the same under offload."""
    import sana_cli
    from diffusers import SanaPipeline, TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_, swap_conv2d_1x1_to_linear

    made = sana_cli.generate(PROMPT, model=str(tiny_dir), seed=4, steps=3, dtype="bf16", quantize="int8",
                             output=str(tmp_path / "int8.png"))
    assert made.model["device"].startswith("cuda")
    offloaded = sana_cli.generate(PROMPT, model=str(tiny_dir), seed=4, steps=3, dtype="bf16", quantize="int8",
                                  low_memory=True, decode="full", output=str(tmp_path / "int8-low.png"))
    assert offloaded.images[0].ok
    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = SanaPipeline.from_pretrained(str(tiny_dir), dtype=torch.bfloat16, quantization_config=config)
    swap_conv2d_1x1_to_linear(pipe.transformer, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Conv2d)
                              and m.kernel_size == (1, 1) and fqn.startswith("transformer_"))
    quantize_(pipe.transformer, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.endswith(".mod"))
    pipe.to("cuda")
    expected = pipe(prompt=PROMPT, num_inference_steps=3, height=128, width=128, guidance_scale=4.5,
                    generator=torch.Generator("cuda").manual_seed(4), use_resolution_binning=False).images[0]
    assert np.array_equal(pixels(tmp_path / "int8.png"), np.asarray(expected))
    assert np.array_equal(pixels(tmp_path / "int8-low.png"), pixels(tmp_path / "int8.png"))


def test_nf4_on_cuda_runs_and_stays_near_bf16(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import sana_cli

    sana_cli.generate(PROMPT, model=str(tiny_dir), seed=5, steps=3, dtype="bf16", output=str(tmp_path / "b.png"))
    nf4 = sana_cli.generate(PROMPT, model=str(tiny_dir), seed=5, steps=3, dtype="bf16", quantize="nf4",
                            output=str(tmp_path / "n.png"))
    assert nf4.images[0].ok
    assert psnr(pixels(tmp_path / "n.png"), pixels(tmp_path / "b.png")) >= 20


@needs_checkpoints
def test_int8_low_memory_4096_within_8_gib(tmp_path, sana):
    """The small-card workload (bench/quantize_gpu.py runs it with 20 steps and a bf16 comparison)."""
    process = sana("generate", PROMPT, "--model", CHECKPOINTS / "sana-1600m-4k", "--size", 4096, "--steps", 2,
                   "--seed", 1, "--low-memory", "--quantize", "int8", "-o", tmp_path / "int8.png", "--json",
                   check_json=True, timeout=900)
    assert process.returncode == 0, process.stderr
    assert process.json["peak_memory_bytes"] <= 8 * GiB, process.json["peak_memory_bytes"] / GiB
