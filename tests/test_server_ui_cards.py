"""Extra-network cards (danqing/server/ui_cards.py): the listing finds each LoRA's preview PNG and
trigger words (A1111's JSON sidecar, the safetensors metadata) and each embedding; clicking a
card adds ``<lora:NAME:1>`` and its trigger words, or the embedding's name, to the prompt."""

from __future__ import annotations

import json

import torch
from PIL import Image
from safetensors.torch import save_file

from danqing.models.registry import Registry, bundled_lora_entries
from danqing.server.ui_cards import Card, insert_card, network_cards


def test_cards_list_previews_and_trigger_words_and_insert_into_the_prompt(tmp_path):
    models = tmp_path / "models"
    (models / "lora").mkdir(parents=True)
    (models / "embeddings").mkdir(parents=True)
    w = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}
    save_file(w, models / "lora" / "heart.safetensors",
              metadata={"ss_tag_frequency": json.dumps({"1_heart": {"dqheart": 9, "red": 4, "shape": 2, "a": 1}})})
    Image.new("RGB", (8, 8), (255, 0, 0)).save(models / "lora" / "heart.png")
    save_file(w, models / "lora" / "star.safetensors", metadata={"modelspec.trigger_phrase": "dqstar, gold"})
    save_file(w, models / "lora" / "moon.safetensors")
    (models / "lora" / "moon.json").write_text(json.dumps({"activation text": "dqmoon"}))
    Image.new("RGB", (8, 8)).save(models / "lora" / "moon.preview.png")
    save_file({"emb_params": torch.zeros(2, 8)}, models / "embeddings" / "dq-word.safetensors")

    reg = Registry(models)
    loras = {c.name: c for c in network_cards(reg, "lora")}
    # the folder's own (heart shadows the bundled file of that name) and the other bundled LoRAs
    assert set(loras) == {"heart", "star", "moon"} | {e.name for e in bundled_lora_entries()}
    assert loras["heart"].preview == models / "lora" / "heart.png" and loras["star"].preview is None
    assert loras["moon"].preview == models / "lora" / "moon.preview.png"
    assert loras["heart"].triggers == ("dqheart", "red", "shape")
    assert loras["star"].triggers == ("dqstar", "gold") and loras["moon"].triggers == ("dqmoon",)
    (emb,) = network_cards(reg, "embedding")
    assert emb.name == "dq-word"

    p = insert_card("a cat", loras["star"])
    assert p == "a cat <lora:star:1>, dqstar, gold"
    assert insert_card(p, loras["star"]) == p  # a second click adds nothing
    assert insert_card("a cat", emb) == "a cat, dq-word"
    assert insert_card("", Card("lora", "x", None, ())) == "<lora:x:1>"
