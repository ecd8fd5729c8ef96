"""Multi-process completion without a collective barrier: a process with nothing to do finishes at once,
and a process that fails says so to the main one instead of leaving it waiting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sana_cli.engine import distributed
from sana_cli.engine.distributed import Processes
from sana_cli.errors import UsageError

# torchrun target: the process group's timeout cut to 10 s (a stand-in for NCCL's, which a real run
# reaches after hours), and the main process held back 25 s before it renders, as a slow download would.
SHORT_TIMEOUT = """
import datetime, os, sys, time
import torch.distributed as dist
init = dist.init_process_group
def short(*args, **kwargs):
    kwargs["timeout"] = datetime.timedelta(seconds=10)
    return init(*args, **kwargs)
dist.init_process_group = short
if os.environ["RANK"] == "0":
    from sana_cli.engine import runner
    run = runner.run
    def slow(*args, **kwargs):
        time.sleep(25)
        return run(*args, **kwargs)
    runner.run = slow
from sana_cli.cli import main
main(sys.argv[1:])
"""


def test_a_process_with_no_rows_does_not_wait_on_a_collective(tmp_path, tiny_models):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    script = tmp_path / "short_timeout.py"
    script.write_text(SHORT_TIMEOUT)
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red fox\n")  # one GPU batch: process 1 has nothing to render
    process = subprocess.run([torchrun, "--nproc_per_node", "2", str(script), "batch", str(prompts), "--model", "tiny",
                              "--steps", "2", "-o", str(tmp_path / "out"), "-q"],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    out = tmp_path / "out"
    assert len(list(out.glob("*.png"))) == 1
    assert [json.loads(line)["event"] for line in (out / "results.jsonl").read_text().splitlines()] == ["image"]
    assert not list(out.glob(".sana-done-*")), "completion files are removed after the merge"


def test_a_failed_process_reports_to_the_main_one(tmp_path, monkeypatch):
    main = Processes(index=0, count=3, device="cpu", token="t0k3n")
    monkeypatch.setattr(distributed, "_launched", [Processes(index=2, count=3, device="cpu", token="t0k3n")])

    @distributed.reports_completion
    def failing_batch(source, *, output_dir):
        raise UsageError("the model could not be loaded here")

    with pytest.raises(UsageError):
        failing_batch("x.txt", output_dir=str(tmp_path))
    Processes(index=1, count=3, device="cpu", token="t0k3n").finish(str(tmp_path))
    main.finish(str(tmp_path))
    assert main.wait_for_ranks(str(tmp_path), poll=0.01) == [(2, "the model could not be loaded here")]
    assert list(tmp_path.iterdir()) == []


def test_the_main_process_waits_for_every_completion_file(tmp_path):
    import threading
    import time

    main = Processes(index=0, count=2, device="cpu", token="abc")
    main.finish(str(tmp_path))
    late = threading.Timer(0.5, Processes(index=1, count=2, device="cpu", token="abc").finish, args=(str(tmp_path),))
    started = time.perf_counter()
    late.start()
    assert main.wait_for_ranks(str(tmp_path), poll=0.05) == []
    assert time.perf_counter() - started >= 0.45
