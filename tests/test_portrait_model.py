"""danqing-tiny-portraits, the bundled model of the portrait world: it is listed, its files are
small, and it draws held-out people (identities no training picture shows) with the attributes
and the rendering style their captions ask for, in English and in Chinese."""

from pathlib import Path

import pytest

from danqing import Settings, Studio
from danqing.models.registry import bundled_entries
from danqing.synthetic.portrait_reader import evaluate_portraits_studio
from danqing.synthetic.portraits import eval_portraits

NAME = "danqing-tiny-portraits"
MODELS = Path(__file__).parent.parent / "danqing" / "data" / "models"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return Studio(Settings(home=tmp_path_factory.mktemp("home"), device="cpu", dtype="fp32"))


def test_bundled_and_small():
    assert NAME in [e.name for e in bundled_entries()]
    size = sum(f.stat().st_size for f in (MODELS / NAME).rglob("*") if f.is_file())
    assert size <= 10_000_000, size          # fp16: about 8 MB


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_draws_held_out_people(studio, lang):
    # the first 24 of the 200 held-out prompts (docs/models.md has all 200): CFG 7, 20 steps
    summary, _ = evaluate_portraits_studio(studio, eval_portraits(24), model=NAME, lang=lang, cfg_scale=7.0)
    assert summary["style"] >= 0.9, summary
    assert summary["attributes"] >= ATTRIBUTES_AT_LEAST, summary


ATTRIBUTES_AT_LEAST = 0.8
