"""text-to-video: per-frame noise -> a motion UNet through our loop -> frames, batch after batch.

The same steps as txt2img (``passes/txt2img.py``): the prompt is conditioned once (A1111 syntax,
prompt editing, embeddings), each batch of clips gets its seeds' generators and a fresh
scheduler, and the loop runs with ``sampling.video.motion_denoise``. Image i of a batch is a
clip of ``request.frames`` frames.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.conditioning.travel import build_travel, parse_travel
from danqing.decode import decode_latents, to_pil, vae_scale_factor
from danqing.passes.batches import Batches, PassResult
from danqing.sampling.loop import sample
from danqing.sampling.video import frames_first, motion_denoise, video_noise, video_steps

DECODE_CHUNK = 16  # frames per VAE call (diffusers' ``decode_chunk_size``)


@torch.no_grad()
def encode_clip(vae, pixels: torch.Tensor, generator: torch.Generator, chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """(F, 3, H, W) frames in [-1, 1] -> (1, C, F, h, w) scaled latents: posterior samples drawn
    from the clip's generator, ``chunk`` frames per VAE call (diffusers'
    ``AnimateDiffVideoToVideoPipeline.encode_video``, whose draws these are)."""
    parts = []
    for i in range(0, pixels.shape[0], chunk):
        dist = vae.encode(pixels[i:i + chunk].to(device=vae.device, dtype=vae.dtype)).latent_dist
        parts.append(dist.sample(generator=generator))
    z = torch.cat(parts)  # (F, C, h, w)
    if getattr(vae.config, "shift_factor", None):
        z = z - vae.config.shift_factor
    return (z * vae.config.scaling_factor).permute(1, 0, 2, 3).unsqueeze(0)


def clip_pixels(frames: list[Image.Image]) -> torch.Tensor:
    """RGB frames (W x H each) -> (F, 3, H, W) in [-1, 1]."""
    a = torch.from_numpy(np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in frames]) / 255.0)
    return a.permute(0, 3, 1, 2) * 2 - 1


def run_video(comps, unet, request, *, device, dtype, on_step=None, context: ConditioningContext | None = None,
              denoise_fn=motion_denoise, init_frames: list[Image.Image] | None = None) -> PassResult:
    """Condition, then sample every batch of clips from per-frame noise (undecoded); with
    ``init_frames``, from the clip's latents noised to ``request.denoising_strength``
    (video-to-video, as diffusers' ``AnimateDiffVideoToVideoPipeline``: the frames' posterior
    samples drawn first from each clip's generator, then its noise).

    Args:
        comps: the checkpoint's loaded ``Components`` (text encoders, VAE, scheduler config).
        unet: the motion UNet (``models.motion.motion_unet``), on the device.
        request: a ``VideoRequest``.
        on_step: gets ``VideoStepInfo`` after every sampler step (STOP interrupts, SKIP ends a batch).
        context: the request's embeddings (``ConditioningContext``).
        denoise_fn: ``motion_denoise`` (the whole clip at once), a ``ContextDenoise`` (sliding
            context windows for clips longer than the motion module's window) or
            ``frames_denoise`` (a picture UNet, each frame on its own).
        init_frames: ``request.frames`` RGB pictures at width x height (video-to-video) or None.

    Returns:
        ``PassResult`` whose ``latents`` are (batch_size, C, F, h, w) per batch.
    """
    context = context or ConditioningContext()
    # 3. condition: (2B, T, D) per step, which motion_denoise repeats for every frame; a travel
    # prompt's (2B, F, T, D), a context per frame.
    encoder = context.text_encoder(comps, request.clip_skip)
    keyframes = parse_travel(request.prompt, request.frames)
    if keyframes is None:
        cond = build_conditioning(encoder, request, batch=request.batch_size)
    else:
        cond = build_travel(encoder, request, keyframes, batch=request.batch_size, build=build_conditioning)

    # 4. sample: frame f of clip i is the f-th draw of seed + i's generator.
    factor = vae_scale_factor(comps.vae)
    shape = (unet.config.in_channels, request.frames, request.height // factor, request.width // factor)
    batches = Batches(request, device)
    steps = video_steps(on_step)
    pixels = clip_pixels(init_frames) if init_frames is not None else None
    for batch in batches:
        init = None
        if pixels is not None:  # (B, C, F, h, w), clip i's posterior samples from generator i
            init = torch.cat([encode_clip(comps.vae, pixels, g) for g in batch.generators]).to(device=device, dtype=dtype)
        noise = video_noise(shape, batch.generators, subseeds=batch.subseeds, subseed_strength=request.subseed_strength,
                            shared=request.shared_noise)
        scheduler = batch.scheduler(comps.scheduler_config, request.sampler, request.schedule)
        sampled = sample(unet, scheduler, noise.to(device=device, dtype=dtype), cond, steps=request.steps,
                         cfg_scale=request.cfg_scale, generators=batch.generators, on_step=steps,
                         family=comps.family, batch_index=batch.index, batch_count=batch.count,
                         denoise_fn=denoise_fn, init_latents=init,
                         strength=request.denoising_strength if init is not None else 1.0)
        batches.record(batch, sampled)
    return batches.result


@torch.no_grad()
def decode_clips(vae, latents: torch.Tensor, chunk: int = DECODE_CHUNK) -> list[list[Image.Image]]:
    """(B, C, F, h, w) latents -> B clips of F RGB pictures, decoded ``chunk`` frames at a time."""
    b, _, f = latents.shape[:3]
    flat = frames_first(latents)
    pictures = [p for i in range(0, flat.shape[0], chunk) for p in to_pil(decode_latents(vae, flat[i:i + chunk]))]
    return [pictures[i * f:(i + 1) * f] for i in range(b)]


@torch.no_grad()
def run_svd(parts, image: Image.Image, scheduler, *, frames: int, fps: int = 7, motion_bucket_id: int = 127,
            noise_aug_strength: float = 0.02, steps: int = 25, min_guidance: float = 1.0, max_guidance: float = 3.0,
            seed: int = 0, on_step=None):
    """Stable Video Diffusion image-to-video through our loop (undecoded), as diffusers'
    ``StableVideoDiffusionPipeline``: the picture's CLIP image embedding as context, its VAE
    latents (after noise augmentation drawn from the seed's generator) beside every frame, the
    added time ids, the frame-wise CFG ramp; then the frames' noise from the same generator.

    Args:
        parts: an object with ``unet`` (``UNetSpatioTemporalConditionModel``), ``vae``
            (``AutoencoderKLTemporalDecoder``), ``image_encoder`` (``CLIPVisionModelWithProjection``)
            and ``feature_extractor`` (``CLIPImageProcessor``), on one device.
        image: the conditioning picture, RGB at the clip's width x height.
        scheduler: a fresh scheduler of the model's config (EulerDiscrete, v-prediction).

    Returns:
        ``SampleResult`` whose latents are (1, F, C, h, w).
    """
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    from danqing.sampling.loop import Conditioning, ConditioningSchedule
    from danqing.sampling.video import SVDDenoise, svd_guidance, svd_time_ids

    unet, vae = parts.unet, parts.vae
    device, dtype = unet.device, unet.dtype
    use_cfg = max_guidance > 1.0
    pixels = clip_pixels([image]).to(device)  # (1, 3, H, W) in [-1, 1]
    # the CLIP image embedding, (1, 1, D): antialiased to the encoder's size (224), CLIP-normalised
    side = parts.image_encoder.config.image_size
    small = (_resize_with_antialiasing(pixels, (side, side)) + 1.0) / 2.0
    clip_in = parts.feature_extractor(images=small, do_normalize=True, do_center_crop=False, do_resize=False,
                                      do_rescale=False, return_tensors="pt").pixel_values
    emb = parts.image_encoder(clip_in.to(device=device, dtype=dtype)).image_embeds.unsqueeze(1)
    context = torch.cat([torch.zeros_like(emb), emb]) if use_cfg else emb
    gen = torch.Generator(device).manual_seed(seed)
    aug = torch.randn(pixels.shape, generator=gen, device=device, dtype=pixels.dtype)
    lat = vae.encode((pixels + noise_aug_strength * aug).to(vae.dtype)).latent_dist.mode()  # (1, C, h, w)
    lat = torch.cat([torch.zeros_like(lat), lat]) if use_cfg else lat
    denoise_fn = SVDDenoise(lat.unsqueeze(1).repeat(1, frames, 1, 1, 1),
                            svd_time_ids(fps, motion_bucket_id, noise_aug_strength, 1, use_cfg).to(device),
                            svd_guidance(frames, min_guidance, max_guidance).to(device))
    h, w = lat.shape[-2:]
    noise = torch.randn((1, frames, unet.config.out_channels, h, w), generator=gen, device=device, dtype=dtype)
    return sample(unet, scheduler, noise, ConditioningSchedule([steps], [Conditioning(context)]), steps=steps,
                  cfg_scale=max_guidance, generators=[gen], on_step=on_step, denoise_fn=denoise_fn)


@torch.no_grad()
def decode_svd(vae, latents: torch.Tensor, chunk: int = 14) -> list[Image.Image]:
    """One SVD clip's latents (1, F, C, h, w) as RGB pictures, decoded ``chunk`` frames at a time
    by its temporal VAE, as diffusers' ``StableVideoDiffusionPipeline.decode_latents``."""
    z = latents.flatten(0, 1).to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    frames = torch.cat([vae.decode(z[i:i + chunk], num_frames=z[i:i + chunk].shape[0]).sample
                        for i in range(0, z.shape[0], chunk)])
    return to_pil((frames.float() / 2 + 0.5).clamp(0, 1).cpu())

