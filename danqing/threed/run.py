"""One text-to-3D run: the request, the optimisation loop, checkpoints and resume.

Every random draw of step N (camera, light, shading, sample jitter, timestep, noise) comes from
a generator seeded with (seed, N), and a checkpoint holds the field, the background, the
optimiser and the occupancy grid, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from danqing.errors import InvalidRequest
from danqing.files import atomic_save
from danqing.threed.cameras import (camera_presets, defaults_for_model, preset, preset_for_model, random_light, sample_camera,
                                    table, view_name)
from danqing.threed.field import VoxelField
from danqing.threed.render import Background, render_view, to_picture
from danqing.threed.sds import Guide, timestep_bounds

CHECKPOINT_FORMAT = "danqing-3d/1"
BACKGROUNDS = {"learned": None, "white": (1.0, 1.0, 1.0), "grey": (0.5, 0.5, 0.5), "black": (0.0, 0.0, 0.0)}
# field -> (low, high, what is allowed, in words)
RANGES = {
    "steps": (1, 100000, "between 1 and 100000"),
    "size": (32, 512, "between 32 and 512 pixels"),
    "seed": (0, 2**32 - 1, f"between 0 and {2**32 - 1}"),
    "guidance": (1.0, 500.0, "between 1 and 500"),
    "lr": (1e-5, 1.0, "between 0.00001 and 1"),
    "grid": (16, 160, "between 16 and 160 points per axis"),
    "samples": (8, 512, "between 8 and 512 per ray"),
    "tv_weight": (0.0, 1e4, "between 0 and 10000"),
    "frames": (4, 120, "between 4 and 120"),
    "checkpoint_every": (0, 100000, "0 (never) or a number of steps"),
}
NOT_IN_FINGERPRINT = ("steps", "checkpoint_every", "frames")  # a resumed run may change these


@dataclass(frozen=True)
class ThreeDRequest:
    """A text-to-3D run, checked at construction; its JSON is written beside the mesh.

    Attributes:
        prompt, negative_prompt: what the model is asked for.
        model: checkpoint name (None: the settings' default model).
        steps: optimisation steps; size: render side in pixels (upscaled to the model's own size
            before encoding); seed: all randomness of the run.
        guidance: the CFG scale of score distillation (DreamFusion: 100).
        lr: Adam's learning rate on the grids; grid: voxel grid points per axis; samples: per ray.
        cameras: a camera preset of ``danqing/data/threed.json`` (None: the model's own).
        view_prompts: add "front view", "side view", ... to the prompt by camera (None: the model's
            default, ``model_defaults`` in ``danqing/data/threed.json``).
        background: "learned" (an MLP of the ray direction) or a fixed colour: white, grey, black
            (None: the model's default).
        tv_weight: weight of the grids' total-variation prior.
        frames: turntable frames; checkpoint_every: steps between checkpoints (0: only at the end).
    """

    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    steps: int = 400
    size: int = 64
    seed: int = 0
    guidance: float = 100.0
    lr: float = 0.05
    grid: int = 48
    samples: int = 48
    cameras: str | None = None
    view_prompts: bool | None = None
    background: str | None = None
    tv_weight: float = 1.0
    frames: int = 16
    checkpoint_every: int = 100

    def __post_init__(self):
        if not self.prompt.strip():
            raise InvalidRequest("prompt", "give a prompt: what the object should look like")
        for name, (lo, hi, words) in RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise InvalidRequest(name, f"must be {words}, got {value}")
        if self.size % 8:
            raise InvalidRequest("size", f"must be a multiple of 8, got {self.size}")
        if self.cameras is not None:
            preset(self.cameras)
        if self.background is not None and self.background not in BACKGROUNDS:
            raise InvalidRequest("background", f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")

    def replace(self, **changes) -> "ThreeDRequest":
        return ThreeDRequest(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    # the job queue's view of a request (``server/store.py``): one picture-less run, as JSON
    batch_size = 1
    batch_count = 1
    init_image = None

    def model_dump(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def model_validate_json(cls, text: str) -> "ThreeDRequest":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "ThreeDRequest":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_model_defaults(self) -> "ThreeDRequest":
        """The request with every option it left unset (None) taken from its model's defaults."""
        unset = {k: v for k, v in defaults_for_model(self.model or "").items() if getattr(self, k) is None}
        return self.replace(**unset) if unset else self

    def camera_preset(self) -> str:
        return self.cameras or preset_for_model(self.model or "")

    def fingerprint(self, model_hash: str = "") -> str:
        """What makes two runs the same run (everything but steps, checkpoint_every, frames)."""
        same = {k: v for k, v in asdict(self).items() if k not in NOT_IN_FINGERPRINT}
        return hashlib.sha256(json.dumps([same, model_hash], sort_keys=True).encode()).hexdigest()[:16]


def check_size(size: int, guide_native: int, model: str) -> None:
    """A render size the model can take: a multiple of 8 up to the model's own picture size."""
    if size > guide_native:
        raise InvalidRequest("size", f"{model} draws {guide_native}x{guide_native} pictures; render sizes it takes "
                             f"are multiples of 8 from 32 to {guide_native}, got {size}")


@dataclass
class StepReport:
    """Handed to ``on_step`` after every step; ``preview()`` renders the front view (a PIL picture)."""

    step: int
    total: int
    loss: float
    preview: Callable[[], object]


@dataclass
class RunResult:
    field: VoxelField
    background: Background
    request: ThreeDRequest
    steps_done: int
    seconds: float
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of ``step`` (resume reproduces a run exactly)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def pick_shading(step: int, steps: int, g: torch.Generator) -> str:
    """Albedo only during the warm-up, then a draw from the table's shading probabilities."""
    s = table()["shading"]
    if step < s["warmup_fraction"] * steps:
        return "albedo"
    names, probs = zip(*s["choices"].items())
    return names[int(torch.multinomial(torch.tensor(probs), 1, generator=g))]


def build(request: ThreeDRequest, device="cpu") -> tuple[VoxelField, Background, torch.optim.Optimizer]:
    """The field, the background and their optimiser, on ``device`` (the model's)."""
    request = request.with_model_defaults()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(request.seed)  # the background MLP's initial weights
        bg = Background(BACKGROUNDS[request.background]).to(device)
    fld = VoxelField(request.grid).to(device)
    opt = torch.optim.Adam([{"params": fld.parameters()}, {"params": bg.parameters(), "lr": request.lr * 0.2}],
                           lr=request.lr, betas=(0.9, 0.99), eps=1e-15)
    return fld, bg, opt


def load_checkpoint(path: Path, request: ThreeDRequest, model_hash: str) -> dict:
    """A checkpoint of this very run, or a one-line refusal."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InvalidRequest("resume", f"{path}: no such checkpoint") from None
    except Exception as exc:  # pickle and zip errors of many kinds
        raise InvalidRequest("resume", f"{path} is not a danqing 3d checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidRequest("resume", f"{path} is not a danqing 3d checkpoint")
    if state["fingerprint"] != request.fingerprint(model_hash):
        other = json.loads(state["request"])
        diff = [k for k, v in request.to_dict().items() if k not in NOT_IN_FINGERPRINT and other.get(k) != v]
        what = ", ".join(f"{k}={other.get(k)!r}" for k in diff) or "another model file"
        raise InvalidRequest("resume", f"{path} is from another run ({what}); resume only the run that wrote it")
    return state


def save_checkpoint(path: Path, request: ThreeDRequest, model_hash: str, step: int, fld: VoxelField, bg: Background,
                    opt, seconds: float) -> None:
    state = {"format": CHECKPOINT_FORMAT, "fingerprint": request.fingerprint(model_hash),
             "request": json.dumps(request.to_dict()), "step": step, "seconds": seconds,
             "field": fld.state_dict(), "occupancy": fld.occupancy.clone(), "background": bg.state_dict(),
             "optimizer": opt.state_dict()}
    atomic_save(path, lambda p: torch.save(state, p), overwrite=True)


def optimise(comps, request: ThreeDRequest, *, model_name: str = "", model_hash: str = "",
             on_step: Callable[[StepReport], object] | None = None, checkpoint: Path | None = None,
             resume: Path | None = None) -> RunResult:
    """Optimise a voxel field so that its views look like ``request.prompt`` to ``comps``
    (score distillation; DreamFusion's cameras, shading and view prompts).

    Args:
        comps: loaded, frozen ``Components`` on their device.
        on_step: called after every step; returning False stops the run (a checkpoint is written).
        checkpoint: where checkpoints go (every ``checkpoint_every`` steps, on stop, at the end).
        resume: a checkpoint of this run to continue from.
    """
    request = request.with_model_defaults()
    guide = Guide(comps, request.prompt, request.negative_prompt, guidance=request.guidance,
                  view_prompts=request.view_prompts)
    check_size(request.size, guide.native, model_name or "this model")
    ranges = preset(request.camera_preset())
    fld, bg, opt = build(request, guide.device)
    start, spent = 0, 0.0
    if resume is not None:
        state = load_checkpoint(resume, request, model_hash)
        fld.load_state_dict(state["field"])
        fld.occupancy = state["occupancy"].to(guide.device)
        bg.load_state_dict(state["background"])
        opt.load_state_dict(state["optimizer"])
        start, spent = state["step"], state["seconds"]
    t0 = time.perf_counter()
    losses: list[float] = []
    step = start
    try:
        while step < request.steps:
            step, stop = _step(step, request, guide, fld, bg, opt, ranges, losses)
            seconds = spent + time.perf_counter() - t0
            if on_step is not None:
                report = StepReport(step, request.steps, losses[-1], lambda: preview(fld, bg, request, ranges))
                stop = on_step(report) is False
            if checkpoint is not None and (stop or step == request.steps
                                           or (request.checkpoint_every and step % request.checkpoint_every == 0)):
                save_checkpoint(checkpoint, request, model_hash, step, fld, bg, opt, seconds)
            if stop:
                return RunResult(fld, bg, request, step, seconds, True, losses)
    except KeyboardInterrupt:  # a stopped run keeps its last finished step
        if checkpoint is not None and step > start:
            save_checkpoint(checkpoint, request, model_hash, step, fld, bg, opt, spent + time.perf_counter() - t0)
        raise
    return RunResult(fld, bg, request, step, spent + time.perf_counter() - t0, False, losses)


def _step(step: int, request: ThreeDRequest, guide: Guide, fld: VoxelField, bg: Background, opt, ranges: dict,
          losses: list[float]) -> tuple[int, bool]:
    """One optimisation step: a random camera, light and shading, one render, its SDS loss."""
    g = step_generator(request.seed, step)
    if step % 16 == 0:
        fld.update_occupancy()
    cam = sample_camera(ranges, g)
    shading = pick_shading(step, request.steps, g)
    light = random_light(cam, g)
    view = render_view(fld, bg, cam, request.size, samples=request.samples, shading=shading, light=light,
                       ambient=table()["shading"]["ambient"], generator=g)
    lo, hi = timestep_bounds(step, request.steps, guide.n_train)
    t = int(torch.randint(lo, hi + 1, (), generator=g))
    noise = torch.randn((1, *guide.latent_shape()), generator=g)
    loss = guide.loss(view.image(), view_name(cam), t, noise)
    total = loss + request.tv_weight * fld.total_variation()
    # gradients for the field and the background only: the model's own parameters never get one
    params = [p for group in opt.param_groups for p in group["params"]]
    for p, grad in zip(params, torch.autograd.grad(total, params, allow_unused=True)):
        p.grad = grad
    opt.step()
    losses.append(float(loss.detach()))
    return step + 1, False


@torch.no_grad()
def preview(fld: VoxelField, bg: Background, request: ThreeDRequest, ranges: dict):
    """The front view of the turntable as a PIL picture."""
    from danqing.threed.cameras import turntable

    cam = turntable(ranges, 1)[0]
    return to_picture(render_view(fld, bg, cam, request.size, samples=request.samples).image())


__all__ = ["RunResult", "StepReport", "ThreeDRequest", "camera_presets", "check_size", "optimise"]
