"""``danqing 3d``: text-to-3D by score distillation (danqing/threed/, docs/3d.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import app, dated, make_studio


@app.command("3d")
def three_d(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="What the object should look like, e.g. \"a red ball\"."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt [default: none]."),
    steps: int = typer.Option(400, help="Optimisation steps."),
    size: int = typer.Option(64, help="Render size in pixels (a multiple of 8, at most the model's picture size)."),
    seed: int = typer.Option(0, help="Seed of every random draw of the run."),
    guidance: float = typer.Option(100.0, help="CFG scale of score distillation (DreamFusion: 100)."),
    lr: float = typer.Option(0.05, help="Learning rate of the voxel grids."),
    grid: int = typer.Option(48, help="Voxel grid points per axis."),
    samples: int = typer.Option(48, help="Samples per ray."),
    cameras: Optional[str] = typer.Option(None, help="Camera preset: dreamfusion or shapes [default: the model's]."),
    view_prompts: Optional[bool] = typer.Option(None, "--view-prompts/--no-view-prompts", help="Add \"front view\", \"side view\", ... by camera [default: the model's: off for danqing-tiny, on for others]."),
    background: Optional[str] = typer.Option(None, help="learned (an MLP of the direction), white, grey or black [default: the model's: grey for danqing-tiny, learned for others]."),
    frames: int = typer.Option(16, help="Turntable frames."),
    checkpoint_every: int = typer.Option(100, help="Steps between checkpoints (NAME.ckpt; 0: only at the end)."),
    model: Optional[str] = typer.Option(None, help="Checkpoint name, hash or path [default: settings' default model]."),
    resume: Optional[Path] = typer.Option(None, help="Continue a stopped run from its NAME.ckpt (the same options) [default: none]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help="NAME.glb, NAME.obj or NAME.ply: all three are written, with NAME.json (the parameters), NAME.gif (the turntable) and NAME.ckpt [default: outputs/3d/DATE/PROMPT-SEED.glb]."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default; 1 is fastest on a busy machine)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Make a 3D object from a prompt: a voxel field optimised by score distillation against
    the model, written as a mesh with vertex colours and a turntable GIF."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    import torch

    from danqing.threed.export import output_paths  # lazy: imports torch
    from danqing.threed.make import make_3d, prepare_3d
    from danqing.threed.run import ThreeDRequest

    request = ThreeDRequest(prompt=prompt, negative_prompt=negative, model=model, steps=steps, size=size, seed=seed,
                            guidance=guidance, lr=lr, grid=grid, samples=samples, cameras=cameras,
                            view_prompts=view_prompts, background=background, frames=frames,
                            checkpoint_every=checkpoint_every)
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "object"
        out = str(dated(ctx.obj, "3d") / f"{slug}-{seed}.glb")
    paths = output_paths(out)
    if threads:
        torch.set_num_threads(threads)
    request, loaded = prepare_3d(make_studio(ctx.obj), request, paths)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console, disable=quiet,
                  transient=True) as progress:
        task = progress.add_task("optimising", total=steps, loss="-")
        made = make_3d(loaded, request, paths, resume=resume,
                       on_step=lambda r: progress.update(task, completed=r.step, loss=f"{r.loss:.1f}"))
    for path in made.paths:
        print(path)
    mesh = made.params["mesh"]
    console.print(f"{made.result.steps_done} steps in {made.result.seconds:.0f}s; mesh {mesh['vertices']} vertices, "
                  f"{'watertight' if mesh['watertight'] else 'not watertight'}; checkpoint {paths.checkpoint}")
