"""`sana serve` with real parts: a real server process on a free loopback port and its user-only Unix
socket, the official `openai` client, curl, the installed `sana` attached through the socket, real
signals (SIGTERM, kill -9) and real client disconnects.

Server A (this module's, no API key) carries most tests; server B is killed with -9 under a waiting CLI;
server C has an API key and is stopped with SIGTERM while requests are in flight.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import one_line_error, run_sana, sana_popen


class Server:
    """A `sana serve` subprocess whose stderr is collected line by line."""

    def __init__(self, cache: Path, *args: str, env: dict | None = None):
        self.cache = cache
        self.env = dict(os.environ, SANA_CLI_CACHE=str(cache), **(env or {}))
        self.lines: list[str] = []
        self.process = sana_popen(["serve", "--port", "0", *args], env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = int(self.wait_for("listening on http://127.0.0.1:").split("127.0.0.1:")[1].split()[0])
        self.socket = cache / "serve" / "sana.sock"

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, fragment: str, timeout: float = 90, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if fragment in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"server never logged {fragment!r}:\n" + "\n".join(self.lines))

    def log(self) -> str:
        return "\n".join(self.lines)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, body, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def _copy_tiny(source_cache: Path, cache: Path) -> None:
    """Give a server cache the tiny models already built (a build costs seconds)."""
    for tiny in source_cache.glob("tiny-*"):
        shutil.copytree(tiny, cache / tiny.name, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, cache_dir):
    cache = tmp_path_factory.mktemp("serve-a")
    _copy_tiny(cache_dir, cache)
    started = Server(cache, "--model", "tiny", "--batch-window", "0.5")
    yield started
    started.stop()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _in_process(tmp_path: Path, name: str, **request) -> bytes:
    import sana_cli

    out = tmp_path / f"{name}.png"
    sana_cli.generate(model="tiny", output=str(out), **request)
    return out.read_bytes()


# ---- transparent attach ----------------------------------------------------------------------------

def test_attached_generate_writes_the_in_process_bytes_and_json(server, tmp_path):
    attached = run_sana("generate", "a red fox", "--model", "tiny", "--seed", 11, "-o", tmp_path / "a.png", "--json",
                        env=server.env, check_json=True)
    assert attached.returncode == 0, attached.stderr
    assert "rendering on the server at unix:" in attached.stderr
    assert "loading" not in attached.stderr  # the model was warm
    reference = _in_process(tmp_path, "ref", prompt="a red fox", seed=11)
    assert (tmp_path / "a.png").read_bytes() == reference  # same pixels and the same metadata
    image = attached.json["images"][0]
    assert image["path"] == str(tmp_path / "a.png") and image["seed"] == 11
    assert attached.json["model"]["model"] == "tiny" and attached.json["ok"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    again = run_sana("generate", "a red fox", "--model", "tiny", "--seed", 11, "-o", tmp_path / "a.png",
                     env=server.env)
    assert again.returncode == 2 and "already exists" in one_line_error(again)  # never overwrites, as in-process


def test_attached_client_imports_neither_torch_nor_the_http_framework(server, tmp_path):
    import sys

    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "sana_cli", "generate", "a cat", "--model",
                              "tiny", "--seed", "4", "-o", str(tmp_path / "c.png")], env=server.env,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0 and "rendering on the server" in process.stderr, process.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in process.stderr.splitlines()
                if line.startswith("import time:")}
    assert "sana_cli" in imported and not imported & {"torch", "diffusers", "transformers", "fastapi", "uvicorn"}


def test_attached_batch_resumes_and_matches_in_process(server, tmp_path):
    import sana_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na fox\n")
    attached = run_sana("batch", prompts, "--model", "tiny", "--force-size", "-o", tmp_path / "att", "--json",
                        env=server.env, check_json=True)
    assert attached.returncode == 0, attached.stderr
    assert "rendering on the server" in attached.stderr and attached.json["written"] == 3
    sana_cli.batch(str(prompts), model="tiny", output_dir=str(tmp_path / "ref"), defaults=_force_size())
    for image in (tmp_path / "ref").glob("*.png"):
        assert (tmp_path / "att" / image.name).read_bytes() == image.read_bytes()
    rerun = run_sana("batch", prompts, "--model", "tiny", "--force-size", "-o", tmp_path / "att", "--json",
                     env=server.env, check_json=True)
    assert rerun.returncode == 0 and rerun.json["already_done"] == 3 and rerun.json["written"] == 0
    records = [json.loads(line) for line in (tmp_path / "att" / "results.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["image"] * 3 and all(r["model"] == "tiny" for r in records)


def _force_size():
    from sana_cli.planning.plan import BatchDefaults

    return BatchDefaults(force_size=True)


def test_no_server_and_what_a_server_cannot_do_the_same_way_run_here(server, tmp_path, tiny_dir):
    from sana_cli.server.client import attach_blocker
    from sana_cli.models.modelref import resolve
    from sana_cli.planning.plan import LoadOptions

    forced = run_sana("generate", "a cat", "--model", "tiny", "--seed", 1, "--no-server", "-o", tmp_path / "a.png",
                      env=server.env)
    assert forced.returncode == 0 and "rendering on the server" not in forced.stderr
    assert "loading tiny" in forced.stderr
    tiny = resolve("tiny")
    assert attach_blocker(tiny, LoadOptions(), keep_latents=False) is None
    assert "--max-memory" in attach_blocker(tiny, LoadOptions(max_memory_gib=4), keep_latents=False)
    assert "--keep-latents" in attach_blocker(tiny, LoadOptions(), keep_latents=True)
    assert "local model directory" in attach_blocker(resolve(str(tiny_dir)), LoadOptions(), keep_latents=False)


def _start_image(path: Path, size=(96, 80), seed: int = 0) -> Path:
    """A noisy RGBA start image (transparency to composite, a size to resize and crop)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA").save(path)
    return path


def test_attached_image_and_control_image_render_on_the_server_with_the_no_server_bytes(server, tmp_path):
    """The attaching CLI reads --image, --mask and --control-image and sends their bytes; the server renders
    them (its log has the run, the CLI says it renders there and never that it renders here), and the files
    are the bytes of a --no-server run."""
    start = _start_image(tmp_path / "in.png")
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tri(80, 96, dtype=np.uint8) * 255).save(mask)  # the start image's size: repaint one half
    runs = {"img2img": ("a street at night", "--model", "tiny-sprint", "--seed", 3, "--image", start,
                        "--strength", 0.5),
            "inpaint": ("a street at night", "--model", "tiny", "--seed", 4, "--steps", 4, "--image", start,
                        "--strength", 0.75, "--mask", mask),
            "control": ("a castle", "--model", "tiny", "--seed", 2, "--steps", 3, "--controlnet", "tiny-controlnet",
                        "--control-image", start)}
    for name, args in runs.items():
        before = len(server.lines)
        attached = run_sana("generate", *args, "-o", tmp_path / f"{name}-att.png", env=server.env)
        assert attached.returncode == 0, attached.stderr
        assert "rendering on the server at unix:" in attached.stderr and "rendering here" not in attached.stderr
        assert "loading" not in attached.stderr  # nothing loaded in the client
        server.wait_for("attached run of 1 image(s)", after=before)
        alone = run_sana("generate", *args, "-o", tmp_path / f"{name}-ref.png", "--no-server", env=server.env)
        assert alone.returncode == 0, alone.stderr
        assert (tmp_path / f"{name}-att.png").read_bytes() == (tmp_path / f"{name}-ref.png").read_bytes(), name


def test_an_attached_batch_sends_its_rows_images_and_matches_no_server(server, tmp_path):
    starts = [_start_image(tmp_path / f"s{i}.png", seed=i) for i in range(2)]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"a street {i}", "seed": i, "image": str(path), "strength": 0.6})
                            + "\n" for i, path in enumerate(starts)))
    attached = run_sana("batch", rows, "--model", "tiny-sprint", "-o", tmp_path / "att", "--json", env=server.env,
                        check_json=True)
    assert attached.returncode == 0, attached.stderr
    assert "rendering on the server" in attached.stderr and attached.json["written"] == 2
    alone = run_sana("batch", rows, "--model", "tiny-sprint", "-o", tmp_path / "ref", "--no-server", env=server.env)
    assert alone.returncode == 0, alone.stderr
    for image in (tmp_path / "ref").glob("*.png"):
        assert (tmp_path / "att" / image.name).read_bytes() == image.read_bytes()


def test_two_attached_clients_with_different_loras_at_once_never_see_each_others_weights(server, tmp_path):
    """Two CLIs attach at the same moment with different LoRA files (the server gathers them into one run, two
    GPU batches), a third right after with none: each image is the bytes of its --no-server run."""
    from sana_cli.engine import tiny_build

    loras = {"a": tiny_build.build_lora(tmp_path / "lora-a", seed=1),
             "b": tiny_build.build_lora(tmp_path / "lora-b", seed=2)}
    args = {name: ("--lora", f"{path}:0.8") for name, path in loras.items()}
    args["plain"] = ()
    common = ("generate", "a red fox, ink style", "--model", "tiny", "--seed", 4, "--steps", 3)
    before = len(server.lines)
    done = {}

    def attached(name):
        done[name] = run_sana(*common, *args[name], "-o", tmp_path / f"{name}-att.png", env=server.env)

    threads = [threading.Thread(target=attached, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    attached("plain")
    for name, process in done.items():
        assert process.returncode == 0, process.stderr
        assert "rendering on the server" in process.stderr and "rendering here" not in process.stderr
    server.wait_for("attached run of 1 image(s)", after=before)
    images = {}
    for name in args:
        alone = run_sana(*common, *args[name], "-o", tmp_path / f"{name}-ref.png", "--no-server", env=server.env)
        assert alone.returncode == 0, alone.stderr
        images[name] = (tmp_path / f"{name}-ref.png").read_bytes()
        assert (tmp_path / f"{name}-att.png").read_bytes() == images[name], name
    assert len({_pixels(data).tobytes() for data in images.values()}) == 3  # each LoRA changes the pixels


def test_a_file_changed_between_plan_and_send_or_over_the_bound_is_exit_2(tmp_path, tiny_models):
    """The attaching CLI reads each input file when it sends it and checks it against the hash its plan took:
    a file changed in between (here: while the CLI shakes hands with the server, after planning) is exit 2
    with one line, nothing sent, nothing written. A file larger than a server is sent is exit 2 before
    anything is sent, and a batch naming one is refused before its directory is made."""
    from sana_cli.server.wire import MAX_INPUT_FILE_BYTES

    from .fakeserver import FakeServer

    start = _start_image(tmp_path / "in.png")
    fake = FakeServer()
    try:
        fake.on_health = lambda: _start_image(start, seed=5)  # another picture under the same name
        changed = run_sana("generate", "a street", "--model", "tiny-sprint", "--seed", 1, "--image", start,
                           "-o", tmp_path / "a.png", env=fake.env)
        assert changed.returncode == 2, changed.stderr
        assert "changed after the run was planned (its sha256 differs); run again" in one_line_error(changed)
        assert fake.runs == [] and not (tmp_path / "a.png").exists()

        fake.on_health = None
        big = tmp_path / "big.png"
        big.write_bytes(start.read_bytes())
        with open(big, "r+b") as handle:  # a valid PNG with trailing bytes (sparse): over the bound
            handle.truncate(MAX_INPUT_FILE_BYTES + 1)
        over = run_sana("generate", "a street", "--model", "tiny-sprint", "--seed", 1, "--image", big,
                        "-o", tmp_path / "b.png", env=fake.env)
        assert over.returncode == 2, over.stderr
        assert "is larger than the 256 MiB a file sent to a server may be" in one_line_error(over)
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"prompt": "a street", "image": str(big)}) + "\n")
        batch = run_sana("batch", rows, "--model", "tiny-sprint", "-o", tmp_path / "out", env=fake.env)
        assert batch.returncode == 2 and "256 MiB a file sent to a server" in one_line_error(batch)
        assert fake.runs == [] and not (tmp_path / "out").exists() and not (tmp_path / "b.png").exists()
    finally:
        fake.close()


def test_socket_is_user_only_and_a_foreign_or_open_socket_is_not_trusted(server, tmp_path):
    from sana_cli.server.client import private_place_problem

    assert stat.S_IMODE(os.lstat(server.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(server.socket.parent).st_mode) == 0o700
    assert private_place_problem(server.socket, want_socket=True) is None
    open_dir = tmp_path / "serve"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    assert "open to other users" in private_place_problem(open_dir, want_socket=False)
    link = tmp_path / "link.sock"
    link.symlink_to(server.socket)
    assert "is not a socket" in private_place_problem(link, want_socket=True)


# ---- the OpenAI images API -----------------------------------------------------------------------

def test_openai_client_b64_and_url(server, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    answer = client.images.generate(prompt="a lighthouse", model="tiny", size="128x128", n=2,
                                    response_format="b64_json", extra_body={"seed": 5})
    assert len(answer.data) == 2
    first = base64.b64decode(answer.data[0].b64_json)
    reference = _in_process(tmp_path, "lh", prompt="a lighthouse", seed=5)
    # Two images of one request share a GPU batch: equal within batched rounding, metadata equal.
    assert np.abs(_pixels(first) - _pixels(reference)).max() <= 2
    from sana_cli.storage.images import read_metadata

    (tmp_path / "first.png").write_bytes(first)
    assert read_metadata(tmp_path / "first.png")["sana"]["key"] == read_metadata(tmp_path / "lh.png")["sana"]["key"]
    urls = client.images.generate(prompt="a lighthouse", model="tiny", size="128x128", response_format="url",
                                  extra_body={"seed": 5, "output_format": "webp"})
    url = urls.data[0].url
    assert url.startswith(server.url("/v1/images/files/")) and url.endswith(".webp")
    with urllib.request.urlopen(url, timeout=30) as fetched:
        assert fetched.headers["Content-Type"] == "image/webp" and fetched.read(4) == b"RIFF"
    models = client.models.list()
    assert {"tiny", "sana-4k"} <= {m.id for m in models.data}


def test_curl_and_bad_requests(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl binary on PATH")
    made = subprocess.run([curl, "-sS", "-X", "POST", server.url("/v1/images/generations"), "-H",
                           "Content-Type: application/json", "-d",
                           '{"prompt": "a cat", "model": "tiny", "size": "128x128", "seed": 2, "steps": 2}'],
                          capture_output=True, text=True, timeout=120)
    data = json.loads(made.stdout)["data"]
    assert len(data) == 1 and _pixels(base64.b64decode(data[0]["b64_json"])).shape == (128, 128, 3)

    def error(status, body, *, raw=None, headers=None):
        code, answer = server.post("/v1/images/generations", body, raw=raw, headers=headers)
        assert code == status, (code, answer)
        assert set(answer["error"]) >= {"message", "type", "param", "code"}
        return answer["error"]

    cli = run_sana("generate", "a cat", "--model", "tiny", "--width", "100", "--height", "100", "--dry-run")
    message = one_line_error(cli).removeprefix("sana: error: ")
    assert error(400, {"prompt": "a cat", "model": "tiny", "size": "100x100"})["message"] == message
    assert "the prompt is empty" in error(400, {"prompt": "  ", "model": "tiny"})["message"]
    assert error(404, {"prompt": "a cat", "model": "no-such-model"})["code"] == "model_not_found"
    assert error(400, {"prompt": "a cat", "model": "tiny", "n": 11})["param"] == "n"
    assert error(400, {"prompt": "x" * 10001, "model": "tiny"})["param"] == "prompt"
    assert error(400, {"prompt": "a cat", "model": "tiny", "size": "big"})["param"] == "size"
    assert error(400, {"prompt": "a cat", "model": "tiny", "response_format": "file"})["param"] == "response_format"
    assert error(400, {"prompt": "a cat", "model": "tiny", "output": "/etc/passwd"})["param"] == "output"
    assert error(400, {"prompt": "a cat", "model": "tiny", "steps": "many"})["param"] == "steps"
    assert "guidance must be at most 30" in error(400, {"prompt": "a cat", "model": "tiny", "guidance": 99})["message"]
    assert error(400, None, raw=b"{not json")["message"] == "the request body is not valid JSON"
    # No answer tells which paths exist here: a path is refused before anything looks at the disk.
    for path in ("/root", "/nonexistent/x", "./here", "~"):
        assert "never opens a client's path" in error(400, {"prompt": "a cat", "model": path})["message"]
    # A web page may POST text/plain without a CORS preflight; only application/json is taken.
    plain = error(415, {"prompt": "a cat", "model": "tiny"}, headers={"Content-Type": "text/plain"})
    assert plain["code"] == "unsupported_media_type"
    big = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # headers only: answered before a body
    big.putrequest("POST", "/v1/images/generations")
    big.putheader("Content-Type", "application/json")
    big.putheader("Content-Length", str((1 << 20) + 1))
    big.endheaders()
    too_large = big.getresponse()
    assert too_large.status == 413 and json.loads(too_large.read())["error"]["code"] == "body_too_large"
    big.close()
    unavailable = error(503, {"prompt": "a cat", "model": "org/not-cached", "size": "128x128"})
    assert unavailable["code"] == "unavailable" and "org/not-cached" in unavailable["message"]
    for name in ("..%2F..%2Fetc%2Fpasswd", "x.png", "0" * 32 + ".txt"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url(f"/v1/images/files/{name}"), timeout=10)
        assert refused.value.code == 404


# ---- concurrency, disconnects --------------------------------------------------------------------

def test_eight_clients_at_once_share_gpu_batches_and_keep_their_seeds(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    mark = len(server.lines)
    results: dict[int, bytes] = {}

    def one(seed: int) -> None:
        answer = client.images.generate(prompt=f"prompt {seed}", model="tiny", size="128x128",
                                        extra_body={"seed": seed, "steps": 2})
        results[seed] = base64.b64decode(answer.data[0].b64_json)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(8))
    assert len({_pixels(data).tobytes() for data in results.values()}) == 8  # each its own seed, its own image
    batches = [line for line in server.lines[mark:] if "GPU batch" in line]
    shared = [line for line in batches if "from 1 request(s)" not in line]
    assert shared, "no GPU batch served several requests:\n" + "\n".join(batches)
    assert len(batches) < 8


def _raw_post(server: Server, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_client_disconnect_while_queued_drops_the_work_and_while_running_discards_it(server):
    mark = len(server.lines)
    busy = _raw_post(server, {"prompt": "slow", "model": "tiny", "size": "128x128", "steps": 1000, "stream": True,
                              "pag_scale": 2.0})
    server.wait_for("GPU batch", after=mark)
    queued = _raw_post(server, {"prompt": "queued", "model": "tiny", "size": "160x160", "seed": 1})
    time.sleep(0.5)
    queued.close()
    server.wait_for("the client went away while it was queued", after=mark)
    busy.close()
    server.wait_for("the client went away while it was rendering", after=mark)
    code, answer = server.post("/v1/images/generations", {"prompt": "after", "model": "tiny", "size": "128x128",
                                                          "steps": 1})
    assert code == 200 and len(answer["data"]) == 1  # the server goes on
    assert "160x160" not in server.log()  # the dropped request never rendered


def test_streaming_endpoint_sends_openai_server_sent_events(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/images/generations", json.dumps(
        {"prompt": "a cat", "model": "tiny", "size": "128x128", "steps": 3, "n": 2, "stream": True}),
        {"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
    events = [block.split("\n") for block in answer.read().decode().strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    payloads = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert names == ["image_generation.completed"] * 2  # no partial_images asked for: none sent
    assert [p["type"] for p in payloads] == names and sorted(p["index"] for p in payloads) == [0, 1]
    assert all(_pixels(base64.b64decode(p["b64_json"])).shape == (128, 128, 3) for p in payloads)


def test_page_generates_in_headless_chromium_only_when_a_person_presses_generate(server, tmp_path):
    from .cdp import Browser
    from .test_report import _chromium

    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium, chromium-browser or google-chrome binary on PATH (apt-get install chromium)")
    assert server.post("/v1/images/generations", {"prompt": "warm", "model": "tiny", "steps": 1})[0] == 200
    runs = sum(line.startswith("sana serve: run ") for line in server.lines)
    browser = Browser(binary, tmp_path / "profile", server.url("/?prompt=a+lighthouse+%3Cb%3E&model=tiny&n=50"))
    try:
        browser.wait_for("document.getElementById('model').options.length > 0")
        time.sleep(2)  # what the page would do by itself, it has done by now
        assert sum(line.startswith("sana serve: run ") for line in server.lines) == runs  # a link never renders
        assert json.loads(urllib.request.urlopen(server.url("/v1/sana/health")).read())["queued"] == 0
        assert browser.evaluate("document.getElementById('prompt').value") == "a lighthouse <b>"
        assert browser.evaluate("document.getElementById('n').value") == "10"  # n is bounded
        browser.evaluate("document.getElementById('n').value = '2'; document.getElementById('go').click()")
        browser.wait_for("document.getElementById('status').textContent === 'done'", timeout=120)
        html = browser.evaluate("document.getElementById('images').innerHTML")
    finally:
        browser.close()
    assert html.count('src="data:image/png;base64,') == 2, html[-3000:]
    assert "<b>" not in html  # the prompt is text, never markup


# ---- crashes, keys, shutdown ----------------------------------------------------------------------

def test_kill_9_while_a_cli_waits_then_the_rerun_works_in_process(tmp_path, tiny_models, cache_dir):
    cache = tmp_path / "cache-b"
    cache.mkdir()
    _copy_tiny(cache_dir, cache)
    server = Server(cache, "--model", "tiny")
    try:
        out = tmp_path / "out"
        env = dict(server.env)
        waiting = sana_popen(["generate", "a cat", "--model", "tiny", "--steps", "400", "--seed", "1", "-o", f"{out}/"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.wait_for("GPU batch")
        os.kill(server.process.pid, signal.SIGKILL)
        stdout, stderr = waiting.communicate(timeout=60)
        assert waiting.returncode == 1, stderr
        assert "went away before the run finished" in one_line_error(
            subprocess.CompletedProcess([], waiting.returncode, stdout, stderr))
        assert stdout == "" and (not out.exists() or not list(out.iterdir()))  # no partial file
        assert server.socket.exists()  # a crash leaves the socket behind
        rerun = run_sana("generate", "a cat", "--model", "tiny", "--seed", 1, "-o", f"{out}/", env=env)
        assert rerun.returncode == 0, rerun.stderr
        assert "removed the stale server socket" in rerun.stderr and not server.socket.exists()
        assert len(list(out.glob("*.png"))) == 1
    finally:
        server.stop()


def test_api_key_and_sigterm_finishes_in_flight_and_refuses_new(tmp_path, tiny_models, cache_dir):
    cache = tmp_path / "cache-c"
    cache.mkdir()
    _copy_tiny(cache_dir, cache)
    (cache / "serve").mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a crashed server's socket: nobody listens
    stale.bind(str(cache / "serve" / "sana.sock"))
    stale.close()
    os.chmod(cache / "serve" / "sana.sock", 0o600)
    server = Server(cache, "--model", "tiny", "--api-key", "s3cret")
    try:
        assert "removed the stale socket" in server.log()
        key = {"Authorization": "Bearer s3cret"}
        body = {"prompt": "a cat", "model": "tiny", "size": "128x128", "steps": 1}
        assert server.post("/v1/images/generations", body)[0] == 401
        assert server.post("/v1/images/generations", body, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, answer = server.post("/v1/images/generations", body, headers=key)
        assert status == 200 and len(answer["data"]) == 1
        no_key = run_sana("generate", "a cat", "--model", "tiny", "--seed", 1, "-o", tmp_path / "n.png",
                          env=server.env)
        assert no_key.returncode == 0 and "refused the API key" in no_key.stderr  # rendered here instead
        explicit = run_sana("generate", "a cat", "--model", "tiny", "-o", tmp_path / "e.png", env={
            **server.env, "SANA_SERVER": f"unix:{server.socket}", "SANA_API_KEY": "wrong"})
        assert explicit.returncode == 4 and "refused the API key" in one_line_error(explicit)

        attached_env = {**server.env, "SANA_API_KEY": "s3cret"}
        in_flight = sana_popen(["generate", "a cat", "--model", "tiny", "--steps", "40", "--seed", "3", "-o",
                                str(tmp_path / "flight.png"), "--json"], env=attached_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        mark = len(server.lines)
        server.wait_for("GPU batch", after=mark)
        os.kill(server.process.pid, signal.SIGTERM)
        server.wait_for("SIGTERM received", after=mark)
        refused = server.post("/v1/images/generations", body, headers=key)
        assert refused[0] == 503 and refused[1]["error"]["code"] == "shutting_down"
        stdout, stderr = in_flight.communicate(timeout=120)
        assert in_flight.returncode == 0, stderr
        assert json.loads(stdout)["images"][0]["path"] == str(tmp_path / "flight.png")
        assert server.process.wait(timeout=60) == 0
        assert not server.socket.exists()
    finally:
        server.stop()


def test_queue_full_and_cancel_in_the_scheduler():
    from sana_cli.server.work_queue import Draining, QueueFull, Scheduler, Work

    class Ref:
        source, revision = "tiny:sana", None

    from sana_cli.planning.plan import LoadOptions

    scheduler = Scheduler(window=30, max_queue=1)
    work = Work(ref=Ref(), options=LoadOptions(), decode="auto", jobs=[], sink=lambda m: None, label="w")
    scheduler.submit(work)
    with pytest.raises(QueueFull):
        scheduler.submit(Work(ref=Ref(), options=LoadOptions(), decode="auto", jobs=[], sink=lambda m: None))
    scheduler.cancel(work)
    assert scheduler.idle() and work.finished.is_set()
    scheduler.stop_accepting()
    with pytest.raises(Draining):
        scheduler.submit(work)


# ---- the model cache: one load per key, a model in use stays, the budget counts stored bytes -----------------

def _slow_loads(monkeypatch, fail_first: bool = False) -> list:
    """pipeline.load, recording each call and taking half a second first (a real load takes seconds, so a
    second request arrives while the first loads); optionally the first load fails as a missing model would."""
    from sana_cli.engine import loading as pipeline
    from sana_cli.errors import EnvironmentProblem

    real, calls = pipeline.load, []

    def load(ref, options=None):
        calls.append((ref.name, threading.current_thread().name))
        spans.append([time.monotonic(), None])
        span = spans[-1]
        time.sleep(0.5)
        try:
            if fail_first and len(calls) == 1:
                raise EnvironmentProblem(f"{ref.name} is not in the Hugging Face cache and offline mode is on")
            return real(ref, options)
        finally:
            span[1] = time.monotonic()

    spans = load.spans = []

    monkeypatch.setattr(pipeline, "load", load)
    return calls


def _at_once(*calls) -> dict:
    """Run each (name, function) on its own thread, all released together; {name: result or exception}."""
    barrier, results = threading.Barrier(len(calls)), {}

    def one(name, function):
        barrier.wait()
        try:
            results[name] = function()
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[name] = exc

    threads = [threading.Thread(target=one, args=call, name=call[0]) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_the_model_cache_loads_a_model_once_however_many_threads_ask(tiny_models, monkeypatch):
    import torch

    from sana_cli.models.modelref import resolve
    from sana_cli.planning.plan import LoadOptions
    from sana_cli.server.work_queue import ModelCache

    calls = _slow_loads(monkeypatch)
    cache = ModelCache(keep_alive=None, budget_bytes=None)
    ref = resolve("tiny")
    got = _at_once(("render", lambda: cache.get(ref, LoadOptions())),
                   ("load", lambda: cache.get(ref, LoadOptions(offline=True))))  # offline: the same loaded model
    assert len(calls) == 1, calls
    assert got["render"] is got["load"] and got["render"].ref.name == "tiny"
    assert cache.get(ref, LoadOptions()) is got["render"] and len(calls) == 1

    # A load that fails fails every waiter with its one error, caches nothing, and the next request loads again.
    calls = _slow_loads(monkeypatch, fail_first=True)
    cache = ModelCache(keep_alive=None, budget_bytes=None)
    got = _at_once(("render", lambda: cache.get(ref, LoadOptions())), ("load", lambda: cache.get(ref, LoadOptions())))
    assert len(calls) == 1 and got["render"] is got["load"] and got["render"].exit_code == 4
    assert cache.loaded_names() == []
    assert cache.get(ref, LoadOptions()).ref.name == "tiny" and len(calls) == 2

    # Two different models asked for at once load one after the other: diffusers builds a model inside
    # accelerate's process-wide init_empty_weights, so overlapping loads would build modules on `meta`.
    calls = _slow_loads(monkeypatch)
    from sana_cli.engine import loading as pipeline

    cache = ModelCache(keep_alive=None, budget_bytes=None)
    got = _at_once(("render", lambda: cache.get(ref, LoadOptions())),
                   ("load", lambda: cache.get(resolve("tiny-sprint"), LoadOptions())))
    (start_a, end_a), (start_b, end_b) = sorted(pipeline.load.spans)
    assert len(calls) == 2 and end_a <= start_b
    for loaded in got.values():
        assert not [name for name, p in loaded.pipe.transformer.named_parameters() if p.is_meta]
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and nothing was left swapped


def _rendering_work(tmp_path, hold: threading.Event, rendering: threading.Event, messages: list):
    """A Work for one tiny image whose sink blocks at the first denoising step until `hold` is set."""
    from sana_cli.planning.plan import LoadOptions, Request, model_for, plan_generate
    from sana_cli.server.work_queue import Work

    request = Request(prompt="a red fox", model="tiny", steps=2, seed=3, output=str(tmp_path / "fox.png"))
    plan = plan_generate(request, model_for(request))

    def sink(message):
        messages.append(message)
        if message["type"] == "step" and not rendering.is_set():
            rendering.set()
            hold.wait(120)

    return Work(ref=plan.model, options=LoadOptions(), decode="auto", jobs=plan.jobs, sink=sink, label="fox")


def test_a_model_that_renders_is_never_unloaded_and_the_budget_waits_or_refuses(tiny_models, tmp_path, capfd):
    from sana_cli.errors import EnvironmentProblem
    from sana_cli.models.modelref import resolve
    from sana_cli.planning.plan import LoadOptions
    from sana_cli.server.work_queue import ModelCache, Scheduler

    cache = ModelCache(keep_alive=None, budget_bytes=1)  # every model is over this budget: one at a time
    scheduler = Scheduler(window=0.0, models=cache)
    hold, rendering, messages = threading.Event(), threading.Event(), []
    work = _rendering_work(tmp_path, hold, rendering, messages)
    scheduler.submit(work)
    assert rendering.wait(120), messages
    other = {}
    loader = threading.Thread(target=lambda: other.update(model=cache.get(resolve("tiny-sprint"), LoadOptions())))
    loader.start()
    loader.join(2.0)
    assert loader.is_alive() and not other  # the load waits for the rendering model's memory...
    assert cache.loaded_names() == ["tiny"]  # ...which stays loaded while it renders
    hold.set()
    assert work.finished.wait(120) and loader.join(120) is None and not loader.is_alive()
    assert [m["type"] for m in messages if m["type"] in ("image", "done")] == ["image", "done"], messages
    assert Image.open(tmp_path / "fox.png").size == (128, 128)
    assert other["model"].ref.name == "tiny-sprint"
    assert cache.loaded_names() == ["tiny-sprint"]  # the finished one made room
    log = capfd.readouterr().err
    assert "waiting for tiny to finish rendering before loading tiny-sprint" in log
    assert log.index("waiting for tiny") < log.index("unloaded tiny (over the memory budget)")

    # Past its wait the load is refused, naming what renders (exit 4: HTTP 503); the rendering model stays.
    cache = ModelCache(keep_alive=None, budget_bytes=1, wait_seconds=0.3)
    with cache.use(resolve("tiny"), LoadOptions()):
        with pytest.raises(EnvironmentProblem) as refused:
            cache.get(resolve("tiny-sprint"), LoadOptions())
        assert refused.value.exit_code == 4
        assert "cannot load tiny-sprint within the --max-memory budget: tiny still rendering after 0.3 s" in str(
            refused.value)
        assert cache.loaded_names() == ["tiny"]
    assert cache.loaded_names() == ["tiny"]  # alone over the budget, it stays: it is the one asked for
    cache.wait_seconds = 30
    assert cache.get(resolve("tiny-sprint"), LoadOptions()).ref.name == "tiny-sprint"
    assert cache.loaded_names() == ["tiny-sprint"]  # nothing in use now: the older one made room


def test_the_memory_budget_counts_what_the_models_device_really_holds(tiny_models):
    import dataclasses

    import torch

    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import load
    from sana_cli.planning.plan import LoadOptions
    from sana_cli.engine.quantize import module_bytes
    from sana_cli.server.work_queue import _model_bytes

    def components(loaded):
        return [c for c in loaded.pipe.components.values() if isinstance(c, torch.nn.Module)]

    int8 = load(resolve("tiny"), LoadOptions(dtype="bf16", quantize="int8"))
    stored = sum(module_bytes(c) for c in components(int8))
    nominal = sum(t.numel() * t.element_size() for c in components(int8) for t in [*c.parameters(), *c.buffers()])
    assert _model_bytes(int8) == stored < nominal  # torchao tensors report bf16 and store int8 and scales

    # --low-memory on a GPU (a stand-in device: the weights stay on the CPU, as CPU offload keeps them): one
    # component at a time comes to the GPU, so the largest one is what counts against a GPU budget.
    offloaded = load(resolve("tiny"))
    offloaded.device = torch.device("cuda", 0)
    offloaded.options = dataclasses.replace(offloaded.options, low_memory=True)
    sizes = [module_bytes(c) for c in components(offloaded)]
    assert _model_bytes(offloaded) == max(sizes) < sum(sizes)
    offloaded.options = dataclasses.replace(offloaded.options, low_memory=False)
    assert _model_bytes(offloaded) == 0  # nothing of it is on the GPU it is budgeted for


def test_an_out_of_memory_server_batch_is_retried_per_image_and_the_worker_goes_on(tiny_models, tmp_path):
    """The CUDA out-of-memory error of a shared GPU batch (injected on the transformer whenever it sees more than
    one image): each image is retried alone and written, and the rendering thread takes the next work."""
    import torch

    from sana_cli.models.modelref import resolve
    from sana_cli.planning.plan import LoadOptions, Request, model_for, plan_generate
    from sana_cli.server.work_queue import ModelCache, Scheduler, Work

    cache = ModelCache(keep_alive=None, budget_bytes=None)
    loaded = cache.get(resolve("tiny"), LoadOptions())
    raised = []

    def out_of_memory(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] > 2:  # two images with classifier-free guidance: a shared batch
            raised.append(hidden.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    loaded.pipe.transformer.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    scheduler = Scheduler(window=0.0, models=cache)

    def work(name, count):
        request = Request(prompt="a red fox", model="tiny", steps=2, seed=3, num_images=count,
                          output=str(tmp_path / name))
        plan = plan_generate(request, model_for(request))
        messages = []
        return Work(ref=plan.model, options=LoadOptions(), decode="auto", jobs=plan.jobs, sink=messages.append,
                    label=name), messages

    shared, shared_messages = work("shared.png", 2)
    scheduler.submit(shared)
    assert shared.finished.wait(300)
    images = [m for m in shared_messages if m["type"] == "image"]
    assert raised and len(images) == 2 and all(m["retried_alone"] for m in images), shared_messages
    assert not [m for m in shared_messages if m["type"] in ("failed", "error")]
    for message in images:
        assert Image.open(message["path"]).size == (128, 128)
    after, after_messages = work("after.png", 1)  # the worker is alive and renders the next request
    scheduler.submit(after)
    assert after.finished.wait(300)
    assert [m["type"] for m in after_messages if m["type"] in ("image", "done")] == ["image", "done"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_an_evicted_compiled_model_is_freed(backend, tiny_models, tmp_path, monkeypatch):
    """A compiled model that rendered, then unloaded for another (a budget of one model): nothing torch.compile
    keeps (dynamo's guards and caches, the backend's graphs) holds its weights once the cache lets it go."""
    import gc
    import weakref

    from sana_cli.engine import speed
    from sana_cli.models.modelref import resolve
    from sana_cli.planning.plan import LoadOptions
    from sana_cli.server.work_queue import ModelCache, Scheduler

    real = speed.enable_compile
    monkeypatch.setattr(speed, "enable_compile", lambda loaded: real(loaded, backend=backend))
    cache = ModelCache(keep_alive=None, budget_bytes=1)
    scheduler = Scheduler(window=0.0, models=cache)
    hold, rendering, messages = threading.Event(), threading.Event(), []
    hold.set()
    work = _rendering_work(tmp_path, hold, rendering, messages)
    work.options = LoadOptions(compile="on")
    scheduler.submit(work)
    assert work.finished.wait(600) and [m["type"] for m in messages][-1] == "done", messages
    compiled = cache.get(resolve("tiny"), LoadOptions(compile="on"))
    assert type(compiled.pipe.transformer).__name__ != "OptimizedModule"  # compiled in place (Module.compile)
    assert compiled.pipe.transformer._compiled_call_impl is not None
    transformer, parameter = weakref.ref(compiled.pipe.transformer), weakref.ref(
        next(compiled.pipe.transformer.parameters()))
    del compiled
    cache.get(resolve("tiny-sprint"), LoadOptions())  # over the budget: the compiled model is unloaded
    assert cache.loaded_names() == ["tiny-sprint"]
    gc.collect()
    assert transformer() is None and parameter() is None
