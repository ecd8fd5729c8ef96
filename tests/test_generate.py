"""`sana generate` end to end on tiny pipelines saved on disk: through the installed `sana` (subprocess)
and Click's CliRunner, compared pixel for pixel with direct diffusers calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import SanaPAGPipeline, SanaPipeline, SanaSprintPipeline
from PIL import Image

from sana_cli.cli import cli
from sana_cli.storage.images import read_metadata

from .conftest import SANA, limited, one_line_error, sana_popen

PROMPT = "a cute panda eating bamboo, ink drawing style"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def direct(cls, model_dir, steps, seed, size=128, **call) -> np.ndarray:
    """The same image made by calling diffusers directly (no binning: sana-cli renders the size asked)."""
    pipe = cls.from_pretrained(str(model_dir), dtype=torch.float32, **call.pop("load", {}))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, num_inference_steps=steps, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(seed), use_resolution_binning=False, **call).images[0]
    return np.asarray(image)


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_installed_sana_generates_a_png_identical_to_a_direct_diffusers_call(sana, tiny_dir, tmp_path):
    target = tmp_path / "panda.png"
    process = sana("generate", PROMPT, "--model", tiny_dir, "--seed", 7, "--steps", 4, "-o", target, "--json",
                   check_json=True, fresh=True)  # the console script itself, in a fresh interpreter
    assert process.returncode == 0, process.stderr
    data = process.json  # stdout is exactly one JSON object
    assert data["ok"] is True and data["images"][0]["path"] == str(target)
    assert data["images"][0]["seed"] == 7 and data["images"][0]["decode"] == "full"
    assert set(data["timings"]) >= {"load", "encode", "denoise", "decode", "write", "total"}
    assert "Traceback" not in process.stderr
    expected = direct(SanaPipeline, tiny_dir, steps=4, seed=7, negative_prompt="", guidance_scale=4.5)
    assert np.array_equal(pixels(target), expected)


def test_pag_switches_pipeline_and_matches_diffusers(tiny_dir, tmp_path):
    target = tmp_path / "pag.png"
    result = invoke("generate", PROMPT, "--model", tiny_dir, "--seed", 3, "--steps", 3, "--pag-scale", 2.0,
                    "--pag-layers", "transformer_blocks.1", "-o", target, "--json")
    assert result.exit_code == 0, result.output
    expected = direct(SanaPAGPipeline, tiny_dir, steps=3, seed=3, guidance_scale=4.5, pag_scale=2.0,
                      load={"pag_applied_layers": ["transformer_blocks.1"]})
    assert np.array_equal(pixels(target), expected)
    without = direct(SanaPipeline, tiny_dir, steps=3, seed=3, guidance_scale=4.5)
    assert not np.array_equal(pixels(target), without)  # PAG really changed the image
    assert read_metadata(target)["sana"]["pag_scale"] == 2.0


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sprint_works_for_one_to_four_steps(tiny_models, tmp_path, steps):
    target = tmp_path / f"sprint{steps}.png"
    result = invoke("generate", PROMPT, "--model", tiny_models["sprint"], "--seed", 5, "--steps", steps,
                    "-o", target)
    assert result.exit_code == 0, result.output
    extra = {} if steps == 2 else {"intermediate_timesteps": None}
    expected = direct(SanaSprintPipeline, tiny_models["sprint"], steps=steps, seed=5, guidance_scale=4.5, **extra)
    assert np.array_equal(pixels(target), expected)
    assert read_metadata(target)["sana"]["pipeline"] == "SanaSprintPipeline"


def test_sprint_teacher_config_runs_through_sana_pipeline(tiny_models, tmp_path):
    target = tmp_path / "teacher.png"
    result = invoke("generate", PROMPT, "--model", tiny_models["teacher"], "--seed", 9, "--steps", 3, "-o", target)
    assert result.exit_code == 0, result.output
    expected = direct(SanaPipeline, tiny_models["teacher"], steps=3, seed=9, guidance_scale=4.5)
    assert np.array_equal(pixels(target), expected)


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_dir, tmp_path):
    for name, seed in (("a.png", 11), ("b.png", 11), ("c.png", 12)):
        assert invoke("generate", PROMPT, "--model", "tiny", "--seed", seed, "-o", tmp_path / name).exit_code == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    # Same inputs, same bytes: no timestamps in the metadata.
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_several_images_default_names_and_stdout_paths(tmp_path):
    result = invoke("generate", "a red fox", "--model", "tiny", "--seed", 100, "-n", 3, "-o", f"{tmp_path}/")
    assert result.exit_code == 0, result.output
    expected = [str(tmp_path / f"a-red-fox-{seed}.png") for seed in (100, 101, 102)]
    assert result.stdout.splitlines() == expected
    assert all(os.path.exists(p) for p in expected)


def test_metadata_round_trips_through_sana_info(sana, tmp_path):
    target = tmp_path / "fox.webp"
    made = sana("generate", "一只狐狸 🦊 in the snow", "--model", "tiny", "--seed", 21, "--negative-prompt", "blurry",
                "-W", 160, "-H", 96, "-o", target, "--json", check_json=True)
    assert made.returncode == 0, made.stderr
    shown = sana("info", target, "--json", check_json=True)
    assert shown.returncode == 0
    meta = shown.json["sana"]
    assert (meta["prompt"], meta["negative_prompt"], meta["seed"]) == ("一只狐狸 🦊 in the snow", "blurry", 21)
    assert (meta["width"], meta["height"], meta["rendered"]) == (160, 96, "160x96")
    assert meta["pipeline"] == "SanaPipeline" and meta["decode"] == "full" and meta["model"] == "tiny"
    assert set(meta["versions"]) == {"torch", "diffusers", "transformers"}
    assert shown.json["parameters"].startswith("一只狐狸 🦊 in the snow\nNegative prompt: blurry\n")
    command = sana("info", target, "--command").stdout.strip()
    assert command.startswith("sana generate --model tiny --width 160 --height 96")
    assert "--seed 21" in command and "--negative-prompt blurry" in command
    assert command.endswith(f"-o {tmp_path / 'fox-again.webp'} -- '一只狐狸 🦊 in the snow'")


def test_reproduce_command_makes_the_same_pixels(sana, tmp_path):
    first = tmp_path / "one.png"
    assert invoke("generate", "a blue bird", "--model", "tiny", "--seed", 5, "-o", first).exit_code == 0
    command = invoke("info", first, "--command").stdout.strip()
    import shlex

    assert invoke(*shlex.split(command)[1:]).exit_code == 0  # runnable as printed: writes one-again.png
    assert np.array_equal(pixels(first), pixels(tmp_path / "one-again.png"))


def test_dry_run_prints_the_plan_and_writes_nothing(sana, tmp_path):
    process = sana("generate", "a cyberpunk cat", "--size", 4096, "--seed", 1, "-o", f"{tmp_path}/out/",
                   "--dry-run", "--json", check_json=True)
    assert process.returncode == 0, process.stderr
    plan = process.json
    assert plan["dry_run"] and plan["model"]["name"] == "sana-4k"
    assert plan["images"][0]["width"] == 4096 and plan["images"][0]["steps"] == 20
    assert not (tmp_path / "out").exists()
    text = sana("generate", "a cyberpunk cat", "--size", 1024, "--seed", 1, "--dry-run").stdout
    assert "sana-1600m-1024" in text and "1024x1024 rendered as asked (no resize)" in text


# ---- exit codes, each from a real case ---------------------------------------------------------------

def test_exit_2_for_bad_usage_with_one_line(sana, tmp_path):
    for args, fragment in [
        (("generate", "x", "--size", 1000), "not a multiple of 32"),
        (("generate", "x", "--model", "sana-4k", "--size", 1024), "4096px model"),
        (("generate", "x", "--model", "sanaa-4k"), "did you mean 'sana-4k'"),
        (("generate", "x", "--size", 1024, "--width", 512), "conflicts"),
        (("generate", "x", "--steps", "many"), "'many' is not a valid integer"),
        (("generate", "   "), "prompt is empty"),
        (("generate", "x", "--bogus"), "No such option"),
    ]:
        process = sana(*args)
        assert process.returncode == 2, (args, process.stderr)
        assert fragment in one_line_error(process)
        assert process.stdout == ""


def test_exit_2_for_an_existing_output_and_the_file_is_untouched(sana, tmp_path):
    target = tmp_path / "taken.png"
    target.write_bytes(b"mine")
    process = sana("generate", "x", "--model", "tiny", "-o", target)
    assert process.returncode == 2 and "already exists" in one_line_error(process)
    assert target.read_bytes() == b"mine"


def test_exit_4_when_a_real_model_needs_cuda(sana, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # online (a closed port stands in for the hub): offline, the missing cache is reported first
    process = sana("generate", "x", "--model", "sana-1600m-1024", "--seed", 1, "-o", f"{tmp_path}/",
                   env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert process.returncode == 4
    assert "needs a CUDA GPU" in one_line_error(process)


def test_exit_4_when_offline_and_the_model_is_not_cached(sana, tmp_path):
    process = sana("generate", "x", "--model", "someone/not-cached-sana", "--offline", "--device", "cpu",
                   "--size", 128, "-o", f"{tmp_path}/")
    assert process.returncode == 4, process.stderr
    assert "not in the Hugging Face cache and offline mode is on" in one_line_error(process)
    assert list(tmp_path.iterdir()) == []


def test_exit_4_for_a_missing_model_directory(sana, tmp_path):
    process = sana("generate", "x", "--model", tmp_path / "no-such-model")
    assert process.returncode == 4 and "does not exist" in one_line_error(process)


def test_exit_1_when_writing_fails_and_nothing_partial_is_left(tiny_models, tmp_path):
    """A real failed write: RLIMIT_FSIZE makes write() fail with EFBIG, as a full disk would."""
    process = subprocess.run(limited([SANA, "generate", PROMPT, "--model", "tiny", "--seed", "1",
                                      "-o", str(tmp_path / "a.png")], file_size=4000),
                             capture_output=True, text=True, timeout=180)
    assert process.returncode == 1, process.stderr
    assert "cannot write" in process.stderr.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_cleanly_with_their_exit_code(tiny_models, tmp_path, sig, code):
    """A real signal to a real process mid-denoising: no image, no temp file, exit 130/143."""
    process = sana_popen(
        ["generate", PROMPT, "--model", "tiny", "--size", "512", "--force-size", "--steps", "400", "--seed", "1",
         "-o", str(tmp_path / "a.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, SANA_PROGRESS_INTERVAL="0"))
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "step 2/" in line:
            break
    else:
        raise AssertionError(f"the run ended before step 2 (exit {process.wait()}):\n{''.join(seen)}")
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, "".join(seen) + stderr
    assert stdout == ""
    assert "interrupted" in stderr.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_help_and_dry_run_never_import_torch():
    code = """
import sys
from sana_cli.cli import main
for argv in (["--help"], ["generate", "--help"], ["models"], ["models", "--json"],
             ["generate", "a cat", "--size", "4096", "--seed", "1", "--dry-run"], ["video", "--help"],
             ["video", "a corgi", "--seed", "1", "--frames", "41", "--dry-run"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'av'))
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "sana_cli", "models", "--json"], capture_output=True, text=True)
    assert out.returncode == 0
    names = [row["name"] for row in json.loads(out.stdout)]
    assert {"sana-4k", "sana-2k", "sana-1600m-1024", "sprint", "sprint-teacher", "tiny"} <= set(names)


def test_progress_goes_to_stderr_and_stdout_has_only_the_path(sana, tmp_path):
    process = sana("generate", "a red fox", "--model", "tiny", "--seed", 2, "-o", tmp_path / "f.png")
    assert process.returncode == 0
    assert process.stdout == f"{tmp_path / 'f.png'}\n"
    assert "wrote" in process.stderr and "\r" not in process.stderr  # no bar when stderr is not a TTY
    quiet = sana("generate", "a red fox", "--model", "tiny", "--seed", 3, "-o", tmp_path / "g.png", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_pag_image_records_the_pipeline_that_made_it(sana, tmp_path, tiny_models):
    """PAG runs through SanaPAGPipeline (built from the loaded SanaPipeline's components): the image,
    the JSON and the batch manifest say so; an image without PAG says SanaPipeline."""
    from sana_cli.storage.images import read_metadata

    for pag, expected in (("2", "SanaPAGPipeline"), ("0", "SanaPipeline")):
        path = tmp_path / f"pag-{pag}.png"
        made = sana("generate", "a red fox", "--model", "tiny", "--seed", 1, "--pag-scale", pag, "-o", path)
        assert made.returncode == 0, made.stderr
        assert read_metadata(path)["sana"]["pipeline"] == expected
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a cat", "pag_scale": 2, "seed": 1}\n{"prompt": "a dog", "seed": 2}\n')
    out = tmp_path / "out"
    assert sana("batch", rows, "--model", "tiny", "-o", out, "-q").returncode == 0
    records = sorted((json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()),
                     key=lambda r: r["row"])
    assert [r["pipeline"] for r in records] == ["SanaPAGPipeline", "SanaPipeline"]


def test_a_dry_run_without_seed_says_the_run_draws_its_own(sana):
    """Without --seed a run draws its seeds when it starts: the dry run says its own draw is not the run's,
    in text and JSON; with --seed the seeds shown are the run's."""
    text = sana("generate", "a cat", "--model", "tiny", "--dry-run")
    assert text.returncode == 0 and "a real run draws its own when it starts (pass --seed N" in text.stdout
    drawn = sana("generate", "a cat", "--model", "tiny", "--dry-run", "--json", check_json=True)
    assert drawn.json["seeds_drawn_at_run_time"] is True
    fixed = sana("generate", "a cat", "--model", "tiny", "--seed", 7, "--dry-run", "--json", check_json=True)
    assert fixed.json["seeds_drawn_at_run_time"] is False and fixed.json["images"][0]["seed"] == 7
    assert "draws its own" not in sana("generate", "a cat", "--model", "tiny", "--seed", 7, "--dry-run").stdout


# ---- metadata: job fields, model facts and run facts never overwrite each other -------------------------

@pytest.fixture(scope="module")
def tiny_loaded(tiny_models):
    import sana_cli

    return sana_cli.load("tiny").loaded


def planned_job(tmp_path, **request):
    from sana_cli.models.modelref import resolve
    from sana_cli.planning.plan import Request, plan_generate

    plan = plan_generate(Request(prompt="a cat", model="tiny", seed=1, output=str(tmp_path / "cat.png"), **request),
                         resolve("tiny"))
    return plan.jobs[0]


@pytest.mark.parametrize("request_", [{}, {"pag_scale": 1.5, "negative_prompt": "dull", "steps": 2}])
def test_every_job_field_keeps_its_value_in_the_metadata_apart_from_model_and_run_facts(tiny_loaded, tmp_path,
                                                                                        request_):
    from sana_cli.engine.runner import RUN_REFINES, image_metadata
    from sana_cli.planning.fields import PIXEL_FIELDS

    job = planned_job(tmp_path, **request_)
    model = tiny_loaded.describe()
    clash = [name for name in PIXEL_FIELDS if name in model or name in RUN_REFINES]
    assert clash == [], f"job fields named like model facts: {clash}"
    meta = image_metadata(tiny_loaded, job, "full")
    for name, value in job.params().items():
        assert meta[name] == value, name
    assert meta["scheduler"] == model["scheduler"] and meta["device"] == "cpu"


def test_a_job_field_named_like_a_model_fact_is_refused_not_overwritten(tiny_loaded, tmp_path, monkeypatch):
    from sana_cli.engine import runner
    from sana_cli.planning.jobs import ImageJob

    job = planned_job(tmp_path)
    params = ImageJob.params
    monkeypatch.setattr(ImageJob, "params", lambda self: {**params(self), "scheduler": "flow-dpm"})
    with pytest.raises(RuntimeError, match="'scheduler' is both a job field and a model fact"):
        runner.image_metadata(tiny_loaded, job, "full")


def test_the_run_refines_only_the_device_and_pipeline_and_other_overlaps_are_refused():
    from sana_cli.engine.runner import merge_metadata

    model = {"model": "tiny", "device": "cuda:0", "pipeline": "SanaPipeline", "dtype": "float32"}
    merged = merge_metadata(job={"seed": 1}, model=model, run={"device": "cuda", "pipeline": "SanaPAGPipeline"},
                            family={"intermediate_timesteps": None})
    assert merged == {"seed": 1, "model": "tiny", "device": "cuda", "pipeline": "SanaPAGPipeline", "dtype": "float32",
                      "intermediate_timesteps": None}
    for parts, message in (({"run": {"dtype": "bf16"}}, "'dtype' is both a model fact and a run fact"),
                           ({"family": {"seed": 2}}, "'seed' is both a job field and a family fact"),
                           ({"job": {"seed": 1, "key": "x"}, "run": {"key": "y"}}, "'key' is both a job field")):
        arguments = {"job": {"seed": 1}, "model": model, "run": {}, "family": {}, **parts}
        with pytest.raises(RuntimeError, match=message):
            merge_metadata(**arguments)


# The sana metadata of an image made before job fields and model facts were merged by merge_metadata.
OLD_METADATA = {
    "chi": True, "commit": None, "decode": "full", "device": "cpu", "dtype": "float32", "generator": "cpu",
    "guidance": 4.5, "height": 128, "key": "815acc8356b0f489", "key_schema": 2, "model": "tiny",
    "model_id": "tiny:sana", "negative_prompt": "", "pag_layers": None, "pag_scale": 0.0, "pipeline": "SanaPipeline",
    "pixel_options": {"decode": "auto", "device": "auto", "dtype": "auto", "fp8": False}, "prompt": "a cat",
    "rendered": "128x128", "revision": None, "sana_cli": "0.1.0", "scheduler": "DPMSolverMultistepScheduler", "seed": 1,
    "steps": 4, "versions": {"diffusers": "0.42.1", "torch": "2.13.0+cpu", "transformers": "5.24.0"}, "width": 128,
}


def test_an_image_written_before_the_metadata_merge_is_still_read_and_reproduced(sana, tiny_models, tmp_path):
    from sana_cli.storage import media

    old = tmp_path / "cat.png"
    media.write(media.Frames.still(Image.new("RGB", (128, 128), (200, 10, 10))), old, OLD_METADATA, overwrite=False)
    shown = sana("info", old, "--json", check_json=True)
    assert shown.returncode == 0 and shown.json["sana"] == OLD_METADATA
    command = sana("info", old, "--command")
    assert command.returncode == 0, command.stderr
    assert command.stdout == (f"sana generate --model tiny --width 128 --height 128 --steps 4 --guidance 4.5 --seed 1 "
                              f"--dtype fp32 --device cpu --decode full -o {tmp_path / 'cat-again.png'} -- 'a cat'\n")
    again = planned_job(tmp_path / "again")
    assert again.key == OLD_METADATA["key"]  # the same request keys to the same image: a resumed batch takes it
