"""CI smoke test of the benchmark: bench/run.py --scale tiny on the CPU, as a subprocess, and
checks on the JSON and markdown it writes (to a temp dir, never to bench/results/).

What must hold for the tiny models on the CPU (same seed, same size, bf16 everywhere):
sana-cli's API and CLI images are pixel-identical to the model card recipe *minus* its
`pipe.text_encoder.to(torch.bfloat16)` line. That line casts Gemma's rotary inv_freq buffer from
fp32 (as from_pretrained leaves it, and as sana-cli runs it) to bf16, which changes the prompt
embeddings, so against the recipe as written the images differ slightly (high PSNR, small max
diff). Binning: the recipe as written bins the size; for the tiny models that would render
another size (1024 or 4096) and resize, so run.py calls the recipe at the exact size instead, and
at full scale binning maps every workload's size to itself (checked below without a model).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SINGLE = ("4k", "1024", "sprint")


def _module(name: str):
    sys.path[:0] = [str(REPO), str(BENCH)]
    try:
        if name in sys.modules:  # run.py imports _common and make_checkpoints by these names
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        del sys.path[:2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the tiny benchmark once; returns (results dict, markdown text, paths)."""
    root = tmp_path_factory.mktemp("bench")
    results_dir, checkpoints, work = root / "results", root / "checkpoints", root / "work"
    committed = sorted(p.name for p in (BENCH / "results").glob("*")) if (BENCH / "results").is_dir() else []
    env = dict(os.environ, SANA_CLI_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    process = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--scale", "tiny", "--checkpoints", str(checkpoints),
         "--results", str(results_dir), "--work", str(work), "--warmup", "0"],  # what is measured, not how fast
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    written = sorted(results_dir.glob("*.json"))
    assert len(written) == 1, written
    assert Path(process.stdout.strip().splitlines()[-1]) == written[0]
    markdown = written[0].with_suffix(".md")
    assert markdown.is_file()
    after = sorted(p.name for p in (BENCH / "results").glob("*")) if (BENCH / "results").is_dir() else []
    assert after == committed, "the smoke test must not write into bench/results/"
    return json.loads(written[0].read_text()), markdown.read_text(), {"checkpoints": checkpoints, "work": work,
                                                                       "json": written[0]}


def test_header_records_command_machine_and_versions(smoke):
    results, _, paths = smoke
    assert results["command"].startswith("python bench/run.py --scale tiny")
    assert results["scale"] == "tiny" and results["device"]["type"] == "cpu"
    assert results["device"]["name"] and results["device"]["cpu_cores"] >= 1
    for package in ("python", "torch", "diffusers", "transformers", "patch_conv"):
        assert results["versions"][package], package
    assert results["sana_cli"]["version"]
    assert Path(results["sana_cli"]["path"]) == REPO / "sana_cli", "the benchmark must run this checkout's code"
    datetime.fromisoformat(results["date"])
    assert paths["json"].name.startswith(results["date"][:10]) and paths["json"].name.endswith("_tiny.json")


def test_every_workload_is_reported(smoke):
    results, _, _ = smoke
    assert [w["workload"] for w in results["workloads"]] == ["4k", "1024", "batch", "sprint"]
    for record in results["workloads"]:
        assert record["width"] == record["height"] == 128
    sprint = next(w for w in results["workloads"] if w["workload"] == "sprint")
    assert sprint["steps"] == 2


def test_figures_are_present_and_positive(smoke):
    results, _, _ = smoke
    for record in results["workloads"]:
        if record["workload"] not in SINGLE:
            continue
        sides = record["sides"]
        assert set(sides) == {"recipe", "recipe_no_te_cast", "api", "cli"}
        for name, side in sides.items():
            assert side["status"] == "ok", (record["workload"], name, side["error"])
            assert side["seconds"] > 0 and side["images"] == 1
            assert side["images_per_second"] == pytest.approx(1 / side["seconds"], rel=0.01)
            assert side["peak_memory_bytes"] > 50 * 2**20, (name, side["peak_memory_bytes"])
            assert side["load_seconds"] is not None and side["load_seconds"] >= 0
            for stage in ("encode", "denoise", "decode"):
                assert side["stages"][stage] > 0, (record["workload"], name, stage)
            assert side["stages"]["write"] is not None and side["stages"]["write"] >= 0
            parts = sum(side["stages"][s] for s in ("encode", "denoise", "decode", "write"))
            assert parts <= side["seconds"] * 1.02 + 0.01, (name, side["stages"], side["seconds"])
            for output in side["outputs"]:
                from PIL import Image

                with Image.open(output) as image:
                    assert image.size == (128, 128)
        for name in ("recipe", "api"):  # in-process: peak measured over the call, from the loaded model
            # RSS can fall below the starting level when memory is freed mid-call, so allow a little.
            assert sides[name]["peak_memory_bytes"] >= 0.95 * sides[name]["baseline_memory_bytes"] > 0
        cli = sides["cli"]
        assert cli["load_seconds"] > 0 and cli["stages"]["startup_and_load"] > cli["load_seconds"]
        assert "python" in cli["command"] and "-m sana_cli generate" in cli["command"]
        assert cli["decode"] == sides["api"]["decode"] == "full"


def test_sana_matches_the_recipe_pixel_for_pixel(smoke):
    """The exactness claim, stated precisely (see the module docstring)."""
    results, _, _ = smoke
    for record in results["workloads"]:
        if record["workload"] not in SINGLE:
            continue
        sides = record["sides"]
        assert sides["recipe"]["text_encoder_rope_dtype"] == "bfloat16"  # the card's .to(bfloat16)
        assert sides["recipe_no_te_cast"]["text_encoder_rope_dtype"] == "float32"
        api_rope = sides["api"]["text_encoder_rope_dtype"]
        same = "recipe" if api_rope == sides["recipe"]["text_encoder_rope_dtype"] else "recipe_no_te_cast"
        other = "recipe_no_te_cast" if same == "recipe" else "recipe"
        for name in ("api", "cli"):
            exact = sides[name][f"diff_vs_{same}"]
            assert exact["identical"] and exact["max_abs_diff"] == 0 and exact["psnr_db"] is None, (name, exact)
            # Against the other recipe variant the difference is reported as numbers: the RoPE cast
            # alone moves a few pixels by a level or two.
            near = sides[name][f"diff_vs_{other}"]
            assert not near["identical"], (record["workload"], name, near)
            assert near["psnr_db"] > 40 and 0 < near["max_abs_diff"] <= 16, near
        if same == "recipe_no_te_cast":  # then the whole difference from the card is the cast
            assert sides["api"]["diff_vs_recipe"] == sides["recipe_no_te_cast"]["diff_vs_recipe"]


def test_recipe_binning_note_and_patch_conv(smoke):
    results, _, _ = smoke
    by_key = {w["workload"]: w for w in results["workloads"]}
    for key in ("4k", "1024", "sprint"):
        assert any("use_resolution_binning=False" in note for note in by_key[key]["notes"]), by_key[key]["notes"]
    assert by_key["4k"]["sides"]["recipe"]["decode"].startswith("patch_conv splits=32")
    assert by_key["1024"]["sides"]["recipe"]["decode"].startswith("vae.decode")


def test_batch_workload_makes_the_recipes_images_through_sana_batch(smoke):
    results, _, _ = smoke
    batch = next(w for w in results["workloads"] if w["workload"] == "batch")
    recipe = batch["sides"]["recipe"]
    assert recipe["status"] == "ok" and recipe["images"] == batch["prompts"] == 2
    assert len(set(batch["prompt_list"])) == 2 and batch["seeds"] == [42, 43]
    assert all(Path(p).is_file() for p in recipe["outputs"])
    for name in ("api", "cli"):
        side = batch["sides"][name]
        assert side["status"] == "ok", side
        assert side["images"] == 2 and side["images_per_second"] > 0
        assert [Path(p).name for p in side["outputs"]] == ["0000.png", "0001.png"]
        assert side["diff_vs_recipe"]["images"] == 2
        assert side["diff_vs_recipe"]["psnr_db"] > 40, side["diff_vs_recipe"]


def test_markdown_table(smoke):
    results, markdown, _ = smoke
    assert results["command"] in markdown
    assert "| workload | side | end-to-end s |" in markdown
    for label in ("4k 128x128, 20 steps", "1024 128x128, 20 steps", "batch 128x128, 20 steps, 2 prompts",
                  "sprint 128x128, 2 steps"):
        assert f"| {label} | recipe |" in markdown
    assert "identical (0)" in markdown and "**skipped**" not in markdown


def test_checkpoint_layout(smoke):
    _, _, paths = smoke
    root = paths["checkpoints"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["scale"] == "tiny" and set(manifest["models"]) == {"4k", "1024", "sprint"}
    dirs = {key: root / manifest["models"][key]["directory"] for key in manifest["models"]}
    for key, directory in dirs.items():
        index = json.loads((directory / "model_index.json").read_text())
        assert index["_class_name"] == ("SanaSprintPipeline" if key == "sprint" else "SanaPipeline")
        for shared in ("text_encoder", "vae", "tokenizer"):  # written once, linked from each model
            assert (directory / shared).is_symlink()
            assert (directory / shared).resolve() == (root / "components" / shared).resolve()
    assert (dirs["4k"] / "transformer" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    assert (dirs["sprint"] / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((dirs["sprint"] / "transformer").glob("*.bf16.*"))
    assert (root / "components" / "text_encoder" / "model.safetensors").resolve() == \
        (root / "components" / "text_encoder" / "model.bf16.safetensors").resolve()
    transformer = json.loads((dirs["4k"] / "transformer" / "config.json").read_text())
    assert transformer["sample_size"] == 128 and transformer["interpolation_scale"] == 2.0
    assert json.loads((dirs["4k"] / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 6.0
    assert json.loads((dirs["1024"] / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 3.0
    sprint = json.loads((dirs["sprint"] / "transformer" / "config.json").read_text())
    assert sprint["qk_norm"] == "rms_norm_across_heads" and sprint["guidance_embeds"] is True
    scheduler = json.loads((dirs["sprint"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "SCMScheduler" and scheduler["prediction_type"] == "trigflow"


# ---- no model needed -------------------------------------------------------------------------------

def test_full_size_configs_have_the_published_parameter_counts():
    """Built on the meta device (no weights): the full configs give the published model sizes."""
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    make = _module("make_checkpoints")
    counts = {}
    for key in ("4k", "1024", "sprint"):
        model = make.build_component(SanaTransformer2DModel, {**make.TRANSFORMER_1600M, **make.MODELS[key].transformer},
                                     seed=0, dtype=torch.bfloat16, empty=True)
        counts[key] = sum(p.numel() for p in model.parameters())
    gemma = make.build_component(Gemma2Model, make.GEMMA2_2B, seed=0, dtype=torch.bfloat16, config_class=Gemma2Config,
                                 empty=True)
    dcae = make.build_component(AutoencoderDC, make.DCAE_F32C32, seed=0, dtype=torch.bfloat16, empty=True)
    assert 1.59e9 < counts["4k"] == counts["1024"] < 1.62e9  # "1600M"
    assert counts["sprint"] > counts["1024"]  # + guidance embedding and qk norms
    assert 2.60e9 < sum(p.numel() for p in gemma.parameters()) < 2.62e9  # Gemma-2 2B with its 256000-row table
    assert 3.1e8 < sum(p.numel() for p in dcae.parameters()) < 3.15e8  # DC-AE f32c32
    assert 2 ** (len(make.DCAE_F32C32["decoder_block_out_channels"]) - 1) == 32


def test_binning_is_the_identity_at_full_scale_but_not_for_tiny_sizes():
    run = _module("run")
    full = run.workloads("full")
    assert full["4k"].width == 4096 and full["batch"].prompts == 64
    assert run.binned_size(128, 4096, 4096) == (4096, 4096)
    assert run.binned_size(32, 1024, 1024) == (1024, 1024)
    assert run.binned_size(32, 1024, 1024, sprint=True) == (1024, 1024)
    assert run.binned_size(32, 128, 128) == (1024, 1024)  # the tiny models: binning would change the size
    assert run.binned_size(128, 128, 128) == (4096, 4096)
    assert run.binned_size(128, 1024, 1024, sprint=True) is None  # Sprint bins only with sample_size 32


def test_image_comparison():
    from PIL import Image

    common = _module("_common")
    a = Image.new("RGB", (8, 8), (10, 20, 30))
    b = a.copy()
    assert common.compare_images(a, b) == {"identical": True, "psnr_db": None, "max_abs_diff": 0, "mean_abs_diff": 0.0}
    b.putpixel((3, 4), (13, 20, 30))
    diff = common.compare_images(a, b)
    assert not diff["identical"] and diff["max_abs_diff"] == 3
    assert diff["psnr_db"] == pytest.approx(10 * __import__("math").log10(255**2 / (9 / 192)), abs=1e-3)
    assert "error" in common.compare_images(a, Image.new("RGB", (4, 4)))
    summary = common.combine_comparisons([common.compare_images(a, a), diff])
    assert summary["images"] == 2 and summary["identical_images"] == 1 and summary["max_abs_diff"] == 3


def test_decode_cache_bench_runs_both_modes_and_refuses_without_cuda(tmp_path):
    """bench/decode_cache_gpu.py, the GPU measurement of keeping the CUDA cache across auto decodes, as a smoke
    test on the CPU (tiny DC-AE): both modes decode, and without --device cpu it needs CUDA (exit 4)."""
    import torch

    script = [sys.executable, str(BENCH / "decode_cache_gpu.py")]
    done = subprocess.run([*script, "--device", "cpu", "--scale", "tiny", "--count", "2", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(Path(done.stdout.strip()).read_text())
    assert set(result["modes"]) == {"keep", "empty"} and result["size"] == 128
    assert all(len(m["seconds"]) == 2 and m["strategies"] == ["full"] for m in result["modes"].values())
    assert result["saving_per_decode_seconds"] is None  # no cache to empty on the CPU: no figure claimed
    assert "not a saving" in Path(done.stdout.strip()).with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        refused = subprocess.run(script, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert refused.returncode == 4 and "CUDA is not available" in refused.stderr
