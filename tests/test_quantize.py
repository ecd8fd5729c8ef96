"""--quantize on the tiny model: int8 pixels equal diffusers loading the same torchao config, stay near the
unquantized image, and really hold int8 weights; the CUDA-only nf4 path and a missing backend are decided
on this CPU; the key and metadata record the option only when it is used."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import sana_cli
from sana_cli.engine import quantize as quantizing
from sana_cli.errors import EXIT_ENVIRONMENT, EnvironmentProblem
from sana_cli.engine.loading import weights_bytes
from sana_cli.planning.plan import LoadOptions, PixelOptions, Request, model_for, plan_generate

from .conftest import one_line_error

PROMPT = "a red fox sitting in the snow"
SEED, STEPS, SIZE = 11, 3, 128


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _diffusers_int8(model_dir) -> np.ndarray:
    """The same image from diffusers and torchao directly: the pipeline loaded with diffusers' TorchAoConfig
    (Int8WeightOnlyConfig) for the transformer, then torchao's own swap of the blocks' 1x1 convolutions to
    Linear layers, quantized with the same config."""
    from diffusers import SanaPipeline, TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_, swap_conv2d_1x1_to_linear

    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = SanaPipeline.from_pretrained(str(model_dir), dtype=torch.bfloat16, quantization_config=config)
    pipe.set_progress_bar_config(disable=True)

    def pointwise(module, fqn):
        return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and fqn.startswith("transformer_")

    swap_conv2d_1x1_to_linear(pipe.transformer, filter_fn=pointwise)
    quantize_(pipe.transformer, Int8WeightOnlyConfig(),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn.endswith(".mod"))
    image = pipe(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=4.5,
                 generator=torch.Generator("cpu").manual_seed(SEED), use_resolution_binning=False).images[0]
    return np.asarray(image)


def test_int8_equals_diffusers_with_the_same_torchao_config_and_stays_near_bf16(tiny_dir, tmp_path):
    int8 = sana_cli.load(str(tiny_dir), device="cpu", dtype="bf16", quantize="int8")
    made = int8.generate(PROMPT, seed=SEED, steps=STEPS, output=str(tmp_path / "int8.png"))
    plain = sana_cli.load(str(tiny_dir), device="cpu", dtype="bf16")
    plain.generate(PROMPT, seed=SEED, steps=STEPS, output=str(tmp_path / "bf16.png"))
    quantized, reference = _pixels(tmp_path / "int8.png"), _pixels(tmp_path / "bf16.png")

    assert np.array_equal(quantized, _diffusers_int8(tiny_dir))
    assert not np.array_equal(quantized, reference)  # the weights really changed
    assert _psnr(quantized, reference) > 30, _psnr(quantized, reference)  # 40-42 dB measured (bench/)

    transformer = int8.loaded.pipe.transformer
    linear = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear and all(type(m.weight).__name__ == "Int8Tensor" and m.weight.qdata.dtype == torch.int8
                          for m in linear.values())
    assert all(m.weight.dtype == torch.bfloat16 for m in linear.values())  # the compute dtype is the preset's
    pointwise = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
                 and n.startswith("transformer_blocks.")]
    assert pointwise == []  # the feed-forward's 1x1 convolutions are int8 Linear layers now
    assert any(n.endswith("ff.conv_inverted.mod") for n in linear)
    for name in ("text_encoder", "vae"):  # the VAE and Gemma stay as loaded
        assert quantizing.quantized_modules(getattr(int8.loaded.pipe, name)) == {}
    assert quantizing.module_bytes(transformer) < 0.75 * quantizing.module_bytes(plain.loaded.pipe.transformer)
    saved = quantizing.module_bytes(plain.loaded.pipe.transformer) - quantizing.module_bytes(transformer)
    assert weights_bytes(plain.loaded.pipe) - weights_bytes(int8.loaded.pipe) == saved  # what --max-memory plans by
    assert made.images[0].job.pixels.quantize == "int8"


def test_the_key_and_metadata_name_quantize_only_when_it_is_used():
    request = Request(prompt="a cat", model="tiny", seed=1, output="x.png")

    def key(**options):
        return plan_generate(request, model_for(request), PixelOptions(**options)).jobs[0].key

    assert "quantize" not in PixelOptions().key_fields() and "quantize" not in PixelOptions().to_dict()
    assert key(quantize="int8") != key() and key(quantize="int8") != key(quantize="nf4")
    assert key(quantize="fp8") == key(fp8=True)  # one fp8 mode under two names: old --fp8 images keep resuming
    assert LoadOptions(quantize="fp8") == LoadOptions(fp8=True)
    assert PixelOptions(quantize="int8").to_dict()["quantize"] == "int8"


def test_a_missing_backend_is_exit_4_with_the_command_that_installs_it(tiny_dir, tmp_path):
    """torchao made unimportable in the child (None in sys.modules is how Python blocks an import)."""
    code = ("import sys; sys.modules['torchao'] = None; sys.argv[0] = 'sana'; from sana_cli.cli import main; main()")
    process = subprocess.run([sys.executable, "-c", code, "generate", "a cat", "--model", str(tiny_dir),
                              "--quantize", "int8", "-o", f"{tmp_path}/out/"], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == EXIT_ENVIRONMENT, process.stderr
    assert "--quantize int8 needs the torchao package" in one_line_error(process)
    assert "pip install 'torchao>=0.15'" in one_line_error(process)
    assert process.stdout == "" and not (tmp_path / "out").exists()  # refused before the directory is made


def test_nf4_is_decided_on_this_cpu_as_cuda_would_decide_it(monkeypatch):
    """The CUDA-only branch with a stand-in device type: on CUDA it needs bitsandbytes, elsewhere CUDA."""
    with pytest.raises(EnvironmentProblem, match="needs a CUDA GPU"):
        quantizing.check("nf4", "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(EnvironmentProblem) as missing:
        quantizing.check("nf4", "cuda")
    assert missing.value.exit_code == EXIT_ENVIRONMENT and "pip install 'sana-cli[nf4]'" in missing.value.line()
    quantizing.check("int8", "cpu")  # torchao is a main dependency


def test_nf4_config_computes_in_the_presets_dtype():
    pytest.importorskip("bitsandbytes")
    config = quantizing.pipeline_config("nf4", torch.float16).quant_mapping["transformer"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.float16


class RecordingCuda:
    """torch.cuda's current device on a stand-in machine with several GPUs, recording every change."""

    def __init__(self):
        self.current, self.changes = 0, []

    def current_device(self):
        return self.current

    def set_device(self, index):
        self.changes.append(index)
        self.current = index


class StopBeforeTheGpu(Exception):
    """The stand-in GPU cannot take weights: the load stops once from_pretrained has returned."""


@pytest.mark.parametrize("asked, gpu", [("cuda:2", 2), ("cuda:1", 1)])
def test_a_load_for_cuda_n_quantizes_on_gpu_n_not_gpu_0(tiny_models, monkeypatch, asked, gpu):
    """diffusers' bitsandbytes path (nf4) puts each quantized weight on torch.cuda.current_device() when no
    device_map is given. While sana loads for cuda:N (--device cuda:N, or a torchrun rank's own GPU), that is N;
    afterwards it is the device before again."""
    from diffusers import SanaPipeline
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import LoadOptions, load

    cuda, placements = RecordingCuda(), []
    real = SanaPipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        pipe = real(cls, *args, **kwargs)  # the real load of the tiny model's files
        # ...and where diffusers' bitsandbytes quantizer would have placed this load's weights
        placements.append(BnB4BitDiffusersQuantizer.update_device_map(object.__new__(BnB4BitDiffusersQuantizer),
                                                                      None))
        assert pipe.transformer is not None
        raise StopBeforeTheGpu()

    monkeypatch.setattr(SanaPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", cuda.current_device)
    monkeypatch.setattr(torch.cuda, "set_device", cuda.set_device)
    with pytest.raises(StopBeforeTheGpu):
        load(resolve("tiny"), LoadOptions(device=asked))
    assert placements == [{"": f"cuda:{gpu}"}]  # not cuda:0
    assert cuda.changes == [gpu, 0] and cuda.current == 0  # set for the load, then given back
