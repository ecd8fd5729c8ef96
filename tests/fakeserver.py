"""A fake `sana serve` for the attaching CLI's tests: a real HTTP server on a loopback port or on a Unix
socket (where the CLI discovers servers) that answers each request with what the test tells it to.

By default it behaves as sana-cli's server does: a handshake with this version, a model description,
and for each attached run an NDJSON stream of one valid image per job (encoded by sana-cli's own
encoder, with the job's key in its metadata). A test replaces any part: `health` (the raw handshake
body), `events` (a function of the jobs sent that returns the lines to answer), `gate` (cleared: the
run's answer waits until the test sets it).
"""

from __future__ import annotations

import base64
import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DESCRIPTION = {"model": "tiny", "model_id": "tiny", "revision": None, "commit": None, "pipeline": "SanaPipeline",
               "device": "cpu", "dtype": "float32", "generator": "cpu", "scheduler": "fake", "versions": {}}


def image_bytes(job: dict, *, fmt: str = "PNG", size: tuple | None = None, key: str | None = None) -> bytes:
    """An image as sana-cli encodes it for this wire job (or with another size or key)."""
    from PIL import Image

    from sana_cli.storage.images import encode_image

    width, height = size or (job["width"], job["height"])
    meta = {"key": job["key"] if key is None else key, "prompt": job["prompt"], "seed": job["seed"]}
    return encode_image(Image.new("RGB", (width, height), (200, 40, 40)), fmt, meta)


def image_event(index: int, data: bytes) -> dict:
    return {"type": "image", "index": index, "decode": "full", "fallbacks": [], "seconds": 0.01,
            "retried_alone": False, "seed": 0, "key": "", "data": base64.b64encode(data).decode()}


def done_event() -> dict:
    return {"type": "done", "timings": {"encode": 0.0, "denoise": 0.0, "decode": 0.0}, "model": DESCRIPTION,
            "peak_memory_bytes": None, "peak_reserved_bytes": None}


def well_behaved(jobs: list[dict]) -> list:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}
    return [image_event(job["index"], image_bytes(job, fmt=fmt[job.get("ext", ".png")])) for job in jobs] + \
        [done_event()]


class FakeServer:
    def __init__(self, *, unix: Path | None = None, events=well_behaved, health: bytes | None = None):
        from sana_cli.version import __version__
        from sana_cli.planning.plan import KEY_SCHEMA

        self.events = events
        self.health = health if health is not None else json.dumps(
            {"ok": True, "sana_cli": __version__, "key_schema": KEY_SCHEMA, "pid": os.getpid(), "loaded": [],
             "queued": 0, "draining": False}).encode()
        self.gate = threading.Event()
        self.gate.set()
        self.runs: list[list[dict]] = []  # the jobs of each attached run received
        self.files: list[dict] = []  # the input files each attached run sent ({sha256: base64})
        self.on_health = None  # called on each handshake (after a CLI has planned, before it sends)
        handler = self._handler()
        if unix is not None:
            unix.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(unix.parent, 0o700)

            class UnixServer(socketserver.ThreadingUnixStreamServer):
                daemon_threads = True

            old = os.umask(0o177)
            try:
                self.httpd = UnixServer(str(unix), handler)
            finally:
                os.umask(old)
            self.env = {}
        else:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            self.httpd.daemon_threads = True
            self.env = {"SANA_SERVER": f"http://127.0.0.1:{self.httpd.server_address[1]}"}
        self.unix = unix
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def address_string(self):
                return "fake"

            def log_message(self, *args):
                pass

            def answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/health"):
                    if fake.on_health is not None:
                        fake.on_health()
                    self.answer(200, fake.health)
                else:
                    self.answer(404, b'{"error": {"message": "no such route"}}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if self.path.endswith("/load"):
                    self.answer(200, json.dumps({"model": DESCRIPTION}).encode())
                    return
                jobs = body.get("jobs", [])
                fake.runs.append(jobs)
                fake.files.append(body.get("files") or {})
                fake.gate.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                for line in fake.events(jobs):
                    raw = line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode()
                    try:
                        self.wfile.write(raw)
                        self.wfile.flush()
                    except OSError:
                        return
                self.close_connection = True

        return Handler

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.unix is not None:
            try:
                os.unlink(self.unix)
            except FileNotFoundError:
                pass
