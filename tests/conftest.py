"""Shared fixtures: an isolated cache with the tiny models built once, offline HF, and helpers that
run the installed `sana` in a subprocess exactly as a user or CI script would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SANA = shutil.which("sana", path=os.path.dirname(sys.executable)) or shutil.which("sana")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sana-cache")


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(cache_dir, tmp_path_factory):
    """No test reads the user's caches or reaches the network."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    saved = {key: os.environ.get(key) for key in ("SANA_CLI_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "SANA_MODEL",
                                                  "SANA_OUTPUT_DIR", "GITHUB_STEP_SUMMARY")}
    os.environ.update(SANA_CLI_CACHE=str(cache_dir), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    for key in ("SANA_MODEL", "SANA_OUTPUT_DIR", "GITHUB_STEP_SUMMARY"):
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_models(isolated_environment) -> dict[str, Path]:
    """The three built-in tiny models, built once into the isolated cache."""
    from sana_cli.engine import tiny_build as tiny

    return {variant: tiny.ensure(variant) for variant in tiny.VARIANTS}


@pytest.fixture(scope="session")
def tiny_dir(tiny_models) -> Path:
    return tiny_models["sana"]


def full_size_dcae():
    """The dc-ae-f32c32-sana-1.0 architecture (Sana's VAE) with random weights, in fp32 on the CPU."""
    import torch
    from diffusers import AutoencoderDC

    blocks = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=32, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
        decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
        decoder_layers_per_block=[3, 3, 3, 3, 3, 3], encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
        decoder_qkv_multiscales=[[], [], [], [5], [5], [5]], upsample_block_type="interpolate",
        downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()


def run_sana(*args, cwd=None, env=None, input=None, timeout=180, check_json=False, **kwargs):
    """Run the installed `sana` console script; returns CompletedProcess (text)."""
    assert SANA, "the sana console script is not installed next to this Python"
    full_env = dict(os.environ, **(env or {}))
    process = subprocess.run([SANA, *map(str, args)], cwd=cwd, env=full_env, input=input, capture_output=True,
                             text=True, timeout=timeout, **kwargs)
    if check_json:
        process.json = json.loads(process.stdout)
    return process


@pytest.fixture
def sana():
    return run_sana


def one_line_error(process) -> str:
    """A failed run says why in exactly one 'sana: error:' line, last on stderr, with no traceback;
    only 'sana:' progress lines may come before it."""
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert lines, "stderr is empty"
    errors = [line for line in lines if line.startswith("sana: error: ")]
    assert errors == [lines[-1]], f"expected one final error line, got:\n{process.stderr}"
    assert all(line.startswith("sana: ") for line in lines), f"stray output on stderr:\n{process.stderr}"
    return lines[-1]
