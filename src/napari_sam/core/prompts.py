"""Prompt validation and the one conversion between napari/numpy (row, col) and SAM (x, y).

Public API coordinates are always (row, col); box prompts are (min_row, min_col, max_row, max_col) with max
inclusive: (max_row, max_col) is the last pixel inside the box, so a mask's tight box is (rows.min(), cols.min(),
rows.max(), cols.max()), as the reference's training and evaluation boxes. (Segment-everything records' ``bbox``
is the other convention, max exclusive: see :mod:`napari_sam.core.amg`.)
:func:`rc_to_xy` is the only place in the code base that swaps axes.
"""

from __future__ import annotations

import numpy as np


def rc_to_xy(coords: np.ndarray) -> np.ndarray:
    """(..., 2) (row, col) -> (..., 2) (x, y) as float64. Boxes: pass them as (..., 2, 2) corners."""
    coords = np.asarray(coords, dtype=np.float64)
    return coords[..., ::-1].copy()


def validate_points(points, point_labels, image_shape: tuple[int, int], clip: bool = True):
    """Check points (N, 2) or (B, N, 2) in (row, col) and labels (N,) or (B, N).

    Returns float64 points and int64 labels, both with a batch axis. Points outside the image raise a
    ValueError unless ``clip`` is True, in which case they are clipped to the nearest pixel (documented).
    Labels: 1 positive, 0 negative.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1 and pts.shape[0] == 2:
        pts = pts[None]
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (N, 2) or (B, N, 2) as (row, col); got {np.shape(points)}")
    if pts.shape[0] == 0 or pts.shape[1] == 0:
        raise ValueError(f"points has shape {np.shape(points)}: no object or no point; pass at least one (row, col) "
                         "point per object, or points=None")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points contain NaN or inf; pass finite (row, col) coordinates")
    if point_labels is None:
        labels = np.ones(pts.shape[:2], dtype=np.int64)
    else:
        labels = np.asarray(point_labels)
        if labels.ndim == 1:
            labels = labels[None]
        if labels.shape != pts.shape[:2]:
            raise ValueError(
                f"point_labels has shape {np.shape(point_labels)} but points has {pts.shape[1]} point(s) "
                f"per object; give one label (1 positive, 0 negative) per point"
            )
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError("point_labels must be 1 (positive) or 0 (negative)")
        labels = labels.astype(np.int64)
        if labels.shape[0] != pts.shape[0]:
            labels = np.broadcast_to(labels, pts.shape[:2]).copy()
    h, w = image_shape
    outside = (pts[..., 0] < -0.5) | (pts[..., 0] > h - 0.5) | (pts[..., 1] < -0.5) | (pts[..., 1] > w - 0.5)
    if outside.any():
        if not clip:
            bad = pts[outside][0]
            raise ValueError(f"point {tuple(bad)} (row, col) lies outside the image of shape {(h, w)}")
        pts = pts.copy()
        pts[..., 0] = np.clip(pts[..., 0], 0, h - 1)
        pts[..., 1] = np.clip(pts[..., 1], 0, w - 1)
    return pts, labels


def validate_boxes(box, image_shape: tuple[int, int]) -> np.ndarray:
    """Box (4,) or (B, 4) as (min_row, min_col, max_row, max_col), max inclusive -> (B, 4) float64, clipped to
    the image (0 .. H - 1, 0 .. W - 1)."""
    b = np.asarray(box, dtype=np.float64)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError("box must have shape (4,) or (B, 4) as (min_row, min_col, max_row, max_col); "
                         f"got {np.shape(box)}")
    if b.shape[0] == 0:
        raise ValueError("box has shape (0, 4): no object; pass at least one box, or box=None")
    if not np.all(np.isfinite(b)):
        raise ValueError("box contains NaN or inf")
    if np.any(b[:, 0] > b[:, 2]) or np.any(b[:, 1] > b[:, 3]):
        raise ValueError("box has min > max; order it as (min_row, min_col, max_row, max_col)")
    h, w = image_shape
    if np.any(b[:, 2] < 0) | np.any(b[:, 3] < 0) | np.any(b[:, 0] > h - 1) | np.any(b[:, 1] > w - 1):
        raise ValueError(f"box lies entirely outside the image of shape {(h, w)}")
    b = b.copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, h - 1)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, w - 1)
    return b


def boxes_rc_to_xy(boxes: np.ndarray) -> np.ndarray:
    """(B, 4) (min_row, min_col, max_row, max_col) -> (B, 4) (x0, y0, x1, y1) via :func:`rc_to_xy`."""
    return rc_to_xy(np.asarray(boxes).reshape(-1, 2, 2)).reshape(-1, 4)
