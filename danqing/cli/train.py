"""``danqing train base|instruct|controlnet|lora|dreambooth|textual-inversion --config FILE``."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import typer

from danqing.cli.common import app
from danqing.errors import InvalidRequest

train_app = typer.Typer(help="Train models: `danqing train base|instruct|lora|dreambooth|textual-inversion|controlnet --config FILE`.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def parse_sets(items: list[str]) -> dict:
    """["unet.steps=100", "data.source=\"my/folder\""] -> {"unet.steps": 100, ...} (values read as TOML,
    else as plain strings)."""
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


def under_home(cfg, home: Path):
    """``cfg`` with a relative output folder (``run.output_dir`` or ``output.output_dir``) placed
    under the danqing home, as every other output is; an absolute one is kept."""
    for section in ("run", "output"):
        part = getattr(cfg, section, None)
        if part is not None and not Path(part.output_dir).is_absolute():
            cfg = cfg.model_copy(update={section: part.model_copy(update={"output_dir": str(Path(home) / part.output_dir)})})
    return cfg


def _echo(line: str) -> None:
    typer.echo(line)


_CONFIG_HELP = "TOML config, e.g. configs/train/{}.toml."
_SET_HELP = "Override a config value: SECTION.KEY=VALUE (repeatable), e.g. train.steps=400 [default: none]."
_FRESH = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over.")


@train_app.command("base")
def train_base_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-cpu.toml."),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable) [default: none]."),
):
    """Train a model from scratch (VAE, then CLIP text encoder + UNet) on the synthetic shapes set
    or a folder of captioned images; resumes from the newest checkpoint of its output folder."""
    from danqing.training.base import train_base  # lazy: imports torch
    from danqing.training.config import load_config

    cfg = under_home(load_config(config, parse_sets(set_)), ctx.obj.home)
    summary = train_base(cfg, resume=not fresh, log=_echo)
    typer.echo(f"summary: {summary}")


@train_app.command("instruct")
def train_instruct_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-instruct.toml."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable) [default: none]."),
):
    """Train an instruct-pix2pix model from a text-to-image model on synthetic edit pairs
    ("make the circle blue", "add a yellow star", "remove the square"); resumes from the newest
    checkpoint of its output folder."""
    from danqing.training.config import InstructTrainConfig, load_config
    from danqing.training.instruct import train_instruct  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=InstructTrainConfig), ctx.obj.home)
    summary = train_instruct(cfg, resume=not fresh, log=_echo)
    typer.echo(f"summary: {json.dumps(summary['eval'])}")


def _finetune_cmd(ctx: typer.Context, kind: str, config: Path, fresh: bool, sets: list[str]) -> None:
    from danqing.training import config as C
    from danqing.training import finetune  # lazy: imports torch

    model, run = {"lora": (C.LoraTrainConfig, "train_lora"),
                  "dreambooth": (C.DreamBoothTrainConfig, "train_dreambooth"),
                  "textual-inversion": (C.TextualInversionTrainConfig, "train_textual_inversion")}[kind]
    run = getattr(finetune, run)
    cfg = under_home(C.load_config(config, parse_sets(sets), model=model), ctx.obj.home)
    summary = run(cfg, resume=not fresh, log=_echo, settings=ctx.obj)  # its models folder
    typer.echo(f"summary: {json.dumps(summary)}")


@train_app.command("lora")
def train_lora_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("lora-heart")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train a LoRA (UNet, optionally text encoder) on captioned images; writes kohya and diffusers files."""
    _finetune_cmd(ctx, "lora", config, fresh, set_)


@train_app.command("dreambooth")
def train_dreambooth_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("dreambooth-heart")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Fine-tune the whole UNet (DreamBooth) with prior preservation; writes a checkpoint."""
    _finetune_cmd(ctx, "dreambooth", config, fresh, set_)


@train_app.command("textual-inversion")
def train_ti_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("ti-heart")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Learn a new word's embedding (textual inversion); writes an A1111 embedding."""
    _finetune_cmd(ctx, "textual-inversion", config, fresh, set_)


@train_app.command("controlnet")
def train_controlnet_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-canny.toml."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable) [default: none]."),
):
    """Train a ControlNet for a base model on (picture, condition map, caption) triples: the
    synthetic shapes with their Canny or line-art maps (zero convolutions, 50% prompt drop);
    resumes from the newest checkpoint of its output folder."""
    from danqing.training.config import ControlTrainConfig, load_config
    from danqing.training.controlnet import train_controlnet  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=ControlTrainConfig), ctx.obj.home)
    summary = train_controlnet(cfg, resume=not fresh, log=_echo)
    typer.echo(f"summary: {json.dumps(summary['eval_f1'])}")
