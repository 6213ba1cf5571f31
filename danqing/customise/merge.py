"""Model merging (AUTOMATIC1111's Checkpoint Merger) and LoRA extraction (kohya's
``networks/extract_lora_from_models.py``), written as one ``.safetensors`` file with its recipe.

- weighted sum: ``(1 - a) * A + a * B`` (``torch.lerp``: exactly A at a = 0 and exactly B at a = 1);
- add difference: ``A + a * (B - C)`` (C the base B was tuned from: "add B's training to A");
- LoRA extraction: for every layer a LoRA can patch, the truncated SVD of ``W_tuned - W_base``
  to a given rank, written in kohya's format (``lora_unet_*`` / ``lora_te*_``
  ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), which A1111, ComfyUI and diffusers'
  ``load_lora_weights`` read.

Inputs are checkpoints as the registry knows them (single files or diffusers folders, by name,
hash or path) of one family (SD1, SD2 or SDXL) and one architecture. Every input is loaded to
CPU fp32 (``load_components``), so a merge of SDXL models needs RAM for three fp32 models.
The result is written to a temporary file next to the target and renamed into place: nothing
half-written is left behind on an error, and an existing file is never replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from safetensors import safe_open

from danqing.customise import kohya
from danqing.customise.lora import Activation, NetworkCache, bake_embeddings, bundled_embeddings, merge_into, resolve
from danqing.errors import IncompatibleModel, InvalidRequest, ModelNotFound
from danqing.models.loader import describe_checkpoint, load_components
from danqing.models.single_file import save_single_file
from danqing.files import atomic_save
from danqing.outputs.metadata import VERSION

METHODS = ("weighted-sum", "add-difference")
RECIPE_KEY = "danqing.merge_recipe"
# kohya's LoRA targets (sd-scripts networks/lora.py LoRANetwork)
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class Input:
    """A loaded merge input: its registry name, sha256 and Components (CPU fp32)."""

    role: str
    name: str
    sha256: str
    components: object


# ---------------------------------------------------------------------------------------------
# The maths: pure functions on tensors
# ---------------------------------------------------------------------------------------------
def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * a + alpha * b`` (A1111 "Weighted sum"); exactly ``a`` at 0, ``b`` at 1."""
    return torch.lerp(a, b, alpha)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a + alpha * (b - c)`` (A1111 "Add difference"); exactly ``a`` when ``b == c``."""
    return a + alpha * (b - c)


def merge_state_dicts(a: dict, b: dict, c: dict | None, method: str, alpha: float) -> dict:
    """Merge state dicts of one architecture tensor by tensor, in float32 (inputs stored in fp16
    and fp32 mix; an fp16 value is exact in fp32); non-float tensors (ids) are A's."""
    out = {}
    for key, ta in a.items():
        if not ta.is_floating_point():
            out[key] = ta
        elif method == "weighted-sum":
            out[key] = weighted_sum(ta.float(), b[key].float(), alpha)
        else:
            out[key] = add_difference(ta.float(), b[key].float(), c[key].float(), alpha)
    return out


def lora_factors(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of a weight difference: ``up @ down ~= diff`` (truncated SVD, the
    best approximation in the Frobenius norm; Eckart-Young). Exact when ``rank`` reaches the
    difference's rank.

    Args:
        diff: (out, in) for a Linear, (out, in, kh, kw) for a Conv2d.
        rank: kept singular values (capped at min(out, in*kh*kw)).

    Returns:
        (down, up): Linear (r, in) and (out, r); Conv2d (r, in, kh, kw) and (out, r, 1, 1) --
        kohya's lora_down / lora_up shapes.
    """
    out_dim = diff.shape[0]
    mat = diff.reshape(out_dim, -1).to(torch.float32)
    r = min(rank, *mat.shape)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up = u[:, :r] * s[:r]  # (out, r): the singular values go to the up factor (as kohya)
    down = vh[:r]  # (r, in*kh*kw)
    if diff.ndim == 4:
        return down.reshape(r, *diff.shape[1:]).contiguous(), up.reshape(out_dim, r, 1, 1).contiguous()
    return down.contiguous(), up.contiguous()


# ---------------------------------------------------------------------------------------------
# The layers a kohya LoRA patches (their names: danqing.customise.kohya)
# ---------------------------------------------------------------------------------------------
def lora_layers(module: torch.nn.Module, targets: tuple[str, ...], conv_targets: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """{dotted path: layer} of the Linear / Conv2d layers kohya's LoRANetwork patches: children
    of modules whose class is in ``targets`` (1x1 convolutions only) or ``conv_targets`` (any
    kernel: the ResNet, down- and upsampling convolutions of LoCon / ``conv_dim``)."""
    found: dict[str, torch.nn.Module] = {}
    for name, parent in module.named_modules():
        cls = type(parent).__name__
        if cls not in targets and cls not in conv_targets:
            continue
        for child_name, child in parent.named_modules():
            if not child_name:
                continue
            is_linear = isinstance(child, torch.nn.Linear)
            is_conv = isinstance(child, torch.nn.Conv2d)
            if not (is_linear or is_conv):
                continue
            if is_conv and cls in targets and child.kernel_size != (1, 1):
                continue
            found[f"{name}.{child_name}" if name else child_name] = child
    return found


def kohya_lora_layers(comps) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """{kohya LoRA name: (component, module path, layer)} of every layer of ``comps`` a kohya
    LoRA (with ``conv_dim``) patches: UNet transformer blocks and ResNet/sampling convolutions,
    text-encoder attention and MLP (``lora_te_`` for SD1/SD2, ``lora_te1_``/``lora_te2_`` for SDXL)."""
    out = {}
    unet_cfg = dict(comps.unet.config)
    for path, layer in lora_layers(comps.unet, UNET_TARGETS, UNET_CONV_TARGETS).items():
        out[kohya.module_key("unet", path, comps.family, unet_cfg)] = ("unet", path, layer)
    for part in ("text_encoder", "text_encoder_2"):
        module = getattr(comps, part)
        if module is not None:
            for path, layer in lora_layers(module, TEXT_TARGETS).items():
                out[kohya.module_key(part, path, comps.family)] = (part, path, layer)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs and output
# ---------------------------------------------------------------------------------------------
def load_inputs(registry, models: list[str]) -> list[Input]:
    """Find and load the checkpoints (A, B[, C]); refuse mixed families or architectures,
    naming both models."""
    entries = [registry.find("checkpoint", m) for m in models]
    roles = "ABC"
    families = [describe_checkpoint(e).split(" ")[0] for e in entries]
    for i in range(1, len(entries)):
        if families[i] != families[0]:
            raise IncompatibleModel(f"model {roles[0]} {entries[0].name!r} is {families[0]} but model {roles[i]} "
                                    f"{entries[i].name!r} is {families[i]}; merge models of one family")
    inputs = [Input(roles[i], e.name, registry.sha256(e), load_components(e)) for i, e in enumerate(entries)]
    for other in inputs[1:]:
        check_same_architecture(inputs[0], other)
    return inputs


def check_same_architecture(a: Input, b: Input) -> None:
    """Every module of ``a`` and ``b`` has the same keys and shapes (else name the first difference)."""
    ma, mb = a.components.modules(), b.components.modules()
    if set(ma) != set(mb):
        raise IncompatibleModel(f"{a.name!r} has {', '.join(sorted(ma))} but {b.name!r} has {', '.join(sorted(mb))}")
    for part in ma:
        sa, sb = ma[part].state_dict(), mb[part].state_dict()
        for key, t in sa.items():
            if key not in sb or sb[key].shape != t.shape:
                other = tuple(sb[key].shape) if key in sb else "no such tensor"
                raise IncompatibleModel(f"{a.name!r} and {b.name!r} differ in architecture: {part}.{key} is "
                                        f"{tuple(t.shape)} vs {other}; merge models of one architecture")


def _check_alpha(alpha: float) -> None:
    if not -1.0 <= alpha <= 2.0:
        raise InvalidRequest("alpha", f"must be between 0 and 1 (extrapolation up to -1..2 is allowed), got {alpha:g}")


def _check_out(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise InvalidRequest("out", f"the result is written as one .safetensors file; got {out.name!r}")
    if out.exists() and not overwrite:
        raise InvalidRequest("out", f"{out} already exists; danqing never overwrites, pick another name")
    if not out.parent.is_dir():
        raise InvalidRequest("out", f"folder {out.parent} does not exist")
    return out


def merge_checkpoints(registry, models: list[str], out: Path, *, method: str = "weighted-sum", alpha: float = 0.5,
                      half: bool = False, overwrite: bool = False) -> Path:
    """Merge two (weighted sum) or three (add difference) checkpoints into one ``.safetensors``.

    Args:
        registry: the models-folder ``Registry`` (names, hashes).
        models: [A, B] or [A, B, C]: names, hashes or paths.
        out: the ``.safetensors`` file to write (LDM layout, as ``save_single_file``).
        method: "weighted-sum" ((1-a)A + aB) or "add-difference" (A + a(B - C)).
        alpha: the multiplier ``a``.
        half: store fp16 (A1111's "save as float16"); default fp32, so a = 0 gives A bit for bit.

    Returns:
        ``out``. Its header holds the recipe: ``danqing.merge_recipe`` (method, alpha, every input
        with its sha256) and A1111's ``sd_merge_recipe`` / ``sd_merge_models``.
    """
    if method not in METHODS:
        raise InvalidRequest("method", f"unknown merge method {method!r}; use one of {', '.join(METHODS)} (or extract-lora, merge-lora)")
    want = 2 if method == "weighted-sum" else 3
    if len(models) != want:
        raise InvalidRequest("models", f"{method} takes {want} models ({'A B' if want == 2 else 'A B C'}), got {len(models)}")
    _check_alpha(alpha)
    out = _check_out(out, overwrite)
    inputs = load_inputs(registry, models)
    comps = inputs[0].components
    for part, module in comps.modules().items():
        sds = [i.components.modules()[part].state_dict() for i in inputs]
        merged = merge_state_dicts(sds[0], sds[1], sds[2] if len(sds) > 2 else None, method, alpha)
        module.to(torch.float32)  # a loaded diffusers folder keeps its stored dtype
        module.load_state_dict(merged, strict=True)
    if half:
        for module in comps.modules().values():
            module.to(torch.float16)
    return save_single_file(comps, out, metadata=merge_metadata(inputs, method, alpha, half, out), overwrite=overwrite)


def merge_metadata(inputs: list[Input], method: str, alpha: float, half: bool, out: Path) -> dict[str, str]:
    """The recipe, as danqing's ``danqing.merge_recipe`` and A1111's ``sd_merge_recipe`` /
    ``sd_merge_models`` header entries (A1111 ``extras.run_modelmerger``)."""
    recipe = {"method": method, "alpha": alpha, "save_as_half": half, "version": VERSION,
              "inputs": [{"role": i.role, "name": i.name, "sha256": i.sha256} for i in inputs]}
    a1111 = {"type": "webui", "primary_model_hash": inputs[0].sha256, "secondary_model_hash": inputs[1].sha256,
             "tertiary_model_hash": inputs[2].sha256 if len(inputs) > 2 else None,
             "interp_method": {"weighted-sum": "Weighted sum", "add-difference": "Add difference"}.get(method, method),
             "multiplier": alpha, "save_as_half": half, "custom_name": out.stem}
    models = {i.sha256: {"name": i.name, "legacy_hash": None, "sd_merge_recipe": None} for i in inputs}
    return {RECIPE_KEY: json.dumps(recipe), "sd_merge_recipe": json.dumps(a1111), "sd_merge_models": json.dumps(models)}


def merge_loras(registry, model: str, loras: list[tuple[str, float]], out: Path, *, half: bool = False,
                overwrite: bool = False) -> Path:
    """Bake LoRA / LyCORIS networks into a checkpoint: ``W + w * dW`` for each ``(name, w)``,
    the arithmetic of ``<lora:name:w>`` at generation time (``danqing.customise.lora``), so the
    merged model draws what the base model draws with those tags.

    Returns:
        ``out`` (one ``.safetensors``; recipe: method "merge-lora", the model and every LoRA with
        its sha256 and weight).
    """
    if not loras:
        raise InvalidRequest("lora", "merge-lora needs at least one --lora NAME:WEIGHT")
    out = _check_out(out, overwrite)
    (base,) = load_inputs(registry, [model])
    comps, cache, acts, used = base.components, NetworkCache(), [], []
    for name, weight in loras:
        try:
            entry = registry.find("lora", name)
        except ModelNotFound:
            names = ", ".join(e.name for e in registry.scan("lora")) or "none"
            raise InvalidRequest("lora", f"LoRA {name!r} not found in {registry.folder('lora')}; installed: {names}") from None
        digest = registry.sha256(entry)
        net = resolve(entry.name, digest, cache.get(entry.path, digest), comps, base.name)
        net.embeddings = bundled_embeddings(cache.bundled(entry.path, digest), entry.name, digest, comps)
        acts.append(Activation(net, weight, weight))
        used.append({"role": "lora", "name": entry.name, "sha256": digest, "weight": weight})
    for module in comps.modules().values():
        module.to(torch.float32)
    merge_into(comps, acts)
    bake_embeddings(comps, [e for a in acts for e in a.network.embeddings])  # pivotal-tuning words
    if half:
        for module in comps.modules().values():
            module.to(torch.float16)
    recipe = {"method": "merge-lora", "save_as_half": half, "version": VERSION,
              "inputs": [{"role": "A", "name": base.name, "sha256": base.sha256}, *used]}
    return save_single_file(comps, out, metadata={RECIPE_KEY: json.dumps(recipe)}, overwrite=overwrite)


def read_recipe(path: Path) -> dict:
    """The ``danqing.merge_recipe`` of a merged or extracted file (``{}`` when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[RECIPE_KEY]) if RECIPE_KEY in meta else {}


# ---------------------------------------------------------------------------------------------
# LoRA extraction
# ---------------------------------------------------------------------------------------------
def extract_lora(registry, base: str, tuned: str, out: Path, *, rank: int = 32, conv_rank: int | None = None,
                 overwrite: bool = False) -> tuple[Path, list[str]]:
    """A LoRA approximating ``tuned - base``, in kohya's format (sd-scripts
    ``networks/extract_lora_from_models.py``; without its 99th-percentile clamping, so a
    full-rank extraction is exact).

    Args:
        base, tuned: checkpoints (names, hashes or paths) of one family.
        out: ``.safetensors`` file to write.
        rank: rank of Linear and 1x1-conv layers (attention, projections, text encoders).
        conv_rank: rank of the 3x3 convolutions of ResNet/down/upsampling blocks (kohya's
            ``conv_dim``, LoCon); None = ``rank``, 0 = leave them out.

    Returns:
        (``out``, notes): notes name what a LoRA cannot carry (norms, biases, embeddings that
        differ), one line each.
    """
    from safetensors.torch import save_file  # looked up at call time: tests replace it to simulate a full disk

    if rank < 1:
        raise InvalidRequest("rank", f"must be at least 1, got {rank}")
    conv_rank = rank if conv_rank is None else conv_rank
    if conv_rank < 0:
        raise InvalidRequest("conv_rank", f"must be 0 (no 3x3 convolutions) or more, got {conv_rank}")
    out = _check_out(out, overwrite)
    a, b = load_inputs(registry, [base, tuned])
    ca, cb = a.components, b.components
    family = ca.family
    tensors: dict[str, torch.Tensor] = {}
    covered: set[str] = set()  # "part.param" covered by a LoRA layer
    layers_b = kohya_lora_layers(cb)
    for key, (part, path, la) in kohya_lora_layers(ca).items():
        covered.add(f"{part}.{path}.weight")
        diff = layers_b[key][2].weight.detach().float() - la.weight.detach().float()
        r = conv_rank if isinstance(la, torch.nn.Conv2d) and la.kernel_size != (1, 1) else rank
        if r == 0 or not bool(diff.any()):
            continue
        down, up = lora_factors(diff, r)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1
    if not tensors:
        raise InvalidRequest("models", f"{a.name!r} and {b.name!r} have the same weights in every layer a LoRA can "
                             "carry; there is no difference to extract")
    notes = _left_out(ca, cb, covered)
    recipe = {"method": "extract-lora", "rank": rank, "conv_rank": conv_rank, "inputs": [
        {"role": "base", "name": a.name, "sha256": a.sha256}, {"role": "tuned", "name": b.name, "sha256": b.sha256}]}
    base_version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)
    meta = {RECIPE_KEY: json.dumps(recipe), "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank), "ss_base_model_version": base_version,
            "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)}) if conv_rank else "{}",
            "modelspec.architecture": _architecture(family) + "/lora", "modelspec.title": out.stem}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_save(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=overwrite)
    return out, notes


def _architecture(family: str) -> str:
    return {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}.get(family, family)


def _left_out(ca, cb, covered: set[str]) -> list[str]:
    """Tensors that differ between the models but that no LoRA layer carries (biases, norms,
    embeddings, the VAE), counted per component."""
    notes = []
    for part, ma in ca.modules().items():
        sa, sb = ma.state_dict(), cb.modules()[part].state_dict()
        missed = [k for k, t in sa.items() if t.is_floating_point() and f"{part}.{k}" not in covered
                  and not torch.equal(t, sb[k])]
        if missed:
            notes.append(f"{part}: {len(missed)} tensors differ that a LoRA cannot carry "
                         f"(e.g. {', '.join(missed[:3])}); the LoRA leaves them as the base model has them")
    return notes

