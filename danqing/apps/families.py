"""The families that run beside the Studio's SD loop: DeepFloyd IF (a pixel cascade), Stable
unCLIP and Kandinsky 2.2 (image variations), for ``danqing generate`` / ``danqing variations``,
the A1111 API and the web UI.

The family comes from the folder's ``model_index.json`` (``family_of``); the options each family
takes are in ``FAMILY_OPTIONS`` (a table), anything else is refused in one line. Pictures carry an
A1111-style infotext: the request's keys, ``Family`` and the family's own keys (``OPTION_KEYS``:
``Noise level``, ``Prior``, ``Prior steps``, ``Prior CFG scale``, ``Variation source``,
``Stage II``, ``Stage II steps``, ``Stage II CFG scale``, ``Postprocess upscaler``), always with
the values used, so that ``generate --from`` (``options_from_params``) re-creates the picture.

The second folder of a two-folder family (Kandinsky 2.2's prior, IF's stage II) is named by an
option (``--prior``, ``--stage2``); where a request cannot name it (the A1111 API, the UI) it is
the only folder of that kind installed (``partner``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from danqing.editing.upscale import upscale_image
from danqing.errors import InvalidRequest
from danqing.models.cascade_models import if_kind_of_folder, load_if_folder
from danqing.models.unclip_models import (load_kandinsky_decoder, load_kandinsky_prior, load_unclip_folder,
                                          unclip_kind_of_folder)
from danqing.outputs.infotext import format_infotext
from danqing.outputs.store import next_output_path, save_png
from danqing.request import MAX_SEED, GenerationRequest
from danqing.sampling.cascade import IF_DEFAULTS, run_if
from danqing.sampling.kandinsky import KANDINSKY_DEFAULTS, run_kandinsky
from danqing.sampling.unclip import UNCLIP_DEFAULTS, run_unclip
from danqing.studio import GenerationResult

# family -> (options it takes beyond prompt, negative prompt, steps, CFG, seed, size, batch size;
#            whether it needs a picture; whether a picture makes variations)
FAMILY_OPTIONS = {
    "unclip": {"takes": ("noise_level", "sampler", "schedule", "prior", "prior_steps", "prior_cfg_scale"),
               "needs_picture": True, "picture": True},  # --prior instead of a picture: text-to-image
    "kandinsky-decoder": {"takes": ("prior", "prior_steps", "prior_cfg_scale"), "needs_picture": False,
                          "picture": True},
    "if-i": {"takes": ("stage_2", "stage_2_steps", "stage_2_cfg_scale", "noise_level", "upscaler"),
             "needs_picture": False, "picture": False},
}
# the second folder of a family, never run as --model: kind -> (the --model kind, its option)
PARTNERS = {"kandinsky-prior": ("kandinsky-decoder", "prior"), "if-ii": ("if-i", "stage_2")}
OPTION_NAMES = {"noise_level": "--noise-level", "sampler": "--sampler", "schedule": "--schedule",
                "prior": "--prior", "prior_steps": "--prior-steps", "prior_cfg_scale": "--prior-cfg",
                "stage_2": "--stage2", "stage_2_steps": "--stage2-steps", "stage_2_cfg_scale": "--stage2-cfg",
                "upscaler": "--upscaler"}
# option -> (infotext key, how it is read back)
OPTION_KEYS = {"noise_level": ("Noise level", int), "prior": ("Prior", str), "prior_steps": ("Prior steps", int),
               "prior_cfg_scale": ("Prior CFG scale", float), "picture": ("Variation source", str),
               "stage_2": ("Stage II", str), "stage_2_steps": ("Stage II steps", int),
               "stage_2_cfg_scale": ("Stage II CFG scale", float), "upscaler": ("Postprocess upscaler", str)}
UPSCALE_BY = 4  # IF's last step: stage II's 256x256 -> 1024x1024, as its released third stage
# request fields that matter only when another one is set (left out of the family check otherwise)
WHEN = {**{f"hr_{k}": "enable_hr" for k in ("scale", "upscaler", "second_pass_steps", "resize_x", "resize_y",
                                              "sampler_name", "prompt", "negative_prompt")},
        **{k: "init_image" for k in ("denoising_strength", "resize_mode", "image_cfg_scale")},
        **{k: "mask" for k in ("mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                               "inpainting_mask_invert")},
        **{k: "p2p_source" for k in ("p2p_cross", "p2p_self", "p2p_reweight", "p2p_local_blend", "p2p_features",
                                     "null_text_iterations")},
        **{k: "ip_adapter_image" for k in ("ip_adapter", "ip_adapter_weight", "ip_adapter_encoder")},
        "refiner_switch_at": "refiner_checkpoint", "face_restoration_model": "restore_faces",
        "subseed": "subseed_strength"}
REQUEST_FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "batch_size", "model",
                  "rng")
TAKES_TEXT = "prompt, negative prompt, steps, CFG scale, seed, size, batch size"


def family_of(registry, model: str | None) -> str | None:
    """The family of the checkpoint ``model`` names when it runs here ("unclip",
    "kandinsky-decoder", "kandinsky-prior", "if-i", "if-ii"), else None (any other model, or none
    named)."""
    if not model:
        return None
    try:
        entry = registry.find("checkpoint", model)
    except Exception:  # not found here: the ordinary path reports it in its own words
        return None
    if entry.format != "diffusers":
        return None
    return unclip_kind_of_folder(entry.path) or if_kind_of_folder(entry.path)


@dataclass(frozen=True)
class FamilyOptions:
    """The family options of one run (None = not given: the family's default).

    Attributes:
        picture: the picture to make variations of (a path).
        noise_level: Stable unCLIP: noise on the picture's embedding; IF: on the stage-I picture.
        prior, prior_steps, prior_cfg_scale: Kandinsky 2.2's prior folder and its sampling.
        stage_2, stage_2_steps, stage_2_cfg_scale: DeepFloyd IF's stage-II folder and its sampling.
        upscaler: DeepFloyd IF: a last 4x upscale by this upscaler (Lanczos, a model upscaler).
        sampler, schedule: Stable unCLIP (``danqing variations``).
    """

    picture: str | None = None
    noise_level: int | None = None
    prior: str | None = None
    prior_steps: int | None = None
    prior_cfg_scale: float | None = None
    stage_2: str | None = None
    stage_2_steps: int | None = None
    stage_2_cfg_scale: float | None = None
    upscaler: str | None = None
    sampler: str | None = None
    schedule: str | None = None

    def given(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def over(self, base: "FamilyOptions") -> "FamilyOptions":
        """These options where given, ``base``'s elsewhere (``--from``: the command line over the file's)."""
        return dataclasses.replace(base, **self.given())


def options_from_params(params: dict) -> FamilyOptions:
    """The family options an infotext's parameters hold (the inverse of what ``run_family`` writes)."""
    found = {}
    for name, (key, read) in OPTION_KEYS.items():
        if params.get(key):
            try:
                found[name] = read(params[key])
            except ValueError:
                raise InvalidRequest(name, f"the infotext's {key} {params[key]!r} is not a {read.__name__}") from None
    return FamilyOptions(**found)


def check_options(family: str, options: FamilyOptions) -> None:
    """One line for an option the family does not take, or a picture it needs."""
    if family in PARTNERS:
        what, model = {"kandinsky-prior": ("a Kandinsky 2.2 prior", "the decoder"),
                       "if-ii": ("a DeepFloyd IF stage-II", "the stage-I")}[family]
        raise InvalidRequest("model", f"{what} folder: give {model} folder as --model and this one as "
                                      f"{OPTION_NAMES[PARTNERS[family][1]]}")
    table = FAMILY_OPTIONS[family]
    for name, flag in OPTION_NAMES.items():
        if getattr(options, name) is not None and name not in table["takes"]:
            allowed = ", ".join(OPTION_NAMES[n] for n in table["takes"])
            raise InvalidRequest(name, f"{flag} is not an option of the {family} family (it takes {allowed})")
    if options.picture is not None and not table["picture"]:
        raise InvalidRequest("init_image", f"the {family} family makes pictures from text only: give no picture")
    if family == "unclip" and options.picture is None and options.prior is None and (
            options.prior_steps is not None or options.prior_cfg_scale is not None):
        raise InvalidRequest("prior", "--prior-steps and --prior-cfg are the prior's: name its folder with --prior")
    if table["needs_picture"] and options.picture is None and options.prior is None:
        raise InvalidRequest("model", f"the {family} family makes variations of a picture: "
                                      "run danqing variations IMAGE --model ... (the API: img2img with the picture), "
                                      "or text-to-image with an unCLIP prior folder: --prior FOLDER")
    if family == "unclip" and options.picture is not None:
        for name in ("prior", "prior_steps", "prior_cfg_scale"):
            if getattr(options, name) is not None:
                raise InvalidRequest(name, f"{OPTION_NAMES[name]} is not an option of the unclip family's variations "
                                           "(the picture's own embedding is used; a prior serves text-to-image: "
                                           "danqing generate PROMPT --model ... --prior FOLDER)")
    if options.noise_level is not None and not 0 <= options.noise_level <= 999:
        raise InvalidRequest("noise_level", "must be between 0 and 999")
    for name in ("prior_steps", "stage_2_steps"):
        if getattr(options, name) is not None and not 1 <= getattr(options, name) <= 150:
            raise InvalidRequest(name, "must be between 1 and 150")
    for name in ("prior_cfg_scale", "stage_2_cfg_scale"):
        if getattr(options, name) is not None and not 1.0 <= getattr(options, name) <= 30.0:
            raise InvalidRequest(name, "must be between 1 and 30")


def check_request(family: str, request) -> None:
    """One line for a request field (hires fix, clip skip, a VAE, ...) the family does not take;
    fields that only matter beside another (``WHEN``) count only when that one is set."""
    takes = set(REQUEST_FIELDS) | set(FAMILY_OPTIONS.get(family, {}).get("takes", ()))
    default = GenerationRequest().model_dump()
    values = request.model_dump()
    for name, value in values.items():
        switch = WHEN.get(name)
        if switch is not None and values[switch] == default[switch]:
            continue
        if name not in takes and value != default.get(name):
            raise InvalidRequest(name, f"not an option of the {family} family (it takes {TAKES_TEXT}"
                                       + "".join(f", {OPTION_NAMES[t]}" for t in FAMILY_OPTIONS[family]["takes"]) + ")")


# families that sample with their folders' own schedulers: a server request's sampler is not read
# (A1111 clients always send one); on the command line it is refused as any option not taken
OWN_SCHEDULERS = ("kandinsky-decoder", "if-i")


def server_request(family: str, request):
    """A server's request for ``family``: the sampler and schedule of the families that use their
    folders' own schedulers set aside (``OWN_SCHEDULERS``)."""
    if family in OWN_SCHEDULERS:
        default = GenerationRequest()
        return request.replace(sampler=default.sampler, schedule=default.schedule)
    return request


def check_fields(family: str, fields: dict, *, picture: bool) -> None:
    """The checks of ``run_request`` on a server's request fields, before the job is queued."""
    check_options(family, FamilyOptions(picture="(upload)" if picture else None))
    for name in ("controlnet", "ip_adapter_image", "mask"):
        if fields.get(name):
            raise InvalidRequest(name, f"not an option of the {family} family (it takes {TAKES_TEXT})")
    plain = {k: v for k, v in fields.items() if k not in ("controlnet", "ip_adapter_image", "init_image", "mask")}
    check_request(family, server_request(family, GenerationRequest.create(**plain)))


def partner(registry, kind: str, option: str) -> str | None:
    """The name of the only checkpoint folder of ``kind`` ("kandinsky-prior", "if-ii"), None when
    there is none; several are one line (name it)."""
    found = [e.name for e in registry.scan("checkpoint")
             if e.format == "diffusers" and (unclip_kind_of_folder(e.path) or if_kind_of_folder(e.path)) == kind]
    if len(found) > 1:
        raise InvalidRequest(option, f"several {kind} folders are installed ({', '.join(found)}); name one "
                                     f"({OPTION_NAMES[option]})")
    return found[0] if found else None


def _entry(studio, name: str, kind: str, option: str):
    entry = studio.registry.find("checkpoint", name)
    if entry.format != "diffusers" or (unclip_kind_of_folder(entry.path) or if_kind_of_folder(entry.path)) != kind:
        raise InvalidRequest(option, f"{name}: not a {kind} folder (`danqing models` shows each folder's family)")
    return entry


def _unclip(studio, entry, request, options, picture, on_step):
    if options.sampler or options.schedule:
        request = request.replace(**{k: v for k, v in (("sampler", options.sampler), ("schedule", options.schedule)) if v})
    level = UNCLIP_DEFAULTS["noise_level"] if options.noise_level is None else options.noise_level
    model = studio.models.load_folder(load_unclip_folder, entry.path,  # the normaliser stays: run_unclip
                                      lambda m: [*m.components.modules().values(), m.image_encoder])
    params = {"Sampler": request.sampler, "Schedule type": request.schedule, "Noise level": level}
    prior = steps = cfg = None
    if picture is None and options.prior is not None:  # text -> prior -> decoder (DALL-E 2)
        prior_entry = _entry(studio, options.prior, "kandinsky-prior", "prior")
        steps = options.prior_steps or KANDINSKY_DEFAULTS["prior_steps"]
        cfg = KANDINSKY_DEFAULTS["prior_cfg_scale"] if options.prior_cfg_scale is None else options.prior_cfg_scale
        prior = studio.models.load_folder(load_kandinsky_prior, prior_entry.path,
                                          lambda p: [p.prior, p.text_encoder, p.image_encoder])
        params.update({"Prior steps": steps, "Prior CFG scale": cfg, "Prior": prior_entry.name})
    result = run_unclip(model, picture, request, noise_level=level, on_step=on_step, device=studio.models.device,
                        prior=prior, prior_steps=steps, prior_cfg_scale=cfg)
    return request, result, params


def _kandinsky(studio, entry, request, options, picture, on_step):
    if options.prior is None:
        raise InvalidRequest("prior", "Kandinsky 2.2 needs its prior folder (for variations: its image encoder): "
                                      "--prior FOLDER")
    prior_entry = _entry(studio, options.prior, "kandinsky-prior", "prior")
    steps = options.prior_steps or KANDINSKY_DEFAULTS["prior_steps"]
    cfg = KANDINSKY_DEFAULTS["prior_cfg_scale"] if options.prior_cfg_scale is None else options.prior_cfg_scale
    prior = studio.models.load_folder(load_kandinsky_prior, prior_entry.path,
                                      lambda p: [p.prior, p.text_encoder, p.image_encoder])
    decoder = studio.models.load_folder(load_kandinsky_decoder, entry.path, lambda d: [d.unet, d.movq])
    result = run_kandinsky(prior, decoder, request, picture=picture, prior_steps=steps, prior_cfg_scale=cfg,
                           on_step=on_step, device=studio.models.device)
    params = {"Prior": prior_entry.name} if picture is not None else {"Prior steps": steps, "Prior CFG scale": cfg,
                                                                         "Prior": prior_entry.name}
    return request, result, params


def _if(studio, entry, request, options, picture, on_step):
    if options.upscaler is not None:
        studio.upscalers.check(options.upscaler)
    stage_1 = studio.models.load_folder(load_if_folder, entry.path, lambda s: [s.unet, s.text_encoder])
    stage_2 = stage_2_entry = None
    if options.stage_2 is not None:
        stage_2_entry = _entry(studio, options.stage_2, "if-ii", "stage_2")
        stage_2 = studio.models.load_folder(load_if_folder, stage_2_entry.path, lambda s: [s.unet, s.text_encoder])
    elif any(v is not None for v in (options.stage_2_steps, options.stage_2_cfg_scale, options.noise_level)):
        raise InvalidRequest("stage_2", "--stage2-steps, --stage2-cfg and --noise-level are stage II's: name its "
                                        "folder with --stage2")
    steps = options.stage_2_steps or IF_DEFAULTS["upscale_steps"]
    cfg = IF_DEFAULTS["upscale_cfg_scale"] if options.stage_2_cfg_scale is None else options.stage_2_cfg_scale
    level = IF_DEFAULTS["noise_level"] if options.noise_level is None else options.noise_level
    result = run_if(stage_1, request, stage_2=stage_2, upscale_steps=steps, upscale_cfg_scale=cfg, noise_level=level,
                    on_step=on_step, device=studio.models.device)
    params = {}
    if stage_2 is not None:
        params = {"Stage II": stage_2_entry.name, "Stage II steps": steps, "Stage II CFG scale": cfg,
                  "Noise level": level}
    if options.upscaler is not None:
        result.images = [upscale_image(im, im.width * UPSCALE_BY, im.height * UPSCALE_BY, options.upscaler,
                                       studio.upscalers) for im in result.images]
        params.update({"Postprocess upscaler": options.upscaler, "Postprocess upscale by": UPSCALE_BY})
    return request, result, params


RUNNERS = {"unclip": _unclip, "kandinsky-decoder": _kandinsky, "if-i": _if}


def run_family(studio, family: str, request, options: FamilyOptions = FamilyOptions(), *,
               on_step=None) -> GenerationResult:
    """Run ``request`` with a model of ``family`` (``family_of``); its pictures with their
    infotexts, as ``Studio.generate`` returns them (nothing is written).

    A picture to make variations of is ``options.picture`` or the request's ``init_image`` (the
    A1111 img2img route). Seeds: picture i uses seed + i.
    """
    t0 = time.perf_counter()
    if request.init_image is not None and options.picture is None:
        options = dataclasses.replace(options, picture=request.init_image)
        request = request.replace(init_image=None)
    check_options(family, options)
    check_request(family, request)
    changes = {}
    if request.seed == -1:
        changes["seed"] = random.randint(0, MAX_SEED - request.batch_size)
    if request.subseed == -1:
        changes["subseed"] = random.randint(0, MAX_SEED - request.batch_size)
    request = request.replace(**changes) if changes else request
    entry = studio.registry.find("checkpoint", request.model)
    picture = Image.open(options.picture).convert("RGB") if options.picture is not None else None
    request, result, family_params = RUNNERS[family](studio, entry, request, options, picture, on_step)
    params = {"Steps": request.steps, **family_params, "CFG scale": request.cfg_scale, "Seed": None,
              "Size": f"{request.width}x{request.height}", "Model": entry.name, "Family": family,
              "Variation source": str(Path(options.picture).resolve()) if options.picture is not None else None,
              "RNG": "CPU" if request.rng == "cpu" else None}
    texts = [format_infotext(request.prompt, request.negative_prompt, {**params, "Seed": seed})
             for seed in result.seeds]
    return GenerationResult(result.images, list(result.seeds), [request.subseed + i for i in range(len(result.seeds))],
                            texts, request, timings={"total": time.perf_counter() - t0},
                            interrupted=bool(result.interrupted))


def run_request(studio, request, *, on_step=None) -> GenerationResult | None:
    """A server's request (the A1111 API, the UI, the job API) when its model is of a family that
    runs here, with the second folder the only one installed (``partner``); None for other models."""
    family = family_of(studio.registry, request.model)
    if family is None:
        return None
    options = FamilyOptions()
    if family in ("kandinsky-decoder", "if-i"):
        kind, option = next((k, o) for k, (m, o) in PARTNERS.items() if m == family)
        options = FamilyOptions(**{option: partner(studio.registry, kind, option)})
    return run_family(studio, family, server_request(family, request), options, on_step=on_step)


def write_family_pictures(result: GenerationResult, *, out_dir: Path | None = None,
                          files: list[Path] | None = None) -> list[tuple[Path, int]]:
    """Write ``run_family``'s pictures to ``files`` (names given) or as ``NNNNN-SEED.png`` into
    ``out_dir``, never over an existing file. Returns (path, seed) per picture."""
    written = []
    for i, (image, seed, text) in enumerate(zip(result.images, result.seeds, result.infotexts)):
        path = files[i] if files is not None else next_output_path(out_dir, seed)
        written.append((save_png(image, path, text), seed))
    return written
