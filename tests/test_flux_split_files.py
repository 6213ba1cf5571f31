"""FLUX as ComfyUI users share it: a transformer-only file (BFL's bare keys), the text encoders as
separate files in models/text_encoder/ (clip_l, t5xxl: transformers names, told apart by their
keys) and the VAE as ae.safetensors in models/vae/ -- the same picture, bit for bit, as the
all-in-one file they were cut from; a missing part is one line naming it and where it goes."""

from __future__ import annotations

import json

import pytest
import torch
from test_flow_families import NEGATIVE, PROMPT, t5_tokenizer, tiny

from danqing import GenerationRequest
from danqing.errors import CorruptModel


@pytest.fixture(scope="module")
def split_studio(tmp_path_factory):
    from safetensors.torch import save_file

    from danqing import Settings, Studio
    from danqing.models.flow_files import DIT, TEXT
    from danqing.models.loader import export_single_file
    from danqing.models.single_file import CONFIG_KEY, VAE, read_state_dict

    root = tmp_path_factory.mktemp("split-flux")
    models = root / "models"
    for sub in ("checkpoints", "text_encoder", "vae"):
        (models / sub).mkdir(parents=True)
    whole = export_single_file(tiny("flux", 23), models / "checkpoints" / "flux-aio.safetensors")
    t5_tokenizer().save_pretrained(models / "checkpoints" / "t5-tokenizer")
    sd, meta = read_state_dict(whole)
    configs = json.loads(meta[CONFIG_KEY])

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    save_file(part(DIT), str(models / "checkpoints" / "flux-transformer.safetensors"),  # BFL's bare names
              metadata={CONFIG_KEY: json.dumps({k: v for k, v in configs.items() if k != "vae"})})
    save_file(part(VAE), str(models / "vae" / "ae.safetensors"), metadata={CONFIG_KEY: json.dumps({"vae": configs["vae"]})})
    save_file(part(TEXT["clip_l"]), str(models / "text_encoder" / "clip_l.safetensors"))
    save_file(part(TEXT["t5"]), str(models / "text_encoder" / "t5xxl_fp16.safetensors"))
    return Studio(Settings(home=root, models_dir=models, device="cpu", dtype="fp32"))


REQUEST = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=3, seed=42, width=64,
                            height=64, cfg_scale=2.0)


def test_split_files_give_the_all_in_one_picture(split_studio):
    from danqing.models.loader import describe_checkpoint
    from danqing.outputs.metadata import request_from_infotext

    assert describe_checkpoint(split_studio.registry.find("checkpoint", "flux-transformer")) == "flux"  # the keys
    whole = split_studio.generate(REQUEST.replace(model="flux-aio"))
    split = split_studio.generate(REQUEST.replace(model="flux-transformer", vae="ae",
                                                  text_encoders=("t5xxl_fp16", "clip_l")))  # any order
    assert torch.equal(whole.latents[0], split.latents[0])
    assert whole.images[0].tobytes() == split.images[0].tobytes()
    text = split.infotexts[0]
    assert "VAE: ae" in text and "Module 1: t5xxl_fp16, Module 2: clip_l" in text
    again = request_from_infotext(text)  # generate --from
    assert (again.vae, again.text_encoders) == ("ae", ("t5xxl_fp16", "clip_l"))
    assert split_studio.generate(again).images[0].tobytes() == split.images[0].tobytes()


@pytest.mark.parametrize("change, words", [
    ({"vae": "ae", "text_encoders": ("t5xxl_fp16",)},
     r"flux-transformer.safetensors: this FLUX file holds no CLIP-L text encoder: give its file with --text-encoder "
     r"\(ComfyUI's clip_l.safetensors; keep text encoder files in models/text_encoder/\)"),
    ({"text_encoders": ("t5xxl_fp16", "clip_l")}, r"holds no VAE: give it with --vae \(ae.safetensors"),
    ({"model": "flux-aio", "text_encoders": ("clip_l",)}, r"holds its own CLIP-L text encoder"),
    ({"vae": "ae", "text_encoders": ("clip_l", "clip_l")}, r"a second CLIP-L text encoder"),
])
def test_missing_or_extra_parts_are_one_line(split_studio, change, words):
    with pytest.raises(CorruptModel, match=words) as err:
        split_studio.generate(REQUEST.replace(**{"model": "flux-transformer", "steps": 1, **change}))
    assert "\n" not in str(err.value)
