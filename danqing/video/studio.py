"""``VideoStudio.generate``: a ``VideoRequest`` -> clips of frames (+ files), in the numbered
steps of ``Studio.generate``. It runs over a ``Studio``: the same registry, ModelManager (the
one owner of devices), LoRA networks and embeddings.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from danqing.cache import LRUCache
from danqing.conditioning.schedule import ConditioningContext, prompt_texts
from danqing.conditioning.travel import parse_travel
from danqing.customise.lora import activate, patched, request_tags
from danqing.customise.motion_lora import activate_motion, motion_target, split_motion_tags
from danqing.errors import InvalidRequest
from danqing.files import exists_message
from danqing.models.motion import check_fits, find_motion, load_motion_adapter, motion_names, motion_unet
from danqing.models.registry import bundled_motion_entries
from danqing.models.svd import PIPELINE as SVD_PIPELINE, is_svd_folder, load_svd_folder
from danqing.outputs.video import check_video_out, clip_paths, planned_files, probe_video, read_frames, save_video
from danqing.passes.video import decode_clips, decode_svd, run_svd, run_video
from danqing.pictures import load_image
from danqing.request import RANGES
from danqing.request_video import VideoRequest
from danqing.sampling.loop import OnStep
from danqing.sampling.video import (ContextDenoise, VideoControlDenoise, cross_frame_attention, frames_denoise,
                                    motion_denoise, text_video_denoise, video_steps)
from danqing.studio import Studio, resolve_request
from danqing.video.flow import clip_flows, flow_blend


@dataclass
class VideoResult:
    """What one video request produced.

    Attributes:
        clips: the frames of each clip (batch after batch), RGB pictures.
        seeds: the seed of each clip.
        parameters: the JSON parameters of each clip (its request with its own seed, hashes).
        request: the request as run (random seeds resolved, model and motion module named).
        paths: files written (videos or PNG frames, and sidecars).
        latents: the final (batch_size, C, F, h, w) latents of each batch.
        interrupted: a callback stopped the run; the clips show the state reached.
    """

    clips: list[list[Image.Image]]
    seeds: list[int]
    parameters: list[str]
    request: VideoRequest
    paths: list[Path] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


class VideoStudio:
    """Text-to-video over a ``Studio``; keeps the last motion adapter loaded.

    Args:
        studio: the studio whose models folder, ModelManager and LoRA cache are used.
    """

    def __init__(self, studio: Studio):
        self.studio = studio
        self._adapters: LRUCache[object] = LRUCache(1)
        self._svd: LRUCache[object] = LRUCache(1)

    def generate(self, request: VideoRequest, on_step: OnStep | None = None, *, out: Path | None = None) -> VideoResult:
        """Run a text-to-video request, or video-to-video when it names an ``init_video``.

        Args:
            request: the validated ``VideoRequest``.
            on_step: called after every sampler step with a ``VideoStepInfo``; STOP interrupts.
            out: write each clip there (``.mp4``, ``.gif``, ``.webp`` or ``.png`` frames; clip i
                of several as NAME-i.EXT), with a JSON sidecar; None writes nothing.
        """
        t0 = time.perf_counter()
        studio = self.studio
        # 1. validate: seeds and model resolved, the motion module named, the files free.
        request = resolve_request(request, studio.settings.default_model)
        parse_travel(request.prompt, request.frames)  # a travel prompt's keyframes fit the clip
        if request.init_image is not None:
            return self._image_to_video(request, on_step, out, t0)
        init_frames = load_init_frames(request) if request.init_video is not None else None
        refuse_taken(out, request.batch_size * request.batch_count, request.frames)

        # 2. load: the checkpoint, its LoRA networks (patched for this request only), the motion
        # adapter (checked against the UNet; a clip longer than its window runs in sliding context
        # windows), and the motion UNet made from both.
        loaded = studio.models.load(request.model, request.vae)
        comps = loaded.components
        entry = adapter = None
        denoise_fn, window = frames_denoise, request.frames  # no motion module: frame by frame
        if comps.text_to_video:  # ModelScope / zeroscope: the model itself denoises the clip
            if request.motion_module is not None or not request.motion:
                raise InvalidRequest("motion_module" if request.motion_module is not None else "motion",
                                     f"{loaded.name!r} is a text-to-video model (ModelScope / zeroscope): it moves its "
                                     "frames itself, without a motion module, and cannot draw them one by one")
            if request.cross_frame_attention:
                raise InvalidRequest("cross_frame_attention", f"{loaded.name!r} is a text-to-video model, whose "
                                                              "attention already spans the frames")
            if parse_travel(request.prompt, request.frames) is not None:
                raise InvalidRequest("prompt", f"{loaded.name!r} is a text-to-video model (ModelScope / zeroscope), "
                                               "which reads one prompt per clip; prompt travel ('FRAME: text' lines) "
                                               "takes a checkpoint with a motion module, or per-frame mode")
            denoise_fn = text_video_denoise
        elif request.motion:
            request = request.replace(motion_module=self._motion_name(request.motion_module))
            entry = find_motion(studio.registry, request.motion_module)
            adapter = self._adapter(entry)
            check_fits(adapter, dict(comps.unet.config), motion_name=entry.name, model_name=loaded.name)
            denoise_fn, window = motion_denoise, adapter.config["motion_max_seq_length"]
            if request.frames > window:  # longer than the module sees at once: sliding context windows
                if request.context_overlap >= window:
                    raise InvalidRequest("context_overlap", f"must be less than motion module {entry.name!r}'s window "
                                                            f"of {window} frames, got {request.context_overlap}")
                denoise_fn = ContextDenoise(window, request.context_overlap)
        control = None
        if request.controlnet:  # per-frame ControlNet: each unit's map, or one map per frame of its clip
            if comps.text_to_video:
                raise InvalidRequest("controlnet", f"{loaded.name!r} is a text-to-video model (ModelScope / "
                                                   "zeroscope); ControlNets take a checkpoint with a motion module, "
                                                   "or per-frame mode")
            control = studio.control_for(request, loaded, None,
                                         pictures=[unit_frames(u, request.frames) for u in request.controlnet])
            denoise_fn = with_control(denoise_fn, control)
        tags, motion_tags = split_motion_tags(request_tags(request), registry=studio.registry, cache=studio.networks)
        if motion_tags and adapter is None:
            raise InvalidRequest("prompt", f"{motion_tags[0].name!r} is a motion LoRA: it changes a motion module, and "
                                           "this clip has none (per-frame mode, or a text-to-video model)")
        networks = activate(tags, comps, registry=studio.registry, model_name=loaded.name, cache=studio.networks)
        embeddings = studio.embeddings.for_prompts(prompt_texts(request), comps)
        timings = {"load": time.perf_counter() - t0}
        with patched(comps, networks), torch.no_grad():
            unet, motion_networks = comps.unet, []
            if adapter is not None:
                unet = motion_unet(comps.unet, adapter)  # LoRA-patched weights copied in
                studio.models.place_module(unet)
                motion_networks = activate_motion(motion_tags, unet, registry=studio.registry, cache=studio.networks,
                                                  motion_name=entry.name)
            attention = (cross_frame_attention(unet, min(window, request.frames)) if request.cross_frame_attention
                         else nullcontext())

            # 3. condition, 4. sample.
            t = time.perf_counter()
            with attention, patched(motion_target(unet), motion_networks):
                run = run_video(comps, unet, request, device=studio.models.device, dtype=studio.models.dtype,
                                on_step=on_step, context=ConditioningContext(tuple(embeddings)),
                                denoise_fn=denoise_fn, init_frames=init_frames)
            del unet
        timings["sample"] = time.perf_counter() - t

        # 5. decode (and blend along the input clip's optical flow).
        t = time.perf_counter()
        clips = [clip for lat in run.latents for clip in decode_clips(comps.vae, lat)]
        if request.flow_blend > 0:
            flows = clip_flows(init_frames)
            clips = [flow_blend(clip, flows, request.flow_blend) for clip in clips]
        timings["decode"] = time.perf_counter() - t

        # 6. metadata and save: each clip's request carries its own seed, so it re-creates alone.
        hashes = {"model_hash": loaded.sha256[:10],
                  "motion_module_hash": studio.registry.sha256(entry)[:10] if entry is not None else None,
                  "lora_hashes": {a.network.name: a.network.short_hash for a in networks + motion_networks}}
        if control is not None:
            hashes["controlnet_hashes"] = [h[:10] for h in control.hashes]
        parameters = [video_parameters(request.replace(seed=s, subseed=ss, batch_size=1, batch_count=1), hashes)
                      for s, ss in zip(run.seeds, run.subseeds)]
        result = VideoResult(clips, run.seeds, parameters, request, latents=run.latents, interrupted=run.interrupted)
        if out is not None:
            t = time.perf_counter()
            for clip, path, text in zip(clips, clip_paths(out, len(clips)), parameters):
                result.paths += save_video(clip, path, request.fps, text)
            timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        result.timings = timings
        return result

    def _image_to_video(self, request: VideoRequest, on_step: OnStep | None, out: Path | None,
                        t0: float) -> VideoResult:
        """Image-to-video with a Stable Video Diffusion model (``passes.video.run_svd``): the
        picture resized to the clip's size conditions every frame; one clip."""
        from diffusers import EulerDiscreteScheduler

        studio = self.studio
        image = load_image(request.init_image, "init_image").convert("RGB")
        refuse_taken(out, 1, request.frames)
        entry = studio.registry.find("checkpoint", request.model)
        if entry.format != "diffusers" or not is_svd_folder(entry.path):
            raise InvalidRequest("init_image", f"image-to-video needs a Stable Video Diffusion model (a {SVD_PIPELINE} "
                                               f"folder in models/checkpoints/); {request.model!r} is not one")
        key = (str(entry.path), entry.path.stat().st_mtime_ns)
        parts = self._svd.get(key)
        if parts is None:
            parts = load_svd_folder(entry.path)
            for module in parts.modules():
                studio.models.place_module(module)
            parts = self._svd.put(key, parts)
        timings = {"load": time.perf_counter() - t0}
        t = time.perf_counter()
        size = (request.width, request.height)
        run = run_svd(parts, image if image.size == size else image.resize(size, Image.LANCZOS),
                      EulerDiscreteScheduler.from_config(parts.scheduler_config), frames=request.frames,
                      fps=request.fps, motion_bucket_id=request.motion_bucket_id,
                      noise_aug_strength=request.noise_aug_strength, steps=request.steps,
                      min_guidance=request.min_cfg_scale, max_guidance=request.cfg_scale, seed=request.seed,
                      on_step=_frames_second(on_step))
        timings["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        clip = decode_svd(parts.vae, run.latents)
        timings["decode"] = time.perf_counter() - t
        hashes = {"model_hash": studio.registry.sha256(entry)[:10], "motion_module_hash": None, "lora_hashes": {}}
        parameters = [video_parameters(request, hashes)]
        result = VideoResult([clip], [request.seed], parameters, request, latents=[run.latents],
                             interrupted=run.interrupted)
        if out is not None:
            result.paths += save_video(clip, out, request.fps, parameters[0])
        timings["total"] = time.perf_counter() - t0
        result.timings = timings
        return result

    def _motion_name(self, name: str | None) -> str:
        """The request's motion module; when it names none, the only one installed in
        ``models/motion/``, or with none there the bundled one."""
        if name is not None:
            return name
        names = motion_names(self.studio.registry)
        bundled = {e.name for e in bundled_motion_entries()}
        pick = [n for n in names if n not in bundled] or names
        if len(pick) != 1:
            raise InvalidRequest("motion_module", f"name the motion module to use; installed in models/motion/: "
                                                  f"{', '.join(names) or 'none'}")
        return pick[0]

    def _adapter(self, entry):
        """The motion adapter of ``entry``, placed by the ModelManager (so diffusers' own
        ``.to(device)`` in ``UNetMotionModel.from_unet2d`` moves nothing); cached by path and mtime."""
        key = (str(entry.path), entry.path.stat().st_mtime_ns)
        hit = self._adapters.get(key)
        if hit is None:
            adapter = load_motion_adapter(entry)
            self.studio.models.place_module(adapter)
            hit = self._adapters.put(key, adapter)
        return hit


# a ControlNet unit's image with one of these suffixes is a clip (GIF and WebP when animated)
CLIP_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".webp")


def unit_frames(unit, frames: int) -> list[Image.Image] | None:
    """The first ``frames`` frames of the clip a ControlNet unit names (each becomes that frame's
    map), or None when it names a picture (one map for every frame); one line when the clip is
    shorter than the video asked or cannot be read."""
    path = Path(unit.image)
    if path.suffix.lower() not in CLIP_SUFFIXES or not path.is_file():
        return None
    if path.suffix.lower() in (".gif", ".webp"):
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) == 1:
                return None
    got = read_frames(path)
    if len(got) < frames:
        raise InvalidRequest("controlnet", f"control clip {path} has {len(got)} frames; the video asks for {frames} "
                                           f"(give frames of at most {len(got)}, or a longer clip)")
    return [Image.fromarray(a) for a in got[:frames]]


def with_control(denoise_fn, control):
    """The clip's denoise with the request's ControlNets (``ControlDenoise``): the motion UNet's,
    a sliding context window's (each window with its frames' maps) or a picture UNet's frame by
    frame."""
    if isinstance(denoise_fn, ContextDenoise):
        return ContextDenoise(denoise_fn.length, denoise_fn.overlap, VideoControlDenoise(control))
    return VideoControlDenoise(control, per_frame=denoise_fn is frames_denoise)


def refuse_taken(out: Path | None, clips: int, frames: int) -> None:
    """One line when a file the clips would write to ``out`` exists already (nothing is written)."""
    if out is not None:
        for p in planned_files(check_video_out(out), clips, frames):
            if p.exists():
                raise InvalidRequest("out", exists_message(p))


def _frames_second(on_step: OnStep | None):
    """``on_step`` for an SVD pass, whose latents are (B, F, C, h, w): handed ``VideoStepInfo``
    with them as (B, C, F, h, w), as every video pass hands them."""
    if on_step is None:
        return None
    steps = video_steps(on_step)
    return lambda info: steps(replace(info, latents=info.latents.permute(0, 2, 1, 3, 4)))


def video2video_fields(fields: dict, path: Path | str) -> dict:
    """Request fields for restyling the clip at ``path``: its frame count, frame rate and size
    (rounded down to multiples of 8) where ``fields`` leaves them out, so the restyled clip keeps
    them; the clip's headers checked against the input limits first (``probe_video``)."""
    info = probe_video(Path(path))
    frames_max = RANGES["frames"][1]
    if "frames" not in fields and info.frames > frames_max:
        raise InvalidRequest("init_video", f"{path}: {info.frames} frames, more than {frames_max:g}; give frames "
                                           f"(at most {frames_max:g}) to restyle its first frames")
    if fields.get("frames", 0) > info.frames:
        raise InvalidRequest("frames", f"{path} has {info.frames} frames; ask for at most that many, "
                                       f"got {fields['frames']}")
    size = {"width": max(8, info.width // 8 * 8), "height": max(8, info.height // 8 * 8)}
    fps = min(max(1, round(info.fps or 8)), int(RANGES["fps"][1]))
    return {"frames": info.frames, "fps": fps, **size, **fields, "init_video": str(path)}


def load_init_frames(request: VideoRequest) -> list[Image.Image]:
    """The first ``request.frames`` frames of ``request.init_video`` at width x height (resized
    when the clip's size differs); one line when the clip is shorter or cannot be read."""
    frames = read_frames(Path(request.init_video))
    if len(frames) < request.frames:
        raise InvalidRequest("frames", f"{request.init_video} has {len(frames)} frames; ask for at most that many, "
                                       f"got {request.frames}")
    size = (request.width, request.height)
    return [im if im.size == size else im.resize(size, Image.LANCZOS)
            for im in (Image.fromarray(a) for a in frames[:request.frames])]


def video_parameters(request: VideoRequest, hashes: dict) -> str:
    """The JSON text a clip's files carry: its request (which ``request_from_parameters`` reads
    back) and the hashes of what made it."""
    return json.dumps({"request": request.model_dump(mode="json"), **hashes},
                      ensure_ascii=False)


def request_from_parameters(text: str) -> VideoRequest:
    """The ``VideoRequest`` of a clip's JSON parameters (``video_parameters``)."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("request"), dict):
        raise InvalidRequest("video", "its parameters hold no video request")
    return VideoRequest.create(**data["request"])
