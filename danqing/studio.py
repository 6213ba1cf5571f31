"""Studio.generate: request -> model -> conditioning -> sampling -> decode -> image + metadata.

Written as numbered steps so the flow reads top to bottom, as diffusers'
``StableDiffusionPipeline.__call__`` does.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from PIL import Image

from danqing.errors import InvalidRequest
from danqing.request import MAX_SEED, GenerationRequest
from danqing.sampling.loop import OnStep, StepControl, StepInfo
from danqing.settings import Settings


@dataclass
class GenerationResult:
    """What one request produced.

    Attributes:
        images: PIL images, batch after batch.
        seeds, subseeds: the seed of each image (seed + i).
        infotexts: A1111 ``parameters`` text of each image.
        request: the request as run (random seeds resolved, model named).
        paths: files written (empty when not saved).
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
    paths: list[Path] = field(default_factory=list)
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
        from danqing.models.manager import ModelManager
        from danqing.models.registry import Registry

        self.settings = settings or Settings()
        self.registry = Registry(self.settings.models_dir)
        self.models = ModelManager(self.registry, self.settings.device, self.settings.dtype)
        from danqing.customise.lora import NetworkCache

        self.networks = NetworkCache()
        from danqing.customise.embeddings import EmbeddingLibrary
        from danqing.customise.ip_adapter import IPAdapterLibrary

        self.embeddings = EmbeddingLibrary(self.registry)
        self.ip_adapters = IPAdapterLibrary(self.registry, self.models)
        from danqing.editing.upscalers import UpscalerLibrary

        self.upscalers = UpscalerLibrary(self.settings.models_dir, self.models)

    def generate(
        self,
        request: GenerationRequest,
        on_step: OnStep | None = None,
        *,
        save: bool = False,
        out_dir: Path | None = None,
        init_image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
    ) -> GenerationResult:
        """Run a txt2img, img2img or inpaint request (hires fix included).

        Args:
            request: the validated request.
            on_step: called after every sampler step with a ``StepInfo`` (step, total, preview());
                return ``STOP`` to interrupt: the images reached so far are decoded and returned.
            save: write PNGs with their infotext (atomically) under ``out_dir`` or
                ``outputs_dir/txt2img-images/DATE/`` (``img2img-images`` for img2img and inpaint).
            init_image, mask_image: in-memory pictures instead of the request's ``init_image``
                and ``mask`` paths.
        """
        from danqing.editing.images import load_image, load_mask

        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        # 1. validate: resolve what the request left open (random seeds, default model).
        request = resolve_request(request, self.settings.default_model)

        # 1b. the pictures of img2img / inpaint, checked before any model is loaded.
        edit = init_image is not None or request.init_image is not None
        init = mask = None
        if edit:
            init = init_image if init_image is not None else load_image(request.init_image, "init_image")
            mask = mask_image if mask_image is not None else (load_mask(request.mask) if request.mask else None)
            if mask is not None and mask.size != init.size:
                raise InvalidRequest("mask", f"the mask is {mask.width}x{mask.height} but the init image is "
                                     f"{init.width}x{init.height}; they must be the same size")

        # ... and the IP-Adapter's pictures
        ip_images = [load_image(p, "ip_adapter_image") for p in request.ip_adapter_image]

        if request.enable_hr:
            from danqing.editing.hires import check_hires_upscaler

            check_hires_upscaler(request.hr_upscaler, self.upscalers)

        if request.restore_faces:  # the face model named (the first installed if none), checked before loading
            request = request.replace(face_restoration_model=self.upscalers.face_model_name(request.face_restoration_model))

        # 2. load: the manager owns device and dtype; then the prompt's <lora:...> networks,
        # patched into the weights for this request only (restored when it ends, even on error).
        from danqing.customise.lora import activate, patched, request_tags

        tags = request_tags(request)
        loaded = self.models.load(request.model, request.vae)
        comps = loaded.components
        device, dtype = self.models.device, self.models.dtype
        networks = activate(tags, comps, registry=self.registry, model_name=loaded.name, cache=self.networks)
        control = None
        if request.controlnet:  # ControlNets / T2I-Adapters, checked against the checkpoint
            crop = None
            if edit and mask is not None and request.inpaint_full_res:  # "only masked": maps cut as the picture is
                from danqing.editing.img2img import only_masked_box

                box = only_masked_box(init, mask, request)
                crop = ((init.width, init.height), box) if box is not None else None
            control = self._control(request, loaded, mask if edit else None, crop=crop)
        timings["load"] = time.perf_counter() - t0
        with patched(comps, networks), contextlib.ExitStack() as scope:
            # 2b. customise: the textual-inversion embeddings the prompts call, checked against
            # the model and active until the request ends (the text encoder is never changed);
            # IP-Adapter: the pictures encoded, diffusers' processors on the UNet until the
            # request ends (the original processors come back when the scope closes).
            from danqing.customise.embeddings import ti_hashes, use_embeddings

            embeddings = self.embeddings.for_prompts(prompt_texts(request), comps)
            bundled = [e for act in networks for e in act.network.embeddings]  # in the LoRA files (bundle_emb)
            scope.enter_context(use_embeddings([*bundled, *embeddings]))
            custom = {"ti_hashes": ti_hashes(embeddings), "ip_adapter_hash": None,
                      "control_hashes": control.hashes if control is not None else None}
            if request.ip_adapter_image:
                request, custom["ip_adapter_hash"] = self._image_prompt(request, comps, scope, ip_images)
            return self._run(request, loaded, networks, on_step, save=save, out_dir=out_dir,
                             init=init, mask=mask, t0=t0, timings=timings, custom=custom, control=control)

    def _run(self, request, loaded, networks, on_step, *, save, out_dir, init, mask, t0, timings,
             custom: dict | None = None, control=None) -> GenerationResult:
        """Steps 3 to 6 of ``generate`` on the loaded (and patched, customised) model.

        ``custom``: infotext entries of step 2 (``ti_hashes``, ``ip_adapter_hash``, ``control_hashes``);
        ``control``: the request's ControlNet / T2I-Adapter units (``ControlDenoise``) or None."""
        from danqing.decode import decode_latents, to_pil
        from danqing.outputs.metadata import request_infotext

        comps = loaded.components
        device, dtype = self.models.device, self.models.dtype
        edit = init is not None
        custom = custom or {}

        # 3. condition, 4. sample and 5. decode: txt2img (``run_sampling``), hires fix
        # (``danqing.editing.hires``) or img2img / inpaint (``danqing.editing.img2img``).
        t = time.perf_counter()
        warnings: list[str] = []
        extra_info: dict = {}
        sources: list[Image.Image] = []
        if request.p2p_source is not None:
            from danqing.editing.p2p import run_p2p

            out = run_p2p(comps, request, device=device, dtype=dtype, on_step=on_step, init=init if edit else None)
            images, latents_out, seeds, subseeds = out.images, out.latents, out.seeds, out.subseeds
            interrupted, sources = out.interrupted, out.sources
            timings["sample"] = time.perf_counter() - t  # inversion and decoding included
            t = time.perf_counter()
        elif edit:
            from danqing.editing.img2img import run_img2img

            out = run_img2img(comps, request, init, mask, device=device, dtype=dtype, on_step=on_step, control=control,
                              post=self._face_restorer(request))
            images, latents_out, seeds, subseeds = out.images, out.latents, out.seeds, out.subseeds
            interrupted, warnings = out.interrupted, out.warnings
            timings["sample"] = time.perf_counter() - t  # decoding included
            t = time.perf_counter()
        else:
            refine = request.refiner_checkpoint is not None
            if refine:  # checked before the base model samples
                refiner = self.models.load(request.refiner_checkpoint, None)
                check_refiner(comps.family, refiner.components.family, request.refiner_checkpoint)
            latents_out, seeds, subseeds, interrupted = run_sampling(
                comps, request, device=device, dtype=dtype, on_step=on_step,
                denoising_end=request.refiner_switch_at if refine else None, control=control)
            if refine and not interrupted:
                latents_out, interrupted = run_refiner(refiner.components, request, latents_out, device=device,
                                                       dtype=dtype, on_step=on_step)
                comps = refiner.components  # its VAE decodes
                extra_info["refiner"] = (refiner.name, refiner.sha256)
            if request.enable_hr and not interrupted:
                from danqing.editing.hires import run_hires

                control_hr = None
                if request.controlnet:  # the units again, their maps at the second pass's size
                    control_hr = self._control(request, loaded, None, size=request.hr_size)
                latents_out, interrupted = run_hires(comps, request, latents_out, device=device, dtype=dtype,
                                                     on_step=on_step, control=control_hr, upscalers=self.upscalers)
            timings["sample"] = time.perf_counter() - t
            t = time.perf_counter()
            images = [img for lat in latents_out for img in to_pil(decode_latents(comps.vae, lat))]
        if request.restore_faces and not edit:  # 5b. face restoration (img2img / inpaint: inside run_img2img)
            restored = [self._face_restorer(request)(img) for img in images]
            images = [img for img, _ in restored]
            warnings = warnings + sorted({w for _, ws in restored for w in ws})
        timings["decode"] = time.perf_counter() - t

        # 6. metadata and save.
        t = time.perf_counter()
        lora_hashes = [(a.network.name, a.network.short_hash) for a in networks]
        infotexts = [
            request_infotext(
                request, seed=s, subseed=ss, model_name=loaded.name, model_hash=loaded.sha256,
                vae_name=loaded.vae_entry.name if loaded.vae_entry else None, vae_hash=loaded.vae_sha256,
                refiner=extra_info.get("refiner"), lora_hashes=lora_hashes, **custom,
            )
            for s, ss in zip(seeds, subseeds)
        ]
        paths = []
        if save:
            from danqing.outputs.store import next_output_path, save_png

            kind = "img2img-images" if edit else "txt2img-images"
            folder = Path(out_dir) if out_dir else self.settings.outputs_dir / kind / date.today().isoformat()
            for img, s, text in zip(images, seeds, infotexts):
                paths.append(save_png(img, next_output_path(folder, s), text))
            if sources:
                # the unedited picture beside each edit; its request is the identity edit
                source_request = request.replace(prompt=request.p2p_source, p2p_reweight=())
                for img, path, s, ss in zip(sources, paths, seeds, subseeds):
                    text = request_infotext(source_request, seed=s, subseed=ss, model_name=loaded.name,
                                            model_hash=loaded.sha256,
                                            vae_name=loaded.vae_entry.name if loaded.vae_entry else None,
                                            vae_hash=loaded.vae_sha256, lora_hashes=lora_hashes, **custom)
                    save_png(img, path.with_name(path.stem + "-source.png"), text)
        timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(images, seeds, subseeds, infotexts, request, paths, timings, interrupted, latents_out,
                                warnings, sources)

    def _image_prompt(self, request: GenerationRequest, comps, scope, images: list[Image.Image]):
        """Step 2b for an IP-Adapter request: find the files, check they fit, encode the
        pictures, install the adapter on the UNet inside ``scope``.

        Returns:
            (the request with the adapter and encoder named, the adapter file's sha256).
        """
        from danqing.customise import ip_adapter as ipa
        from danqing.editing.instruct import is_instruct_unet
        from danqing.models.registry import ModelEntry

        if is_instruct_unet(comps.unet):
            raise InvalidRequest("ip_adapter_image", "an image prompt (IP-Adapter) is not available with "
                                 "instruct-pix2pix models")
        adapter = self.ip_adapters.adapter_path(request.ip_adapter)
        folder = self.ip_adapters.encoder_path(request.ip_adapter_encoder)
        state = self.ip_adapters.state(adapter)
        encoder, processor = self.ip_adapters.encoder(folder)
        ipa.check_fits(state, comps.unet, encoder, adapter.name)
        prompt = ipa.encode_images(encoder, processor, images, plus=ipa.is_plus(state))
        scope.enter_context(ipa.install(comps.unet, state, request.ip_adapter_weight))
        scope.enter_context(ipa.use_image_prompt(prompt))
        named = request.replace(ip_adapter=request.ip_adapter or adapter.stem,
                                ip_adapter_encoder=request.ip_adapter_encoder or folder.name)
        entry = ModelEntry(adapter.stem, adapter, "ipadapter", adapter.suffix.lstrip(".").lower())
        return named, self.registry.sha256(entry)  # cached by path, size and mtime
    def _face_restorer(self, request: GenerationRequest):
        """``picture -> (picture, warnings)`` restoring faces with the request's face model
        (A1111's restore_faces), or None when the request does not ask for it."""
        if not request.restore_faces:
            return None
        from danqing.editing.faces import restore_faces

        face_model = self.upscalers.face_model(request.face_restoration_model)
        return lambda img: restore_faces(img, face_model)

    def _control(self, request: GenerationRequest, loaded, mask, size: tuple[int, int] | None = None, crop=None):
        """Load every unit's model (checked against the checkpoint) and prepare its picture at
        ``size`` (width, height; default the request's); ``crop``: "only masked" inpainting's
        ``((full_width, full_height), box)`` (``conditioning.control.control_map``)."""
        from danqing.conditioning.control import ControlDenoise, check_compatible, prepare_units

        controls = []
        for unit in request.controlnet:
            c = self.models.load_control(unit.model)
            check_compatible(dict(c.model.config), dict(loaded.components.unet.config), control_name=c.name,
                             model_name=loaded.name, family=loaded.components.family)
            controls.append((c.model, c.kind))
        width, height = size or (request.width, request.height)
        units = prepare_units(request, controls, width, height, mask=mask, models_dir=self.settings.models_dir,
                              crop=crop)
        return ControlDenoise(units, hashes=[self.models.load_control(u.model).sha256 for u in request.controlnet])


def check_refiner(base_family: str, refiner_family: str, name: str) -> None:
    """A refiner must share the base model's latent space (SDXL with SDXL, SD1/SD2 together)."""
    space = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sdxl-refiner": "sdxl"}
    if space.get(base_family) != space.get(refiner_family):
        raise InvalidRequest("refiner_checkpoint", f"{name!r} is a {refiner_family} model; a {base_family} model's "
                             f"latents can only be refined by a model of the same latent space "
                             f"({', '.join(f for f, s in space.items() if s == space.get(base_family))})")


def run_refiner(comps, request: GenerationRequest, latents: list[torch.Tensor], *, device, dtype,
                on_step: OnStep | None = None):
    """The refiner's side of the hand-off: each batch's latents, left at ``refiner_switch_at``
    by the base model, denoised to the end by ``comps`` (diffusers' XL img2img pipeline with
    ``denoising_start``), with its own conditioning and fresh per-image generators."""
    from danqing.conditioning.text import TextEncoder
    from danqing.sampling.loop import sample
    from danqing.sampling.noise import make_generators
    from danqing.sampling.samplers import make_scheduler

    encoder = TextEncoder(comps, clip_skip=request.clip_skip)
    cond = build_conditioning(encoder, request, batch=request.batch_size)
    out, interrupted = [], False
    noise_device = "cpu" if request.rng == "cpu" else device
    for b, lat in enumerate(latents):
        seeds = [request.seed + b * request.batch_size + i for i in range(request.batch_size)]
        gens = make_generators(seeds, noise_device)
        scheduler = make_scheduler(comps.scheduler_config, request.sampler, request.schedule,
                                   seed=seeds if len(seeds) > 1 else seeds[0])
        res = sample(comps.unet, scheduler, lat.to(device=device, dtype=dtype), cond, steps=request.steps,
                     cfg_scale=request.cfg_scale, generators=gens, on_step=on_step, family=comps.family,
                     batch_index=b, batch_count=len(latents), init_latents=lat.to(device=device, dtype=dtype),
                     denoising_start=request.refiner_switch_at)
        out.append(res.latents)
        if res.interrupted:
            interrupted = True
            break
    return out, interrupted


def run_sampling(comps, request: GenerationRequest, *, device, dtype, on_step: OnStep | None = None,
                 denoising_end: float | None = None, control=None):
    """Steps 3 and 4 of a txt2img request on already-loaded Components: condition, then sample
    every batch. Used by ``Studio.generate`` and by training (sample grids, evaluation).

    Args:
        control: a ``conditioning.control.ControlDenoise`` (ControlNet / T2I-Adapter units) or None.

    Returns:
        (latents per batch, seeds, subseeds, interrupted).
    """
    from danqing.conditioning.text import TextEncoder
    from danqing.decode import vae_scale_factor
    from danqing.sampling.loop import sample
    from danqing.sampling.noise import initial_noise, make_generators
    from danqing.sampling.samplers import make_scheduler

    # 3. condition: every distinct prompt of the prompt-editing schedules, padded to one length.
    encoder = TextEncoder(comps, clip_skip=request.clip_skip)
    cond_schedule = build_conditioning(encoder, request, batch=request.batch_size)

    # 4. sample: a fresh scheduler and per-image generators for each batch.
    factor = vae_scale_factor(comps.vae)
    shape = (comps.unet.config.in_channels, request.height // factor, request.width // factor)
    latents_out, seeds, subseeds, interrupted = [], [], [], False
    noise_device = "cpu" if request.rng == "cpu" else device
    for b in range(request.batch_count):
        batch_seeds = [request.seed + b * request.batch_size + i for i in range(request.batch_size)]
        batch_subseeds = [request.subseed + b * request.batch_size + i for i in range(request.batch_size)]
        generators = make_generators(batch_seeds, noise_device)
        noise = initial_noise(shape, generators, subseeds=batch_subseeds, subseed_strength=request.subseed_strength)
        scheduler = make_scheduler(
            comps.scheduler_config, request.sampler, request.schedule,
            seed=batch_seeds if len(batch_seeds) > 1 else batch_seeds[0],
        )
        result = sample(
            comps.unet, scheduler, noise.to(device=device, dtype=dtype), cond_schedule,
            steps=request.steps, cfg_scale=request.cfg_scale, generators=generators,
            on_step=on_step, family=comps.family, batch_index=b, batch_count=request.batch_count,
            denoising_end=denoising_end, **({"denoise_fn": control} if control is not None else {}),
        )
        latents_out.append(result.latents)
        seeds += batch_seeds
        subseeds += batch_subseeds
        if result.interrupted:
            interrupted = True
            break
    return latents_out, seeds, subseeds, interrupted


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


def prompt_texts(request: GenerationRequest) -> list[str]:
    """Every text a request's prompts take at some step (prompt editing resolved): where
    textual-inversion embeddings are looked for."""
    from danqing.conditioning.prompt_parser import prompt_schedule, strip_extra_networks

    texts = []
    for text in (request.prompt, request.negative_prompt, request.hr_prompt, request.hr_negative_prompt,
                 request.p2p_source):
        if text:  # <lora:...> tags are not text the encoder sees
            texts += [strip_extra_networks(t)[0] for _, t in prompt_schedule(text, request.steps)]
    return texts


def build_conditioning(encoder, request: GenerationRequest, *, batch: int):
    """The per-step conditioning for the whole request (prompt editing for both prompts).

    Every scheduled text is encoded once; all are padded with the empty prompt's chunk to the
    longest chunk count so the UNet sees one static shape for the whole run.
    """
    from danqing.conditioning.prompt_parser import prompt_schedule, strip_extra_networks
    from danqing.conditioning.text import pad_to_chunks
    from danqing.sampling.loop import Conditioning, ConditioningSchedule

    from danqing.customise.ip_adapter import active_image_prompt

    comps = encoder.c
    image_prompt = active_image_prompt() if comps.family != "sdxl-refiner" else None
    use_cfg = request.cfg_scale > 1.0
    # <lora:...> tags are applied to the weights (Studio.generate), not encoded as text
    pos = prompt_schedule(strip_extra_networks(request.prompt)[0], request.steps)
    neg = prompt_schedule(request.negative_prompt, request.steps) if use_cfg else [(request.steps, "")]
    cache: dict[tuple[str, bool], object] = {}

    def enc(text: str, negative: bool):
        key = (text, negative and comps.family == "sdxl")  # SDXL's empty negative is zeros
        if key not in cache:
            cache[key] = encoder.encode(text, negative=negative)
        return cache[key]

    pos_c = [(end, enc(text, False)) for end, text in pos]
    neg_c = [(end, enc(text, True)) for end, text in neg]
    n_chunks = max(c.n_chunks for _, c in pos_c + neg_c)
    pos_c = [(end, pad_to_chunks(c, n_chunks, enc("", False))) for end, c in pos_c]
    neg_c = [(end, pad_to_chunks(c, n_chunks, enc("", True))) for end, c in neg_c]

    # Merge both schedules: a new entry wherever either prompt changes. As in A1111's
    # reconstruct_cond_batch, 0-based step s uses the first entry with s <= end_at_step.
    ends = sorted({end for end, _ in pos_c} | {end for end, _ in neg_c})
    conds = []
    for end in ends:
        p = next(c for e, c in pos_c if end <= e)
        n = next(c for e, c in neg_c if end <= e)
        context = torch.cat([n.hidden.expand(batch, -1, -1), p.hidden.expand(batch, -1, -1)]) if use_cfg else p.hidden.expand(batch, -1, -1)
        added = None
        if comps.family in ("sdxl", "sdxl-refiner"):
            pooled = torch.cat([n.pooled.expand(batch, -1), p.pooled.expand(batch, -1)]) if use_cfg else p.pooled.expand(batch, -1)
            added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(comps.family, request, batch, use_cfg, p.hidden)}
        if image_prompt is not None:  # IP-Adapter: diffusers' UNet reads added_cond_kwargs["image_embeds"]
            added = {**(added or {}), "image_embeds": [e.to(context) for e in image_prompt.batch(batch, use_cfg)]}
        conds.append(Conditioning(context, added))
    return ConditioningSchedule(ends, conds)


# SDXL refiner's aesthetic-score conditioning (diffusers' and A1111's defaults)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def sdxl_time_ids(family: str, request: GenerationRequest, batch: int, use_cfg: bool, like: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning, (2B or B, 6) for the base: original size, crop (0, 0), target
    size; (2B or B, 5) for the refiner: original size, crop, aesthetic score (2.5 for the
    unconditional branch, 6 for the conditional one)."""
    h, w = request.height, request.width
    if family == "sdxl":
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=like.dtype, device=like.device)
        return ids.expand(2 * batch if use_cfg else batch, -1)
    pos = torch.tensor([[h, w, 0, 0, AESTHETIC_SCORE]], dtype=like.dtype, device=like.device).expand(batch, -1)
    if not use_cfg:
        return pos
    neg = torch.tensor([[h, w, 0, 0, NEGATIVE_AESTHETIC_SCORE]], dtype=like.dtype, device=like.device).expand(batch, -1)
    return torch.cat([neg, pos])
