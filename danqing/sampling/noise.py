"""Initial noise: one generator per image, drawn on the CPU by default so a seed gives the same
image on every device; A1111's variation seed ("subseed") slerped in."""

from __future__ import annotations

import torch


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between noise tensors (A1111 ``slerp``; Shoemake 1985).

    Falls back to linear interpolation when a and b are (nearly) parallel.
    """
    a_n = a / a.norm()
    b_n = b / b.norm()
    dot = (a_n * b_n).sum()
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / so * a + torch.sin(t * omega) / so * b


def make_generators(seeds: list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def initial_noise(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    *,
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, image i from ``generators[i]``.

    Args:
        shape: (C, h, w) of one latent.
        generators: one per image; they keep advancing afterwards (ancestral step noise).
        subseeds: variation seeds, one per image; used when ``subseed_strength`` > 0.
        subseed_strength: 0 = only the seed, 1 = only the variation seed.
    """
    out = []
    for i, gen in enumerate(generators):
        n = torch.randn((1, *shape), generator=gen, device=gen.device)
        if subseeds is not None and subseed_strength > 0:
            sub_gen = torch.Generator(gen.device).manual_seed(int(subseeds[i]))
            n = slerp(subseed_strength, n, torch.randn((1, *shape), generator=sub_gen, device=gen.device))
        out.append(n)
    return torch.cat(out)
