"""Passes: the shared batch loop and result type, the hires fix's prompt timeline (A1111 >= 1.6),
request state passed as arguments, nothing done at import time, and the queued Studio."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from danqing import GenerationRequest
from danqing.conditioning.prompt_parser import prompt_schedule
from danqing.errors import InvalidRequest
from danqing.passes.batches import Batches, finish_pictures
from danqing.sampling.loop import SampleResult
from test_structure import import_graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "danqing"


# ---------------------------------------------------------------------------------------------
# hires fix: one prompt-editing timeline (expected values: A1111's doctests of
# get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps))
# ---------------------------------------------------------------------------------------------
def test_hires_schedule_matches_a1111():
    g = lambda p: prompt_schedule(p, 10, hires_steps=10)  # noqa: E731  A1111: g = ...([p], 10, 10)[0]
    assert g("a [b:.5] c") == [(10, "a b c")]  # a fraction <= 1 is over before the hires pass
    assert g("a [b:1.5] c") == [(5, "a  c"), (10, "a b c")]  # half way through the hires pass


def test_hires_schedule_integer_steps_count_from_the_first_pass():
    # 20 first-pass steps + 10 hires steps: step 25 is hires step 5
    assert prompt_schedule("[cat:dog:25]", 20, hires_steps=10) == [(5, "cat"), (10, "dog")]
    assert prompt_schedule("[cat:dog:15]", 20, hires_steps=10) == [(10, "dog")]  # switched in the first pass
    assert prompt_schedule("[cat:dog:40]", 20, hires_steps=10) == [(10, "cat")]  # after the end: never
    assert prompt_schedule("[cat:dog:1.25]", 20, hires_steps=8) == [(2, "cat"), (8, "dog")]
    assert prompt_schedule("[cat|dog]", 20, hires_steps=3) == [(1, "cat"), (2, "dog"), (3, "cat")]
    # without hires_steps nothing changes
    assert prompt_schedule("[cat:dog:0.5]", 10) == [(5, "cat"), (10, "dog")]


def test_hires_pass_conditions_on_the_continued_timeline(tiny_components):
    from danqing.conditioning.schedule import ConditioningContext, build_conditioning
    from danqing.editing.hires import second_pass_request

    comps = tiny_components["tiny-sd1"]
    req = GenerationRequest(prompt="a [red:blue:1.5] circle", steps=6, hr_second_pass_steps=4, enable_hr=True,
                            hr_scale=1.5, width=64, height=64, cfg_scale=1.0)
    req2 = second_pass_request(req)
    encoder = ConditioningContext().text_encoder(comps)
    sched = build_conditioning(encoder, req2, batch=1, first_pass_steps=req.steps)
    assert sched.ends == [2, 4]
    assert torch.equal(sched.conds[0].context, encoder.encode("a red circle").hidden)
    assert torch.equal(sched.conds[1].context, encoder.encode("a blue circle").hidden)
    first = build_conditioning(encoder, req, batch=1)  # the first pass: 1.5 is past its end
    assert first.ends == [6] and torch.equal(first.conds[0].context, encoder.encode("a red circle").hidden)


# ---------------------------------------------------------------------------------------------
# the batch loop and the result type
# ---------------------------------------------------------------------------------------------
def test_batches_seed_each_image_and_stop_after_an_interrupted_batch():
    req = GenerationRequest(prompt="x", seed=100, subseed=7, batch_size=2, batch_count=3)
    batches = Batches(req, torch.device("cpu"))
    seen = []
    for batch in batches:
        seen.append(batch.index)
        assert len(batch.generators) == 2 and batch.count == 3
        assert torch.equal(torch.randn(3, generator=batch.generators[1]),
                           torch.randn(3, generator=torch.Generator().manual_seed(batch.seeds[1])))
        batches.record(batch, SampleResult(torch.zeros(2, 4, 1, 1), interrupted=batch.index == 1))
    out = batches.result
    assert seen == [0, 1] and out.interrupted and len(out.latents) == 2
    assert out.seeds == [100, 101, 102, 103] and out.subseeds == [7, 8, 9, 10]
    twice = next(iter(Batches(req, "cpu", repeat=2)))
    assert len(twice.generators) == 4  # Prompt-to-Prompt: each seed for a source and its edit


def test_finish_pictures_notes_each_warning_once():
    pics = [Image.new("RGB", (4, 4)) for _ in range(3)]
    warnings = ["earlier"]
    out = finish_pictures(pics, lambda im: (im.convert("L").convert("RGB"), ["no face"]), warnings)
    assert len(out) == 3 and warnings == ["earlier", "no face"]
    assert finish_pictures(pics, None, warnings) == pics


# ---------------------------------------------------------------------------------------------
# structure: no import circle through the passes, no ambient request state
# ---------------------------------------------------------------------------------------------
def test_no_import_circle_through_the_passes():
    graph = import_graph()  # the reader of tests/test_structure.py (top-level and function-level imports)
    rooms = {"danqing.studio", "danqing.passes.batches", "danqing.passes.txt2img", "danqing.passes.refiner",
             "danqing.editing.img2img", "danqing.editing.hires", "danqing.editing.p2p", "danqing.editing.inversion",
             "danqing.editing.instruct", "danqing.conditioning.text", "danqing.conditioning.schedule",
             "danqing.customise.embeddings", "danqing.customise.ip_adapter"}

    def reaches(start: str, goal: str) -> bool:
        todo, seen = [start], set()
        while todo:
            m = todo.pop()
            for n in graph.get(m, ()):
                if n == goal:
                    return True
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return False

    circles = sorted(m for m in rooms if reaches(m, m))
    assert circles == [], f"modules on an import circle: {circles}"
    for low in ("danqing.conditioning.schedule", "danqing.conditioning.text", "danqing.passes.batches"):
        assert not {m for m in graph[low] if m.startswith(("danqing.studio", "danqing.editing"))}, low


def test_no_context_variables_carry_request_state():
    users = [p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "contextvars" in p.read_text()]
    assert users == []


def test_importing_danqing_changes_no_umask(tmp_path):
    code = ("import os\ncalls = []\nreal = os.umask\nos.umask = lambda m: calls.append(m) or real(m)\n"
            "import danqing.outputs.store, danqing.studio, danqing.apps\nassert calls == [], calls\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_saved_files_take_the_umask_as_open_does(tmp_path):
    from danqing.outputs.store import save_png, save_text

    old = os.umask(0o027)
    try:
        png = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", "text")
        txt = save_text("x", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(png.stat().st_mode) == stat.S_IMODE(txt.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# QueuedStudio: Studio.generate's signature and result through the job queue
# ---------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self):
        self.submitted = []

    def submit(self, request, *, source, save):
        self.submitted.append((request, save))
        return SimpleNamespace(id="j1")

    def wait(self, job_id, timeout=None):
        request, _ = self.submitted[-1]
        return SimpleNamespace(id=job_id, status="done", error=None, result={
            "images": [{"path": None, "seed": request.seed, "subseed": request.subseed, "infotext": "text"}],
            "interrupted": False, "warnings": ["w"], "timings": {"total": 0.1}, "request": request.model_dump()})

    def take_images(self, job_id):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
        return [buf.getvalue()]


def test_queued_studio_honours_init_image_and_returns_a_generation_result(tmp_path):
    from danqing.apps import QueuedStudio
    from danqing.studio import GenerationResult

    stored = []

    def save_upload(image, kind):
        path = tmp_path / f"{kind}.png"
        image.save(path)
        stored.append(kind)
        return str(path)

    state = SimpleNamespace(settings=None, worker=_Worker(), server=SimpleNamespace(sync_timeout_s=5),
                            save_upload=save_upload)
    queued = QueuedStudio(state)
    req = GenerationRequest(prompt="a red circle", seed=3, subseed=4, width=64, height=64)
    init = Image.new("RGB", (64, 64), (0, 0, 255))
    result = queued.generate(req, init_image=init, mask_image=Image.new("L", (64, 64), 255))
    sent, _ = state.worker.submitted[-1]
    assert stored == ["init", "mask"]
    assert sent.init_image == str(tmp_path / "init.png") and sent.mask == str(tmp_path / "mask.png")
    assert isinstance(result, GenerationResult)
    assert result.seeds == [3] and result.subseeds == [4] and result.infotexts == ["text"]
    assert result.request.init_image == sent.init_image and result.warnings == ["w"]
    assert result.images[0].getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(InvalidRequest, match="on_step"):
        queued.generate(req, on_step=lambda info: None)
    with pytest.raises(InvalidRequest, match="out_dir"):
        queued.generate(req, out_dir=tmp_path)
