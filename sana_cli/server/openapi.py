"""The OpenAPI document `sana serve` answers at /openapi.json: its public HTTP endpoints, with request
bodies as the server checks them (openai_api) and the answers it gives. Client generators and API
fuzzers (schemathesis) read it; the attach protocol of `sana generate` (/v1/sana/...) is not in it."""

from __future__ import annotations

from . import openai_images as oa


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _enum(values) -> dict:
    return _nullable({"type": "string", "enum": list(values)})


ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
                       "exit_code": {"type": "integer"}}}},
}

REQUEST = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "maxLength": oa.MAX_PROMPT_CHARS},
        "model": _nullable({"type": "string", "minLength": 1, "maxLength": oa.MAX_ID_CHARS}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": oa.MAX_N}),
        "size": _nullable({"type": "string", "pattern": r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"}),
        "quality": _enum(oa.QUALITIES),
        "response_format": _enum(("b64_json", "url")),
        "output_format": _enum(tuple(oa.OUTPUT_FORMATS)),
        "output_compression": _nullable({"type": "integer", "minimum": 0, "maximum": 100}),
        "background": _enum(("opaque", "auto")),
        "style": _enum(oa.STYLES),
        "moderation": _enum(oa.MODERATIONS),
        "stream": _nullable({"type": "boolean"}),
        "partial_images": _nullable({"type": "integer", "minimum": 0, "maximum": oa.MAX_PARTIAL_IMAGES}),
        "user": {"type": "string", "maxLength": oa.MAX_ID_CHARS},
        "safety_identifier": _nullable({"type": "string", "maxLength": oa.MAX_ID_CHARS}),
        "steps": _nullable({"type": "integer", "minimum": 1}),
        "guidance": _nullable({"type": "number"}),
        "negative_prompt": {"type": "string", "maxLength": oa.MAX_PROMPT_CHARS},
        "seed": _nullable({"type": "integer", "minimum": 0}),
        "pag_scale": {"type": "number"},
        "pag_layers": _nullable({"type": "string"}),
        "control_scale": _nullable({"type": "number"}),
        "strength": _nullable({"type": "number"}),
    },
}

def _edit_request() -> dict:
    """An edit's multipart form: the generation's fields as text parts (numbers as their text), one image."""
    properties = {}
    for name, schema in REQUEST["properties"].items():
        if name in ("stream", "partial_images"):
            continue  # streamed edits work; the document keeps the form to what every client sends
        # a form part has no null: the field's own type (a number travels as its text)
        properties[name] = schema["anyOf"][0] if "anyOf" in schema else schema
    properties["input_fidelity"] = {"type": "string", "enum": list(oa.INPUT_FIDELITIES)}
    properties["image"] = {"type": "string", "format": "binary",
                           "description": "the image to start from (PNG, JPEG or WebP); one"}
    return {"type": "object", "required": ["image", "prompt"], "additionalProperties": False,
            "properties": properties}


ANSWER_FIELDS = {
    "size": {"type": "string"}, "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
    "quality": {"type": "string", "enum": ["low", "medium", "high"]},
    "background": {"type": "string", "enum": ["opaque"]}, "size_note": {"type": "string"},
}

IMAGE = {"type": "object", "required": ["seed", "key"],
         "properties": {"b64_json": {"type": "string"}, "url": {"type": "string"},
                        "seed": {"type": "integer"}, "key": {"type": "string"}}}

IMAGES = {"type": "object", "required": ["created", "data"],
          "properties": {"created": {"type": "integer"}, "data": {"type": "array", "items": IMAGE},
                         **ANSWER_FIELDS}}

MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"],
         "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                        "created": {"type": "integer"}, "owned_by": {"type": "string"},
                        "loaded": {"type": "boolean"}, "alias_of": {"type": "string"}}}


def _errors(*codes: int) -> dict:
    return {str(code): {"description": "an OpenAI error object",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for code in codes}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(version: str) -> dict:
    key = [{"bearer": []}, {}]
    unsupported = {
        "summary": "not supported: image-to-image needs a prompt (use /v1/images/edits); answers an OpenAI error",
        "security": key,
        "responses": _errors(400, 401),
    }
    edits = {
        "summary": "image-to-image from one uploaded image (OpenAI's image edits), with a generation's fields",
        "security": key,
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"$ref": "#/components/schemas/ImageEditRequest"}}}},
        "responses": {
            "200": {"description": "the images",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}}}},
            **_errors(400, 401, 403, 404, 408, 413, 415, 429, 500, 503)}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "sana serve", "version": version,
                 "description": "OpenAI's images API for Sana models. A request with an Idempotency-Key "
                                "header renders once: a retry with the same key and body gets the same answer."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": ERROR, "ImagesRequest": REQUEST, "ImageEditRequest": _edit_request(),
                        "ImagesResponse": IMAGES, "Model": MODEL},
        },
        "paths": {
            "/v1/models": {"get": {
                "summary": "the presets, loaded models and aliases", "security": key,
                "responses": {"200": _json({"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string"}, "data": {"type": "array", "items": MODEL}}}, "the models"),
                    **_errors(401)}}},
            "/v1/models/{model_id}": {"get": {
                "summary": "one model of the list", "security": key,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(MODEL, "the model"), **_errors(401, 404)}}},
            "/v1/images/generations": {"post": {
                "summary": "render images (OpenAI's images API); stream: true answers Server-Sent Events",
                "security": key,
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,256}$"}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ImagesRequest"}}}},
                "responses": {
                    "200": {"description": "the images, or with stream: true their events",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}},
                                        "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, 401, 404, 413, 415, 429, 500, 503)}}},
            "/v1/images/edits": {"post": edits},
            "/v1/images/variations": {"post": unsupported},
            "/v1/images/files/{name}": {"get": {
                "summary": "an image of a url answer", "security": key,
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the image", "content": {
                    "image/png": {}, "image/jpeg": {}, "image/webp": {}}}, **_errors(401, 404)}}},
        },
    }
