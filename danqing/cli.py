"""The ``danqing`` command line: a thin shell that builds requests and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from danqing.errors import DanqingError, ImageError, InvalidRequest

app = typer.Typer(
    help="丹青 danqing: offline AI painting studio.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, help="danqing home (models/ and outputs/ inside); default $DANQING_HOME or the current folder."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Models folder (checkpoints/, vae/, lora/, ...)."),
    device: Optional[str] = typer.Option(None, help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps."),
    dtype: Optional[str] = typer.Option(None, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
):
    from danqing.settings import Settings

    if dtype is not None and dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise InvalidRequest("dtype", f"must be one of auto, fp32, fp16, bf16, got {dtype!r}")
    ctx.obj = Settings.from_env(home=home, models_dir=models_dir, device=device, dtype=dtype)


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="Prompt in A1111 syntax: (word:1.2), [from:to:when], [a|b], BREAK."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (1-150) [default: 20]."),
    sampler: Optional[str] = typer.Option(None, help="A1111 sampler name [default: DPM++ 2M]; see `danqing samplers`."),
    schedule: Optional[str] = typer.Option(None, help="Schedule type [default: Automatic]: Karras, Exponential, ..."),
    cfg: Optional[float] = typer.Option(None, help="CFG scale (1-30) [default: 7]."),
    seed: Optional[int] = typer.Option(None, help="Seed; -1 = random [default: -1]."),
    subseed: Optional[int] = typer.Option(None, help="Variation seed."),
    subseed_strength: Optional[float] = typer.Option(None, help="Variation strength 0-1."),
    width: Optional[int] = typer.Option(None, help="Width, multiple of 8 [default: 512]."),
    height: Optional[int] = typer.Option(None, help="Height, multiple of 8 [default: 512]."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch."),
    batch_count: Optional[int] = typer.Option(None, help="Number of batches."),
    model: Optional[str] = typer.Option(None, help="Checkpoint name, hash or path [default: settings' default model]."),
    vae: Optional[str] = typer.Option(None, help="VAE name or path overriding the checkpoint's."),
    clip_skip: Optional[int] = typer.Option(None, help="CLIP skip (1 = last layer, 2 = penultimate)."),
    from_image: Optional[Path] = typer.Option(None, "--from", help="Re-create an image from its PNG metadata (options given here override)."),
    out: Optional[Path] = typer.Option(None, help="Output folder, or a .png file for a single image [default: outputs/txt2img-images/DATE/]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    hires: Optional[bool] = typer.Option(None, "--hires/--no-hires", help="Hires fix: a second pass at a larger size."),
    hr_scale: Optional[float] = typer.Option(None, help="Hires fix: upscale factor (1-8) [default: 2]."),
    hr_resize_x: Optional[int] = typer.Option(None, help="Hires fix: target width instead of --hr-scale."),
    hr_resize_y: Optional[int] = typer.Option(None, help="Hires fix: target height instead of --hr-scale."),
    hr_upscaler: Optional[str] = typer.Option(None, help="Hires fix: Latent, Latent (antialiased), Latent (bicubic), Latent (nearest), Latent (nearest-exact), Lanczos, Nearest or an installed model upscaler [default: Latent]."),
    hr_steps: Optional[int] = typer.Option(None, help="Hires fix: second-pass steps (0 = --steps)."),
    hr_sampler: Optional[str] = typer.Option(None, help="Hires fix: second-pass sampler [default: --sampler]."),
    hr_prompt: Optional[str] = typer.Option(None, help="Hires fix: second-pass prompt [default: the prompt]."),
    hr_negative: Optional[str] = typer.Option(None, help="Hires fix: second-pass negative prompt."),
    denoise: Optional[float] = typer.Option(None, help="Hires fix: second-pass denoising strength 0-1 [default: 0.75]."),
    refiner: Optional[str] = typer.Option(None, help="Refiner checkpoint (an SDXL refiner) that finishes the picture."),
    refiner_switch_at: Optional[float] = typer.Option(None, help="Refiner: fraction of the schedule done by the base model [default: 0.8]."),
    ip_adapter: Optional[list[str]] = typer.Option(None, "--ip-adapter", help="Image prompt: IMAGE[:WEIGHT] (weight 0-2, default 1); repeat for several pictures."),
    ip_adapter_model: Optional[str] = typer.Option(None, help="IP-Adapter file in models/ipadapter/ [default: the only one]."),
    ip_adapter_encoder: Optional[str] = typer.Option(None, help="CLIP vision encoder folder in models/clip_vision/ [default: the only one]."),
    control: list[str] = typer.Option([], "--control", help="ControlNet unit TYPE:IMAGE[:WEIGHT] (repeatable); TYPE is canny, lineart, ... or a ControlNet name; IMAGE a control map."),
    control_preprocess: bool = typer.Option(False, "--control-preprocess", help="Run each --control type's preprocessor on its IMAGE first (IMAGE is then a photo)."),
):
    """Generate images from a prompt (txt2img, optionally with hires fix) and save them as PNGs
    with A1111 metadata; `--from IMAGE` re-creates any danqing image (img2img and inpaint too)."""
    from danqing.request import GenerationRequest

    fields = {
        "prompt": prompt, "steps": steps, "sampler": sampler, "schedule": schedule, "cfg_scale": cfg,
        "seed": seed, "subseed": subseed, "subseed_strength": subseed_strength, "width": width,
        "height": height, "batch_size": batch_size, "batch_count": batch_count, "model": model, "vae": vae,
        "clip_skip": clip_skip, "enable_hr": hires, "hr_scale": hr_scale, "hr_resize_x": hr_resize_x,
        "hr_resize_y": hr_resize_y, "hr_upscaler": hr_upscaler, "hr_second_pass_steps": hr_steps,
        "hr_sampler_name": hr_sampler, "hr_prompt": hr_prompt, "hr_negative_prompt": hr_negative,
        "denoising_strength": denoise, "refiner_checkpoint": refiner, "refiner_switch_at": refiner_switch_at,
    }
    if ip_adapter:
        fields.update(parse_ip_adapter_option(ip_adapter))
    fields.update(ip_adapter=ip_adapter_model, ip_adapter_encoder=ip_adapter_encoder)
    fields = {k: v for k, v in fields.items() if v is not None}
    if negative:
        fields["negative_prompt"] = negative
    source_infotext = None
    if control:
        fields["controlnet"] = _control_units(control, control_preprocess)
    if from_image is not None:
        from danqing.outputs.metadata import request_from_infotext
        from danqing.outputs.store import read_infotext

        source_infotext = read_infotext(from_image)
        base = request_from_infotext(source_infotext)
        request = base.replace(**fields)
    else:
        if prompt is None:
            raise InvalidRequest("prompt", "give a prompt, or --from IMAGE to re-create an image")
        request = GenerationRequest.create(**fields)
    if out is not None and out.suffix.lower() == ".png":
        if request.batch_size * request.batch_count != 1:
            raise InvalidRequest("out", "a .png file name holds one image; give a folder for batches")
        if out.exists():
            raise InvalidRequest("out", f"{out} already exists; danqing never overwrites, pick another name")
    _run_generate(ctx.obj, request, out, quiet, source_infotext=source_infotext)


def parse_ip_adapter_option(values: list[str]) -> dict:
    """``--ip-adapter IMAGE[:WEIGHT]`` (repeated) -> request fields; one weight for all pictures."""
    images, weights = [], set()
    for value in values:
        path, sep, weight = value.rpartition(":")
        if sep and path and weight:
            try:
                weights.add(float(weight))
            except ValueError:  # a ':' of the path itself
                path = value
        else:
            path = value
        images.append(path)
    if len(weights) > 1:
        raise InvalidRequest("ip_adapter_weight", f"the pictures of one IP-Adapter share one weight; got "
                             f"{', '.join(f'{w:g}' for w in sorted(weights))}")
    fields: dict = {"ip_adapter_image": tuple(images)}
    if weights:
        fields["ip_adapter_weight"] = weights.pop()
    return fields


def _control_units(specs: list[str], preprocess: bool) -> tuple:
    from danqing.conditioning.control import parse_control_spec

    return tuple(parse_control_spec(s, preprocess=preprocess) for s in specs)


def _run_generate(settings, request, out: Path | None, quiet: bool, source_infotext: str | None = None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from danqing.studio import Studio

    console = Console(stderr=True)
    studio = Studio(settings)
    single_file = out is not None and out.suffix.lower() == ".png"
    total = request.steps * request.batch_count
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("sampling", total=total)

        def on_step(info):
            progress.update(task, completed=info.batch_index * info.total + info.step)

        result = studio.generate(request, on_step=on_step, save=not single_file, out_dir=None if single_file else out)
    if single_file:
        from danqing.outputs.store import save_png

        result.paths.append(save_png(result.images[0], out, result.infotexts[0]))
    warnings = list(result.warnings)
    if source_infotext is not None:  # --from: the embeddings the original used, as they are now
        from danqing.customise.embeddings import ti_hash_changes
        from danqing.outputs.infotext import parse_infotext

        warnings += ti_hash_changes(parse_infotext(source_infotext)[2].get("TI hashes"),
                                    parse_infotext(result.infotexts[0])[2].get("TI hashes"))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {line}")
    if result.request.model == "danqing-tiny-random":
        console.print("[yellow]note:[/] model 'danqing-tiny-random' has random weights (a test model): expect noise patterns, not pictures.")
    for path, seed in zip(result.paths, result.seeds):
        print(f"{path}  seed={seed}")
    console.print(f"{len(result.images)} image(s) in {result.timings['total']:.2f}s (sampling {result.timings['sample']:.2f}s)")


@app.command()
def info(image: Path = typer.Argument(..., help="A PNG (or JPEG/WebP) written by danqing or A1111.")):
    """Print an image's generation parameters (A1111 infotext)."""
    from danqing.outputs.store import read_infotext

    print(read_infotext(image))


@app.command()
def models(ctx: typer.Context, kind: str = typer.Option("checkpoint", help="checkpoint, vae, lora, embedding or controlnet.")):
    """List models found in the models folder with their family and A1111 short hash."""
    from danqing.models.registry import KINDS, Registry

    if kind not in KINDS:
        raise InvalidRequest("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    registry = Registry(ctx.obj.models_dir)
    print(f"# {kind} models in {registry.folder(kind)}")
    print(f"{'name':32s} {'family':28s} {'format':12s} {'hash':10s}  path")
    for entry in registry.scan(kind):
        family = _family_of(entry) if kind == "checkpoint" else _control_family_of(entry) if kind == "controlnet" else "-"
        print(f"{entry.name:32s} {family:28s} {entry.format:12s} {registry.short_hash(entry):10s}  {entry.path or '(built in)'}")


def _control_family_of(entry) -> str:
    """A ControlNet / adapter folder's family from its config.json ("?" for single files: their
    family shows when loaded)."""
    import json

    from danqing.conditioning.control import control_family

    cfg = entry.path / "config.json" if entry.path is not None and entry.path.is_dir() else None
    if cfg is None or not cfg.is_file():
        return "?"
    data = json.loads(cfg.read_text())
    return f"{control_family(data)} {'T2I-Adapter' if 'adapter_type' in data else 'ControlNet'}"


def _family_of(entry) -> str:
    from danqing.models.loader import describe_checkpoint

    try:
        return describe_checkpoint(entry)
    except DanqingError as exc:
        return f"? ({exc})"


@app.command()
def samplers():
    """List samplers and the schedule types each accepts."""
    from danqing.sampling.samplers import samplers as table
    from danqing.sampling.samplers import schedules_for

    for name, spec in table().items():
        print(f"{name:18s} {spec.class_name:34s} default schedule: {spec.default_schedule:12s} schedules: {', '.join(schedules_for(name))}")


@app.command()
def export(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Checkpoint name, hash or path (any loadable format)."),
    out: Path = typer.Argument(..., help="Output .safetensors file (original LDM single-file layout)."),
):
    """Export a model to a single .safetensors file in the original LDM layout (A1111/ComfyUI load it)."""
    from danqing.models.loader import load_components
    from danqing.models.registry import Registry
    from danqing.models.single_file import save_single_file

    if out.suffix != ".safetensors":
        raise InvalidRequest("out", f"must end with .safetensors, got {out.name!r}")
    if out.exists():
        raise InvalidRequest("out", f"{out} already exists; danqing never overwrites, pick another name")
    comps = load_components(Registry(ctx.obj.models_dir).find("checkpoint", model))
    save_single_file(comps, out)
    print(out)


@app.command()
def merge(
    ctx: typer.Context,
    models: list[str] = typer.Argument(..., help="A B (weighted-sum, extract-lora: base tuned), A B C (add-difference) or A (merge-lora): checkpoint names, hashes or paths."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file; a bare name goes to models/checkpoints/ (models/lora/ for extract-lora)."),
    method: str = typer.Option("weighted-sum", help="weighted-sum: (1-a)A + aB; add-difference: A + a(B-C); extract-lora: a LoRA of B - A; merge-lora: A with --lora networks baked in."),
    alpha: float = typer.Option(0.5, help="The multiplier a."),
    half: bool = typer.Option(False, "--half", help="Store fp16 (default fp32: a=0 gives A bit for bit)."),
    rank: int = typer.Option(32, help="extract-lora: rank of Linear/1x1 layers."),
    conv_rank: Optional[int] = typer.Option(None, help="extract-lora: rank of 3x3 convolutions (default --rank; 0 = none)."),
    lora: list[str] = typer.Option([], "--lora", help="merge-lora: NAME[:WEIGHT] from models/lora (repeatable; weight 1 by default)."),
):
    """Merge checkpoints (A1111's checkpoint merger) or extract a LoRA from two; the recipe
    (inputs with their hashes, method, alpha) is stored in the file's header."""
    from danqing.customise.merge import extract_lora, merge_checkpoints
    from danqing.models.registry import Registry

    registry = Registry(ctx.obj.models_dir)
    if out.parent == Path("."):
        out = registry.folder("lora" if method == "extract-lora" else "checkpoint") / out.name
        out.parent.mkdir(parents=True, exist_ok=True)
    if method == "merge-lora":
        from danqing.customise.merge import merge_loras

        if len(models) != 1:
            raise InvalidRequest("models", f"merge-lora takes 1 model (the base), got {len(models)}")
        pairs = []
        for item in lora:
            name, _, w = item.rpartition(":") if ":" in item else (item, "", "1")
            try:
                pairs.append((name, float(w)))
            except ValueError:
                raise InvalidRequest("lora", f"{item!r}: expected NAME[:WEIGHT], e.g. heart:0.8") from None
        print(merge_loras(registry, models[0], pairs, out, half=half))
        return
    if method == "extract-lora":
        if len(models) != 2:
            raise InvalidRequest("models", f"extract-lora takes 2 models (base tuned), got {len(models)}")
        path, notes = extract_lora(registry, models[0], models[1], out, rank=rank, conv_rank=conv_rank)
        for line in notes:
            print(f"note: {line}", file=sys.stderr)
    else:
        path = merge_checkpoints(registry, models, out, method=method, alpha=alpha, half=half)
    print(path)


# ---------------------------------------------------------------------------------------------
# Editing: img2img, inpaint, outpaint, upscale (docs/editing.md)
# ---------------------------------------------------------------------------------------------
def _edit_request(prompt, negative, init: Path, *, width, height, steps, sampler, cfg, seed, strength, model,
                  batch_size, extra: dict):
    """A request for an editing command; width/height default to the init image's size (rounded
    down to a multiple of 8)."""
    from danqing.editing.images import load_image
    from danqing.request import GenerationRequest

    img = load_image(init, "init_image")
    fields = {
        "prompt": prompt, "negative_prompt": negative or "", "init_image": str(init.resolve()),
        "width": width or max(64, img.width // 8 * 8), "height": height or max(64, img.height // 8 * 8),
        "steps": steps, "sampler": sampler, "cfg_scale": cfg, "seed": seed, "denoising_strength": strength,
        "model": model, "batch_size": batch_size, **extra,
    }
    return GenerationRequest.create(**{k: v for k, v in fields.items() if v is not None})


def _images_in(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise InvalidRequest("init_image", f"{path}: no images (.png, .jpg, .jpeg, .webp, .bmp) in the folder")
        return files
    return [path]


_PROMPT = typer.Argument(..., help="Prompt in A1111 syntax.")
_NEG = typer.Option("", "--negative", "-n", help="Negative prompt.")
_W = typer.Option(None, help="Width, multiple of 8 [default: the init image's].")
_H = typer.Option(None, help="Height, multiple of 8 [default: the init image's].")
_STEPS = typer.Option(None, help="Sampling steps [default: 20].")
_SAMPLER = typer.Option(None, help="A1111 sampler name [default: DPM++ 2M].")
_CFG = typer.Option(None, help="CFG scale [default: 7].")
_SEED = typer.Option(None, help="Seed; -1 = random.")
_MODEL = typer.Option(None, help="Checkpoint [default: the settings' default model].")
_BATCH = typer.Option(None, help="Images per init image.")
_OUT = typer.Option(None, help="Output folder [default: outputs/img2img-images/DATE/].")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
_CONTROL = typer.Option([], "--control", help="ControlNet unit TYPE:IMAGE[:WEIGHT] (repeatable); TYPE is canny, lineart, ... or a ControlNet name.")
_CONTROL_PRE = typer.Option(False, "--control-preprocess", help="Run each --control type's preprocessor on its IMAGE first.")


@app.command()
def img2img(
    ctx: typer.Context,
    init: Path = typer.Argument(..., help="Init image, or a folder of images (each is processed)."),
    prompt: str = _PROMPT, negative: str = _NEG,
    strength: Optional[float] = typer.Option(None, "--strength", "--denoise", help="Denoising strength 0-1 [default: 0.75]."),
    resize_mode: Optional[str] = typer.Option(None, help="just resize, crop and resize, resize and fill, latent upscale."),
    image_cfg: Optional[float] = typer.Option(None, "--image-cfg", help="instruct-pix2pix models: Image CFG scale [default: 1.5]."),
    width: Optional[int] = _W, height: Optional[int] = _H, steps: Optional[int] = _STEPS,
    sampler: Optional[str] = _SAMPLER, cfg: Optional[float] = _CFG, seed: Optional[int] = _SEED,
    model: Optional[str] = _MODEL, batch_size: Optional[int] = _BATCH, out: Optional[Path] = _OUT, quiet: bool = _QUIET,
    control: list[str] = _CONTROL, control_preprocess: bool = _CONTROL_PRE,
):
    """Repaint a picture (or every picture of a folder) following a prompt: the picture is noised
    to --strength and denoised again. With an instruct-pix2pix model the prompt is an instruction."""
    for path in _images_in(init):
        req = _edit_request(prompt, negative, path, width=width, height=height, steps=steps, sampler=sampler, cfg=cfg,
                            seed=seed, strength=strength, model=model, batch_size=batch_size,
                            extra={"resize_mode": resize_mode, "image_cfg_scale": image_cfg,
                                   "controlnet": _control_units(control, control_preprocess) or None})
        _run_generate(ctx.obj, req, out, quiet)


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
    model: Optional[str] = _MODEL, batch_size: Optional[int] = _BATCH, out: Optional[Path] = _OUT, quiet: bool = _QUIET,
    control: list[str] = _CONTROL, control_preprocess: bool = _CONTROL_PRE,
):
    """Repaint the masked part of a picture; everything outside the mask is kept as it was."""
    from danqing.editing.images import load_mask

    load_mask(mask)
    req = _edit_request(prompt, negative, init, width=width, height=height, steps=steps, sampler=sampler, cfg=cfg,
                        seed=seed, strength=strength, model=model, batch_size=batch_size,
                        extra={"mask": str(mask.resolve()), "mask_blur": mask_blur, "inpainting_fill": fill,
                               "inpaint_full_res": only_masked, "inpaint_full_res_padding": padding,
                               "inpainting_mask_invert": invert,
                               "controlnet": _control_units(control, control_preprocess) or None})
    _run_generate(ctx.obj, req, out, quiet)


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
    out: Optional[Path] = _OUT, quiet: bool = _QUIET,
):
    """Extend the canvas by N pixels on any side and paint the new area to fit. The prepared
    canvas and mask are saved beside the output, so `danqing generate --from` re-creates it."""
    from danqing.editing.images import load_image, outpaint_canvas
    from danqing.outputs.store import atomic_save_image

    if min(left, right, up, down) < 0 or not (left or right or up or down):
        raise InvalidRequest("left/right/up/down", "give at least one of --left --right --up --down, in pixels (>= 0)")
    if not 0 <= feather <= 256:
        raise InvalidRequest("feather", f"must be between 0 and 256 pixels, got {feather}")
    img = load_image(init, "init_image")
    # round every side up so the canvas is a multiple of 8
    pad_w, pad_h = (-(img.width + left + right)) % 8, (-(img.height + up + down)) % 8
    right, down = right + pad_w, down + pad_h
    canvas, mask = outpaint_canvas(img, left, right, up, down, feather)
    folder = out or (ctx.obj.outputs_dir / "img2img-images" / __import__("datetime").date.today().isoformat())
    stem = f"outpaint-{init.stem}-{left}-{right}-{up}-{down}"
    # deterministic from the picture and the sides: written again (same content) on a re-run
    canvas_path = atomic_save_image(canvas, folder / f"{stem}-canvas.png", overwrite=True)
    mask_path = atomic_save_image(mask, folder / f"{stem}-mask.png", overwrite=True)
    req = _edit_request(prompt, negative, canvas_path, width=canvas.width, height=canvas.height, steps=steps,
                        sampler=sampler, cfg=cfg, seed=seed, strength=strength, model=model, batch_size=batch_size,
                        extra={"mask": str(mask_path.resolve()), "mask_blur": 0, "inpainting_fill": "fill"})
    _run_generate(ctx.obj, req, out, quiet)


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
                                                "(models/face_restore/, models/GFPGAN/), after upscaling."),
    face_visibility: float = typer.Option(1.0, help="Face restoration: 0 keeps the picture, 1 the restored faces."),
    sd: bool = typer.Option(False, "--sd", help="SD upscale: then img2img every tile with --prompt at --strength."),
    prompt: str = typer.Option("", help="SD upscale: prompt for the tiles [default: the picture's own prompt, if any]."),
    tile: int = typer.Option(512, help="SD upscale: tile size in pixels (multiple of 8)."),
    overlap: int = typer.Option(64, help="SD upscale: overlap between tiles in pixels."),
    strength: float = typer.Option(0.3, "--strength", "--denoise", help="SD upscale: denoising strength of the tiles."),
    steps: int = typer.Option(20, help="SD upscale: sampling steps."),
    seed: int = typer.Option(0, help="SD upscale: seed of the first tile (tile i uses seed + i)."),
    model: Optional[str] = _MODEL,
    out: Optional[Path] = typer.Option(None, help="Output .png [default: outputs/extras-images/DATE/NAME-xSCALE.png]."),
):
    """Upscale a picture (Lanczos, nearest or a model upscaler), optionally adding detail tile by
    tile (SD upscale) and restoring faces."""
    from danqing.editing.images import load_image
    from danqing.editing.upscale import sd_upscale, upscale_image
    from danqing.outputs.store import atomic_save_image
    from danqing.studio import Studio

    if not 1 <= scale <= 16:
        raise InvalidRequest("scale", f"must be between 1 and 16, got {scale:g}")
    if not 0 <= face_visibility <= 1:
        raise InvalidRequest("face_visibility", f"must be between 0 and 1, got {face_visibility:g}")
    studio = Studio(ctx.obj)
    studio.upscalers.check(upscaler)  # before any work: an unknown name lists the installed ones
    if restore_faces is not None:
        studio.upscalers.file(restore_faces, faces=True)
    img = load_image(image, "image")
    out = out or ctx.obj.outputs_dir / "extras-images" / __import__("datetime").date.today().isoformat() / f"{image.stem}-x{scale:g}.png"
    if out.exists():
        raise InvalidRequest("out", f"{out} already exists; danqing never overwrites, pick another name")
    if sd:
        from danqing.request import GenerationRequest

        if not prompt:
            try:
                from danqing.outputs.infotext import parse_infotext
                from danqing.outputs.store import read_infotext

                prompt = parse_infotext(read_infotext(image))[0]
            except DanqingError:
                prompt = ""
        req = GenerationRequest.create(prompt=prompt, steps=steps, seed=seed, denoising_strength=strength,
                                       model=model, width=tile, height=tile)
        result = sd_upscale(studio, img, req, scale=scale, tile=tile, overlap=overlap, upscaler=upscaler,
                            on_tile=lambda i, n: typer.echo(f"tile {i}/{n}", err=True))
    else:
        result = upscale_image(img, int(img.width * scale), int(img.height * scale), upscaler, studio.upscalers,
                               tile=upscaler_tile, overlap=upscaler_overlap)
    if restore_faces is not None:
        from danqing.editing.faces import restore_faces as restore

        result, warnings = restore(result, studio.upscalers.face_model(restore_faces), visibility=face_visibility)
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)
    print(atomic_save_image(result, out))


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
    swap: list[str] = typer.Option([], "--swap", help="WORD=NEW: swap a word of the prompt (repeatable)."),
    to: Optional[str] = typer.Option(None, "--to", help="The edited prompt, written out (words added = refinement)."),
    reweight: list[str] = typer.Option([], "--reweight", help="WORD=FACTOR: scale the attention to a word (repeatable)."),
    image: Optional[Path] = typer.Option(None, "--image", help="A real picture to edit: null-text inverted first (DDIM)."),
    cross: str = typer.Option("0,0.8", help="Steps (START,END fractions) where cross-attention maps are the source's."),
    self_steps: str = typer.Option("0,0.4", "--self", help="Steps where self-attention maps are the source's."),
    features: float = typer.Option(0.0, help="Fraction of first steps with the source's finest UNet features "
                                   "(keeps the layout on small models; 0.5 for danqing-tiny)."),
    blend: bool = typer.Option(False, "--blend", help="Local blending: confine the edit to the edited words' area."),
    null_iterations: int = typer.Option(10, "--null-iterations", help="Null-text optimisation steps per sampler step."),
    negative: str = _NEG,
    width: Optional[int] = typer.Option(None, help="Width [default: the image's, or 512; 64 for danqing-tiny]."),
    height: Optional[int] = typer.Option(None, help="Height."),
    steps: int = typer.Option(20, help="Sampling steps."),
    sampler: str = typer.Option("DDIM", help="A1111 sampler name (a real picture needs DDIM)."),
    cfg: float = typer.Option(7.0, help="CFG scale."), seed: int = typer.Option(-1, help="Seed; -1 = random."),
    model: Optional[str] = _MODEL, batch_size: int = typer.Option(1, help="Edits (seeds) per run."),
    out: Optional[Path] = _OUT, quiet: bool = _QUIET,
):
    """Prompt-to-Prompt: the picture of PROMPT, edited by --swap / --to / --reweight with its layout
    kept. The unedited picture is saved beside each edit as NAME-source.png."""
    from danqing.editing.p2p import swap_words
    from danqing.request import GenerationRequest

    if to is not None and swap:
        raise InvalidRequest("swap", "give either --swap or --to, not both")
    target = to if to is not None else (swap_words(prompt, dict(_pairs(swap, "swap"))) if swap else prompt)
    if target == prompt and not reweight:
        raise InvalidRequest("swap", "nothing to edit: give --swap WORD=NEW, --to PROMPT or --reweight WORD=FACTOR")
    fields = {
        "prompt": target, "p2p_source": prompt, "negative_prompt": negative, "steps": steps, "sampler": sampler,
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
    _run_generate(ctx.obj, req, out, quiet)


@app.command()
def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="Interface to bind (default 127.0.0.1; with --listen 0.0.0.0)."),
    port: int = typer.Option(7860, help="Port."),
    listen: bool = typer.Option(False, "--listen", help="Listen on all interfaces (needs --api-auth)."),
    api_auth: Optional[str] = typer.Option(None, "--api-auth", envvar="DANQING_API_AUTH",
                                           help="user:password for HTTP Basic on the API and the UI."),
    cors: list[str] = typer.Option([], "--cors-allow-origin", help="Allow this origin (CORS); repeatable. Default: none."),
    db: Optional[Path] = typer.Option(None, help="SQLite database of jobs and history (default HOME/danqing.sqlite3)."),
    no_ui: bool = typer.Option(False, "--no-ui", help="API only, no web UI."),
    max_upload_mb: Optional[float] = typer.Option(None, help="Largest uploaded picture in MiB (default 16)."),
    max_upload_megapixels: Optional[float] = typer.Option(None, help="Largest uploaded picture in megapixels (default 16.78 = 4096x4096)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="Also accept this name in the Host header (besides localhost and --host); repeatable."),
    limit: list[str] = typer.Option([], "--limit", help="NAME=N: a request limit (max_pixels, max_prompt_chars, ...; docs/security.md); repeatable. Also DANQING_<NAME>."),
):
    """Serve the A1111-compatible API (/sdapi/v1), the job API (/api/v1) and the web UI (/)."""
    import uvicorn

    from danqing.server.app import create_app
    from danqing.settings import ServerSettings, limits_from

    if host is None:
        host = "0.0.0.0" if listen else "127.0.0.1"
    limits = {}
    if max_upload_mb is not None:
        limits["max_upload_bytes"] = int(max_upload_mb * 1024 * 1024)
    if max_upload_megapixels is not None:
        limits["max_upload_pixels"] = int(max_upload_megapixels * 1e6)
    limits.update(limits_from(limit))
    server = ServerSettings(host=host, port=port, api_auth=api_auth, cors_origins=tuple(cors), ui=not no_ui,
                            allowed_hosts=tuple(allowed_host), **limits)
    if not server.is_local and not api_auth:
        raise InvalidRequest("listen", f"refusing to listen on {host} without --api-auth user:password")
    settings = ctx.obj if db is None else ctx.obj.with_(db_path=db)
    application = create_app(settings, server)
    typer.echo(f"danqing serving on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ "
               f"(API: /sdapi/v1, /api/v1; docs: /docs)", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


@app.command()
def preprocess(
    ctx: typer.Context,
    kind: str = typer.Argument(..., metavar="TYPE", help="Preprocessor: canny, lineart, lineart_anime, scribble, softedge, mlsd, tile, blur, shuffle, segmentation, invert, depth, normal, openpose, none."),
    image: Path = typer.Argument(..., help="Picture (openpose: a picture, with a ViTPose model in models/preprocessors/openpose/, or an OpenPose JSON file)."),
    out: Optional[Path] = typer.Option(None, help="Output .png [default: IMAGE-TYPE.png beside the picture]; openpose on a picture also writes the detected pose as OUT.json."),
    res: int = typer.Option(512, help="Processor resolution: the short side the map is made at."),
    a: Optional[float] = typer.Option(None, "--a", help="The preprocessor's first parameter (canny: low threshold)."),
    b: Optional[float] = typer.Option(None, "--b", help="The preprocessor's second parameter (canny: high threshold)."),
):
    """Turn a picture into a control map for ControlNet (`danqing preprocess canny photo.jpg`)."""
    from danqing.editing.images import load_image
    from danqing.outputs.store import save_png, save_text
    from danqing.preprocess import get_preprocessor, run_preprocessor

    p = get_preprocessor(kind)
    out = out or image.with_name(f"{image.stem}-{kind}.png")
    pose_out = out.with_suffix(".json") if kind == "openpose" and image.suffix.lower() != ".json" else None
    for path in (out, pose_out):
        if path is not None and path.exists():
            raise InvalidRequest("out", f"{path} already exists; danqing never overwrites, pick another name")
    if kind == "openpose" and image.suffix.lower() == ".json":
        from danqing.preprocess.models import render_pose_json

        result = render_pose_json(image)
    else:
        picture = load_image(image, "image")
        result = run_preprocessor(kind, picture, resolution=res, a=a, b=b, models_dir=ctx.obj.models_dir)
    a_val = p.a_default if a is None else a
    b_val = p.b_default if b is None else b
    pose = result.info.get("openpose") if pose_out is not None else None
    save_png(result, out, f"Preprocessor: {kind}, Resolution: {res}, A: {a_val}, B: {b_val}")
    print(f"{out}  {result.width}x{result.height}")
    if pose is not None:  # the detected keypoints, in the format `preprocess openpose FILE.json` renders
        save_text(pose, pose_out)
        print(f"{pose_out}  {len(json.loads(pose)['people'])} people")


app_app = typer.Typer(help="The course's projects: `danqing app colorize|qr|text|restyle` (docs/control.md).",
                      no_args_is_help=True)
app.add_typer(app_app, name="app")


def _app_out(out: Optional[Path], default_name: str) -> Path:
    out = out or Path(default_name)
    if out.exists():
        raise InvalidRequest("out", f"{out} already exists; danqing never overwrites, pick another name")
    return out


def _studio(settings):
    from danqing.studio import Studio

    return Studio(settings)


@app_app.command("colorize")
def app_colorize(
    ctx: typer.Context,
    drawing: Path = typer.Argument(..., help="Line drawing (black lines on white, or white on black)."),
    prompt: str = typer.Argument(..., help="What to paint, colours included: 'a red circle and a blue square'."),
    hints: Optional[Path] = typer.Option(None, help="Colour hints: a rough colour sketch of the same framing."),
    seed: int = typer.Option(0), model: Optional[str] = typer.Option(None, help="Line-art ControlNet [default: danqing-tiny-lineart]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model [default: the settings' default]."),
    size: Optional[int] = typer.Option(None, help="Output size [default: 64, the bundled model's]."),
    out: Optional[Path] = typer.Option(None, help="Output .png [default: colorized-SEED.png]."),
):
    """Line-art colourisation: a drawing + a prompt -> a coloured picture that keeps the lines."""
    from danqing.apps.control_projects import colorize
    from danqing.editing.images import load_image
    from danqing.outputs.store import save_png

    path = _app_out(out, f"colorized-{seed}.png")
    r = colorize(_studio(ctx.obj), load_image(drawing, "drawing"), prompt, seed=seed, model=model, size=size,
                 hints=load_image(hints, "hints") if hints else None, checkpoint=checkpoint)
    print(save_png(r.image, path, r.result.infotexts[0]))


@app_app.command("qr")
def app_qr(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="Payload: a URL or any text."),
    prompt: str = typer.Argument(..., help="What the picture shows."),
    error: Optional[str] = typer.Option(None, help="QR error correction L, M, Q or H [default: H]."),
    seed: int = typer.Option(0), size: Optional[int] = typer.Option(None, help="Output size [default: 128]."),
    model: Optional[str] = typer.Option(None, help="ControlNet [default: danqing-tiny-canny]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model."),
    out: Optional[Path] = typer.Option(None, help="Output .png [default: qr-SEED.png]."),
):
    """QR-code art: a picture that still scans. Retries strengths/seeds until OpenCV reads it back."""
    from danqing.apps.control_projects import qr_art
    from danqing.outputs.store import save_png

    path = _app_out(out, f"qr-{seed}.png")
    r = qr_art(_studio(ctx.obj), text, prompt, error=error, seed=seed, size=size, model=model, checkpoint=checkpoint)
    for a in r.attempts:
        typer.echo(f"attempt strength {a['strength']:g} weight {a['weight']:g} seed {a['seed']}: "
                   f"{'decoded ' + repr(a['decoded']) if a['decoded'] else 'does not scan'}", err=True)
    print(save_png(r.image, path, f"QR: {text}"))
    if not r.ok:
        raise InvalidRequest("text", f"no attempt scanned after {len(r.attempts)} tries; the last picture is at {path}")
    print(f"decoded: {r.decoded}")


@app_app.command("text")
def app_text(
    ctx: typer.Context,
    word: str = typer.Argument(..., help="The word (any script the font covers)."),
    prompt: str = typer.Argument(..., help="What the word is made of."),
    font: Optional[str] = typer.Option(None, help="Font file (.ttf/.otf/.ttc path or a file name under the system font folders) [default: DejaVuSans-Bold, or an installed CJK font when the word needs one]."),
    fill: Optional[str] = typer.Option(None, help="Starting colour of the letters [default: red]."),
    seed: int = typer.Option(0), size: Optional[int] = typer.Option(None),
    model: Optional[str] = typer.Option(None, help="ControlNet [default: danqing-tiny-canny]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model."),
    out: Optional[Path] = typer.Option(None, help="Output .png [default: text-SEED.png]."),
):
    """Creative text: a picture shaped like a word."""
    from danqing.apps.control_projects import creative_text
    from danqing.outputs.store import save_png

    path = _app_out(out, f"text-{seed}.png")
    r = creative_text(_studio(ctx.obj), word, prompt, font=font, fill=fill, seed=seed, size=size, model=model,
                      checkpoint=checkpoint)
    print(save_png(r.image, path, f"Word: {word}"))
    print(f"shape IoU with the word: {r.iou:.2f}")


@app_app.command("restyle")
def app_restyle(
    ctx: typer.Context,
    photo: Path = typer.Argument(..., help="The photo."),
    prompt: str = typer.Argument(..., help="The style / content to paint."),
    strength: Optional[float] = typer.Option(None, help="Denoising strength [default: 0.75]."),
    seed: int = typer.Option(0), size: Optional[int] = typer.Option(None),
    model: Optional[str] = typer.Option(None, help="ControlNet [default: danqing-tiny-canny]."),
    module: Optional[str] = typer.Option(None, help="Preprocessor [default: canny; depth with a depth ControlNet]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model."),
    out: Optional[Path] = typer.Option(None, help="Output .png [default: restyled-SEED.png; -img2img.png beside it]."),
):
    """Photo restyling through ControlNet, compared with plain img2img at the same strength."""
    from danqing.apps.control_projects import restyle
    from danqing.editing.images import load_image
    from danqing.outputs.store import save_png

    path = _app_out(out, f"restyled-{seed}.png")
    r = restyle(_studio(ctx.obj), load_image(photo, "photo"), prompt, seed=seed, size=size, model=model, module=module,
                checkpoint=checkpoint, strength=strength)
    print(save_png(r.controlled, path, f"Restyle: {prompt}"))
    print(save_png(r.plain, path.with_name(path.stem + "-img2img.png"), f"img2img: {prompt}"))
    print(f"edge F1 with the photo: ControlNet {r.f1_controlled:.3f}, plain img2img {r.f1_plain:.3f}")


train_app = typer.Typer(help="Train models: `danqing train base|instruct|controlnet --config FILE`.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models and images: `danqing eval shapes`.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def _parse_sets(items: list[str]) -> dict:
    """["unet.steps=100", "data.source=\"my/folder\""] -> {"unet.steps": 100, ...} (values read as TOML,
    else as plain strings)."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise InvalidRequest("--set", f"{item!r}: expected SECTION.KEY=VALUE, e.g. unet.steps=100")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


@train_app.command("base")
def train_base_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-cpu.toml."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable)."),
):
    """Train a model from scratch (VAE, then CLIP text encoder + UNet) on the synthetic shapes set
    or a folder of captioned images; resumes from the newest checkpoint of its output folder."""
    from danqing.training.base import train_base
    from danqing.training.config import load_config

    cfg = load_config(config, _parse_sets(set_))
    summary = train_base(cfg, resume=not fresh, log=lambda line: typer.echo(line))
    typer.echo(f"summary: {summary}")


@train_app.command("instruct")
def train_instruct_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-instruct.toml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable)."),
):
    """Train an instruct-pix2pix model from a text-to-image model on synthetic edit pairs
    ("make the circle blue", "add a yellow star", "remove the square")."""
    from danqing.training.config import InstructTrainConfig, load_config
    from danqing.training.instruct import train_instruct

    cfg = load_config(config, _parse_sets(set_), model=InstructTrainConfig)
    summary = train_instruct(cfg, log=lambda line: typer.echo(line))
    typer.echo(f"summary: {json.dumps(summary['eval'])}")


def _finetune_cmd(kind: str, config: Path, fresh: bool, sets: list[str]) -> None:
    from danqing.training import config as C
    from danqing.training import finetune

    model, run = {"lora": (C.LoraTrainConfig, "train_lora"),
                  "dreambooth": (C.DreamBoothTrainConfig, "train_dreambooth"),
                  "textual-inversion": (C.TextualInversionTrainConfig, "train_textual_inversion")}[kind]
    run = getattr(finetune, run)
    cfg = C.load_config(config, _parse_sets(sets), model=model)
    summary = run(cfg, resume=not fresh, log=lambda line: typer.echo(line))
    typer.echo(f"summary: {json.dumps(summary)}")


_CONFIG_HELP = "TOML config, e.g. configs/train/{}.toml."
_SET_HELP = "Override a config value: SECTION.KEY=VALUE (repeatable), e.g. train.steps=400."


@train_app.command("lora")
def train_lora_cmd(
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("lora-heart")),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train a LoRA (UNet, optionally text encoder) on captioned images; writes kohya and diffusers files."""
    _finetune_cmd("lora", config, fresh, set_)


@train_app.command("dreambooth")
def train_dreambooth_cmd(
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("dreambooth-heart")),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Fine-tune the whole UNet (DreamBooth) with prior preservation; writes a checkpoint."""
    _finetune_cmd("dreambooth", config, fresh, set_)


@train_app.command("textual-inversion")
def train_ti_cmd(
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("ti-heart")),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Learn a new word's embedding (textual inversion); writes an A1111 embedding."""
    _finetune_cmd("textual-inversion", config, fresh, set_)


@train_app.command("controlnet")
def train_controlnet_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-canny.toml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable)."),
):
    """Train a ControlNet for a base model on (picture, condition map, caption) triples: the
    synthetic shapes with their Canny or line-art maps (zero convolutions, 50% prompt drop)."""
    from danqing.training.config import ControlTrainConfig, load_config
    from danqing.training.controlnet import train_controlnet

    cfg = load_config(config, _parse_sets(set_), model=ControlTrainConfig)
    summary = train_controlnet(cfg, log=lambda line: typer.echo(line))
    typer.echo(f"summary: {json.dumps(summary['eval_f1'])}")


@eval_app.command("shapes")
def eval_shapes(
    ctx: typer.Context,
    images: Optional[list[Path]] = typer.Argument(None, help="Images to score; without any, generate the held-out set with --model."),
    prompt: Optional[str] = typer.Option(None, help="What the images should show; default: the prompt in each PNG's metadata."),
    model: Optional[str] = typer.Option(None, help="Model to generate with [default: the settings' default model]."),
    n: int = typer.Option(200, help="Held-out prompts to generate (1-1000)."),
    lang: str = typer.Option("en", help="Prompt language: en or zh."),
    cfg: float = typer.Option(7.0, help="CFG scale."),
    steps: int = typer.Option(20, help="Sampling steps."),
    seed: int = typer.Option(1000, help="Seed of the first image (image i uses seed + i)."),
    out: Optional[Path] = typer.Option(None, help="Save the generated images here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary and per-image scores as JSON."),
):
    """Score pictures of the shapes world: object presence, shape, colour, count, relation."""
    import json

    from danqing.synthetic.captions import parse_prompt
    from danqing.synthetic.evaluate import evaluate_studio, score, summarise

    if images:
        from PIL import Image

        from danqing.outputs.infotext import parse_infotext
        from danqing.outputs.store import read_infotext

        scores = []
        for path in images:
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except Exception as exc:  # Pillow raises many kinds on damaged files
                raise ImageError(f"cannot read image {path}: {exc or type(exc).__name__}") from None
            text = prompt if prompt is not None else parse_infotext(read_infotext(path))[0]
            try:
                spec = parse_prompt(text)
            except ValueError as exc:
                raise InvalidRequest("prompt", str(exc)) from None
            s = score(img, spec)
            scores.append(s)
            found = ", ".join(f"{d.colour} {d.shape} ({d.x:.2f},{d.y:.2f})" for d in s.detections) or "nothing"
            typer.echo(f"{path}: object {s.object:.2f} count {s.count:.0f} relation {s.relation} | found: {found}")
        summary = summarise(scores)
    else:
        from danqing.studio import Studio
        from danqing.synthetic.scenes import eval_scenes

        if not 1 <= n <= 1000:
            raise InvalidRequest("n", f"must be 1-1000, got {n}")
        if lang not in ("en", "zh"):
            raise InvalidRequest("lang", f"must be en or zh, got {lang!r}")
        studio = Studio(ctx.obj)
        summary, scores = evaluate_studio(studio, eval_scenes(n), lang=lang, model=model, steps=steps,
                                          cfg_scale=cfg, seed=seed, out_dir=out)
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        json_out.write_text(json.dumps({"summary": summary, "images": [s.to_dict() for s in scores]}, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Entry point: offline first, then the Typer app; our errors become one line and exit 2."""
    from danqing.settings import force_offline, quiet_libraries

    force_offline()
    try:
        quiet_libraries()
        app(args=argv, standalone_mode=True)
    except (DanqingError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
