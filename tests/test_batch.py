"""`sana batch`: input formats, validation, seeds, names, the manifest, resume after kill -9 and
SIGINT, failed rows, sharding and two real processes, on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_cli.planning import batchfile
from sana_cli.api import plan_batch_file
from sana_cli.planning.batchfile import BatchFileError
from sana_cli.errors import UsageError
from sana_cli.storage.files import TEMP_MARK, sha256_file
from sana_cli.planning.plan import BatchDefaults, derive_seed

from .conftest import SANA, limited, one_line_error, run_python, run_sana, sana_popen

PROMPTS = ["a red fox in the snow", "a cute panda eating bamboo", "一只可爱的熊猫 🐼 在竹林里", "a lighthouse at dusk",
           "a cyberpunk city street at night", "an old castle on a hill"]
DETERMINISTIC = {"OMP_NUM_THREADS": "1"}  # CPU kernels reduce differently with other thread counts


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def images(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}


def manifest(directory: Path, name="results.jsonl") -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text().splitlines()]


@pytest.fixture
def prompts_txt(tmp_path) -> Path:
    return write(tmp_path / "prompts.txt", "\n".join(PROMPTS) + "\n")


# ---- input ----------------------------------------------------------------------------------------

def test_txt_with_bom_crlf_comments_blank_lines_emoji_and_chinese(tmp_path):
    path = write(tmp_path / "p.txt", "\ufeff# heading\r\na red fox\r\n\r\n   # indented comment\r\n一只熊猫 🐼\r\n",
                 "utf-8")
    rows, errors, _ = batchfile.load(str(path))
    assert errors == [] and [(r.line, r.prompt) for r in rows] == [(2, "a red fox"), (5, "一只熊猫 🐼")]


def test_jsonl_and_csv_give_the_same_rows_with_overrides(tmp_path):
    jsonl = write(tmp_path / "p.jsonl", '{"prompt": "a cat", "seed": 5, "size": 256, "steps": 3, "name": "cat"}\n'
                                        '{"prompt": "say \\"hi\\"\\nsecond line", "negative_prompt": "blur", "n": 2}\n')
    csv = write(tmp_path / "p.csv", 'prompt,seed,size,steps,name,negative_prompt,n\n'
                                    'a cat,5,256,3,cat,,\n"say ""hi""\nsecond line",,,,,blur,2\n')
    from_jsonl, e1, _ = batchfile.load(str(jsonl))
    from_csv, e2, _ = batchfile.load(str(csv))
    assert e1 == e2 == []
    assert [(r.prompt, r.overrides) for r in from_jsonl] == [(r.prompt, r.overrides) for r in from_csv]
    assert from_jsonl[0].overrides == {"seed": 5, "size": 256, "steps": 3, "name": "cat"}
    assert from_jsonl[1].prompt == 'say "hi"\nsecond line'


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": "a", "colour": "red"}\n', "line 1: unknown field(s) 'colour'"),
    ('{"prompt": "a", "seed": "five"}\n', "line 1: 'seed' must be a whole number, got 'five'"),
    ('{"prompt": "a", "steps": 2.5}\n', "'steps' must be a whole number"),
    ('{"prompt": ""}\n', "line 1: the prompt is missing or empty"),
    ('{"negative_prompt": "x"}\n', "the prompt is missing or empty"),
    ('{"prompt": "a"}\n{"prompt": "b",\n', "line 2: not valid JSON"),
    ('["a"]\n', "expected a JSON object, got list"),
    ('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "X"}\n', "line 2: name 'X' is already used on line 1"),
])
def test_bad_jsonl_rows_are_reported_with_their_line(tmp_path, content, fragment):
    path = write(tmp_path / "p.jsonl", content)
    with pytest.raises(BatchFileError) as info:
        plan_batch_file(str(path), model="tiny", output_dir=str(tmp_path / "out"))
    assert fragment in info.value.line()
    assert info.value.exit_code == 2


@pytest.mark.parametrize("row, fragment", [
    ('{"prompt": "a", "name": "../../x"}', "may not contain path separators"),
    ('{"prompt": "a", "name": "/etc/passwd"}', "may not contain path separators"),
    ('{"prompt": "a", "name": "..\\\\x"}', "may not contain path separators"),
    ('{"prompt": "a", "name": ".hidden"}', "may not start with a dot"),
    ('{"prompt": "a", "name": "CON"}', "reserved device name"),
    ('{"prompt": "a", "size": 1000}', "not a multiple of 32"),
    ('{"prompt": "a", "size": 128, "width": 128}', "'size' conflicts"),
    ('{"prompt": "a", "n": 0}', "'n' must be 1..10000"),
])
def test_rows_that_fail_planning_are_reported_too(tmp_path, row, fragment):
    path = write(tmp_path / "p.jsonl", '{"prompt": "fine"}\n' + row + "\n")
    with pytest.raises(BatchFileError) as info:
        plan_batch_file(str(path), model="tiny", output_dir=str(tmp_path / "out"))
    assert "line 2: " in info.value.line() and fragment in info.value.line()


def test_csv_without_prompt_column_empty_binary_and_non_utf8_files(tmp_path):
    with pytest.raises(BatchFileError, match="no 'prompt' column"):
        plan_batch_file(str(write(tmp_path / "a.csv", "text,seed\nx,1\n")), model="tiny", output_dir=str(tmp_path))
    with pytest.raises(UsageError, match="has no prompts"):
        plan_batch_file(str(write(tmp_path / "b.txt", "# only a comment\n\n")), model="tiny", output_dir=str(tmp_path))
    (tmp_path / "c.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(UsageError, match="binary file"):
        plan_batch_file(str(tmp_path / "c.txt"), model="tiny", output_dir=str(tmp_path))
    with pytest.raises(UsageError, match=r"not UTF-8 \(first bad byte on line 2\)"):
        plan_batch_file(str(write(tmp_path / "d.txt", "ok\ncaf\xe9\n", "latin-1")), model="tiny",
                        output_dir=str(tmp_path))


def test_skip_invalid_keeps_the_good_rows(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "x": 1}\n{"prompt": "c", "size": 7}\n')
    plan, invalid, _ = plan_batch_file(str(path), model="tiny", output_dir=str(tmp_path), skip_invalid=True)
    assert [job.prompt for job in plan.jobs] == ["a"] and [e.line for e in invalid] == [2, 3]


def test_stdin_is_read_with_dash(sana, tmp_path):
    process = sana("batch", "-", "--model", "tiny", "-o", tmp_path, "--dry-run", "--json",
                   input='{"prompt": "from stdin", "seed": 3}\n', check_json=True)
    assert process.returncode == 0, process.stderr
    assert [(i["prompt"], i["seed"]) for i in process.json["images"]] == [("from stdin", 3)]


# ---- plan: seeds, names, groups ---------------------------------------------------------------------

def test_seeds_depend_on_the_row_not_its_position(tmp_path):
    forward = write(tmp_path / "a.txt", "\n".join(PROMPTS))
    backward = write(tmp_path / "b.txt", "\n".join(reversed(PROMPTS)))

    def seeds(path):
        return {j.prompt: j.seed for j in plan_batch_file(str(path), model="tiny", output_dir="o")[0].jobs}

    assert seeds(forward) == seeds(backward)
    assert seeds(forward)[PROMPTS[0]] == derive_seed(0, PROMPTS[0], 0, 0)
    other_base = plan_batch_file(str(forward), model="tiny", output_dir="o", defaults=BatchDefaults(base_seed=9))[0]
    assert {j.prompt: j.seed for j in other_base.jobs} != seeds(forward)


def test_repeated_prompts_and_n_get_distinct_seeds_and_names(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a cat", "n": 2}\n{"prompt": "a cat"}\n'
                                       '{"prompt": "a dog", "seed": 7, "n": 2, "name": "dog"}\n')
    plan, _, _ = plan_batch_file(str(path), model="tiny", output_dir="out")
    seeds = [j.seed for j in plan.jobs]
    assert len(set(seeds)) == 5 and seeds[3:] == [7, 8]
    names = [os.path.basename(j.path) for j in plan.jobs]
    assert names[:3] == [f"00001-a-cat-{seeds[0]}.png", f"00001-a-cat-{seeds[1]}.png", f"00002-a-cat-{seeds[2]}.png"]
    assert names[3:] == ["dog-1.png", "dog-2.png"]


def test_colliding_names_are_disambiguated_deterministically(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "x", "name": "00002-a-cat-5"}\n{"prompt": "a cat", "seed": 5}\n')
    plan, _, _ = plan_batch_file(str(path), model="tiny", output_dir="out")
    assert [os.path.basename(j.path) for j in plan.jobs] == ["00002-a-cat-5.png", "00002-a-cat-5-2.png"]


def test_shards_partition_the_gpu_batches(tmp_path, prompts_txt):
    whole, _, _ = plan_batch_file(str(prompts_txt), model="tiny", output_dir="o", batch_size=2)
    parts = [plan_batch_file(str(prompts_txt), model="tiny", output_dir="o", batch_size=2, shard=(i, 3))[0]
             for i in range(3)]
    assert sorted(j.index for p in parts for j in p.jobs) == [j.index for j in whole.jobs]
    assert [len(p.groups) for p in parts] == [1, 1, 1]


def test_dry_run_prints_the_whole_plan_without_torch(tmp_path, prompts_txt):
    code = f"""
import sys
from sana_cli.cli import main
try:
    main(["batch", {str(prompts_txt)!r}, "--model", "tiny", "-o", {str(tmp_path / 'o')!r}, "--dry-run",
          "--batch-size", "4"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("HEAVY", sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert "images:  6 in 2 GPU batch(es)" in out.stdout and "seed" in out.stdout
    assert not (tmp_path / "o").exists()


# ---- running -----------------------------------------------------------------------------------------

def test_batch_writes_images_and_a_manifest_then_resumes_without_work(sana, tmp_path, prompts_txt, tiny_models):
    out = tmp_path / "out"
    first = sana("batch", prompts_txt, "--model", "tiny", "-o", out, "--batch-size", 4, "--json", check_json=True)
    assert first.returncode == 0, first.stderr
    assert first.json["written"] == 6 and first.json["failed"] == 0
    records = manifest(out)
    assert len(records) == 6 and {r["event"] for r in records} == {"image"}
    for record in records:
        assert sha256_file(out / record["file"]) == record["sha256"]
    again = sana("batch", prompts_txt, "--model", "tiny", "-o", out, "--json", "--batch-size", 4, check_json=True)
    assert again.returncode == 0
    assert (again.json["written"], again.json["already_done"], again.json["model"]) == (0, 6, None)  # nothing loaded
    assert sorted(again.json["already_done_paths"]) == sorted(str(out / r["file"]) for r in records)
    assert "resuming: 6 of 6" in again.stderr
    # A deleted image is redone, identical to the first time (its GPU batch is re-rendered whole).
    victim = out / records[2]["file"]
    before = victim.read_bytes()
    victim.unlink()
    third = sana("batch", prompts_txt, "--model", "tiny", "-o", out, "--json", "--batch-size", 4, check_json=True)
    assert (third.json["written"], third.json["already_done"]) == (1, 5)
    assert victim.read_bytes() == before


def test_files_from_other_settings_are_not_overwritten(sana, tmp_path, prompts_txt, tiny_models):
    out = tmp_path / "out"
    assert sana("batch", prompts_txt, "--model", "tiny", "-o", out, "-q").returncode == 0
    changed = sana("batch", prompts_txt, "--model", "tiny", "-o", out, "--seed", 0, "--steps", 3)
    # Different steps: the seeds (and so the names) are the same, but the files are not these images.
    assert changed.returncode == 2 and "were not made by this batch" in one_line_error(changed)
    redo = sana("batch", prompts_txt, "--model", "tiny", "-o", out, "--steps", 3, "--overwrite", "--json",
                check_json=True)
    assert redo.returncode == 0 and redo.json["written"] == 6


def test_pixels_do_not_depend_on_position_shard_or_process_count(tmp_path, prompts_txt, tiny_models):
    env = dict(os.environ, **DETERMINISTIC)

    def run(*args):
        return run_sana("batch", *args, "--model", "tiny", "-q", "--batch-size", "2", env=env, timeout=300)

    assert run(prompts_txt, "-o", tmp_path / "whole").returncode == 0
    for index in range(2):
        assert run(prompts_txt, "-o", tmp_path / "sharded", "--shard", f"{index}/2").returncode == 0
    assert images(tmp_path / "whole") == images(tmp_path / "sharded") and len(images(tmp_path / "whole")) == 6
    assert sorted(p.name for p in (tmp_path / "sharded").glob("results*")) == [
        "results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl"]
    # Reversed file: the same rows give the same images (names carry the line number, so compare by seed).
    reversed_txt = write(tmp_path / "rev.txt", "\n".join(reversed(PROMPTS)))
    assert run(reversed_txt, "-o", tmp_path / "reversed").returncode == 0

    def by_seed(d):
        return {name.rsplit("-", 1)[1]: data for name, data in images(d).items()}

    assert by_seed(tmp_path / "reversed") == by_seed(tmp_path / "whole")


def test_two_processes_with_torchrun_equal_one_process(tmp_path, prompts_txt, tiny_models):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, **DETERMINISTIC)
    process = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "sana_cli", "batch", str(prompts_txt),
                              "--model", "tiny", "-o", str(tmp_path / "two"), "--batch-size", "2", "-q"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    single = run_sana("batch", prompts_txt, "--model", "tiny", "-o", tmp_path / "one", "--batch-size", "2", "-q",
                      env=env, timeout=300)
    assert single.returncode == 0
    assert images(tmp_path / "two") == images(tmp_path / "one") and len(images(tmp_path / "one")) == 6
    merged = manifest(tmp_path / "two")
    assert sorted(r["index"] for r in merged) == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "two").glob("results*")) == ["results.jsonl"]


def test_batch_size_changes_pixels_by_at_most_one_level(sana, tmp_path, prompts_txt, tiny_models):
    for size in (1, 4):
        assert sana("batch", prompts_txt, "--model", "tiny", "-o", tmp_path / str(size), "--batch-size", size,
                    "-q").returncode == 0
    for name in images(tmp_path / "1"):
        a = np.asarray(Image.open(tmp_path / "1" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "4" / name)).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def slow_batch(tmp_path: Path, prompts_txt: Path, out: Path, **popen):
    """A batch slow enough on the tiny model to be interrupted mid-run."""
    return sana_popen(["batch", str(prompts_txt), "--model", "tiny", "-o", str(out), "--size", "256",
                       "--force-size", "--steps", "30", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SANA_PROGRESS_INTERVAL="0", **DETERMINISTIC), **popen)


def wait_for(process, text: str) -> None:
    for line in process.stderr:
        if text in line:
            return
    raise AssertionError(f"never saw {text!r}")


def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path, prompts_txt, tiny_models):
    reference = slow_batch(tmp_path, prompts_txt, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0
    killed = slow_batch(tmp_path, prompts_txt, tmp_path / "killed")
    wait_for(killed, "[2/6] wrote")
    time.sleep(0.3)
    killed.kill()  # SIGKILL: no handler runs
    killed.wait()
    survivors = images(tmp_path / "killed")
    assert 2 <= len(survivors) < 6
    rerun = slow_batch(tmp_path, prompts_txt, tmp_path / "killed")
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert images(tmp_path / "killed") == images(tmp_path / "reference")
    assert not [p for p in (tmp_path / "killed").iterdir() if TEMP_MARK in p.name]
    records = manifest(tmp_path / "killed")  # every line parses; one per image
    assert sorted(r["file"] for r in records if r["event"] == "image") == sorted(images(tmp_path / "reference"))


def test_sigint_finishes_the_current_image_flushes_and_exits_130(tmp_path, prompts_txt, tiny_models):
    process = slow_batch(tmp_path, prompts_txt, tmp_path / "out")
    wait_for(process, "[1/6] wrote")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr.splitlines()[-1]
    written = images(tmp_path / "out")
    assert 1 <= len(written) < 6 and len(stdout.splitlines()) == len(written)
    assert len(manifest(tmp_path / "out")) == len(written)
    rerun = slow_batch(tmp_path, prompts_txt, tmp_path / "out")
    assert rerun.wait(timeout=600) == 0 and len(images(tmp_path / "out")) == 6


def test_a_failing_row_does_not_stop_the_run_exit_3_and_retry(tmp_path, tiny_models):
    """Real failure: RLIMIT_FSIZE lets small PNGs through and fails the one large image."""
    path = write(tmp_path / "p.jsonl", '{"prompt": "small one"}\n{"prompt": "large", "size": 512}\n'
                                       '{"prompt": "small two"}\n')

    command = [SANA, "batch", str(path), "--model", "tiny", "-o", str(tmp_path / "out"), "--force-size", "--json"]
    failed = subprocess.run(limited(command, file_size=300_000), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 3, failed.stderr
    summary = json.loads(failed.stdout)
    assert (summary["written"], summary["failed"]) == (2, 1)
    assert summary["failures"][0]["row"] == 2 and "File too large" in summary["failures"][0]["error"]
    assert "rerun the same command to retry the failed rows" in failed.stderr.splitlines()[-1]
    events = [r["event"] for r in manifest(tmp_path / "out")]
    assert sorted(events) == ["error", "image", "image"]
    assert not [p for p in (tmp_path / "out").iterdir() if TEMP_MARK in p.name]
    fail_fast = subprocess.run(limited(command[:-1] + ["-o", str(tmp_path / "ff"), "--fail-fast"], file_size=300_000),
                               capture_output=True, text=True, timeout=300)
    assert fail_fast.returncode == 1
    retried = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert retried.returncode == 0 and json.loads(retried.stdout)["written"] == 1


def test_shard_option_is_validated(sana, prompts_txt):
    for value in ("3/2", "0/0", "2", "a/b", "-1/2"):
        process = sana("batch", prompts_txt, "--model", "tiny", "--shard", value, "--dry-run")
        assert process.returncode == 2 and "--shard" in one_line_error(process)


OOM_BATCH = """
import json, os, resource, sys
from sana_cli.planning import batchfile
from sana_cli.models.modelref import resolve
from sana_cli.engine.loading import load
from sana_cli.planning.plan import BatchDefaults, plan_batch
from sana_cli.engine.runner import run
loaded = load(resolve("tiny"))
rows, _, _ = batchfile.load(sys.argv[1])
plan, _ = plan_batch(rows, loaded.ref, BatchDefaults(width=768, height=768, steps=2, force_size=True), sys.argv[2],
                     batch_size=16)
os.makedirs(sys.argv[2])
size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
limit = size + 500 * 2**20      # one 768px tiny image fits (~200 MB); a GPU batch of 16 (~750 MB) does not
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
report = run(plan, loaded, keep_text_encoder=False)
print(json.dumps([[r.ok, r.retried_alone, r.error] for r in report.results]))
"""


def test_an_out_of_memory_gpu_batch_is_retried_one_image_at_a_time(tmp_path, tiny_models):
    """Real OOM: with the address space capped, the batch of 16 fails in the allocator; each image
    alone fits, so every image is still made, marked as retried alone."""
    prompts = write(tmp_path / "p.txt", "\n".join(f"a red fox number {i}" for i in range(16)))
    out = run_python(OOM_BATCH, prompts, tmp_path / "out", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results == [[True, True, None]] * 16
    assert len(images(tmp_path / "out")) == 16
