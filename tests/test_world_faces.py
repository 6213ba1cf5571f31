"""The portrait world's face backend (danqing/faces/world_backend.py): danqing-portrait-faces, the
bundled recogniser trained by `danqing train faces`, measured on people it never saw, and its
place in the portrait studio (ranking, the person's backend kept)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import spearmanr

from danqing.apps.portrait_people import backend_of, fuse_and_rank, load_person
from danqing.apps.portrait_world import write_world_person
from danqing.errors import InvalidRequest
from danqing.faces import load_backend
from danqing.faces.fusion import mean_embedding
from danqing.synthetic.portraits import (IDENTITY, person, pictures_of, render_portrait, split_people, values,
                                         visible)
from danqing.synthetic.render import degrade
from danqing.training.faces import verification


@pytest.fixture(scope="module")
def world():
    return load_backend("world")


def _embed(world, pictures) -> np.ndarray:
    return np.stack([world.embed(np.asarray(p), world.detect(np.asarray(p))[0]) for p in pictures])


def test_held_out_people_are_told_apart(world):
    """Pictures of people no training picture showed: the nearest other picture is the same
    person's in most cases, same-person pairs lie within the backend's threshold far more often
    than different-person pairs, and similarity falls as people share fewer identity attributes."""
    v = verification(lambda pics: _embed(world, pics), n_people=60)
    assert v["same"] > v["different"] + 0.3, v
    assert v["rank1"] >= 0.8 and v["eer"] <= 0.15, v
    assert v["rho_shared"] >= 0.5, v
    assert abs(world.same_person_distance - (1 - v["threshold"])) < 0.15   # the threshold it ships with


def test_similarity_to_a_person_ranks_their_pictures_first():
    """A person's identity (the mean of 8 pictures) against new pictures of them and of people
    who differ in 1-3 identity attributes: the similarity follows the number of attributes
    shared (Spearman's rho), and the top 5 are all the person's own. (A changed attribute is one
    the picture's style shows: a pencil picture has no colours.)"""
    world = load_backend("world")
    rng = random.Random(4)
    who = person("Ada")
    identity = mean_embedding(list(_embed(world, [render_portrait(p) for p in pictures_of(who, 8)])))
    candidates, shared = [], []
    for p in pictures_of(who, 5, seed=1):
        candidates.append(degrade(render_portrait(p), rng))
        shared.append(len(IDENTITY))
    for k in (1, 2, 3):
        for p in pictures_of(who, 6, seed=10 + k):
            changed = rng.sample([a for a in IDENTITY if a in visible(p.style)], k)  # pencil: no colours
            other = replace(p.person, **{a: rng.choice([v for v in values(a) if v != getattr(who, a)]) for a in changed})
            candidates.append(degrade(render_portrait(replace(p, person=other)), rng))
            shared.append(len(IDENTITY) - k)
    scores = _embed(world, candidates) @ identity
    assert spearmanr(scores, shared).statistic >= 0.5
    assert sorted(np.argsort(-scores)[:5].tolist()) == [0, 1, 2, 3, 4]


def test_a_world_person_keeps_their_backend_and_ranking_refuses_another(tmp_path, world):
    write_world_person(tmp_path, "dara", person("Dara"), 8)
    p = load_person(tmp_path, "dara")
    assert backend_of(p) == "world" and (p.folder / "best-face.png").is_file()
    assert abs(np.linalg.norm(p.identity) - 1) < 0.3        # a mean of unit vectors of one person
    own = [np.asarray(render_portrait(q)) for q in pictures_of(person("Dara"), 3, seed=5)]
    other = [np.asarray(render_portrait(q)) for q in pictures_of(split_people("train")[0], 3, seed=5)]
    ranked = fuse_and_rank(other + own, p, world, keep=3)
    assert sorted(r.index for r in ranked) == [3, 4, 5]        # Dara's own pictures first
    fused = fuse_and_rank(own, p, world, keep=1, fuse=0.5)     # fusion finds the framed face in best-face.png
    assert fused[0].fused
    with pytest.raises(InvalidRequest, match="measured with the dlib face backend.*--backend dlib"):
        fuse_and_rank(own, replace(p, info={**p.info, "face_backend": "dlib (dlib 19.24)"}), world, keep=1)


def test_train_faces_writes_a_model_the_backend_loads(tmp_path):
    from danqing.faces.world_backend import WorldBackend
    from danqing.training.config_companions import FacesTrainConfig
    from danqing.training.faces import train_faces

    cfg = FacesTrainConfig.model_validate({
        "data": {"n_images": 256}, "model": {"widths": [8, 8, 8, 8], "dim": 16},
        "train": {"steps": 4, "batch_size": 8}, "output": {"output_dir": str(tmp_path), "eval_people": 4, "log_every": 2}})
    lines = []
    summary = train_faces(cfg, log=lines.append)
    assert summary["steps"] == 4 and any(line.startswith("held-out people at step 4") for line in lines)
    backend = WorldBackend(tmp_path / "model")
    img = np.asarray(render_portrait(pictures_of(person("Ada"), 1)[0]))
    e = backend.embed(img, backend.detect(img)[0])
    assert e.shape == (16,) and abs(np.linalg.norm(e) - 1) < 1e-5
    assert backend.same_person_distance == round(1 - summary["heldout"]["threshold"], 4)   # its own held-out figure


def test_the_backends_framing_is_where_the_world_draws_faces():
    """faces/ may not import the portrait world, so its framing is written out there: it must
    stay the world's own geometry (the largest head's box, the eyes, the mouth)."""
    from danqing.faces.world_backend import FRAMING
    from danqing.synthetic import portraits as P

    rx = max(P.head_box(h)[0] for h in values("head"))
    ry = max(P.head_box(h)[1] for h in values("head"))
    cx, cy = P.CENTRE
    assert np.allclose(FRAMING["box"], (cx - rx, cy - ry, cx + rx, cy + ry))
    assert np.allclose([FRAMING["left_eye"], FRAMING["right_eye"]], [(cx - P.EYE_DX, P.EYE_Y), (cx + P.EYE_DX, P.EYE_Y)])
    assert FRAMING["mouth_left"][1] == FRAMING["mouth_right"][1] == P.MOUTH_Y
