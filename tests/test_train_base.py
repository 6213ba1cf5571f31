"""Training from scratch, smoke-sized for CI: the loss goes down, a checkpoint resumes to the
same state, user folders of captioned images work, bad configs and datasets fail kindly."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from parity import assert_close_scaled
from safetensors.torch import load_file

from danqing.errors import InvalidRequest
from danqing.training.base import train_base
from danqing.training.config import load_config

SMOKE = Path(__file__).parent.parent / "configs" / "train" / "smoke.toml"


def _cfg(tmp_path, name, **over):
    return load_config(SMOKE, {"run.output_dir": str(tmp_path / name), **over})


def _logged(run: Path, stage: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["stage"] == stage]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(tmp, "full", **{"unet.steps": 60, "vae.steps": 40, "run.log_every": 5})
    summary = train_base(cfg, log=lambda line: None)
    return tmp, Path(cfg.run.output_dir), summary


def _reconstruction_loss(vae, images):
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        return float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean())


def test_losses_go_down(smoke_run):
    from diffusers import AutoencoderKL

    from danqing.models.families import build_components
    from danqing.training.data import synthetic_dataset

    _, run, _ = smoke_run
    images = synthetic_dataset(16, 64, seed=99).images
    before = _reconstruction_loss(build_components("danqing-tiny").vae, images)
    after = _reconstruction_loss(AutoencoderKL.from_pretrained(run / "vae"), images)
    assert after < 0.7 * before, (before, after)
    unet = _logged(run, "unet")  # a running mean of the denoising loss
    assert len(unet) >= 10 and unet[-1] < 0.85 * unet[0], unet


def test_run_writes_a_loadable_model_in_both_layouts(smoke_run, tmp_path):
    from danqing.models.loader import load_diffusers_folder
    from danqing.models.single_file import load_single_file

    _, run, summary = smoke_run
    assert (run / "samples").is_dir() and any((run / "samples").iterdir())
    assert summary["final_eval"]["n"] == 2
    a, b = load_diffusers_folder(run / "model"), load_single_file(run / "model.safetensors")
    assert a.family == b.family == "sd1"
    ids = torch.tensor([[49406, 320, 736, 2760, 49407] + [49407] * 72])
    with torch.no_grad():
        ha, hb = a.text_encoder(ids)[0], b.text_encoder(ids)[0]
    assert_close_scaled(hb, ha, rtol=1e-5)  # the same weights in two layouts (tests/parity.py)
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor != 1.0


def test_checkpoint_resumes_to_the_same_state(smoke_run):
    tmp, full_run, _ = smoke_run
    over = {"vae.steps": 40, "run.log_every": 5}
    part = _cfg(tmp, "part", **{"unet.steps": 20, **over})
    train_base(part, log=lambda line: None)
    resumed = train_base(_cfg(tmp, "part", **{"unet.steps": 60, **over}), resume=True, log=lambda line: None)
    assert resumed["final_step"] == 60
    x, y = load_file(full_run / "model.safetensors"), load_file(Path(part.run.output_dir) / "model.safetensors")
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_lr_warms_up_stays_then_decays_to_zero():
    from danqing.training.base import lr_factor

    f = [lr_factor(s, warmup=4, steps=20, decay=8) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4:12] == [1.0] * 8  # warm-up, then constant
    assert f[12:] == [(20 - s) / 8 for s in range(12, 21)] and f[20] == 0.0  # linear fall to 0 at `steps`
    assert [lr_factor(s, warmup=4, steps=20, decay=0) for s in (4, 19, 30)] == [1.0] * 3  # no decay: constant


def test_a_resumed_piece_ends_the_run_with_the_decay(smoke_run):
    """A run made at the constant rate, then ended by one more piece with `decay_steps`: the
    logged rate is the base rate until the decay starts and falls linearly to 0 at the end."""
    import re

    tmp, _, _ = smoke_run
    over = {"vae.steps": 10, "run.log_every": 5}
    train_base(_cfg(tmp, "wsd", **{"unet.steps": 20, **over}), log=lambda line: None)
    lines = []
    out = train_base(_cfg(tmp, "wsd", **{"unet.steps": 40, "unet.decay_steps": 10, **over}), resume=True,
                     log=lines.append)
    lr = {int(m[1]): float(m[2]) for line in lines if (m := re.search(r"unet step (\d+)/40 .*lr (\S+)", line))}
    base = lr[25]
    assert out["final_step"] == 40 and sorted(lr) == [25, 30, 35, 40]
    assert lr[30] == base and lr[35] == pytest.approx(base / 2, rel=0.01) and lr[40] == 0.0, lr


def test_trains_on_a_folder_of_captioned_images(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (80, 72), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a plain {colour} picture")
    cfg = _cfg(tmp_path, "folder", **{"data.source": str(data), "vae.steps": 3, "unet.steps": 3, "vae.batch_size": 2,
                                      "unet.batch_size": 2})
    summary = train_base(cfg, log=lambda line: None)
    assert summary["images"] == 4 and summary["final_step"] == 3
    assert (Path(cfg.run.output_dir) / "model.safetensors").is_file()


def test_folder_without_captions_is_refused(tmp_path):
    from danqing.training.data import folder_dataset

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("caption")
    with pytest.raises(InvalidRequest, match="2 of 3 images have no .txt caption"):
        folder_dataset(tmp_path, 64)
    with pytest.raises(InvalidRequest, match="not a folder"):
        folder_dataset(tmp_path / "missing", 64)


def test_bad_configs_give_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[unet]\nstepz = 3\n")
    with pytest.raises(InvalidRequest, match=r"unet.stepz: Extra inputs are not permitted"):
        load_config(bad)
    bad.write_text("[unet]\nsteps = -1\n")
    with pytest.raises(InvalidRequest, match=r"unet.steps"):
        load_config(bad)
    bad.write_text("[unet\n")
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        load_config(bad)


def test_training_continues_from_an_existing_model(smoke_run, tmp_path):
    _, run, _ = smoke_run
    cfg = _cfg(tmp_path, "more", **{"model.init_from": str(run / "model.safetensors"), "vae.steps": 0,
                                     "vae.crop_steps": 0, "unet.steps": 4})
    summary = train_base(cfg, log=lambda line: None)
    assert summary["init_from"] == str(run / "model.safetensors") and summary["final_step"] == 4
    before, after = load_file(run / "model.safetensors"), load_file(Path(cfg.run.output_dir) / "model.safetensors")
    vae_keys = [k for k in before if k.startswith("first_stage_model.")]
    unet_keys = [k for k in before if k.startswith("model.diffusion_model.")]
    assert vae_keys and all(torch.equal(before[k], after[k]) for k in vae_keys)   # the VAE is kept
    assert any(not torch.equal(before[k], after[k]) for k in unet_keys)           # the UNet moved on


def test_the_vae_can_start_from_another_run(smoke_run, tmp_path):
    """model.init_vae: a run starts its VAE from an earlier run's VAE folder (kept as it is, scale
    included, when the VAE stages have no steps); a folder that is no VAE is one line."""
    _, run, _ = smoke_run
    cfg = _cfg(tmp_path, "vae-from", **{"model.init_vae": str(run / "vae"), "vae.steps": 0, "vae.crop_steps": 0,
                                         "unet.steps": 2})
    train_base(cfg, log=lambda line: None)
    before, after = load_file(run / "model.safetensors"), load_file(Path(cfg.run.output_dir) / "model.safetensors")
    vae_keys = [k for k in before if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(before[k], after[k]) for k in vae_keys)
    with pytest.raises(InvalidRequest, match="model.init_vae.*not a diffusers VAE folder"):
        train_base(_cfg(tmp_path, "no-vae", **{"model.init_vae": str(tmp_path), "unet.steps": 1}), log=lambda line: None)


def test_a_saved_tokenizer_folder_is_read_and_matches_ours(smoke_run):
    from danqing.models.tokenizer import clip_tokenizer
    from danqing.models.loader import load_diffusers_folder

    _, run, _ = smoke_run
    assert (run / "model" / "tokenizer" / "tokenizer.json").is_file()   # as transformers 5 saves it
    tok = load_diffusers_folder(run / "model").tokenizer
    texts = ["a red circle left of a blue star, (masterpiece:1.2)", "红色的圆形在蓝色星形的左边"]
    assert tok(texts).input_ids == clip_tokenizer()(texts).input_ids
    assert tok.model_max_length == 77
