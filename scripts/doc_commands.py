"""Run every shell command of README.md and docs/*.md, as a user of a fresh clone would.

Extracts the commands of the fenced blocks (``bash``, ``sh``, ``console`` or none; a line is a
command when it starts with a command word: ``danqing``, ``.venv/bin/danqing``, ``python``,
``make``, ``curl``, ...; ``\\`` continuations and lines inside an open quote are joined, comments
dropped, a leading ``$ `` prompt removed), classifies each:

- **as written**: runs unchanged;
- **small**: runs with small sizes substituted by the rules of ``SMALL`` (a table: 2 training
  steps, ``--n 4`` held-out prompts, ...);
- **skipped**: a reason from ``SKIPS``, a table keyed by a pattern (needs a GPU, a user's model
  file, a running server, ...);

and runs the first two kinds, each file's in document order (a later command may read what an
earlier one wrote), in a scratch folder per file that looks like a fresh clone after ``make demo``
(the repository's files linked in, ``.venv`` pointing at the virtual environment, ``HOME`` and
the danqing home inside the scratch folder). Pictures and files the docs assume the user has
(``picture.png``, ``mask.png``, ``story.toml``, ...) are made first from ``FIXTURES``. It prints a
table (file:line, command, outcome, seconds) and with ``--markdown`` writes docs/commands.md.

    .venv/bin/python scripts/doc_commands.py                          # all docs (make doc-commands)
    .venv/bin/python scripts/doc_commands.py docs/editing.md --timeout 120
    .venv/bin/python scripts/doc_commands.py --list                   # extract and classify only
    .venv/bin/python scripts/doc_commands.py --markdown docs/commands.md

``check_options`` parses a ``danqing`` command against the CLI's Click tree without running it
(tests/test_doc_commands.py: every command and option the docs name exists).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
# fenced blocks whose lines may be commands (```bash, ```sh, ```console, ``` with no language)
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "shell-session", "zsh"}
# a command line: optional `$ ` prompt, optional VAR=value prefixes, then a command word
COMMAND_WORDS = (r"danqing|\.venv/bin/\S+|python3?|make|curl|pip|accelerate|scripts/\S+\.sh|bench/\S+\.py|"
                 r"mkdir|cp|createdb|\w+=\$\(curl")
COMMAND_RE = re.compile(rf"^(?:\$ )?(?:[A-Za-z_]\w*=\S*\s+)*(?:{COMMAND_WORDS})(?:\s|$)")
ENV_PREFIX_RE = re.compile(r"^(?:[A-Za-z_]\w*=\S*\s+)+")
# [--option VALUE] in a synopsis line: an optional part (dropped to run, checked by the parser)
OPTIONAL_RE = re.compile(r"\s\[(--[^\]]*)\]")


@dataclass
class DocCommand:
    """One command of a doc.

    Attributes:
        file: the doc, relative to the repository (``docs/editing.md``).
        line: the line its text starts on.
        text: the command as written (continuations joined, comment dropped).
        comment: the comment after it (``# -> photo-canny.png``), without the ``#``.
        expect_error: a console block shows ``error: ...`` after it: it must exit with code 2.
        kind: "as written", "small" or "skipped" (``classify``).
        reason: why it is skipped (a value of ``SKIPS``).
        rules: the ``SMALL`` rules applied.
        run_text: the command that runs (``text`` with the rules applied, optional parts dropped).
    """

    file: str
    line: int
    text: str
    comment: str = ""
    expect_error: bool = False
    kind: str = ""
    reason: str = ""
    rules: list[str] = field(default_factory=list)
    run_text: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def split_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` -> (cmd, comment): a ``#`` that starts a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole shell command (no open quote)."""
    try:
        shlex.split(text)
        return True
    except ValueError:
        return False


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the first line inside, language, lines) of each fenced block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1).lower(), number + 1, []
        elif fence:
            blocks.append((start, lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def extract_text(text: str, file: str) -> list[DocCommand]:
    """The commands of one markdown text (``file`` names it in the results)."""
    out: list[DocCommand] = []
    for start, lang, lines in fenced_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        i = 0
        while i < len(lines):
            raw = lines[i].strip()
            if not COMMAND_RE.match(raw):
                i += 1
                continue
            first, prompt = start + i, raw.startswith("$ ")
            parts, comments = [], []
            while True:
                cmd, comment = split_comment(lines[i].strip())
                if comment:
                    comments.append(comment)
                if cmd.endswith("\\"):
                    parts.append(cmd[:-1].rstrip())
                elif not _complete(" ".join(parts + [cmd])) and i + 1 < len(lines):
                    parts.append(cmd)  # a quote that goes on on the next line
                else:
                    parts.append(cmd)
                    break
                i += 1
                if i >= len(lines):
                    break
            text_ = " ".join(p for p in parts if p).removeprefix("$ ")
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            out.append(DocCommand(file, first, text_, " ".join(comments),
                                  expect_error=prompt and nxt.startswith("error:")))
            i += 1
    return out


INLINE_RE = re.compile(r"`((?:\.venv/bin/)?danqing [^`]+)`")


def inline_commands(text: str, file: str) -> list[DocCommand]:
    """``danqing ...`` commands quoted in the prose (`` `danqing eval shapes|portraits` ``), for the
    option check only: the first of ``a|b`` alternatives, ``...`` left out; ``COMMAND`` (any
    command) spans are not commands."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in INLINE_RE.finditer(line):
            span = match.group(1)
            if "COMMAND" in span:
                continue
            span = re.sub(r"(?<![\"'])\b([\w-]+)(?:\|[\w-]+)+", r"\1", span.replace("...", " "))
            out.append(DocCommand(file, number, " ".join(span.split()), kind="inline"))
    return out


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and docs/*.md, docs/commands.md (this script's own output) left out."""
    return [root / "README.md"] + sorted(p for p in (root / "docs").glob("*.md") if p.name != "commands.md")


def extract(files: list[Path] | None = None, root: Path = ROOT) -> list[DocCommand]:
    """Every command of ``files`` (default: ``doc_files``), classified."""
    out = []
    for path in files or doc_files(root):
        for cmd in extract_text(path.read_text(encoding="utf-8"), str(path.relative_to(root))):
            out.append(classify(cmd))
    return out


# ---------------------------------------------------------------------------------------------
# Classification: the tables
# ---------------------------------------------------------------------------------------------
SERVER = "starts a server that runs until it is stopped"
NEEDS_SERVER = "needs a running server (`danqing serve` in another terminal)"
NETWORK = "installs packages from the network"
POSTGRES = "needs a PostgreSQL server"
OBJECT_STORE = "writes to an object store (s3://: needs s3fs and the bucket's credentials)"
GPU = "needs an NVIDIA GPU"
SD_MODELS = "needs user-provided Stable Diffusion checkpoints (dreamshaper_8, v1-5-pruned, ...)"
BIG_MODELS = "needs a user-provided SD3 / FLUX / unCLIP / Kandinsky / DeepFloyd IF model"
EXTRA_MODELS = "needs a user-provided model file (upscaler, face restorer, IP-Adapter, pose detector)"
MOTION = "needs a user-provided AnimateDiff motion module in models/motion/ (or its clip)"
LORAS = "needs a LoRA file in models/lora/ (style: trained with `danqing train lora`, then copied there)"
PLACEHOLDER = "a placeholder for the user's own file or name (MODEL, PICTURE, my.toml, ~/photos/...)"
PERSON = "needs photos of a real person (`app portrait add`) and what it makes"
DEPENDS = "reads what a skipped command writes"
PACKAGE = "writes into the package (danqing/data/models/): how the bundled models were made"
LONG = "takes more than 10 minutes on 2 CPU cores and has no small-size option"

# (pattern searched in the command, reason): the first match wins
SKIPS: list[tuple[str, str]] = [
    (r"^make test\b", "runs the whole test suite (about 30 minutes on 2 cores)"),
    (r"\bcurl\b", NEEDS_SERVER),
    (r"^make serve\b|\bdanqing serve\b|\bray-serve\b", SERVER),
    (r"^pip install\b", NETWORK),
    (r"^createdb\b|postgresql://", POSTGRES),
    (r"s3://", OBJECT_STORE),
    (r"--device cuda|--fast (?:channels-last|fuse-qkv|compile)|--medvram|--lowvram|--replica-gpus|--worker-gpus|train_gpu\.sh", GPU),
    (r"dreamshaper_8|realisticVision|v1-5-pruned|sd-inpainting|my-sd15|YOUR-LCM-MODEL|my-ip2p", SD_MODELS),
    (r"sd3-medium|flux1-dev|stable-unclip|kandinsky|IF-I-XL|IF-II-L", BIG_MODELS),
    (r"4x-UltraSharp|--restore-faces|--ip-adapter (?!green-star\.png)|preprocess openpose|openpose:", EXTRA_MODELS),
    (r"danqing video |clip\.mp4", MOTION),
    (r"<lora:style\b|--lora style", LORAS),
    (r"portrait (?:add|make|rank) anna", PERSON),
    (r"--from (?:talk\.mp4|panda\.png)|generate --from outputs/txt2img-images/", DEPENDS),
    (r"~/photos|~/Downloads|\bMODEL\b|\bPICTURE\b|\bCHECKPOINT\b|--config \.\.\.|\bmy(?:-lora)?\.toml\b|runs/OLD", PLACEHOLDER),
    (r"bundle_model\.py", PACKAGE),
    (r"ti_known_shape\.py|bench/ray_\w+\.py|eval_person_lora\.py|eval_talk_world\.py", LONG),
]

# the commands that sample (their --steps: sampling steps; 3d: optimisation steps)
SAMPLING = (r"^(?!.*--help)(?:\.venv/bin/)?danqing (?:--[\w-]+ \S+ )*(?:generate|img2img|inpaint|outpaint|xyz|from-file|batch|"
            r"edit p2p|3d|variations|eval (?:shapes|portraits|cascade) .*--n)\b")
STEPS_RULE = "commands that sample: `--steps 4` (4 sampling steps; `3d`: 4 optimisation steps)"
# small sizes: (pattern selecting the command, pattern to replace or None to append, replacement, rule)
SMALL: list[tuple[str, str | None, str, str]] = [
    (r"^make demo\b", r"^make demo", "make -o .venv/.stamp-install demo", "`make demo`: .venv is there (its install step is not remade)"),
    (r".", r"(?<=/)20\d\d-\d\d-\d\d(?=/)", "{today}", "a date in an example path: today's"),
    (SAMPLING + r".*--steps", r"--steps \d+", "--steps 4", STEPS_RULE),
    (SAMPLING + r"(?!.*--steps)", None, "--steps 4", STEPS_RULE),
    (r"danqing .*\beval (?:shapes|portraits|cascade)\b", r"--n \d+", "--n 4", "`eval --n`: 4 held-out prompts"),
    (r"edit p2p .*--image", None, "--null-iterations 2", "`edit p2p --image`: 2 null-text optimisation steps per step"),
    (r"train preview-decoder", None, "--steps 2 --n-images 16 --batch-size 4", "`train preview-decoder`: 2 steps"),
    (r"eval_concept\.py", None, "--n-concept 2 --n-ordinary 2 --steps 4", "`eval_concept.py`: 2 + 2 prompts, 4 steps"),
    (r"train (?:base|instruct|controlnet|ip-adapter|flow|cascade|unclip|prior|lora|dreambooth|textual-inversion|distill|clip|faces)\b", None, "{train_sets}",
     "`train`: 2 steps on a few pictures, no sample grids (`--set`, the keys of TRAIN_SETS)"),
]

# `train KIND`: the --set overrides of a 2-step run; a section is set only when the config has it
# (or the kind always has it), so that no optional part (prior preservation) is switched on
TRAIN_SETS: dict[str, dict[str, str]] = {
    "base": {"data.n_images": "32", "vae.steps": "2", "vae.crop_steps": "0", "vae.batch_size": "4",
             "unet.steps": "2", "unet.batch_size": "4", "unet.warmup_steps": "0", "run.log_every": "1",
             "run.checkpoint_every": "2", "run.sample_every": "1000000", "run.eval_every": "1000000",
             "run.eval_prompts": "0", "run.eval_steps": "2", "run.max_minutes": "0"},
    "instruct": {"data.n_pairs": "8", "instruct.eval_pairs": "1", "unet.steps": "2", "unet.batch_size": "4",
                 "unet.warmup_steps": "0", "run.log_every": "1", "run.checkpoint_every": "2",
                 "run.eval_every": "1000000", "run.eval_steps": "2", "run.max_minutes": "0"},
    "controlnet": {"data.n_images": "8", "controlnet.eval_maps": "1", "unet.steps": "2", "unet.batch_size": "4",
                   "unet.warmup_steps": "0", "run.log_every": "1", "run.checkpoint_every": "2",
                   "run.eval_every": "1000000", "run.eval_steps": "2", "run.max_minutes": "0"},
    "ip-adapter": {"data.n_images": "8", "ip_adapter.eval_per_object": "0", "unet.steps": "2", "unet.batch_size": "4",
                   "unet.warmup_steps": "0", "run.log_every": "1", "run.checkpoint_every": "2",
                   "run.eval_every": "1000000", "run.eval_steps": "2", "run.max_minutes": "0"},
    "flow": {"data.n_images": "8", "unet.steps": "2", "unet.batch_size": "4", "unet.warmup_steps": "0",
             "run.log_every": "1", "run.checkpoint_every": "2", "run.sample_every": "1000000",
             "run.eval_every": "1000000", "run.eval_prompts": "0", "run.eval_steps": "2", "run.max_minutes": "0"},
    "cascade": {"data.n_images": "8", "unet.steps": "2", "unet.batch_size": "4", "unet.warmup_steps": "0",
                "run.log_every": "1", "run.checkpoint_every": "2", "run.sample_every": "1000000",
                "run.eval_every": "1000000", "run.eval_prompts": "0", "run.max_minutes": "0"},
    "unclip": {"data.n_images": "8", "unclip.eval_pictures": "0", "unet.steps": "2", "unet.batch_size": "4",
               "unet.warmup_steps": "0", "run.log_every": "1", "run.checkpoint_every": "2",
               "run.eval_every": "1000000", "run.eval_steps": "2", "run.max_minutes": "0"},
    "prior": {"data.n_images": "8", "prior.eval_prompts": "0", "unet.steps": "2", "unet.batch_size": "4",
              "unet.warmup_steps": "0", "run.log_every": "1", "run.checkpoint_every": "2",
              "run.eval_every": "1000000", "run.max_minutes": "0"},
    "clip": {"data.n_images": "16", "train.steps": "2", "train.batch_size": "4", "train.warmup_steps": "0",
             "output.log_every": "1", "output.eval_every": "2", "output.eval_scenes": "10"},
    "faces": {"data.n_images": "64", "train.steps": "2", "train.batch_size": "4", "train.warmup_steps": "0",
              "output.log_every": "1", "output.eval_every": "2", "output.eval_people": "4"},
    "finetune": {"data.n_images": "2", "train.steps": "2", "train.batch_size": "2", "train.warmup_steps": "0",
                 "output.log_every": "1", "output.checkpoint_every": "2",
                 "output.sample_every": "1000000", "output.sample_steps": "2",
                 "prior.n_class_images": "2", "prior.sample_steps": "2"},
}
ALWAYS = {"data", "vae", "unet", "run", "instruct", "controlnet", "ip_adapter", "flow", "cascade", "unclip", "train", "model",
          "output"}


def _train_sets(text: str, root: Path) -> str:
    """The ``--set`` options of a 2-step run of the ``train`` command ``text``."""
    kind = re.search(r"train (base|instruct|controlnet|ip-adapter|flow|cascade|unclip|prior|lora|dreambooth|textual-inversion|distill|clip|faces)\b", text).group(1)
    sets = TRAIN_SETS.get(kind, TRAIN_SETS["finetune"])
    config = re.search(r"--config\s+(\S+)", text)
    sections = set(ALWAYS)
    if config and (root / config.group(1)).is_file():
        import tomllib

        sections |= set(tomllib.loads((root / config.group(1)).read_text(encoding="utf-8")))
    if kind != "dreambooth" and not (config and "prior" in sections - ALWAYS):
        sections.discard("prior")
    processes = re.search(r"--num-processes\s+(\d+)", text)
    if processes:  # DDP: every process keeps a share of the global batch (training/runs.py)
        sets = {k: (str(max(int(v), int(processes.group(1)))) if k.endswith("batch_size") else v)
                for k, v in sets.items()}
    return " ".join(f"--set {k}={v}" for k, v in sets.items() if k.split(".")[0] in sections)


def classify(cmd: DocCommand, root: Path = ROOT, today: str | None = None) -> DocCommand:
    """Set ``kind``, ``reason``, ``rules`` and ``run_text`` of ``cmd`` from the tables."""
    run = OPTIONAL_RE.sub("", cmd.text)  # optional parts of a synopsis are not run (nor a reason to skip)
    for pattern, reason in SKIPS:
        if re.search(pattern, run) and not cmd.expect_error:
            cmd.kind, cmd.reason, cmd.run_text = "skipped", reason, ""
            return cmd
    today = today or datetime.date.today().isoformat()
    for select, find, replace, rule in SMALL:
        if not re.search(select, run):
            continue
        value = replace.replace("{today}", today)
        if "{train_sets}" in value:
            value = value.replace("{train_sets}", _train_sets(run, root))
        new = run + " " + value if find is None else re.sub(find, value, run)
        if new != run:
            run = new
            cmd.rules.append(rule)
    cmd.kind = "small" if cmd.rules else "as written"
    cmd.run_text = run
    return cmd


# ---------------------------------------------------------------------------------------------
# Parsing a danqing command against the CLI (no command runs)
# ---------------------------------------------------------------------------------------------
DANQING_RE = re.compile(r"^(?:\.venv/bin/)?danqing\s|^(?:python3?|\.venv/bin/python) -m danqing(?:\.cli)?\s|"
                        r"^accelerate launch -m danqing\.cli\s")


def danqing_args(text: str) -> list[str] | None:
    """The arguments after the program of a ``danqing`` command (optional ``[--x Y|Z]`` parts
    included, their first alternative), or None for another program."""
    text = ENV_PREFIX_RE.sub("", text)
    match = DANQING_RE.match(text + " ")
    if not match:
        return None
    rest = OPTIONAL_RE.sub(lambda m: " " + re.sub(r"(\S+)\|\S+", r"\1", m.group(1)), text[match.end():])
    return shlex.split(rest.split(" | ")[0])


def check_options(args: list[str], root_command=None) -> str | None:
    """Parse ``args`` (``danqing_args``) against the Click tree of the CLI without running the
    command: None when every command and option exists (and each option that takes a value has
    one), else Click's message. Only Click's option parser runs: no values are converted, no
    required argument is asked for, nothing is called. (Typer may bring its own copy of Click:
    the tree's classes are used, not ``import click``.)"""
    if root_command is None:
        import typer

        from danqing.cli import app

        root_command = typer.main.get_command(app)
    context = type(root_command).context_class
    command, name, rest, parent = root_command, "danqing", list(args), None
    try:
        while True:
            ctx = context(command, info_name=name, parent=parent)
            _, rest, _ = command.make_parser(ctx).parse_args(args=rest)
            if not hasattr(command, "resolve_command") or not rest or "--help" in args:
                return None
            name, command, rest = command.resolve_command(ctx, rest)
            parent = ctx
    except Exception as exc:  # Click's UsageError (whichever Click), with its one-line message
        if hasattr(exc, "format_message"):
            return exc.format_message()
        raise


# ---------------------------------------------------------------------------------------------
# Fixtures: what the docs assume the user has
# ---------------------------------------------------------------------------------------------
# (pattern in a command, file made before it runs when missing, how): kinds in make_fixture
FIXTURES: list[tuple[str, str, str]] = [
    (r"\bpicture\.png\b", "picture.png", "shapes"),
    (r"\bphoto\.png\b", "photo.png", "shapes"),
    (r"\bphoto\.jpg\b", "photo.jpg", "shapes"),
    (r"\binit\.png\b", "init.png", "shapes"),
    (r"\bcolours\.png\b", "colours.png", "shapes"),
    (r"\bthat\.png\b", "that.png", "shapes+infotext"),
    (r"\bmask\.png\b", "mask.png", "mask-right"),
    (r"\bleft\.png\b", "left.png", "mask-left"),
    (r"\bright\.png\b", "right.png", "mask-right"),
    (r"\bedges\.png\b", "edges.png", "edges"),
    (r"\blines\.png\b", "lines.png", "edges"),
    (r"\bdrawing\.png\b", "drawing.png", "drawing"),
    (r"\bgreen-star\.png\b", "green-star.png", "green star"),
    (r"\bfolder/", "folder/", "folder of shapes"),
    (r"outputs/txt2img-images/[\d-]+/\*\.png", "outputs/txt2img-images/{today}/00000-1.png", "shapes+infotext"),
    (r"\bstory\.toml\b", "story.toml", "block:docs/apps.md:[[panels]]"),
    (r"from-file prompts\.txt", "prompts.txt", "block:docs/apps.md:--negative_prompt"),
    (r"batch prompts\.txt", "prompts.txt", "text:a red circle\na blue square\n"),
    (r"merge modelA", "models/checkpoints/modelA.safetensors", "copy:danqing/data/models/danqing-tiny.safetensors"),
    (r"merge modelA modelB", "models/checkpoints/modelB.safetensors", "copy:danqing/data/models/danqing-tiny.safetensors"),
    (r"merge base\b", "models/checkpoints/base.safetensors", "copy:danqing/data/models/danqing-tiny.safetensors"),
    (r"merge base tuned\b", "models/checkpoints/tuned.safetensors", "tuned:danqing/data/models/danqing-tiny.safetensors"),
    (r"\brequests\.jsonl\b", "requests.jsonl",
     'text:{"prompt": "a red circle", "seed": 5, "steps": 4, "width": 64, "height": 64}\n'
     '{"prompt": "a blue square", "seed": 6, "steps": 4, "width": 64, "height": 64}\n'),
]
FIXTURE_KINDS = {
    "shapes": "64x64: a red circle left of a blue square, on white",
    "shapes+infotext": "the same, with an A1111 infotext (seed 1, 4 steps, danqing-tiny)",
    "mask-right": "64x64 mask: the right half white", "mask-left": "64x64 mask: the left half white",
    "edges": "64x64: white outlines of a circle and a square on black",
    "drawing": "64x64: black outlines of a circle and a square on white",
    "folder of shapes": "two shapes pictures", "copy": "a copy of the bundled danqing-tiny single file",
    "tuned": "the bundled danqing-tiny with its UNet weights moved a little (noise, 5% of each tensor's spread)",
    "block": "the doc's own example (its code block)", "text": "two small requests",
}
INFOTEXT = "a red circle left of a blue square\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: danqing-tiny"


def _shapes(kind: str):
    """A 64x64 picture: coloured shapes on white, a mask (white = inpaint), or line drawings."""
    from PIL import Image, ImageDraw

    if kind.startswith("mask"):
        img = Image.new("L", (64, 64), 0)
        box = (32, 0, 64, 64) if kind == "mask-right" else (0, 0, 32, 64)
        ImageDraw.Draw(img).rectangle(box, fill=255)
        return img
    back, ink = ("black", "white") if kind == "edges" else ("white", "black")
    img = Image.new("RGB", (64, 64), back)
    d = ImageDraw.Draw(img)
    if kind in ("edges", "drawing"):
        d.ellipse((6, 18, 30, 42), outline=ink, width=2)
        d.rectangle((36, 20, 58, 42), outline=ink, width=2)
    else:
        d.ellipse((6, 18, 30, 42), fill=(220, 30, 30))
        d.rectangle((36, 20, 58, 42), fill=(30, 60, 220))
    return img


def make_fixture(folder: Path, name: str, how: str, root: Path = ROOT) -> None:
    """Make the fixture file ``name`` in ``folder`` (``FIXTURES``' ``how``)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if how.startswith("tuned:"):  # the model with its UNet weights moved a little (a "fine-tuned" copy)
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        state, g = load_file(root / how[6:]), torch.Generator().manual_seed(0)
        with safe_open(root / how[6:], "pt") as f:
            metadata = f.metadata()  # the header says which family it is
        for key, value in state.items():
            if key.startswith("model.diffusion_model.") and value.ndim >= 2:
                noise = torch.randn(value.shape, generator=g) * value.float().std() * 0.05
                state[key] = (value.float() + noise).to(value.dtype)
        save_file(state, str(path), metadata=metadata)
    elif how.startswith("copy:"):
        import shutil

        shutil.copyfile(root / how[5:], path)
    elif how.startswith("text:"):
        path.write_text(how[5:], encoding="utf-8")
    elif how.startswith("block:"):
        _, doc, marker = how.split(":", 2)
        text = (root / doc).read_text(encoding="utf-8")
        lines = next(lines for _, _, lines in fenced_blocks(text) if any(marker in x for x in lines))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif how == "folder of shapes":
        path.mkdir(exist_ok=True)
        for i in range(2):
            _shapes("shapes").rotate(90 * i).save(path / f"{i}.png")
    elif how == "green star":  # the image prompt of the bundled IP-Adapter's test
        from danqing.synthetic.render import render
        from danqing.training.ip_adapter import reference_scene

        render(reference_scene("green", "star"), 64).save(path)
    elif how == "shapes+infotext":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", INFOTEXT)
        _shapes("shapes").save(path, pnginfo=info)
    else:
        _shapes(how.split("+")[0]).save(path)


def ensure_fixtures(cmd: DocCommand, folder: Path, today: str) -> None:
    for pattern, name, how in FIXTURES:
        name = name.replace("{today}", today)
        if re.search(pattern, cmd.text) and not (folder / name).exists():
            if "outputs/" in name and any((folder / name).parent.glob("*.png")):
                continue  # pictures made by an earlier command of the doc are there
            make_fixture(folder, name, how)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
# repository entries a fresh clone has at its top (linked into each scratch folder)
LINKED = ("Makefile", "pyproject.toml", "constraints.txt", "configs", "scripts", "bench", "danqing", "tests")


def scratch_folder(base: Path, doc: str, venv: Path, root: Path = ROOT) -> Path:
    """A new folder for one doc's commands: the repository's files linked in, ``.venv``."""
    folder = base / re.sub(r"\W+", "-", doc).strip("-")
    if (folder / ".venv").is_symlink():
        return folder  # an earlier run's folder (--only): what its commands wrote is there
    folder.mkdir(parents=True)
    for name in LINKED:
        if (root / name).exists():
            (folder / name).symlink_to(root / name)
    (folder / ".venv").symlink_to(venv)
    (folder / "home").mkdir()
    return folder


def run_env(folder: Path, root: Path = ROOT) -> dict[str, str]:
    """The environment of a command: the venv's bin first on PATH (``danqing`` is found as after
    ``pip install``), this checkout's code first on PYTHONPATH, HOME inside the scratch folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANQING_")}
    env.update(PATH=f"{folder / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", HOME=str(folder / "home"),
               PYTHONPATH=str(root), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               RAY_USAGE_STATS_ENABLED="0", TERM="dumb", COLUMNS="120")
    return env


@dataclass
class Outcome:
    cmd: DocCommand
    status: str          # "ok", "failed", "timeout", "skipped" ("not run": --merge of a run stopped early)
    detail: str = ""     # the first error line, the expected output that is missing, the reason
    seconds: float = 0.0


def first_error(stdout: str, stderr: str) -> str:
    """The line that says what went wrong: the first ``error``/``Error`` line, else the last line."""
    lines = [x.strip() for x in (stderr + "\n" + stdout).splitlines() if x.strip()]
    for line in lines:
        if re.match(r"^(error|usage error|\w*Error\b|Traceback|make: \*\*\*)", line, re.I) and not line.startswith("Traceback"):
            return line[:200]
    return lines[-1][:200] if lines else ""


def expected_paths(cmd: DocCommand, today: str) -> list[str]:
    """Files a command's comment says it writes: ``# -> photo-canny.png``, or a comment whose first
    word is a path (``# studio/runs/lora-heart/``); DATE is today."""
    comment = cmd.comment.removeprefix("->").strip()
    if not comment:
        return []
    word = comment.split()[0].replace("DATE", today)
    if re.fullmatch(r"[\w.-]+(?:/[\w.-]+)*(?:\.(?:png|json|glb|mp4|safetensors|pdf|cbz)|/)", word) and \
            (cmd.comment.startswith("->") or "/" in word.rstrip("/")):
        return [word]
    return []


# commands a worker process may run in-process (``--in-process``): plain ``danqing ...`` lines
# without shell syntax, that neither train (torch thread settings) nor relaunch themselves
IN_PROCESS_RE = re.compile(r"^(?:\.venv/bin/)?danqing [^*~$|<>;&`]*$")
NOT_IN_PROCESS_RE = re.compile(r"\btrain\b|--num-processes|--ray\b")


class Worker:
    """A Python process that imports the CLI once and runs ``danqing`` commands in it
    (``danqing.cli.main``), one at a time: imports are paid once instead of per command. A
    command past its timeout kills the worker; the next command starts a new one."""

    def __init__(self, root: Path = ROOT):
        self.root, self.proc = root, None

    def run(self, args: list[str], folder: Path, env: dict, timeout: float) -> tuple[int | None, str, str]:
        """(exit code or None on timeout, stdout, stderr) of ``danqing ARGS`` run in ``folder``."""
        import json
        import select

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         start_new_session=True, cwd=folder)
        self.proc.stdin.write(json.dumps({"args": args, "cwd": str(folder), "env": env}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return None, "", ""
        answer = json.loads(line)
        return answer["rc"], answer["stdout"], answer["stderr"]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def worker_loop() -> None:
    """``--worker``: read {"args", "cwd", "env"} lines, run each with ``danqing.cli.main`` and
    answer {"rc", "stdout", "stderr"} on one line."""
    import contextlib
    import io
    import json

    out = os.fdopen(os.dup(1), "w")  # the answers; what else writes to fd 1 (a child process) goes to stderr
    os.dup2(2, 1)
    from danqing.cli import main as danqing_main

    for line in sys.stdin:
        req = json.loads(line)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        stdout, stderr, rc = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                danqing_main(req["args"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException as exc:  # a traceback, as the command line would print it
                import traceback

                traceback.print_exc()
                rc = 1
                del exc
        out.write(json.dumps({"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}) + "\n")
        out.flush()


def run_one(cmd: DocCommand, folder: Path, env: dict, timeout: float, today: str, worker: Worker | None = None) -> Outcome:
    """Run one command with bash in ``folder`` (or, given a ``worker``, a plain ``danqing`` command
    in it); a run past ``timeout`` is stopped (its process group)."""
    if cmd.kind == "skipped":
        return Outcome(cmd, "skipped", cmd.reason)
    ensure_fixtures(cmd, folder, today)
    start = time.monotonic()
    if worker is not None and IN_PROCESS_RE.match(cmd.run_text) and not NOT_IN_PROCESS_RE.search(cmd.run_text):
        rc, stdout, stderr = worker.run(danqing_args(cmd.run_text), folder, env, timeout)
    else:
        proc = subprocess.Popen(["bash", "-c", cmd.run_text], cwd=folder, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            rc = None
    seconds = time.monotonic() - start
    if rc is None:
        return Outcome(cmd, "timeout", f"stopped after {timeout:.0f} s", seconds)
    if cmd.expect_error:
        ok = rc == 2
        return Outcome(cmd, "ok" if ok else "failed", "exit 2 as shown" if ok else f"expected exit 2, got {rc}", seconds)
    if rc != 0:
        return Outcome(cmd, "failed", f"exit {rc}: {first_error(stdout, stderr)}", seconds)
    missing = [p for p in expected_paths(cmd, today) if not (folder / p).exists()]
    if missing:
        return Outcome(cmd, "failed", f"the comment's {missing[0]} was not written", seconds)
    return Outcome(cmd, "ok", "", seconds)


def run_all(commands: list[DocCommand], base: Path, venv: Path, timeout: float, echo=None,
            in_process: bool = False) -> list[Outcome]:
    """Each doc's commands in document order, each doc in its own scratch folder; with
    ``in_process``, plain ``danqing`` commands run in one worker process (``Worker``)."""
    echo = echo or (lambda line: print(line, flush=True))
    today = datetime.date.today().isoformat()
    outcomes, folders = [], {}
    worker = Worker() if in_process else None
    try:
        for cmd in commands:
            if cmd.file not in folders:
                folders[cmd.file] = scratch_folder(base, cmd.file, venv)
            folder = folders[cmd.file]
            outcome = run_one(cmd, folder, run_env(folder), timeout, today, worker)
            outcomes.append(outcome)
            echo(row(outcome))
    finally:
        if worker is not None:
            worker.close()
    return outcomes


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def row(o: Outcome) -> str:
    text = o.cmd.run_text or o.cmd.text
    what = o.status if not o.detail else f"{o.status}: {o.detail}"
    return f"{o.cmd.where:24} {o.seconds:7.1f}s  {what}\n    {text}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(outcomes: list[Outcome], seconds: float, in_process: bool = False) -> str:
    """docs/commands.md: the rules, the counts and one row per command."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    kinds: dict[str, int] = {}
    for o in outcomes:
        kinds[o.cmd.kind] = kinds.get(o.cmd.kind, 0) + 1
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.status == "skipped":
            reasons[o.cmd.reason] = reasons.get(o.cmd.reason, 0) + 1
    out = [
        "# Every command of the docs, run",
        "",
        "`scripts/doc_commands.py` extracts every shell command of README.md and docs/*.md (fenced",
        "blocks; `\\` continuations joined, comments dropped) and runs each as a user of a fresh clone",
        "would after `make demo`: each doc's commands in document order, in a scratch folder of its own",
        "(the repository's files linked in, `.venv`, `HOME` and the danqing home inside it), with a",
        "timeout per command. A command runs as written, runs with small sizes (the rules below), or is",
        "skipped with a reason from the script's `SKIPS` table. Pictures and files the docs take as the",
        "user's (`picture.png`, `mask.png`, `photo.jpg`, `story.toml`, ...) are made first (`FIXTURES`:",
        "64x64 shapes on white, masks, line drawings, the storyboard and prompt files the docs show).",
        "A comment that names a file (`# -> photo-canny.png`, `# studio/runs/lora-heart/`) is checked:",
        "the file must be there afterwards.",
        "",
        "```bash",
        "make doc-commands                                        # all docs; writes this file",
        ".venv/bin/python scripts/doc_commands.py docs/editing.md  # one doc, prints the table",
        ".venv/bin/python scripts/doc_commands.py --in-process     # plain danqing commands in one process",
        ".venv/bin/python scripts/doc_commands.py --list           # extract and classify only",
        "```",
        "",
        "Each command runs in its own process by default. With `--in-process` the plain `danqing ...`",
        "lines (no shell syntax, no training) run one after another in one worker process",
        "(`danqing.cli.main`), so the libraries are imported once; the table below was made "
        + ("that way." if in_process else "with a process per command."),
        "",
        "`tests/test_doc_commands.py` (under a minute) parses every `danqing` command of the docs",
        "against the CLI without running it (a removed command or option fails it) and runs a few.",
        "",
        "## Result",
        "",
        f"{len(outcomes)} commands: {kinds.get('as written', 0)} to run as written, {kinds.get('small', 0)} with "
        f"small sizes, {kinds.get('skipped', 0)} skipped. Of the {len(outcomes) - counts.get('skipped', 0)} to run: "
        f"{counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, {counts.get('timeout', 0)} stopped at the "
        f"timeout" + (f", {counts['not run']} not run yet" if counts.get("not run") else "")
        + f". The commands took {seconds / 60:.0f} minutes on a shared 2-core machine.",
        "",
        *([f"Failed or stopped ({len(bad)}):", "", *[f"- {o.cmd.where}: `{o.cmd.run_text}`: {o.status}: {o.detail}"
                                                    for o in bad], ""] if (bad := [o for o in outcomes if o.status in ("failed", "timeout")]) else []),
        "| skipped because | commands |",
        "| --- | ---: |",
        *[f"| {_md(r)} | {n} |" for r, n in sorted(reasons.items(), key=lambda x: -x[1])],
        "",
        "Small sizes (`SMALL`):",
        "",
        *[f"- {rule}" for rule in dict.fromkeys(rule for *_, rule in SMALL)],
        "",
        "Files made before the first command that names them (`FIXTURES`):",
        "",
        "| file | made as |",
        "| --- | --- |",
        *[f"| `{name}` | {_md(FIXTURE_KINDS.get(how.split(':')[0], how)[:90])} |" for _, name, how in FIXTURES],
        "",
        "## Every command",
        "",
        "| where | command (as run) | outcome | s |",
        "| --- | --- | --- | ---: |",
    ]
    for o in outcomes:
        text = o.cmd.run_text or o.cmd.text
        what = o.status if not o.detail else f"{o.status}: {o.detail}"
        out.append(f"| {o.cmd.where} | `{_md(text)}` | {_md(what)} | {o.seconds:.0f} |")
    return "\n".join(out) + "\n"


ROW_RE = re.compile(r"^(\S+:\d+)\s+([\d.]+)s  (ok|failed|timeout|skipped)(?:: (.*))?$", re.M)


def merged(outcomes: list[Outcome], earlier: list[DocCommand], printed: str) -> list[Outcome]:
    """``outcomes`` and, for the commands ``earlier`` (docs not run now), the outcomes an earlier
    run printed (``row``), in the order of ``doc_files``."""
    rows = {m.group(1): m for m in ROW_RE.finditer(printed)}
    out = list(outcomes)
    for cmd in earlier:
        m = rows.get(cmd.where)
        if cmd.kind == "skipped":
            out.append(Outcome(cmd, "skipped", cmd.reason))
        elif m is None:  # the earlier run stopped before it (or the doc changed since)
            out.append(Outcome(cmd, "not run", "not in the earlier run's table"))
        else:
            out.append(Outcome(cmd, m.group(3), m.group(4) or "", float(m.group(2))))
    order = {str(p.relative_to(ROOT)): i for i, p in enumerate(doc_files())}
    return sorted(out, key=lambda o: (order.get(o.cmd.file, len(order)), o.cmd.line))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="docs to run [default: README.md and docs/*.md]")
    ap.add_argument("--list", action="store_true", help="extract and classify only")
    ap.add_argument("--in-process", action="store_true",
                    help="run plain `danqing` commands in one worker process (imports once; faster on a slow machine)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, metavar="FILE:LINE,...",
                    help="run only these commands (with --scratch of an earlier run: its files are there)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per command [default: 300]")
    ap.add_argument("--scratch", type=Path, default=None, help="folder for the scratch folders [default: a new temporary one]")
    ap.add_argument("--venv", type=Path, default=None, help="the virtual environment [default: .venv, else this Python's]")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table as markdown (docs/commands.md)")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="the printed table of an earlier run (repeatable): the docs not run now keep its outcomes "
                         "in --markdown; with no FILES given, nothing runs")
    args = ap.parse_args(argv)
    if args.worker:
        worker_loop()
        return 0
    files = [p.resolve() for p in args.files] or None
    commands = extract(files) if files or not args.merge else []
    if args.only:
        commands = [c for c in commands if c.where in args.only.split(",")]
    if args.list:
        for cmd in commands:
            what = cmd.reason if cmd.kind == "skipped" else "; ".join(cmd.rules)
            print(f"{cmd.where:24} {cmd.kind:10} {what}\n    {cmd.run_text or cmd.text}")
        return 0
    import tempfile

    venv = (args.venv or (ROOT / ".venv" if (ROOT / ".venv").is_dir() else Path(sys.prefix))).resolve()
    base = args.scratch or Path(tempfile.mkdtemp(prefix="doc-commands-") if commands else ".")
    if commands:
        print(f"scratch folders under {base}; venv {venv}", file=sys.stderr)
    start = time.monotonic()
    outcomes = run_all(commands, base, venv, args.timeout, in_process=args.in_process)
    seconds = time.monotonic() - start
    if args.merge:
        ran = {c.where for c in commands}
        earlier = [c for c in extract() if c.where not in ran]
        outcomes = merged(outcomes, earlier, "\n".join(p.read_text(encoding="utf-8") for p in args.merge))
        seconds = sum(o.seconds for o in outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "timeout", "skipped", "not run")}
    print(f"{len(outcomes)} commands: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {seconds:.0f} s")
    if args.markdown:
        args.markdown.write_text(markdown(outcomes, seconds, in_process=args.in_process), encoding="utf-8")
    return 1 if counts["failed"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
