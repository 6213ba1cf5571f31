"""Parity bounds that scale with the tensors they compare.

float32 results differ between CPUs (SIMD width, thread count, the order of a sum): each
operation may round differently in its last bits, and what accumulates over a sampling loop is
proportional to the size of the values, not a fixed amount. So parity is asserted as
``max|ours - ref| <= rtol * max|ref|``: a correct loop passes on any CPU, while a real divergence
(a step off, a missing term) moves the result by a sizeable fraction of its scale and fails.
Absolute bounds stay where they are right, each with its reason beside it (uint8 pixels: one
level is the rounding of two floats that differ in their last bits).
"""

from __future__ import annotations

import numpy as np
import torch

RTOL = 1e-4  # the default: float32 has 24 bits (6e-8); a loop of tens of UNet calls stays far inside


def _max_abs(x) -> float:
    if isinstance(x, torch.Tensor):
        return x.detach().abs().max().item() if x.numel() else 0.0
    x = np.asarray(x, dtype=np.float64)
    return float(np.abs(x).max()) if x.size else 0.0


def scaled_diff(ours, ref) -> float:
    """max|ours - ref| / max|ref| (0 when both are all zeros)."""
    if isinstance(ours, torch.Tensor) and isinstance(ref, torch.Tensor):
        diff = _max_abs(ours.detach().double() - ref.detach().double())
    else:
        diff = _max_abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    scale = _max_abs(ref)
    return diff / scale if scale else (0.0 if diff == 0 else float("inf"))


def assert_close_scaled(ours, ref, rtol: float = RTOL, what: str = "") -> float:
    """Assert ``max|ours - ref| <= rtol * max|ref|``; returns the scaled difference.

    Args:
        ours, ref: tensors or arrays of the same shape (``ref`` the reference).
        rtol: the allowed difference as a fraction of the reference's largest magnitude.
        what: a label for the failure message.
    """
    assert tuple(np.shape(ours)) == tuple(np.shape(ref)), f"{what}: shapes {np.shape(ours)} vs {np.shape(ref)}"
    rel = scaled_diff(ours, ref)
    assert rel <= rtol, (f"{what + ': ' if what else ''}max |ours - ref| = {rel * _max_abs(ref):.3g} is "
                         f"{rel:.3g} x max |ref| ({_max_abs(ref):.3g}); allowed {rtol:g} x")
    return rel
