"""``danqing train base|instruct|controlnet|ip-adapter|flow|cascade|unclip|prior|lora|dreambooth|textual-inversion|clip|distill|faces --config FILE``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import typer

from danqing.cli.common import app
from danqing.errors import InvalidRequest

train_app = typer.Typer(help="Train models: `danqing train base|instruct|lora|dreambooth|textual-inversion|controlnet|ip-adapter|flow|cascade|unclip|prior|clip|distill|faces --config FILE`.", no_args_is_help=True)
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
    if os.environ.get("RANK", "0") == "0":  # one voice in a multi-process run
        typer.echo(line)


_CONFIG_HELP = "TOML config, e.g. configs/train/{}.toml."
_SET_HELP = "Override a config value: SECTION.KEY=VALUE (repeatable), e.g. train.steps=400 [default: none]."
_FRESH = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over.")
_PROCS = typer.Option(1, "--num-processes", min=1, max=64,
                      help="Train in N processes (one per GPU; CPU processes without one) through `accelerate launch` "
                           "(DDP); train.batch_size is the global batch and must split evenly.")


def _launched() -> bool:
    """Whether this process is one of a multi-process run (``accelerate launch`` / torchrun)."""
    return os.environ.get("LOCAL_RANK") is not None


def _relaunch(num_processes: int) -> None:
    """Run this same command again in ``num_processes`` processes under ``accelerate launch``."""
    import socket

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            args.append(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "danqing.cli", *args]
    typer.echo(f"training in {num_processes} processes: accelerate launch --multi_gpu --num_processes {num_processes}",
               err=True)
    raise typer.Exit(subprocess.run(cmd).returncode)


@train_app.command("base")
def train_base_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-cpu.toml."),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable) [default: none]."),
):
    """Train a model from scratch (VAE, then CLIP text encoder + UNet) on the synthetic shapes set
    or a folder of captioned images; resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.base import train_base  # lazy: imports torch
    from danqing.training.config import load_config

    cfg = under_home(load_config(config, parse_sets(set_)), ctx.obj.home)
    summary = train_base(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {summary}")


@train_app.command("instruct")
def train_instruct_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-instruct.toml."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable) [default: none]."),
):
    """Train an instruct-pix2pix model from a text-to-image model on synthetic edit pairs
    ("make the circle blue", "add a yellow star", "remove the square"); resumes from the newest
    checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import InstructTrainConfig, load_config
    from danqing.training.instruct import train_instruct  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=InstructTrainConfig), ctx.obj.home)
    summary = train_instruct(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval'])}")


def _relaunch_if(num_processes: int) -> None:
    """With N > 1 processes asked for and none launched yet: this command again under ``accelerate launch``."""
    if num_processes > 1 and not _launched():
        _relaunch(num_processes)


def _finetune_cmd(ctx: typer.Context, kind: str, config: Path, fresh: bool, sets: list[str],
                  num_processes: int = 1) -> None:
    _relaunch_if(num_processes)
    from danqing.training import config as C
    from danqing.training import finetune  # lazy: imports torch

    cfg = under_home(C.load_config(config, parse_sets(sets), model=C.FINETUNE_CONFIGS[kind]), ctx.obj.home)
    summary = finetune.trainer(kind)(cfg, resume=not fresh, log=_echo, settings=ctx.obj)  # its models folder
    _echo(f"summary: {json.dumps(summary)}")


@train_app.command("lora")
def train_lora_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("lora-heart")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train a LoRA (UNet, optionally text encoder) on captioned images; writes kohya and diffusers files."""
    _finetune_cmd(ctx, "lora", config, fresh, set_, num_processes)


@train_app.command("distill")
def train_distill_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("distill-danqing-tiny")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Distil a model into a 4-step LCM-LoRA (latent consistency distillation); use it with
    `<lora:NAME:1>`, --sampler LCM --steps 4 --cfg 1."""
    _finetune_cmd(ctx, "distill", config, fresh, set_, num_processes)


@train_app.command("clip")
def train_clip_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-clip")),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train a tiny CLIP (two encoders, InfoNCE with a learned temperature and one-attribute
    hard negatives) on the shapes world; writes a transformers CLIPModel folder to
    OUTPUT_DIR/model and the held-out retrieval along the run to OUTPUT_DIR/eval.jsonl."""
    from danqing.training.clip import train_clip  # lazy: imports torch
    from danqing.training.config import load_config
    from danqing.training.config_companions import ClipTrainConfig

    cfg = under_home(load_config(config, parse_sets(set_), model=ClipTrainConfig), ctx.obj.home)
    summary = train_clip(cfg, log=_echo)
    _echo(f"summary: {json.dumps(summary)}")


@train_app.command("motion")
def train_motion_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-motion")),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train an AnimateDiff motion module for a frozen model on the moving shapes world; writes
    a diffusers MotionAdapter folder to OUTPUT_DIR/model (put it in models/motion/) and the
    held-out trajectory scores along the run to OUTPUT_DIR/eval.jsonl."""
    from danqing.training.config import load_config
    from danqing.training.config_companions import MotionTrainConfig
    from danqing.training.motion import train_motion  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=MotionTrainConfig), ctx.obj.home)
    summary = train_motion(cfg, log=_echo)
    _echo(f"summary: {json.dumps(summary)}")


@train_app.command("dreambooth")
def train_dreambooth_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("dreambooth-heart")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Fine-tune the whole UNet (DreamBooth) with prior preservation; writes a checkpoint."""
    _finetune_cmd(ctx, "dreambooth", config, fresh, set_, num_processes)


@train_app.command("textual-inversion")
def train_ti_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("ti-heart")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Learn a new word's embedding (textual inversion); writes an A1111 embedding."""
    _finetune_cmd(ctx, "textual-inversion", config, fresh, set_, num_processes)


@train_app.command("controlnet")
def train_controlnet_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/train/danqing-tiny-canny.toml."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore checkpoints in the output folder and start over."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE (repeatable) [default: none]."),
):
    """Train a ControlNet for a base model on (picture, condition map, caption) triples: the
    synthetic shapes with their Canny or line-art maps (zero convolutions, 50% prompt drop);
    resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import ControlTrainConfig, load_config
    from danqing.training.controlnet import train_controlnet  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=ControlTrainConfig), ctx.obj.home)
    summary = train_controlnet(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval_f1'])}")


@train_app.command("vae-decoder")
def train_vae_decoder_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-portraits-vae")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Fine-tune a model's VAE decoder, its encoder frozen (SD's ft-MSE VAE recipe), on the
    portrait world's talking frames or the shapes world's scenes; writes OUTPUT_DIR/vae/ (a diffusers VAE for models/VAE/);
    resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import DecoderTrainConfig, load_config
    from danqing.training.vae_decoder import train_vae_decoder  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=DecoderTrainConfig), ctx.obj.home)
    summary = train_vae_decoder(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary.get('mouth_round_trip', summary.get('round_trip')))}")


@train_app.command("ip-adapter")
def train_ip_adapter_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-ip")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train an IP-Adapter (image prompts) for a base model with a CLIP image encoder, on the
    shapes world (each picture its own image prompt); writes OUTPUT_DIR/ip-adapter.safetensors
    for models/ipadapter/; resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import IPAdapterTrainConfig, load_config
    from danqing.training.ip_adapter import train_ip_adapter  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=IPAdapterTrainConfig), ctx.obj.home)
    summary = train_ip_adapter(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval'])}")


@train_app.command("flow")
def train_flow_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-flow")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train a flow-matching transformer (SD3's MMDiT and rectified flow, at toy size) over a
    base model's latents and text encoder, on the shapes world; writes OUTPUT_DIR/model/ (an SD3
    diffusers folder for models/Stable-diffusion/); resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import FlowTrainConfig, load_config
    from danqing.training.flow import train_flow  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=FlowTrainConfig), ctx.obj.home)
    summary = train_flow(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval'])}")


@train_app.command("cascade")
def train_cascade_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-if")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train one stage of a pixel cascade (Imagen / DeepFloyd IF at toy size) on the shapes world:
    cascade.stage = "base" (text -> 32x32 pixels, with its own T5) or "upscaler" (32 -> 128);
    writes OUTPUT_DIR/model/ (a DeepFloyd IF diffusers folder); resumes from the newest checkpoint
    of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.cascade import train_cascade  # lazy: imports torch
    from danqing.training.config import CascadeTrainConfig, load_config

    cfg = under_home(load_config(config, parse_sets(set_), model=CascadeTrainConfig), ctx.obj.home)
    summary = train_cascade(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval'])}")


@train_app.command("unclip")
def train_unclip_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-unclip")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train unCLIP's decoder for a base model (Stable unCLIP: its UNet conditioned on a CLIP
    image embedding) on the shapes world; writes OUTPUT_DIR/model/ (a Stable unCLIP folder for
    `danqing variations --model`); resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import UnclipTrainConfig, load_config
    from danqing.training.unclip import train_unclip  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=UnclipTrainConfig), ctx.obj.home)
    summary = train_unclip(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval'])}")


@train_app.command("prior")
def train_prior_cmd(
    ctx: typer.Context,
    num_processes: int = _PROCS,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-tiny-prior")),
    fresh: bool = _FRESH,
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train unCLIP's prior (caption -> CLIP image embedding; Kandinsky 2.2's format) on a CLIP
    model and the shapes world; writes OUTPUT_DIR/prior/ (for `danqing generate --model <unCLIP
    decoder> --prior`); resumes from the newest checkpoint of its output folder."""
    _relaunch_if(num_processes)
    from danqing.training.config import PriorTrainConfig, load_config
    from danqing.training.prior import train_prior  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=PriorTrainConfig), ctx.obj.home)
    summary = train_prior(cfg, resume=not fresh, log=_echo)
    _echo(f"summary: {json.dumps(summary['eval'])}")


@train_app.command("preview-decoder")
def train_preview_decoder_cmd(
    ctx: typer.Context,
    model: str = typer.Option("danqing-tiny", help="Model whose VAE decoder is distilled (a name or file)."),
    out: Path = typer.Option(..., "--out", help="The TAESD decoder file to write (.safetensors; a new file)."),
    steps: int = typer.Option(3000, min=1, max=1_000_000, help="Training steps."),
    batch_size: int = typer.Option(32, min=1, max=4096, help="Latents per step."),
    n_images: int = typer.Option(4000, min=16, max=1_000_000, help="Pictures of the synthetic worlds to learn from."),
    seed: int = typer.Option(0, help="Seed of the pictures and the initial weights."),
):
    """Distil a tiny preview decoder (TAESD architecture) from a model's VAE, for live previews
    (server option show_progress_type = TAESD); written in TAESD's own file layout."""
    from danqing.training.preview_decoder import train_preview_decoder  # lazy: imports torch

    if out.suffix != ".safetensors":
        raise InvalidRequest("--out", f"{out}: the decoder is written as .safetensors")
    if out.exists():
        raise InvalidRequest("--out", f"{out} exists; name a new file")
    train_preview_decoder(model, out, steps=steps, batch_size=batch_size, n_images=n_images, seed=seed,
                          settings=ctx.obj, log=_echo)


@train_app.command("faces")
def train_faces_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help=_CONFIG_HELP.format("danqing-portrait-faces")),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
):
    """Train the portrait world's face recogniser (CosFace on rendered people; the `world` face
    backend of the portrait studio); writes OUTPUT_DIR/model (config.json, model.safetensors)
    with its held-out verification figures."""
    from danqing.training.config import load_config
    from danqing.training.config_companions import FacesTrainConfig
    from danqing.training.faces import train_faces  # lazy: imports torch

    cfg = under_home(load_config(config, parse_sets(set_), model=FacesTrainConfig), ctx.obj.home)
    summary = train_faces(cfg, log=_echo)
    _echo(f"summary: {json.dumps({k: v for k, v in summary.items() if k != 'history'})}")
