"""``--help`` of every command: brackets survive (``[a:b:N]``, ``[default: ...]``), every option
says its default, and ``train --help`` lists every trainer. (The time of ``danqing --help`` is
measured by bench/cli_help.py, not here.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from danqing.cli import app

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
            assert f"[default: {shown_default(param.default)}]" in line, line
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
    for trainer in ("base", "instruct", "lora", "dreambooth", "textual-inversion", "controlnet"):
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
