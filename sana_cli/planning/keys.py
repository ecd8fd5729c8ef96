"""Keys, seeds and GPU batches: the hash of everything that decides an image's pixels (job_key, and
make_job, which keys a job), the seed rules, and how jobs are grouped into GPU batches.

Pure Python (no torch).
"""

from __future__ import annotations

import hashlib
import json
import secrets

from ..models.modelref import ModelRef
from .fields import KEY_SKIPS, OPTIONAL_FIELDS
from .jobs import ImageJob, PixelOptions, as_loras, record_value


KEY_SCHEMA = 2  # bump when what goes into job_key changes, so old images are not taken for new ones


def make_job(model: ModelRef, pixels: PixelOptions, *, index: int, row: int, path: str, **params) -> ImageJob:
    """An ImageJob with its key computed from the model, the load options and its PIXEL_FIELDS."""
    params = {**params, "loras": as_loras(params.get("loras"))}
    key_params = {name: record_value(value) for name, value in params.items()
                  if name not in OPTIONAL_FIELDS or value not in (None, ())}
    return ImageJob(index=index, row=row, path=path, key=job_key(model, pixels, **key_params), pixels=pixels,
                    **params)


def draw_seed() -> int:
    return secrets.randbelow(2**32)


def job_key(model: ModelRef, pixels: PixelOptions | None = None, **params) -> str:
    """A short hash of everything that decides an image's pixels: the model, the image's own
    parameters (ImageJob.params) and the load options that change pixels (PixelOptions)."""
    params = {name: value for name, value in params.items() if name not in KEY_SKIPS}
    if params.get("loras"):
        params["loras"] = [[lora["sha256"], lora["scale"]] for lora in params["loras"]]
    data = {"key_schema": KEY_SCHEMA, "model": model.source, "revision": model.revision, **params,
            **(pixels or PixelOptions()).key_fields()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def group_jobs(jobs: list[ImageJob], batch_size: int) -> list[list[int]]:
    """Jobs with equal size / steps / guidance / PAG go together, in order of first appearance,
    then split into GPU batches of at most batch_size. Deterministic for a given job list."""
    buckets: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        buckets.setdefault(job.group_key(), []).append(i)
    return [members[start:start + batch_size] for members in buckets.values()
            for start in range(0, len(members), batch_size)]


def default_batch_size(width: int, height: int) -> int:
    """Images per GPU batch: 4 at 1024px and below, fewer above, one at 4K."""
    return max(1, min(4, (1024 * 1024 * 4) // (width * height)))


SEED_RULE = ("a row's own seed (+1 per extra image), else the first 4 bytes of sha256 of "
             "'sana-cli-seed-v1', the base seed, the row's name (or prompt), its occurrence among rows with "
             "that name (or prompt) and the image number: independent of position, batch size, shard and resume")


def derive_seed(base: int, identity: str, occurrence: int, image: int) -> int:
    """The documented batch seed rule (SEED_RULE)."""
    digest = hashlib.sha256(f"sana-cli-seed-v1\0{base}\0{identity}\0{occurrence}\0{image}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def claim_group(jobs: list, group: list[int], done, tried: set[int], claim) -> tuple[list, list[bool], bool]:
    """One GPU batch of a plan's jobs and which of them this process makes: those not done, not yet tried here
    and, with a claim function (batch directories shared by processes), not held by another process. Marks the
    ones taken as tried. Returns (the group's jobs, which to make, whether another process holds some)."""
    chosen = [jobs[i] for i in group]
    write = [i not in done and i not in tried for i in group]
    busy = False
    if claim is not None:
        write, busy = claim(chosen, write)
    tried.update(i for i, wanted in zip(group, write) if wanted)
    return chosen, write, busy

