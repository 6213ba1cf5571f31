"""Prompt expansion of the comic's scene lines (a storyboard's ``expand``; off by default).

* ``expand = "rules"`` (or ``"rules:WORLD"``): one phrase of the world's table
  (``data/apps/comic_expand.toml``: ``shapes`` by default, ``portraits`` for the portrait world:
  expression and pose) is appended to the scene line, drawn from the panel's seed.
* ``expand = "lm:FOLDER"``: a causal language model continues the scene line, as Fooocus
  expands prompts with GPT-2. FOLDER is a local transformers folder (config, weights and
  tokenizer; nothing is downloaded), relative to the storyboard's folder, or the name of a folder
  in ``models/prompt_expansion/`` (the only form a server storyboard may use). Decoding is greedy,
  under the panel's seed, so a seed gives the same expansion every time.

The expanded line replaces the scene line in the panel's prompt, so the expansion is in the
panel's infotext (``generate --from`` re-creates the panel without expanding again) and in the
project's ``project.json``.
"""

from __future__ import annotations

import functools
import random
import tomllib
from importlib import resources
from pathlib import Path

from danqing.errors import InvalidRequest
from danqing.models.names import Named, inside, resolve

RULES = "data/apps/comic_expand.toml"
LM_FOLDER = "prompt_expansion"  # models/<this>/NAME: language models named by a storyboard
MAX_NEW_TOKENS = 20


@functools.lru_cache(maxsize=1)
def rules() -> dict[str, dict[str, list[str]]]:
    """{world: {"en": phrases, "zh": phrases}} from ``data/apps/comic_expand.toml``."""
    return tomllib.loads(resources.files("danqing").joinpath(RULES).read_text(encoding="utf-8"))


def check_expand(spec: str | None) -> str | None:
    """A storyboard's ``expand`` value, or ValueError saying what is allowed."""
    if spec is None:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "rules" and (not arg or arg in rules()):
        return spec
    if kind == "lm" and arg.strip():
        return spec
    raise ValueError(f"expand {spec!r}: use \"rules\", \"rules:WORLD\" (worlds: {', '.join(rules())}) or "
                     "\"lm:FOLDER\" (a transformers causal language model folder)")


def _cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def expand_rules(scene: str, seed: int, world: str = "shapes") -> str:
    """The scene line and one phrase of ``world`` drawn from ``seed`` (and the line itself)."""
    table = rules()[world]
    zh = _cjk(scene)
    phrase = random.Random(f"comic-expand:{seed}:{scene}").choice(table["zh" if zh else "en"])
    return scene + phrase if zh else f"{scene}, {phrase}"


def lm_folders(models_dir: Path) -> list[Named]:
    """The language-model folders installed in ``models/prompt_expansion/`` (by name)."""
    root = Path(models_dir) / LM_FOLDER
    if not root.is_dir():
        return []
    return [Named(p.name, p) for p in sorted(root.iterdir()) if p.is_dir() and inside(p, root)]


def lm_folder(target: str, *, base_dir: Path | None, models_dir: Path, names_only: bool) -> Path:
    """The folder ``lm:TARGET`` names: a name of ``models/prompt_expansion/`` or (not
    ``names_only``: the CLI's user) a folder path, relative to ``base_dir``."""
    named = lm_folders(models_dir)
    if names_only:
        return resolve(target, named, field="storyboard.expand", what="language model", folder=LM_FOLDER).path
    for n in named:
        if n.name == target:
            return n.path
    path = Path(target).expanduser()
    path = path if path.is_absolute() or base_dir is None else Path(base_dir) / path
    if path.is_dir():
        return path
    raise InvalidRequest("expand", f"lm:{target}: no such folder; give a folder holding a transformers causal "
                                   f"language model and its tokenizer, or a name of models/{LM_FOLDER}/ "
                                   f"(installed: {', '.join(n.name for n in named) or 'none'})")


@functools.lru_cache(maxsize=2)
def _load_lm(folder: str):
    """(tokenizer, model) of a local folder; read-only once loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loaded by the first expansion

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise InvalidRequest("expand", f"lm:{folder}: not a transformers causal language model folder (config, "
                                       f"weights and tokenizer): {str(exc).splitlines()[0]}") from None
    return tokenizer, model


def expand_lm(scene: str, seed: int, folder: Path) -> str:
    """The scene line continued by the language model in ``folder`` (greedy, ``MAX_NEW_TOKENS``)."""
    import torch  # heavy: imported by the first expansion

    tokenizer, model = _load_lm(str(Path(folder).resolve()))
    inputs = tokenizer(scene, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
    words = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    words = " ".join(words.replace("<", " ").replace(">", " ").split()).strip(" ,")  # no stray LoRA tags
    return f"{scene}, {words}" if words else scene


def expand(spec: str | None, scene: str, seed: int, *, base_dir: Path | None, models_dir: Path,
           names_only: bool) -> str:
    """A scene line expanded as ``spec`` says (unchanged when ``spec`` is None)."""
    if spec is None:
        return scene
    kind, _, arg = spec.partition(":")
    if kind == "rules":
        return expand_rules(scene, seed, arg or "shapes")
    return expand_lm(scene, seed, lm_folder(arg, base_dir=base_dir, models_dir=models_dir, names_only=names_only))
