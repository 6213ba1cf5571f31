"""Measuring how well a picture keeps a control map's structure."""

from __future__ import annotations

import numpy as np


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> dict:
    """Edge F1 with a distance tolerance (the BSDS boundary benchmark's idea, Martin et al. 2004,
    with a square neighbourhood instead of a one-to-one matching).

    precision = share of predicted edge pixels within ``tolerance`` pixels of a target edge,
    recall = share of target edge pixels within ``tolerance`` of a predicted one,
    F1 = 2PR / (P + R) (0 when either map is empty).

    Args:
        pred, target: (H, W) edge maps of the same size; nonzero (or > 127 for uint8) = edge.
    """
    import cv2

    p = (pred > 127) if pred.dtype == np.uint8 else pred > 0
    t = (target > 127) if target.dtype == np.uint8 else target > 0
    if p.shape != t.shape:
        raise ValueError(f"edge maps differ in size: {p.shape} vs {t.shape}")
    k = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    t_near = cv2.dilate(t.astype(np.uint8), k) > 0
    p_near = cv2.dilate(p.astype(np.uint8), k) > 0
    precision = float((p & t_near).sum() / p.sum()) if p.any() else 0.0
    recall = float((t & p_near).sum() / t.sum()) if t.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def canny_map(image, low: int = 100, high: int = 200) -> np.ndarray:
    """(H, W) uint8 Canny edges of an RGB PIL picture (OpenCV, as the canny preprocessor)."""
    import cv2

    return cv2.Canny(np.asarray(image.convert("RGB")), low, high)
