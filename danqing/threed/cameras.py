"""Cameras as DreamFusion samples them, view-dependent prompt suffixes, rays.

The world is z-up; a camera at azimuth a, elevation e and distance d sits at
d (cos e cos a, cos e sin a, sin e) and looks at the origin. Azimuth 0 looks at the object's
front (from +x). The ranges, the presets and the suffix rules are data
(``danqing/data/threed.json``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources

import torch

from danqing.errors import InvalidRequest


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The text-to-3D table (``danqing/data/threed.json``)."""
    return json.loads(resources.files("danqing").joinpath("data/threed.json").read_text(encoding="utf-8"))


def camera_presets() -> list[str]:
    return [k for k in table()["cameras"] if not k.startswith("_")]


def preset(name: str) -> dict:
    """A camera preset by name; an unknown one lists the known ones."""
    if name not in camera_presets():
        raise InvalidRequest("cameras", f"unknown camera preset {name!r}; known: {', '.join(camera_presets())}")
    return table()["cameras"][name]


def preset_for_model(model: str) -> str:
    """The camera preset a model's pictures call for (the shapes world's for danqing-tiny)."""
    return table()["model_cameras"].get(model, "dreamfusion")


def defaults_for_model(model: str) -> dict:
    """The options a model's runs take when a request leaves them unset (``model_defaults``)."""
    rows = table()["model_defaults"]
    return {**rows["default"], **rows.get(model, {})}


@dataclass(frozen=True)
class Camera:
    """A pinhole camera looking at the origin. Angles in degrees."""

    azimuth: float
    elevation: float
    distance: float
    fov: float

    def position(self) -> torch.Tensor:
        a, e = math.radians(self.azimuth), math.radians(self.elevation)
        return self.distance * torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


def _uniform(lo_hi, g: torch.Generator) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_camera(ranges: dict, g: torch.Generator) -> Camera:
    """One camera with azimuth, elevation, distance and field of view uniform in the preset's
    ranges (DreamFusion, appendix A.2)."""
    return Camera(_uniform(ranges["azimuth"], g), _uniform(ranges["elevation"], g),
                  _uniform(ranges["distance"], g), _uniform(ranges["fov"], g))


def turntable(ranges: dict, frames: int) -> list[Camera]:
    """``frames`` cameras around the object at the preset's turntable elevation, front first."""
    t = ranges["turntable"]
    return [Camera(360.0 * i / frames, t["elevation"], t["distance"], t["fov"]) for i in range(frames)]


def view_name(camera: Camera) -> str:
    """"front", "side", "back" or "overhead" (DreamFusion's view-dependent prompting)."""
    v = table()["views"]
    if camera.elevation > v["overhead_above"]:
        return "overhead"
    a = (camera.azimuth + 180.0) % 360.0 - 180.0  # (-180, 180]
    if abs(a) <= v["front_half_width"]:
        return "front"
    if abs(a) >= 180.0 - v["back_half_width"]:
        return "back"
    return "side"


def view_prompt(prompt: str, view: str) -> str:
    """The prompt with its view suffix: "a red ball, front view"."""
    return f"{prompt}, {table()['views']['suffixes'][view]}"


def random_light(camera: Camera, g: torch.Generator) -> torch.Tensor:
    """A unit light direction near the camera's (DreamFusion samples the light around the
    camera so that the visible side is lit)."""
    pos = camera.position()
    jitter = torch.randn(3, generator=g) * 0.5 * camera.distance
    return torch.nn.functional.normalize(pos + jitter, dim=0)


def rays(camera: Camera, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions of the ``size`` x ``size`` pixel centres, row by row from the
    top: two (size * size, 3) tensors."""
    eye = camera.position()
    forward = torch.nn.functional.normalize(-eye, dim=0)
    up = torch.tensor([0.0, 0.0, 1.0])
    if abs(float(forward @ up)) > 0.999:  # straight above or below: any horizontal "up" will do
        up = torch.tensor([-1.0, 0.0, 0.0])
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up), dim=0)
    cam_up = torch.linalg.cross(right, forward)
    half = math.tan(math.radians(camera.fov) / 2)
    s = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in (-1, 1)
    v, u = torch.meshgrid(s, s, indexing="ij")
    dirs = forward + half * (u[..., None] * right - v[..., None] * cam_up)  # (size, size, 3)
    dirs = torch.nn.functional.normalize(dirs.reshape(-1, 3), dim=-1)
    return eye.expand_as(dirs), dirs
