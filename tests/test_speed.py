"""The speed and memory levers that can run on a CPU: the encode-ahead memory plan, torch.compile with
a compile cache shared across processes, and the `--compile auto` decision."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from sana_cli import api
from sana_cli.planning.plan import Request, model_for, plan_generate
from sana_cli.engine.speed import compile_pays_off, estimated_saving_seconds

from .conftest import sana_popen


def call_order(plan, keep_text_encoder: bool):
    """Run a plan on the real tiny pipeline and record which component ran when (forward hooks)."""
    from sana_cli.engine.loading import load
    from sana_cli.engine.runner import run

    loaded = load(plan.model)
    order = []
    hooks = [loaded.pipe.text_encoder.register_forward_hook(lambda *a: order.append("encode")),
             loaded.pipe.transformer.register_forward_hook(lambda *a: order.append("denoise"))]
    try:
        report = run(plan, loaded, keep_text_encoder=keep_text_encoder)
    finally:
        for hook in hooks:
            hook.remove()
    assert not report.failed
    return order


def three_batches(tmp_path):
    request = Request(prompt="a red fox", model="tiny", num_images=3, batch_size=1, steps=2, seed=1,
                      output=str(tmp_path) + "/", overwrite=True)
    return plan_generate(request, model_for(request))


def test_one_shot_runs_encode_every_prompt_before_any_denoising(tmp_path):
    order = call_order(three_batches(tmp_path), keep_text_encoder=False)
    assert order.count("encode") == 6  # prompt and negative prompt for each of 3 GPU batches (CFG)
    assert order.index("denoise") > max(i for i, step in enumerate(order) if step == "encode")


def test_a_session_that_stays_loaded_keeps_encoding_per_batch(tmp_path):
    order = call_order(three_batches(tmp_path), keep_text_encoder=True)
    assert order[:5] == ["encode", "encode", "denoise", "denoise", "encode"]  # each batch: encode, 2 steps
    assert order.count("encode") == 6


def test_compile_auto_turns_on_only_where_the_saving_beats_the_compile_cost(tmp_path):
    assert estimated_saving_seconds(1024, 1024, 20, 1) == pytest.approx(0.4, rel=0.05)
    assert 2.0 < estimated_saving_seconds(4096, 4096, 20, 1) < 3.0
    one_4k = plan_generate(Request(prompt="x", model="sana-4k", seed=1, output=str(tmp_path) + "/"),
                           model_for(Request(prompt="x", model="sana-4k"))).jobs
    assert not compile_pays_off(one_4k) and compile_pays_off(one_4k * 20)
    assert api._want_compile("auto", three_batches(tmp_path), "cpu") is False


def test_compile_matches_eager_and_a_second_process_reuses_the_cache(tmp_path, tiny_models):
    """torch.compile of the tiny transformer on CPU: within one level of eager, and the inductor cache
    written by the first process under SANA_CLI_CACHE is what the second one reads."""
    cache = tmp_path / "cache"
    env = dict(os.environ, SANA_CLI_CACHE=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    args = ["generate", "a red fox", "--model", "tiny", "--seed", "3", "--steps", "2", "-q"]

    def run(*more):  # each a process of its own: the second compiles from the disk cache alone
        process = sana_popen([*args, *more], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = process.communicate(timeout=600)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    eager = run("--compile", "off", "-o", tmp_path / "eager.png")
    first = run("--compile", "on", "-o", tmp_path / "first.png")
    assert eager.returncode == 0 and first.returncode == 0, first.stderr[-2000:]
    inductor = cache / "inductor"
    cached = {p for p in inductor.rglob("*") if p.is_file()}
    assert cached, "the compile cache was not written under SANA_CLI_CACHE"
    second = run("--compile", "on", "-o", tmp_path / "second.png")
    assert second.returncode == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("eager", "first", "second"))
    assert np.abs(a - b).max() <= 1
    assert np.array_equal(b, c)


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_the_fp8_capability_check_matches_torchaos(capability, monkeypatch):
    """--fp8 is refused exactly where torchao's own fp8 check (is_sm_at_least_89) says no, on a stand-in GPU
    of each compute capability (a transformer without layers: nothing to quantize when it is accepted)."""
    import types

    import torch
    from torchao.utils import is_sm_at_least_89

    from sana_cli.errors import EnvironmentProblem
    from sana_cli.engine.speed import enable_fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    loaded = types.SimpleNamespace(device=torch.device("cuda", 0),
                                   pipe=types.SimpleNamespace(transformer=torch.nn.Sequential()))
    try:
        enable_fp8(loaded)
        accepted = True
    except EnvironmentProblem as refusal:
        assert refusal.exit_code == 4 and f"this GPU has {capability[0]}.{capability[1]}" in str(refusal)
        accepted = False
    assert accepted == bool(is_sm_at_least_89())
