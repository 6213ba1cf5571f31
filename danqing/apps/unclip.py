"""Running the unCLIP families for a user: Stable unCLIP variations, Kandinsky 2.2 text-to-image
and variations (``danqing generate`` / ``danqing variations`` with ``--model FOLDER``).

The family comes from the folder's ``model_index.json`` (``models.unclip_models``); the options
each family takes are in ``FAMILY_OPTIONS`` (a table), anything else is refused in one line.
Pictures are written as PNGs with an A1111-style infotext (``Family``, ``Noise level``,
``Prior steps``, ``Prior CFG scale``, ``Variation source``), never over an existing file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from danqing.errors import InvalidRequest
from danqing.models.registry import Registry
from danqing.models.unclip_models import (load_kandinsky_decoder, load_kandinsky_prior, load_unclip_folder,
                                          unclip_kind_of_folder)
from danqing.outputs.infotext import format_infotext
from danqing.outputs.store import next_output_path, save_png
from danqing.request import MAX_SEED
from danqing.sampling.kandinsky import KANDINSKY_DEFAULTS, run_kandinsky
from danqing.sampling.unclip import UNCLIP_DEFAULTS, run_unclip

# family -> (options it takes beyond prompt, negative prompt, steps, CFG, seed, size, batch size;
#            whether it needs a picture; the option that names a second folder)
FAMILY_OPTIONS = {
    "unclip": {"takes": ("noise_level", "sampler", "schedule"), "needs_picture": True},
    "kandinsky-decoder": {"takes": ("prior", "prior_steps", "prior_cfg_scale"), "needs_picture": False},
}
OPTION_NAMES = {"noise_level": "--noise-level", "sampler": "--sampler", "schedule": "--schedule",
                "prior": "--prior", "prior_steps": "--prior-steps", "prior_cfg_scale": "--prior-cfg"}


def unclip_family(models_dir: Path, model: str | None) -> str | None:
    """The unCLIP family of the checkpoint ``model`` names ("unclip", "kandinsky-decoder",
    "kandinsky-prior"), or None for any other model (or none named)."""
    if not model:
        return None
    try:
        entry = Registry(models_dir).find("checkpoint", model)
    except Exception:  # not found here: the ordinary path reports it in its own words
        return None
    return unclip_kind_of_folder(entry.path) if entry.format == "diffusers" else None


@dataclass
class UnclipOptions:
    """The family options of one run (None = not given: the family's default)."""

    picture: Path | None = None
    noise_level: int | None = None
    prior: str | None = None
    prior_steps: int | None = None
    prior_cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None


def check_options(family: str, options: UnclipOptions) -> None:
    """One line for an option the family does not take, or a picture it needs."""
    if family == "kandinsky-prior":
        raise InvalidRequest("model", "a Kandinsky 2.2 prior folder: give the decoder folder as --model and this one "
                                      "as --prior")
    table = FAMILY_OPTIONS[family]
    for name, flag in OPTION_NAMES.items():
        if getattr(options, name) is not None and name not in table["takes"]:
            allowed = ", ".join(OPTION_NAMES[n] for n in table["takes"])
            raise InvalidRequest(name, f"{flag} is not an option of the {family} family (it takes {allowed})")
    if table["needs_picture"] and options.picture is None:
        raise InvalidRequest("model", f"the {family} family makes variations of a picture: "
                                      "run danqing variations IMAGE --model ...")
    if family == "kandinsky-decoder" and options.prior is None and options.picture is None:
        raise InvalidRequest("prior", "Kandinsky 2.2 text-to-image needs its prior folder: --prior FOLDER")
    if options.noise_level is not None and not 0 <= options.noise_level <= 999:
        raise InvalidRequest("noise_level", "must be between 0 and 999")


REQUEST_FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "batch_size", "model")


def check_request(family: str, request) -> None:
    """One line for a request field (hires fix, img2img, LoRA, ...) the family does not take."""
    from danqing.request import GenerationRequest

    takes = set(REQUEST_FIELDS) | set(FAMILY_OPTIONS.get(family, {}).get("takes", ()))
    default = GenerationRequest().model_dump()
    for name, value in request.model_dump().items():
        if name not in takes and value != default.get(name):
            raise InvalidRequest(name, f"not an option of the {family} family (it takes prompt, negative prompt, "
                                       "steps, CFG scale, seed, size, batch size"
                                       + "".join(f", {OPTION_NAMES[t]}" for t in FAMILY_OPTIONS[family]["takes"]) + ")")


def run_unclip_family(models_dir: Path, family: str, request, options: UnclipOptions, *, out_dir: Path | None = None,
                      files: list[Path] | None = None, on_step=None) -> list[tuple[Path, int]]:
    """Run the request with an unCLIP-family model; write its pictures to ``files`` (names given)
    or as ``NNNNN-SEED.png`` into ``out_dir``. Returns (path, seed) per picture."""
    check_options(family, options)
    check_request(family, request)
    if request.seed == -1:
        request = request.replace(seed=random.randint(0, MAX_SEED - request.batch_size))
    registry = Registry(models_dir)
    model_entry = registry.find("checkpoint", request.model)
    picture = Image.open(options.picture).convert("RGB") if options.picture is not None else None
    params = {"Steps": request.steps}
    if family == "unclip":
        if options.sampler or options.schedule:
            request = request.replace(**{k: v for k, v in (("sampler", options.sampler), ("schedule", options.schedule)) if v})
        level = UNCLIP_DEFAULTS["noise_level"] if options.noise_level is None else options.noise_level
        result = run_unclip(load_unclip_folder(model_entry.path), picture, request, noise_level=level, on_step=on_step)
        params.update({"Sampler": request.sampler, "Schedule type": request.schedule, "Noise level": level})
    else:
        prior_path = registry.find("checkpoint", options.prior).path if options.prior else None
        if prior_path is not None and unclip_kind_of_folder(prior_path) != "kandinsky-prior":
            raise InvalidRequest("prior", f"{options.prior}: not a Kandinsky 2.2 prior folder")
        if prior_path is None:
            raise InvalidRequest("prior", "Kandinsky 2.2 variations need the prior folder (its image encoder): --prior FOLDER")
        steps = options.prior_steps or KANDINSKY_DEFAULTS["prior_steps"]
        cfg = KANDINSKY_DEFAULTS["prior_cfg_scale"] if options.prior_cfg_scale is None else options.prior_cfg_scale
        result = run_kandinsky(load_kandinsky_prior(prior_path), load_kandinsky_decoder(model_entry.path), request,
                               picture=picture, prior_steps=steps, prior_cfg_scale=cfg, on_step=on_step)
        if picture is None:
            params.update({"Prior steps": steps, "Prior CFG scale": cfg, "Prior": Path(prior_path).name})
        else:
            params["Prior"] = Path(prior_path).name
    params.update({"CFG scale": request.cfg_scale, "Seed": None, "Size": f"{request.width}x{request.height}",
                   "Model": model_entry.name, "Family": family,
                   "Variation source": options.picture.name if options.picture is not None else None})
    written = []
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        text = format_infotext(request.prompt, request.negative_prompt, {**params, "Seed": seed})
        path = files[i] if files is not None else next_output_path(out_dir, seed)
        written.append((save_png(image, path, text), seed))
    return written
