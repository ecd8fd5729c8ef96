"""The per-image parameters, each declared once: one row per parameter in FIELDS.

A row says what the parameter is (type, default, range), how the `sana generate` and `sana batch` options
take it, which batch-file column carries it, whether it decides pixels (then it is in PIXEL_FIELDS: the key,
the metadata, every record of an image), how `sana info --command` writes it back, and whether the HTTP
layer takes it as an extra field of an OpenAI images request. `Request`, `BatchDefaults`, `ImageJob`'s
pixel fields, the batch-file columns, both commands' per-image options, the reproduce rules and the
server's fields are all made from these rows.

Adding a parameter: its row here, the engine code where it takes effect, and tests. A row without a
`resolve` rule of its own is resolved by planning as given (its default when unset, its range checked).

Torch-free, and imports only the shared errors module: every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED = object()  # the default of a field that has none (the prompt)

# The choices of the load options that decide pixels (not per-image: see plan.PixelOptions), for the
# options of every command and for planning's checks.
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")  # the option's spellings (the API takes the long names too)
DECODE_CHOICES = ("auto", "full", "strips", "patch-conv", "tiled")  # a VAE decode strategy
# --quantize: the transformer's weights in int8 (torchao, any device) or nf4 (bitsandbytes, CUDA). fp8 is the
# --fp8 mode under its other name: one fp8 path, so both spellings make the same pixels and the same key.
QUANTIZE_CHOICES = ("int8", "fp8", "nf4")


@dataclass(frozen=True)
class Field:
    name: str  # the attribute of Request, BatchDefaults and ImageJob
    type: str  # its annotation: "int | None", "float", "str", "tuple"...; a float option is a finite number
    default: object = None
    # -- the command line (generate; batch takes the same option as every row's default unless batch_help is "")
    flags: tuple[str, ...] = ()  # e.g. ("-g", "--guidance"); () for none
    metavar: str | None = None
    help: str = ""  # `sana generate --help`
    batch_help: str | None = None  # `sana batch --help` when it differs; "" when batch has no such option
    show_default: bool = False
    group: str = "image"  # the option group: image (size, sampling), input (LoRA, ControlNet, img2img), or video
    #                       (options of `sana video` alone)
    # -- where it lives
    request: bool = True  # a field of Request (what generate and the API take)
    batch_default: bool | None = None  # a field of BatchDefaults; None: when batch has the option
    column: str | None = None  # the batch-file column (JSON key, CSV header), if any
    column_type: type | None = None  # the column's type when it is not the field's (str, int, float, tuple)
    # -- what it decides
    pixels: bool = False  # decides pixels: an ImageJob field in PIXEL_FIELDS (key, metadata, records)
    per_image: bool = False  # may differ between the images of one GPU batch
    optional: bool = False  # left out of records and the key while unused (None or empty), so older keys stay
    in_key: bool = True  # False for a path: the key takes the file's hash (another row), not where it was
    in_summary: bool = True  # in the short per-image JSON summary
    derived: bool = False  # made by planning (a file's hash), never given
    range: tuple[float, float] | None = None  # the closed range of a row resolved as given (a rule checks its own)
    resolve: str | None = None  # the planning rule that resolves it; None: as given, default when unset
    # -- how it comes back and goes out
    reproduce: str | None = None  # the reproduce rule that writes it back as an option (`sana info --command`)
    http: bool = False  # an extra field of an OpenAI images request (never one that names a file)
    names_file: bool = False  # names a file on the client's machine, which only an in-process run may open

    @property
    def option(self) -> str | None:
        """The long option, e.g. --guidance."""
        return next((flag for flag in self.flags if flag.startswith("--")), None)

    @property
    def in_batch(self) -> bool:
        return bool(self.flags) and self.batch_help != ""

    @property
    def in_defaults(self) -> bool:
        return self.in_batch if self.batch_default is None else self.batch_default


# In record order: the order of an image's fields in its metadata, manifest line and JSON summary.
FIELDS: tuple[Field, ...] = (
    Field("prompt", "str", REQUIRED, column="prompt", pixels=True, per_image=True, resolve="prompt"),
    Field("negative_prompt", "str", "", flags=("--negative-prompt",), metavar="TEXT",
          help="What to steer away from.", batch_help="Default negative prompt.",
          column="negative_prompt", pixels=True, per_image=True, in_summary=False, resolve="negative_prompt",
          reproduce="text", http=True),
    Field("seed", "int | None", flags=("--seed",), metavar="N",
          help="Seed of the first image (drawn at random if omitted); +1 per image.", batch_help="",
          column="seed", pixels=True, per_image=True, resolve="seed", reproduce="int", http=True),
    Field("size", "int | None", flags=("-s", "--size"), metavar="N", help="Square size in pixels (multiple of 32).",
          batch_help="Default square size for rows without one.", request=False, batch_default=False,
          column="size"),
    Field("width", "int | None", flags=("-W", "--width"), metavar="N", help="Width in pixels (multiple of 32).",
          batch_help="Default width.", column="width", pixels=True, resolve="size", reproduce="int"),
    Field("height", "int | None", flags=("-H", "--height"), metavar="N", help="Height in pixels (multiple of 32).",
          batch_help="Default height.", column="height", pixels=True, resolve="size", reproduce="int"),
    Field("steps", "int | None", flags=("--steps",), metavar="N",
          help="Denoising steps. Default: the model's (20; Sprint 2).",
          batch_help="Default steps (the model's if omitted).", column="steps", pixels=True, resolve="steps",
          reproduce="int", http=True),
    Field("guidance", "float | None", flags=("-g", "--guidance"), metavar="X",
          help="Guidance scale. Default: the model's (4.5; 4K 5.0).", batch_help="Default guidance scale.",
          column="guidance", pixels=True, resolve="guidance", reproduce="number", http=True),
    Field("pag_scale", "float", 0.0, flags=("--pag-scale",), metavar="X",
          help="Perturbed-attention guidance scale; > 0 uses SanaPAGPipeline (model card: 2.0).",
          batch_help="Default PAG scale (> 0 uses SanaPAGPipeline).", column="pag_scale", pixels=True,
          resolve="pag", reproduce="pag_scale", http=True),
    Field("pag_layers", "str | None", flags=("--pag-layers",), metavar="LAYERS",
          help="Comma-separated layer patterns for PAG, each matching a transformer_blocks.N of the model. "
               "Default: the model's (transformer_blocks.8; the tiny models transformer_blocks.1).",
          batch_help="Layer patterns for PAG, as for generate. Default: the model's (transformer_blocks.8; the "
                     "tiny models transformer_blocks.1).",
          pixels=True, in_summary=False, resolve="pag", reproduce="pag_layers", http=True),
    Field("name", "str | None", request=False, batch_default=False, column="name"),
    Field("num_images", "int", 1, flags=("-n", "--num-images"), metavar="N", help="Images to make.", batch_help="",
          show_default=True, column="n"),
    Field("loras", "tuple", (), flags=("--lora",), metavar="PATH_OR_HUB_ID[:SCALE]",
          help="A LoRA (.safetensors file, a directory holding one, or hub id org/name[@REV]) fused into the "
               "transformer, scale -4..4 (default 1). Repeat for several.",
          group="input", column="lora", pixels=True, optional=True, resolve="inputs", reproduce="loras",
          names_file=True),
    Field("controlnet", "str | None", flags=("--controlnet",), metavar="NAME|ID|DIR",
          help="A SanaControlNetModel (tiny-controlnet, hub id or directory); needs --control-image.",
          group="input", pixels=True, optional=True, resolve="inputs", reproduce="path", names_file=True),
    Field("controlnet_sha256", "str | None", request=False, pixels=True, optional=True, derived=True),
    Field("control_image", "str | None", flags=("--control-image",), metavar="IMAGE",
          help="The ControlNet's control image (PNG, JPEG or WebP).", group="input", column="control_image",
          pixels=True, optional=True, in_key=False, resolve="inputs", reproduce="path", names_file=True),
    Field("control_image_sha256", "str | None", request=False, pixels=True, optional=True, derived=True),
    Field("control_scale", "float | None", flags=("--control-scale",), metavar="X",
          help="ControlNet conditioning scale, 0-2 (default 1).", group="input", column="control_scale",
          pixels=True, optional=True, resolve="inputs", reproduce="optional_number", http=True),
    Field("image", "str | None", flags=("--image",), metavar="IMAGE",
          help="Start from this image (image-to-image, every model). Resized to cover the size and centre-cropped.",
          group="input", column="image", pixels=True, optional=True, in_key=False, resolve="inputs",
          reproduce="path", names_file=True),
    Field("image_sha256", "str | None", request=False, pixels=True, optional=True, derived=True),
    Field("strength", "float | None", flags=("--strength",), metavar="X",
          help="How far image-to-image moves from --image, 0-1 (default 0.6): it runs the last "
               "steps - int(steps - steps * strength) steps.", group="input", column="strength",
          pixels=True, optional=True, resolve="inputs", reproduce="optional_number", http=True),
    Field("mask", "str | None", flags=("--mask",), metavar="MASK",
          help="Inpaint: repaint where this mask is white (grey 128 or more; transparent counts as black), keep "
               "the rest of --image. The image's size; SanaPipeline models.",
          group="input", column="mask", pixels=True, optional=True, in_key=False, resolve="inputs",
          reproduce="path", names_file=True),
    Field("mask_sha256", "str | None", request=False, pixels=True, optional=True, derived=True),
    # SANA-Video (`sana video`, and batch rows with a SANA-Video model): unused (None) for an image, so image keys
    # stay as they were.
    Field("frames", "int | None", flags=("--frames",), metavar="N",
          help="Frames to make, 4k+1 (the Wan VAE packs 4 frames into each latent after the first). "
               "Default: the model's (81; tiny-video 9).",
          group="video", request=False, batch_default=False, column="frames", pixels=True, optional=True,
          resolve="video", reproduce="optional_int"),
    Field("fps", "int | None", flags=("--fps",), metavar="N",
          help="Frames per second of the file. Default: the model's (16).", group="video", request=False,
          batch_default=False, column="fps", pixels=True, optional=True, resolve="video", reproduce="optional_int"),
    Field("motion_score", "int | None", flags=("--motion-score",), metavar="N",
          help="How much motion, 0-100: appended to the prompt as ' motion score: N.', as the model card does. "
               "Default: 30 (the card's).",
          group="video", request=False, batch_default=False, column="motion_score", pixels=True, optional=True,
          resolve="video", reproduce="optional_int"),
)

BY_NAME = {row.name: row for row in FIELDS}

# Orders that predate the table, kept so that `--help`, the batch columns' list in messages and
# `sana info --command` read as before. A row not named here comes after those named, in table order.
HELP_ORDER = ("size", "width", "height", "steps", "guidance", "negative_prompt", "seed", "num_images", "pag_scale",
              "pag_layers", "loras", "controlnet", "control_image", "control_scale", "image", "strength")
COLUMN_ORDER = ("prompt", "negative_prompt", "seed", "size", "width", "height", "steps", "guidance", "pag_scale",
                "name", "num_images", "loras", "control_image", "control_scale", "image", "strength")


def ordered(rows, order: tuple[str, ...]) -> list[Field]:
    """rows in `order`, then the rows it does not name in table order."""
    rows = list(rows)
    rank = {name: number for number, name in enumerate(order)}
    return sorted(rows, key=lambda row: rank.get(row.name, len(order) + rows.index(row)))


# What the rows decide, under the names the rest of the code uses.
PIXEL_FIELDS = tuple(row.name for row in FIELDS if row.pixels)
OPTIONAL_FIELDS = tuple(row.name for row in FIELDS if row.pixels and row.optional)
KEY_SKIPS = tuple(row.name for row in FIELDS if row.pixels and not row.in_key)
PER_IMAGE_FIELDS = tuple(row.name for row in FIELDS if row.per_image)
SUMMARY_OMITS = tuple(row.name for row in FIELDS if row.pixels and not row.in_summary)
# What planning takes to resolve one image (everything it is given; the derived fields are its outputs).
PLANNING_INPUTS = tuple(row.name for row in FIELDS if row.pixels and not row.derived and row.name != "seed")
REQUEST_FIELDS = tuple(row for row in FIELDS if row.request)
DEFAULTS_FIELDS = tuple(row for row in FIELDS if row.in_defaults)
HTTP_FIELDS = tuple(row.name for row in FIELDS if row.http)
FILE_FIELDS = tuple(row.name for row in FIELDS if row.names_file)
# Batch-file columns: name -> the field it sets, in the order messages list them.
COLUMNS = {row.column: row for row in ordered((row for row in FIELDS if row.column), COLUMN_ORDER)}


def column_type(row: Field) -> type:
    """What a batch-file cell must hold for this row."""
    if row.column_type is not None:
        return row.column_type
    base = row.type.split(" | ")[0]
    return {"str": str, "int": int, "float": float, "tuple": tuple}[base]


def options(command: str, group: str) -> list[Field]:
    """The rows that are options of `command` (generate, batch or video) in `group`, in help order."""
    rows = [row for row in FIELDS if row.flags and row.group == group
            and (command in ("generate", "video") or row.in_batch)]
    return ordered(rows, HELP_ORDER)


def check_range(row: Field, value, where: str) -> None:
    """A value outside the row's range is a usage error naming where it came from."""
    from ..errors import UsageError

    low, high = row.range
    if not low <= value <= high:
        raise UsageError(f"{where} must be {low:g}..{high:g}, got {value:g}")
