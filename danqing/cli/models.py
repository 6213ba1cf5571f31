"""``danqing models``, ``samplers``, ``export`` and ``merge``: the models folder and model files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import app
from danqing.errors import DanqingError, InvalidRequest
from danqing.files import exists_message


@app.command()
def models(ctx: typer.Context, kind: str = typer.Option("checkpoint", help="checkpoint, vae, lora, embedding or controlnet.")):
    """List models found in the models folder with their family and A1111 short hash."""
    from danqing.models.registry import KINDS, Registry

    if kind not in KINDS:
        raise InvalidRequest("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    registry = Registry(ctx.obj.models_dir)
    print(f"# {kind} models in {registry.folder(kind)}")
    print(f"{'name':32s} {'family':28s} {'format':12s} {'hash':10s}  path")
    for entry in registry.scan(kind):
        family = _family_of(entry) if kind == "checkpoint" else _control_family_of(entry) if kind == "controlnet" else "-"
        print(f"{entry.name:32s} {family:28s} {entry.format:12s} {registry.short_hash(entry):10s}  {entry.path or '(built in)'}")


def _control_family_of(entry) -> str:
    """A ControlNet / adapter folder's family from its config.json ("?" for single files: their
    family shows when loaded)."""
    from danqing.conditioning.control import control_family  # lazy: imports torch

    cfg = entry.path / "config.json" if entry.path is not None and entry.path.is_dir() else None
    if cfg is None or not cfg.is_file():
        return "?"
    data = json.loads(cfg.read_text())
    return f"{control_family(data)} {'T2I-Adapter' if 'adapter_type' in data else 'ControlNet'}"


def _family_of(entry) -> str:
    from danqing.models.loader import describe_checkpoint

    try:
        return describe_checkpoint(entry)
    except DanqingError as exc:
        return f"? ({exc})"


@app.command()
def samplers():
    """List samplers and the schedule types each accepts."""
    from danqing.sampling.samplers import samplers as table
    from danqing.sampling.samplers import schedules_for

    for name, spec in table().items():
        print(f"{name:18s} {spec.class_name:34s} default schedule: {spec.default_schedule:12s} schedules: {', '.join(schedules_for(name))}")
    print("# flow-matching models (SD3, FLUX): the same names run these")
    for name, spec in table(True).items():
        print(f"{name:18s} {spec.class_name:34s} default schedule: {spec.default_schedule:12s} schedules: {', '.join(schedules_for(name, True))}")


@app.command()
def export(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Checkpoint name, hash or path (any loadable format)."),
    out: Path = typer.Argument(..., help="Output .safetensors file (original LDM single-file layout)."),
):
    """Export a model to a single .safetensors file in its family's shared layout (LDM for SD1/SD2/SDXL,
    the SD3 / FLUX layouts for those; A1111/ComfyUI load them)."""
    from danqing.models.loader import export_single_file, load_components  # lazy: imports torch
    from danqing.models.registry import Registry

    if out.suffix != ".safetensors":
        raise InvalidRequest("out", f"must end with .safetensors, got {out.name!r}")
    if out.exists():
        raise InvalidRequest("out", exists_message(out))
    comps = load_components(Registry(ctx.obj.models_dir).find("checkpoint", model))
    export_single_file(comps, out)
    print(out)


@app.command()
def merge(
    ctx: typer.Context,
    models: list[str] = typer.Argument(..., help="A B (weighted-sum, extract-lora: base tuned), A B C (add-difference) or A (merge-lora): checkpoint names, hashes or paths."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file; a bare name goes to models/checkpoints/ (models/lora/ for extract-lora)."),
    method: str = typer.Option("weighted-sum", help="weighted-sum: (1-a)A + aB; add-difference: A + a(B-C); extract-lora: a LoRA of B - A; merge-lora: A with --lora networks baked in."),
    alpha: float = typer.Option(0.5, help="The multiplier a."),
    half: bool = typer.Option(False, "--half", help="Store fp16 (default fp32: a=0 gives A bit for bit)."),
    rank: int = typer.Option(32, help="extract-lora: rank of Linear/1x1 layers."),
    conv_rank: Optional[int] = typer.Option(None, help="extract-lora: rank of 3x3 convolutions (0 = none) [default: --rank]."),
    lora: list[str] = typer.Option([], "--lora", help="merge-lora: NAME[:WEIGHT] from models/lora (repeatable; weight 1 by default) [default: none]."),
):
    """Merge checkpoints (A1111's checkpoint merger) or extract a LoRA from two; the recipe
    (inputs with their hashes, method, alpha) is stored in the file's header."""
    from danqing.customise.merge import extract_lora, merge_checkpoints, merge_loras  # lazy: imports torch
    from danqing.models.registry import Registry

    registry = Registry(ctx.obj.models_dir)
    if out.parent == Path("."):
        out = registry.folder("lora" if method == "extract-lora" else "checkpoint") / out.name
        out.parent.mkdir(parents=True, exist_ok=True)
    if method == "merge-lora":
        if len(models) != 1:
            raise InvalidRequest("models", f"merge-lora takes 1 model (the base), got {len(models)}")
        print(merge_loras(registry, models[0], _lora_weights(lora), out, half=half))
        return
    if method == "extract-lora":
        if len(models) != 2:
            raise InvalidRequest("models", f"extract-lora takes 2 models (base tuned), got {len(models)}")
        path, notes = extract_lora(registry, models[0], models[1], out, rank=rank, conv_rank=conv_rank)
        for line in notes:
            print(f"note: {line}", file=sys.stderr)
    else:
        path = merge_checkpoints(registry, models, out, method=method, alpha=alpha, half=half)
    print(path)


def _lora_weights(items: list[str]) -> list[tuple[str, float]]:
    """``--lora NAME[:WEIGHT]`` options -> (name, weight) pairs (weight 1 by default)."""
    pairs = []
    for item in items:
        name, _, w = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            pairs.append((name, float(w)))
        except ValueError:
            raise InvalidRequest("lora", f"{item!r}: expected NAME[:WEIGHT], e.g. heart:0.8") from None
    return pairs
