"""The attach protocol is defined once (sana_cli.server.wire) for both sides: what the server's render loop and
routes make is what the attached client accepts, and an error answer becomes the error the CLI would have
raised itself. Torch-free: planning, the real result types and the real encoders and readers."""

from __future__ import annotations

import json

import pytest

from sana_cli.errors import EnvironmentProblem, GenerationError, UsageError
from sana_cli.planning.plan import Request, model_for, plan_generate
from sana_cli.reporting.results import ImageResult, RunOutcome
from sana_cli.server import wire
from sana_cli.storage.files import Written


def _jobs(tmp_path, n=2):
    request = Request(prompt="a lighthouse", model="sana-600m-512", num_images=n, seed=7,
                      output=str(tmp_path / "a.png"))
    return plan_generate(request, model_for(request)).jobs


def _line_to_event(message: dict, by_index: dict, data: bytes | None = None) -> dict:
    """What the attached stream sends for a render-loop message, read back as the client reads it."""
    message = dict(message)
    message.pop("path", None)
    line = wire.attached_line(message, data)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return wire.read_event(line, by_index, set())


def test_every_event_the_server_makes_is_one_the_client_accepts_with_its_values(tmp_path):
    jobs = _jobs(tmp_path)
    by_index = {job.index: job for job in jobs}
    first, second = jobs
    assert _line_to_event(wire.step_event(3, 20), by_index) == {"type": "step", "step": 3, "total": 20}
    assert _line_to_event(wire.batch_event(1, 2, [first.index, second.index]), by_index)["indices"] == \
        [first.index, second.index]
    for kind in ("warning", "note"):
        assert _line_to_event(wire.text_event(kind, "slow disk"), by_index) == {"type": kind, "message": "slow disk"}

    encoded = b"\x89PNG\r\n\x1a\n not really an image, carried as bytes"
    written = ImageResult(job=first, written=Written(first.path, len(encoded), "0" * 64), decode="tiled",
                          fallbacks=("tiled",), seconds=1.23456, retried_alone=True)
    image = _line_to_event(wire.result_event(written, first.index), by_index, encoded)
    assert image == {"type": "image", "index": first.index, "decode": "tiled", "fallbacks": ("tiled",),
                     "seconds": 1.2346, "retried_alone": True, "data": encoded}

    failed = ImageResult(job=second, error="out of memory after every fallback", error_exit_code=4)
    event = _line_to_event(wire.result_event(failed, second.index), by_index)
    assert (event["type"], event["error"], event["exit_code"]) == ("failed", "out of memory after every fallback", 4)

    outcome = RunOutcome(timings={"encode": 0.5, "denoise": 2.0, "decode": 0.25, "write": 0.1},
                         peak_memory_bytes=123, peak_reserved_bytes=456)
    description = {"model": "sana-600m-512", "model_id": "org/name", "revision": None, "commit": "abc",
                   "pipeline": "SanaPipeline", "dtype": "bfloat16", "device": "cpu"}
    done = _line_to_event(wire.done_event(outcome, description), by_index)
    assert done == {"type": "done", "model": description, "peak_memory_bytes": 123, "peak_reserved_bytes": 456,
                    "timings": {"encode": 0.5, "denoise": 2.0, "decode": 0.25}}

    error = _line_to_event(wire.error_event("the work queue stopped", 4, 503), by_index)
    assert error == {"type": "error", "status": 503, "message": "the work queue stopped", "exit_code": 4}


def test_an_image_line_at_the_planned_size_fits_the_bound_the_client_holds_it_to(tmp_path):
    job = _jobs(tmp_path, n=1)[0]
    worst = bytes(job.width * job.height * 4)  # an incompressible image: 4 bytes a pixel
    result = ImageResult(job=job, written=Written(job.path, len(worst), "0" * 64), decode="full")
    message = wire.result_event(result, job.index)
    message.pop("path")
    assert len(wire.attached_line(message, worst)) <= wire.image_line_limit(job)


@pytest.mark.parametrize("exc, status, kind, code", [
    (UsageError("bad size"), 400, UsageError, 2),
    (EnvironmentProblem("no CUDA"), 503, EnvironmentProblem, 4),
    (GenerationError("NaNs in the latents"), 500, GenerationError, 1),
])
def test_an_error_answer_is_read_back_as_the_error_the_cli_would_raise(exc, status, kind, code):
    from sana_cli.server.http_io import from_sana

    answer = from_sana(exc, "jobs")
    assert answer.status == status
    body = json.loads(json.dumps(answer.body()))
    assert set(body["error"]) == {"message", "type", "param", "code", "exit_code"}
    back = wire.error_from(answer.status, body)
    assert type(back) is kind and back.exit_code == code and back.message == exc.line()
    assert wire.error_text(body) == exc.line()


def test_the_handshake_accepts_this_installation_and_nothing_else(monkeypatch):
    answer = json.loads(json.dumps(wire.health_answer(pid=1, loaded=["tiny"], queued=0, draining=False)))
    assert wire.same_installation(answer)
    assert not wire.same_installation({**answer, "key_schema": answer["key_schema"] + 1})
    assert not wire.same_installation({**answer, "sana_cli": "0.0.0"})
    assert not wire.same_installation({k: v for k, v in answer.items() if k != "key_schema"})


def test_the_jobs_a_client_sends_are_the_jobs_the_server_checks_and_queues(tmp_path):
    """The client's request body, through JSON, is taken by the server's intake as the same jobs (its own
    paths, the format each path asks for); a field the server does not know is refused, not dropped."""
    from dataclasses import replace

    from sana_cli.planning.plan import LoadOptions
    from sana_cli.server import intake
    from sana_cli.server.openai_images import ApiError
    from sana_cli.server.state import ServerConfig, ServerState
    from sana_cli.server.work_queue import Scheduler

    request = Request(prompt="a lighthouse", model="sana-600m-512", num_images=2, seed=7, steps=3, guidance=3.5,
                      output=str(tmp_path / "a.webp"))
    ref = model_for(request)
    options = LoadOptions()
    jobs = plan_generate(request, ref, options.pixels(options.decode_for("auto"))).jobs
    state = ServerState(scheduler=Scheduler(window=30), config=ServerConfig(
        api_key=None, output_dir=tmp_path / "out", scratch_dir=tmp_path / "scratch", load=options, models=[]))
    body = json.loads(json.dumps(wire.jobs_request(ref, options, decode="auto", force_size=False, jobs=jobs)))
    work = intake.attached_work(state, body)
    assert (work.ref.source, work.options, work.decode, work.force_size) == (ref.source, options, "auto", False)
    assert [replace(job, path="") for job in work.jobs] == [replace(job, path="") for job in jobs]
    assert all(job.path.startswith(str(tmp_path / "scratch")) and job.path.endswith(".webp") for job in work.jobs)

    body["jobs"][0]["brand_new_field"] = 1
    with pytest.raises(ApiError) as refused:
        intake.attached_work(state, body)
    assert refused.value.status == 400 and "brand_new_field" in refused.value.message


def test_a_jobs_input_files_travel_as_bytes_the_server_checks_by_hash_and_never_its_path(tmp_path, tiny_models):
    """An img2img job's start image goes to the server as its bytes: the server plans with its own copy (here
    the client's file is replaced by text after planning, and the server still takes the job: it never
    opened that path), keeps the copy by sha256 in its scratch directory while the work lives, and lets go of
    it when the work finishes. Bytes that do not hash to the sha256 they are sent as, a file a job names but
    the request lacks, and a file no job names are each a 400 with one message, nothing kept pinned."""
    import base64
    import hashlib

    from PIL import Image

    from sana_cli.planning.plan import LoadOptions
    from sana_cli.server import intake
    from sana_cli.server.openai_images import ApiError
    from sana_cli.server.state import ServerConfig, ServerState
    from sana_cli.server.work_queue import Scheduler

    start = tmp_path / "start.png"
    Image.new("RGB", (128, 128), (10, 200, 30)).save(start)
    request = Request(prompt="a street", model="tiny-sprint", seed=3, image=str(start), strength=0.5,
                      output=str(tmp_path / "a.png"))
    ref = model_for(request)
    options = LoadOptions()
    jobs = plan_generate(request, ref, options.pixels()).jobs
    sources = wire.file_sources(jobs)
    files = wire.input_files(jobs, sources)
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    assert list(files) == [digest] == [jobs[0].image_sha256]
    body = json.loads(json.dumps(wire.jobs_request(ref, options, decode="auto", force_size=False, jobs=jobs,
                                                   files=files)))
    start.write_text("not an image any more")  # the server must not look here
    state = ServerState(scheduler=Scheduler(window=30), config=ServerConfig(
        api_key=None, output_dir=tmp_path / "out", scratch_dir=tmp_path / "scratch", load=options, models=[]))
    work = intake.attached_work(state, body)
    copy = tmp_path / "scratch" / "inputs" / digest
    assert work.inputs == {digest: str(copy)} and work.jobs[0].image == str(start)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest and oct(copy.stat().st_mode & 0o777) == "0o600"
    work.finish()
    assert state.config.inputs._pins == {}

    def refused(changed: dict, says: str) -> None:
        with pytest.raises(ApiError) as caught:
            intake.attached_work(state, {**body, **changed})
        assert caught.value.status == 400 and says in caught.value.message, caught.value.message
        assert state.config.inputs._pins == {}

    other = base64.b64encode(b"other bytes").decode()
    refused({"files": {digest: other}}, "do not hash to the sha256")
    refused({"files": {}}, "was not sent with the job (a server never opens a client's path)")
    refused({"files": {**body["files"], hashlib.sha256(b"x").hexdigest(): base64.b64encode(b"x").decode()}},
            "a file no job names")
    refused({"files": {digest: "!!not base64!!"}}, "are not base64")
