"""Reliability under hostile conditions, with real processes, signals, pipes, FIFOs, terminals and
file-size limits: sana-cli touches only its own files, several runs share one output directory
without losing a record or rendering an image twice, resume never takes an image made with other
options, every input is bounded, and the output contract holds whatever happens to stdout/stderr."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sana_cli.planning import batchfile
from sana_cli.storage import manifest as manifests, files as output
from sana_cli.storage.files import TEMP_MARK
from sana_cli.storage.images import read_metadata
from sana_cli.planning.plan import PixelOptions, Request, model_for, plan_generate

from .conftest import SANA, limited, one_line_error, run_sana, sana_popen

PROMPTS = [f"a red fox number {i}" for i in range(1, 9)]


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def snapshot(directory: Path) -> dict:
    """Every entry below directory: its kind, bytes (or link target) and modification time."""
    state = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path), info.st_mtime_ns)
            elif path.is_dir():
                state[str(path)] = ("dir", None, None)
            else:
                state[str(path)] = ("file", path.read_bytes(), info.st_mtime_ns)
    return state


def records(directory: Path, name="results.jsonl") -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def sana_batch(*args, **kwargs):
    return run_sana("batch", *args, timeout=300, **kwargs)


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


# ---- only our own files, and nothing changed by a run that refuses ------------------------------------

def test_a_users_results_notes_file_is_never_touched(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    notes = out / "results-notes.jsonl"
    notes.write_bytes(b"my notes, not JSON\n{\"a\": 1}\n[1, 2]\n{\"event\": \"im")
    before = notes.read_bytes()
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:2])
    assert sana_batch(prompts, "--model", "tiny", "-o", out, "-q").returncode == 0
    assert notes.read_bytes() == before
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "colour": "red"}\n')
    refused = sana_batch(bad, "--model", "tiny", "-o", out)
    assert refused.returncode == 2 and notes.read_bytes() == before
    assert sana_batch(prompts, "--model", "tiny", "-o", out, "-q").returncode == 0  # a resume reads no notes
    assert notes.read_bytes() == before


def test_a_run_that_refuses_leaves_the_directory_byte_identical(tmp_path, tiny_models):
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:2])
    assert sana_batch(prompts, "--model", "tiny", "-o", out, "-q").returncode == 0
    stray = out / f".x.png{TEMP_MARK}{output._host()}-{dead_pid()}-abcd1234"  # left by a killed run
    stray.write_bytes(b"half an image")
    claim = out / f".x.png{manifests.CLAIM_SUFFIX}"
    claim.write_text(f"{output._host()} {dead_pid()} abcd\n")
    with open(out / "results.jsonl", "ab") as handle:
        handle.write(b'{"event": "image", "fi')  # a torn last line
    before = snapshot(out)
    conflict = sana_batch(prompts, "--model", "tiny", "-o", out, "--steps", 3)
    assert conflict.returncode == 2 and "were not made by this batch" in one_line_error(conflict)
    assert snapshot(out) == before


def test_a_manifest_that_links_out_of_the_directory_is_refused(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes(b'{"event": "image", "file": "x.png", "key": "k"}\n')
    (out / "results.jsonl").symlink_to(outside)
    before, outside_before = snapshot(out), outside.read_bytes()
    process = sana_batch(write_prompts(tmp_path / "p.txt", PROMPTS[:1]), "--model", "tiny", "-o", out)
    assert process.returncode == 2 and "is a symbolic link" in one_line_error(process)
    assert snapshot(out) == before and outside.read_bytes() == outside_before
    # A reader never follows it either.
    assert manifests.read_manifests(out) == []


# ---- several processes on one directory ----------------------------------------------------------------

def test_concurrent_batches_share_the_work_without_losing_a_record(tmp_path, tiny_models):
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.txt")
    command = ["batch", str(prompts), "--model", "tiny", "-o", str(out), "--batch-size", "1", "-q"]
    runs = [sana_popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err for _, err in results]
    printed = [line for stdout, _ in results for line in stdout.splitlines()]
    assert len(printed) == len(set(printed)) == len(PROMPTS)  # each image rendered by exactly one process
    found = records(out)
    assert Counter(r["event"] for r in found) == {"image": len(PROMPTS)}
    assert sorted(r["file"] for r in found) == sorted(os.path.basename(p) for p in printed)
    for record in found:
        assert output.sha256_file(out / record["file"]) == record["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["file"] for r in found), "results.jsonl"])


def test_an_image_claimed_by_a_live_process_is_waited_for_and_a_dead_ones_claim_taken_over(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:3])
    plan = json.loads(run_sana("batch", prompts, "--model", "tiny", "-o", out, "--dry-run", "--json").stdout)
    paths = [Path(image["path"]) for image in plan["images"]]
    live = manifests.claim_path_for(paths[0])
    live.write_text(f"{output._host()} {os.getpid()} test\n")  # this test process holds image 1
    manifests.claim_path_for(paths[1]).write_text(f"{output._host()} {dead_pid()} gone\n")  # killed holder
    run = sana_popen(["batch", str(prompts), "--model", "tiny", "-o", str(out), "--batch-size", "1", "--json"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (paths[1].exists() and paths[2].exists()) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert run.poll() is None, "the run did not wait for the image another process holds"
    assert not paths[0].exists()
    live.unlink()  # the holder gave up without making it: the waiting run renders it
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "waiting for another process to finish" in stderr  # never a silent wait
    assert json.loads(stdout)["written"] == 3 and all(path.exists() for path in paths)
    assert not list(out.glob(f"*{manifests.CLAIM_SUFFIX}*"))


def test_something_else_in_a_claims_place_is_refused(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:1])
    plan = json.loads(run_sana("batch", prompts, "--model", "tiny", "-o", out, "--dry-run", "--json").stdout)
    claim = manifests.claim_path_for(plan["images"][0]["path"])
    claim.symlink_to(tmp_path / "elsewhere")
    run = sana_batch(prompts, "--model", "tiny", "-o", out)
    assert run.returncode == 2 and "is in the way: it is not a sana-cli claim file" in one_line_error(run)
    assert not (tmp_path / "elsewhere").exists() and claim.is_symlink()


def test_manifest_appends_of_many_writers_are_all_kept(tmp_path):
    """Processes appending to one manifest while one of them merges parts into it: nothing is lost."""
    code = ("import sys; from sana_cli.storage import manifest as manifests\n"
            "m = manifests.Manifest(sys.argv[1])\n"
            "for i in range(200):\n"
            "    m.append({'event': 'image', 'file': f'{sys.argv[2]}-{i}.png', 'key': 'k', 'pad': 'x' * 3000})\n")
    part = tmp_path / "results.rank-1-of-2.jsonl"
    part.write_text("".join(json.dumps({"event": "image", "file": f"part-{i}.png", "key": "k"}) + "\n"
                            for i in range(50)))
    writers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "results.jsonl"), f"w{n}"])
               for n in range(3)]
    manifests.merge_manifests(tmp_path, [part.name])
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    files = Counter(r["file"] for r in manifests.read_manifests(tmp_path))
    assert len(files) == 3 * 200 + 50 and set(files.values()) == {1}
    assert not part.exists()


# ---- the job key ----------------------------------------------------------------------------------------

def test_the_job_key_covers_every_pixel_option_and_the_metadata_names_them():
    request = Request(prompt="a cat", model="tiny", seed=1, output="x.png")

    def key(**options):
        return plan_generate(request, model_for(request), PixelOptions(**options)).jobs[0].key

    base = key()
    changed = {"dtype": "bf16", "device": "cpu", "fp8": True, "decode": "tiled", "quantize": "int8"}
    assert set(changed) == set(PixelOptions.__dataclass_fields__)  # a new pixel option needs a case here
    for name, value in changed.items():
        assert key(**{name: value}) != base, name
    # Inputs that cannot change a pixel keep the key.
    assert key(decode="strips") == key(decode="full") == key(decode="patch-conv") == base
    assert key(device="cuda:1") == key(device="cuda") and key(dtype="bfloat16") == key(dtype="bf16")


@pytest.mark.parametrize("rerun, done", [
    (["--dtype", "bf16"], False), (["--device", "cpu"], False), (["--fp8"], False), (["--decode", "tiled"], False),
    (["--decode", "strips"], True), (["--quantize", "int8"], False),
])
def test_a_rerun_with_other_pixel_options_never_takes_the_old_images(tmp_path, tiny_models, rerun, done):
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:1])
    assert sana_batch(prompts, "--model", "tiny", "-o", out, "-q").returncode == 0
    image = next(out.glob("*.png"))
    meta = read_metadata(image)["sana"]
    assert meta["pixel_options"] == {"device": "auto", "dtype": "auto", "fp8": False, "decode": "auto"}
    assert meta["key_schema"] >= 2
    again = sana_batch(prompts, "--model", "tiny", "-o", out, "--json", *rerun)
    if done:
        assert again.returncode == 0 and json.loads(again.stdout)["already_done"] == 1
    else:
        assert again.returncode == 2 and "were not made by this batch" in one_line_error(again)


# ---- a dead writer, signals ------------------------------------------------------------------------------

def test_a_manifest_that_cannot_be_written_ends_the_run_with_one_line_and_exit_1(tmp_path, tiny_models):
    """A real full disk for the manifest: the file-size limit lets images through but not the
    manifest, which an earlier run filled almost to the limit."""
    out = tmp_path / "out"
    out.mkdir()
    line = json.dumps({"event": "error", "file": "old.png", "key": "0", "error": "x" * 400}) + "\n"
    (out / "results.jsonl").write_text(line * (59_900 // len(line)))
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:4])

    full = subprocess.run(limited([SANA, "batch", str(prompts), "--model", "tiny", "-o", str(out), "--batch-size", "1",
                                   "--json"], file_size=60_000), capture_output=True, text=True, timeout=120)
    assert full.returncode == 1, full.stderr
    assert "cannot write the manifest" in one_line_error(full) and "Traceback" not in full.stderr
    assert json.loads(full.stdout)["exit_code"] == 1
    made = sorted(p.name for p in out.glob("*.png"))
    assert 1 <= len(made) < 4
    rerun = sana_batch(prompts, "--model", "tiny", "-o", out, "--batch-size", "1", "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["already_done"], summary["written"]) == (len(made), 4 - len(made))
    assert sorted({r["file"] for r in manifests.read_manifests(out) if r["event"] == "image"}) == \
        sorted(p.name for p in out.glob("*.png"))


def test_two_sigterms_end_a_batch_at_once(tmp_path, tiny_models):
    prompts = write_prompts(tmp_path / "p.txt")
    run = sana_popen(["batch", str(prompts), "--model", "tiny", "-o", str(tmp_path / "out"), "--size", "256",
                      "--force-size", "--steps", "200", "--batch-size", "1"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env=dict(os.environ, SANA_PROGRESS_INTERVAL="0"))
    for line in run.stderr:
        if "step 2/" in line:
            break
    run.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 143, stderr
    assert "aborted" in stderr.splitlines()[-1]
    assert not [p for p in (tmp_path / "out").iterdir() if TEMP_MARK in p.name or manifests.CLAIM_SUFFIX in p.name]


# ---- the output contract ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["generate", "a cat", "--json", "--colour", "red"],
    ["generate", "--json"],
    ["batch", "x.txt", "--json", "--shard", "3/2"],
    ["generate", "a cat", "--json", "--size", "big"],
])
def test_json_prints_one_object_for_option_errors_too(args):
    process = run_sana(*args, timeout=60)
    assert process.returncode == 2
    result = json.loads(process.stdout)
    assert result["ok"] is False and result["exit_code"] == 2 and result["error"] in one_line_error(process)


def full_pipe() -> tuple[int, int, int]:
    """A pipe whose buffer is already full: a child writing to it blocks until the reader drains."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    filled = 0
    try:
        while True:
            filled += os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    return read_end, write_end, filled


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]])
def test_a_signal_while_the_result_is_written_changes_nothing(tmp_path, tiny_models, signals):
    read_end, write_end, filled = full_pipe()
    run = sana_popen(["generate", "a red fox", "--model", "tiny", "--seed", "4", "-o", str(tmp_path / "f.png"),
                      "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    for line in run.stderr:
        if "wrote" in line:
            break
    time.sleep(3)  # now blocked writing the JSON result into the full pipe
    for number in signals:
        run.send_signal(number)
        time.sleep(0.3)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    assert run.wait(timeout=60) == 0
    text = b"".join(chunks)[filled:].decode()
    result = json.loads(text)  # exactly one object: json.loads refuses two
    assert result["ok"] is True and result["images"][0]["path"] == str(tmp_path / "f.png")


def test_a_closed_stderr_loses_no_image_and_no_record(tmp_path, tiny_models):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:3])
    # Started with descriptor 2 closed, as `2>&-` in a shell does (the shell closes it, then execs).
    run = subprocess.run(["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", SANA, "batch", str(prompts), "--model", "tiny",
                          "-o", str(tmp_path / "out"), "--json"], stdout=subprocess.PIPE, text=True, timeout=300)
    assert run.returncode == 0
    assert json.loads(run.stdout)["written"] == 3
    found = records(tmp_path / "out")
    assert Counter(r["event"] for r in found) == {"image": 3}
    for record in found:  # no stray text landed in a file that took descriptor 2
        assert output.sha256_file(tmp_path / "out" / record["file"]) == record["sha256"]


def test_a_broken_stderr_pipe_loses_no_image_and_no_record(tmp_path, tiny_models):
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stderr fails with EPIPE, as after `2>&1 | head -1`
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:3])
    run = run_sana("batch", prompts, "--model", "tiny", "-o", tmp_path / "out", "--json", "--batch-size", "1",
                   stderr=write_end, timeout=300, env={"SANA_PROGRESS_INTERVAL": "0"})
    os.close(write_end)
    assert run.returncode == 0
    assert json.loads(run.stdout)["written"] == 3
    assert Counter(r["event"] for r in records(tmp_path / "out")) == {"image": 3}


def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_1(tmp_path, tiny_models):
    with open("/dev/full", "w") as full:
        run = run_sana("generate", "a red fox", "--model", "tiny", "--seed", "1", "-o", tmp_path / "f.png",
                       stdout=full, timeout=120)
    assert run.returncode == 1
    assert "cannot write the results to stdout" in one_line_error(run)
    assert read_metadata(tmp_path / "f.png")["sana"]["seed"] == 1


@pytest.mark.parametrize("args", [["info", "{image}"], ["info", "{image}", "--command"], ["models"],
                                  ["doctor", "--json"]], ids=["info", "info-command", "models", "doctor"])
def test_every_command_into_a_closed_pipe_is_one_line_and_exit_1(args, tmp_path):
    """`sana info IMAGE | head -0`: the reader is gone before anything is written (Python ignores
    SIGPIPE, so the write fails with EPIPE); every command answers that the same way."""
    from PIL import Image

    from sana_cli.storage.images import encode_image

    image = tmp_path / "x.png"
    image.write_bytes(encode_image(Image.new("RGB", (8, 8)), "PNG", {"prompt": "p", "model": "tiny", "width": 128,
                                                                     "height": 128, "steps": 4, "guidance": 4.5,
                                                                     "seed": 1}))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = run_sana(*[a.format(image=image) for a in args], stdout=write_end, timeout=120)
    finally:
        os.close(write_end)
    assert run.returncode == 1, run.stderr
    assert "cannot write the results to stdout" in one_line_error(run)


# ---- bounded input, never a silent wait -----------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["generate", "-", "--model", "tiny", "--dry-run"], "larger than 1 MiB"),
    (["batch", "-", "--model", "tiny", "--dry-run"], "stdin is a binary file"),
])
def test_endless_stdin_is_bounded(args, says):
    with open("/dev/zero", "rb") as zero:
        run = run_sana(*args, stdin=zero, timeout=60)
    assert run.returncode == 2 and says in one_line_error(run)


def test_a_terminal_on_stdin_is_told_how_to_end_the_prompt(tmp_path):
    controller, terminal = pty.openpty()
    run = sana_popen(["generate", "-", "--model", "tiny", "--seed", "1", "--dry-run", "--json"],
                     stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(terminal)
    line = run.stderr.readline()
    assert "from the terminal; end it with Ctrl-D" in line
    os.write(controller, b"a cat on the moon\n\x04")
    stdout, _ = run.communicate(timeout=60)
    os.close(controller)
    assert run.returncode == 0 and json.loads(stdout)["images"][0]["prompt"] == "a cat on the moon"


def test_a_fifo_without_a_writer_gets_a_notice_and_ctrl_c_stops_it(tmp_path):
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    # Started as a shell starts it: the child inherits this process's SIGINT disposition and signal mask,
    # which the autouse signals_left_as_found fixture keeps as they were (no preexec_fn: see conftest.limited).
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN and signal.SIGINT not in signal.pthread_sigmask(
        signal.SIG_BLOCK, [])
    run = sana_popen(["batch", str(fifo), "--model", "tiny", "--dry-run"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([run.stderr], [], [], 30)
    assert ready, "no notice while waiting on a FIFO"
    assert "still waiting for" in run.stderr.readline()
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 130 and "interrupted" in stderr.splitlines()[-1]
    # With a writer it simply works.
    run = sana_popen(["batch", str(fifo), "--model", "tiny", "--dry-run", "--json", "-o", str(tmp_path / "o")],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "w") as writer:  # blocks until the child opens the FIFO; a child that died is seen below
        writer.write("a cat\na dog\n")
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    assert len(json.loads(stdout)["images"]) == 2


# ---- line splitting -------------------------------------------------------------------------------------

ODD = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"  # str.splitlines splits at every one of these


def test_jsonl_written_with_ensure_ascii_false_loads_exactly(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fox " + ODD, "seed": 1}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"prompt": "second"}, ensure_ascii=False) + "\n", encoding="utf-8")
    rows, errors, _ = batchfile.load(str(path))
    assert errors == [] and [(r.line, r.prompt) for r in rows] == [(1, "fox " + ODD), (2, "second")]


def test_txt_lines_end_only_at_newlines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first " + ODD + "\r\nsecond\n\nfourth\n", encoding="utf-8")
    rows, errors, _ = batchfile.load(str(path))
    assert [(r.line, r.prompt) for r in rows] == [(1, "first " + ODD), (2, "second"), (4, "fourth")]


def test_utf16_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\r\na dog\r\n", encoding="utf-16")
    rows, _, _ = batchfile.load(str(path))
    assert [r.prompt for r in rows] == ["a cat", "a dog"]


# ---- found before torch is imported ---------------------------------------------------------------------

BEFORE_TORCH = """
import sys
from sana_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    print("EXIT", exit.code)
print("HEAVY", sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))
"""


@pytest.mark.parametrize("args, env, code", [
    (["generate", "a cat", "--model", "tiny", "--device", "gpu"], {}, 2),
    (["generate", "caf\udce9", "--model", "tiny"], {}, 2),
    (["generate", "a cat", "--model", "tiny"], {"SANA_PROGRESS_INTERVAL": "soon"}, 2),
    (["generate", "a cat", "--model", "tiny"], {"SANA_CLI_CACHE": "{file}"}, 4),
    (["batch", "{prompts}", "--model", "tiny", "-o", "{manifest_dir}"], {}, 2),
])
def test_environment_and_usage_errors_are_found_before_torch_is_imported(tmp_path, args, env, code):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "out" / "results.jsonl").mkdir(parents=True)
    write_prompts(tmp_path / "p.txt", PROMPTS[:1])
    fill = dict(file=tmp_path / "a-file", prompts=tmp_path / "p.txt", manifest_dir=tmp_path / "out")
    args = [a.format(**fill) for a in args]
    env = {key: value.format(**fill) for key, value in env.items()}
    run = subprocess.run([sys.executable, "-c", BEFORE_TORCH, *args], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, **env), cwd=tmp_path)
    lines = run.stdout.strip().splitlines()
    assert lines[-2:] == [f"EXIT {code}", "HEAVY []"], run.stderr
    assert "Traceback" not in run.stderr
