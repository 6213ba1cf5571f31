"""``danqing preprocess`` (control maps) and ``danqing app ...`` (the control projects,
docs/control.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import (OUT_HELP, announce_device, app, dated, make_studio, new_picture_path, out_target,
                                refuse_existing)
from danqing.errors import InvalidRequest


@app.command()
def preprocess(
    ctx: typer.Context,
    kind: str = typer.Argument(..., metavar="TYPE", help="Preprocessor: canny, lineart, lineart_anime, scribble, softedge, mlsd, tile, blur, shuffle, segmentation, invert, depth, normal, openpose, none."),
    image: Path = typer.Argument(..., help="Picture (openpose: a picture, with a ViTPose model in models/preprocessors/openpose/, or an OpenPose JSON file)."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=OUT_HELP.format("IMAGE-TYPE.png beside the picture") + " openpose on a picture also writes the detected pose as OUT.json."),
    res: int = typer.Option(512, help="Processor resolution: the short side the map is made at."),
    a: Optional[float] = typer.Option(None, "--a", help="The preprocessor's first parameter (canny: low threshold) [default: the preprocessor's]."),
    b: Optional[float] = typer.Option(None, "--b", help="The preprocessor's second parameter (canny: high threshold) [default: the preprocessor's]."),
):
    """Turn a picture into a control map for ControlNet (`danqing preprocess canny photo.jpg`)."""
    from danqing.editing.images import load_image  # lazy: the preprocessors import torch
    from danqing.outputs.store import save_png, save_text
    from danqing.preprocess import get_preprocessor, run_preprocessor

    p = get_preprocessor(kind)
    out_path = out_target(out, image.parent).path(f"{image.stem}-{kind}.png")
    pose_out = out_path.with_suffix(".json") if kind == "openpose" and image.suffix.lower() != ".json" else None
    refuse_existing(*(path for path in (out_path, pose_out) if path is not None))
    if kind == "openpose" and image.suffix.lower() == ".json":
        from danqing.preprocess.models import render_pose_json

        result = render_pose_json(image)
    else:
        picture = load_image(image, "image")
        result = run_preprocessor(kind, picture, resolution=res, a=a, b=b, models_dir=ctx.obj.models_dir)
    a_val = p.a_default if a is None else a
    b_val = p.b_default if b is None else b
    pose = result.info.get("openpose") if pose_out is not None else None
    save_png(result, out_path, f"Preprocessor: {kind}, Resolution: {res}, A: {a_val}, B: {b_val}")
    print(f"{out_path}  {result.width}x{result.height}")
    if pose is not None:  # the detected keypoints, in the format `preprocess openpose FILE.json` renders
        save_text(pose, pose_out)
        print(f"{pose_out}  {len(json.loads(pose)['people'])} people")


app_app = typer.Typer(help="The projects of the course 《AI绘画核心技术与实战》 (2023): `danqing app colorize|qr|text|restyle` (docs/control.md).",
                      no_args_is_help=True)
app.add_typer(app_app, name="app")


def _app_out(settings, out: Optional[str], stem: str) -> Path:
    """The one picture of an app: ``--out`` as a file, or a folder's next ``NNNNN-STEM.png``
    (default folder: HOME/outputs/app-images/DATE/)."""
    return new_picture_path(out_target(out, dated(settings, "app-images")), stem)


def _studio(settings):
    """The app's studio, its device said."""
    studio = make_studio(settings)
    announce_device(studio)
    return studio


def _app_help(default: str) -> str:
    return OUT_HELP.format(f"outputs/app-images/DATE/NNNNN-{default}")


@app_app.command("colorize")
def app_colorize(
    ctx: typer.Context,
    drawing: Path = typer.Argument(..., help="Line drawing (black lines on white, or white on black)."),
    prompt: str = typer.Argument(..., help="What to paint, colours included: 'a red circle and a blue square'."),
    hints: Optional[Path] = typer.Option(None, help="Colour hints: a rough colour sketch of the same framing [default: none]."),
    seed: int = typer.Option(0), model: Optional[str] = typer.Option(None, help="Line-art ControlNet [default: danqing-tiny-lineart]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model [default: the settings' default]."),
    size: Optional[int] = typer.Option(None, help="Output size [default: 64, the bundled model's]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=_app_help("colorized-SEED.png")),
):
    """Line-art colourisation: a drawing + a prompt -> a coloured picture that keeps the lines."""
    from danqing.apps.control_projects import colorize  # lazy: imports torch
    from danqing.editing.images import load_image
    from danqing.outputs.store import save_png

    path = _app_out(ctx.obj, out, f"colorized-{seed}")
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
    checkpoint: Optional[str] = typer.Option(None, help="Base model [default: the settings' default]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=_app_help("qr-SEED.png")),
):
    """QR-code art: a picture that still scans. Retries strengths/seeds until OpenCV reads it back."""
    from danqing.apps.control_projects import qr_art  # lazy: imports torch
    from danqing.outputs.store import save_png

    path = _app_out(ctx.obj, out, f"qr-{seed}")
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
    seed: int = typer.Option(0), size: Optional[int] = typer.Option(None, help="Output size [default: 64, the bundled model's]."),
    model: Optional[str] = typer.Option(None, help="ControlNet [default: danqing-tiny-canny]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model [default: the settings' default]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=_app_help("text-SEED.png")),
):
    """Creative text: a picture shaped like a word."""
    from danqing.apps.control_projects import creative_text  # lazy: imports torch
    from danqing.outputs.store import save_png

    path = _app_out(ctx.obj, out, f"text-{seed}")
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
    seed: int = typer.Option(0), size: Optional[int] = typer.Option(None, help="Output size [default: 64, the bundled model's]."),
    model: Optional[str] = typer.Option(None, help="ControlNet [default: danqing-tiny-canny]."),
    module: Optional[str] = typer.Option(None, help="Preprocessor [default: canny; depth with a depth ControlNet]."),
    checkpoint: Optional[str] = typer.Option(None, help="Base model [default: the settings' default]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=_app_help("restyled-SEED.png; -img2img.png beside it")),
):
    """Photo restyling through ControlNet, compared with plain img2img at the same strength."""
    from danqing.apps.control_projects import restyle  # lazy: imports torch
    from danqing.editing.images import load_image
    from danqing.outputs.store import save_png

    path = _app_out(ctx.obj, out, f"restyled-{seed}")
    plain_path = path.with_name(path.stem + "-img2img.png")
    refuse_existing(plain_path)
    r = restyle(_studio(ctx.obj), load_image(photo, "photo"), prompt, seed=seed, size=size, model=model, module=module,
                checkpoint=checkpoint, strength=strength)
    print(save_png(r.controlled, path, f"Restyle: {prompt}"))
    print(save_png(r.plain, plain_path, f"img2img: {prompt}"))
    print(f"edge F1 with the photo: ControlNet {r.f1_controlled:.3f}, plain img2img {r.f1_plain:.3f}")
