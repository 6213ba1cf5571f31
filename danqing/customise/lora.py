"""LoRA and LyCORIS networks: reading the files people share, and patching them into a model.

Formats read (one file may mix them, as LyCORIS files do):

* kohya / A1111: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``,
  optional ``.lora_mid.weight`` (LoCon with a Tucker core), ``lora_te_`` (SD1/SD2 text encoder),
  ``lora_te1_`` / ``lora_te2_`` (SDXL's two). ``<module>`` is the module path with ``.`` -> ``_``,
  in diffusers naming (``down_blocks_0_attentions_0_...``) or in the original LDM naming
  (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, what kohya's SDXL LoRAs use).
* LyCORIS (KohakuBlueleaf/LyCORIS, same prefixes): LoHa ``hada_w1_a/b``, ``hada_w2_a/b`` (+
  ``hada_t1/t2``), LoKr ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` (+
  ``lokr_t2``), full ``diff`` (+ ``diff_b``).
* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.``), the older ``<module>.lora.down.weight`` / ``lora.up.weight``, and peft's
  ``base_model.model.<module>`` for a UNet-only adapter.

Every network is turned into one weight delta per module, dW = scale * f(factors), with
scale = alpha / rank (1 when the file has no alpha, as diffusers/peft files without
``network_alphas``). Patching adds ``multiplier * dW`` to the weight in place and restores the
saved originals afterwards (ComfyUI's ModelPatcher idea): the model after a request is
bit-identical to the model before it.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from danqing.cache import LRUCache
from danqing.conditioning.prompt_parser import strip_extra_networks
from danqing.customise.embeddings import Embedding, check_fits, encoder_keys, name_ids
from danqing.customise.kohya import BUNDLE_PREFIX, SUFFIXES, fused_table, name_table, parse_bundled, split_fused
from danqing.errors import CorruptModel, IncompatibleModel, InvalidRequest, ModelNotFound
from danqing.models.motion import is_motion_network

_PEFT = re.compile(r"^(?P<mod>.+?)(?:\.(?:lora_A|lora\.down|lora_down)|(?<=_lora)\.down)\.weight$|"
                   r"^(?P<mod2>.+?)(?:\.(?:lora_B|lora\.up|lora_up)|(?<=_lora)\.up)\.weight$|^(?P<mod3>.+?)\.alpha$")
ALGOS = ("lora", "locon", "loha", "lokr", "full")


@dataclass
class NetworkModule:
    """The factors of one patched module.

    Attributes:
        key: the file's name for the module (``lora_unet_down_blocks_0_..`` or ``unet.down_blocks.0...``).
        algo: "lora" (LoRA/LoCon), "loha", "lokr" or "full".
        tensors: the factors by kohya suffix (``lora_down.weight``, ``hada_w1_a``, ...).
        alpha: the file's alpha, None when absent (scale 1).
    """

    key: str
    algo: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "lora_down.weight" in t:
            return t["lora_down.weight"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        if "lokr_w1_b" in t:
            return t["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            return t["lokr_w2_b"].shape[0]
        return None

    def out_in(self) -> tuple[int, int] | None:
        """(out, in * kh * kw) of the weight the factors make, None for LoKr (ask ``delta``)."""
        t = self.tensors
        if self.algo == "lora":
            return t["lora_up.weight"].shape[0], t["lora_down.weight"].flatten(1).shape[1] * (
                t["lora_mid.weight"][0, 0].numel() if "lora_mid.weight" in t else 1)
        if self.algo == "loha":
            if "hada_t1" in t:
                return t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1] * t["hada_t1"][0, 0].numel()
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
        if self.algo == "full":
            return t["diff"].shape[0], t["diff"].flatten(1).shape[1]
        return None

    def fits(self, shape: torch.Size) -> bool:
        """Whether the factors make a delta of ``shape``."""
        want = (shape[0], int(torch.Size(shape[1:]).numel()))
        have = self.out_in()
        if have is None:
            try:
                return self.delta(shape).shape == shape
            except (RuntimeError, ValueError, KeyError):
                return False
        return tuple(have) == want

    def scale(self) -> float:
        """alpha / rank; 1 without alpha, and 1 for LoKr whose two halves are both full
        (LyCORIS: nothing was decomposed, so there is no rank to divide by)."""
        r = self.rank
        if self.alpha is None or r is None:
            return 1.0
        return float(self.alpha) / r

    def delta(self, shape: torch.Size, *, dtype=torch.float32, device=None) -> torch.Tensor:
        """dW of the module's weight, ``shape`` (out, in[, kh, kw]), computed in ``dtype``."""
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        s = self.scale()
        if self.algo == "lora":
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            if "lora_mid.weight" in t:
                # Tucker core (LoCon "cp"): dW[o, i, k, l] = sum_ab up[o, a] mid[a, b, k, l] down[b, i]
                w = torch.einsum("abkl,oa,bi->oikl", t["lora_mid.weight"], up.flatten(1), down.flatten(1))
            else:
                w = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in * kh * kw)
            return (w * s).reshape(shape)
        if self.algo == "loha":
            # Hadamard product of two low-rank matrices (Hyeon-Woo et al. 2022, FedPara)
            w1 = _tucker_or_mm(t.get("hada_t1"), t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker_or_mm(t.get("hada_t2"), t["hada_w2_a"], t["hada_w2_b"])
            return (w1 * w2 * s).reshape(shape)
        if self.algo == "lokr":
            # Kronecker product (Yeh et al. 2023, LyCORIS): dW = kron(w1, w2)
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker_or_mm(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:  # (o2, r) @ (r, i2[, kh, kw])
                b = t["lokr_w2_b"]
                w2 = (t["lokr_w2_a"] @ b.flatten(1)).reshape(-1, *b.shape[1:])
                if len(shape) == 4 and w2.dim() == 2:
                    w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            return (torch.kron(w1.contiguous(), w2.contiguous()) * s).reshape(shape)
        if self.algo == "full":
            return t["diff"].reshape(shape)
        raise CorruptModel(f"{self.key}: unknown network algorithm {self.algo!r}")

    def bias_delta(self, *, dtype=torch.float32, device=None) -> torch.Tensor | None:
        b = self.tensors.get("diff_b")
        return None if b is None else b.to(device=device, dtype=dtype)


def _tucker_or_mm(core, a, b):
    """a @ b, or the Tucker product core x a x b for conv layers (LyCORIS ``rebuild_tucker``)."""
    if core is None:
        return a @ b
    return torch.einsum("ijkl,ip,jr->prkl", core, a, b)


def _algo(suffixes: set[str]) -> str:
    if "lora_down.weight" in suffixes:
        return "lora"
    if "hada_w1_a" in suffixes:
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    if "diff" in suffixes:
        return "full"
    raise CorruptModel(f"unknown network layout (keys {sorted(suffixes)}); danqing reads LoRA, LoCon, LoHa, "
                       "LoKr and full-diff networks")


def _peft_alpha(meta: dict[str, str], key: str, rank: int | None) -> float | None:
    """The alpha of a diffusers/peft module from the file's ``lora_adapter_metadata`` header
    (diffusers >= 0.34 writes each component's ``LoraConfig`` there as ``"unet.lora_alpha"``,
    ``"unet.alpha_pattern"``, ...); None when the header has none (scale 1)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    comp, _, name = key.partition(".")
    alpha = cfg.get(f"{comp}.lora_alpha")
    if alpha is None:
        return None
    for pattern, value in (cfg.get(f"{comp}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            alpha = value
    if cfg.get(f"{comp}.use_dora"):
        raise CorruptModel("DoRA adapters (use_dora) are not supported; LoRA, LoCon, LoHa, LoKr and full-diff are")
    if cfg.get(f"{comp}.use_rslora") and rank:
        return float(alpha) * rank ** 0.5  # rsLoRA: scale alpha / sqrt(r) = (alpha sqrt(r)) / r
    return float(alpha)


def parse_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> dict[str, NetworkModule]:
    """A LoRA/LyCORIS state dict -> {file's module key: NetworkModule}.

    Keys are kohya-style (``<module>.<suffix>``) or diffusers/peft-style (``<component>.<path>.lora_A.weight``);
    ``meta`` is the safetensors header, where diffusers keeps peft's ``lora_alpha``.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(("lora_", "lycoris_")) and "." in key:
            mod, suffix = key.split(".", 1)
        else:
            m = _PEFT.match(key)
            if not m:
                continue  # not a network tensor (e.g. a textual-inversion vector bundled in)
            mod = m.group("mod") or m.group("mod2") or m.group("mod3")
            suffix = "lora_down.weight" if m.group("mod") else "lora_up.weight" if m.group("mod2") else "alpha"
            mod = mod.replace(".processor.", ".").removesuffix("_lora")  # diffusers' old attn-processor names
            for old, new in ((".to_q_lora", ".to_q"), (".to_k_lora", ".to_k"), (".to_v_lora", ".to_v"),
                             (".to_out_lora", ".to_out.0")):
                mod = mod.replace(old, new)
            mod = mod + ".0" if mod.endswith(".to_out") else mod  # processor.to_out_lora.down.weight
        if suffix not in SUFFIXES:
            continue
        groups.setdefault(mod, {})[suffix] = value
    modules = {}
    for mod, tensors in groups.items():
        if set(tensors) <= {"alpha", "dora_scale", "on_input", "w_norm", "b_norm"}:
            continue
        if "dora_scale" in tensors:
            raise CorruptModel(f"{mod}: DoRA networks (dora_scale) are not supported; LoRA, LoCon, LoHa, LoKr "
                               "and full-diff are")
        alpha = tensors.pop("alpha", None)
        module = NetworkModule(mod, _algo(set(tensors)), tensors, None if alpha is None else float(alpha.float().item()))
        if module.alpha is None and meta and not mod.startswith(("lora_", "lycoris_")):
            module.alpha = _peft_alpha(meta, mod, module.rank)
        modules[mod] = module
    return modules


def read_bundled(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The bundled embeddings of a LoRA file (``parse_bundled``); ``{}`` when it has none."""
    path = Path(path)
    if path.suffix != ".safetensors":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return parse_bundled(sd if isinstance(sd, dict) else {})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return parse_bundled({k: f.get_tensor(k) for k in f.keys() if k.startswith(BUNDLE_PREFIX)})


def read_network(path: Path) -> tuple[dict[str, NetworkModule], dict[str, str]]:
    """A LoRA/LyCORIS file (``.safetensors``, or a pickle read with ``weights_only=True``) ->
    (modules, safetensors metadata)."""
    path = Path(path)
    meta: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            sd = {}
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise CorruptModel(f"{path.name}: not a readable LoRA file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(sd, dict):
        raise CorruptModel(f"{path.name}: not a LoRA state dict")
    modules = parse_state_dict(sd, meta)
    if not modules and not any(str(k).startswith(BUNDLE_PREFIX) for k in sd):  # bundled vectors alone: no modules
        raise CorruptModel(f"{path.name}: no LoRA/LyCORIS tensors found (expected lora_unet_*/lora_te_* or "
                           "unet.*.lora_A.weight keys)")
    return modules, meta


# ---------------------------------------------------------------------------------------------
# Matching: the file's module keys -> (component, module) of the loaded model (kohya.name_table)
# ---------------------------------------------------------------------------------------------
def context_width(modules: dict[str, NetworkModule]) -> int | None:
    """The cross-attention input width a LoRA was made for (768 SD1, 1024 SD2, 2048 SDXL),
    read from an ``attn2.to_k`` module's factors; None when the file has none."""
    for key, m in modules.items():
        if "attn2" in key and "to_k" in key:
            t = m.tensors
            if "lora_down.weight" in t:
                return t["lora_down.weight"].shape[1]
            if "hada_w1_b" in t:
                return t["hada_w1_b"].shape[1]
    return None


_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# module names that only one transformer family has (diffusers' and the original layout)
_FLOW_MARKS = {"flux": ("single_transformer_blocks", "single_blocks", "double_blocks"),
               "sd3": ("joint_blocks", "context_block")}


def _describe(modules: dict[str, NetworkModule]) -> str:
    for family, marks in _FLOW_MARKS.items():
        if any(mark in key for key in modules for mark in marks):
            return family
    return _describe_width(context_width(modules))


def _describe_width(width: int | None) -> str:
    if width is None:
        return "an unknown model"
    fam = _WIDTH_FAMILY.get(width)
    return f"{fam} (cross-attention width {width})" if fam else f"a model with cross-attention width {width}"


@dataclass
class ResolvedNetwork:
    """A network matched against one loaded model: (component, module name) -> NetworkModule."""

    name: str
    sha256: str
    targets: dict[tuple[str, str], NetworkModule] = field(default_factory=dict)
    # (Embedding, ...): textual-inversion vectors bundled in the file (``bundle_emb.*``), used by name while active
    embeddings: tuple = ()

    @property
    def short_hash(self) -> str:
        """A1111's LoRA short hash: the first 12 hex characters of the file's sha256."""
        return self.sha256[:12]


def resolve(name: str, sha256: str, modules: dict[str, NetworkModule], comps, model_name: str) -> ResolvedNetwork:
    """Match a network's modules to ``comps``; a network made for another model is refused,
    naming both (every module must exist with a matching shape, as A1111 would otherwise
    silently skip half a LoRA)."""
    if is_motion_network(modules):
        raise IncompatibleModel(f"LoRA {name!r} is a motion LoRA (AnimateDiff): it changes a motion module's layers; "
                                f"use it in a video prompt with a motion module (danqing video)")
    table = name_table(comps)
    fused = fused_table(comps)
    out = ResolvedNetwork(name, sha256)
    missing, wrong = [], []
    for key, m in modules.items():
        target = table.get(key)
        if target is None and key in fused:  # an SD3 / FLUX module in the original layout: split it
            parts = {t: NetworkModule(f"{key}[{t[1]}]", m.algo, tensors, m.alpha)
                     for t, tensors in (split_fused(m.algo, m.tensors, *fused[key], comps) or {}).items()}
            if not parts or not all(p.fits(comps.unet.get_submodule(t[1]).weight.shape) for t, p in parts.items()):
                wrong.append(f"{key} (its factors do not split onto {', '.join(fused[key][1])})")
            else:
                out.targets.update(parts)
            continue
        if target is None:
            missing.append(key)
            continue
        weight = getattr(getattr(comps, target[0]).get_submodule(target[1]), "weight")
        if not m.fits(weight.shape):
            wrong.append(f"{key} (made for {m.out_in()}, the model's is {tuple(weight.shape[:2])})")
            continue
        out.targets[target] = m
    if missing or wrong:
        mine = _describe(modules)
        width = getattr(comps.unet.config, "cross_attention_dim", None)
        width = width if isinstance(width, int) else None
        theirs = f"{comps.family} (cross-attention width {width})" if width else comps.family
        example = (missing or wrong)[0]
        raise IncompatibleModel(f"LoRA {name!r} does not fit model {model_name!r}: the LoRA is for {mine}, the model "
                                f"is {theirs}; {len(missing) + len(wrong)} of {len(modules)} modules do not match "
                                f"(first: {example})")
    return out


# ---------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    """One ``<lora:name:unet:te>`` use: a network and its two multipliers."""

    network: ResolvedNetwork
    unet: float
    te: float


def _apply(comps, activations: list[Activation], saved: dict) -> None:
    """Add ``multiplier * dW`` of every activation to the weights; originals go into ``saved``
    first (so a failure half-way can still be undone)."""
    sums: dict[tuple[str, str], list] = {}
    for act in activations:
        for target, m in act.network.targets.items():
            mult = act.unet if target[0] == "unet" else act.te
            if mult != 0:
                sums.setdefault(target, []).append((m, mult))
    with torch.no_grad():
        for target, items in sums.items():
            mod = getattr(comps, target[0]).get_submodule(target[1])
            w = mod.weight
            saved[target] = (w.detach().clone(), None if mod.bias is None else mod.bias.detach().clone())
            acc = w.detach().float()
            bias = None if mod.bias is None else mod.bias.detach().float()
            for m, mult in items:
                acc = acc + mult * m.delta(w.shape, device=w.device)
                db = m.bias_delta(device=w.device)
                if db is not None and bias is not None:
                    bias = bias + mult * db
            w.copy_(acc.to(w.dtype))
            if bias is not None:
                mod.bias.copy_(bias.to(mod.bias.dtype))


def _restore(comps, saved: dict) -> None:
    with torch.no_grad():
        for target, (w, b) in saved.items():
            mod = getattr(comps, target[0]).get_submodule(target[1])
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)


@contextlib.contextmanager
def patched(comps, activations: list[Activation]):
    """Add every network's ``multiplier * dW`` to the weights of ``comps`` for the duration of
    the block, then put back the saved original tensors (bit-identical restore, also when the
    block raises).

    Deltas are computed in fp32 and added to an fp32 copy of the weight, then cast back
    (A1111's and ComfyUI's order), so several networks on one module sum before rounding.
    """
    saved: dict = {}
    try:
        _apply(comps, activations, saved)
        yield
    finally:
        _restore(comps, saved)


def merge_into(comps, activations: list[Activation]) -> None:
    """Add the networks to ``comps`` for good (a LoRA merged into a checkpoint): the same
    arithmetic as ``patched``, without the restore."""
    saved: dict = {}
    try:
        _apply(comps, activations, saved)
    except BaseException:
        _restore(comps, saved)
        raise


# ---------------------------------------------------------------------------------------------
# Prompt tags
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraTag:
    """``<lora:name:te_weight:unet_weight>`` as A1111 reads it (also ``te=``/``unet=`` by name)."""

    name: str
    unet: float
    te: float

    def __str__(self) -> str:
        return f"<lora:{self.name}:{_fmt(self.te)}>" if self.unet == self.te else \
            f"<lora:{self.name}:{_fmt(self.te)}:{_fmt(self.unet)}>"


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_lora_args(args: list[str]) -> LoraTag:
    """The arguments of one ``<lora:...>`` tag, as A1111's ``extra_networks_lora`` reads them:
    ``name[:te[:unet]]`` positionally (one number applies to both; the UNet weight defaults to
    the text-encoder weight), or ``te=``/``unet=`` by name (``dyn=`` is accepted and ignored).
    Default weight 1."""
    if not args or not args[0].strip():
        raise ValueError("a <lora:...> tag needs a name: <lora:name:0.8>")
    name = args[0].strip()
    pos: list[float] = []
    named: dict[str, float] = {}
    for a in args[1:]:
        a = a.strip()
        try:
            if "=" in a:
                k, v = a.split("=", 1)
                k = k.strip()
                if k not in ("unet", "te", "dyn"):
                    raise ValueError
                if k != "dyn":
                    named[k] = float(v)
            else:
                pos.append(float(a))
        except ValueError:
            raise ValueError(f"<lora:{':'.join(args)}>: {a!r} is not a weight; use <lora:name:0.8>, "
                             "<lora:name:te:unet> or <lora:name:te=0.5:unet=0.8>") from None
    if len(pos) > 2:
        raise ValueError(f"<lora:{':'.join(args)}>: at most two weights (te, unet)")
    te = pos[0] if pos else 1.0
    unet = pos[1] if len(pos) > 1 else te
    te, unet = named.get("te", te), named.get("unet", unet)
    return LoraTag(name, unet, te)


def lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its ``<lora:...>`` tags, the tags); other extra-network kinds are refused."""
    text, found = strip_extra_networks(prompt)
    tags = []
    for kind, args in found:
        if kind not in ("lora", "lyco"):
            raise ValueError(f"<{kind}:...> is not an extra network danqing knows; use <lora:name:weight>")
        tags.append(parse_lora_args(args))
    return text, tags


def request_tags(request) -> list[LoraTag]:
    """The ``<lora:...>`` tags of a request, from its prompt (A1111 reads extra networks from the
    positive prompt). Tags in the negative prompt are refused; a hires prompt, when it has tags,
    must name the same networks as the prompt (one set of weights per request)."""
    try:
        _, tags = lora_tags(request.prompt)
        for name in ("negative_prompt", "hr_negative_prompt"):
            if getattr(request, name, None) and lora_tags(getattr(request, name))[1]:
                raise InvalidRequest(name, "<lora:...> tags belong in the prompt, not the negative prompt")
        for name in ("hr_prompt", "p2p_source"):
            other = lora_tags(getattr(request, name))[1] if getattr(request, name, None) else []
            if other and sorted(map(str, other)) != sorted(map(str, tags)):
                raise InvalidRequest(name, "its <lora:...> tags must be those of the prompt "
                                     f"({', '.join(map(str, tags)) or 'none'})")
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest("prompt", str(exc)) from None
    seen: dict[str, LoraTag] = {}
    for t in tags:
        if t.name in seen:
            raise InvalidRequest("prompt", f"LoRA {t.name!r} is used twice; give it once with one weight")
        seen[t.name] = t
    return tags


class NetworkCache:
    """Parsed network files by (path, sha256), a few at a time (read-only data; no request state)."""

    def __init__(self, capacity: int = 8):
        self._items: LRUCache[tuple[dict[str, NetworkModule], dict]] = LRUCache(capacity)

    def _entry(self, path: Path, sha256: str) -> tuple[dict[str, NetworkModule], dict]:
        return self._items.get_or_load((str(path), sha256), lambda: (read_network(path)[0], read_bundled(path)))

    def get(self, path: Path, sha256: str) -> dict[str, NetworkModule]:
        return self._entry(path, sha256)[0]

    def bundled(self, path: Path, sha256: str) -> dict[str, dict[str, torch.Tensor]]:
        """The file's bundled embeddings (``read_bundled``)."""
        return self._entry(path, sha256)[1]


def find_network(tag: LoraTag, registry):
    """(the registry entry, its sha256) of a tagged network; one line naming what is installed."""
    try:
        entry = registry.find("lora", tag.name)
    except ModelNotFound:
        names = ", ".join(e.name for e in registry.scan("lora")) or "none"
        raise InvalidRequest("prompt", f"LoRA {tag.name!r} not found in {registry.folder('lora')}; "
                             f"installed: {names}") from None
    return entry, registry.sha256(entry)


def activate(tags: list[LoraTag], comps, *, registry, model_name: str, cache: NetworkCache) -> list[Activation]:
    """Find, read and match every tagged network (errors name the LoRA and what is installed)."""
    acts = []
    for tag in tags:
        entry, digest = find_network(tag, registry)
        net = resolve(tag.name, digest, cache.get(entry.path, digest), comps, model_name)
        net.embeddings = bundled_embeddings(cache.bundled(entry.path, digest), tag.name, digest, comps)
        acts.append(Activation(net, tag.unet, tag.te))
    return acts


def bake_embeddings(comps, embeddings) -> None:
    """Write bundled embeddings into the text encoders' token tables for good (merge-lora): the
    rows of the name's tokens become its vectors -- what using it by name does at generation.
    A name whose token count differs from its vector count cannot be baked (a clear error)."""
    for emb in embeddings:
        for key, tok, te in zip(encoder_keys(comps.family), (comps.tokenizer, comps.tokenizer_2),
                                (comps.text_encoder, comps.text_encoder_2)):
            if key is None or te is None:
                continue
            ids, vec = name_ids(tok, emb.name), emb.vectors[key]
            if len(ids) != vec.shape[0]:
                raise IncompatibleModel(f"bundled embedding {emb.name!r} has {vec.shape[0]} vector(s) but its name is "
                                        f"{len(ids)} token(s): it cannot be merged into the checkpoint; use the LoRA "
                                        "by its tag instead")
            table = te.get_input_embeddings().weight
            with torch.no_grad():
                table[ids] = vec.to(table.dtype)


def bundled_embeddings(bundled: dict[str, dict[str, torch.Tensor]], lora_name: str, sha256: str, comps) -> tuple:
    """A LoRA's bundled vectors as ``Embedding``s, checked against ``comps``. As in A1111 they
    are used by name while the LoRA is active; unlike a standalone embedding, the name may be
    a vocabulary word (pivotal tuning re-learns a word the base model barely knew)."""
    out = []
    for name, vectors in bundled.items():
        emb = Embedding(name, vectors, hash=sha256, meta={"bundled_in": lora_name})
        check_fits(emb, comps)
        out.append(emb)
    return tuple(out)
