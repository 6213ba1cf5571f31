"""AUTOMATIC1111-compatible web API under ``/sdapi/v1/`` (docs/a1111.md, docs/api.md).

The field mapping is data: every A1111 request field is in exactly one table --
``TO_REQUEST`` (becomes a GenerationRequest field), ``SHELL`` (handled here: images, saving,
settings), or ``NEUTRAL`` (accepted only at values that change nothing; anything else is a 422
naming the field, never silently ignored). The ControlNet extension's units are mapped in
``server/a1111_units.py``. The sync routes go through the job queue and wait.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any, Optional, Union

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from danqing.apps.families import check_fields, family_of
from danqing.editing.hires import LATENT_UPSCALERS
from danqing.editing.upscalers import BUILTIN
from danqing.editing.upscalers import UPSCALER_FOLDERS, find_files
from danqing.errors import InvalidRequest
from danqing.models.loader import describe_checkpoint
from danqing.outputs import place
from danqing.outputs.infotext import parse_infotext
from danqing.request import GenerationRequest
from danqing.sampling.samplers import samplers as sampler_table, schedule_names
from danqing.server.a1111_extras import extras_routes
from danqing.server.a1111_scripts import SCRIPTS, run_script, script_key, style_listing, styled
from danqing.server.a1111_units import controlnet_units, ip_adapter_unit, neutral_ok, regional_prompter
from danqing.server.common import infotext_of_image, job_error, memory_report
from danqing.server.security import JOB_RESPONSES, decode_image

RESIZE_MODES = ["just resize", "crop and resize", "resize and fill", "latent upscale"]  # A1111 index order
INPAINTING_FILL = ["fill", "original", "latent noise", "latent nothing"]  # A1111 index order

# A1111 field -> GenerationRequest field.
TO_REQUEST = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "subseed": "subseed",
    "subseed_strength": "subseed_strength", "sampler_name": "sampler", "scheduler": "schedule",
    "batch_size": "batch_size", "n_iter": "batch_count", "steps": "steps", "cfg_scale": "cfg_scale",
    "width": "width", "height": "height", "denoising_strength": "denoising_strength",
    # hires fix (txt2img)
    "enable_hr": "enable_hr", "hr_scale": "hr_scale", "hr_upscaler": "hr_upscaler",
    "hr_second_pass_steps": "hr_second_pass_steps", "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y",
    "hr_sampler_name": "hr_sampler_name", "hr_prompt": "hr_prompt", "hr_negative_prompt": "hr_negative_prompt",
    # img2img / inpaint
    "resize_mode": "resize_mode", "mask_blur": "mask_blur", "inpainting_fill": "inpainting_fill",
    "inpaint_full_res": "inpaint_full_res", "inpaint_full_res_padding": "inpaint_full_res_padding",
    "inpainting_mask_invert": "inpainting_mask_invert",
    "image_cfg_scale": "image_cfg_scale",  # instruct-pix2pix models
    "refiner_checkpoint": "refiner_checkpoint", "refiner_switch_at": "refiner_switch_at",
    "restore_faces": "restore_faces",  # with the first installed face-restoration model
}
# Fields the server handles itself.
SHELL = {
    "send_images", "save_images", "override_settings", "override_settings_restore_afterwards", "sampler_index",
    "init_images", "mask", "include_init_images", "do_not_save_samples", "do_not_save_grid", "mask_blur_x",
    "mask_blur_y", "eta", "alwayson_scripts",  # alwayson_scripts: "controlnet" units (CONTROLNET_* below; an IP-Adapter unit is an image prompt)
    "styles", "script_name", "script_args",  # styles.csv; the X/Y/Z plot and prompts from file (server/a1111_scripts.py)
}

NEUTRAL: dict[str, tuple] = {
    "tiling": (None, False),
    "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0),
    "s_min_uncond": (None, 0), "s_churn": (None, 0), "s_tmax": (None, 0), "s_tmin": (None, 0), "s_noise": (None, 1),
    "disable_extra_networks": (None, False), "firstphase_width": (None, 0), "firstphase_height": (None, 0),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "hr_scheduler": (None, "", "Use same scheduler"),
    "hr_additional_modules": (None, [], ["Use same choices"]),
    "comments": (None, {}),
    "force_task_id": (None, ""), "infotext": (None, ""),
    "initial_noise_multiplier": (None, 1), "latent_mask": (None, ""), "mask_round": (None, True),
}


class _Body(BaseModel):
    # strict: booleans are true/false only, integers are not 1.0 or "1" (floats take integers)
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    comments: Optional[dict[str, Any]] = None
    script_name: Optional[str] = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None


class Txt2ImgBody(_Body):
    """A1111 ``StableDiffusionTxt2ImgProcessingAPI``."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_additional_modules: Optional[list[str]] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(_Body):
    """A1111 ``StableDiffusionImg2ImgProcessingAPI``."""

    init_images: Optional[list[str]] = None
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: Union[bool, int] = 1  # A1111 declares bool, clients send 0/1 or true/false; "only masked"
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: Union[bool, int] = 0  # A1111 declares int 0/1; clients send true/false too
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = ""


def request_fields(body: _Body, *, img2img: bool) -> dict[str, Any]:
    """The GenerationRequest fields of an A1111 body (pure: no files, no models).

    Raises InvalidRequest naming the A1111 field for anything danqing cannot honour.
    """
    data = body.model_dump()
    for name, value in data.items():
        if name in NEUTRAL and not neutral_ok(value, NEUTRAL[name]):
            shown = [a for a in NEUTRAL[name] if a is not None]
            raise InvalidRequest(name, f"not supported by danqing yet; leave it unset"
                                       f"{' or ' + ' / '.join(json.dumps(a) for a in shown) if shown else ''}")
    controlnet_units(data.get("alwayson_scripts") or {})  # refuses other scripts and bad units here, by name
    script_key(data.get("script_name"))  # refuses scripts other than the X/Y/Z plot and prompts from file
    fields: dict[str, Any] = {}
    for a1111, ours in TO_REQUEST.items():
        if a1111 in data:
            fields[ours] = data[a1111]
    fields.update(ip_adapter_unit(data.get("alwayson_scripts") or {})[0])  # the pictures: build_router's run
    regions = regional_prompter(data.get("alwayson_scripts") or {})
    if regions is not None:
        fields["regions"] = regions
    fields["sampler"] = data.get("sampler_name") or data.get("sampler_index") or "Euler"
    if fields.get("schedule") in (None, ""):
        fields["schedule"] = "Automatic"
    else:
        fields["schedule"] = schedule_label(fields["schedule"])
    if data.get("eta") is not None:
        ddim = fields["sampler"].casefold() == "ddim"
        if data["eta"] != (0.0 if ddim else 1.0):
            raise InvalidRequest("eta", f"only the default eta ({0 if ddim else 1}) is supported for "
                                        f"{fields['sampler']!r}; leave it unset")
    if fields.get("restore_faces") is None:
        fields.pop("restore_faces", None)
    if fields.get("refiner_checkpoint") in (None, "", "None"):
        fields.pop("refiner_checkpoint", None)
        fields.pop("refiner_switch_at", None)
    else:
        fields["refiner_checkpoint"] = re.sub(r" \[[0-9a-fA-F]+\]$", "", fields["refiner_checkpoint"])
        if fields.get("refiner_switch_at") is None:
            fields["refiner_switch_at"] = 0.8
    if img2img:
        fields.pop("enable_hr", None)
        if fields.get("denoising_strength") is None:
            fields["denoising_strength"] = 0.75
        if fields.get("image_cfg_scale") is None:
            fields.pop("image_cfg_scale", None)
        for name, table in (("resize_mode", RESIZE_MODES), ("inpainting_fill", INPAINTING_FILL)):
            v = fields[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(table):
                raise InvalidRequest(name, f"must be 0-{len(table) - 1} ({', '.join(f'{i} = {n}' for i, n in enumerate(table))}), got {v!r}")
            fields[name] = table[v]
        for name in ("inpaint_full_res", "inpainting_mask_invert"):
            if fields[name] not in (0, 1):
                raise InvalidRequest(name, f"must be 0 or 1, got {fields[name]!r}")
            fields[name] = bool(fields[name])
        if fields.get("mask_blur") is None:
            if data["mask_blur_x"] != data["mask_blur_y"]:
                raise InvalidRequest("mask_blur_x", "different horizontal and vertical mask blur is not supported; "
                                                    "give mask_blur")
            fields["mask_blur"] = data["mask_blur_x"]
    else:
        for name in ("resize_mode", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                     "inpainting_mask_invert"):
            fields.pop(name, None)
        if not fields.get("enable_hr"):
            for name in [n for n in fields if n.startswith("hr_")] + ["denoising_strength"]:
                fields.pop(name, None)
        else:
            if fields.get("denoising_strength") is None:
                fields.pop("denoising_strength")
            if fields.get("hr_upscaler") in (None, ""):
                fields.pop("hr_upscaler", None)
            for name in ("hr_prompt", "hr_negative_prompt", "hr_sampler_name"):
                if fields.get(name) in ("", None):
                    fields[name] = None
    return fields


FROM_REQUEST = {ours: a1111 for a1111, ours in TO_REQUEST.items()}


def a1111_error(exc: InvalidRequest) -> InvalidRequest:
    """The same error, naming the A1111 field (``sampler`` -> ``sampler_name``, ...)."""
    name = FROM_REQUEST.get(exc.field, exc.field)
    if name == exc.field:
        return exc
    message = str(exc).split(": ", 1)[-1]
    return InvalidRequest(name, message)


def schedule_label(name: str) -> str:
    """A1111 scheduler id ("karras", "sgm_uniform") or label ("SGM Uniform") -> our label."""
    for label in schedule_names():
        if name.casefold() in (label.casefold(), scheduler_id(label)):
            return label
    return name  # the request reports it as unknown, listing the valid ones


def scheduler_id(label: str) -> str:
    return label.lower().replace(" ", "_")


def a1111_answer(state, body, job, pngs: list[bytes], img2img: bool) -> dict:
    """A1111's answer to a finished txt2img/img2img job (the server's and the Ray ingress's):
    the pictures as base64 (unless ``send_images`` is off; img2img adds the init images when
    asked), the request echoed as ``parameters``, ``info`` as JSON; ``override_settings`` kept
    as options unless ``override_settings_restore_afterwards``."""
    if not body.override_settings_restore_afterwards and body.override_settings:
        state.set_options(body.override_settings)
    images = [base64.b64encode(p).decode() for p in pngs] if body.send_images else []
    if img2img and body.include_init_images and body.send_images:
        images += body.init_images
    echo = body.model_dump()
    if img2img:
        echo["init_images"], echo["mask"] = None, None
    return {"images": images, "parameters": echo, "info": json.dumps(a1111_info(job, echo))}


def a1111_info(job, body: dict) -> dict:
    """A1111's ``info`` object for a finished job."""
    req = GenerationRequest.model_validate(job.result["request"])
    images = job.result["images"]
    params = parse_infotext(images[0]["infotext"])[2] if images else {}
    n = len(images)
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n, "seed": req.seed, "all_seeds": [i["seed"] for i in images],
        "subseed": req.subseed, "all_subseeds": [i["subseed"] for i in images], "subseed_strength": req.subseed_strength,
        "width": req.width, "height": req.height, "sampler_name": req.sampler, "scheduler": req.schedule,
        "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "restore_faces": req.restore_faces,
        "face_restoration_model": None, "sd_model_name": params.get("Model", req.model),
        "sd_model_hash": params.get("Model hash"), "sd_vae_name": params.get("VAE"), "sd_vae_hash": params.get("VAE hash"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if (req.init_image or req.enable_hr) else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": [i["infotext"] for i in images],
        "styles": list(body.get("styles") or []), "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job.created)),
        "clip_skip": req.clip_skip, "is_using_inpainting_conditioning": False,
        "version": params.get("Version"), "interrupted": job.result.get("interrupted", False),
        "warnings": job.result.get("warnings", []), "job_id": job.id,
    }


def build_router(state) -> APIRouter:
    """The ``/sdapi/v1`` routes over one ServerState: generation, options, listings, Extras."""
    r = APIRouter(prefix="/sdapi/v1", tags=["A1111 compatible"])
    _generation_routes(r, state)
    option_routes(r, state)
    listing_routes(r, state)
    extras_routes(r, state)  # Extras, and the small listing and model routes
    return r


def decoded_inputs(body, fields: dict, img2img: bool, state) -> tuple[dict, object, object]:
    """The body's styles applied and every picture in it decoded (and bounded): the request
    fields with their IP-Adapter and ControlNet pictures, the init picture and the mask. The
    server stores pictures only once the request is accepted (``ServerState.submit``)."""
    fields = styled(fields, body.styles, state.settings.home)
    _, ip_images = ip_adapter_unit(body.alwayson_scripts or {})  # checked by request_fields
    if ip_images:
        fields["ip_adapter_image"] = tuple(decode_image(b, "alwayson_scripts", state.limits) for b in ip_images)
    units = controlnet_units(body.alwayson_scripts or {})
    if units:
        fields["controlnet"] = [
            {**u, "image": decode_image(img, f"alwayson_scripts.controlnet.args.{i}.image", state.limits)}
            for i, (u, img) in enumerate(units)]
    init = mask = None
    if img2img:
        if not body.init_images:
            raise InvalidRequest("init_images", "img2img needs one init image (base64)")
        if len(body.init_images) > 1:
            raise InvalidRequest("init_images", f"danqing takes one init image per request, got {len(body.init_images)}")
        init = decode_image(body.init_images[0], "init_images", state.limits)
        if body.mask:
            mask = decode_image(body.mask, "mask", state.limits)
    return fields, init, mask


def check_family(state, body, fields: dict, *, picture: bool) -> None:
    """A model of a family that runs beside the SD loop (DeepFloyd IF, Stable unCLIP, Kandinsky
    2.2; ``apps.families``), selected by ``override_settings`` or the options: what it does not
    take is one line (422) before the job is queued."""
    model = (body.override_settings or {}).get("sd_model_checkpoint") or state.options()["sd_model_checkpoint"]
    family = family_of(state.registry, model)
    if family is not None:
        try:
            check_fields(family, fields, picture=picture)
        except InvalidRequest as exc:
            raise a1111_error(exc) from None


def _generation_routes(r: APIRouter, state) -> None:
    """txt2img, img2img (through the job queue, waiting), png-info, progress, interrupt, skip."""

    def run(body: _Body, img2img: bool) -> dict:
        fields = request_fields(body, img2img=img2img)
        script = script_key(body.script_name)
        if script is None and body.script_args:
            raise InvalidRequest("script_args", "given without a script_name; leave it unset or []")
        fields, init, mask = decoded_inputs(body, fields, img2img, state)
        check_family(state, body, fields, picture=init is not None)
        if script is not None:
            try:
                return run_script(state, script, body, fields, img2img=img2img, init=init, mask=mask)
            except InvalidRequest as exc:
                raise a1111_error(exc) from None
        save = body.save_images and not body.do_not_save_samples
        try:
            job = state.submit(fields, source="a1111", save=save, init_image=init, mask=mask,
                               overrides=body.override_settings or None)
        except InvalidRequest as exc:
            raise a1111_error(exc) from None
        job = state.worker.wait(job.id, timeout=state.server.sync_timeout_s)
        if job.status != "done":
            raise job_error(job)
        pngs = state.worker.take_images(job.id)
        if pngs is None:  # saved: read the files back
            pngs = [place.read_bytes(i["path"]) for i in job.result["images"]]
        return a1111_answer(state, body, job, pngs, img2img)

    @r.post("/txt2img", summary="txt2img (A1111 fields)", responses=JOB_RESPONSES)
    def txt2img(body: Txt2ImgBody) -> dict:
        return run(body, img2img=False)

    @r.post("/img2img", summary="img2img and inpaint (A1111 fields)", responses=JOB_RESPONSES)
    def img2img(body: Img2ImgBody) -> dict:
        return run(body, img2img=True)

    @r.post("/png-info")
    def png_info(body: PngInfoBody) -> dict:
        img = decode_image(body.image, "image", state.limits)
        text = infotext_of_image(img)
        if not text:
            return {"info": "", "items": {}, "parameters": {}}
        prompt, negative, params = parse_infotext(text)
        return {"info": text, "items": {"parameters": text},
                "parameters": {"Prompt": prompt, "Negative prompt": negative, **params}}

    @r.get("/progress")
    def progress(skip_current_image: bool = Query(False)) -> dict:
        p = state.worker.progress()
        queued = state.store.count("queued")
        running = p["job_id"] is not None
        return {
            "progress": p["fraction"], "eta_relative": p["eta"],
            "state": {"skipped": p["skipped"], "interrupted": p["interrupted"], "job": p["job_id"] or "",
                      "job_count": queued + int(running), "job_timestamp": "", "job_no": 0,
                      "sampling_step": p["step"], "sampling_steps": p["total"]},
            "current_image": base64.b64encode(p["preview_png"]).decode() if p["preview_png"] and not skip_current_image else None,
            "textinfo": f"step {p['step']}/{p['total']}, batch {p['batch_index'] + 1}/{p['batch_count']}" if running else None,
            "current_task": p["job_id"],
        }

    @r.post("/interrupt")
    def interrupt() -> dict:
        return {"interrupted": state.worker.interrupt()}

    @r.post("/skip")
    def skip() -> dict:
        return {"skipped": state.worker.skip()}



def option_routes(r: APIRouter, state) -> None:
    """Add A1111's ``GET``/``POST /options`` (the server options, A1111 names, kept in the job
    store) and ``GET /cmd-flags`` to ``r``; ``state`` is a ``ServerState``. Used by
    ``build_router`` and the Ray Serve ingress (``danqing.scale.serving``)."""
    @r.get("/options")
    def get_options() -> dict:
        opts = state.options()
        model = opts["sd_model_checkpoint"]
        title = model
        try:
            entry = state.registry.find("checkpoint", model)
            if not entry.is_builtin:
                title = f"{model} [{state.registry.short_hash(entry)}]"
        except Exception:  # noqa: BLE001 -- a model removed from disk: show the name
            pass
        return {**opts, "sd_model_checkpoint": title, "sd_checkpoint_hash": title.rsplit("[", 1)[-1].rstrip("]") if "[" in title else None,
                "samples_format": "png", "outdir_txt2img_samples": str(state.settings.outputs_dir / "txt2img-images"),
                "outdir_img2img_samples": str(state.settings.outputs_dir / "img2img-images")}

    @r.post("/options")
    def set_options(values: dict[str, Any]) -> dict:
        read_only = {"sd_checkpoint_hash", "samples_format", "outdir_txt2img_samples", "outdir_img2img_samples"}
        current = get_options()
        for k in read_only & set(values):
            if values[k] != current[k]:
                raise InvalidRequest(k, "read-only option")
        settable = {k: v for k, v in values.items() if k not in read_only}
        if settable.get("sd_model_checkpoint") == current["sd_model_checkpoint"]:
            settable.pop("sd_model_checkpoint")
        state.set_options(settable)
        return {}

    @r.get("/cmd-flags")
    def cmd_flags() -> dict:
        return {"listen": not state.server.is_local, "port": state.server.port, "api_auth": None,
                "ckpt_dir": str(state.registry.folder("checkpoint"))}



def family_label(entry) -> str | None:
    """The family ``danqing models`` shows for a checkpoint (None when it cannot be told)."""
    try:
        return describe_checkpoint(entry)
    except Exception:  # noqa: BLE001 -- a broken file is listed, without a family
        return None


def listing_routes(r: APIRouter, state) -> None:
    """Add A1111's listing routes to ``r``: what is installed (models, VAEs, samplers, upscalers,
    LoRAs, embeddings) and memory; ``state`` is a ``ServerState`` (its registry names them).
    Used by ``build_router`` and the Ray Serve ingress."""
    @r.get("/sd-models")
    def sd_models() -> list[dict]:
        out = []
        for e in state.registry.scan("checkpoint"):
            sha = None if e.is_builtin else state.registry.sha256(e)
            title = f"{e.name} [{sha[:10]}]" if sha else e.name
            out.append({"title": title, "model_name": e.name, "hash": sha[:10] if sha else None, "sha256": sha,
                        "filename": str(e.path) if e.path else e.name, "config": None, "family": family_label(e)})
        return out

    @r.get("/sd-vae")
    def sd_vae() -> list[dict]:
        return [{"model_name": e.name, "filename": str(e.path)} for e in state.registry.scan("vae")]

    @r.get("/samplers")
    def samplers() -> list[dict]:
        return [{"name": n, "aliases": [], "options": {"scheduler": scheduler_id(s.default_schedule)}}
                for n, s in sampler_table().items()]

    @r.get("/schedulers")
    def schedulers() -> list[dict]:
            return [{"name": scheduler_id(n), "label": n, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n in schedule_names()]

    @r.get("/upscalers")
    def upscalers() -> list[dict]:
        files = find_files(state.settings.models_dir, UPSCALER_FOLDERS, names_only=True)
        return [{"name": n, "model_name": None if n in BUILTIN else n,
                 "model_path": None if n in BUILTIN else str(files[n]), "model_url": None, "scale": 4.0}
                for n in state.worker.studio.upscalers.names()]

    @r.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict]:
        return [{"name": n} for n in LATENT_UPSCALERS]

    @r.get("/loras")
    def loras() -> list[dict]:
        return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}}
                for e in state.registry.scan("lora")]

    @r.get("/embeddings")
    def embeddings() -> dict:
        # A1111's shape: readable files under "loaded" (shape = vector width, summed over SDXL's
        # two encoders), unreadable ones under "skipped" with the reason (danqing's "error").
        listing = state.worker.studio.embeddings.listing()
        return {"loaded": {n: v for n, v in listing.items() if "error" not in v},
                "skipped": {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                "vectors": None, **v} for n, v in listing.items() if "error" in v}}

    @r.get("/prompt-styles")
    def prompt_styles() -> list[dict]:
        return style_listing(state.settings.home)

    @r.get("/scripts")
    def scripts() -> dict:
        return {"txt2img": list(SCRIPTS), "img2img": list(SCRIPTS)}

    @r.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        return None  # the registry scans the folder on every listing

    @r.post("/refresh-vae")
    def refresh_vae() -> None:
        return None

    @r.get("/memory")
    def memory() -> dict:
        return memory_report(state)
