"""The commands of README.md and docs/*.md (scripts/doc_commands.py): the extractor finds them,
every ``danqing`` command and option they name exists in the CLI (parsed against its Click tree,
nothing run), every skipped one has a reason from the table, and the runner runs a few cheap ones
for real in a scratch folder (the full run: ``make doc-commands``, docs/commands.md)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("doc_commands", ROOT / "scripts" / "doc_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_commands"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


dc = _load()
COMMANDS = dc.extract()
INLINE = [c for p in dc.doc_files() for c in dc.inline_commands(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]


@pytest.fixture(scope="module")
def cli_tree():
    import typer

    from danqing.cli import app

    return typer.main.get_command(app)


def test_the_extractor_finds_the_docs_commands():
    danqing = [c for c in COMMANDS if dc.danqing_args(c.text) is not None]
    assert len(COMMANDS) >= 180, len(COMMANDS)
    assert len(danqing) >= 140, len(danqing)
    files = {c.file for c in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/editing.md", "docs/training.md", "docs/api.md"} <= files
    # the README's first generate: two lines joined, the comment of the next line not swallowed
    first = next(c for c in COMMANDS if c.file == "README.md" and " generate " in c.text)
    assert first.text.startswith('.venv/bin/danqing generate "a (red:1.2) circle left of a blue star" -n "blurry" --steps')
    assert "#" not in first.text


def test_extraction_rules():
    md = "\n".join([
        "text", "```bash",
        'danqing generate "a # in quotes" \\',
        "    --steps 20 --width 512   # a comment",
        "# a comment line",
        "curl -s localhost:7860/x -d '{\"a\": 1,",
        "       \"b\": 2}'",
        "```", "```", "$ danqing --device cuda generate \"x\"",
        "error: device: cuda: no", "models/checkpoints/   *.safetensors", "```",
        "```python", "danqing = 1", "```",
        "```", "danqing upscale p.png --scale 4 [--upscaler MODEL] [--backend dlib|opencv]", "```",
    ])
    cmds = dc.extract_text(md, "x.md")
    assert [c.text for c in cmds] == [
        'danqing generate "a # in quotes" --steps 20 --width 512',
        "curl -s localhost:7860/x -d '{\"a\": 1, \"b\": 2}'",
        'danqing --device cuda generate "x"',
        "danqing upscale p.png --scale 4 [--upscaler MODEL] [--backend dlib|opencv]",
    ]
    assert [c.line for c in cmds] == [3, 6, 10, 18]
    assert cmds[0].comment == "a comment" and [c.expect_error for c in cmds] == [False, False, True, False]
    assert dc.danqing_args(cmds[3].text) == ["upscale", "p.png", "--scale", "4", "--upscaler", "MODEL", "--backend", "dlib"]
    kinds = [dc.classify(c, today="2030-01-02") for c in cmds]
    assert [c.kind for c in kinds] == ["small", "skipped", "small", "as written"]  # sampling: --steps 4
    assert kinds[1].reason == dc.NEEDS_SERVER and kinds[3].run_text == "danqing upscale p.png --scale 4"


def test_small_size_rules():
    cmd = dc.classify(dc.DocCommand("x.md", 1, "danqing train lora --config configs/train/lora-heart.toml"))
    assert cmd.kind == "small"
    assert "--set train.steps=2" in cmd.run_text and "--set prior.n_class_images=2" in cmd.run_text
    # a config without prior preservation gets no prior section (that would switch it on)
    ti = dc.classify(dc.DocCommand("x.md", 1, "danqing train textual-inversion --config configs/train/ti-magenta.toml"))
    assert "--set train.steps=2" in ti.run_text and "prior." not in ti.run_text
    info = dc.classify(dc.DocCommand("x.md", 1, "danqing info outputs/txt2img-images/2026-11-24/00000-42.png"),
                       today="2030-01-02")
    assert info.run_text == "danqing info outputs/txt2img-images/2030-01-02/00000-42.png"
    gen = dc.classify(dc.DocCommand("x.md", 1, 'danqing --home s generate "a cat" --steps 20 --seed 1'))
    assert gen.run_text == 'danqing --home s generate "a cat" --steps 4 --seed 1'
    assert dc.classify(dc.DocCommand("x.md", 1, 'danqing img2img p.png "a cat"')).run_text.endswith(" --steps 4")
    assert dc.classify(dc.DocCommand("x.md", 1, "danqing generate --help")).kind == "as written"


def test_every_danqing_command_and_option_exists(cli_tree):
    """A doc naming a removed command or option fails here (parsed, not run): the commands of
    the code blocks and those quoted in the prose."""
    assert len(INLINE) >= 80, len(INLINE)
    errors = []
    for c in COMMANDS + INLINE:
        args = dc.danqing_args(c.text)
        err = dc.check_options(args, cli_tree) if args is not None else None
        if err and not (c.kind == "inline" and "requires an argument" in err):  # prose names `--from`
            errors.append(f"{c.where}: {c.text}: {err}")
    assert errors == []


def test_the_check_finds_removed_commands_and_options(cli_tree):
    assert dc.check_options(["generate", "a cat", "--steps", "2", "--width", "64"], cli_tree) is None
    assert dc.check_options(["--home", "x", "train", "lora", "--config", "c.toml"], cli_tree) is None
    assert "--no-such-flag" in dc.check_options(["generate", "a cat", "--no-such-flag"], cli_tree)
    assert "no-such-command" in dc.check_options(["no-such-command"], cli_tree)
    assert "--steps" in dc.check_options(["train", "lora", "--steps", "2"], cli_tree)


def test_every_skip_has_a_reason_and_every_run_is_a_command():
    reasons = {r for _, r in dc.SKIPS}
    rules = {rule for *_, rule in dc.SMALL}
    for c in COMMANDS:
        if c.kind == "skipped":
            assert c.reason in reasons, c.where
        else:
            assert c.kind in ("as written", "small") and c.run_text, c.where
            assert set(c.rules) <= rules, c.where
            assert "[--" not in c.run_text, c.where  # optional synopsis parts are dropped


def test_scripts_and_make_targets_the_docs_name_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for c in COMMANDS:
        for path in re.findall(r"(?:^|\s)((?:scripts|bench)/[\w/.-]+\.(?:py|sh))", c.text):
            assert (ROOT / path).is_file(), f"{c.where}: {path}"
        make = re.match(r"make (?:PYTHON=\S+ )?([\w-]+)", c.text)
        if make:
            assert make.group(1) in targets, c.where


def test_the_runner_runs_commands_in_order(tmp_path):
    """A few cheap commands for real, in document order: help, a tiny picture and its infotext
    (the example's date made today's), a fixture named by a command (``picture.png``) and a file
    its comment promises, a refusal shown in a console block (exit 2), a failure."""
    md = "\n".join([
        "```bash",
        "danqing --help",
        'danqing generate "a red circle" --width 64 --height 64 --steps 2 --seed 42 --sampler Euler',
        "danqing info outputs/txt2img-images/2026-11-24/00000-42.png",
        "cp picture.png copy.png   # -> copy.png",
        "```", "```console",
        "$ make no-such-target",
        "error: make refuses",
        "```", "```bash",
        "mkdir no/such/folder",
        "```",
    ])
    cmds = [dc.classify(c) for c in dc.extract_text(md, "x.md")]
    outcomes = dc.run_all(cmds, tmp_path, Path(sys.prefix), timeout=150, echo=lambda line: None)
    shown = "\n".join(dc.row(o) for o in outcomes)
    assert [o.status for o in outcomes] == ["ok"] * 5 + ["failed"], shown
    assert outcomes[2].cmd.run_text.endswith(f"/{dc.datetime.date.today().isoformat()}/00000-42.png"), shown
    assert outcomes[4].detail == "exit 2 as shown", shown
    assert outcomes[5].detail.startswith("exit 1: mkdir: cannot create directory"), shown
    folder = tmp_path / "x-md"
    assert (folder / "picture.png").is_file() and (folder / "copy.png").is_file()


def test_small_training_runs_are_valid_configs():
    """The ``--set`` overrides the runner adds to each ``train`` command of the docs are keys its
    config accepts (read and validated as the command would, nothing trained)."""
    from danqing.cli.train import parse_sets
    from danqing.training import config as C
    from danqing.training.config_companions import FacesTrainConfig

    models = {"base": C.BaseTrainConfig, "instruct": C.InstructTrainConfig, "controlnet": C.ControlTrainConfig,
              "lora": C.LoraTrainConfig, "dreambooth": C.DreamBoothTrainConfig,
              "textual-inversion": C.TextualInversionTrainConfig, "faces": FacesTrainConfig}
    checked = 0
    for c in COMMANDS:
        kind = re.search(r"\btrain (base|instruct|controlnet|lora|dreambooth|textual-inversion|faces)\b", c.run_text)
        if c.kind != "small" or not kind:
            continue
        args = dc.danqing_args(c.run_text)
        config = args[args.index("--config") + 1]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = C.load_config(ROOT / config, parse_sets(sets), model=models[kind.group(1)])
        steps = cfg.train.steps if hasattr(cfg, "train") else cfg.unet.steps
        assert steps == 2, c.where
        checked += 1
    assert checked >= 20, checked
