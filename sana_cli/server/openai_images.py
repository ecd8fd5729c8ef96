"""OpenAI's images API as `sana serve` speaks it: every request field checked against OpenAI's types
(the openai-openapi spec and the openai SDK), what each one does here, model aliases, the size policy
for OpenAI's named sizes, and the answer's fields. Torch-free; the server turns ApiError into HTTP.

What each OpenAI field does (the README's table is this one):
  prompt              required text, at most MAX_PROMPT_CHARS characters
  model               a preset or hub id; an operator's --alias maps other names (dall-e-3, gpt-image-1, *)
  n                   1..10, null = 1
  size                WIDTHxHEIGHT rendered exactly, or one of OpenAI's named sizes: rendered at the model's
                      nearest exactly renderable size when the model cannot render it (said in the answer)
  quality             low = half the preset's steps, medium = three quarters, high/xhigh/max/hd/standard/auto/
                      null = the preset's steps; an explicit `steps` wins; the answer says low/medium/high
  complexity, frame_count, frame_duration_ms, svg, output_format gif/svg: refused (400, naming the field)
  response_format     b64_json or url; default b64_json, url for models named dall-e-* (as OpenAI's)
  output_format       png (default), jpeg, webp
  output_compression  0..100, the JPEG/WebP quality; refused with png (OpenAI: jpeg and webp only)
  background          opaque/auto/null; transparent is refused (Sana renders no alpha channel)
  style               vivid/natural/null: accepted, no effect (Sana has no style switch)
  moderation          low/auto/null: accepted; this server moderates nothing (the operator's model is theirs)
  stream              true: Server-Sent Events as OpenAI sends them
  partial_images      0..3 previews while streaming (small approximate decodes at evenly spaced steps)
  user, safety_identifier  text, accepted and not stored

POST /v1/images/edits takes the same fields as a multipart form (parse_edit), and:
  image / image[]     exactly one uploaded start image (image-to-image); several are refused, naming the count
  mask                an uploaded mask, where the server has a mask field (inpainting); refused otherwise
  input_fidelity      high/low: accepted, no effect (`strength` is Sana's control of how far the image moves)
  markup              refused (an OpenAI annotation input Sana has no use for)
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, fields

from ..models import presets
from ..planning.fields import HTTP_FIELDS
from .wire import error_object

MAX_PROMPT_CHARS = 10000
MAX_N = 10  # images per OpenAI request, as OpenAI's own limit
MAX_ID_CHARS = 256  # user, safety_identifier, Idempotency-Key
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}
QUALITIES = ("standard", "hd", "low", "medium", "high", "xhigh", "max", "auto")
# quality -> the fraction of the preset's steps (at least 1)
QUALITY_STEPS = {"low": 0.5, "medium": 0.75, "high": 1.0, "xhigh": 1.0, "max": 1.0, "hd": 1.0, "standard": 1.0,
                 "auto": 1.0}
# Formats and options of OpenAI's newest models that Sana cannot make: refused, naming the field.
UNMADE_FORMATS = ("gif", "svg")
UNSUPPORTED = {"complexity": "Sana has no planning stage", "frame_count": "Sana makes still images (no GIF)",
               "frame_duration_ms": "Sana makes still images (no GIF)", "svg": "Sana makes raster images (no SVG)"}
STYLES = ("vivid", "natural")
MODERATIONS = ("low", "auto")
BACKGROUNDS = ("transparent", "opaque", "auto")
# OpenAI's named sizes (dall-e-2, dall-e-3, gpt-image-1): a client sends these without knowing the model.
NAMED_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536")
MAX_PARTIAL_IMAGES = 3
OPENAI_FIELDS = ("prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
                 "background", "style", "moderation", "stream", "partial_images", "user", "safety_identifier",
                 *UNSUPPORTED)
# Sana's own fields an OpenAI request may add: the field table's rows marked for HTTP (Request fields that
# decide pixels and name no file).
SANA_FIELDS = HTTP_FIELDS


class ApiError(Exception):
    """An answer that is not a success: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, exit_code: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.exit_code = exit_code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_object(self.message, self.type, self.param, self.code, self.exit_code)


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Aliases:
    """Model names the operator maps (--alias FROM=TO): exact names first, then shell patterns in the
    order given (`dall-e-*`, `*`), which never take a preset's name or a hub id (org/name)."""

    pairs: tuple = ()

    @classmethod
    def parse(cls, values) -> "Aliases":
        from ..errors import UsageError

        pairs = []
        for value in values:
            name, sep, target = value.partition("=")
            name, target = name.strip(), target.strip()
            if not sep or not name or not target:
                raise UsageError(f"--alias {value!r} is not NAME=MODEL (for example dall-e-3=sana-1600m-1024)")
            pairs.append((name, target))
        return cls(tuple(pairs))

    def resolve(self, name: str) -> str:
        for alias, target in self.pairs:
            if alias == name:
                return target
        if presets.find(name) is not None or "/" in name:  # a preset or a hub id is itself
            return name
        for alias, target in self.pairs:
            if any(ch in alias for ch in "*?[") and fnmatch.fnmatchcase(name, alias):
                return target
        return name

    def names(self) -> list[str]:
        return [alias for alias, _ in self.pairs if not any(ch in alias for ch in "*?[")]


@dataclass
class OpenAIRequest:
    prompt: str
    model: str | None
    n: int
    width: int | None
    height: int | None
    size: str | None  # as asked
    quality: str | None
    response_format: str
    output_format: str
    output_compression: int | None
    background: str | None
    stream: bool
    partial_images: int
    sana: dict  # Sana's own fields, type-checked


def _choice(body: dict, name: str, choices) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise bad(name, f"'{name}' must be one of {', '.join(choices)}")
    return value


def _whole(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(name, f"'{name}' must be a whole number in {low}..{high}")
    return value


def _text(body: dict, name: str, limit: int = MAX_ID_CHARS) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise bad(name, f"'{name}' must be text of at most {limit} characters")
    return value


def _sana_type(name: str, value, annotation: str):
    """The JSON value of a Sana field against the Request field's declared type; numbers must fit a float."""
    if value is None and "None" in annotation:
        return value
    if "bool" in annotation:
        ok = isinstance(value, bool)
    elif "float" in annotation:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                ok = False
            ok = ok and math.isfinite(value)
    elif "int" in annotation:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "str" in annotation:
        ok = isinstance(value, str) and len(value) <= MAX_PROMPT_CHARS
    else:
        ok = False
    if not ok:
        raise bad(name, f"'{name}' must be {annotation.replace(' | None', '')}"
                  + (" (a finite number)" if "float" in annotation else ""))
    return value


def parse(body: dict, extra: tuple = ()) -> OpenAIRequest:
    """Check every field of an images request (and the `extra` fields of its route); raises ApiError (400)
    naming the field."""
    from ..planning.plan import Request

    for name in body:
        if name not in OPENAI_FIELDS and name not in SANA_FIELDS and name not in extra:
            raise ApiError(400, f"unknown field '{name}'", param=name, code="unknown_parameter")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("prompt", "'prompt' must be text", code="missing_required_parameter" if prompt is None else
                  "invalid_value")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad("prompt", f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    for name, why in UNSUPPORTED.items():
        if body.get(name) is not None:
            raise bad(name, f"'{name}' is not supported here: {why}", code="unsupported_parameter")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > MAX_ID_CHARS):
        raise bad("model", "'model' must be a model name")
    n = _whole(body, "n", 1, MAX_N)
    quality = _choice(body, "quality", QUALITIES)
    # OpenAI answers dall-e-2 and dall-e-3 with a url unless told otherwise (clients read data[0].url unasked).
    default_format = "url" if isinstance(model, str) and model.startswith("dall-e") else "b64_json"
    response_format = _choice(body, "response_format", ("b64_json", "url")) or default_format
    if body.get("output_format") in UNMADE_FORMATS:
        raise bad("output_format", f"output_format {body['output_format']!r} is not supported here: Sana makes "
                  "png, jpeg or webp", code="unsupported_value")
    output_format = _choice(body, "output_format", tuple(OUTPUT_FORMATS)) or "png"
    output_format = "jpeg" if output_format == "jpg" else output_format
    compression = _whole(body, "output_compression", 0, 100)
    if compression is not None and output_format == "png":
        raise bad("output_compression", "'output_compression' applies to jpeg and webp only (png is lossless)")
    background = _choice(body, "background", BACKGROUNDS)
    if background == "transparent":
        raise bad("background", "background 'transparent' cannot be rendered: Sana makes opaque images "
                  "(use opaque or auto)")
    _choice(body, "style", STYLES)
    _choice(body, "input_fidelity", INPUT_FIDELITIES)
    _choice(body, "moderation", MODERATIONS)
    _text(body, "user")
    _text(body, "safety_identifier")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    partial = _whole(body, "partial_images", 0, MAX_PARTIAL_IMAGES)
    if partial and not stream:
        raise bad("partial_images", "'partial_images' needs 'stream': true")
    width = height = None
    size = body.get("size")
    if size is not None and not isinstance(size, str):
        raise bad("size", "'size' must be WIDTHxHEIGHT (for example 1024x1024) or auto")
    if size not in (None, "auto"):
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
        if not match:
            raise bad("size", "'size' must be WIDTHxHEIGHT (for example 1024x1024) or auto")
        width, height = int(match.group(1)), int(match.group(2))
    types = {f.name: str(f.type) for f in fields(Request)}
    sana = {name: _sana_type(name, body[name], types[name]) for name in SANA_FIELDS if name in body}
    return OpenAIRequest(prompt=prompt, model=model, n=n or 1, width=width, height=height, size=size,
                         quality=quality, response_format=response_format, output_format=output_format,
                         output_compression=compression, background=background, stream=bool(stream),
                         partial_images=partial or 0, sana=sana)


# ---- POST /v1/images/edits: a multipart form ------------------------------------------------------------

EDIT_FIELDS = ("input_fidelity",)  # form fields of an edit beyond those of a generation
INPUT_FIDELITIES = ("high", "low")
EDIT_FILES = ("image", "mask")  # the file parts an edit may upload (image[] is image, as the SDK sends several)
MAX_UPLOAD_BYTES = 50 << 20  # one uploaded file (OpenAI's own limit for an edit's image)
MAX_EDIT_FILES = 8  # file parts the form parser takes before refusing the body
MAX_EDIT_FIELDS = 64
MAX_EDIT_BODY = 2 * MAX_UPLOAD_BYTES + (1 << 20)
_INT_FORM_FIELDS = ("n", "output_compression", "partial_images")


@dataclass
class Upload:
    """One uploaded file of an edit: the form field it fills, the name the client gave it, its bytes."""

    field: str
    filename: str
    data: bytes


def parse_edit(parts: list, file_fields: tuple) -> tuple[OpenAIRequest, dict]:
    """The parts of an edit's form ((name, text) or (name, (file name, bytes))) as a checked request and its
    uploads {field: Upload}. `file_fields` are the job fields that take a file here (image; mask where the
    server has one). Every refusal is a 400 naming its field."""
    body: dict = {}
    files: dict = {}
    for name, value in parts:
        field = name[:-2] if name.endswith("[]") else name
        if isinstance(value, tuple):
            if field == "markup":
                raise bad("markup", "'markup' is not supported here: Sana takes no annotation image",
                          code="unsupported_parameter")
            if field not in EDIT_FILES:
                raise ApiError(400, f"unknown file field '{name}'", param=name, code="unknown_parameter")
            if field not in file_fields:
                raise bad(field, f"'{field}' is not supported by this server (it has no {field} input)",
                          code="unsupported_parameter")
            filename, data = value
            if len(data) > MAX_UPLOAD_BYTES:
                raise bad(field, f"the uploaded {field} is larger than {MAX_UPLOAD_BYTES >> 20} MiB")
            files.setdefault(field, []).append(Upload(field, filename, data))
            continue
        if field in EDIT_FILES or field == "markup":
            raise bad(field, f"'{field}' must be an uploaded file (a multipart file part)")
        if name in body:
            raise bad(name, f"'{name}' is given twice")
        body[name] = _form_value(name, value)
    images = files.get("image", [])
    if not images:
        raise bad("image", "'image' is required: the image to edit, as an uploaded file",
                  code="missing_required_parameter")
    for field, uploads in files.items():
        if len(uploads) > 1:
            raise bad(field, f"Sana edits one image at a time (image-to-image from one start image); this request "
                      f"sends {len(uploads)} as '{field}'")
    return parse(body, extra=EDIT_FIELDS), {field: uploads[0] for field, uploads in files.items()}


def _form_value(name: str, text: str):
    """A form field's text as the JSON value its field takes: whole numbers, finite numbers, true/false;
    text that is none of these stays text (and is refused by the field's own check)."""
    from ..planning.plan import Request

    types = {f.name: str(f.type) for f in fields(Request)}
    kind = types.get(name, "") if name in SANA_FIELDS else "int" if name in _INT_FORM_FIELDS else ""
    if name == "stream":
        return {"true": True, "false": False}.get(text.strip().lower(), text)
    if "int" in kind and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", text):
        return int(text)
    if "float" in kind:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def upload_name(upload: Upload, digest: str) -> str:
    """The name an uploaded file goes by in the image's metadata (and so in `sana info --command`): the plain
    file name the client gave it, or upload-<sha256 prefix>.png when that is not a plain, visible name."""
    from ..planning.checks import check_name
    from ..errors import UsageError

    name = upload.filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    try:
        if not name or len(name) > 128:
            raise UsageError("no name")
        check_name(name)
    except UsageError:
        name = f"upload-{digest[:16]}.png"
    return name if upload.field == "image" else f"{upload.field}-{name}"


def openai_mask(data: bytes) -> bytes:
    """OpenAI's mask (transparent where the image is to be edited) as Sana's (white where it is repainted): a
    mask with an alpha channel becomes a greyscale PNG, white where its alpha is 0 and black elsewhere. A mask
    without alpha is taken as it is (white = repaint). Bytes that are not an image are left for the input-image
    checks to refuse."""
    import io
    import warnings

    from PIL import Image

    from ..safeio import IMAGE_FORMATS, MAX_IMAGE_PIXELS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return data
            if not (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
                return data
            alpha = image.convert("RGBA").getchannel("A")
    except Exception:  # noqa: BLE001 - not an image: the planning checks refuse it with their own words
        return data
    out = io.BytesIO()
    alpha.point(lambda value: 255 if value == 0 else 0).save(out, format="PNG")
    return out.getvalue()


def nearest_size(native: int, width: int, height: int) -> tuple[int, int]:
    """The size a `native`-px model renders exactly nearest to WIDTHxHEIGHT: the model's own pixel count at
    this aspect ratio, both sides multiples of 32. Rendered as is (no resolution binning, no crop)."""
    from ..planning.plan import ASPECT_RANGE, SIZE_MULTIPLE

    aspect = min(max(height / width, ASPECT_RANGE[0]), ASPECT_RANGE[1])
    w = native / math.sqrt(aspect)
    h = native * math.sqrt(aspect)
    return (max(SIZE_MULTIPLE, round(w / SIZE_MULTIPLE) * SIZE_MULTIPLE),
            max(SIZE_MULTIPLE, round(h / SIZE_MULTIPLE) * SIZE_MULTIPLE))


def size_for(model_ref, request: OpenAIRequest) -> tuple[int | None, int | None, str | None]:
    """(width, height, note): a named OpenAI size the model cannot render exactly becomes its nearest
    renderable size, said in the note; any other size is planned as asked (and refused if wrong)."""
    from ..planning.plan import SCALE_RANGE

    width, height = request.width, request.height
    native = model_ref.native_size
    if request.size not in NAMED_SIZES or native is None:
        return width, height, None
    ratio = width * height / (native * native)
    if SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1]:
        return width, height, None
    w, h = nearest_size(native, width, height)
    return w, h, (f"{request.size} is not a size {model_ref.name} renders ({native}px model); rendered {w}x{h}, "
                  "the nearest it renders exactly")


def steps_for(model_ref, request: OpenAIRequest) -> int | None:
    """Steps from `quality` (None: the preset's), unless the request names steps itself."""
    if "steps" in request.sana or request.quality is None:
        return request.sana.get("steps")
    fraction = QUALITY_STEPS[request.quality]
    if fraction == 1.0:
        return None
    return max(getattr(model_ref, "min_steps", 1) or 1, math.ceil(model_ref.steps * fraction))


def answer_quality(model_ref, steps: int) -> str:
    if steps >= model_ref.steps:
        return "high"
    return "medium" if steps >= math.ceil(model_ref.steps * 0.75) else "low"


# Words of planning errors -> the request field they are about.
_PARAM_WORDS = (
    (re.compile(r"^--image\b|cannot start from an image"), "image"),
    (re.compile(r"^--mask\b"), "mask"),
    (re.compile(r"^(width|height)\b|aspect ratio|^\d+x\d+ is|px model|--force-size|native size"), "size"),
    (re.compile(r"negative prompt"), "negative_prompt"),
    (re.compile(r"prompt"), "prompt"),
    (re.compile(r"\bsteps\b"), "steps"),
    (re.compile(r"^guidance|\bguidance\b"), "guidance"),
    (re.compile(r"pag.layers"), "pag_layers"),
    (re.compile(r"pag|PAG"), "pag_scale"),
    (re.compile(r"\bseed\b"), "seed"),
    (re.compile(r"strength"), "strength"),
    (re.compile(r"control"), "control_scale"),
)


def param_of(message: str) -> str | None:
    for pattern, param in _PARAM_WORDS:
        if pattern.search(message):
            return param
    return None
