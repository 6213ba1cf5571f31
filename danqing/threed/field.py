"""The 3D field: a dense voxel grid of density and albedo in the box [-1, 1]^3.

A dense grid rather than a hash grid or a triplane + MLP: at 64x64 renders a 32^3-64^3 grid
holds more detail than the pictures can show, one trilinear lookup (``F.grid_sample``) per
sample point is the cheapest field to evaluate and differentiate on a CPU, and marching cubes
reads the density grid directly. The recipe is DVGO's / Plenoxels' (Sun et al. 2022; Fridovich-
Keil et al. 2022): a raw grid, an activation, a total-variation prior for smoothness. DreamFusion's
density "blob" (Poole et al. 2022, appendix A.2) is a fixed bias added to the raw density, so an
object starts at the centre of the scene.

Grids are stored (1, C, D, H, W) with W along x, H along y, D along z, so that a point (x, y, z)
is also ``grid_sample``'s (x, y, z) coordinate; index i of an axis sits at -1 + 2 i / (R - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def voxel_centres(res: int) -> torch.Tensor:
    """(R, R, R, 3) world coordinates (x, y, z) of every grid point, indexed [z, y, x]."""
    axis = torch.linspace(-1.0, 1.0, res)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def blob(points: torch.Tensor, strength: float, radius: float) -> torch.Tensor:
    """DreamFusion's density bias: strength * exp(-|x|^2 / (2 radius^2)), for (..., 3) points."""
    return strength * torch.exp(-(points**2).sum(-1) / (2 * radius**2))


class VoxelField(nn.Module):
    """Density and albedo on a dense ``res``^3 grid, with an occupancy grid for sampling.

    sigma(x) = softplus(raw(x) + blob(x)) * density_scale; albedo(x) = sigmoid(c(x)).

    Args:
        res: grid points per axis.
        density_scale: density per unit length of softplus(.) = 1 (a 64-sample ray through the
            box takes about 0.03 per sample, so 25 makes a voxel of raw value 3 nearly opaque).
        blob_strength, blob_radius: the density bias (0 strength: none).
        init_density: the raw density away from the blob (softplus(-7) * 25 = 0.02: clear air).
    """

    def __init__(self, res: int = 48, *, density_scale: float = 25.0, blob_strength: float = 10.0,
                 blob_radius: float = 0.25, init_density: float = -7.0):
        super().__init__()
        self.res = res
        self.density_scale = density_scale
        self.density = nn.Parameter(torch.full((1, 1, res, res, res), float(init_density)))
        self.albedo = nn.Parameter(torch.zeros(1, 3, res, res, res))
        bias = blob(voxel_centres(res), blob_strength, blob_radius) if blob_strength else torch.zeros(res, res, res)
        self.register_buffer("bias", bias[None, None], persistent=False)
        self.register_buffer("occupancy", torch.ones(res, res, res, dtype=torch.bool), persistent=False)

    # -- the grids ------------------------------------------------------------------------------
    def raw_density(self) -> torch.Tensor:
        """(1, 1, R, R, R) pre-activation density, blob included."""
        return self.density + self.bias

    def sigma_grid(self) -> torch.Tensor:
        """(R, R, R) density at the grid points, indexed [z, y, x]."""
        return F.softplus(self.raw_density())[0, 0] * self.density_scale

    def features(self, normals: bool = True) -> torch.Tensor:
        """(1, C, R, R, R): raw density, albedo logits and, with ``normals``, the density's
        gradient (x, y, z) by central differences -- one ``grid_sample`` reads them all."""
        raw = self.raw_density()
        parts = [raw, self.albedo]
        if normals:
            dz, dy, dx = torch.gradient(raw[0, 0], spacing=2.0 / (self.res - 1))
            parts.append(torch.stack([dx, dy, dz])[None])
        return torch.cat(parts, dim=1)

    def query(self, points: torch.Tensor, normals: bool = True, feats: torch.Tensor | None = None):
        """Density, albedo and normals at (N, 3) points in [-1, 1]^3.

        Returns:
            sigma (N,), albedo (N, 3) in [0, 1], normal (N, 3) unit vectors pointing out of the
            surface (minus the density gradient) or None without ``normals``.
        """
        feats = self.features(normals) if feats is None else feats
        grid = points.view(1, -1, 1, 1, 3).to(feats.dtype)
        v = F.grid_sample(feats, grid, mode="bilinear", align_corners=True)[0, :, :, 0, 0].t()  # (N, C)
        sigma = F.softplus(v[:, 0]) * self.density_scale
        albedo = torch.sigmoid(v[:, 1:4])
        normal = F.normalize(-v[:, 4:7], dim=-1, eps=1e-6) if normals else None
        return sigma, albedo, normal

    # -- sampling and priors --------------------------------------------------------------------
    @torch.no_grad()
    def update_occupancy(self, threshold: float = 0.5) -> float:
        """Mark the cells whose density (or a neighbour's) exceeds ``threshold``: the renderer
        evaluates the field only there. Returns the occupied fraction."""
        occ = (self.sigma_grid() > threshold).float()[None, None]
        self.occupancy = F.max_pool3d(occ, 3, stride=1, padding=1)[0, 0] > 0
        return float(self.occupancy.float().mean())

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the nearest grid point of each (N, 3) point is occupied."""
        idx = ((points.clamp(-1, 1) + 1) * 0.5 * (self.res - 1)).round().long()
        return self.occupancy[idx[:, 2], idx[:, 1], idx[:, 0]]

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference of neighbouring voxels of both raw grids (DVGO's smoothness
        prior; the albedo's weighs as the density's)."""
        tv = 0.0
        for g in (self.density, self.albedo):
            for dim in (2, 3, 4):
                tv = tv + g.diff(dim=dim).pow(2).mean()
        return tv
