"""`sana serve` and the attached CLI against hostile peers: a real server facing FIFOs, stray Host
headers, framing pages and a dying queue thread; the attaching CLI facing a fake server that answers
whatever a test tells it to (garbage, wrong images, early "done", foreign exit codes)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest

from .conftest import one_line_error, run_sana
from .test_serve import Server, _copy_tiny


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, cache_dir):
    cache = tmp_path_factory.mktemp("serve-hostile")
    _copy_tiny(cache_dir, cache)
    started = Server(cache, "--model", "tiny", "--batch-window", "0.1")
    yield started
    started.stop()


def _get(server: Server, path: str, headers: dict | None = None, timeout: float = 10):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
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
