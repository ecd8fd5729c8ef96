"""`sana serve` and the attached CLI against hostile peers: a real server facing FIFOs, stray Host
headers, framing pages and a dying queue thread; the attaching CLI facing a fake server that answers
whatever a test tells it to (garbage, wrong images, early "done", foreign exit codes)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from .conftest import run_sana
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
    inject = ("import sana_cli.scheduler as s\n"
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
