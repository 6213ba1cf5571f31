"""``danqing eval shapes`` and ``danqing eval portraits``: score pictures of the shapes world
(danqing/synthetic/evaluate.py) and of the portrait world (danqing/synthetic/portrait_reader.py);
``danqing eval clip``: a CLIP model's held-out retrieval, or CLIP scores (models/clip_model.py);
``danqing eval unclip``: an unCLIP model's variations or its text-to-image through a prior;
``danqing eval cascade``: a pixel cascade's pictures at each stage; ``danqing eval motion``: a
motion module's held-out clips of the moving shapes world (synthetic/trajectory.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import OUT_HELP, announce_device, app, make_studio, out_target, refuse_existing
from danqing.files import atomic_write_text

eval_app = typer.Typer(help="Evaluate models and images: `danqing eval shapes`, `danqing eval portraits`, `danqing eval clip`, "
                            "`danqing eval unclip`, `danqing eval cascade`, `danqing eval motion`.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


# The options both worlds' commands take (typer reads each default afresh for every command).
PROMPT = typer.Option(None, help="What the images should show [default: the prompt in each PNG's metadata].")
MODEL = typer.Option(None, help="Model to generate with [default: the settings' default model].")
LANG = typer.Option("en", help="Prompt language: en or zh.")
CFG = typer.Option(7.0, help="CFG scale.")
STEPS = typer.Option(20, help="Sampling steps.")
SEED = typer.Option(1000, help="Seed of the first image (image i uses seed + i).")
SAMPLER = typer.Option("DPM++ 2M", help="Sampler (A1111's names, e.g. Euler a, LCM).")
SCHEDULE = typer.Option("Automatic", help="Schedule type (A1111's names, e.g. Karras, Simple).")
LORA = typer.Option([], "--lora", metavar="NAME[:WEIGHT]",
                    help="A LoRA of the models folder on every prompt (<lora:NAME:WEIGHT>; repeatable) [default: none].")
OUT = typer.Option(None, metavar="PATH", help="Save the generated images. " + OUT_HELP.format("not saved"))
JSON_OUT = typer.Option(None, "--json", help="Write the summary and per-image scores as JSON (a new file) [default: not written].")
VAE = typer.Option(None, "--vae", help="A VAE name overriding the model's (models/vae/ or bundled, e.g. danqing-tiny-vae-ft) [default: the model's own].")


@eval_app.command("shapes")
def eval_shapes(
    ctx: typer.Context,
    images: Optional[list[Path]] = typer.Argument(None, help="Images to score; without any, generate the held-out set with --model."),
    prompt: Optional[str] = PROMPT,
    model: Optional[str] = MODEL,
    n: int = typer.Option(200, help="Held-out prompts to generate (1-1000)."),
    lang: str = LANG,
    cfg: float = CFG,
    steps: int = STEPS,
    seed: int = SEED,
    sampler: str = SAMPLER,
    schedule: str = SCHEDULE,
    lora: list[str] = LORA,
    clip: Optional[str] = typer.Option(None, help="Also the CLIP score of each picture against its prompt with this CLIP "
                                               "model (danqing-tiny-clip, a folder of models/clip/ or a path), and its "
                                               "Spearman correlation with the object score [default: none]."),
    expand: bool = typer.Option(False, "--expand", help="Expand each held-out prompt into a detailed caption before "
                                                        "generating (the rule-based expander, synthetic.recaption)."),
    vae: Optional[str] = VAE,
    out: Optional[str] = OUT,
    json_out: Optional[Path] = JSON_OUT,
):
    """Score pictures of the shapes world: object presence, shape, colour, count, relation."""
    from danqing.synthetic import evaluate as world  # lazy: OpenCV
    from danqing.synthetic.captions import caption
    from danqing.synthetic.recaption import expand_prompt
    from danqing.synthetic.scenes import eval_scenes

    pairs: list = []  # (picture, the prompt's text) for --clip

    def show(path, s):
        found = ", ".join(f"{d.colour} {d.shape} ({d.x:.2f},{d.y:.2f})" for d in s.detections) or "nothing"
        typer.echo(f"{path}: object {s.object:.2f} count {s.count:.0f} relation {s.relation} | found: {found}")
        if clip:
            pairs.append(_picture_and_prompt(path, prompt))

    def generate(studio, **kw):
        held_out = eval_scenes(n)
        on_image = (lambda i, image, s: pairs.append((image, caption(held_out[i], lang)))) if clip else None
        write = (lambda scene, lg: expand_prompt(caption(scene, lg))) if expand else caption
        return world.evaluate_studio(studio, held_out, on_image=on_image, write=write, vae=vae, **kw)

    with_clip = _with_clip_score(ctx, clip, pairs)
    _evaluate(ctx, images, prompt, json_out, show=show,
              score_files=world.score_files, summarise=world.summarise, to_dict=lambda s: s.to_dict(),
              generate=generate, n=n, lang=lang, out=out, model=model, steps=steps, cfg_scale=cfg, seed=seed,
              sampler=sampler, schedule=schedule, suffix=lora_tags(lora), finish=with_clip)


@eval_app.command("clip")
def eval_clip(
    ctx: typer.Context,
    images: Optional[list[Path]] = typer.Argument(None, help="Images to score against their prompts; without any, the "
                                                         "held-out retrieval test."),
    prompt: Optional[str] = PROMPT,
    model: str = typer.Option("danqing-tiny-clip", help="CLIP model: danqing-tiny-clip, a folder of models/clip/ or a path."),
    n: int = typer.Option(200, help="Held-out scenes of the retrieval test (1-1000)."),
    distractors: int = typer.Option(9, help="Captions per scene that change one attribute (1-15)."),
    json_out: Optional[Path] = JSON_OUT,
):
    """Zero-shot retrieval on held-out scenes (pick a scene's caption among captions that change
    one attribute; English and Chinese), or the CLIP score of images against their prompts."""
    from danqing.errors import InvalidRequest
    from danqing.models.clip_model import load_clip

    if json_out is not None:
        refuse_existing(json_out)
    if not 1 <= n <= 1000:
        raise InvalidRequest("n", f"must be 1-1000, got {n}")
    if not 1 <= distractors <= 15:
        raise InvalidRequest("distractors", f"must be 1-15, got {distractors}")
    clip = load_clip(model, ctx.obj.models_dir)
    if images:
        pairs = [_picture_and_prompt(p, prompt) for p in images]
        scores = clip.score([im for im, _ in pairs], [t for _, t in pairs])
        for path, value in zip(images, scores):
            typer.echo(f"{path}: clip score {value:.2f}")
        summary = {"n": len(scores), "clip_score": round(sum(scores) / len(scores), 4)}
        rows = [{"image": str(p), "clip_score": v} for p, v in zip(images, scores)]
    else:
        from danqing.training.clip import retrieval_items, retrieval_scores
        from danqing.training.data import render_batch

        items = retrieval_items(n, distractors)
        pictures = render_batch([it.scene for it in items], clip.size, workers=1)
        summary = {"n": n, "candidates": distractors + 1}
        for lang in ("en", "zh"):
            summary.update({f"{k}_{lang}": v for k, v in retrieval_scores(clip, items, pictures, lang).items()})
        rows = []
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary, "images": rows}, indent=1))


@eval_app.command("unclip")
def eval_unclip(
    ctx: typer.Context,
    model: str = typer.Option(..., help="The unCLIP decoder: a Stable unCLIP or Kandinsky 2.2 decoder folder (a name "
                                        "under models/ or a path)."),
    prior: Optional[str] = typer.Option(None, help="An unCLIP prior folder: judge text-to-image through it instead of "
                                                   "variations [default: none, variations]."),
    n: int = typer.Option(50, help="Held-out scenes (1-1000)."),
    steps: int = STEPS,
    cfg: float = typer.Option(10.0, help="CFG scale (Stable unCLIP's default 10)."),
    seed: int = typer.Option(0, help="Seed of the first picture (picture i uses seed + i)."),
    noise_level: int = typer.Option(0, help="Stable unCLIP: noise added to the image embedding, 0-999."),
    image_encoder: Optional[str] = typer.Option(None, help="A Kandinsky 2.2 decoder's variations: the CLIP model that "
                                                "embeds the pictures (a bundled name, a folder under models/clip/ or "
                                                "a CLIPModel folder) [default: danqing-tiny-clip]."),
    pairs: str = typer.Option("held-out", help="Variations: of the evaluator's held-out pictures (colour-shape pairs no "
                                               "training picture has), or 'seen': of new pictures of the training pairs."),
    decoder_text: bool = typer.Option(True, "--decoder-text/--prior-only", help="With --prior: the decoder reads the "
                                      "prompt too (Stable unCLIP's way), or only the prior does (the decoder gets \"\")."),
    out: Optional[Path] = typer.Option(None, metavar="FOLDER", help="Save each source and its variation side by side "
                                                                   "there (a new folder) [default: not saved]."),
    json_out: Optional[Path] = JSON_OUT,
):
    """Judge an unCLIP model on held-out scenes of the shapes world: one variation of each
    picture (does it show the same coloured shapes? how far did they move?), or with --prior
    text-to-image through the prior, scored by the evaluator. A Kandinsky 2.2 decoder samples
    with its folder's scheduler and reads no text."""
    from danqing.errors import InvalidRequest
    from danqing.models.registry import Registry
    from danqing.models.unclip_models import (load_kandinsky_decoder, load_kandinsky_prior, load_unclip_folder,
                                              unclip_kind_of_folder)

    if json_out is not None:
        refuse_existing(json_out)
    if out is not None:
        refuse_existing(out)
    if not 1 <= n <= 1000:
        raise InvalidRequest("n", f"must be 1-1000, got {n}")
    if not 0 <= noise_level <= 999:
        raise InvalidRequest("noise_level", f"must be 0-999, got {noise_level}")
    if pairs not in ("held-out", "seen"):
        raise InvalidRequest("pairs", f"must be held-out or seen, got {pairs!r}")
    if prior is not None and pairs != "held-out":
        raise InvalidRequest("pairs", "--pairs chooses the pictures of variations; text-to-image (--prior) is judged on "
                                      "the evaluator's held-out prompts")
    registry = Registry(ctx.obj.models_dir)
    entry = registry.find("checkpoint", model)
    kind = unclip_kind_of_folder(entry.path)
    if kind not in ("unclip", "kandinsky-decoder"):
        raise InvalidRequest("model", f"{model}: not a Stable unCLIP or Kandinsky 2.2 decoder folder")
    if kind == "unclip" and image_encoder is not None:
        raise InvalidRequest("image_encoder", "a Stable unCLIP folder embeds pictures with its own image encoder; "
                                              "--image-encoder is for a Kandinsky 2.2 decoder")
    if kind == "kandinsky-decoder" and noise_level:
        raise InvalidRequest("noise_level", "a Kandinsky 2.2 decoder takes the embedding as it is; --noise-level is "
                                            "Stable unCLIP's")
    if prior is not None and image_encoder is not None:
        raise InvalidRequest("image_encoder", "text-to-image (--prior) embeds no picture; --image-encoder is for "
                                              "variations")
    if kind == "unclip":
        decoder = load_unclip_folder(entry.path)
    else:
        from danqing.models.clip_model import clip_folder
        from danqing.models.ip_adapter import load_image_encoder
        from danqing.training.unclip import KandinskyVariations  # lazy: imports torch

        encoder, processor = load_image_encoder(clip_folder(image_encoder or "danqing-tiny-clip", ctx.obj.models_dir))
        decoder = KandinskyVariations(load_kandinsky_decoder(entry.path), encoder, processor)
    if prior is None:
        from danqing.training.unclip import variation_rates  # lazy: imports torch

        save = None
        if out is not None:
            from PIL import Image

            out.mkdir(parents=True)

            def save(i, source, image, ok, shift):
                pair = Image.new("RGB", (source.width * 2, source.height))
                pair.paste(source, (0, 0))
                pair.paste(image, (source.width, 0))
                pair.save(out / f"{i:04d}-{'same' if ok else 'other'}.png")

        summary = variation_rates(decoder, n, steps=steps, cfg_scale=cfg, seed=seed, noise_level=noise_level,
                                  pairs=pairs, on_pair=save)
    else:
        from danqing.training.unclip import prior_text_to_image  # lazy: imports torch

        prior_entry = registry.find("checkpoint", prior)
        if unclip_kind_of_folder(prior_entry.path) != "kandinsky-prior":
            raise InvalidRequest("prior", f"{prior}: not an unCLIP prior folder (KandinskyV22PriorPipeline)")
        summary = prior_text_to_image(decoder, load_kandinsky_prior(prior_entry.path), n, steps=steps, cfg_scale=cfg,
                                      seed=seed, noise_level=noise_level, decoder_text=decoder_text, out_dir=out)
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary}, indent=1))


@eval_app.command("cascade")
def eval_cascade(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Stage I of a pixel cascade: a DeepFloyd IF folder (a name under models/ or a path)."),
    stage_2: Optional[str] = typer.Option(None, "--stage-2", help="Its stage II (an IF super-resolution folder) "
                                                                 "[default: none, stage I alone]."),
    baseline: Optional[str] = typer.Option(None, help="Also judge this 64x64 model's pictures of the same prompts and "
                                                      "seeds, enlarged 2x with Lanczos [default: none]."),
    n: int = typer.Option(200, help="Held-out scenes (1-1000)."),
    steps: int = typer.Option(50, help="Stage I's sampling steps (DDPM)."),
    cfg: float = CFG,
    upscale_steps: int = typer.Option(50, help="Stage II's sampling steps (DDPM)."),
    noise_level: int = typer.Option(100, help="Stage II's noise augmentation level of the stage-I picture, 0-999."),
    seed: int = SEED,
    thresholding: bool = typer.Option(False, "--thresholding", help="Instead: stage I with dynamic thresholding "
                                      "against static clipping at CFG 7 and 20 (object score, clipped pixels, "
                                      "saturation above the true pictures')."),
    out: Optional[Path] = typer.Option(None, metavar="FOLDER", help="Save each scene's pictures side by side there "
                                                                   "(a new folder) [default: not saved]."),
    json_out: Optional[Path] = JSON_OUT,
):
    """Judge a pixel cascade (danqing-tiny-if) on held-out scenes of the shapes world: the
    evaluator's scores of its stage-I pictures and of the 4x pictures of its stage II."""
    from danqing.errors import InvalidRequest
    from danqing.models.cascade_models import if_kind_of_folder, load_if_folder
    from danqing.models.registry import Registry

    for path in (json_out, out):
        if path is not None:
            refuse_existing(path)
    if not 1 <= n <= 1000:
        raise InvalidRequest("n", f"must be 1-1000, got {n}")
    if not 0 <= noise_level <= 999:
        raise InvalidRequest("noise_level", f"must be 0-999, got {noise_level}")
    registry = Registry(ctx.obj.models_dir)

    def stage(name: str, kind: str, option: str):
        entry = registry.find("checkpoint", name)
        if if_kind_of_folder(entry.path) != kind:
            raise InvalidRequest(option, f"{name}: not a DeepFloyd IF {'stage-I' if kind == 'if-i' else 'stage-II'} "
                                         f"folder ({'IFPipeline' if kind == 'if-i' else 'IFSuperResolutionPipeline'})")
        return load_if_folder(entry.path)

    first = stage(model, "if-i", "model")
    second = stage(stage_2, "if-ii", "stage_2") if stage_2 else None
    from danqing.training import cascade  # lazy: imports torch

    if thresholding:
        summary = {"thresholding": cascade.thresholding_errors(first, n, steps=steps, seed=seed)}
    else:
        base = None
        if baseline:
            from danqing.training.runs import load_float32

            base = load_float32(baseline, ctx.obj)[0]
        save = None
        if out is not None:
            from PIL import Image

            out.mkdir(parents=True)

            def save(i, prompt, pictures):
                size = max(p.width for p in pictures)
                row = Image.new("RGB", (size * len(pictures), size), "white")
                for k, p in enumerate(pictures):
                    row.paste(p.resize((size, size), Image.NEAREST), (k * size, 0))
                row.save(out / f"{i:04d}.png")

        summary = cascade.judge_cascade(first, second, n, steps=steps, cfg_scale=cfg, upscale_steps=upscale_steps,
                                        noise_level=noise_level, seed=seed, baseline=base, on_picture=save)
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary}, indent=1))


def _picture_and_prompt(path: Path, prompt: str | None):
    """(the picture, its prompt's text without <lora:...> tags) of an image file, for CLIP."""
    from danqing.conditioning.prompt_parser import strip_extra_networks
    from danqing.synthetic.evaluate import picture_and_prompt

    picture, text = picture_and_prompt(path, prompt)
    return picture, " ".join(strip_extra_networks(text)[0].split())


def _with_clip_score(ctx, name: str | None, pairs: list):
    """A ``finish`` step for ``_evaluate``: with a CLIP model named, each score gets its CLIP
    score and the summary their mean and their Spearman correlation with the object score."""
    if not name:
        return None
    from danqing.models.clip_model import load_clip

    clip = load_clip(name, ctx.obj.models_dir)  # before any generation: a wrong name costs nothing

    def finish(summary: dict, scores: list, rows: list[dict]) -> None:
        from scipy.stats import spearmanr

        values = clip.score([im for im, _ in pairs], [t for _, t in pairs])
        for row, v in zip(rows, values):
            row["clip_score"] = v
        summary["clip_score"] = round(sum(values) / len(values), 4)
        objects = [s.object for s in scores]
        rho = spearmanr(values, objects).statistic if len(set(objects)) > 1 and len(set(values)) > 1 else None
        summary["clip_spearman_object"] = None if rho is None else round(float(rho), 4)

    return finish


@eval_app.command("portraits")
def eval_portraits(
    ctx: typer.Context,
    images: Optional[list[Path]] = typer.Argument(None, help="Images to score; without any, generate the held-out portraits with --model."),
    prompt: Optional[str] = PROMPT,
    model: Optional[str] = MODEL,
    n: int = typer.Option(200, help="Held-out portrait prompts to generate (1-1000)."),
    lang: str = LANG,
    cfg: float = CFG,
    steps: int = STEPS,
    seed: int = SEED,
    sampler: str = SAMPLER,
    schedule: str = SCHEDULE,
    lora: list[str] = LORA,
    out: Optional[str] = OUT,
    json_out: Optional[Path] = JSON_OUT,
):
    """Score pictures of the portrait world: every asked attribute (face, skin, hair, eyes, glasses, ...) and the style."""
    from danqing.synthetic import portrait_reader as world  # lazy: OpenCV
    from danqing.synthetic.portraits import eval_portraits as held_out

    def show(path, s):
        wrong = ", ".join(a for a, v in s.items() if v == 0.0 and a != "all") or "none"
        typer.echo(f"{path}: all {s['all']} | wrong: {wrong}")

    _evaluate(ctx, images, prompt, json_out, show=show,
              score_files=world.score_portrait_files, summarise=world.summarise_portraits, to_dict=dict,
              generate=lambda studio, **kw: world.evaluate_portraits_studio(studio, held_out(n), **kw),
              n=n, lang=lang, out=out, model=model, steps=steps, cfg_scale=cfg, seed=seed, sampler=sampler,
              schedule=schedule, suffix=lora_tags(lora))


def lora_tags(loras: list[str]) -> str:
    """``["NAME", "NAME2:0.5"]`` -> ``" <lora:NAME:1> <lora:NAME2:0.5>"`` (a bad weight: exit 2)."""
    from danqing.errors import InvalidRequest

    tags = []
    for item in loras:
        name, _, weight = item.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise InvalidRequest("--lora", f"{item!r}: the weight after ':' must be a number, e.g. --lora {name}:0.8") from None
        if not name or any(c in name for c in "<>:"):
            raise InvalidRequest("--lora", f"{item!r}: give a LoRA name of the models folder, optionally :WEIGHT")
        tags.append(f" <lora:{name}:{w:g}>")
    return "".join(tags)


def _evaluate(ctx, images, prompt, json_out, *, show, score_files, summarise, to_dict, generate, n, lang, out,
              finish=None, **gen):
    """One evaluation, either world: score ``images`` (against ``prompt`` or their metadata), or
    generate the held-out set of ``n`` prompts in ``lang``; print the summary, write the JSON.
    ``finish(summary, scores, rows)`` may add to the summary and the per-image rows."""
    from danqing.synthetic.evaluate import check_held_out

    if json_out is not None:
        refuse_existing(json_out)
    if images:
        scores = score_files(images, prompt, on_score=show)
        summary = summarise(scores)
    else:
        check_held_out(n, lang)
        target = out_target(out, Path(".")) if out is not None else None
        if target is not None:
            target.check_free(n)
        studio = make_studio(ctx.obj)
        announce_device(studio)
        summary, scores = generate(studio, lang=lang, out_dir=target.folder if target else None,
                                   out_files=target.files(n) if target and target.file else None, **gen)
    rows = [to_dict(s) for s in scores]
    if finish is not None:
        finish(summary, scores, rows)
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary, "images": rows}, indent=1))


@eval_app.command("motion")
def eval_motion(
    ctx: typer.Context,
    motion: Optional[str] = typer.Option(None, help="Motion module: a name in models/motion/ [default: the only one installed]."),
    model: str = typer.Option("danqing-tiny", help="Checkpoint the module animates."),
    n: int = typer.Option(50, help="Held-out clips (colour-shape-motion combinations never trained on; 1-500)."),
    lang: str = LANG,
    cfg: float = CFG,
    steps: int = STEPS,
    seed: int = typer.Option(6000, help="Seed of the first clip (clip i uses seed + i)."),
    sampler: str = SAMPLER,
    lora: list[str] = typer.Option([], "--lora", metavar="NAME[:WEIGHT]",
                                   help="A LoRA on every prompt (<lora:NAME:WEIGHT>; repeatable), e.g. the module's "
                                        "cross-attention LoRA from danqing train motion [default: none]."),
    kind: str = typer.Option("line", help="Held-out clips of this kind: line (the direction's bar), arc, grow, shrink "
                                          "or recolour."),
    direction_lora: Optional[str] = typer.Option(
        None, "--direction-lora", metavar="PREFIX",
        help="Each clip's direction's motion LoRA too: <lora:PREFIX-DIRECTION:1> (PREFIX-right, -left, -up and -down "
             "in models/lora/, as configs/train/danqing-tiny-motion-lora.toml trains them) [default: none]."),
    vae: Optional[str] = VAE,
    cross_frame: bool = typer.Option(False, "--cross-frame", help="Self-attention also to the first and previous "
                                                                 "frames (cross-frame attention) [default: off]."),
    travel: bool = typer.Option(False, "--travel", help="Each straight clip's caption rewritten as prompt travel by "
                                                         "rule (synthetic.motion.travel_prompt: 0: the object at its "
                                                         "start, the last frame: at its end, in the still world's "
                                                         "words) [default: the motion caption as it is]."),
    travel_size: str = typer.Option("large", "--travel-size", help="With --travel: the size the keyframes name for an "
                                                                    "object whose size the caption leaves unsaid: large, "
                                                                    "small, or none (left unsaid)."),
    per_frame: bool = typer.Option(False, "--per-frame", help="No motion module: each frame drawn by the checkpoint "
                                                               "as its own picture, to measure what the module adds "
                                                               "[default: off]."),
    out: Optional[Path] = typer.Option(None, metavar="FOLDER", help="Save each clip as FOLDER/NNNNN.gif (a new or "
                                                                     "empty folder) [default: not saved]."),
    json_out: Optional[Path] = JSON_OUT,
):
    """Generate the moving shapes world's held-out clips ("a red circle moving to the right")
    and judge them: direction of motion, speed, identity kept across frames, each frame's
    object score (synthetic/trajectory.py)."""
    from danqing.errors import InvalidRequest
    from danqing.outputs.video import save_video
    from danqing.request_video import VideoRequest
    from danqing.synthetic.captions import LANGS
    from danqing.synthetic.motion import KINDS, heldout_clips, heldout_kind_clips, motion_caption, travel_prompt
    from danqing.synthetic.trajectory import score_change, score_clip, summarise_changes, summarise_clips
    from danqing.video.studio import VideoStudio

    if not 1 <= n <= 500:
        raise InvalidRequest("n", f"must be 1-500, got {n}")
    if lang not in LANGS:
        raise InvalidRequest("lang", f"must be one of {', '.join(LANGS)}, got {lang!r}")
    if json_out is not None:
        refuse_existing(json_out)
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequest("out", f"{out} exists and is not an empty folder")
    if kind not in KINDS:
        raise InvalidRequest("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if travel_size not in ("large", "small", "none"):
        raise InvalidRequest("travel-size", f"must be large, small or none, got {travel_size!r}")
    size = None if travel_size == "none" else travel_size
    videos = VideoStudio(make_studio(ctx.obj))
    suffix = lora_tags(lora)
    scores, rows = [], []
    clips = heldout_clips(n) if kind == "line" else heldout_kind_clips(n, kind)
    for i, clip in enumerate(clips):
        prompt = motion_caption(clip, lang)
        prompt = (travel_prompt(prompt, clip.frames, size) if travel and clip.kind == "line" else prompt) + suffix
        if direction_lora and clip.kind in ("line", "arc"):  # as AnimateDiff users add a PanLeft / PanRight motion LoRA
            prompt += lora_tags([f"{direction_lora}-{clip.direction}"])
        request = VideoRequest(prompt=prompt, frames=clip.frames, fps=8, width=64, height=64, steps=steps,
                               cfg_scale=cfg, sampler=sampler, seed=seed + i, model=model, motion_module=motion, vae=vae,
                               cross_frame_attention=cross_frame, motion=not per_frame)
        result = videos.generate(request)
        s = (score_clip(result.clips[0], clip.colour, clip.shape, clip.direction) if kind == "line"
             else score_change(result.clips[0], clip))
        scores.append(s)
        rows.append({"prompt": prompt, "seed": seed + i, **s.to_dict()})
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            save_video(result.clips[0], out / f"{i:05d}.gif", 8, result.parameters[0])
        if kind == "line":
            typer.echo(f"{i + 1}/{n} {prompt.replace(chr(10), ' / ')}: direction {'right' if s.direction else 'wrong'}, "
                       f"identity {'kept' if s.identity else 'lost'}, object {s.object:.2f}")
        else:
            typer.echo(f"{i + 1}/{n} {prompt}: {kind} {'done' if s.done else 'not done'}, "
                       f"object {'kept' if s.kept else 'lost'}, object score {s.object:.2f}")
    summary = {"n": n, "lang": lang, "kind": kind, "motion": None if per_frame else result.request.motion_module, "model": model,
               "lora": lora, "direction_lora": direction_lora, "travel": travel, "travel_size": travel_size if travel else None, "vae": vae, "cross_frame": cross_frame, "steps": steps,
               **(summarise_clips(scores) if kind == "line" else summarise_changes(scores))}
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary, "clips": rows}, indent=1))
