"""The CI-facing commands through the installed `sana`: doctor's exit codes, batch --report with a
GitHub step summary, and environment-variable defaults."""

from __future__ import annotations


import torch

from .conftest import one_line_error


def test_doctor_reports_versions_and_exits_4_with_a_fix_when_a_gpu_is_required(sana):
    report = sana("doctor", "--json", check_json=True)
    assert report.returncode == 0, report.stderr
    assert report.json["versions"]["torch"] == torch.__version__
    assert {m for m in report.json["models"]} >= {"sana-4k", "sprint"}
    if torch.cuda.is_available():
        return
    needs_gpu = sana("doctor", "--gpu")
    assert needs_gpu.returncode == 4
    assert "fix:" in one_line_error(needs_gpu)
    offline_missing = sana("doctor", "--model", "sana-4k", "--offline")
    assert offline_missing.returncode == 4
    assert "Sana_1600M_4Kpx_BF16_diffusers is missing" in one_line_error(offline_missing)


def test_batch_report_writes_a_gallery_and_a_github_step_summary(sana, tmp_path, tiny_models):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na <script>alert(1)</script> cat\n")
    summary_file = tmp_path / "summary.md"
    summary_file.write_text("# earlier step\n")
    process = sana("batch", prompts, "--model", "tiny", "-o", tmp_path / "out", "--report", "--json",
                   env={"GITHUB_STEP_SUMMARY": str(summary_file)}, check_json=True)
    assert process.returncode == 0, process.stderr
    assert process.json["report"]["gallery"] == str(tmp_path / "out" / "index.html")
    html = (tmp_path / "out" / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    assert len(list((tmp_path / "out" / "thumbnails").iterdir())) == 2
    markdown = summary_file.read_text()
    assert markdown.startswith("# earlier step\n") and "| written | 2 |" in markdown.replace("  ", " ")


def test_environment_variables_supply_defaults(sana, tmp_path):
    plan = sana("generate", "a cat", "--dry-run", "--json", env={"SANA_MODEL": "tiny", "SANA_GENERATE_STEPS": "3",
                                                                 "SANA_OUTPUT_DIR": str(tmp_path / "env-out")},
                check_json=True)
    assert plan.returncode == 0, plan.stderr
    image = plan.json["images"][0]
    assert plan.json["model"]["name"] == "tiny" and image["steps"] == 3
    assert image["path"].startswith(str(tmp_path / "env-out"))
    batch = sana("batch", "-", "--dry-run", "--json", input="a dog\n", env={"SANA_MODEL": "tiny",
                                                                         "SANA_BATCH_BATCH_SIZE": "1"},
                 check_json=True)
    assert batch.returncode == 0 and batch.json["model"]["name"] == "tiny"
