"""Video latents through the same loop: (B, C, F, h, w) latents, the frames of a clip denoised
together by a motion UNet (diffusers' ``UNetMotionModel``, AnimateDiff).

``sampling.loop.sample`` is shape-agnostic (the schedulers work element-wise), so a video runs
through it unchanged with ``motion_denoise`` as its ``denoise_fn``: the same samplers, CFG,
prompt-editing schedule, step callbacks and interrupt as a picture.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from danqing.decode import cheap_preview
from danqing.errors import InvalidRequest
from danqing.sampling.loop import Conditioning, StepInfo, denoise
from danqing.sampling.noise import slerp


def video_noise(
    shape: tuple[int, int, int, int],
    generators: list[torch.Generator],
    *,
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
    shared: bool = False,
) -> torch.Tensor:
    """(B, C, F, h, w) standard normal noise, clip i from ``generators[i]``, frame after frame.

    Frame f of a clip is the (f+1)-th (C, h, w) draw of its generator, so its first frame is the
    noise of a single picture of that seed and a longer clip starts with a shorter one's frames.

    Args:
        shape: (C, F, h, w) of one clip.
        generators: one per clip; they keep advancing afterwards (ancestral step noise).
        subseeds, subseed_strength: A1111's variation seed, slerped in frame by frame.
        shared: every frame gets frame 0's noise (one draw per clip; no variation seed).
    """
    c, frames, h, w = shape
    out = []
    for i, gen in enumerate(generators):
        if shared:  # every frame starts from frame 0's noise
            clip = torch.randn((1, c, 1, h, w), generator=gen, device=gen.device).expand(-1, -1, frames, -1, -1)
            out.append(clip.contiguous())
            continue
        clip = torch.cat([torch.randn((1, c, 1, h, w), generator=gen, device=gen.device) for _ in range(frames)], dim=2)
        if subseeds is not None and subseed_strength > 0:
            sub = torch.Generator(gen.device).manual_seed(int(subseeds[i]))
            other = torch.cat([torch.randn((1, c, 1, h, w), generator=sub, device=gen.device) for _ in range(frames)],
                              dim=2)
            clip = torch.cat([slerp(subseed_strength, clip[:, :, f], other[:, :, f]).unsqueeze(2)
                              for f in range(frames)], dim=2)
        out.append(clip)
    return torch.cat(out)


def frame_context(context: torch.Tensor, frames: int, window: list[int] | None = None) -> torch.Tensor:
    """The text context of every frame, (2B * F, T, D), clip after clip and frame after frame as
    a motion UNet orders its batch: a clip's context (2B, T, D) repeated for each frame
    (diffusers' ``AnimateDiffPipeline`` repeats it the same way), or a travel prompt's per-frame
    context (2B, F_clip, T, D; ``conditioning.travel``) taken at the ``window``'s frames (all of
    the clip's when None)."""
    if context.dim() == 3:
        return context.repeat_interleave(frames, dim=0)
    if window is not None:
        context = context[:, window]
    if context.shape[1] != frames:
        raise ValueError(f"a per-frame context of {context.shape[1]} frames for {frames} frames")
    return context.reshape(-1, *context.shape[2:])


def motion_denoise(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float,
                   use_cfg: bool, window: list[int] | None = None) -> torch.Tensor:
    """``loop.denoise`` for a motion UNet: x is (B, C, F, h, w), the text context given to every
    frame (``frame_context``; ``window``: the clip's frames that ``x`` holds, a sliding context
    window's). Returns (B, C, F, h, w)."""
    context = frame_context(cond.context, x.shape[2], window)
    return denoise(unet, x, t, Conditioning(context, cond.added), cfg_scale, use_cfg)


def text_video_denoise(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float,
                       use_cfg: bool) -> torch.Tensor:
    """``loop.denoise`` for a text-to-video UNet (ModelScope / zeroscope's
    ``UNet3DConditionModel``): x is (B, C, F, h, w) and the text context (2B, T, D) goes in once
    per clip, as the model repeats it over the frames itself (diffusers'
    ``TextToVideoSDPipeline``). Returns (B, C, F, h, w)."""
    return denoise(unet, x, t, Conditioning(cond.context, None), cfg_scale, use_cfg)


def frames_denoise(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float,
                   use_cfg: bool) -> torch.Tensor:
    """``loop.denoise`` for a picture UNet over a clip: (B, C, F, h, w) -> every frame denoised
    as a picture of a (B * F) batch (per-frame img2img, no motion module), clip after clip,
    frame after frame as a motion UNet orders them; the text context repeated for every frame."""
    b, c, frames, h, w = x.shape
    context = frame_context(cond.context, frames)
    eps = denoise(unet, frames_first(x), t, Conditioning(context, cond.added), cfg_scale, use_cfg)
    return eps.reshape(b, frames, *eps.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)


class CrossFrameAttention:
    """A self-attention processor whose keys and values are those of the clip's first frame and
    of the frame before (Text2Video-Zero's cross-frame attention, Khachatryan et al. 2023, with
    Tune-A-Video's / Rerender-A-Video's previous frame added): each frame draws its features
    from its neighbours, so restyled frames agree. Frame 0 attends to itself (its two key sets
    are its own: the softmax over duplicated keys is plain self-attention).

    The batch is (N * frames, S, D), frame f of group n at n * frames + f (a motion UNet's and
    ``frames_denoise``'s order, CFG halves included). Made per request with its frame count.
    diffusers' ``CrossFrameAttnProcessor`` (text-to-video-zero) takes the first frame only.
    """

    def __init__(self, frames: int):
        self.frames = frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        n, s, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        frames = self.frames
        first = [0] * frames
        previous = [max(f - 1, 0) for f in range(frames)]

        def neighbours(z: torch.Tensor) -> torch.Tensor:  # (N*F, S, D) -> (N*F, 2S, D): first | previous
            z = z.reshape(n // frames, frames, s, -1)
            return torch.cat([z[:, first], z[:, previous]], dim=2).reshape(n, 2 * s, -1)

        key = attn.head_to_batch_dim(neighbours(attn.to_k(hidden_states)))
        value = attn.head_to_batch_dim(neighbours(attn.to_v(hidden_states)))
        probs = attn.get_attention_scores(query, key, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def spatial_self_attentions(unet) -> list[str]:
    """The processor names of a (motion) UNet's per-frame self-attentions (``attn1`` of its
    spatial transformer blocks; a motion module's temporal attentions excluded)."""
    return [k for k in unet.attn_processors if k.endswith("attn1.processor") and "motion_modules" not in k]


@contextmanager
def cross_frame_attention(unet, frames: int):
    """``unet``'s spatial self-attentions made ``CrossFrameAttention`` of ``frames`` frames for
    the ``with`` block, its own processors put back afterwards (the checkpoint's UNet is shared)."""
    saved = dict(unet.attn_processors)
    processor = CrossFrameAttention(frames)
    unet.set_attn_processor({k: processor if k in spatial_self_attentions(unet) else v for k, v in saved.items()})
    try:
        yield unet
    finally:
        unet.set_attn_processor(saved)


@dataclass
class VideoStepInfo(StepInfo):
    """``StepInfo`` of a video pass: ``latents`` is (B, C, F, h, w); ``preview`` shows the
    first clip's first frame."""

    def preview(self):
        return cheap_preview(self.latents[:, :, 0], self.family)


def video_steps(on_step):
    """``on_step`` handed ``VideoStepInfo`` instead of the loop's ``StepInfo`` (None stays None)."""
    if on_step is None:
        return None

    def wrapped(info: StepInfo):
        return on_step(VideoStepInfo(info.step, info.total, info.latents, info.family, info.batch_index,
                                     info.batch_count))

    return wrapped


def frames_first(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> (B * F, C, h, w): clip after clip, frame after frame, for the VAE."""
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def context_windows(frames: int, length: int, overlap: int) -> list[list[int]]:
    """Overlapping windows of ``length`` frames covering ``frames`` (AnimateDiff-Evolved's
    uniform context): starts every ``length - overlap`` frames, the last window aligned with the
    clip's end; one window when the clip fits.

    Args:
        frames: frames of the clip; length: frames the motion module takes at once (> overlap).
        overlap: frames shared by neighbouring windows (0 <= overlap < length).
    """
    if frames <= length:
        return [list(range(frames))]
    stride = length - overlap
    starts = list(range(0, frames - length + 1, stride))
    if starts[-1] + length < frames:
        starts.append(frames - length)
    return [list(range(s, s + length)) for s in starts]


@dataclass
class VideoControlDenoise:
    """``motion_denoise`` with ControlNet residuals for every frame (AnimateDiff + ControlNet,
    diffusers' ``AnimateDiffControlNetPipeline``): the ControlNets run on the clip's frames as a
    batch of pictures (B * F, clip after clip), each frame with its own map when a unit's image
    holds one per frame (``conditioning.control.per_sample``), and their residuals go into the
    motion UNet. Made per request (its ``ControlDenoise`` counts model evaluations).

    Attributes:
        control: the request's ``conditioning.control.ControlDenoise`` (its units' images are
            (1 or F, 3, H, W)).
    """

    control: object
    per_frame: bool = False  # a picture UNet, each frame on its own (``frames_denoise`` with ControlNets)

    def __post_init__(self):
        if not self.per_frame and any(u.kind == "t2i" for u in self.control.units):
            raise InvalidRequest("controlnet", "T2I-Adapters work on video in per-frame mode only (motion false): "
                                               "a motion UNet takes no adapter features; use a ControlNet")

    def begin(self, n_evals: int) -> None:
        self.control.begin(n_evals)

    def evaluated(self) -> None:
        """One model evaluation of the pass is done (guidance start and end count these)."""
        self.control.i += 1

    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float,
                 use_cfg: bool, frames: list[int] | None = None) -> torch.Tensor:
        """``frames``: the clip's frames that ``x`` holds (a context window's); None = all of
        them, and the evaluation is counted (a ``ContextDenoise`` counts once per step)."""
        n = x.shape[2]
        flat = frames_first(x)
        added = {k: v.repeat_interleave(n, dim=0) for k, v in cond.added.items()} if cond.added else None
        per_frame = Conditioning(frame_context(cond.context, n, frames), added)
        if self.per_frame:  # a picture UNet: the ControlNets' own denoise over the frames as pictures
            eps = self.control(unet, flat, t, per_frame, cfg_scale, use_cfg)
            return eps.reshape(x.shape[0], n, *eps.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        down, mid, _ = self.control.residuals(flat, torch.cat([flat, flat]) if use_cfg else flat, t, per_frame,
                                              use_cfg, frames=frames)
        if frames is None:
            self.evaluated()
        out = unet(torch.cat([x, x]) if use_cfg else x, t, encoder_hidden_states=per_frame.context,
                   added_cond_kwargs=cond.added, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, return_dict=False)[0]
        if not use_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + cfg_scale * (text - uncond)


@dataclass(frozen=True)
class ContextDenoise:
    """``motion_denoise`` over sliding context windows, for clips longer than the motion
    module's frame window: each window is denoised on its own and every frame's prediction is
    the mean over the windows that hold it (flat weights). Made per request; holds no state.

    Attributes:
        length: frames per window (the module's ``motion_max_seq_length`` or less).
        overlap: frames shared by neighbouring windows.
    """

    length: int
    overlap: int
    control: VideoControlDenoise | None = None  # ControlNets: each window with its frames' maps

    def begin(self, n_evals: int) -> None:
        if self.control is not None:
            self.control.begin(n_evals)

    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float,
                 use_cfg: bool) -> torch.Tensor:
        frames = x.shape[2]
        out = torch.zeros_like(x)
        count = torch.zeros(frames, dtype=x.dtype, device=x.device)
        for window in context_windows(frames, self.length, self.overlap):
            idx = torch.tensor(window, device=x.device)
            if self.control is None:
                out[:, :, idx] += motion_denoise(unet, x[:, :, idx], t, cond, cfg_scale, use_cfg, window)
            else:
                out[:, :, idx] += self.control(unet, x[:, :, idx], t, cond, cfg_scale, use_cfg, frames=window)
            count[idx] += 1
        if self.control is not None:
            self.control.evaluated()  # one model evaluation of the pass, however many windows
        return out / count.view(1, 1, frames, 1, 1)  # (B, C, F, h, w)


def svd_guidance(frames: int, min_scale: float, max_scale: float) -> torch.Tensor:
    """Stable Video Diffusion's frame-wise CFG ramp: the guidance scale grows linearly from
    ``min_scale`` on the first frame (the conditioning picture itself) to ``max_scale`` on the
    last; (1, F, 1, 1, 1), for latents laid out (B, F, C, h, w)."""
    return torch.linspace(min_scale, max_scale, frames).view(1, frames, 1, 1, 1)


def svd_time_ids(fps: int, motion_bucket_id: int, noise_aug_strength: float, batch: int, use_cfg: bool) -> torch.Tensor:
    """SVD's added time ids (fps - 1, motion bucket, noise augmentation), (2B or B, 3): the model
    was trained on fps - 1 (diffusers' pipeline subtracts it the same way)."""
    ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=torch.float32).repeat(batch, 1)
    return torch.cat([ids, ids]) if use_cfg else ids


@dataclass(frozen=True)
class SVDDenoise:
    """``loop.denoise`` for Stable Video Diffusion's ``UNetSpatioTemporalConditionModel``
    (Blattmann et al. 2023): latents (B, F, C, h, w) with the conditioning picture's latents
    concatenated on channels, the image embedding as context, the added time ids, and CFG with a
    guidance scale per frame (``svd_guidance``); the unconditional branch has zero image
    latents and a zero embedding. Made per request.

    Attributes:
        image_latents: (2B or B, F, C, h, w), the picture's VAE latents (unscaled mode, as SVD).
        time_ids: ``svd_time_ids``; guidance: ``svd_guidance``.
    """

    image_latents: torch.Tensor
    time_ids: torch.Tensor
    guidance: torch.Tensor

    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float,
                 use_cfg: bool) -> torch.Tensor:
        inp = torch.cat([x, x]) if use_cfg else x
        inp = torch.cat([inp, self.image_latents.to(inp.dtype)], dim=2)
        eps = unet(inp, t, encoder_hidden_states=cond.context, added_time_ids=self.time_ids.to(inp.dtype),
                   return_dict=False)[0]
        if not use_cfg:
            return eps
        uncond, text = eps.chunk(2)
        return uncond + self.guidance.to(eps) * (text - uncond)
