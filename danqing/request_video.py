"""``VideoRequest``: one clip's request (text-to-video with a motion module or a text-to-video
model, video-to-video, image-to-video with Stable Video Diffusion), a ``GenerationRequest`` with
the clip's fields and the checks of what each kind of video job takes."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from danqing.errors import InvalidRequest
from danqing.request import GenerationRequest, in_range

# what a video request cannot do yet (each a field of GenerationRequest and its unset value)
VIDEO_UNSUPPORTED = {"mask": None, "enable_hr": False, "refiner_checkpoint": None,
                     "p2p_source": None, "ip_adapter_image": (), "regions": None,
                     "restore_faces": False, "deepcache_interval": 0, "tome_ratio": 0.0}


# image-to-video's own fields and their unset values; what image-to-video does not take
SVD_ONLY = {"motion_bucket_id": 127, "noise_aug_strength": 0.02, "min_cfg_scale": 1.0}
NOT_WITH_SVD: dict[str, tuple[Any, str]] = {
    "prompt": (lambda r: bool(r.prompt.strip() or r.negative_prompt.strip()), "prompt: the picture alone conditions "
                                                                              "it (leave prompt and negative empty)"),
    "init_video": (lambda r: r.init_video is not None, "input clip (init_video: video-to-video is another job)"),
    "motion_module": (lambda r: r.motion_module is not None, "motion module (the model moves its frames itself)"),
    "motion": (lambda r: not r.motion, "per-frame mode"),
    "cross_frame_attention": (lambda r: r.cross_frame_attention, "cross-frame attention"),
    "shared_noise": (lambda r: r.shared_noise, "shared noise"),
    "batch_size": (lambda r: r.batch_size != 1 or r.batch_count != 1, "batch: one clip per picture (batch_size and "
                                                                      "batch_count 1)"),
    "sampler": (lambda r: r.sampler != "Euler", "sampler but Euler (the model's own, with its sigmas): use Euler"),
    "subseed_strength": (lambda r: r.subseed_strength > 0, "variation seed"),
    "controlnet": (lambda r: bool(r.controlnet), "ControlNet (the picture conditions every frame)"),
}


class VideoRequest(GenerationRequest):
    """One text-to-video job (AnimateDiff: a motion module on an SD1.5 checkpoint): the
    ``GenerationRequest`` fields for each frame, and the clip's.

    Args:
        frames: frames of the clip, 1-128 (longer than the motion module's frame window: in
            overlapping context windows).
        fps: frames per second of the files written, 1-60.
        motion_module: a motion module's name in ``models/motion/`` (never a path); None = the
            only one installed.
        context_overlap: frames shared by neighbouring context windows when the clip is longer
            than the motion module's window (sliding context, ``sampling.video.ContextDenoise``).
        init_video: video-to-video: the clip to restyle (a path for the library and the CLI; a
            stored upload's name on the server), its first ``frames`` frames img2img'd at
            ``denoising_strength`` (``video.studio.video2video_fields`` fills frames, fps and
            size from the clip).
        motion: denoise the frames together through the motion module (AnimateDiff); False: as
            separate pictures with the checkpoint's UNet (per-frame img2img, no motion module).
        cross_frame_attention: every frame's self-attention also attends to the first and the
            previous frame (their keys and values; Text2Video-Zero, Rerender-A-Video).
        shared_noise: every frame of a clip starts from frame 0's noise.
        flow_blend: 0-1, after decoding each frame is blended with the previous (restyled) frame
            warped along the input clip's optical flow (OpenCV), where the flow is reliable;
            video-to-video only.
        init_image: image-to-video with a Stable Video Diffusion model: the picture the clip starts
            from (a path; not over HTTP yet), its CLIP embedding and latents condition every frame.
        motion_bucket_id, noise_aug_strength: SVD's motion and noise-augmentation conditioning.
        min_cfg_scale: SVD's CFG ramp: the first frame's scale; ``cfg_scale`` is the last frame's.
    Image i of a batch is clip i: its frames share the seed ``seed + i`` (frame f's noise is the
    f-th draw of that seed's generator, so the first frames of a longer clip start alike).
    """

    frames: int = 16
    fps: int = 8
    motion_module: str | None = None
    context_overlap: int = 4
    init_video: str | None = None
    motion: bool = True
    cross_frame_attention: bool = False
    shared_noise: bool = False
    flow_blend: float = 0.0
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_cfg_scale: float = 1.0

    _video_ranges = field_validator("frames", "fps", "context_overlap", "flow_blend", "motion_bucket_id",
                                    "noise_aug_strength", "min_cfg_scale")(in_range)

    @model_validator(mode="after")
    def _video(self) -> "VideoRequest":
        for name, unset in VIDEO_UNSUPPORTED.items():
            if getattr(self, name) != unset:
                raise InvalidRequest(name, "is not available for video yet; text-to-video takes the prompt, "
                                     "sampler, steps, CFG, seed, size, frames, fps, a motion module and ControlNets")
        if self.flow_blend > 0 and self.init_video is None:
            raise InvalidRequest("flow_blend", "blends along the optical flow of an input clip; give init_video "
                                 "(video-to-video) or leave it 0")
        if self.init_image is None:
            for name, unset in SVD_ONLY.items():
                if getattr(self, name) != unset:
                    raise InvalidRequest(name, "conditions Stable Video Diffusion's image-to-video; give init_image "
                                               "(and an SVD model) or leave it unset")
            return self
        for name, (is_set, what) in NOT_WITH_SVD.items():
            if is_set(self):
                raise InvalidRequest(name, f"image-to-video (init_image, Stable Video Diffusion) takes no {what}")
        return self
