"""``danqing variations``: pictures like a given one, with an unCLIP-family model (Stable
unCLIP, Kandinsky 2.2); ``danqing generate`` hands the families that run beside the SD loop
(Kandinsky 2.2 text-to-image, DeepFloyd IF, and ``--from`` of their pictures) here too."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import OUT_HELP, app, dated, make_studio, out_target
from danqing.errors import InvalidRequest

FAMILIES_HELP = "a Stable unCLIP folder or a Kandinsky 2.2 decoder folder (diffusers layout)"
IF_SIDE = 64  # DeepFloyd IF stage I's size, when --width / --height are not given


def run_family_command(settings, family: str, request, options, out: Optional[str], kind: str) -> None:
    """Write the pictures of a family request and print each path with its seed."""
    from danqing.apps.families import run_family, write_family_pictures  # lazy: imports torch

    target = out_target(out, dated(settings, kind))
    count = request.batch_size
    target.check_free(count)
    files = target.files(count) if target.file is not None else None
    result = run_family(make_studio(settings), family, request, options)
    for path, seed in write_family_pictures(result, out_dir=target.folder, files=files):
        print(f"{path}  seed={seed}")


def family_generate(settings, request, out: Optional[str], options: dict, source_infotext: str | None = None, *,
                    size_given: bool = True) -> bool:
    """``danqing generate`` with a ``--model`` of a family that runs beside the SD loop: run it
    here (True), else False. ``options``: the command line's family options (``FamilyOptions``
    fields, None = not given); with ``source_infotext`` (``--from``) they override the file's."""
    from danqing.apps.families import OPTION_NAMES, FamilyOptions, family_of, options_from_params  # lazy: torch
    from danqing.models.registry import Registry
    from danqing.outputs.infotext import parse_infotext

    options = FamilyOptions(**options)

    registry = Registry(settings.models_dir)
    family = family_of(registry, request.model)
    if family is None:
        given = options.given()
        if given:
            registry.find("checkpoint", request.model)  # a model that is not there: say that first
            name = next(iter(given))
            raise InvalidRequest(name, f"{OPTION_NAMES.get(name, name)} is an option of Kandinsky 2.2 (--prior, "
                                       "--prior-steps, --prior-cfg; --model its decoder folder) or DeepFloyd IF "
                                       "(--stage2, --stage2-steps, --stage2-cfg, --noise-level, --upscaler; --model "
                                       "its stage-I folder)")
        return False
    if source_infotext is not None:
        options = options.over(options_from_params(parse_infotext(source_infotext)[2]))
    if family == "if-i" and not size_given:
        request = request.replace(width=IF_SIDE, height=IF_SIDE)
    run_family_command(settings, family, request, options, out, "txt2img-images")
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
    from danqing.apps.families import FamilyOptions, family_of  # lazy: imports torch
    from danqing.models.registry import Registry
    from danqing.request import GenerationRequest

    if not image.is_file():
        raise InvalidRequest("image", f"{image}: no such picture")
    family = family_of(Registry(ctx.obj.models_dir), model)
    if family is None or family.startswith("if-"):
        raise InvalidRequest("model", f"{model}: not {FAMILIES_HELP}")
    request = GenerationRequest.create(prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed,
                                       width=width, height=height, batch_size=batch_size, model=model)
    options = FamilyOptions(picture=str(image), noise_level=noise_level, prior=prior, sampler=sampler,
                            schedule=schedule)
    run_family_command(ctx.obj, family, request, options, out, "img2img-images")
