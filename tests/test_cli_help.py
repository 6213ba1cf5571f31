"""The CLI as a user meets it. ``--help`` of every command: brackets survive (``[a:b:N]``,
``[default: ...]``), every option says its default, ``train --help`` lists every trainer (the
time of ``danqing --help`` is measured by bench/cli_help.py, not here). A run: the device and
dtype said once, an unavailable device refused in one line, every output under ``--home``,
single-picture commands numbered as ``generate`` numbers its pictures."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from danqing.cli import app, main

WIDE = {"terminal_width": 2000, "max_content_width": 2000}  # one line per option: no wrapping inside a value


def commands(cmd, path=()):
    """(path, click command) of the root and every subcommand, depth first."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from commands(sub, (*path, name))


ALL = list(commands(typer.main.get_command(app)))


def render(path) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], **WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def option_line(text: str, option) -> str:
    """The help entry of ``option``: its line (a long name column puts the help on the next)."""
    lines = text.split("Options:", 1)[1].splitlines()
    for i, line in enumerate(lines):
        names = re.split(r"[ ,/]+", line.strip().split("  ")[0])
        if line.lstrip().startswith("-") and any(name in option.opts for name in names):
            entry = [line]
            for more in lines[i + 1:]:
                if more.lstrip().startswith("-") or not more.strip():
                    break
                entry.append(more)
            return " ".join(" ".join(entry).split())
    raise AssertionError(f"{option.opts} not in the help:\n{text}")


def shown_default(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=lambda p: " ".join(p) or "danqing")
def test_every_option_shows_its_default(path):
    cmd = dict(ALL)[path]
    text = render(path)
    assert "Usage:" in text and "╭" not in text  # plain help: nothing parsed as markup
    checked = 0
    for param in cmd.params:
        if param.param_type_name != "option" or param.name == "help" or param.hidden:
            continue
        line = option_line(text, param)
        if param.is_flag or param.required:  # a flag is off unless given; a required option has none
            continue
        assert "[default:" in line, f"{' '.join(path)} {param.opts[0]}: no default shown in {line!r}"
        if param.default not in (None, "", [], ()):
            assert re.search(rf"\[default: {re.escape(shown_default(param.default))}[];]", line), line  # ; a range
        checked += 1
    if path in ((), ("generate",), ("upscale",)):
        assert checked >= 4


def test_prompt_editing_keeps_its_brackets():
    mentions = 0
    for path, _ in ALL:
        text = render(path)
        for line in text.splitlines():
            if "prompt editing" in line:
                mentions += 1
                assert "[a:b:N]" in line, line
    assert mentions >= 1
    assert "[a|b]" in render(("generate",))


def test_train_help_lists_every_trainer():
    text = render(("train",))
    for trainer in ("base", "instruct", "lora", "dreambooth", "textual-inversion", "controlnet", "faces"):
        assert re.search(rf"^\s+{trainer}\s", text, re.M), f"{trainer} missing:\n{text}"
        assert trainer in text.split("Commands:")[0]  # the summary names it too
    assert "lora|dreambooth|textual-inversion" in render(())


def test_root_help_through_the_entry_point():
    """``python -m danqing --help`` as a user runs it: every command listed, brackets kept."""
    out = subprocess.run([sys.executable, "-m", "danqing", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in dict(ALL[0][1].commands):
        assert re.search(rf"^\s+{re.escape(name)}\s", out.stdout, re.M), name
    assert "[default: auto]" in " ".join(out.stdout.split())


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------
def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def pngs(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png"))


@pytest.mark.parametrize("device, message", [
    ("cuda", "error: device: cuda: "),
    ("cuda:7", "error: device: cuda:7: "),
    ("warp9", "error: device: 'warp9' is not a device; use auto, cpu, cuda, cuda:N or mps"),
])
def test_unavailable_device_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, device, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    code, out, err = run(capsys, "--home", str(tmp_path), "--device", device, "generate", "a red circle",
                         "--steps", "2", "--width", "64", "--height", "64", "--quiet")
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == "" and not (tmp_path / "outputs").exists()


def test_upscale_numbers_its_files_as_generate_does(capsys, tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "pic.png")
    home = tmp_path / "home"
    for _ in range(2):
        code, out, err = run(capsys, "--home", str(home), "upscale", str(tmp_path / "pic.png"))
        assert code in (0, None), err
    assert pngs(home / "outputs" / "extras-images") == ["00000-pic-x2.png", "00001-pic-x2.png"]
    folder = next((home / "outputs" / "extras-images").iterdir())
    assert [Image.open(p).size for p in sorted(folder.iterdir())] == [(64, 64), (64, 64)]
    # a file named with --out is still never overwritten
    assert run(capsys, "--home", str(home), "upscale", str(tmp_path / "pic.png"), "--out", str(tmp_path / "pic.png"))[0] == 2


def test_sd_upscale_with_a_small_tile_needs_no_overlap(capsys, tmp_path):
    """--tile 64 alone: the overlap follows the tile (64 would be more than half of it)."""
    Image.new("RGB", (48, 48), "gray").save(tmp_path / "pic.png")
    code, out, err = run(capsys, "--home", str(tmp_path), "--device", "cpu", "upscale", str(tmp_path / "pic.png"),
                         "--sd", "--tile", "64", "--steps", "2", "--prompt", "a grey square", "--out", str(tmp_path / "up.png"))
    assert code in (0, None), err
    assert Image.open(tmp_path / "up.png").size == (96, 96)
    assert "tile 4/4" in err  # 96 px in 64-px tiles overlapping by 16: 2 x 2 tiles
    # four generations, one device line
    assert [line for line in err.splitlines() if line.startswith("device:")] == ["device: cpu, dtype: float32"]
    code, _, err = run(capsys, "--home", str(tmp_path), "upscale", str(tmp_path / "pic.png"), "--sd", "--tile", "64",
                       "--overlap", "40", "--out", str(tmp_path / "bad.png"))
    assert code == 2 and err.strip().splitlines()[-1] == "error: overlap: must be between 0 and 31 pixels, got 40", err


def test_app_outputs_go_under_home(capsys, tmp_path, monkeypatch):
    """`app text` twice, from another folder: NNNNN-text-SEED.png under HOME/outputs/app-images/.
    (The picture itself is faked: the placing of its file is what is tested here.)"""
    import types

    from danqing.apps import control_projects

    def fake(studio, word, prompt, **kw):
        return types.SimpleNamespace(image=Image.new("RGB", (64, 64), "red"), iou=1.0)

    monkeypatch.setattr(control_projects, "creative_text", fake)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    home = tmp_path / "home"
    for _ in range(2):
        code, out, err = run(capsys, "--home", str(home), "--device", "cpu", "app", "text", "A", "red paint")
        assert code in (0, None), err
    assert pngs(home / "outputs" / "app-images") == ["00000-text-0.png", "00001-text-0.png"]
    assert list(cwd.iterdir()) == []


def test_training_runs_go_under_home(capsys, tmp_path, monkeypatch):
    """A relative output_dir (the configs' runs/NAME) goes under --home, an absolute one stays;
    the trainer gets the run's settings (its --models-dir). The trainer is faked: what the shell
    hands it is tested here; training itself in test_finetune.py."""
    from danqing.training import finetune

    seen = {}

    def fake(cfg, *, resume, log, settings):
        seen.update(out=cfg.output.output_dir, models=settings.models_dir)
        return {"files": []}

    monkeypatch.setattr(finetune, "train_textual_inversion", fake)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "ti.toml"
    config.write_text('[output]\noutput_dir = "runs/ti-try"\n')
    home, models = tmp_path / "home", tmp_path / "my-models"
    code, out, err = run(capsys, "--home", str(home), "--models-dir", str(models), "train", "textual-inversion",
                         "--config", str(config))
    assert code in (0, None), err
    assert seen == {"out": str(home / "runs" / "ti-try"), "models": models}
    code, out, err = run(capsys, "--home", str(home), "train", "textual-inversion", "--config", str(config),
                         "--set", f"output.output_dir={str(tmp_path / 'abs')!r}")
    assert code in (0, None), err
    assert seen["out"] == str(tmp_path / "abs")
