"""The CLI: generate, info, --from, models, and every bad input -> one line, exit 2, no file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from danqing.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def ok(capsys, *args):
    code, out, err = run(capsys, *args)
    assert code in (0, None), err
    return out, err


@pytest.fixture()
def cli(models_dir, tmp_path):
    def call(capsys, *args):
        return run(capsys, "--home", str(tmp_path), "--models-dir", str(models_dir), "--device", "cpu", *args)

    return call


GEN = ["generate", "a red circle", "--steps", "3", "--width", "64", "--height", "64", "--model", "tiny-sd1", "--quiet"]


def test_generate_info_and_from_reproduce_bit_identically(cli, capsys, tmp_path):
    out_dir = tmp_path / "o"
    code, out, err = cli(capsys, *GEN, "--seed", "77", "--negative", "blurry", "--sampler", "Euler a", "--out", str(out_dir))
    assert code in (0, None), err
    (first,) = list(out_dir.glob("*.png"))
    code, info, _ = cli(capsys, "info", str(first))
    assert info.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 77, Size: 64x64")
    again = tmp_path / "again.png"
    code, _, err = cli(capsys, "generate", "--from", str(first), "--out", str(again), "--quiet")
    assert code in (0, None), err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    # The re-created file carries the same metadata.
    assert Image.open(again).info["parameters"] == Image.open(first).info["parameters"]


def test_from_with_override(cli, capsys, tmp_path):
    cli(capsys, *GEN, "--seed", "5", "--out", str(tmp_path / "a.png"))
    code, _, err = cli(capsys, "generate", "--from", str(tmp_path / "a.png"), "--seed", "6", "--out", str(tmp_path / "b.png"), "--quiet")
    assert code in (0, None), err
    assert "Seed: 6," in Image.open(tmp_path / "b.png").info["parameters"]


def test_the_size_defaults_to_the_models_own(cli, capsys, tmp_path):
    """No --width/--height: the model's training size, as the web UI starts (tiny-sd1: 64, from its
    configs), and one side given keeps the other at the model's."""
    base = [a for a in GEN if a not in ("--width", "--height", "64")]
    for extra, name in (((), "native.png"), (("--width", "128"), "wide.png")):
        code, _, err = cli(capsys, *base, *extra, "--out", str(tmp_path / name))
        assert code in (0, None), err
    assert Image.open(tmp_path / "native.png").size == (64, 64)
    assert Image.open(tmp_path / "wide.png").size == (128, 64)


def test_models_lists_families_and_hashes(cli, capsys):
    code, out, _ = cli(capsys, "models")
    assert code in (0, None)
    for name, fam in (("tiny-sd1", "sd1"), ("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl"), ("danqing-tiny-random", "sd1")):
        line = next(l for l in out.splitlines() if name in l)
        assert fam in line


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--sampler", "Bogus"], "unknown sampler 'Bogus'; choose one of: DPM++ 2M,"),
        (["--sampler", "DPM fast"], "not available"),
        (["--schedule", "Nope"], "unknown schedule type 'Nope'; choose one of: Automatic,"),
        (["--sampler", "DDIM", "--schedule", "Karras"], "does not work with sampler 'DDIM'"),
        (["--width", "100"], "width: must be a multiple of 8"),
        (["--height", "8"], "height: must be a multiple of 8 between 64 and 4096"),
        (["--steps", "0"], "steps: must be between 1 and 150"),
        (["--steps", "500"], "steps: must be between 1 and 150"),
        (["--cfg", "0.5"], "cfg_scale: must be between 1 and 30"),
        (["--cfg", "99"], "cfg_scale: must be between 1 and 30"),
        (["--model", "missing-model"], "checkpoint 'missing-model' not found"),
        (["--subseed-strength", "2"], "subseed_strength: must be between 0 and 1"),
    ],
)
def test_bad_input_one_line_exit_2_no_file(cli, capsys, tmp_path, extra, needle):
    out_dir = tmp_path / "never"
    code, out, err = cli(capsys, *GEN, *extra, "--out", str(out_dir))
    assert code == 2
    assert needle in err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert not out_dir.exists()


def test_bad_prompt_syntax(cli, capsys, tmp_path):
    code, _, err = cli(capsys, "generate", "a (red circle", "--out", str(tmp_path / "x"))
    assert code == 2 and "prompt:" in err and "'('" in err and err.count("\n") == 1


def test_corrupt_and_unknown_family_files(cli, capsys, tmp_path, models_dir):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 100)
    code, _, err = cli(capsys, *GEN, "--model", str(bad), "--out", str(tmp_path / "x"))
    assert code == 2 and "corrupt.safetensors" in err and err.count("\n") == 1
    odd = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(odd))
    code, _, err = cli(capsys, *GEN, "--model", str(odd), "--out", str(tmp_path / "x"))
    assert code == 2 and "family" in err.lower() and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_vae_that_does_not_fit(cli, capsys, tmp_path, tiny_components):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(latent_channels=8, block_out_channels=(8,), norm_num_groups=8)
    vae.save_pretrained(tmp_path / "wrongvae")
    code, _, err = cli(capsys, *GEN, "--vae", str(tmp_path / "wrongvae"), "--out", str(tmp_path / "x"))
    assert code == 2 and "latent channels" in err and err.count("\n") == 1


def test_out_file_never_overwritten(cli, capsys, tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    code, _, err = cli(capsys, *GEN, "--out", str(target))
    assert code == 2 and "already exists" in err
    assert target.read_bytes() == b"precious"


def test_from_image_without_metadata(cli, capsys, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, _, err = cli(capsys, "generate", "--from", str(tmp_path / "plain.png"))
    assert code == 2 and "no generation parameters" in err


def test_a_family_option_with_a_missing_model_names_the_model(cli, capsys):
    """``--stage2`` (DeepFloyd IF's) beside a model that is not installed: the missing model is
    the one line, not the option; beside an SD model, the option is."""
    code, _, err = cli(capsys, "generate", "a red panda", "--model", "IF-I-XL-v1.0", "--stage2", "IF-II-L-v1.0")
    assert code == 2 and "checkpoint 'IF-I-XL-v1.0' not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "generate", "a red panda", "--model", "tiny-sd1", "--stage2", "IF-II-L-v1.0")
    assert code == 2 and "--stage2 is an option of" in err
