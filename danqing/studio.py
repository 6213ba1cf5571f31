"""Studio.generate: request -> model -> conditioning -> sampling -> decode -> image + metadata.

Written as numbered steps so the flow reads top to bottom, as diffusers'
``StableDiffusionPipeline.__call__`` does. Steps 3 to 5 are passes (``danqing.passes``,
``danqing.editing``): functions over loaded Components that return one ``PassResult``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from danqing.conditioning.control import ControlDenoise, check_compatible, prepare_units
from danqing.conditioning.regions import region_plan
from danqing.conditioning.schedule import ConditioningContext, prompt_texts
from danqing.customise import ip_adapter as ipa
from danqing.customise.embeddings import EmbeddingLibrary, ti_hashes
from danqing.customise.speedups import request_speedups
from danqing.customise.lora import NetworkCache, activate, patched, request_tags
from danqing.editing import hires
from danqing.editing.faces import restore_faces
from danqing.editing.images import load_image, load_mask
from danqing.editing.img2img import only_masked_box, run_img2img
from danqing.editing.instruct import is_instruct_unet
from danqing.editing.p2p import run_p2p
from danqing.editing.upscalers import UpscalerLibrary
from danqing.errors import InvalidRequest
from danqing.models.manager import ModelManager
from danqing.models.registry import ModelEntry, Registry
from danqing.outputs.metadata import request_infotext
from danqing.outputs import place
from danqing.passes.batches import PassResult, decode_pictures
from danqing.passes.joint import run_txt2img_joint
from danqing.passes.refiner import check_refiner, refine, run_refiner
from danqing.passes.txt2img import run_sampling, run_txt2img
from danqing.request import MAX_SEED, GenerationRequest, for_family
from danqing.sampling.loop import OnStep, StepControl, StepInfo
from danqing.sampling.regional import regional_attention
from danqing.settings import Settings

# kept importable from here: training and the refiner's parity test call them by these names
__all__ = ["GenerationResult", "Studio", "check_refiner", "resolve_request", "run_refiner", "run_sampling",
           "OnStep", "StepControl", "StepInfo"]


@dataclass
class GenerationResult:
    """What one request produced.

    Attributes:
        images: PIL images, batch after batch.
        seeds, subseeds: the seed of each image (seed + i).
        infotexts: A1111 ``parameters`` text of each image.
        request: the request as run (random seeds resolved, model named).
        paths: files written (empty when not saved): local paths, or URLs under an fsspec outputs URL.
        timings: seconds per phase ("load", "condition", "sample", "decode", "save", "total").
        interrupted: a callback stopped the run; the images show the state reached.
        latents: the final latents of each batch, (batch_size, 4, h, w) each.
        warnings: things the run decided on its own (an empty mask, strength 0, ...), one line each.
        sources: Prompt-to-Prompt only: the unedited picture of each image (generated from
            ``p2p_source``, or a real picture's null-text reconstruction).
    """

    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    paths: list[place.Location] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    latents: list[torch.Tensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sources: list[Image.Image] = field(default_factory=list)


class Studio:
    """The library's entry point. One per process; requests run one after another.

    Args:
        settings: paths and device policy (``Settings.from_env()`` in entry points).
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.registry = Registry(self.settings.models_dir)
        self.models = ModelManager(self.registry, self.settings.device, self.settings.dtype, fast=self.settings.fast)
        self.networks = NetworkCache()
        self.embeddings = EmbeddingLibrary(self.registry)
        self.ip_adapters = ipa.IPAdapterLibrary(self.registry, self.models)
        self.upscalers = UpscalerLibrary(self.settings.models_dir, self.models)

    def generate(
        self,
        request: GenerationRequest,
        on_step: OnStep | None = None,
        *,
        save: bool = False,
        out_dir: place.Location | None = None,
        init_image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
        extra_params: dict[str, object] | None = None,
    ) -> GenerationResult:
        """Run a txt2img, img2img, inpaint or Prompt-to-Prompt request (refiner and hires fix included).

        Args:
            request: the validated request.
            on_step: called after every sampler step with a ``StepInfo`` (step, total, preview());
                return ``STOP`` to interrupt: the images reached so far are decoded and returned.
            save: write PNGs with their infotext (atomically) under ``out_dir`` or
                ``ROOT/txt2img-images/DATE/`` (``img2img-images`` for img2img and inpaint), ROOT
                the settings' ``outputs_url`` or ``outputs_dir`` (a folder or an fsspec URL).
            init_image, mask_image: in-memory pictures instead of the request's ``init_image``
                and ``mask`` paths.
            extra_params: more infotext ``key: value`` pairs that the request does not hold
                (``request_infotext``), e.g. the ``Template`` a dynamic prompt was drawn from.
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        # 1. validate: resolve what the request left open (random seeds, default model), read its
        # pictures and check the names it gives, all before any model is loaded.
        request = resolve_request(request, self.settings.default_model)
        init, mask = request_pictures(request, init_image, mask_image)
        ip_images = [load_image(p, "ip_adapter_image") for p in request.ip_adapter_image]
        regions = region_plan(request) if request.regions is not None else None  # its mask pictures read
        request = self._check_names(request)

        # 2. load: the manager owns device and dtype; then the prompt's <lora:...> networks,
        # patched into the weights for this request only (restored when it ends, even on error),
        # and the ControlNet / T2I-Adapter units, checked against the checkpoint.
        tags = request_tags(request)
        loaded = still_model(self.models.load(request.model, request.vae, request.text_encoders))
        request = for_family(request, loaded.components.family)  # SD3 / FLUX
        networks = activate(tags, loaded.components, registry=self.registry, model_name=loaded.name,
                            cache=self.networks)
        control = None
        if request.controlnet:  # "only masked" inpainting: the maps cut as the picture is
            control = self.control_for(request, loaded, mask, crop=control_crop(request, init, mask))
        timings["load"] = time.perf_counter() - t0
        with patched(loaded.components, networks), contextlib.ExitStack() as scope:
            # 2a. the fast path (settings) and the request's speed options, undone when the scope ends
            scope.enter_context(self.models.fast_path(loaded.components))
            scope.enter_context(request_speedups(loaded.components.unet, request))
            # 2b. customise: the request's embeddings and image prompt, handed to the passes.
            request, context, custom = self._customise(request, loaded, networks, scope, ip_images)
            custom["control_hashes"] = control.hashes if control is not None else None
            custom["extra_params"] = extra_params
            if regions is not None:  # the regions' prompts, each in its part of every cross-attention layer
                scope.enter_context(regional_attention(loaded.components.unet, regions))

            # 3. condition, 4. sample, 5. decode: the passes the request asks for.
            out, refiner = self._passes(request, loaded, context, control, init, mask, on_step, timings)

            # 6. metadata and save.
            return self._result(request, loaded, networks, custom, out, refiner, save=save, out_dir=out_dir,
                                kind="img2img-images" if init is not None else "txt2img-images",
                                timings=timings, t0=t0)

    def generate_joint(self, requests: list[GenerationRequest], on_steps: list | None = None) -> list[GenerationResult]:
        """Several plain txt2img requests as one UNet batch (batched serving); each result is what
        ``generate(request, save=False)`` returns for it, up to the batched kernels' rounding.

        The caller makes sure they can share a batch (``danqing.server.batching``: same model,
        size, sampler, steps, CFG, ...; batch_count 1; no init picture, LoRA, ControlNet,
        IP-Adapter, regions, hires fix, refiner or face restoration).

        Args:
            requests: the requests (seeds resolved or -1).
            on_steps: one step callback per request (or None), called with its own rows.
        """
        t0 = time.perf_counter()
        requests = [resolve_request(r, self.settings.default_model) for r in requests]
        loaded = still_model(self.models.load(requests[0].model, requests[0].vae, requests[0].text_encoders))
        timings = {"load": time.perf_counter() - t0}
        with contextlib.ExitStack() as scope:
            scope.enter_context(self.models.fast_path(loaded.components))
            scope.enter_context(request_speedups(loaded.components.unet, requests[0]))
            prepared = [self._customise(r, loaded, [], scope, []) for r in requests]
            t = time.perf_counter()
            outs = run_txt2img_joint(loaded.components, [p[0] for p in prepared], device=self.models.device,
                                     dtype=self.models.dtype, contexts=[p[1] for p in prepared], on_steps=on_steps)
            timings["sample"] = time.perf_counter() - t
            t = time.perf_counter()
            for out in outs:
                out.images = decode_pictures(loaded.components.vae, out.latents[0], None, out.warnings)
            timings["decode"] = time.perf_counter() - t
            return [self._result(r, loaded, [], {**custom, "control_hashes": None, "extra_params": None}, out, None,
                                 save=False, out_dir=None, kind="txt2img-images", timings=dict(timings), t0=t0)
                    for (r, _, custom), out in zip(prepared, outs)]

    # -- the steps ------------------------------------------------------------------------------
    def _check_names(self, request: GenerationRequest) -> GenerationRequest:
        """Step 1: the hires upscaler and the face-restoration model exist (the face model named:
        the first installed when the request names none)."""
        if request.enable_hr:
            hires.check_hires_upscaler(request.hr_upscaler, self.upscalers)
        if request.restore_faces:
            request = request.replace(face_restoration_model=self.upscalers.face_model_name(request.face_restoration_model))
        return request

    def _customise(self, request: GenerationRequest, loaded, networks, scope, ip_images: list[Image.Image]):
        """Step 2b: the textual-inversion embeddings the prompts call (checked against the model;
        the text encoder is never changed) and, for an image prompt, the IP-Adapter installed on
        the UNet inside ``scope`` (the original processors come back when it closes).

        Returns:
            (the request with the adapter named, its ``ConditioningContext``, infotext entries).
        """
        comps = loaded.components
        second = hires.second_pass_request(request) if request.enable_hr else None
        embeddings = self.embeddings.for_prompts(prompt_texts(request, second), comps)
        bundled = [e for act in networks for e in act.network.embeddings]  # in the LoRA files (bundle_emb)
        custom = {"ti_hashes": ti_hashes(embeddings), "ip_adapter_hash": None}
        image_prompt = None
        if request.ip_adapter_image:
            request, image_prompt, custom["ip_adapter_hash"] = self._image_prompt(request, loaded, scope, ip_images)
        return request, ConditioningContext(tuple([*bundled, *embeddings]), image_prompt), custom


    def _passes(self, request: GenerationRequest, loaded, context: ConditioningContext, control, init, mask,
                on_step, timings: dict) -> tuple[PassResult, tuple | None]:
        """Steps 3 to 5: the pass the request asks for, its pictures decoded and finished.

        Returns:
            (the ``PassResult`` with ``images``, the refiner's (name, sha256) or None).
        """
        run = dict(device=self.models.device, dtype=self.models.dtype, on_step=on_step, context=context)
        finish = self._face_restorer(request)  # 5b. face restoration: one ``Finish`` for every pass
        refiner = None
        t = time.perf_counter()
        if request.p2p_source is not None:  # Prompt-to-Prompt (a real picture is null-text inverted first)
            out = run_p2p(loaded.components, request, init=init, post=finish, **run)
        elif init is not None:  # img2img / inpaint
            out = run_img2img(loaded.components, request, init, mask, control=control, post=finish, **run)
        else:  # txt2img, then the refiner, then the hires fix: latents, decoded below
            out, decoder, refiner = self._txt2img(request, loaded, control, run)
        timings["sample"] = time.perf_counter() - t  # img2img and Prompt-to-Prompt: decoding included
        t = time.perf_counter()
        if init is None and request.p2p_source is None:
            out.images = [img for lat in out.latents for img in decode_pictures(decoder.vae, lat, finish, out.warnings)]
        timings["decode"] = time.perf_counter() - t
        return out, refiner

    def _txt2img(self, request: GenerationRequest, loaded, control, run: dict):
        """txt2img, handed to the SDXL refiner at ``refiner_switch_at``, then the hires fix's
        second pass; the seeds are the first pass's.

        Returns:
            (``PassResult`` with the last pass's latents, the Components whose VAE decodes them,
            the refiner's (name, sha256) or None).
        """
        comps = loaded.components
        refiner = None
        if request.refiner_checkpoint is not None:  # checked before the base model samples
            refiner = self.models.load(request.refiner_checkpoint, None)
            check_refiner(comps.family, refiner.components.family, request.refiner_checkpoint)
        out = run_txt2img(comps, request, control=control, denoising_end=request.refiner_switch_at if refiner else None,
                          **run)
        used = None
        if refiner is not None and not out.interrupted:
            later = refine(refiner.components, request, out.latents, **run)
            out.latents, out.interrupted = later.latents, later.interrupted
            comps, used = refiner.components, (refiner.name, refiner.sha256)  # its VAE decodes
        if request.enable_hr and not out.interrupted:
            control_hr = None
            if request.controlnet:  # the units again, their maps at the second pass's size
                control_hr = self.control_for(request, loaded, None, size=request.hr_size)
            later = hires.run_hires(comps, request, out.latents, control=control_hr, upscalers=self.upscalers, **run)
            out.latents, out.interrupted = later.latents, later.interrupted
        return out, comps, used

    def _result(self, request: GenerationRequest, loaded, networks, custom: dict, out: PassResult, refiner,
                *, save: bool, out_dir: place.Location | None, kind: str, timings: dict, t0: float) -> GenerationResult:
        """Step 6: the infotext of each picture; with ``save``, the PNGs written atomically
        (Prompt-to-Prompt: each source picture beside its edit, its request the identity edit)."""
        t = time.perf_counter()
        lora_hashes = [(a.network.name, a.network.short_hash) for a in networks]
        model = dict(model_name=loaded.name, model_hash=loaded.sha256, lora_hashes=lora_hashes,
                     vae_name=loaded.vae_entry.name if loaded.vae_entry else None, vae_hash=loaded.vae_sha256,
                     family=loaded.components.family, **custom)
        infotexts = [request_infotext(request, seed=s, subseed=ss, refiner=refiner, **model)
                     for s, ss in zip(out.seeds, out.subseeds)]
        paths = []
        if save:
            folder = out_dir or place.dated_folder(self.settings, kind)  # a folder or an fsspec URL
            for img, s, text in zip(out.images, out.seeds, infotexts):
                paths.append(place.save_picture(img, place.next_picture(folder, s), text))
            source_request = request.replace(prompt=request.p2p_source, p2p_reweight=()) if out.sources else None
            for img, path, s, ss in zip(out.sources, paths, out.seeds, out.subseeds):
                text = request_infotext(source_request, seed=s, subseed=ss, **model)
                place.save_picture(img, place.beside(path, place.name_of(path)[:-4] + "-source.png"), text)
        timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(out.images, out.seeds, out.subseeds, infotexts, request, paths, timings,
                                out.interrupted, out.latents, out.warnings, out.sources)

    def _image_prompt(self, request: GenerationRequest, loaded, scope, images: list[Image.Image]):
        """Step 2b for an IP-Adapter request: find the files, check they fit, encode the
        pictures, install the adapter on the UNet inside ``scope``.

        Returns:
            (the request with the adapter and encoder named, its ``ImagePrompt``, the adapter file's sha256).
        """
        comps = loaded.components
        if is_instruct_unet(comps.unet):
            raise InvalidRequest("ip_adapter_image", "an image prompt (IP-Adapter) is not available with "
                                 "instruct-pix2pix models")
        adapter = self.ip_adapters.adapter_path(request.ip_adapter, model=loaded.name)
        folder = self.ip_adapters.encoder_path(request.ip_adapter_encoder, adapter)
        state = self.ip_adapters.state(adapter)
        encoder, processor = self.ip_adapters.encoder(folder)
        ipa.check_fits(state, comps.unet, encoder, adapter.name)
        prompt = ipa.encode_images(encoder, processor, images, plus=ipa.is_plus(state))
        scope.enter_context(ipa.install(comps.unet, state, request.ip_adapter_weight))
        named = request.replace(ip_adapter=request.ip_adapter or adapter.stem,
                                ip_adapter_encoder=request.ip_adapter_encoder or folder.name)
        entry = ModelEntry(adapter.stem, adapter, "ipadapter", adapter.suffix.lstrip(".").lower())
        return named, prompt, self.registry.sha256(entry)  # cached by path, size and mtime

    def _face_restorer(self, request: GenerationRequest):
        """``picture -> (picture, warnings)`` restoring faces with the request's face model
        (A1111's restore_faces), or None when the request does not ask for it."""
        if not request.restore_faces:
            return None
        face_model = self.upscalers.face_model(request.face_restoration_model)
        return lambda img: restore_faces(img, face_model)

    def control_for(self, request: GenerationRequest, loaded, mask, size: tuple[int, int] | None = None, crop=None,
                    pictures=None) -> ControlDenoise:
        """Load every unit's model (checked against the checkpoint) and prepare its picture at
        ``size`` (width, height; default the request's); ``crop``: "only masked" inpainting's
        ``((full_width, full_height), box)`` (``conditioning.control.control_map``);
        ``pictures``: per unit, the frames of a clip it names, one map each, or None."""
        controls = []
        for unit in request.controlnet:
            c = self.models.load_control(unit.model)
            check_compatible(dict(c.model.config), dict(loaded.components.unet.config), control_name=c.name,
                             model_name=loaded.name, family=loaded.components.family)
            controls.append((c.model, c.kind))
        width, height = size or (request.width, request.height)
        units = prepare_units(request, controls, width, height, mask=mask, models_dir=self.settings.models_dir,
                              crop=crop, pictures=pictures)
        return ControlDenoise(units, hashes=[self.models.load_control(u.model).sha256 for u in request.controlnet])


def request_pictures(request: GenerationRequest, init_image: Image.Image | None, mask_image: Image.Image | None):
    """(init picture, mask) of an img2img / inpaint request (the in-memory ones when given, else
    the request's files), checked to be the same size; (None, None) for txt2img."""
    if init_image is None and request.init_image is None:
        return None, None
    init = init_image if init_image is not None else load_image(request.init_image, "init_image")
    mask = mask_image if mask_image is not None else (load_mask(request.mask) if request.mask else None)
    if mask is not None and mask.size != init.size:
        raise InvalidRequest("mask", f"the mask is {mask.width}x{mask.height} but the init image is "
                             f"{init.width}x{init.height}; they must be the same size")
    return init, mask


def control_crop(request: GenerationRequest, init, mask):
    """"Only masked" inpainting cuts the control maps as it cuts the picture:
    ``((full_width, full_height), box)``, or None."""
    if init is None or mask is None or not request.inpaint_full_res:
        return None
    box = only_masked_box(init, mask, request)
    return ((init.width, init.height), box) if box is not None else None


def resolve_request(request: GenerationRequest, default_model: str) -> GenerationRequest:
    """Fill in the random seeds (-1) and the default model; the result reproduces exactly."""
    changes = {}
    if request.seed == -1:
        changes["seed"] = random.randint(0, MAX_SEED - 1000)
    if request.subseed == -1:
        changes["subseed"] = random.randint(0, MAX_SEED - 1000)
    if request.model is None:
        changes["model"] = default_model
    return request.replace(**changes) if changes else request


def still_model(loaded):
    """``loaded`` when its model draws pictures; a text-to-video model (ModelScope / zeroscope)
    is refused in one line, naming the command that runs it."""
    if loaded.components.text_to_video:
        raise InvalidRequest("model", f"{loaded.name!r} is a text-to-video model (ModelScope / zeroscope): it makes "
                                      "clips, with danqing video or POST /api/v1/video/jobs, not pictures")
    return loaded
