"""Every model family through the shells: ``danqing generate --from PICTURE`` re-creates a
picture of SD3, FLUX, Stable unCLIP, Kandinsky 2.2 and DeepFloyd IF bit for bit (its infotext
carries what the family needs), and the A1111 API lists the families and runs them (webuiapi).

The tiny random models are the ones the parity tests build (tests/test_flow_families.py,
test_unclip_family.py, test_if_family.py), saved into one models folder.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_module
from PIL import Image
from test_flow_families import tiny
from test_if_family import _pipelines as if_pipelines
from test_unclip_family import _cli, _kandinsky_pipelines, _picture
from test_unclip_family import _pipeline as unclip_pipeline

PROMPT, SIZE = "a red circle left of a blue star", "64"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from danqing.models.loader import save_diffusers_folder

    home = tmp_path_factory.mktemp("family-home")
    ckpt = home / "models" / "checkpoints"
    ckpt.mkdir(parents=True)
    save_diffusers_folder(tiny("sd3", 21), ckpt / "tiny-sd3")
    save_diffusers_folder(tiny("flux", 23), ckpt / "tiny-flux")
    unclip_pipeline().save_pretrained(ckpt / "unclip-tiny")
    for pipe, name in zip(_kandinsky_pipelines(), ("k22-prior", "k22-decoder")):
        pipe.save_pretrained(ckpt / name)
    for pipe, name in zip(if_pipelines(), ("IF-I-tiny", "IF-II-tiny")):
        pipe.save_pretrained(ckpt / name)
    _picture().save(home / "source.png")
    return home


SIZED = ("--width", SIZE, "--height", SIZE)
CASES = {  # the command that makes the picture; the infotext keys the family adds
    "sd3": (["generate", PROMPT, "--model", "tiny-sd3", "--sampler", "Euler", "--steps", "2", "--cfg", "3",
             "--shift", "2", *SIZED], {"Shift": "2"}),
    "flux": (["generate", PROMPT, "--model", "tiny-flux", "--sampler", "Euler", "--steps", "2", "--cfg", "1",
              "--distilled-cfg", "4", *SIZED], {"Distilled CFG Scale": "4"}),
    "unclip": (["variations", "SOURCE", "--model", "unclip-tiny", "--prompt", PROMPT, "--steps", "2",
                "--noise-level", "100", "--sampler", "DDIM", *SIZED], {"Noise level": "100", "Sampler": "DDIM"}),
    "kandinsky": (["generate", PROMPT, "--model", "k22-decoder", "--prior", "k22-prior", "--steps", "2",
                   "--prior-steps", "2", "--prior-cfg", "3", *SIZED], {"Prior": "k22-prior", "Prior steps": "2"}),
    "if": (["generate", PROMPT, "--model", "IF-I-tiny", "--stage2", "IF-II-tiny", "--steps", "1", "--stage2-steps",
            "1", "--noise-level", "100", "--upscaler", "Lanczos"],  # size: stage I's own, 64
           {"Stage II": "IF-II-tiny", "Noise level": "100", "Postprocess upscaler": "Lanczos", "Size": "64x64"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_from_recreates_every_family(capsys, home, case):
    from danqing.outputs.infotext import parse_infotext
    from danqing.outputs.store import read_infotext

    args, keys = CASES[case]
    first, again = home / f"{case}.png", home / f"{case}-again.png"
    args = [str(home / "source.png") if a == "SOURCE" else a for a in args]
    code, _, err = _cli(capsys, home, *args, "--seed", "5", "--out", str(first))
    assert code in (0, None), err
    text = read_infotext(first)
    params = parse_infotext(text)[2]
    assert {k: params.get(k) for k in keys} == keys, text
    if "SOURCE" in CASES[case][0]:
        assert params["Variation source"] == str((home / "source.png").resolve())
    code, _, err = _cli(capsys, home, "generate", "--from", str(first), "--out", str(again))
    assert code in (0, None), err
    a, b = Image.open(first), Image.open(again)
    assert a.size == ((1024, 1024) if case == "if" else (64, 64))  # IF: 64 -> stage II 256 -> Lanczos 4x
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert read_infotext(again) == text
    if case == "kandinsky":  # --from with an option changed: the option wins over the file's
        other = home / "kandinsky-other.png"
        code, _, err = _cli(capsys, home, "generate", "--from", str(first), "--prior-cfg", "6", "--out", str(other))
        assert code in (0, None), err
        assert "Prior CFG scale: 6" in read_infotext(other)
        assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(a))


def test_if_through_generate_and_what_it_refuses(capsys, home):
    """Stage I only without --stage2 (64x64); the stage-II folder as --model, stage-II options
    without a stage II and options of other families are one line each, nothing written."""
    only = home / "if-stage1.png"
    code, _, err = _cli(capsys, home, "generate", PROMPT, "--model", "IF-I-tiny", "--steps", "2", "--seed", "1",
                        "--out", str(only))
    assert code in (0, None), err
    assert Image.open(only).size == (64, 64)
    refused = home / "refused.png"
    for args, words in (
        (["--model", "IF-II-tiny"], "give the stage-I folder as --model and this one as --stage2"),
        (["--model", "IF-I-tiny", "--noise-level", "5"], "name its folder with --stage2"),
        (["--model", "IF-I-tiny", "--prior", "k22-prior"], "--prior is not an option of the if-i family"),
        (["--model", "IF-I-tiny", "--sampler", "Euler"], "sampler: not an option of the if-i family"),
        (["--model", "IF-I-tiny", "--stage2", "k22-prior"], "k22-prior: not a if-ii folder"),
        (["--model", "tiny-flux", "--stage2", "IF-II-tiny"], "--stage2 is an option of"),
    ):
        code, _, err = _cli(capsys, home, "generate", PROMPT, "--steps", "1", *args, "--out", str(refused))
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not refused.exists()


def test_a1111_api_lists_and_runs_the_families(home, tmp_path_factory):
    """/sd-models names each checkpoint's family; txt2img runs IF (stage I only: no stage II is
    installed here) and Kandinsky 2.2 (its prior: the one installed) selected by
    override_settings, img2img runs Stable unCLIP variations of the init picture: the library's
    pictures, bit for bit; what a family does not take is a 422 naming the field."""
    webuiapi = need_module("webuiapi", "pip install -e '.[test]'")
    import shutil

    import httpx
    from server_helpers import LiveServer, make_app

    from danqing import GenerationRequest, Settings, Studio
    from danqing.apps.families import FamilyOptions, run_family

    models = tmp_path_factory.mktemp("family-api-models")
    for name in ("IF-I-tiny", "unclip-tiny", "k22-decoder", "k22-prior", "tiny-flux"):
        shutil.copytree(home / "models" / "checkpoints" / name, models / "checkpoints" / name)
    studio = Studio(Settings(home=home, models_dir=models, device="cpu", dtype="fp32"))
    from danqing.models.native import native_side

    assert native_side(studio.registry, "IF-I-tiny") == 64  # the UI's size sliders start at stage I's size
    with LiveServer(make_app(tmp_path_factory.mktemp("family-api"), studio=studio)) as live:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=2)
        families = {m["model_name"]: m["family"] for m in api.get_sd_models()}
        assert {k: families[k] for k in ("IF-I-tiny", "unclip-tiny", "k22-decoder", "k22-prior", "tiny-flux")} == {
            "IF-I-tiny": "if-i", "unclip-tiny": "unclip", "k22-decoder": "kandinsky-decoder",
            "k22-prior": "kandinsky-prior", "tiny-flux": "flux"}
        common = dict(prompt=PROMPT, steps=2, seed=11, width=64, height=64, cfg_scale=5)
        request = GenerationRequest(prompt=PROMPT, steps=2, seed=11, width=64, height=64, cfg_scale=5.0)
        pictures = {}
        for model, options, size in (("IF-I-tiny", FamilyOptions(), (64, 64)),
                                     ("k22-decoder", FamilyOptions(prior="k22-prior"), (64, 64))):
            got = pictures[model] = api.txt2img(override_settings={"sd_model_checkpoint": model}, **common)
            expected = run_family(studio, "if-i" if model.startswith("IF") else "kandinsky-decoder",
                                  request.replace(model=model), options)
            assert got.image.size == size
            assert np.array_equal(np.asarray(got.image.convert("RGB")), np.asarray(expected.images[0])), model
            assert f"Family: {'if-i' if model.startswith('IF') else 'kandinsky-decoder'}" in got.info["infotexts"][0]
        api.set_options({"show_progress_type": "TAESD"})  # no TAESD for these families: the linear preview
        again = api.txt2img(override_settings={"sd_model_checkpoint": "IF-I-tiny"}, **common)
        assert np.array_equal(np.asarray(again.image.convert("RGB")), np.asarray(pictures["IF-I-tiny"].image.convert("RGB")))
        got = api.img2img(images=[_picture()], override_settings={"sd_model_checkpoint": "unclip-tiny"},
                          **common)
        assert got.image.size == (64, 64) and "Family: unclip" in got.info["infotexts"][0]
        url = f"{live.url}/sdapi/v1/txt2img"
        for body, field in (({"override_settings": {"sd_model_checkpoint": "unclip-tiny"}}, "model"),
                            ({"override_settings": {"sd_model_checkpoint": "IF-I-tiny"}, "enable_hr": True}, "enable_hr"),
                            ({"override_settings": {"sd_model_checkpoint": "k22-prior"}}, "model")):
            answer = httpx.post(url, json={"prompt": PROMPT, "steps": 1, **body}, timeout=60)
            assert answer.status_code == 422 and field in answer.text, answer.text
