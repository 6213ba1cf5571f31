"""``VideoStudio.generate``: a ``VideoRequest`` -> clips of frames (+ files), in the numbered
steps of ``Studio.generate``. It runs over a ``Studio``: the same registry, ModelManager (the
one owner of devices), LoRA networks and embeddings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from danqing.cache import LRUCache
from danqing.conditioning.schedule import ConditioningContext, prompt_texts
from danqing.customise.lora import activate, patched, request_tags
from danqing.errors import InvalidRequest
from danqing.files import exists_message
from danqing.models.motion import check_fits, find_motion, load_motion_adapter, motion_names, motion_unet
from danqing.outputs.video import check_video_out, clip_paths, planned_files, save_video
from danqing.passes.video import decode_clips, run_video
from danqing.request import VideoRequest
from danqing.sampling.loop import OnStep
from danqing.sampling.video import ContextDenoise, motion_denoise
from danqing.studio import Studio, resolve_request


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

    def generate(self, request: VideoRequest, on_step: OnStep | None = None, *, out: Path | None = None) -> VideoResult:
        """Run a text-to-video request.

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
        request = request.replace(motion_module=self._motion_name(request.motion_module))
        if out is not None:
            clips = request.batch_size * request.batch_count
            for p in planned_files(check_video_out(out), clips, request.frames):
                if p.exists():
                    raise InvalidRequest("out", exists_message(p))

        # 2. load: the checkpoint, its LoRA networks (patched for this request only), the motion
        # adapter (checked against the UNet; a clip longer than its window runs in sliding context
        # windows), and the motion UNet made from both.
        loaded = studio.models.load(request.model, request.vae)
        comps = loaded.components
        entry = find_motion(studio.registry, request.motion_module)
        adapter = self._adapter(entry)
        check_fits(adapter, dict(comps.unet.config), motion_name=entry.name, model_name=loaded.name)
        window = adapter.config["motion_max_seq_length"]
        denoise_fn = motion_denoise
        if request.frames > window:  # longer than the module sees at once: sliding context windows
            if request.context_overlap >= window:
                raise InvalidRequest("context_overlap", f"must be less than motion module {entry.name!r}'s window of "
                                                        f"{window} frames, got {request.context_overlap}")
            denoise_fn = ContextDenoise(window, request.context_overlap)
        networks = activate(request_tags(request), comps, registry=studio.registry, model_name=loaded.name,
                            cache=studio.networks)
        embeddings = studio.embeddings.for_prompts(prompt_texts(request), comps)
        timings = {"load": time.perf_counter() - t0}
        with patched(comps, networks), torch.no_grad():
            unet = motion_unet(comps.unet, adapter)  # LoRA-patched weights copied in
            studio.models.place_module(unet)

            # 3. condition, 4. sample.
            t = time.perf_counter()
            run = run_video(comps, unet, request, device=studio.models.device, dtype=studio.models.dtype,
                            on_step=on_step, context=ConditioningContext(tuple(embeddings)), denoise_fn=denoise_fn)
            del unet
        timings["sample"] = time.perf_counter() - t

        # 5. decode.
        t = time.perf_counter()
        clips = [clip for lat in run.latents for clip in decode_clips(comps.vae, lat)]
        timings["decode"] = time.perf_counter() - t

        # 6. metadata and save: each clip's request carries its own seed, so it re-creates alone.
        hashes = {"model_hash": loaded.sha256[:10], "motion_module_hash": studio.registry.sha256(entry)[:10],
                  "lora_hashes": {a.network.name: a.network.short_hash for a in networks}}
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

    def _motion_name(self, name: str | None) -> str:
        """The request's motion module, or the only one installed when it names none."""
        if name is not None:
            return name
        names = motion_names(self.studio.registry)
        if len(names) != 1:
            raise InvalidRequest("motion_module", f"name the motion module to use; installed in models/motion/: "
                                                  f"{', '.join(names) or 'none'}")
        return names[0]

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
