"""The full-size 1024 model on the CPU, as a user without a GPU runs it: random weights with the published
config (bench/make_checkpoints.py), `sana generate --device cpu --dtype bf16` at 256x256 for 2 steps,
against the model card recipe in its own process. Its peak memory must stay near the recipe's (float32
under the old `--dtype auto` rule took 2.6x).

Marked slow (the checkpoint is ~10 GB and each side needs ~10 GB of RAM and minutes on 2 cores): CI's
`pytest -q` deselects it (addopts in pyproject.toml); run it with `pytest -m slow`. SANA_TEST_CHECKPOINTS
reuses checkpoints already made by `bench/make_checkpoints.py --models 1024`; the figures go to
$SANA_TEST_RESULTS (default: the test's temp dir) as full-size-cpu.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import SANA

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
RECIPE = """
import sys, torch
from diffusers import SanaPipeline
pipe = SanaPipeline.from_pretrained(sys.argv[1], variant="bf16", torch_dtype=torch.bfloat16)
pipe.text_encoder.to(torch.bfloat16)
image = pipe(prompt="a cyberpunk cat with a neon sign", height=256, width=256, num_inference_steps=2,
             guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(1),
             use_resolution_binning=False).images[0]
image.save(sys.argv[2])
"""


def test_full_size_1024_in_bf16_on_the_cpu_needs_what_the_recipe_needs(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    from _common import compare_images, run_child

    import make_checkpoints

    root = Path(os.environ["SANA_TEST_CHECKPOINTS"]) if os.environ.get("SANA_TEST_CHECKPOINTS") else \
        tmp_path_factory.mktemp("checkpoints")
    model = make_checkpoints.model_dir(root, "1024")
    if not model.is_dir():
        make_checkpoints.build(root, models=("1024",), scale="full")
    work = tmp_path_factory.mktemp("full-size-cpu")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    recipe = run_child([sys.executable, "-c", RECIPE, str(model), str(work / "recipe.png")], env=env, timeout=3600)
    assert recipe["returncode"] == 0, recipe["stderr"][-3000:]
    cli = run_child([SANA, "generate", "a cyberpunk cat with a neon sign", "--model", str(model), "--device", "cpu",
                     "--dtype", "bf16", "--size", "256", "--force-size", "--steps", "2", "--guidance", "4.5",
                     "--seed", "1", "-o", str(work / "sana.png"), "--json", "-q"], env=env, timeout=3600)
    assert cli["returncode"] == 0, cli["stderr"][-3000:]
    result = json.loads(cli["stdout"])
    figures = {"model": str(model), "size": "256x256", "steps": 2, "dtype": "bfloat16",
               "recipe": {"peak_rss_gib": round(recipe["peak_rss_bytes"] / GiB, 2),
                          "seconds": round(recipe["seconds"], 1)},
               "sana": {"peak_rss_gib": round(cli["peak_rss_bytes"] / GiB, 2), "seconds": round(cli["seconds"], 1),
                        "dtype": result["model"]["dtype"]},
               "peak_ratio": round(cli["peak_rss_bytes"] / recipe["peak_rss_bytes"], 3),
               "vs_recipe": compare_images(work / "recipe.png", work / "sana.png")}
    results = Path(os.environ.get("SANA_TEST_RESULTS") or work)
    results.mkdir(parents=True, exist_ok=True)
    (results / "full-size-cpu.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    assert result["model"]["dtype"] == "bfloat16"
    assert figures["peak_ratio"] <= 1.15, figures
