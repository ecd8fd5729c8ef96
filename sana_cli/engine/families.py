"""One adapter per pipeline family: how to encode a GPU batch's prompts and how to build the
pipeline call, side by side, one plain function per family (diffusers' explicit style). The runner
keeps scheduling, retries and writing; a new family (ControlNet, image-to-image) adds its functions
here and one entry in ADAPTERS. A call's arguments may depend on the pipeline that makes it (a Sana
model's start image is encoded by its VAE), so build_call gets that pipeline, as prepared for the call.

Embeddings are a tuple (embeds, mask, negative_embeds, negative_mask), the negative pair None when a
family has no classifier-free guidance, so the runner can split a batch's rows without knowing it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..models.modelref import ModelRef
from ..models.presets import SANA_SPRINT
from ..planning.plan import ImageJob


def _chi(pipe) -> list[str] | None:
    """The pipeline's default complex human instruction (on by default, as in the model cards)."""
    return inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default


def _common_encode(pipe, max_sequence_length: int) -> dict:
    return dict(num_images_per_prompt=1, device=pipe._execution_device, clean_caption=False,
                max_sequence_length=max_sequence_length, complex_human_instruction=_chi(pipe))


def _common_call(jobs: list[ImageJob], embeddings: tuple, generators: list, on_step: Callable) -> dict:
    first = jobs[0]
    embeds, mask = embeddings[:2]
    return dict(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, height=first.height,
                width=first.width, num_inference_steps=first.steps, guidance_scale=first.guidance,
                generator=generators, output_type="latent", use_resolution_binning=False,
                callback_on_step_end=on_step, return_dict=False)


# ---- Sana (SanaPipeline, and SanaPAGPipeline built from its components) -----------------------------

def encode_sana(pipe, jobs: list[ImageJob], *, max_sequence_length: int) -> tuple:
    """Prompt and negative-prompt embeddings, exactly as SanaPipeline computes them itself."""
    return tuple(pipe.encode_prompt([job.prompt for job in jobs], do_classifier_free_guidance=jobs[0].guidance > 1.0,
                                    negative_prompt=[job.negative_prompt for job in jobs],
                                    **_common_encode(pipe, max_sequence_length)))


def _with_negative(jobs: list[ImageJob], embeddings: tuple, generators: list, on_step: Callable) -> dict:
    """The keyword arguments the Sana image and video pipelines share: prompts, negative prompt, PAG scale."""
    negative_embeds, negative_mask = embeddings[2:]
    kwargs = _common_call(jobs, embeddings, generators, on_step)
    kwargs.update(negative_prompt=None, negative_prompt_embeds=negative_embeds,
                  negative_prompt_attention_mask=negative_mask)
    if jobs[0].pag_scale > 0:
        kwargs["pag_scale"] = jobs[0].pag_scale
    return kwargs


def call_sana(jobs: list[ImageJob], embeddings: tuple, *, generators: list, on_step: Callable, pipe) -> dict:
    """Keyword arguments for one SanaPipeline / SanaPAGPipeline call that returns latents. With a start image,
    the call starts from its noised latents (and blends a mask's known region back after each step): the
    schedule itself was cut to the kept steps by LoadedModel.prepare_call (see engine.img2img)."""
    kwargs = _with_negative(jobs, embeddings, generators, on_step)
    if jobs[0].image:
        from . import img2img

        begin = img2img.start(pipe, jobs, generators)
        kwargs["latents"] = begin.latents
        if begin.mask is not None:
            kwargs["callback_on_step_end"] = begin.blending(on_step)
    return kwargs


def metadata_sana(job: ImageJob) -> dict:
    return {}


# ---- Sprint (SanaSprintPipeline: no negative prompt, no CFG, 1-4 steps) -----------------------------

def encode_sprint(pipe, jobs: list[ImageJob], *, max_sequence_length: int) -> tuple:
    """Prompt embeddings, exactly as SanaSprintPipeline computes them itself."""
    embeds, mask = pipe.encode_prompt([job.prompt for job in jobs], **_common_encode(pipe, max_sequence_length))
    return embeds, mask, None, None


def call_sprint(jobs: list[ImageJob], embeddings: tuple, *, generators: list, on_step: Callable, pipe=None) -> dict:
    """Keyword arguments for one SanaSprintPipeline call that returns latents."""
    kwargs = _common_call(jobs, embeddings, generators, on_step)
    if jobs[0].steps != 2:
        kwargs["intermediate_timesteps"] = None  # diffusers raises for steps != 2 otherwise
    return kwargs


def metadata_sprint(job: ImageJob) -> dict:
    """The intermediate timestep the pipeline used (its default for 2 steps, none otherwise)."""
    return {"intermediate_timesteps": 1.3 if job.steps == 2 else None}


# ---- ControlNet (SanaControlNetPipeline built from the loaded SanaPipeline's components) -----------

def call_controlnet(jobs: list[ImageJob], embeddings: tuple, *, generators: list, on_step: Callable, pipe) -> dict:
    """A SanaPipeline call (from a start image too, when given) plus the control image (prepared by the
    input-image rule) and its scale."""
    from ..inputs.images import prepare

    first = jobs[0]
    kwargs = call_sana(jobs, embeddings, generators=generators, on_step=on_step, pipe=pipe)
    kwargs.update(control_image=prepare(first.control_image, first.width, first.height, first.control_image_sha256),
                  controlnet_conditioning_scale=first.control_scale)
    return kwargs


# ---- image-to-image (SanaSprintImg2ImgPipeline built from the loaded Sprint pipeline's components) ----

def call_img2img(jobs: list[ImageJob], embeddings: tuple, *, generators: list, on_step: Callable, pipe=None) -> dict:
    """A SanaSprintPipeline call plus the start image (prepared by the input-image rule) and strength."""
    from ..inputs.images import prepare

    first = jobs[0]
    kwargs = call_sprint(jobs, embeddings, generators=generators, on_step=on_step)
    kwargs.update(image=prepare(first.image, first.width, first.height, first.image_sha256),
                  strength=first.strength)
    return kwargs


# ---- SANA-Video (SanaVideoPipeline; SanaImageToVideoPipeline from its components for a first frame) ------

def video_prompt(job: ImageJob) -> str:
    """The prompt with the motion score appended, exactly as the model card writes it."""
    return f"{job.prompt} motion score: {job.motion_score}."


def encode_video(pipe, jobs: list[ImageJob], *, max_sequence_length: int) -> tuple:
    """Prompt and negative-prompt embeddings, exactly as SanaVideoPipeline computes them itself."""
    return tuple(pipe.encode_prompt([video_prompt(job) for job in jobs],
                                    do_classifier_free_guidance=jobs[0].guidance > 1.0,
                                    negative_prompt=[job.negative_prompt for job in jobs], num_videos_per_prompt=1,
                                    device=pipe._execution_device, clean_caption=False,
                                    max_sequence_length=max_sequence_length, complex_human_instruction=_chi(pipe)))


def call_video(jobs: list[ImageJob], embeddings: tuple, *, generators: list, on_step: Callable, pipe=None) -> dict:
    """Keyword arguments for one SanaVideoPipeline / SanaImageToVideoPipeline call that returns latents."""
    from ..inputs.images import prepare

    first = jobs[0]
    kwargs = _with_negative(jobs, embeddings, generators, on_step)  # a video's image is its first frame, not a start
    kwargs["frames"] = first.frames
    if first.image:
        kwargs["image"] = prepare(first.image, first.width, first.height)
    return kwargs


def pipeline_of(job: ImageJob, loaded_pipeline: str | None) -> str | None:
    """The pipeline class that makes a job's image: SanaPAGPipeline, SanaControlNetPipeline or
    SanaSprintImg2ImgPipeline (each built from the loaded pipeline's components) when the job uses
    PAG, a ControlNet or a start image with a SANA-Sprint model; SanaImageToVideoPipeline for a video with a
    first frame; else the loaded pipeline. (A Sana model's image-to-image runs the pipeline it would run
    without the image: the image and strength say the rest.)"""
    if job.frames:
        return "SanaImageToVideoPipeline" if job.image else loaded_pipeline
    if job.controlnet:
        return "SanaControlNetPipeline"
    if job.image and loaded_pipeline == SANA_SPRINT:
        return "SanaSprintImg2ImgPipeline"
    return "SanaPAGPipeline" if job.pag_scale > 0 else loaded_pipeline


# ---- the table ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    encode: Callable[..., tuple]
    build_call: Callable[..., dict]
    metadata: Callable[[ImageJob], dict]  # family-specific fields appended to an image's metadata


SANA_ADAPTER = Adapter(encode=encode_sana, build_call=call_sana, metadata=metadata_sana)
SPRINT_ADAPTER = Adapter(encode=encode_sprint, build_call=call_sprint, metadata=metadata_sprint)
CONTROLNET_ADAPTER = Adapter(encode=encode_sana, build_call=call_controlnet, metadata=metadata_sana)
IMG2IMG_ADAPTER = Adapter(encode=encode_sprint, build_call=call_img2img, metadata=metadata_sprint)
VIDEO_ADAPTER = Adapter(encode=encode_video, build_call=call_video, metadata=metadata_sana)


def adapter_for(ref: ModelRef, job: ImageJob | None = None) -> Adapter:
    if ref.is_video:
        return VIDEO_ADAPTER
    if job is not None and job.controlnet:
        return CONTROLNET_ADAPTER
    if job is not None and job.image and ref.is_sprint:
        return IMG2IMG_ADAPTER
    return SPRINT_ADAPTER if ref.is_sprint else SANA_ADAPTER
