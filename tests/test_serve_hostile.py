"""`sana serve` and the attached CLI against hostile peers: a real server facing FIFOs, stray Host
headers, framing pages and a dying queue thread; the attaching CLI facing a fake server that answers
whatever a test tells it to (garbage, wrong images, early "done", foreign exit codes)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from .conftest import one_line_error, run_sana, sana_popen
from .fakeserver import FakeServer, done_event, image_bytes, image_event
from .test_serve import Server, _copy_tiny


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, cache_dir):
    cache = tmp_path_factory.mktemp("serve-hostile")
    _copy_tiny(cache_dir, cache)
    started = Server(cache, "--model", "tiny", "--batch-window", "0.1")
    yield started
    started.stop()


def _get(server: Server, path: str, headers: dict | None = None, timeout: float = 10):
    return _request(server, "GET", path, None, headers, timeout)


def _request(server: Server, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 10):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


# ---- no blocking call on the event loop -------------------------------------------------------------

def test_a_fifo_or_a_link_in_the_image_directory_is_404_and_never_freezes_the_server(server, tmp_path):
    images = server.cache / "serve-images"
    images.mkdir(exist_ok=True)
    fifo, link = "0" * 32 + ".png", "1" * 32 + ".png"
    os.mkfifo(images / fifo)
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", images / link)
    results = {}

    def fetch(name):
        try:
            results[name] = _get(server, f"/v1/images/files/{name}", timeout=20)[0]
        except OSError as exc:
            results[name] = exc

    threads = [threading.Thread(target=fetch, args=(name,), daemon=True) for name in (fifo, fifo, link)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    status, _, body = _get(server, "/v1/sana/health", timeout=5)  # the loop still answers meanwhile
    assert status == 200 and json.loads(body)["ok"] is True and time.monotonic() - started < 5
    for thread in threads:
        thread.join(25)
    assert results == {fifo: 404, link: 404}
    # the socket still renders
    out = tmp_path / "after.png"
    process = run_sana("generate", "a fox", "--model", "tiny", "--seed", 1, "-o", out, env=server.env, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "rendering on the server" in process.stderr and out.stat().st_size > 0


# ---- a dead rendering thread ends the server -------------------------------------------------------

class _InjectedServer(Server):
    """A real `sana serve` in a Python whose scheduler has one injected fault (code run before main)."""

    def __init__(self, cache, inject: str, *args: str):
        self.cache = cache
        self.env = dict(os.environ, SANA_CLI_CACHE=str(cache))
        self.lines = []
        code = f"{inject}\nfrom sana_cli.cli import main\nmain(['serve', '--port', '0', *{list(args)!r}])\n"
        self.process = subprocess.Popen([sys.executable, "-c", code], env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = int(self.wait_for("listening on http://127.0.0.1:").split("127.0.0.1:")[1].split()[0])
        self.socket = cache / "serve" / "sana.sock"


def test_a_dead_queue_thread_answers_what_waits_with_503_and_ends_the_server_with_one_line(tmp_path, tiny_models,
                                                                                            cache_dir):
    cache = tmp_path / "cache"
    _copy_tiny(cache_dir, cache)
    # The queue thread dies on the first request it looks at, outside any one run's error handling.
    inject = ("import sana_cli.server.work_queue as s\n"
              "def family(self):\n    raise RuntimeError('injected fault in the queue thread')\n"
              "s.Work.family = family")
    server = _InjectedServer(cache, inject, "--model", "tiny", "--batch-window", "0.1")
    try:
        status, _, raw = _request(server, "POST", "/v1/images/generations",
                                  {"prompt": "a fox", "model": "tiny", "size": "128x128"}, timeout=30)
        body = json.loads(raw)
        assert status == 503, body
        assert body["error"]["code"] == "unavailable" and body["error"]["exit_code"] == 4
        assert "work queue stopped (RuntimeError: injected fault in the queue thread)" in body["error"]["message"]
        assert server.process.wait(timeout=30) == 1
        server._reader.join(10)
    finally:
        server.stop()
    lines = [line for line in server.lines if line.strip()]
    assert "Traceback" not in server.log()
    errors = [line for line in lines if line.startswith("sana: error: ")]
    assert errors == [lines[-1]], server.log()
    assert "work queue stopped (RuntimeError: injected fault in the queue thread)" in errors[0]
    assert not (cache / "serve" / "sana.sock").exists()  # nothing left to attach to


# ---- the attached CLI against a server that is not to be trusted -------------------------------------

@pytest.fixture
def fake(tiny_models):
    servers = []

    def start(**options) -> FakeServer:
        servers.append(FakeServer(**options))
        return servers[-1]

    yield start
    for started in servers:
        started.close()


GARBAGE = {
    "a line that is not JSON": lambda jobs: [b"hello, I am not JSON\n"],
    "a JSON list where an event belongs": lambda jobs: [[1, 2, 3]],
    "an image index never asked for": lambda jobs: [image_event(99, image_bytes(jobs[0]))],
    "bad base64": lambda jobs: [{**image_event(jobs[0]["index"], b""), "data": "!!! not base64 !!!"}],
    "plain text as the image": lambda jobs: [image_event(jobs[0]["index"], b"just some text")],
    "a PNG with another job's key": lambda jobs: [image_event(jobs[0]["index"], image_bytes(jobs[0], key="0" * 64))],
    "a PNG of another size": lambda jobs: [image_event(jobs[0]["index"], image_bytes(jobs[0], size=(64, 64)))],
    "a JPEG where a PNG was asked": lambda jobs: [image_event(jobs[0]["index"], image_bytes(jobs[0], fmt="JPEG"))],
    "a truncated PNG": lambda jobs: [image_event(jobs[0]["index"], image_bytes(jobs[0])[:-60])],
    "the same image twice": lambda jobs: [image_event(jobs[0]["index"], image_bytes(jobs[0]))] * 2,
    "a step that is not a number": lambda jobs: [{"type": "step", "step": "one", "total": [2]}],
    "a done whose model is a list": lambda jobs: [{**done_event(), "model": [1]}],
    "an event of an unknown type": lambda jobs: [{"type": "surprise"}],
    "a line longer than any image": lambda jobs: [b'{"type": "note", "message": "' + b"x" * (4 << 20) + b'"}\n'],
    "an endless stream of small events": lambda jobs: ({"type": "note", "message": "x" * 1000} for _ in range(10**6)),
}


@pytest.mark.parametrize("answer", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_from_the_server_is_one_malformed_line_exit_1_and_nothing_written(fake, tmp_path, answer):
    server = fake(events=GARBAGE[answer])
    out = tmp_path / "out"
    out.mkdir()
    process = run_sana("generate", "a fox", "--model", "tiny", "--size", "128", "--seed", 3, "-n", 2,
                       "-o", f"{out}/", env=server.env, timeout=120)
    assert process.returncode == 1, process.stderr
    line = one_line_error(process)
    assert "was malformed" in line and "nothing partial was written" in line, line
    assert process.stdout == ""
    left = list(out.iterdir())
    if answer == "the same image twice":  # the first, checked and whole, was written before the second came
        assert [p.name for p in left] == ["a-fox-3.png"]
        from sana_cli.storage.images import read_metadata

        assert read_metadata(left[0])["sana"]["key"] == server.runs[0][0]["key"]
    else:
        assert left == []


def test_a_done_before_every_image_is_not_a_success(fake, tmp_path):
    server = fake(events=lambda jobs: [image_event(jobs[0]["index"], image_bytes(jobs[0])), done_event()])
    out = tmp_path / "out"
    process = run_sana("generate", "a fox", "--model", "tiny", "--size", "128", "--seed", 3, "-n", 2, "--json",
                       "-o", f"{out}/", env=server.env, timeout=120)
    assert process.returncode == 1, process.stderr
    answer = json.loads(process.stdout)
    assert answer["ok"] is False
    assert len(list(out.glob("*.png"))) == 1
    assert "finished without sending this image" in process.stderr

    rows = tmp_path / "rows.txt"
    rows.write_text("a cat\na dog\n")
    batch = run_sana("batch", rows, "--model", "tiny", "--size", "128", "-o", tmp_path / "batch", env=server.env,
                     timeout=120)
    assert batch.returncode == 3, batch.stderr
    records = [json.loads(line) for line in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["image", "error"]
    assert "finished without sending this image" in records[1]["error"]
    assert len(list((tmp_path / "batch").glob("*.png"))) == 1


def test_a_failed_image_passes_only_a_documented_exit_code(fake, tmp_path):
    server = fake(events=lambda jobs: [{"type": "failed", "index": jobs[0]["index"], "error": "it broke",
                                        "exit_code": 99}, done_event()])
    process = run_sana("generate", "a fox", "--model", "tiny", "--size", "128", "-o", tmp_path / "a.png",
                       env=server.env, timeout=120)
    assert process.returncode == 1, process.stderr
    assert "it broke" in one_line_error(process)
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("health", [b"[1, 2]", b'"just a string"'])
def test_a_malformed_handshake_on_a_found_socket_falls_back_and_on_a_named_server_is_exit_4(fake, tmp_path,
                                                                                          cache_dir, health):
    cache = tmp_path / "cache"
    _copy_tiny(cache_dir, cache)
    found = fake(unix=cache / "serve" / "sana.sock", health=health)
    assert found.unix.exists()
    out = tmp_path / "here.png"
    process = run_sana("generate", "a fox", "--model", "tiny", "--size", "128", "--seed", 1, "-o", out,
                       env={"SANA_CLI_CACHE": str(cache)}, timeout=180)
    assert process.returncode == 0, process.stderr
    assert "rendering here" in process.stderr and "rendering on the server" not in process.stderr
    assert out.stat().st_size > 0 and found.runs == []
    named = fake(health=health)
    process = run_sana("generate", "a fox", "--model", "tiny", "--size", "128", "-o", tmp_path / "no.png",
                       env=named.env, timeout=60)
    assert process.returncode == 4, process.stderr
    line = one_line_error(process)
    assert "malformed" in line or "runs sana-cli" in line
    assert not (tmp_path / "no.png").exists()


def test_two_attached_batches_on_one_directory_wait_for_each_other_as_in_process(fake, tmp_path):
    server = fake()
    server.gate.clear()  # the first run's answer waits: it holds its claims
    rows = tmp_path / "rows.txt"
    rows.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    command = ["batch", str(rows), "--model", "tiny", "--size", "128", "-o", str(out), "--json"]
    env = dict(os.environ, **server.env)
    first = sana_popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not server.runs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server.runs) == 1 and len(server.runs[0]) == 2
    second = sana_popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    assert second.poll() is None, second.communicate()  # it waits for the other run's claims
    server.gate.set()
    first_out, first_err = first.communicate(timeout=60)
    second_out, second_err = second.communicate(timeout=60)
    assert first.returncode == 0 and json.loads(first_out)["written"] == 2, first_err
    assert second.returncode == 0, second_err
    summary = json.loads(second_out)
    assert summary["written"] == 0 and summary["already_done"] == 2
    assert "waiting for another process" in second_err
    assert "rendering on the server" not in second_err  # it rendered nothing anywhere
    assert len(server.runs) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["0001-a-cat.png", "0002-a-dog.png"] or \
        len(list(out.glob("*.png"))) == 2


def test_a_fully_resumed_attached_batch_does_not_say_it_renders_on_the_server(fake, tmp_path):
    server = fake()
    rows = tmp_path / "rows.txt"
    rows.write_text("a cat\n")
    first = run_sana("batch", rows, "--model", "tiny", "--size", "128", "-o", tmp_path / "out", env=server.env)
    assert first.returncode == 0 and "rendering on the server" in first.stderr, first.stderr
    again = run_sana("batch", rows, "--model", "tiny", "--size", "128", "-o", tmp_path / "out", env=server.env)
    assert again.returncode == 0, again.stderr
    assert "rendering on the server" not in again.stderr and len(server.runs) == 1


@pytest.mark.parametrize("suffix,magic", [(".jpg", b"\xff\xd8\xff"), (".webp", b"RIFF")])
def test_an_attached_run_gets_the_format_its_path_asks_for(server, tmp_path, suffix, magic):
    import sana_cli

    out = tmp_path / f"a{suffix}"
    process = run_sana("generate", "a fox", "--model", "tiny", "--seed", 5, "-o", out, env=server.env)
    assert process.returncode == 0, process.stderr
    assert "rendering on the server" in process.stderr
    assert out.read_bytes().startswith(magic)
    sana_cli.generate(prompt="a fox", model="tiny", seed=5, output=str(tmp_path / f"ref{suffix}"))
    assert out.read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def test_ctrl_c_on_an_attached_batch_finishes_the_gpu_batch_in_flight_and_prints_the_summary(fake, tmp_path):
    released = threading.Event()

    def events(jobs):
        for number, job in enumerate(jobs, 1):
            yield {"type": "batch", "number": number, "total": len(jobs), "indices": [job["index"]]}
            if number == 2:
                released.wait(60)  # Ctrl-C comes while the second GPU batch renders
            yield image_event(job["index"], image_bytes(job))
        yield done_event()

    server = fake(events=events)
    rows = tmp_path / "rows.txt"
    rows.write_text("a cat\na dog\na fox\n")
    out = tmp_path / "out"
    process = sana_popen(["batch", str(rows), "--model", "tiny", "--size", "128", "-o", str(out)],
                         env=dict(os.environ, **server.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.png"))) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    released.set()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("sana: error: interrupted; 2 image(s) written this run"), stderr
    assert any(line.startswith("sana: 3 image(s): 2 written, 0 already done") for line in lines), stderr
    assert len(stdout.splitlines()) == 2 and len(list(out.glob("*.png"))) == 2
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["image", "image"]


# ---- browsers, Host headers, url images, slow clients --------------------------------------------------

def test_every_answer_forbids_framing_and_sniffing(server):
    for path in ("/", "/v1/models", "/v1/sana/health", "/v1/images/files/" + "f" * 32 + ".png"):
        status, headers, _ = _get(server, path)
        headers = {name.lower(): value for name, value in headers.items()}
        assert headers["x-frame-options"] == "DENY", path
        assert headers["content-security-policy"] == "frame-ancestors 'none'", path
        assert headers["x-content-type-options"] == "nosniff", path


@pytest.fixture(scope="module")
def named_server(tmp_path_factory, tiny_models, cache_dir):
    cache = tmp_path_factory.mktemp("serve-named")
    _copy_tiny(cache_dir, cache)
    started = Server(cache, "--model", "tiny", "--batch-window", "0.1", "--allow-host", "photos.example")
    yield started
    started.stop()


def test_a_host_that_is_not_this_server_is_refused_and_url_answers_never_echo_it(named_server):
    server = named_server
    request = {"prompt": "a fox", "model": "tiny", "size": "128x128", "response_format": "url"}
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        status, _, body = _request(server, "POST", "/v1/images/generations", request, {"Host": host})
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed", (host, body)
        assert _get(server, "/", {"Host": host})[0] == 403
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST.", f"[::1]:{server.port}",
                 "photos.example"):
        assert _get(server, "/v1/models", {"Host": host})[0] == 200, host
    status, _, body = _request(server, "POST", "/v1/images/generations", request, {"Host": "photos.example:1"})
    assert status == 200, body
    url = json.loads(body)["data"][0]["url"]
    assert url.startswith(f"http://127.0.0.1:{server.port}/v1/images/files/"), url  # where the client connected
    # The user-only socket takes any Host (it is not reachable from a browser).
    answer = _unix_get(server.socket, "/v1/sana/health", host="evil.example")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def _unix_get(path, target: str, host: str) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data
    finally:
        sock.close()


def test_url_images_expire_by_age_and_the_directory_is_bounded_in_size(named_server, tmp_path):
    from sana_cli.server.answers import sweep_images

    images = named_server.cache / "serve-images"
    old, fresh, other = "a" * 32 + ".png", "b" * 32 + ".png", "notes.txt"
    for name in (old, fresh, other):
        (images / name).write_bytes(b"x" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(images / old, (two_hours_ago, two_hours_ago))
    os.utime(images / other, (two_hours_ago, two_hours_ago))
    status, _, body = _request(named_server, "POST", "/v1/images/generations",
                               {"prompt": "a fox", "model": "tiny", "size": "128x128", "response_format": "url"})
    assert status == 200, body
    new = json.loads(body)["data"][0]["url"].rsplit("/", 1)[1]
    assert not (images / old).exists()  # older than an hour
    assert (images / fresh).exists() and (images / other).exists() and (images / new).exists()
    # the size bound: oldest first, never the one just answered, nothing but the server's own names
    directory = tmp_path / "images"
    directory.mkdir()
    names = [f"{i:032x}.png" for i in range(5)]
    for age, name in enumerate(reversed(names)):
        (directory / name).write_bytes(b"x" * 1000)
        os.utime(directory / name, (time.time() - 60 * age, time.time() - 60 * age))
    os.mkfifo(directory / ("f" * 32 + ".png"))
    removed = sweep_images(directory, keep=names[0], max_bytes=2500)
    assert removed == [names[1], names[2], names[3]]  # names[0] is the oldest but was just answered
    assert sorted(p.name for p in directory.iterdir()) == sorted([names[0], names[4], "f" * 32 + ".png"])


def test_a_slow_client_is_disconnected_instead_of_holding_a_connection_forever(server):
    from sana_cli.server.running import HEAD_TIMEOUT

    slow = socket.create_connection(("127.0.0.1", server.port), timeout=HEAD_TIMEOUT + 20)
    kept = socket.create_connection(("127.0.0.1", server.port), timeout=HEAD_TIMEOUT + 20)
    try:
        slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        kept.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /v1/models HTTP/1.1\r\n")  # then a second head, never finished either
        started = time.monotonic()
        for connection in (slow, kept):
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        assert time.monotonic() - started < HEAD_TIMEOUT + 15
    finally:
        slow.close()
        kept.close()


def test_a_model_that_loads_slowly_holds_only_its_own_requests(tmp_path, tiny_models, cache_dir):
    cache = tmp_path / "cache"
    _copy_tiny(cache_dir, cache)
    # Online mode with no hub reachable: the lookup of an uncached hub id takes its network timeouts.
    server = Server(cache, "--model", "tiny", "--batch-window", "0.1", env={"HF_HUB_OFFLINE": "0"})
    slow_answer = {}

    def slow():
        slow_answer["answer"] = _request(server, "POST", "/v1/images/generations",
                                         {"prompt": "a fox", "model": "someone/uncached-sana", "size": "1024x1024"},
                                         timeout=300)

    try:
        thread = threading.Thread(target=slow, daemon=True)
        thread.start()
        server.wait_for("loading someone/uncached-sana")
        started = time.monotonic()
        status, _, body = _request(server, "POST", "/v1/images/generations",
                                   {"prompt": "a cat", "model": "tiny", "size": "128x128", "steps": 2}, timeout=120)
        assert status == 200 and len(json.loads(body)["data"]) == 1, body
        assert time.monotonic() - started < 10, "the tiny request waited for the other model's load"
        assert thread.is_alive() or slow_answer["answer"][0] in (503, 404)  # the slow one is still loading
        thread.join(300)
        status, _, body = slow_answer["answer"]
        assert status in (503, 404), body  # and then fails on its own, as a model that cannot load here
        assert "uncached-sana" in json.loads(body)["error"]["message"]
    finally:
        server.stop()
