"""Volume rendering of a ``VoxelField`` (Max 1995; NeRF, Mildenhall et al. 2020), with
DreamFusion's shading and a background model.

Along each ray through the box [-1, 1]^3, ``samples`` points are taken between the box's entry
and exit (jittered while training). Only the points in occupied cells of the field's occupancy
grid are evaluated; the others count as empty space. Then

    alpha_i = 1 - exp(-sigma_i delta_i),  T_i = prod_{j<i} (1 - alpha_j),  w_i = T_i alpha_i
    C = sum_i w_i c_i + (1 - sum_i w_i) background(d)

Shading of a point (DreamFusion, section 3.1): "albedo" c = rho; "lambertian"
c = rho (a + (1 - a) max(0, n . l)); "textureless" the same with rho = 1 (white).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from danqing.threed.cameras import Camera, rays
from danqing.threed.field import VoxelField

SHADINGS = ("albedo", "lambertian", "textureless")


class Background(nn.Module):
    """The colour seen where a ray leaves the box: a small MLP of the ray direction (DreamFusion's
    environment map), or a fixed colour.

    Args:
        colour: None for the learned background, or an RGB triple in [0, 1].
        hidden: width of the MLP.
    """

    FREQS = 3

    def __init__(self, colour: tuple[float, float, float] | None = None, hidden: int = 16):
        super().__init__()
        self.fixed = colour is not None
        self.register_buffer("colour", torch.tensor(colour if colour is not None else (1.0, 1.0, 1.0)))
        width = 3 + 6 * self.FREQS
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 3))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        """(N, 3) unit directions -> (N, 3) colours in [0, 1]."""
        if self.fixed:
            return self.colour.expand_as(dirs)
        enc = [dirs] + [f(dirs * 2**k * math.pi) for k in range(self.FREQS) for f in (torch.sin, torch.cos)]
        return torch.sigmoid(self.mlp(torch.cat(enc, dim=-1)))


@dataclass
class Rendered:
    """One rendered view: ``rgb`` (N, 3) and ``opacity`` (N,) per ray; ``image()`` reshapes."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    size: int | None = None

    def image(self) -> torch.Tensor:
        """(1, 3, size, size) in [0, 1]."""
        return self.rgb.t().reshape(1, 3, self.size, self.size)


def box_hits(origins: torch.Tensor, dirs: torch.Tensor):
    """Entry and exit distances of rays through [-1, 1]^3 (slab method) and whether they hit."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-1 - origins) * inv, (1 - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far, far > near


def shade(albedo: torch.Tensor, normal: torch.Tensor | None, shading: str, light: torch.Tensor | None,
          ambient: float) -> torch.Tensor:
    """(N, 3) colours of (N, 3) albedos under ``shading`` with a unit light direction."""
    if shading == "albedo":
        return albedo
    diffuse = (normal @ light).clamp(min=0)[:, None]  # (N, 1): n . l
    lit = ambient + (1 - ambient) * diffuse
    return lit.expand_as(albedo) if shading == "textureless" else albedo * lit


def render_rays(field: VoxelField, background: Background, origins: torch.Tensor, dirs: torch.Tensor, *,
                samples: int = 64, shading: str = "albedo", light: torch.Tensor | None = None,
                ambient: float = 0.3, generator: torch.Generator | None = None,
                use_occupancy: bool = True) -> Rendered:
    """Render (N, 3) rays. ``generator`` jitters the sample positions (training); None places
    them at the centres of their intervals.

    Args:
        shading: "albedo", "lambertian" or "textureless" (the last two need ``light``).
    """
    n, dev = origins.shape[0], origins.device
    near, far, hit = box_hits(origins, dirs)
    far = torch.where(hit, far, near)
    offset = torch.rand(n, samples, generator=generator).to(dev) if generator is not None \
        else torch.full((n, samples), 0.5, device=dev)
    frac = (torch.arange(samples, dtype=torch.float32, device=dev) + offset) / samples
    t = near[:, None] + (far - near)[:, None] * frac  # (N, S)
    delta = ((far - near) / samples)[:, None].expand(n, samples)
    points = origins[:, None] + dirs[:, None] * t[..., None]  # (N, S, 3)
    flat = points.reshape(-1, 3)
    keep = hit[:, None].expand(n, samples).reshape(-1)
    if use_occupancy:
        keep = keep & field.occupied(flat)
    idx = keep.nonzero().squeeze(1)
    sigma = torch.zeros(n * samples, device=dev)
    colour = torch.zeros(n * samples, 3, device=dev)
    if idx.numel():
        s, albedo, normal = field.query(flat[idx], normals=shading != "albedo")
        sigma = sigma.index_put((idx,), s)
        light = light.to(dev) if light is not None else None
        colour = colour.index_put((idx,), shade(albedo, normal, shading, light, ambient))
    alpha = 1 - torch.exp(-sigma.view(n, samples) * delta)
    trans = torch.cumprod(torch.cat([torch.ones(n, 1, device=dev), 1 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
    weights = alpha * trans  # (N, S)
    opacity = weights.sum(1)
    rgb = (weights[..., None] * colour.view(n, samples, 3)).sum(1) + (1 - opacity)[:, None] * background(dirs)
    return Rendered(rgb, opacity)


def render_view(field: VoxelField, background: Background, camera: Camera, size: int, **kwargs) -> Rendered:
    """Render a ``size`` x ``size`` view (``render_rays``'s keyword arguments) on the field's device."""
    origins, dirs = (x.to(field.density.device) for x in rays(camera, size))
    out = render_rays(field, background, origins, dirs, **kwargs)
    out.size = size
    return out


def to_picture(image: torch.Tensor):
    """(1, 3, H, W) in [0, 1] -> an RGB PIL picture."""
    from PIL import Image

    arr = (image[0].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)

