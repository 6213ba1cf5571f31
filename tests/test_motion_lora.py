"""Motion LoRAs (AnimateDiff's MotionLoRA): a LoRA of a motion module's temporal attention, used
as ``<lora:NAME:w>`` in a video prompt, in the original layout (``v2_lora_*.ckpt``) and in
diffusers'; the clip equals the one drawn with the LoRA merged into the module by hand; nothing
of it stays behind; what it cannot do is refused in one line.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from test_video import tiny_adapter

from danqing.errors import IncompatibleModel, InvalidRequest
from danqing.models.motion import adapter_to_original, diffusers_module_name
from danqing.request_video import VideoRequest

RANK = 4
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_layers(adapter) -> list[str]:
    """The adapter's temporal attention projections (diffusers names), as MotionLoRA trains them."""
    return sorted(n for n, m in adapter.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".attn" in n and n.endswith(PROJECTIONS))


def random_lora(adapter, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers layer name -> (down, up), rank 4."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in attention_layers(adapter):
        w = adapter.get_submodule(name).weight
        out[name] = (torch.randn(RANK, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], RANK, generator=g) * 0.3)
    return out


def original_keys(lora) -> dict[str, torch.Tensor]:
    """The released files' layout: ``...motion_modules.0.temporal_transformer.transformer_blocks.0.
    attention_blocks.0.processor.to_q_lora.down.weight``."""
    sd = {}
    for name, (down, up) in lora.items():
        path, proj = (name[:-len(".to_out.0")], "to_out") if name.endswith(".to_out.0") else name.rsplit(".", 1)
        path = re.sub(r"(\.motion_modules\.\d+\.)", r"\1temporal_transformer.", path)
        path = path.replace(".attn1", ".attention_blocks.0").replace(".attn2", ".attention_blocks.1")
        sd[f"{path}.processor.{proj}_lora.down.weight"] = down
        sd[f"{path}.processor.{proj}_lora.up.weight"] = up
    return sd


def diffusers_keys(lora) -> dict[str, torch.Tensor]:
    """diffusers' / peft's layout: ``unet.down_blocks.0.motion_modules.0...attn1.to_q.lora_A.weight``."""
    sd = {}
    for name, (down, up) in lora.items():
        sd[f"unet.{name}.lora_A.weight"] = down
        sd[f"unet.{name}.lora_B.weight"] = up
    return sd


def merged(adapter, lora, weight: float):
    """The adapter with ``weight * up @ down`` added to each layer by hand."""
    out = tiny_adapter()
    with torch.no_grad():
        for name, (down, up) in lora.items():
            out.get_submodule(name).weight += weight * (up @ down)
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("motion-lora")
    adapter = tiny_adapter()
    lora = random_lora(adapter)
    adapter.save_pretrained(home / "models" / "motion" / "tiny-mm")
    merged(adapter, lora, 0.8).save_pretrained(home / "models" / "motion" / "merged-mm")
    (home / "models" / "lora").mkdir(parents=True)
    save_file(original_keys(lora), str(home / "models" / "lora" / "zoom.safetensors"))
    save_file(diffusers_keys(lora), str(home / "models" / "lora" / "zoom-diffusers.safetensors"))
    other = tiny_adapter(motion_transformer_layers_per_block=2)  # a module of two layers per motion block
    save_file(diffusers_keys(random_lora(other)), str(home / "models" / "lora" / "zoom-v2.safetensors"))
    return home


@pytest.fixture(scope="module")
def videos(home):
    from danqing import Settings, Studio
    from danqing.video.studio import VideoStudio

    return VideoStudio(Studio(Settings(home=home, device="cpu", dtype="fp32")))


def clip(videos, prompt: str, module: str | None = "tiny-mm", **changes):
    req = VideoRequest.create(prompt=prompt, model="danqing-tiny", motion_module=module, frames=4, steps=3, seed=3,
                              width=64, height=64, cfg_scale=5.0, **changes)
    return videos.generate(req)


def test_the_original_layout_names_the_diffusers_layers():
    assert (diffusers_module_name("down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0."
                                  "attention_blocks.1.to_out.0")
            == "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_out.0")
    adapter = tiny_adapter()
    for k in adapter_to_original(adapter):  # every original key maps back onto the adapter
        if not k.endswith(".pe"):
            assert diffusers_module_name(k.rsplit(".", 1)[0]) in dict(adapter.named_modules()), k


@pytest.mark.parametrize("name", ["zoom", "zoom-diffusers"])
def test_a_motion_lora_tag_draws_the_clip_of_the_module_with_it_merged(videos, name):
    """``<lora:zoom:0.8>`` on ``tiny-mm`` gives the latents of ``merged-mm`` (the module with
    0.8 x up @ down added by hand), for the original layout and diffusers'; the LoRA acts (the
    plain module differs) and leaves nothing behind (the plain module again gives its own clip);
    its hash is recorded as every LoRA's."""
    import json

    prompt = "a red circle moving to the right"
    with_lora = clip(videos, f"{prompt} <lora:{name}:0.8>")
    by_hand = clip(videos, prompt, module="merged-mm")
    plain = clip(videos, prompt)
    assert (with_lora.latents[0] - by_hand.latents[0]).abs().max().item() < 1e-4
    assert (with_lora.latents[0] - plain.latents[0]).abs().max().item() > 1e-2
    assert torch.equal(clip(videos, prompt).latents[0], plain.latents[0])
    assert name in json.loads(with_lora.parameters[0])["lora_hashes"]


def test_what_a_motion_lora_cannot_do_is_one_line(videos):
    with pytest.raises(IncompatibleModel, match=r"motion LoRA 'zoom-v2' does not fit motion module 'tiny-mm': "
                                                r"\d+ of \d+ layers do not match"):
        clip(videos, "a red circle <lora:zoom-v2:1>")
    with pytest.raises(InvalidRequest, match=r"^prompt: 'zoom' is a motion LoRA: it changes a motion module, and this "
                                             r"clip has none"):
        clip(videos, "a red circle <lora:zoom:1>", module=None, motion=False)
    from danqing import GenerationRequest

    with pytest.raises(IncompatibleModel, match=r"LoRA 'zoom' is a motion LoRA \(AnimateDiff\).*danqing video"):
        videos.studio.generate(GenerationRequest.create(prompt="a red circle <lora:zoom:1>", model="danqing-tiny",
                                                        steps=1, width=64, height=64))
