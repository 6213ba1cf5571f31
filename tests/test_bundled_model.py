"""danqing-tiny, the bundled model trained by `danqing train base`: it is there, it is small,
it is the default, both its layouts agree, and it draws what held-out prompts ask for."""

from pathlib import Path

import numpy as np
import pytest

from danqing import GenerationRequest, Settings, Studio
from danqing.models.registry import BUNDLED, Registry, bundled_entries
from danqing.synthetic.evaluate import evaluate_studio, score, summarise
from danqing.synthetic.scenes import eval_scenes

MODELS = Path(__file__).parent.parent / "danqing" / "data" / "models"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return Studio(Settings(home=tmp_path_factory.mktemp("home"), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def cfg7(studio):
    return evaluate_studio(studio, eval_scenes(16), lang="en", cfg_scale=7.0)[0]


def test_bundled_model_is_listed_and_is_the_default(tmp_path, monkeypatch):
    assert BUNDLED in [e.name for e in bundled_entries()]
    assert BUNDLED in [e.name for e in Registry(tmp_path).scan("checkpoint")]
    assert Settings(home=tmp_path).default_model == BUNDLED
    monkeypatch.delenv("DANQING_MODEL", raising=False)  # the default, whatever the caller's shell sets
    assert Settings.from_env(home=tmp_path).default_model == BUNDLED
    monkeypatch.setenv("DANQING_MODEL", "my-model")
    assert Settings.from_env(home=tmp_path).default_model == "my-model"


def test_bundled_files_stay_small():
    files = [f for f in MODELS.rglob("*") if f.is_file()]
    assert (MODELS / f"{BUNDLED}.safetensors").is_file() and (MODELS / BUNDLED / "model_index.json").is_file()
    # each bundled model (its folder and single file) within 20 MB, all of them within 100 MB
    names = {f.relative_to(MODELS).parts[0].removesuffix(".safetensors") for f in files}
    for name in names:
        size = sum(f.stat().st_size for f in files if f.relative_to(MODELS).parts[0].removesuffix(".safetensors") == name)
        assert size <= 20_000_000, (name, size)
    assert sum(f.stat().st_size for f in files) <= 100_000_000


def test_single_file_and_folder_paint_the_same(studio):
    req = GenerationRequest(prompt="a red circle left of a blue square", seed=3, steps=8, width=64, height=64)
    a = studio.generate(req.replace(model=BUNDLED)).images[0]
    b = studio.generate(req.replace(model=str(MODELS / f"{BUNDLED}.safetensors"))).images[0]
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    assert diff.max() <= 2, diff.max()


def test_heldout_prompts_are_drawn(cfg7):
    # 16 of the 200 held-out-combination prompts (docs/models.md has the full figure): each asks
    # for a colour-shape pair that never appears in training
    assert cfg7["object"] >= 0.75, cfg7


def test_the_pictures_follow_their_own_prompts(studio, cfg7):
    # the same pictures scored against another prompt's scene, and pictures of the empty prompt
    # scored against these prompts, score low: what is drawn comes from the text
    scs = eval_scenes(16)
    imgs = []
    evaluate_studio(studio, scs, lang="en", cfg_scale=7.0, on_image=lambda i, im, s: imgs.append(im))
    shuffled = summarise([score(im, scs[(i + 5) % 16].spec) for i, im in enumerate(imgs)])
    assert shuffled["object"] <= 0.25 and cfg7["object"] - shuffled["object"] >= 0.5, (shuffled, cfg7)
    empty = [studio.generate(GenerationRequest(prompt="", seed=1000 + i, subseed=0, steps=20, width=64,
                                               height=64)).images[0] for i in range(8)]
    assert summarise([score(im, s.spec) for im, s in zip(empty, scs)])["object"] <= 0.3


def test_guidance_helps(studio, cfg7):
    # classifier-free guidance (trained with 10% caption dropout) draws the asked-for shapes more
    # often than the conditional model alone (CFG 1)
    cfg1 = evaluate_studio(studio, eval_scenes(16), lang="en", cfg_scale=1.0)[0]
    assert cfg1["object"] <= cfg7["object"] - 0.1, (cfg1, cfg7)


def test_chinese_prompts_are_followed_like_english_ones(studio, cfg7):
    zh = evaluate_studio(studio, eval_scenes(16), lang="zh", cfg_scale=7.0)[0]
    # 200 prompts: within 0.05 (docs/models.md); on 16, allow two pictures' difference
    assert zh["object"] >= cfg7["object"] - 0.125, (zh, cfg7)
    assert zh["colour"] >= cfg7["colour"] - 0.125, (zh, cfg7)
