"""A finished denoise is never lost: latents kept beside the planned image (on request, or when the
decode fails after every fallback) and `sana decode` finishing them into the very same file."""

from __future__ import annotations

import json

from sana_cli.storage import latents

from .conftest import one_line_error, run_python

# `sana generate` in-process with every decode attempt failing as a CUDA out-of-memory would.
FAILING_DECODE = """
import sys, torch
from sana_cli.engine import vae as decode
def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")
decode._run = out_of_memory
from sana_cli.cli import main
main(sys.argv[1:])
"""


def test_keep_latents_then_sana_decode_gives_the_same_file(sana, tiny_models, tmp_path):
    args = ["generate", "a red fox", "--model", "tiny", "--seed", 3, "--steps", 2]
    made = sana(*args, "--keep-latents", "-o", tmp_path / "a" / "fox.png")
    assert made.returncode == 0, made.stderr
    kept = tmp_path / "a" / "fox.latents.safetensors"
    assert made.stdout.splitlines() == [str(tmp_path / "a" / "fox.png")] and kept.is_file()
    original = (tmp_path / "a" / "fox.png").read_bytes()
    refused = sana("decode", kept)  # the image is there already
    assert refused.returncode == 2 and "already exists" in one_line_error(refused)
    (tmp_path / "a" / "fox.png").unlink()
    finished = sana("decode", kept, "--json", check_json=True)
    assert finished.returncode == 0, finished.stderr
    assert finished.json["path"] == str(tmp_path / "a" / "fox.png") and finished.json["decode"] == "full"
    assert (tmp_path / "a" / "fox.png").read_bytes() == original  # pixels and metadata alike
    elsewhere = sana("decode", kept, "-o", tmp_path / "b" / "again.png")
    assert elsewhere.returncode == 0 and (tmp_path / "b" / "again.png").is_file()


def test_a_decode_that_fails_after_every_fallback_keeps_the_latents(sana, tiny_models, tmp_path):
    args = ["generate", "a red fox", "--model", "tiny", "--seed", "5", "--steps", "2", "-o"]
    failed = run_python(FAILING_DECODE, *args, tmp_path / "fox.png")
    assert failed.returncode == 1, failed.stderr
    kept = tmp_path / "fox.latents.safetensors"
    line = one_line_error(failed)
    assert "out of memory" in line and f"the denoised latents are kept in {kept}" in line
    assert f"sana decode {kept}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.latents.safetensors"]  # no image, no temp file
    info = latents.read(str(kept))
    assert info.meta["seed"] == 5 and info.meta["decode"] is None and info.vae_dtype == "float32"
    assert tuple(info.latents.shape) == (1, 4, 32, 32)  # 128px through a 4x tiny DC-AE
    finished = sana("decode", kept)
    assert finished.returncode == 0, finished.stderr
    reference = sana(*(["generate", "a red fox", "--model", "tiny", "--seed", 5, "--steps", 2, "-o"]
                       + [tmp_path / "reference.png"]))
    assert reference.returncode == 0
    assert (tmp_path / "fox.png").read_bytes() == (tmp_path / "reference.png").read_bytes()


def test_a_failed_decode_in_a_batch_keeps_its_latents_and_the_batch_goes_on(tiny_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na blue bird\n")
    failed = run_python(FAILING_DECODE, "batch", prompts, "--model", "tiny", "--steps", "2", "-o", tmp_path / "out",
                        "--json")
    assert failed.returncode == 3, failed.stderr
    summary = json.loads(failed.stdout)
    assert summary["failed"] == 2 and summary["written"] == 0
    kept = sorted(p.name for p in (tmp_path / "out").glob("*" + latents.SUFFIX))
    assert len(kept) == 2
    assert all("sana decode" in failure["error"] for failure in summary["failures"])


def test_sana_decode_refuses_what_is_not_a_latents_file(sana, tmp_path):
    (tmp_path / "x.latents.safetensors").write_bytes(b"not safetensors")
    process = sana("decode", tmp_path / "x.latents.safetensors")
    assert process.returncode == 2 and "is not a sana latents file" in one_line_error(process)
    missing = sana("decode", tmp_path / "missing.latents.safetensors")
    assert missing.returncode == 2 and "no such file" in one_line_error(missing)


def test_a_decode_on_another_kind_of_device_says_so_and_takes_its_own_key(sana, tiny_models, tmp_path):
    """A CUDA run's kept latents finished with `--device cpu` (forced here: the file's metadata says CUDA, as
    a CUDA run writes it): the metadata says where the decode ran and the key covers it."""
    from sana_cli.storage.images import read_metadata

    made = sana("generate", "a red fox", "--model", "tiny", "--seed", 3, "--steps", 2, "--keep-latents",
                "-o", tmp_path / "fox.png")
    assert made.returncode == 0, made.stderr
    kept = latents.read(str(tmp_path / "fox.latents.safetensors"))
    on_cuda = {**kept.meta, "device": "cuda:0", "generator": "cuda",
               "pixel_options": {**kept.meta["pixel_options"], "device": "cuda"}}
    (tmp_path / "gpu").mkdir()
    latents.save(str(tmp_path / "gpu" / "fox.png"), kept.latents, on_cuda, kept.vae_dtype)
    source = tmp_path / "gpu" / "fox.latents.safetensors"
    unasked = sana("decode", source)  # the run's kind of device by default: no CUDA here, never a silent CPU
    assert unasked.returncode == 4 and "CUDA" in one_line_error(unasked)
    assert not (tmp_path / "gpu" / "fox.png").exists()
    finished = sana("decode", source, "--device", "cpu")
    assert finished.returncode == 0, finished.stderr
    meta = read_metadata(tmp_path / "gpu" / "fox.png")["sana"]
    assert meta["decode_device"] == "cpu" and meta["device"] == "cuda:0"  # denoised on CUDA, decoded on the CPU
    assert meta["run_key"] == on_cuda["key"] and meta["key"] != on_cuda["key"]
    assert {k: v for k, v in meta.items() if k not in ("decode_device", "run_key", "key")} == \
        {k: v for k, v in on_cuda.items() if k != "key"} | {"decode": "full"}
    # The same file decoded where its run ran keeps the run's metadata and key.
    same = sana("decode", tmp_path / "fox.latents.safetensors", "-o", tmp_path / "again.png")
    assert same.returncode == 0, same.stderr
    again = read_metadata(tmp_path / "again.png")["sana"]
    assert again["key"] == kept.meta["key"] and "decode_device" not in again and "run_key" not in again
def test_every_command_that_logs_on_stderr_takes_quiet(sana, tiny_models, tmp_path):
    """-q/--quiet means the same on each command that writes progress or log lines: generate, batch, decode."""
    from sana_cli.cli import cli

    for name in ("generate", "batch", "decode"):
        assert any("--quiet" in getattr(p, "opts", ()) and "-q" in p.opts for p in cli.commands[name].params), name
    made = sana("generate", "a red fox", "--model", "tiny", "--seed", 3, "--steps", 1, "--keep-latents", "-q",
                "-o", tmp_path / "fox.png")
    assert made.returncode == 0 and made.stderr == ""
    (tmp_path / "fox.png").unlink()
    finished = sana("decode", tmp_path / "fox.latents.safetensors", "-q")
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == "" and finished.stdout.strip() == str(tmp_path / "fox.png")
