"""``danqing app portrait ...``: the portrait studio on real photos (docs/apps.md, "Portrait
studio"): ``add`` a person from photos, list ``people`` and ``styles``, ``train`` the person's
LoRA, ``make`` portraits in a style and ``rank`` pictures of a person (with optional face
fusion)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from danqing.cli.common import dated, refuse_existing
from danqing.cli.control import app_app
from danqing.errors import InvalidRequest

portrait_app = typer.Typer(help="Portrait studio: a person from photos, style templates, ranking by identity "
                                "(docs/apps.md).", no_args_is_help=True)
app_app.add_typer(portrait_app, name="portrait")

BACKEND_HELP = ("Face backend: dlib (models of the face-recognition-models package), opencv (YuNet/SFace ONNX files "
                "in models/faces/) or world (danqing-portrait-faces, for the portrait world's people).")


def _backend(settings, name: str, detector: str):
    from danqing.faces import load_backend  # lazy: dlib / OpenCV

    if name != "dlib" and detector != "hog":
        raise InvalidRequest("detector", "--detector chooses dlib's detector (hog or cnn); the opencv backend has YuNet")
    return load_backend(name, models_dir=settings.models_dir, **({"detector": detector} if name == "dlib" else {}))


@portrait_app.command("add")
def portrait_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The person's name (letters, digits, - and _): people/NAME/ under the home."),
    photos: List[Path] = typer.Argument(..., help="Photos of the person, or folders of them (5-20 clear photos is best)."),
    trigger: Optional[str] = typer.Option(None, help="The person's trigger word in captions and prompts [default: dq_NAME]."),
    size: int = typer.Option(512, help="Side of the training crops (face and head-and-shoulders)."),
    min_photos: int = typer.Option(3, "--min-photos", help="Accepted photos needed at least."),
    backend: str = typer.Option("dlib", help=BACKEND_HELP),
    detector: str = typer.Option("hog", help="dlib's face detector: hog (fast, frontal) or cnn (slower, turned faces too)."),
    captioner: Optional[Path] = typer.Option(None, help="A local transformers image-to-text model folder (BLIP, GIT) whose captions are added (appearance words removed) [default: template captions]."),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing person of that name."),
):
    """Add a person from photos: verdicts with reasons, aligned crops and captions in people/NAME/.

    Each photo needs one clear, sharp, frontal face and must not repeat another; the table says
    why a photo is rejected, and people/NAME/contact-sheet.png shows it."""
    from rich.console import Console

    from danqing.apps.portrait import IngestPolicy, ingest, verdict_table
    from danqing.apps.portrait_people import TransformersCaptioner, prepare_person
    from danqing.models.names import check_new_name

    settings = ctx.obj
    check_new_name(name, "name", "person")
    folder = settings.home / "people" / name
    if folder.exists() and not replace:
        raise InvalidRequest("name", f"person {name!r} exists ({folder}); choose another name or pass --replace")
    if min_photos < 1:
        raise InvalidRequest("min-photos", f"{min_photos}: at least 1")
    faces = _backend(settings, backend, detector)
    text = TransformersCaptioner(captioner) if captioner is not None else None
    report = ingest(list(photos), faces, IngestPolicy(min_photos=min_photos))
    Console(width=120).print(verdict_table(report))
    out = prepare_person(settings.home, name, report, trigger=trigger, size=size, captioner=text, overwrite=replace)
    print(f"{out}  {len(report.accepted)} photos -> {2 * len(report.accepted)} crops in {out / 'train'}")
    print(f"{out / 'contact-sheet.png'}")


@portrait_app.command("people")
def portrait_people(ctx: typer.Context):
    """List the people added (people/ under the home)."""
    import json

    from danqing.apps.portrait_people import PEOPLE, people

    for name in people(ctx.obj.home):
        info = json.loads((ctx.obj.home / PEOPLE / name / "person.json").read_text(encoding="utf-8"))
        print(f"{name}  trigger={info['trigger']}  photos={len(info['accepted'])}  size={info['size']}")


@portrait_app.command("styles")
def portrait_styles(ctx: typer.Context):
    """List the style templates (danqing's, and yours in styles/portrait/ under the home)."""
    from rich.console import Console
    from rich.table import Table

    from danqing.apps.portrait_styles import load_styles

    table = Table(title="portrait styles (add yours as styles/portrait/NAME.toml)")
    for col in ("name", "title", "size", "sampler", "steps", "cfg", "person LoRA", "style LoRA", "from"):
        table.add_column(col)
    for s in load_styles(ctx.obj.home).values():
        sampler = s.sampler if s.schedule == "Automatic" else f"{s.sampler} {s.schedule}"
        table.add_row(s.name, s.title, f"{s.width}x{s.height}", sampler, str(s.steps), f"{s.cfg:g}",
                      f"{s.person_lora_weight:g}", f"{s.style_lora}:{s.style_lora_weight:g}" if s.style_lora else "-",
                      s.source)
    Console(width=160).print(table)


@portrait_app.command("train")
def portrait_train(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A person added with `portrait add`."),
    recipe: str = typer.Option("course", help="course (rank 32 on UNet and text encoder, batch 1, lr 1e-4 cosine, "
                                              "200 steps per training picture), cpu (50 steps per picture, lr 2e-4) "
                                              "or tiny (danqing's 64-px models: the text encoder and the trigger's "
                                              "embedding only (new vectors from the person's description where "
                                              "person.json has one), 100 steps per picture, lr 1e-3, the person's "
                                              "pixels weighted 5x)."),
    steps: Optional[int] = typer.Option(None, help="Training steps [default: the recipe's: 200 (course), 50 (cpu) or 100 (tiny) per training picture]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: the recipe's: 1e-4 (course), 2e-4 (cpu) or 1e-3 (tiny)]."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank [default: the recipe's: 32]."),
    prior_images: Optional[int] = typer.Option(None, "--prior-images", help="Pictures of anyone the base model draws "
                                               "and the LoRA trains on with the empty caption, so CFG keeps the person "
                                               "(0: none) [default: the recipe's: 0]."),
    resolution: Optional[int] = typer.Option(None, help="Training side [default: the person's crop size]."),
    base: Optional[str] = typer.Option(None, help="Checkpoint to train on [default: the settings' model]."),
    lora: Optional[str] = typer.Option(None, help="The LoRA's name in models/lora/ [default: the person's name]."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of continuing the person's last run."),
    replace: bool = typer.Option(False, "--replace", help="Replace an installed LoRA of that name."),
):
    """Train the person's LoRA on people/NAME/train (the course's recipe); install it in models/lora/.

    The run (runs/person-NAME/ under the home) writes four checkpoints; the same command again
    continues from the newest. Use the LoRA with `portrait make NAME --lora NAME`."""
    import shutil

    from danqing.apps.portrait_people import load_person
    from danqing.apps.portrait_train import person_lora_config
    from danqing.files import atomic_save
    from danqing.models.names import check_new_name
    from danqing.training import finetune
    from danqing.training.config import LoraTrainConfig
    from danqing.training.runs import prune_checkpoints

    settings = ctx.obj
    person = load_person(settings.home, name)
    lora = check_new_name(lora or name, "lora", "LoRA")
    target = settings.models_dir / "lora" / f"{lora}.safetensors"
    if target.exists() and not replace:
        raise InvalidRequest("lora", f"models/lora/{lora}.safetensors exists; choose another --lora or pass --replace")
    raw = person_lora_config(person, name=lora, base=base or settings.default_model, recipe=recipe,
                             output_dir=settings.home / "runs" / f"person-{name}",
                             overrides={"steps": steps, "lr": lr, "rank": rank, "resolution": resolution,
                                        "prior_images": prior_images})
    cfg = LoraTrainConfig.model_validate(raw)
    typer.echo(f"{name}: {cfg.train.steps} steps, rank {cfg.network.rank}, lr {cfg.train.lr:g} "
               f"{cfg.train.lr_scheduler}, {cfg.data.resolution} px, on {cfg.model.base}"
               + (f", {cfg.prior.n_class_images} unconditional regularisation pictures" if cfg.prior.enabled else ""),
               err=True)
    run_dir = Path(cfg.output.output_dir)
    summary = finetune.trainer("lora")(cfg, resume=not fresh, log=lambda line: typer.echo(line, err=True),
                                       settings=settings, on_step=lambda *_: prune_checkpoints(run_dir))
    prune_checkpoints(run_dir)
    made = Path(summary["files"][0])
    atomic_save(target, lambda p: shutil.copyfile(made, p), overwrite=replace)
    print(f"{target}  <lora:{lora}:1>")


@portrait_app.command("rank")
def portrait_rank(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A person added with `portrait add`."),
    pictures: List[Path] = typer.Argument(..., help="Pictures of the person (e.g. generated portraits)."),
    keep: int = typer.Option(4, help="How many of the best to keep."),
    fuse: Optional[float] = typer.Option(None, help="Fuse the person's best face into each picture first, at this strength (0-1) [default: no fusing]."),
    fuse_method: str = typer.Option("seamless", "--fuse-method", help="seamless (Poisson blending) or alpha (feathered cross-fade)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the kept pictures (RANK-SCORE-NAME.png) "
                                      "[default: outputs/portrait-ranked/DATE/NAME]."),
    backend: Optional[str] = typer.Option(None, help=BACKEND_HELP + " [default: the one the person was added with]"),
):
    """Rank pictures by face similarity to a person, optionally fusing their face in; keep the best.

    The score is the cosine similarity of the picture's face embedding to the person's mean."""
    import numpy as np
    from PIL import Image

    from danqing.apps.portrait_make import with_fields
    from danqing.apps.portrait_people import backend_of, fuse_and_rank, load_person
    from danqing.outputs.store import save_png
    from danqing.pictures import load_image

    person = load_person(ctx.obj.home, name)
    if keep < 1:
        raise InvalidRequest("keep", f"{keep}: at least 1")
    images = [np.asarray(load_image(p, "pictures")) for p in pictures]
    faces = _backend(ctx.obj, backend or backend_of(person), "hog")
    ranked = fuse_and_rank(images, person, faces, keep=keep, fuse=fuse, method=fuse_method)
    out = out or dated(ctx.obj, "portrait-ranked") / name
    names = [out / f"{r + 1:02d}-{item.score or 0:.3f}-{pictures[item.index].stem}.png"
             for r, item in enumerate(ranked)]
    refuse_existing(*names)
    for r, (item, path) in enumerate(zip(ranked, names), 1):
        fields = item.metadata(r, len(pictures), faces)
        if item.fused:
            fields["Face fusion"] = f"{fuse:g} {fuse_method}"
        with Image.open(pictures[item.index]) as im:  # the picture's own infotext, with the ranking added
            before = im.info.get("parameters") or ""
        save_png(Image.fromarray(item.image), path, with_fields(before, fields))
        print(f"{path}  score={_score(item.score)}{'  fused' if item.fused else ''}")


def _score(score: float | None) -> str:
    return "-" if score is None else f"{score:.4f}"


@portrait_app.command("make")
def portrait_make(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A person added with `portrait add`."),
    style: str = typer.Option("ink-sketch", help="A style template (`danqing app portrait styles`)."),
    n: int = typer.Option(4, "-n", help="Pictures to generate."),
    keep: Optional[int] = typer.Option(None, help="How many of the best to keep [default: all, ranked]."),
    lora: Optional[str] = typer.Option(None, help="The person's LoRA in models/lora/, by name (e.g. trained with `danqing train lora` on people/NAME/train); [default: none: the style's prompt alone]."),
    model: Optional[str] = typer.Option(None, help="Checkpoint name or path [default: the settings' model]."),
    seed: int = typer.Option(-1, help="First seed (-1: random)."),
    steps: Optional[int] = typer.Option(None, help="Override the style's steps [default: the style's]."),
    fuse: Optional[float] = typer.Option(None, help="Fuse the person's best face into each picture at this strength (0-1) [default: no fusing]."),
    fuse_method: str = typer.Option("seamless", "--fuse-method", help="seamless (Poisson blending) or alpha (feathered cross-fade)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the kept pictures [default: outputs/portrait-images/NAME/DATE]."),
    backend: Optional[str] = typer.Option(None, help=BACKEND_HELP + " [default: the one the person was added with]"),
):
    """Generate N portraits of a person in a style, fuse their face in (optional), keep the best.

    Each kept picture is RANK-SCORE-SEED.png with its infotext plus the rank and identity score."""
    import datetime

    from PIL import Image

    from danqing.apps.portrait_make import make_portraits
    from danqing.apps.portrait_people import backend_of, load_person
    from danqing.apps.portrait_styles import get_style
    from danqing.cli.common import announce_device, make_studio
    from danqing.outputs.store import save_png

    settings = ctx.obj
    person = load_person(settings.home, name)
    template = get_style(style, settings.home)
    faces = _backend(settings, backend or backend_of(person), "hog")
    folder = out or settings.outputs_dir / "portrait-images" / name / datetime.date.today().isoformat()
    studio = make_studio(settings)
    announce_device(studio)
    made = make_portraits(studio, person, template, faces, n=n, keep=keep, person_lora=lora,
                          model=model, seed=seed, steps=steps, fuse=fuse, method=fuse_method,
                          on_picture=lambda i, total: typer.echo(f"picture {i}/{total}", err=True))
    paths = [folder / f"{r:02d}-{p.ranked.score or 0:.3f}-{p.seed}.png" for r, p in enumerate(made, 1)]
    refuse_existing(*paths)
    for p, path in zip(made, paths):
        save_png(Image.fromarray(p.ranked.image), path, p.infotext)
        print(f"{path}  seed={p.seed}  score={_score(p.ranked.score)}{'  fused' if p.ranked.fused else ''}")
