"""Editing commands: ``img2img``, ``inpaint``, ``outpaint``, ``upscale`` and ``edit p2p``
(docs/editing.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import (OUT_HELP, OutTarget, announce_device, app, control_units, dated, make_studio,
                                new_picture_path, out_target, pictures_of, run_generate)
from danqing.errors import InvalidRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def edit_request(prompt, negative, init: Path, *, width, height, steps, sampler, cfg, seed, strength, model,
                 batch_size, extra: dict):
    """A request for an editing command; width/height default to the init image's size (rounded
    down to a multiple of 8)."""
    from danqing.editing.images import load_image  # lazy: the request module imports torch
    from danqing.request import GenerationRequest

    img = load_image(init, "init_image")
    fields = {
        "prompt": prompt, "negative_prompt": negative or "", "init_image": str(init.resolve()),
        "width": width or max(64, img.width // 8 * 8), "height": height or max(64, img.height // 8 * 8),
        "steps": steps, "sampler": sampler, "cfg_scale": cfg, "seed": seed, "denoising_strength": strength,
        "model": model, "batch_size": batch_size, **extra,
    }
    return GenerationRequest.create(**{k: v for k, v in fields.items() if v is not None})


def images_in(path: Path) -> list[Path]:
    """``path``, or the pictures of the folder ``path`` in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidRequest("init_image", f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return files
    return [path]


def run_all(settings, requests: list, target: OutTarget, quiet: bool) -> None:
    """Run several requests into one target; a file target numbers their pictures in order, and
    every planned name is checked before the first request runs."""
    counts = [pictures_of(r) for r in requests]
    target.check_free(sum(counts))
    studio = make_studio(settings) if len(requests) > 1 else None
    start = 0
    for request, n in zip(requests, counts):
        run_generate(settings, request, target, quiet, start=start, studio=studio)
        start += n


_PROMPT = typer.Argument(..., help="Prompt in A1111 syntax.")
_NEG = typer.Option("", "--negative", "-n", help="Negative prompt [default: none].")
_W = typer.Option(None, help="Width, multiple of 8 [default: the init image's].")
_H = typer.Option(None, help="Height, multiple of 8 [default: the init image's].")
_STEPS = typer.Option(None, help="Sampling steps [default: 20].")
_SAMPLER = typer.Option(None, help="A1111 sampler name [default: DPM++ 2M].")
_CFG = typer.Option(None, help="CFG scale [default: 7].")
_SEED = typer.Option(None, help="Seed; -1 = random [default: -1].")
_MODEL = typer.Option(None, help="Checkpoint [default: the settings' default model].")
_BATCH = typer.Option(None, help="Images per init image [default: 1].")
_OUT = typer.Option(None, metavar="PATH", help=OUT_HELP.format("outputs/img2img-images/DATE/"))
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
_CONTROL = typer.Option([], "--control", help="ControlNet unit TYPE:IMAGE[:WEIGHT] (repeatable); TYPE is canny, lineart, ... or a ControlNet name [default: none].")
_CONTROL_PRE = typer.Option(False, "--control-preprocess", help="Run each --control type's preprocessor on its IMAGE first.")


@app.command()
def img2img(
    ctx: typer.Context,
    init: Path = typer.Argument(..., help="Init image, or a folder of images (each is processed)."),
    prompt: str = _PROMPT, negative: str = _NEG,
    strength: Optional[float] = typer.Option(None, "--strength", "--denoise", help="Denoising strength 0-1 [default: 0.75]."),
    resize_mode: Optional[str] = typer.Option(None, help="just resize, crop and resize, resize and fill, latent upscale [default: just resize]."),
    image_cfg: Optional[float] = typer.Option(None, "--image-cfg", help="instruct-pix2pix models: Image CFG scale [default: 1.5]."),
    width: Optional[int] = _W, height: Optional[int] = _H, steps: Optional[int] = _STEPS,
    sampler: Optional[str] = _SAMPLER, cfg: Optional[float] = _CFG, seed: Optional[int] = _SEED,
    model: Optional[str] = _MODEL, batch_size: Optional[int] = _BATCH, out: Optional[str] = _OUT, quiet: bool = _QUIET,
    control: list[str] = _CONTROL, control_preprocess: bool = _CONTROL_PRE,
):
    """Repaint a picture (or every picture of a folder) following a prompt: the picture is noised
    to --strength and denoised again. With an instruct-pix2pix model the prompt is an instruction."""
    target = out_target(out, dated(ctx.obj, "img2img-images"))
    units = control_units(control, control_preprocess) or None
    requests = [edit_request(prompt, negative, path, width=width, height=height, steps=steps, sampler=sampler, cfg=cfg,
                             seed=seed, strength=strength, model=model, batch_size=batch_size,
                             extra={"resize_mode": resize_mode, "image_cfg_scale": image_cfg, "controlnet": units})
                for path in images_in(init)]
    run_all(ctx.obj, requests, target, quiet)


@app.command()
def inpaint(
    ctx: typer.Context,
    init: Path = typer.Argument(..., help="Init image."),
    mask: Path = typer.Argument(..., help="Mask image of the same size: white = repaint (or transparent pixels)."),
    prompt: str = _PROMPT, negative: str = _NEG,
    strength: Optional[float] = typer.Option(None, "--strength", "--denoise", help="Denoising strength 0-1 [default: 0.75]."),
    mask_blur: Optional[int] = typer.Option(None, help="Feathering of the mask's edge in pixels, inside the mask [default: 4]."),
    fill: Optional[str] = typer.Option(None, help="Masked content: original, fill, latent noise, latent nothing [default: original]."),
    only_masked: bool = typer.Option(False, "--only-masked", help="Inpaint a crop around the mask at full resolution."),
    padding: Optional[int] = typer.Option(None, help="Only masked: pixels of context around the mask [default: 32]."),
    invert: bool = typer.Option(False, "--invert", help="Repaint the black part of the mask instead."),
    width: Optional[int] = _W, height: Optional[int] = _H, steps: Optional[int] = _STEPS,
    sampler: Optional[str] = _SAMPLER, cfg: Optional[float] = _CFG, seed: Optional[int] = _SEED,
    model: Optional[str] = _MODEL, batch_size: Optional[int] = _BATCH, out: Optional[str] = _OUT, quiet: bool = _QUIET,
    control: list[str] = _CONTROL, control_preprocess: bool = _CONTROL_PRE,
):
    """Repaint the masked part of a picture; everything outside the mask is kept as it was."""
    from danqing.editing.images import load_mask

    target = out_target(out, dated(ctx.obj, "img2img-images"))
    load_mask(mask)
    req = edit_request(prompt, negative, init, width=width, height=height, steps=steps, sampler=sampler, cfg=cfg,
                       seed=seed, strength=strength, model=model, batch_size=batch_size,
                       extra={"mask": str(mask.resolve()), "mask_blur": mask_blur, "inpainting_fill": fill,
                              "inpaint_full_res": only_masked, "inpaint_full_res_padding": padding,
                              "inpainting_mask_invert": invert,
                              "controlnet": control_units(control, control_preprocess) or None})
    run_all(ctx.obj, [req], target, quiet)


@app.command()
def outpaint(
    ctx: typer.Context,
    init: Path = typer.Argument(..., help="Picture to extend."),
    prompt: str = _PROMPT, negative: str = _NEG,
    left: int = typer.Option(0, help="Pixels to add on the left."), right: int = typer.Option(0, help="... on the right."),
    up: int = typer.Option(0, help="... at the top."), down: int = typer.Option(0, help="... at the bottom."),
    feather: int = typer.Option(8, help="Pixels of the old picture, along the seam, that are repainted softly."),
    strength: float = typer.Option(1.0, "--strength", "--denoise", help="Denoising strength of the new area."),
    steps: Optional[int] = _STEPS, sampler: Optional[str] = _SAMPLER, cfg: Optional[float] = _CFG,
    seed: Optional[int] = _SEED, model: Optional[str] = _MODEL, batch_size: Optional[int] = _BATCH,
    out: Optional[str] = _OUT, quiet: bool = _QUIET,
):
    """Extend the canvas by N pixels on any side and paint the new area to fit. The prepared
    canvas and mask are saved beside the output, so `danqing generate --from` re-creates it."""
    from danqing.editing.images import load_image, outpaint_canvas
    from danqing.outputs.store import atomic_save_image

    target = out_target(out, dated(ctx.obj, "img2img-images"))
    if min(left, right, up, down) < 0 or not (left or right or up or down):
        raise InvalidRequest("left/right/up/down", "give at least one of --left --right --up --down, in pixels (>= 0)")
    if not 0 <= feather <= 256:
        raise InvalidRequest("feather", f"must be between 0 and 256 pixels, got {feather}")
    target.check_free(batch_size or 1)
    img = load_image(init, "init_image")
    # round every side up so the canvas is a multiple of 8
    pad_w, pad_h = (-(img.width + left + right)) % 8, (-(img.height + up + down)) % 8
    right, down = right + pad_w, down + pad_h
    canvas, mask = outpaint_canvas(img, left, right, up, down, feather)
    stem = f"outpaint-{init.stem}-{left}-{right}-{up}-{down}"
    # deterministic from the picture and the sides: written again (same content) on a re-run
    canvas_path = atomic_save_image(canvas, target.beside() / f"{stem}-canvas.png", overwrite=True)
    mask_path = atomic_save_image(mask, target.beside() / f"{stem}-mask.png", overwrite=True)
    req = edit_request(prompt, negative, canvas_path, width=canvas.width, height=canvas.height, steps=steps,
                       sampler=sampler, cfg=cfg, seed=seed, strength=strength, model=model, batch_size=batch_size,
                       extra={"mask": str(mask_path.resolve()), "mask_blur": 0, "inpainting_fill": "fill"})
    run_all(ctx.obj, [req], target, quiet)


@app.command()
def upscale(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="Picture to upscale."),
    scale: float = typer.Option(2.0, help="Factor (1-16)."),
    upscaler: str = typer.Option("Lanczos", help="Lanczos, Nearest, or an installed model (models/upscalers/, "
                                 "models/ESRGAN/, ...; an unknown name lists them)."),
    upscaler_tile: int = typer.Option(256, help="Model upscalers: tile size in input pixels (0 = no tiling)."),
    upscaler_overlap: int = typer.Option(32, help="Model upscalers: overlap between tiles in input pixels."),
    restore_faces: Optional[str] = typer.Option(None, help="Restore faces with this installed model "
                                                "(models/face_restore/, models/GFPGAN/), after upscaling [default: none]."),
    face_visibility: float = typer.Option(1.0, help="Face restoration: 0 keeps the picture, 1 the restored faces."),
    sd: bool = typer.Option(False, "--sd", help="SD upscale: then img2img every tile with --prompt at --strength."),
    prompt: str = typer.Option("", help="SD upscale: prompt for the tiles [default: the picture's own prompt, if any]."),
    tile: int = typer.Option(512, help="SD upscale: tile size in pixels (multiple of 8)."),
    overlap: Optional[int] = typer.Option(None, help="SD upscale: overlap between tiles in pixels, less than half "
                                          "the tile [default: 64, or --tile / 4 when that is smaller]."),
    strength: float = typer.Option(0.3, "--strength", "--denoise", help="SD upscale: denoising strength of the tiles."),
    steps: int = typer.Option(20, help="SD upscale: sampling steps."),
    seed: int = typer.Option(0, help="SD upscale: seed of the first tile (tile i uses seed + i)."),
    model: Optional[str] = _MODEL,
    out: Optional[str] = typer.Option(None, metavar="PATH", help=OUT_HELP.format("outputs/extras-images/DATE/NNNNN-NAME-xSCALE.png")),
):
    """Upscale a picture (Lanczos, nearest or a model upscaler), optionally adding detail tile by
    tile (SD upscale) and restoring faces."""
    from danqing.editing.extras import UpscaleOptions, check_upscale, picture_prompt, upscale_picture  # lazy: torch
    from danqing.editing.images import load_image
    from danqing.outputs.store import atomic_save_image

    if overlap is None:  # A1111's 64 for its 512-px tiles; a smaller tile shares a quarter of itself
        overlap = min(64, tile // 4)
    options = UpscaleOptions(scale=scale, upscaler=upscaler, upscaler_tile=upscaler_tile,
                             upscaler_overlap=upscaler_overlap, restore_faces=restore_faces,
                             face_visibility=face_visibility, sd=sd, prompt=prompt, tile=tile, overlap=overlap,
                             strength=strength, steps=steps, seed=seed, model=model)
    target = out_target(out, dated(ctx.obj, "extras-images"))
    studio = make_studio(ctx.obj)
    check_upscale(studio, options)  # before any work: an unknown name lists the installed ones
    img = load_image(image, "image")
    path = new_picture_path(target, f"{image.stem}-x{scale:g}")
    announce_device(studio)
    if sd and not prompt:
        options = dataclasses.replace(options, prompt=picture_prompt(image))
    result, warnings = upscale_picture(studio, img, options, on_tile=lambda i, n: typer.echo(f"tile {i}/{n}", err=True))
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    print(atomic_save_image(result, path))


edit_app = typer.Typer(help="Edit pictures by editing prompts: `danqing edit p2p` (Prompt-to-Prompt, real "
                        "pictures through null-text inversion).", no_args_is_help=True)
app.add_typer(edit_app, name="edit")


def _pairs(items: list[str], option: str, convert=str) -> list[tuple[str, object]]:
    out = []
    for item in items:
        if "=" not in item:
            raise InvalidRequest(option, f"expected WORD=VALUE, got {item!r}")
        word, value = item.rsplit("=", 1)
        try:
            out.append((word.strip(), convert(value)))
        except ValueError:
            raise InvalidRequest(option, f"{value!r} in {item!r} is not a valid value") from None
    return out


def _window_option(text: str, option: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise InvalidRequest(option, f"expected START,END fractions of the steps (e.g. 0,0.8), got {text!r}") from None
    return a, b


@edit_app.command("p2p")
def edit_p2p(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="The source prompt: what the picture shows (a real picture's caption)."),
    swap: list[str] = typer.Option([], "--swap", help="WORD=NEW: swap a word of the prompt (repeatable) [default: none]."),
    to: Optional[str] = typer.Option(None, "--to", help="The edited prompt, written out (words added = refinement) [default: none]."),
    reweight: list[str] = typer.Option([], "--reweight", help="WORD=FACTOR: scale the attention to a word (repeatable) [default: none]."),
    image: Optional[Path] = typer.Option(None, "--image", help="A real picture to edit: null-text inverted first (DDIM) [default: none: a generated picture]."),
    cross: str = typer.Option("0,0.8", help="Steps (START,END fractions) where cross-attention maps are the source's."),
    self_steps: str = typer.Option("0,0.4", "--self", help="Steps where self-attention maps are the source's."),
    features: float = typer.Option(0.0, help="Fraction of first steps with the source's finest UNet features "
                                   "(keeps the layout on small models; 0.5 for danqing-tiny)."),
    blend: bool = typer.Option(False, "--blend", help="Local blending: confine the edit to the edited words' area."),
    null_iterations: int = typer.Option(10, "--null-iterations", help="Null-text optimisation steps per sampler step."),
    negative: str = _NEG,
    width: Optional[int] = typer.Option(None, help="Width [default: the image's, or 512; 64 for danqing-tiny]."),
    height: Optional[int] = typer.Option(None, help="Height [default: as --width]."),
    steps: int = typer.Option(20, help="Sampling steps."),
    sampler: str = typer.Option("DDIM", help="A1111 sampler name (a real picture needs DDIM)."),
    cfg: float = typer.Option(7.0, help="CFG scale."), seed: int = typer.Option(-1, help="Seed; -1 = random."),
    model: Optional[str] = _MODEL, batch_size: int = typer.Option(1, help="Edits (seeds) per run."),
    out: Optional[str] = _OUT, quiet: bool = _QUIET,
):
    """Prompt-to-Prompt: the picture of PROMPT, edited by --swap / --to / --reweight with its layout
    kept. The unedited picture is saved beside each edit as NAME-source.png."""
    from danqing.editing.p2p import swap_words  # lazy: imports torch
    from danqing.request import GenerationRequest

    target = out_target(out, dated(ctx.obj, "img2img-images"))
    if to is not None and swap:
        raise InvalidRequest("swap", "give either --swap or --to, not both")
    target_prompt = to if to is not None else (swap_words(prompt, dict(_pairs(swap, "swap"))) if swap else prompt)
    if target_prompt == prompt and not reweight:
        raise InvalidRequest("swap", "nothing to edit: give --swap WORD=NEW, --to PROMPT or --reweight WORD=FACTOR")
    fields = {
        "prompt": target_prompt, "p2p_source": prompt, "negative_prompt": negative, "steps": steps, "sampler": sampler,
        "cfg_scale": cfg, "seed": seed, "model": model, "batch_size": batch_size,
        "p2p_cross": _window_option(cross, "cross"), "p2p_self": _window_option(self_steps, "self"),
        "p2p_reweight": tuple(_pairs(reweight, "reweight", float)), "p2p_local_blend": blend,
        "p2p_features": features, "null_text_iterations": null_iterations,
    }
    if image is not None:
        from danqing.editing.images import load_image

        img = load_image(image, "init_image")
        fields.update(init_image=str(image.resolve()), width=width or max(64, img.width // 8 * 8),
                      height=height or max(64, img.height // 8 * 8))
    else:
        fields.update(width=width or 512, height=height or 512)
    req = GenerationRequest.create(**{k: v for k, v in fields.items() if v is not None})
    target.check_free(pictures_of(req), variants=("", "-source"))  # the unedited pictures go beside the edits
    run_all(ctx.obj, [req], target, quiet)
