"""``danqing eval shapes`` and ``danqing eval portraits``: score pictures of the shapes world
(danqing/synthetic/evaluate.py) and of the portrait world (danqing/synthetic/portrait_reader.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import OUT_HELP, app, make_studio, out_target, refuse_existing
from danqing.files import atomic_write_text

eval_app = typer.Typer(help="Evaluate models and images: `danqing eval shapes`, `danqing eval portraits`.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


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
    out: Optional[str] = typer.Option(None, metavar="PATH", help="Save the generated images. " + OUT_HELP.format("not saved")),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary and per-image scores as JSON (a new file)."),
):
    """Score pictures of the shapes world: object presence, shape, colour, count, relation."""
    from danqing.synthetic.evaluate import check_held_out, evaluate_studio, score_files, summarise  # lazy: OpenCV
    from danqing.synthetic.scenes import eval_scenes

    if json_out is not None:
        refuse_existing(json_out)
    if images:
        def show(path, s):
            found = ", ".join(f"{d.colour} {d.shape} ({d.x:.2f},{d.y:.2f})" for d in s.detections) or "nothing"
            typer.echo(f"{path}: object {s.object:.2f} count {s.count:.0f} relation {s.relation} | found: {found}")

        scores = score_files(images, prompt, on_score=show)
        summary = summarise(scores)
    else:
        check_held_out(n, lang)
        target = out_target(out, Path(".")) if out is not None else None
        if target is not None:
            target.check_free(n)
        summary, scores = evaluate_studio(make_studio(ctx.obj), eval_scenes(n), lang=lang, model=model, steps=steps,
                                          cfg_scale=cfg, seed=seed, out_dir=target.folder if target else None,
                                          out_files=target.files(n) if target and target.file else None)
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary, "images": [s.to_dict() for s in scores]}, indent=1))


@eval_app.command("portraits")
def eval_portraits(
    ctx: typer.Context,
    images: Optional[list[Path]] = typer.Argument(None, help="Images to score; without any, generate the held-out portraits with --model."),
    prompt: Optional[str] = typer.Option(None, help="What the images should show; default: the prompt in each PNG's metadata."),
    model: Optional[str] = typer.Option(None, help="Model to generate with [default: the settings' default model]."),
    n: int = typer.Option(200, help="Held-out portrait prompts to generate (1-1000)."),
    lang: str = typer.Option("en", help="Prompt language: en or zh."),
    cfg: float = typer.Option(7.0, help="CFG scale."),
    steps: int = typer.Option(20, help="Sampling steps."),
    seed: int = typer.Option(1000, help="Seed of the first image (image i uses seed + i)."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help="Save the generated images. " + OUT_HELP.format("not saved")),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary and per-image scores as JSON (a new file)."),
):
    """Score pictures of the portrait world: every asked attribute (face, skin, hair, eyes, glasses, ...) and the style."""
    from danqing.synthetic.evaluate import check_held_out
    from danqing.synthetic.portrait_reader import evaluate_portraits_studio, score_portrait_files, summarise_portraits  # lazy: OpenCV
    from danqing.synthetic.portraits import eval_portraits as held_out

    if json_out is not None:
        refuse_existing(json_out)
    if images:
        def show(path, s):
            wrong = ", ".join(a for a, v in s.items() if v == 0.0 and a != "all") or "none"
            typer.echo(f"{path}: all {s['all']} | wrong: {wrong}")

        scores = score_portrait_files(images, prompt, on_score=show)
        summary = summarise_portraits(scores)
    else:
        check_held_out(n, lang)
        target = out_target(out, Path(".")) if out is not None else None
        if target is not None:
            target.check_free(n)
        summary, scores = evaluate_portraits_studio(make_studio(ctx.obj), held_out(n), lang=lang, model=model, steps=steps,
                                                    cfg_scale=cfg, seed=seed, out_dir=target.folder if target else None,
                                                    out_files=target.files(n) if target and target.file else None)
    typer.echo(f"summary: {json.dumps(summary)}")
    if json_out:
        atomic_write_text(json_out, json.dumps({"summary": summary, "images": scores}, indent=1))
