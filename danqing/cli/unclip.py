"""``danqing variations``: pictures like a given one, with an unCLIP-family model (Stable
unCLIP, Kandinsky 2.2); ``danqing generate`` hands Kandinsky 2.2 text-to-image here too."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import OUT_HELP, app, dated, out_target
from danqing.errors import InvalidRequest

FAMILIES_HELP = "a Stable unCLIP folder or a Kandinsky 2.2 decoder folder (diffusers layout)"


def run_unclip_command(settings, family: str, request, options, out: Optional[str], kind: str) -> None:
    """Write the pictures of an unCLIP-family request and print each path with its seed."""
    from danqing.apps.unclip import run_unclip_family  # lazy: imports torch

    target = out_target(out, dated(settings, kind))
    count = request.batch_size
    target.check_free(count)
    files = target.files(count) if target.file is not None else None
    for path, seed in run_unclip_family(settings.models_dir, family, request, options, out_dir=target.folder,
                                        files=files):
        print(f"{path}  seed={seed}")


def unclip_generate(settings, request, out: Optional[str], **family_options) -> bool:
    """``danqing generate`` with an unCLIP-family ``--model``: run it here (True), else False.
    ``family_options``: prior, prior_steps, prior_cfg_scale (Kandinsky 2.2)."""
    from danqing.apps.unclip import UnclipOptions, unclip_family  # lazy: imports torch

    family = unclip_family(settings.models_dir, request.model)
    if family is None:
        if any(v is not None for v in family_options.values()):
            raise InvalidRequest("prior", "--prior, --prior-steps and --prior-cfg are options of Kandinsky 2.2 "
                                          "(--model its decoder folder)")
        return False
    run_unclip_command(settings, family, request, UnclipOptions(**family_options), out, "txt2img-images")
    return True


@app.command()
def variations(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="The picture to make variations of."),
    model: str = typer.Option(..., help=f"Model: {FAMILIES_HELP}."),
    prompt: str = typer.Option("", help="Prompt (Stable unCLIP reads it; Kandinsky variations do not) [default: none]."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt [default: none]."),
    steps: int = typer.Option(20, help="Sampling steps (1-150)."),
    cfg: float = typer.Option(10.0, help="CFG scale (1-30)."),
    seed: int = typer.Option(-1, help="Seed; -1 = random."),
    width: int = typer.Option(512, help="Width, multiple of 8."),
    height: int = typer.Option(512, help="Height, multiple of 8."),
    batch_size: int = typer.Option(1, help="Pictures to make."),
    noise_level: Optional[int] = typer.Option(None, help="Stable unCLIP: noise added to the picture's embedding, 0-999 (higher: looser variations) [default: 0]."),
    sampler: Optional[str] = typer.Option(None, help="Stable unCLIP: A1111 sampler name [default: DPM++ 2M]."),
    schedule: Optional[str] = typer.Option(None, help="Stable unCLIP: schedule type [default: Automatic]."),
    prior: Optional[str] = typer.Option(None, help="Kandinsky 2.2: the prior folder (its image encoder embeds the picture) [default: none]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help=OUT_HELP.format("outputs/img2img-images/DATE/")),
):
    """Make variations of a picture with an unCLIP model (its CLIP image embedding in place of
    text): Stable unCLIP, or a Kandinsky 2.2 decoder with its prior."""
    from danqing.apps.unclip import UnclipOptions, unclip_family  # lazy: imports torch
    from danqing.request import GenerationRequest

    if not image.is_file():
        raise InvalidRequest("image", f"{image}: no such picture")
    family = unclip_family(ctx.obj.models_dir, model)
    if family is None:
        raise InvalidRequest("model", f"{model}: not {FAMILIES_HELP}")
    request = GenerationRequest.create(prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed,
                                       width=width, height=height, batch_size=batch_size, model=model)
    options = UnclipOptions(picture=image, noise_level=noise_level, prior=prior, sampler=sampler, schedule=schedule)
    run_unclip_command(ctx.obj, family, request, options, out, "img2img-images")
