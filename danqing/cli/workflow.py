"""``danqing styles``, ``danqing xyz`` and ``danqing from-file``: the workflow tools of A1111
(styles.csv, the X/Y/Z plot, prompts from a file; docs/apps.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import (announce_device, app, dated, make_studio, out_target, run_generate,
                                 with_native_size)
from danqing.errors import InvalidRequest

AXIS_HELP = ("AXIS: VALUES, e.g. \"Steps: 4,8,12\", \"CFG Scale: 3-9 (+3)\", \"Denoising: 0.2-1 [5]\", "
             "\"Prompt S/R: red, blue\", \"Sampler: Euler a, DPM++ 2M\" (A1111's axis names and range syntax).")


def _base_fields(prompt, negative, steps, sampler, schedule, cfg, seed, width, height, model, clip_skip) -> dict:
    fields = {"prompt": prompt, "negative_prompt": negative or None, "steps": steps, "sampler": sampler,
              "schedule": schedule, "cfg_scale": cfg, "seed": seed, "width": width, "height": height,
              "model": model, "clip_skip": clip_skip}
    return {k: v for k, v in fields.items() if v is not None}


@app.command()
def styles(
    ctx: typer.Context,
    add: Optional[str] = typer.Option(None, "--add", metavar="NAME", help="Add (or replace) a style and write styles.csv [default: list the styles]."),
    prompt: str = typer.Option("", "--prompt", help="With --add: the style's prompt ({prompt} = where the prompt goes; else appended) [default: none]."),
    negative: str = typer.Option("", "--negative", help="With --add: the style's negative prompt [default: none]."),
):
    """List the styles of HOME/styles.csv (A1111's file format), or add one with --add."""
    from danqing.conditioning.styles import Style, read_styles, styles_path, write_styles

    path = styles_path(ctx.obj.home)
    table = read_styles(path)
    if add is not None:
        if not add.strip():
            raise InvalidRequest("add", "a style needs a name")
        table[add] = Style(add, prompt, negative)
        write_styles(path, table)
        print(f"{path}: {len(table)} style(s), {add!r} written")
        return
    print(f"# styles in {path}")
    for s in table.values():
        print(f"{s.name}\t{s.prompt}\t{s.negative_prompt}")


@app.command()
def xyz(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="The base prompt (A1111 syntax; wildcards and {a|b} variants drawn per cell)."),
    x: str = typer.Option(..., "--x", help="X axis: " + AXIS_HELP),
    y: Optional[str] = typer.Option(None, "--y", help="Y axis (same syntax) [default: none]."),
    z: Optional[str] = typer.Option(None, "--z", help="Z axis: one grid per Z value [default: none]."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt [default: none]."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps [default: 20]."),
    sampler: Optional[str] = typer.Option(None, help="Sampler [default: DPM++ 2M]."),
    schedule: Optional[str] = typer.Option(None, help="Schedule type [default: Automatic]."),
    cfg: Optional[float] = typer.Option(None, help="CFG scale [default: 7]."),
    seed: Optional[int] = typer.Option(None, help="Seed of every cell; -1 = one random seed for all [default: -1]."),
    width: Optional[int] = typer.Option(None, help="Width [default: the model's own size: 64 for danqing-tiny, 512 for SD1]."),
    height: Optional[int] = typer.Option(None, help="Height [default: the model's own size]."),
    model: Optional[str] = typer.Option(None, help="Checkpoint [default: the settings' default model]."),
    clip_skip: Optional[int] = typer.Option(None, help="CLIP skip [default: 1]."),
    style: list[str] = typer.Option([], "--style", help="A style of HOME/styles.csv applied to the base prompt (repeatable) [default: none]."),
    from_image: Optional[Path] = typer.Option(None, "--from", help="Start from an image's request (its PNG metadata); options here override [default: none]."),
    max_cells: int = typer.Option(100, help="Refuse plots with more cells than this."),
    out: Optional[str] = typer.Option(None, metavar="FOLDER", help="Folder for the cells and grids [default: outputs/txt2img-grids/DATE/xyz-NNNNN/]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """X/Y/Z plot: the request varied along up to three axes; a labelled grid per Z value
    (grid-zN.png) and every cell as its own PNG (cell-zN-yN-xN.png) with its own infotext."""
    from danqing.apps.prompting import Prompting
    from danqing.apps.xyz import NOTHING, parse_axis_option, plan_xyz, run_xyz
    from danqing.conditioning.styles import apply_styles
    from danqing.request import GenerationRequest

    fields = _base_fields(prompt, negative, steps, sampler, schedule, cfg, seed, width, height, model, clip_skip)
    if from_image is not None:
        from danqing.outputs.metadata import request_from_infotext
        from danqing.outputs.store import read_infotext

        base = request_from_infotext(read_infotext(from_image)).replace(**fields)
    else:
        if prompt is None:
            raise InvalidRequest("prompt", "give a base prompt, or --from IMAGE")
        base = GenerationRequest.create(**with_native_size(ctx.obj, fields))
    prompting = Prompting.at(ctx.obj.home)
    if style:
        p, n = apply_styles(base.prompt, base.negative_prompt, style, prompting.styles)
        base = base.replace(prompt=p, negative_prompt=n)
    axes = [parse_axis_option(a) if a else NOTHING for a in (x, y, z)]
    plan = plan_xyz(base, *axes, max_cells=max_cells, prompting=prompting)
    folder = Path(out) if out else _numbered(dated(ctx.obj, "txt2img-grids"), "xyz")
    if folder.exists() and any(folder.iterdir()):
        raise InvalidRequest("out", f"{folder} is not empty; give a new folder for the plot")

    studio = make_studio(ctx.obj)

    def progress(i, n):
        announce_device(studio)
        if not quiet:
            typer.echo(f"cell {i}/{n}", err=True)

    result = run_xyz(studio, plan, folder, on_cell=progress)
    for path in result.grid_paths:
        print(path)
    typer.echo(f"{len(result.paths)} cell(s) and {len(result.grid_paths)} grid(s) in {folder}", err=True)


def _numbered(parent: Path, stem: str) -> Path:
    """``parent/stem-NNNNN``, one more than the highest there."""
    highest = -1
    if parent.is_dir():
        for p in parent.glob(f"{stem}-*"):
            tail = p.name[len(stem) + 1:]
            if tail.isdigit():
                highest = max(highest, int(tail))
    return parent / f"{stem}-{highest + 1:05d}"


@app.command("from-file")
def from_file(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="One prompt per line, or A1111's line syntax: --prompt \"...\" --negative_prompt \"...\" --steps 20 --seed 5 ..."),
    prompt: str = typer.Option("", "--prompt", help="A base prompt each line's prompt is joined to (see --position) [default: none]."),
    position: str = typer.Option("start", help="Where a line's prompt goes: start or end of the base prompt."),
    negative: str = typer.Option("", "--negative", "-n", help="Base negative prompt [default: none]."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps [default: 20]."),
    sampler: Optional[str] = typer.Option(None, help="Sampler [default: DPM++ 2M]."),
    schedule: Optional[str] = typer.Option(None, help="Schedule type [default: Automatic]."),
    cfg: Optional[float] = typer.Option(None, help="CFG scale [default: 7]."),
    seed: Optional[int] = typer.Option(None, help="Seed [default: -1 = random per line]."),
    width: Optional[int] = typer.Option(None, help="Width [default: the model's own size: 64 for danqing-tiny, 512 for SD1]."),
    height: Optional[int] = typer.Option(None, help="Height [default: the model's own size]."),
    model: Optional[str] = typer.Option(None, help="Checkpoint [default: the settings' default model]."),
    clip_skip: Optional[int] = typer.Option(None, help="CLIP skip [default: 1]."),
    iterate_seed: bool = typer.Option(False, "--iterate-seed", help="Seed + batch pictures for each next line (A1111's 'Iterate seed every line')."),
    same_seed: bool = typer.Option(False, "--same-seed", help="One random seed for every line."),
    out: Optional[str] = typer.Option(None, metavar="FOLDER", help="Folder [default: outputs/txt2img-images/DATE/]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Prompts from a file (A1111's "Prompts from file or textbox"): one request per line, every
    line checked before the first picture is made."""
    from danqing.apps.prompting import Prompting, expand_request
    from danqing.apps.prompts_file import plan_lines
    from danqing.request import GenerationRequest

    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest("file", f"cannot read {file}: {exc}") from None
    base = GenerationRequest.create(**with_native_size(ctx.obj, _base_fields(
        prompt, negative, steps, sampler, schedule, cfg, seed, width, height, model, clip_skip)))
    prompting = Prompting.at(ctx.obj.home)
    jobs = plan_lines(base, text, styles=prompting.styles, position=position, iterate_seed=iterate_seed,
                      same_seed=same_seed)
    expanded = [expand_request(job.request, prompting) for job in jobs]  # every line drawn and checked first
    target = out_target(out if out is None or out.endswith("/") else out + "/", dated(ctx.obj, "txt2img-images"))
    studio = make_studio(ctx.obj)  # said at the first step
    for request, extra in expanded:
        run_generate(ctx.obj, request, target, quiet, studio=studio, extra_params=extra or None)
