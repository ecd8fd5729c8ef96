"""`sana serve` against the clients people point at it: the official `openai` SDK (sync, async, streaming,
its error classes, models.retrieve), the exact requests Open WebUI and LibreChat send, replayed, and
schemathesis against the served OpenAPI document. One real server for the module, started with the
aliases an operator would give those clients.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_serve import Server, _copy_tiny


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, cache_dir):
    cache = tmp_path_factory.mktemp("serve-openai")
    _copy_tiny(cache_dir, cache)
    started = Server(cache, "--model", "tiny", "--batch-window", "0.1", "--max-queue", "1",
                     "--alias", "dall-e-3=tiny", "--alias", "dall-e-*=tiny", "--alias", "gpt-image-1=tiny")
    yield started
    started.stop()


def _client(server, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, **kwargs)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _runs(server, mark: int) -> int:
    return sum(1 for line in server.lines[mark:] if ": done in" in line)


def test_sdk_sync_async_null_n_safety_identifier_and_answer_fields(server):
    from openai import AsyncOpenAI

    client = _client(server)
    answer = client.images.generate(prompt="a lighthouse", model="tiny", size="128x128", n=None,
                                    safety_identifier="user-123", quality="low", extra_body={"seed": 3})
    assert len(answer.data) == 1 and _image(answer.data[0].b64_json).size == (128, 128)
    assert (answer.size, answer.output_format, answer.quality, answer.background) == ("128x128", "png", "low",
                                                                                      "opaque")
    meta = json.loads(_image(answer.data[0].b64_json).info["sana"])
    assert meta["steps"] == 2  # low: half the tiny preset's 4 steps

    async def run():
        async_client = AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
        return await async_client.images.generate(prompt="a lighthouse", model="tiny", size="128x128",
                                                  extra_body={"seed": 3, "steps": 2})

    again = asyncio.run(run())
    assert np.array_equal(np.asarray(_image(again.data[0].b64_json)), np.asarray(_image(answer.data[0].b64_json)))
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("dall-e-3").model_extra["alias_of"] == "tiny"


def test_sdk_stream_yields_partial_previews_then_the_completed_image(server):
    client = _client(server)
    events = list(client.images.generate(prompt="a lighthouse", model="tiny", size="128x128", stream=True,
                                         partial_images=2, extra_body={"seed": 9, "steps": 6}))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = _image(events[-1].b64_json)
    assert final.size == (128, 128) and events[-1].size == "128x128" and events[-1].output_format == "png"
    previews = [np.asarray(_image(event.b64_json).convert("RGB"), dtype=np.int16) for event in events[:2]]
    assert all(p.shape[0] <= 256 and p.shape[0] < 128 for p in previews)  # small previews, not full decodes
    assert np.abs(previews[0] - previews[1]).max() > 0  # two different moments of the denoise


def test_sdk_error_classes_carry_code_and_param(server):
    import openai

    client = _client(server)

    def fails(kind, **kwargs):
        with pytest.raises(kind) as caught:
            client.images.generate(prompt=kwargs.pop("prompt", "a cat"), model=kwargs.pop("model", "tiny"), **kwargs)
        return caught.value

    assert fails(openai.BadRequestError, size="100x100").param == "size"
    assert fails(openai.BadRequestError, size="128x128", extra_body={"steps": 5000}).param == "steps"
    assert fails(openai.BadRequestError, size="128x128", extra_body={"guidance": 99}).param == "guidance"
    assert fails(openai.BadRequestError, size="128x128", extra_body={"seed": -1}).param == "seed"
    transparent = fails(openai.BadRequestError, background="transparent")
    assert transparent.param == "background" and "opaque" in transparent.message
    assert fails(openai.BadRequestError, quality="ultra").param == "quality"
    assert fails(openai.BadRequestError, output_format="gif").code == "unsupported_value"
    assert fails(openai.BadRequestError, output_compression=50).param == "output_compression"  # png
    assert fails(openai.BadRequestError, partial_images=4, stream=True).param == "partial_images"
    missing = fails(openai.NotFoundError, model="no-such-model")
    assert missing.code == "model_not_found" and missing.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError) as edits:
        client.images.edit(image=("x.png", io.BytesIO(b"x")), prompt="a cat", model="tiny-sprint")
    assert edits.value.param == "image" and "x.png is not a readable image" in edits.value.message
    with pytest.raises(openai.BadRequestError) as variations:
        client.images.create_variation(image=io.BytesIO(b"x"), model="tiny-sprint")
    assert variations.value.code == "unsupported_endpoint" and "/v1/images/edits" in variations.value.message


def test_output_compression_is_honoured_and_kept_in_the_metadata(server):
    client = _client(server)
    sizes = {}
    for quality in (10, 95):
        answer = client.images.generate(prompt="a lighthouse", model="tiny", size="128x128", output_format="jpeg",
                                        output_compression=quality, extra_body={"seed": 4})
        data = base64.b64decode(answer.data[0].b64_json)
        assert data[:3] == b"\xff\xd8\xff"
        sizes[quality] = len(data)
        (tmp := io.BytesIO(data)).seek(0)
        meta = Image.open(tmp).getexif()[0x010E]
        assert meta.startswith("sana:") and json.loads(meta[5:])["output_compression"] == quality
    assert sizes[10] < sizes[95]


def test_no_body_gives_a_5xx_on_either_route(server):
    def post(path, raw):
        request = urllib.request.Request(server.url(path), data=raw, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    base = {"prompt": "a cat", "model": "tiny", "size": "128x128"}
    bodies = [
        b"[" * 100000 + b"]" * 100000,  # RecursionError in the parser
        json.dumps({**base, "n": {"a": [1]}}).replace("[1]", "[" * 40 + "1" + "]" * 40).encode(),
        json.dumps({**base, "guidance": 10**400}).encode(),  # OverflowError in float()
        json.dumps({**base, "output_format": ["png"]}).encode(),  # a list where text goes
        json.dumps({**base, "pag_scale": 2.0, "pag_layers": "no_such_layer"}).encode(),
        json.dumps({**base, "pag_scale": 2.0, "pag_layers": "["}).encode(),
        json.dumps({**base, "quality": {}, "style": "bogus"}).encode(),
        json.dumps({**base, "user": ["x"]}).encode(),
    ]
    mark = len(server.lines)
    for raw in bodies:
        status, answer = post("/v1/images/generations", raw)
        assert status == 400 and set(answer["error"]) >= {"message", "type", "param", "code"}, (raw[:80], answer)
    job = {"prompt": "a cat", "seed": 1}
    for raw in [b"[" * 100000, json.dumps({"model": "tiny", "jobs": [{**job, "steps": 10**400}]}).encode(),
                json.dumps({"model": "tiny", "jobs": [{**job, "pixels": ["x"]}]}).encode(),
                json.dumps({"model": "tiny", "decode": ["auto"], "jobs": [job]}).encode(),
                json.dumps({"model": "tiny", "load": {"dtype": 10**400}, "jobs": [job]}).encode()]:
        status, answer = post("/v1/sana/jobs", raw)
        assert 400 <= status < 500 and "error" in answer, (raw[:80], answer)
    assert _runs(server, mark) == 0  # nothing rendered for any of them


def test_headers_clients_rely_on(server):
    with urllib.request.urlopen(server.url("/v1/models"), timeout=30) as answer:
        assert answer.headers["x-request-id"].startswith("req_")
    with pytest.raises(urllib.error.HTTPError) as wrong_method:
        urllib.request.urlopen(server.url("/v1/images/generations"), timeout=30)
    assert wrong_method.value.code == 405 and wrong_method.value.headers["Allow"] == "POST"
    assert json.loads(wrong_method.value.read())["error"]["code"] == "method_not_allowed"


def _raw(server, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_retry_after_on_429(server):
    """--max-queue 1: a render holds the scheduler, one request waits, the next is told when to retry."""
    mark = len(server.lines)
    busy = _raw(server, {"prompt": "slow", "model": "tiny", "size": "128x128", "steps": 1000, "stream": True})
    server.wait_for("GPU batch", after=mark)
    waiting = _raw(server, {"prompt": "waits", "model": "tiny", "size": "128x128", "steps": 1})
    time.sleep(0.5)
    request = urllib.request.Request(server.url("/v1/images/generations"), method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"prompt": "x", "model": "tiny"}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    import openai

    with pytest.raises(openai.RateLimitError) as limited:  # the SDK's class, with the code
        _client(server).images.generate(prompt="x", model="tiny")
    busy.close()
    waiting.close()
    assert refused.value.code == 429 and int(refused.value.headers["Retry-After"]) > 0
    assert json.loads(refused.value.read())["error"]["code"] == "queue_full" and limited.value.code == "queue_full"
    server.wait_for("went away while it was rendering", after=mark)


def test_idempotency_key_renders_once(server):
    body = {"prompt": "a cat", "model": "tiny", "size": "128x128", "steps": 2}
    key = {"Idempotency-Key": "retry-me-1"}
    time.sleep(1)
    mark = len(server.lines)
    first = server.post("/v1/images/generations", body, headers=key)
    second = server.post("/v1/images/generations", body, headers=key)
    assert first[0] == second[0] == 200 and first[1]["data"] == second[1]["data"]  # same seed, same bytes
    assert _runs(server, mark) == 1
    other = server.post("/v1/images/generations", {**body, "prompt": "a dog"}, headers=key)
    assert other[0] == 400 and other[1]["error"]["code"] == "idempotency_key_reused"
    # A retry that arrives while the first is still rendering joins it.
    import threading

    mark = len(server.lines)
    answers = []
    slow = {**body, "steps": 12}
    threads = [threading.Thread(target=lambda: answers.append(server.post(
        "/v1/images/generations", slow, headers={"Idempotency-Key": "retry-me-2"}))) for _ in range(2)]
    threads[0].start()
    server.wait_for("GPU batch", after=mark)
    threads[1].start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 2 and answers[0] == answers[1] and answers[0][0] == 200
    assert _runs(server, mark) == 1


def test_named_sizes_render_the_nearest_exact_size_and_say_so(server):
    status, answer = server.post("/v1/images/generations", {"prompt": "a cat", "model": "tiny", "size": "1792x1024",
                                                            "steps": 1})
    assert status == 200 and answer["size"] == "160x96" and "1792x1024" in answer["size_note"]
    assert _image(answer["data"][0]["b64_json"]).size == (160, 96)  # rendered so, never resized or cropped
    # Any other size is still exact or refused, as on the command line.
    assert server.post("/v1/images/generations", {"prompt": "a cat", "model": "tiny", "size": "1000x1000"})[0] == 400


def test_open_webui_request_replayed(server):
    """Open WebUI's images router, engine "openai", with only the URL set: model dall-e-2, size 512x512,
    n 1, response_format b64_json, a Bearer key (any text) and JSON."""
    request = urllib.request.Request(server.url("/v1/images/generations"), method="POST", data=json.dumps(
        {"model": "dall-e-2", "prompt": "a lighthouse", "n": 1, "size": "512x512",
         "response_format": "b64_json"}).encode(),
        headers={"Authorization": "Bearer sk-anything", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        body = json.loads(answer.read())
    assert _image(body["data"][0]["b64_json"]).size == (128, 128) and "512x512" in body["size_note"]
    # A gpt-image model: no response_format, size auto.
    request = urllib.request.Request(server.url("/v1/images/generations"), method="POST", data=json.dumps(
        {"model": "gpt-image-1", "prompt": "a lighthouse", "n": 1, "size": "auto"}).encode(),
        headers={"Authorization": "Bearer sk-anything", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        body = json.loads(answer.read())
    assert _image(body["data"][0]["b64_json"]).size == (128, 128) and body["size"] == "128x128"


def test_librechat_dalle3_request_replayed(server):
    """LibreChat's DALL-E 3 tool: model dall-e-3, quality, style, a dall-e-3 size, n 1, no response_format,
    and it reads data[0].url."""
    client = _client(server)
    answer = client.images.generate(model="dall-e-3", prompt="a lighthouse", quality="hd", style="vivid",
                                    size="1024x1792", n=1)
    url = answer.data[0].url
    with urllib.request.urlopen(url, timeout=30) as fetched:
        image = Image.open(io.BytesIO(fetched.read()))
    assert image.size == (96, 160) and answer.quality == "high"


# ---- image edits: a multipart form with the start image --------------------------------------------------

def _start_png(path: Path, seed: int = 0) -> Path:
    """A noisy RGBA start image with an EXIF orientation: transparency to composite, a rotation to apply, a
    size (96x80) to resize and crop."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (80, 96, 4), dtype=np.uint8), "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    image.save(path, exif=exif)
    return path


def _form(fields: dict, files: list) -> tuple[bytes, str]:
    """A multipart/form-data body as an HTTP client builds it: text fields, then (name, file name, bytes,
    type) file parts."""
    from urllib3 import encode_multipart_formdata

    parts = [(name, str(value)) for name, value in fields.items()]
    parts += [(name, (filename, data, kind)) for name, filename, data, kind in files]
    return encode_multipart_formdata(parts)


def _post_form(server, path: str, fields: dict, files: list, headers: dict | None = None):
    body, kind = _form(fields, files)
    request = urllib.request.Request(server.url(path), data=body, method="POST",
                                     headers={"Content-Type": kind, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_sdk_images_edit_answers_the_pixels_of_the_clis_image_run(server, tmp_path):
    """The openai SDK's images.edit (a multipart form: the file, the prompt, Sana's fields in extra_body) gives
    the pixels of `sana generate --image --strength` with the same seed, and the same key; the upload went
    through the input-image rule (EXIF rotation, transparency on white, cover-resize and crop)."""
    from .conftest import run_sana
    from sana_cli.storage.images import read_metadata

    start = _start_png(tmp_path / "street.png")
    with open(start, "rb") as handle:
        answer = _client(server).images.edit(image=handle, prompt="a street at night", model="tiny-sprint",
                                             response_format="b64_json", extra_body={"seed": 3, "strength": 0.5})
    (tmp_path / "edit.png").write_bytes(base64.b64decode(answer.data[0].b64_json))
    cli = run_sana("generate", "a street at night", "--model", "tiny-sprint", "--seed", 3, "--image", start,
                   "--strength", 0.5, "-o", tmp_path / "cli.png", "--no-server", env=server.env)
    assert cli.returncode == 0, cli.stderr
    edited, made = (np.asarray(Image.open(tmp_path / name).convert("RGB")) for name in ("edit.png", "cli.png"))
    assert np.array_equal(edited, made)
    ours, theirs = (read_metadata(tmp_path / name)["sana"] for name in ("edit.png", "cli.png"))
    assert ours["key"] == theirs["key"] and ours["image_sha256"] == theirs["image_sha256"]
    assert ours["image"] == "street.png" and ours["strength"] == 0.5  # the uploaded name, never a server path
    assert answer.data[0].seed == 3 if hasattr(answer.data[0], "seed") else True


def test_open_webui_edit_request_replayed(server, tmp_path):
    """Open WebUI's image edit, engine "openai": a multipart form with model (its edit model setting), prompt,
    n and size as text, response_format b64_json, and the chat's image as `image` (one) or `image[]` (a list),
    named <uuid>.png; it reads data[i].b64_json."""
    start = _start_png(tmp_path / "s.png").read_bytes()
    for name in ("image", "image[]"):
        status, body = _post_form(server, "/v1/images/edits",
                                  {"model": "tiny-sprint", "prompt": "make it night", "n": 1, "size": "512x512",
                                   "response_format": "b64_json"},
                                  [(name, "0b7c1e3a-6d1f-4c2e-9a57-1f0d3c2b4a5e.png", start, "image/png")],
                                  headers={"Authorization": "Bearer sk-anything"})
        assert status == 200, body
        assert _image(body["data"][0]["b64_json"]).size == (128, 128) and "512x512" in body["size_note"]


def test_an_edit_with_an_idempotency_key_renders_once(server, tmp_path):
    """An edit retried with the same Idempotency-Key and the same form (fields, and files by their bytes) gets
    the first answer without a second render; the key with another file is refused."""
    start = _start_png(tmp_path / "s.png").read_bytes()
    fields = {"model": "tiny-sprint", "prompt": "make it night", "seed": 2}
    key = {"Idempotency-Key": "edit-retry-1"}
    mark = len(server.lines)
    first, second = (_post_form(server, "/v1/images/edits", fields, [("image", "s.png", start, "image/png")],
                                headers=key) for _ in range(2))
    assert first[0] == second[0] == 200 and first[1]["data"] == second[1]["data"]
    assert _runs(server, mark) == 1
    other = _post_form(server, "/v1/images/edits", fields,
                       [("image", "s.png", _start_png(tmp_path / "t.png", seed=1).read_bytes(), "image/png")],
                       headers=key)
    assert other[0] == 400 and other[1]["error"]["code"] == "idempotency_key_reused"


def test_bad_uploads_are_one_400_each_and_nothing_renders(server, tmp_path):
    """Each bad upload is a 400 (or 413 for a body over the bound) with one message naming its field, and
    nothing renders; a form a page of another site posts is 403; variations say where to go."""
    from .test_bad_inputs import EDIT_CASES

    mark = len(server.lines)
    for case in EDIT_CASES:
        status, body = _post_form(server, case.path, *case.body(), headers=case.headers)
        assert status == case.code and case.says in body["error"]["message"], (case.name, status, body)
        assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert _runs(server, mark) == 0


def test_openai_masks_become_white_where_transparent():
    """OpenAI's mask marks the area to edit by alpha 0; Sana's mask by white: an RGBA mask is converted, a mask
    without alpha and bytes that are not an image are left as they are."""
    from sana_cli.server.openai_images import openai_mask

    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((1, 0), (0, 0, 0, 0))
    mask.putpixel((3, 1), (10, 10, 10, 0))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    converted = Image.open(io.BytesIO(openai_mask(out.getvalue())))
    assert converted.mode == "L"
    assert np.asarray(converted).tolist() == [[0, 255, 0, 0], [0, 0, 0, 255]]
    grey = io.BytesIO()
    Image.new("L", (4, 2), 255).save(grey, format="PNG")
    assert openai_mask(grey.getvalue()) == grey.getvalue() and openai_mask(b"not an image") == b"not an image"


def test_openapi_document_and_schemathesis(server, tmp_path):
    """schemathesis against the served document: no 5xx, answers match the document, invalid input refused."""
    pytest.importorskip("schemathesis")
    import subprocess
    import sys

    with urllib.request.urlopen(server.url("/openapi.json"), timeout=30) as answer:
        document = json.loads(answer.read())
    assert {"/v1/images/generations", "/v1/models", "/v1/models/{model_id}"} <= set(document["paths"])
    schemathesis = str(Path(sys.executable).with_name("schemathesis"))
    run = subprocess.run([schemathesis, "run", server.url("/openapi.json"), "--checks",
                          "not_a_server_error,status_code_conformance,content_type_conformance,"
                          "response_schema_conformance,negative_data_rejection",
                          "--max-examples", "15", "--seed", "1", "--workers", "1",
                          "--request-timeout", "60", "--exclude-path", "/v1/images/files/{name}"],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert "Tested: 5" in run.stdout and counts and counts.group(1) == counts.group(2) and int(counts.group(1)) > 100


def test_the_readme_http_rows(server):
    """Each HTTP row of the README's bad-input table, sent to the real server: its status, an OpenAI error
    object whose message holds the row's text, and no render."""
    from .test_bad_inputs import HTTP_CASES

    mark = len(server.lines)
    for case in HTTP_CASES:
        data = None if case.body is None else case.body if isinstance(case.body, bytes) else \
            json.dumps(case.body).encode()
        request = urllib.request.Request(server.url(case.path), data=data, method=case.method,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        error = json.loads(refused.value.read())["error"]
        assert refused.value.code == case.code, (case.name, error)
        assert case.says in error["message"] and set(error) >= {"type", "param", "code"}, (case.name, error)
    assert _runs(server, mark) == 0


def test_litellm_image_generation_sync_and_async(server):
    """LiteLLM routes `openai/NAME` to any OpenAI-compatible server; Sana's fields ride in extra_body."""
    litellm = pytest.importorskip("litellm")
    kwargs = dict(model="openai/tiny", prompt="a lighthouse", api_base=server.url("/v1"), api_key="unused",
                  size="128x128", extra_body={"seed": 12, "steps": 2})
    answer = litellm.image_generation(**kwargs)
    first = np.asarray(_image(answer.data[0].b64_json))
    again = asyncio.run(litellm.aimage_generation(**kwargs))
    assert first.shape == (128, 128, 3) and np.array_equal(first, np.asarray(_image(again.data[0].b64_json)))
    with pytest.raises(litellm.exceptions.BadRequestError) as refused:
        litellm.image_generation(**{**kwargs, "size": "100x100"})
    assert "not a multiple of 32" in str(refused.value)


def test_aliases_sizes_params_and_preview_steps_torch_free():
    from sana_cli.errors import UsageError
    from sana_cli.server.openai_images import Aliases, nearest_size, param_of
    from sana_cli.server.work_queue import preview_steps

    aliases = Aliases.parse(["dall-e-3=sana-1600m-1024", "dall-e-*=tiny", "*=sana-600m-512"])
    assert [aliases.resolve(name) for name in ("dall-e-3", "dall-e-2", "gpt-image-1", "tiny", "org/name")] == [
        "sana-1600m-1024", "tiny", "sana-600m-512", "tiny", "org/name"]
    with pytest.raises(UsageError, match="is not NAME=MODEL"):
        Aliases.parse(["dall-e-3"])
    assert nearest_size(1024, 1792, 1024) == (1344, 768) and nearest_size(512, 1024, 1024) == (512, 512)
    assert nearest_size(4096, 1024, 1536) == (3360, 5024)  # 4096's pixel count at 2:3, sides multiples of 32
    assert param_of("width 100 is not a multiple of 32") == "size"
    assert param_of("tiny takes 1-1000 steps, got 0") == "steps"
    assert param_of("guidance must be 0 or more, got -1") == "guidance"
    assert param_of("seed must be a whole number in 0..2^63-1, got -1") == "seed"
    assert preview_steps(3, 20) == (5, 10, 15) and preview_steps(3, 2) == (1,) and preview_steps(0, 20) == ()


def test_a_preview_of_a_4096_image_costs_a_small_decode(tiny_models):
    """The preview of a 4096x4096-class latent (128x128 at Sana's 32x DC-AE) is averaged down to 8x8 latent
    pixels before the VAE sees it: the decode's input, and so its cost, does not grow with the image."""
    import torch

    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import load
    from sana_cli.engine.runner import PREVIEW_LATENT_SIDE, _preview

    loaded = load(resolve("tiny"))
    vae = loaded.pipe.vae
    seen = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        channels = vae.config.latent_channels
        wide = _preview(loaded, torch.randn(1, channels, 128, 256, generator=torch.Generator().manual_seed(0)))
        square = _preview(loaded, torch.randn(1, channels, 128, 128, generator=torch.Generator().manual_seed(1)))
    finally:
        hook.remove()
    assert [shape[-2:] for shape in seen] == [(4, 8), (8, 8)] and PREVIEW_LATENT_SIDE == 8
    assert square.size[0] == square.size[1] and wide.size == (square.size[0], square.size[1] // 2)  # same longest side
    assert np.asarray(square).std() > 0  # a decoded image, not a blank
