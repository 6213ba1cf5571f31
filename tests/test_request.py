"""GenerationRequest: validation messages, JSON round trip, infotext round trip."""

from __future__ import annotations

import pytest

from danqing.errors import InvalidRequest, UnknownSampler
from danqing.outputs.metadata import request_from_infotext, request_infotext
from danqing.request import GenerationRequest


def test_json_round_trip():
    r = GenerationRequest.create(prompt="a (cat:1.2) [on:under:0.5] a mat", negative_prompt="dog", sampler="Euler a",
                                 steps=30, cfg_scale=5.5, seed=7, subseed=3, subseed_strength=0.25, width=768,
                                 height=512, batch_size=2, batch_count=3, clip_skip=2, model="m", vae="v")
    assert GenerationRequest.from_json(r.to_json()) == r


def test_frozen():
    r = GenerationRequest()
    with pytest.raises(Exception):
        r.steps = 3


@pytest.mark.parametrize(
    "fields, field, text",
    [
        ({"width": 513}, "width", "multiple of 8"),
        ({"steps": 0}, "steps", "between 1 and 150"),
        ({"cfg_scale": 31}, "cfg_scale", "between 1 and 30"),
        ({"sampler": "Nope"}, "sampler", "choose one of"),
        ({"schedule": "Nope"}, "schedule", "choose one of"),
        ({"prompt": "a (b"}, "prompt", "'('"),
        ({"negative_prompt": "[x:y:0.5"}, "negative_prompt", ""),  # unbalanced ("[x:y:z]" is text, as in A1111)
        ({"colour": 1}, "colour", "unknown field; allowed fields: prompt,"),
        ({"rng": "tpu"}, "rng", "must be 'cpu' or 'gpu'"),
        ({"seed": -5}, "seed", "-1 (random)"),
    ],
)
def test_invalid_fields_name_field_and_rule(fields, field, text):
    with pytest.raises(InvalidRequest) as exc:
        GenerationRequest.create(**fields)
    msg = str(exc.value)
    assert msg.startswith(f"{field}: ") and text in msg and "\n" not in msg


def test_unknown_sampler_is_typed():
    with pytest.raises(UnknownSampler):
        GenerationRequest.create(sampler="DPM fast")


def test_from_json_bad():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        GenerationRequest.from_json("{nope")


def test_infotext_round_trip_same_request():
    r = GenerationRequest.create(prompt="line one\nline, two: (x:1.2)", negative_prompt="bad, \"quoted\"", sampler="DPM++ SDE",
                                 schedule="Exponential", steps=17, cfg_scale=6.5, seed=123, subseed=9, subseed_strength=0.4,
                                 width=640, height=448, clip_skip=2, model="my-model", vae="my-vae")
    text = request_infotext(r, seed=123, subseed=9, model_name="my-model", model_hash="abcdef0123456789", vae_name="my-vae", vae_hash="0123456789abcdef")
    back = request_from_infotext(text)
    assert back == r


def test_reads_legacy_a1111_sampler_names():
    text = "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5"
    r = request_from_infotext(text)
    assert (r.sampler, r.schedule, r.seed, r.model, r.rng) == ("DPM++ 2M", "Karras", 1, "v1-5", "gpu")
