"""`sana doctor` data: versions and GPU on this machine, failed checks with fixes and exit codes, and
cache detection on fake Hugging Face cache layouts (blobs, snapshot symlinks, refs/main) in a tmp HF_HOME."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from sana_cli.models import presets
from sana_cli.engine.doctor import cache_status, diagnose, format_text

REPO_4K = "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers"
SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
INDEX = {"_class_name": "SanaPipeline", "_diffusers_version": "0.32.0.dev0",
         "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "Gemma2Model"],
         "tokenizer": ["transformers", "GemmaTokenizerFast"], "transformer": ["diffusers", "SanaTransformer2DModel"],
         "vae": ["diffusers", "AutoencoderDC"]}


def snapshot_files(variant: str | None) -> dict[str, bytes]:
    """The files of a Sana diffusers repo snapshot: sharded text encoder, single-file transformer and vae."""
    v = f".{variant}" if variant else ""
    shards = [f"model{v}-0000{i}-of-00002.safetensors" for i in (1, 2)]
    text_index = {"metadata": {"total_size": 8}, "weight_map": {"embed.weight": shards[0], "layers.0.weight": shards[1],
                                                                "norm.weight": shards[1]}}
    files = {"model_index.json": json.dumps(INDEX).encode(), "scheduler/scheduler_config.json": b"{}",
             "text_encoder/config.json": b"{}",
             f"text_encoder/model.safetensors.index{v}.json": json.dumps(text_index).encode(),
             "tokenizer/tokenizer_config.json": b"{}", "tokenizer/tokenizer.json": b"{}",
             "tokenizer/tokenizer.model": b"spm", "tokenizer/special_tokens_map.json": b"{}",
             "transformer/config.json": b"{}", f"transformer/diffusion_pytorch_model{v}.safetensors": b"T" * 1000,
             "vae/config.json": b"{}", f"vae/diffusion_pytorch_model{v}.safetensors": b"V" * 500}
    files.update({f"text_encoder/{shard}": b"E" * 300 for shard in shards})
    return files


def build_cache(hub: Path, repo: str, files: dict[str, bytes], *, sha: str = SHA, ref: bool = True) -> Path:
    """Lay out files as huggingface_hub does: content in blobs/, snapshot entries as relative symlinks."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / sha
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data + name.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(sha)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache in a tmp HF_HOME, offline mode on."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "hf-home" / "hub"
    path.mkdir(parents=True)
    return path


def failed(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"] if not c["ok"]}


def no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_this_machine_reports_versions_and_no_gpu(hub):
    import diffusers
    import torch

    if not no_cuda():
        pytest.skip("this test describes a machine without CUDA")
    report = diagnose()
    assert report["exit_code"] == 0 and report["ok"] is True and failed(report) == {}
    versions = report["versions"]
    assert versions["torch"] == torch.__version__ and versions["diffusers"] == diffusers.__version__
    assert versions["python"] == "%d.%d.%d" % sys.version_info[:3] and versions["cuda"] == torch.version.cuda
    assert {"transformers", "accelerate", "patch_conv", "pillow", "click", "torchao"} <= set(versions)
    assert report["gpu"]["available"] is False and report["gpu"]["devices"] == [] and report["gpu"]["reason"]
    assert report["hf_cache"]["hub_cache"] == str(hub) and report["hf_cache"]["offline"] is True
    assert report["sana_cli_cache"]["path"] == os.environ["SANA_CLI_CACHE"]
    assert report["sana_cli_cache"]["writable"] is True
    real = [p.name for p in presets.PRESETS if not p.is_tiny]
    assert list(report["models"]) == real and {m["status"] for m in report["models"].values()} == {"missing"}
    assert json.loads(json.dumps(report)) == report  # JSON-ready as it is
    text = format_text(report)
    assert text.startswith("sana doctor: all good") and f"torch {torch.__version__}" in text
    assert "gpu         none" in text and "sana-4k" in text and "FAIL" not in text


def test_require_gpu_without_cuda_exits_4_with_a_fix(hub):
    if not no_cuda():
        pytest.skip("CUDA is available here")
    report = diagnose(require_gpu=True)
    assert report["exit_code"] == 4 and report["ok"] is False
    gpu = failed(report)["gpu"]
    assert "no CUDA GPU" in gpu["detail"] and gpu["fix"]
    assert ("pip install" in gpu["fix"]) == (report["versions"]["cuda"] is None)  # a CPU build of torch: reinstall
    text = format_text(report)
    assert "FAIL  gpu: no CUDA GPU" in text and f"fix: {gpu['fix']}" in text


def test_a_package_that_cannot_be_imported_is_a_failed_check_not_a_crash(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.setitem(sys.modules, "torch", None)
    report = diagnose(require_gpu=True)
    problems = failed(report)
    assert report["exit_code"] == 4 and {"diffusers", "torch", "gpu"} <= set(problems)
    assert problems["diffusers"]["fix"] == "pip install 'diffusers>=0.42'"
    assert problems["torch"]["fix"].startswith("pip install 'torch>=2.5'")
    assert report["versions"]["torch"] is None and report["versions"]["cuda"] is None
    assert report["gpu"]["reason"] == "torch cannot be imported"
    assert "transformers" not in problems


def test_unwritable_sana_cli_cache_exits_4(hub, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    monkeypatch.setenv("SANA_CLI_CACHE", str(blocker / "sana-cli"))
    report = diagnose()
    check = failed(report)["sana-cli cache"]
    assert report["exit_code"] == 4 and report["sana_cli_cache"]["writable"] is False
    assert "SANA_CLI_CACHE" in check["fix"] and "mkdir -p" in check["fix"]


def test_complete_snapshot_is_detected(hub):
    files = snapshot_files("bf16")
    build_cache(hub, REPO_4K, files)
    report = diagnose(model="sana-4k")
    model = report["models"]["sana-4k"]
    assert model["status"] == "complete" and model["snapshot"] == SHA and model["problems"] == []
    assert model["size_bytes"] == sum(len(data) for data in files.values())
    assert report["models"]["sana-2k"]["status"] == "missing"
    # offline and complete: nothing is missing, so the model check passes
    assert report["exit_code"] == 0 and report["model"]["status"] == "complete"
    assert "is in the HF cache" in next(c for c in report["checks"] if c["name"] == "model sana-4k")["detail"]


@pytest.mark.parametrize("damage, problem", [
    ("transformer/diffusion_pytorch_model.bf16.safetensors", "transformer/*.bf16.safetensors"),
    ("text_encoder/model.bf16-00002-of-00002.safetensors", "text_encoder/model.bf16-00002-of-00002.safetensors"),
    ("tokenizer", "tokenizer/"),
    ("vae/config.json", "vae/config.json"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
])
def test_partial_snapshot_names_what_is_missing(hub, damage, problem):
    snapshot = build_cache(hub, REPO_4K, snapshot_files("bf16"))
    target = snapshot / damage
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    status = cache_status(REPO_4K, "bf16", hub)
    assert status["status"] == "partial" and status["problems"] == [problem]

    report = diagnose(model="sana-4k")  # offline, and the model cannot load: exit 4 with the download command
    check = failed(report)["model sana-4k"]
    assert report["exit_code"] == 4 and "partial" in check["detail"] and problem in check["detail"]
    assert f"hf download {REPO_4K}" in check["fix"]


def test_dangling_blob_link_and_wrong_variant_are_partial(hub):
    snapshot = build_cache(hub, REPO_4K, snapshot_files("bf16"))
    (snapshot / "vae" / "diffusion_pytorch_model.bf16.safetensors").resolve().unlink()  # blob gone, link stays
    status = cache_status(REPO_4K, "bf16", hub)
    assert status["status"] == "partial" and status["problems"] == ["vae/*.bf16.safetensors"]

    fp32 = {name.replace(".bf16", ""): data for name, data in snapshot_files("bf16").items()}
    build_cache(hub, "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers", fp32)
    status = cache_status("Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers", "bf16", hub)
    assert status["status"] == "partial"
    assert "transformer/*.bf16.safetensors (only diffusion_pytorch_model.safetensors)" in status["problems"]
    assert diagnose()["models"]["sana-2k"]["status"] == "partial"


def test_variantless_preset_and_snapshot_without_refs(hub):
    sprint = presets.get("sprint")
    assert sprint.variant is None
    build_cache(hub, sprint.repo, snapshot_files(None), ref=False)  # downloaded by commit: no refs/main
    report = diagnose()
    assert report["models"]["sprint"]["status"] == "complete" and report["models"]["sprint"]["snapshot"] == SHA
    assert cache_status(sprint.repo, "bf16", hub)["status"] == "partial"  # asking for a variant it lacks


def test_missing_model_offline_exits_4_online_does_not(hub, monkeypatch):
    (hub / ("models--" + REPO_4K.replace("/", "--")) / "refs").mkdir(parents=True)  # a download that never began
    report = diagnose(model="sana-4k")
    check = failed(report)["model sana-4k"]
    assert report["exit_code"] == 4 and report["models"]["sana-4k"]["status"] == "missing"
    assert check["fix"].startswith(f"env HF_HUB_OFFLINE=0 hf download {REPO_4K}")
    assert "offline mode is on" in check["detail"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    report = diagnose(model="sana-4k")
    assert report["exit_code"] == 0 and report["hf_cache"]["offline"] is False
    assert diagnose(model="4k", offline=True)["exit_code"] == 4  # an alias, and offline passed in


def test_hf_hub_cache_overrides_hf_home(hub, tmp_path, monkeypatch):
    elsewhere = tmp_path / "big-disk" / "hub"
    build_cache(elsewhere, REPO_4K, snapshot_files("bf16"))
    assert diagnose()["models"]["sana-4k"]["status"] == "missing"
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))
    report = diagnose(model="sana-4k")
    assert report["hf_cache"]["hub_cache"] == str(elsewhere) and report["models"]["sana-4k"]["status"] == "complete"
    assert report["exit_code"] == 0


def test_other_model_arguments(hub, tmp_path):
    assert diagnose(model="tiny")["exit_code"] == 0
    typo = diagnose(model="sana-4kk")
    assert typo["exit_code"] == 2 and "did you mean 'sana-4k'" in failed(typo)["model sana-4kk"]["detail"]
    local = tmp_path / "my-model"
    local.mkdir()
    assert diagnose(model=str(local))["exit_code"] == 2
    (local / "model_index.json").write_text(json.dumps(INDEX))
    assert diagnose(model=str(local))["exit_code"] == 0
    build_cache(hub, "someone/sana-finetune", snapshot_files("fp16"))
    report = diagnose(model="someone/sana-finetune")
    assert report["exit_code"] == 0 and report["model"]["status"] == "complete"
    assert diagnose(model="someone/not-here")["exit_code"] == 4


def test_gpu_fields_with_a_stand_in_for_cuda_torch(hub, monkeypatch):
    """The GPU branch, on a machine without one: a stand-in torch module that reports one H100."""
    from types import SimpleNamespace

    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                           get_device_properties=lambda i: SimpleNamespace(total_memory=80 * 2**30),
                           get_device_capability=lambda i: (9, 0), get_device_name=lambda i: "NVIDIA H100 80GB HBM3",
                           mem_get_info=lambda i: (70 * 2**30, 80 * 2**30))
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda="12.8"), cuda=cuda))
    report = diagnose(require_gpu=True)
    assert report["exit_code"] == 0 and report["versions"]["cuda"] == "12.8"
    assert report["gpu"]["available"] is True and report["gpu"]["reason"] is None
    assert report["gpu"]["devices"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                                         "free_bytes": 70 * 2**30, "total_bytes": 80 * 2**30, "bf16": True}]
    assert "gpu 0       NVIDIA H100 80GB HBM3, 70.0 GiB free of 80.0 GiB, compute 9.0, bf16 yes, CUDA 12.8" \
        in format_text(report)
