"""Image-to-image and inpainting for the SanaPipeline models, on the pipelines' own parts.

diffusers has image-to-image only for SANA-Sprint (SanaSprintImg2ImgPipeline). The other Sana models are flow
matching models (Flow-DPM-Solver or flow Euler): their latents at sigma s are (1 - s) * x0 + s * noise. So an
image-to-image run is the regular pipeline call (SanaPipeline, SanaPAGPipeline or SanaControlNetPipeline, whose
denoising loop runs unchanged) started later on the same schedule:

1. the start image, prepared by the input-image rule, is encoded by the pipeline's DC-AE and scaled by the VAE's
   scaling_factor, as the pipeline's decode unscales it: x0;
2. the schedule for `steps` is set as text-to-image sets it, and only its last `kept_steps(steps, strength)`
   steps run (diffusers' get_timesteps, the SANA-Sprint rule): the per-call scheduler's timesteps and sigmas are
   cut to them (truncate_schedule, from LoadedModel.prepare_call);
3. the noise is the pipeline's own draw for text-to-image (prepare_latents: same shape, generators, device, float32),
   and the start is (1 - s) * x0 + s * noise, s the schedule's sigma at the first kept step. When every step is
   kept (strength 1) the start is the noise itself, as in text-to-image, so strength 1 gives its image exactly;
4. the pipeline is called with that start as `latents`.

Inpainting adds a step-end blend (the standard latent inpainting scheme): after each step,
latents = m * latents + (1 - m) * ((1 - s') * x0 + s' * noise), s' the sigma the step reached (0 after the last, so
the known region ends as x0 exactly) and m the mask at latent size: a latent pixel is repainted when any pixel of
the image block it covers is.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Callable

import torch

from ..inputs.controlnet import kept_steps


def skipped_steps(job) -> int:
    """How many of the job's steps image-to-image leaves out at the start."""
    return job.steps - kept_steps(job.steps, job.strength)


def truncate_schedule(scheduler, skip: int) -> None:
    """Make this (per-call) scheduler's schedule the tail of the one the pipeline sets: its set_timesteps sets
    the whole schedule, then drops the first `skip` steps from both its timesteps and its sigmas, so the kept
    steps are a schedule of their own. (Cutting the timesteps alone and setting a begin index, as diffusers'
    image-to-image pipelines do, leaves Flow-DPM-Solver counting the whole schedule's length: it then misses its
    first-order final step onto sigma 0 and the image is NaN.)"""
    if skip == 0:
        return
    whole = type(scheduler).set_timesteps

    def set_timesteps(self, *args, **kwargs):
        whole(self, *args, **kwargs)
        start = skip * self.order
        self.timesteps = self.timesteps[start:]
        self.sigmas = self.sigmas[start:]
        self.num_inference_steps = len(self.timesteps)

    scheduler.set_timesteps = types.MethodType(set_timesteps, scheduler)


def schedule_sigmas(scheduler, steps: int, device) -> torch.Tensor:
    """The sigmas of the whole schedule for `steps` (one more than the steps, ending at 0), from a copy."""
    probe = copy.deepcopy(scheduler)
    type(probe).set_timesteps(probe, steps, device=device)
    return probe.sigmas.to(device=device, dtype=torch.float32)


@dataclass
class Start:
    """What a Sana image-to-image call starts from, for one GPU batch (its jobs share the image and strength)."""

    latents: torch.Tensor  # the noised start, (B, C, h, w) float32
    image_latents: torch.Tensor  # x0, (B, C, h, w) float32
    noise: torch.Tensor
    mask: torch.Tensor | None  # (1, 1, h, w), 1 = repaint; None without --mask

    def blending(self, on_step: Callable) -> Callable:
        """A step-end callback that blends the known region back, then calls on_step with the blended latents."""

        def blend(pipeline, step, timestep, callback_kwargs):
            scheduler = pipeline.scheduler
            sigma = scheduler.sigmas[scheduler.step_index].to(device=self.noise.device, dtype=torch.float32)
            known = (1 - sigma) * self.image_latents + sigma * self.noise
            latents = callback_kwargs["latents"]
            latents = (self.mask * latents + (1 - self.mask) * known).to(latents.dtype)
            outputs = on_step(pipeline, step, timestep, {**callback_kwargs, "latents": latents}) or {}
            return {**outputs, "latents": latents}

        return blend


@torch.no_grad()
def encode_image(pipe, image, height: int, width: int) -> torch.Tensor:
    """x0 of a prepared PIL image: the DC-AE's latent times the VAE's scaling_factor, in float32."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(device=pipe._execution_device, dtype=vae.dtype)
    return vae.encode(pixels).latent.float() * vae.config.scaling_factor


@torch.no_grad()
def start(pipe, jobs, generators: list) -> Start:
    """The start latents of a GPU batch of image-to-image jobs (same image, strength, mask and steps)."""
    from ..inputs.images import prepare, prepare_mask

    first = jobs[0]
    device = pipe._execution_device
    x0 = encode_image(pipe, prepare(first.image, first.width, first.height, first.image_sha256), first.height,
                      first.width)
    x0 = x0.expand(len(jobs), -1, -1, -1)
    noise = pipe.prepare_latents(len(jobs), pipe.transformer.config.in_channels, first.height, first.width,
                                 torch.float32, device, generators)
    skip = skipped_steps(first)
    if skip == 0:
        latents = noise
    else:
        sigma = schedule_sigmas(pipe.scheduler, first.steps, device)[skip]
        latents = (1 - sigma) * x0 + sigma * noise
    mask = None
    if first.mask:
        mask = latent_mask(prepare_mask(first.mask, first.width, first.height, first.mask_sha256),
                           pipe.vae_scale_factor, device)
    return Start(latents=latents, image_latents=x0, noise=noise, mask=mask)


def latent_mask(mask, scale: int, device) -> torch.Tensor:
    """A binary PIL mask (255 = repaint) at latent size: a latent pixel is repainted when any pixel of its
    scale x scale block is (max pooling), so everything the mask marks is repainted."""
    import numpy as np

    pixels = torch.from_numpy((np.asarray(mask) >= 128).astype("float32"))[None, None]
    return torch.nn.functional.max_pool2d(pixels, kernel_size=scale).to(device)
