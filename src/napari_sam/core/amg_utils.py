"""Pure helpers for automatic mask generation: point grids, crop boxes, stability, boxes, NMS, clean-up.

Everything here speaks (row, col): points are (row, col), boxes are (min_row, min_col, max_row, max_col).
Mask boxes computed from pixels use *inclusive* maxima internally (as the reference's ``batched_mask_to_box``,
which keeps NMS identical); records convert them to exclusive maxima (``image[r0:r1, c0:c1]``).
No torchvision, no OpenCV: NMS is greedy in numpy/torch, connected components come from scipy.ndimage.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


# ------------------------------------------------------------------ point grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) (row, col) points in [0, 1], cell centres, columns varying fastest (the reference's order)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    rows = np.repeat(side, n_per_side)
    cols = np.tile(side, n_per_side)
    return np.stack([rows, cols], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One normalised grid per crop layer; layer i has int(n_per_side / scale_per_layer**i) points per side."""
    return [build_point_grid(max(1, int(n_per_side / (scale_per_layer**i)))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """Crop boxes (min_row, min_col, max_row, max_col), max exclusive, and their layer index.

    Layer 0 is the whole image; layer i has (2**i)**2 overlapping crops (the reference's geometry).
    Degenerate (empty) crops of tiny images are dropped.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [(0, 0, im_h, im_w)], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):  # the reference's order: x outer, y inner
            box = (y0, x0, min(y0 + crop_h, im_h), min(x0 + crop_w, im_w))
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                boxes.append(box)
                layers.append(i_layer + 1)
    return boxes, layers


# ------------------------------------------------------------------ scores
def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``; (N, h, w) -> (N,).

    An all-background mask (empty union) scores 0.
    """
    inter = (logits > (mask_threshold + offset)).flatten(1).sum(-1, dtype=torch.int32)
    union = (logits > (mask_threshold - offset)).flatten(1).sum(-1, dtype=torch.int32)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros((), dtype=torch.float32))


# ------------------------------------------------------------------ boxes and NMS
def box_area(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) boxes -> (N,) (max_row - min_row) * (max_col - min_col), the reference's formula."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, as torchvision's ``nms``: drops boxes with IoU > threshold.

    boxes (N, 4) float, scores (N,). Returns int64 indices of kept boxes by decreasing score (ties: lower index).
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    b = np.asarray(boxes, dtype=np.float64)[order]
    area = box_area(b)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(n):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = slice(i + 1, n)
            lt_r = np.maximum(b[i, 0], b[rest, 0])
            lt_c = np.maximum(b[i, 1], b[rest, 1])
            rb_r = np.minimum(b[i, 2], b[rest, 2])
            rb_c = np.minimum(b[i, 3], b[rest, 3])
            inter = np.clip(rb_r - lt_r, 0, None) * np.clip(rb_c - lt_c, 0, None)
            iou = inter / (area[i] + area[rest] - inter)
            suppressed[rest] |= iou > iou_threshold
    return order[np.asarray(keep, dtype=np.int64)]


def is_box_near_crop_edge(boxes: np.ndarray, crop_box, orig_box, atol: float = 20.0) -> np.ndarray:
    """(N,) True where a box (inclusive max, image frame) lies within ``atol`` px of a crop edge that is not
    also an image edge (such masks are probably cut by the crop)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    crop = np.asarray(crop_box, dtype=np.float64)[None]
    orig = np.asarray(orig_box, dtype=np.float64)[None]
    near_crop = np.abs(boxes - crop) <= atol
    near_image = np.abs(boxes - orig) <= atol
    return np.any(near_crop & ~near_image, axis=1)


# ------------------------------------------------------------------ small regions
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str,
                         open_sides: tuple[bool, bool, bool, bool] = (False, False, False, False)
                         ) -> tuple[np.ndarray, bool]:
    """Remove islands (mode "islands") or fill holes (mode "holes") smaller than ``area_thresh`` pixels.

    8-connectivity, as the reference's OpenCV version. If every island is small, the largest is kept.
    ``mask`` may be a patch of a larger image: ``open_sides`` (top, left, bottom, right) marks patch sides that
    continue into the image; background touching them is outside the object, never a hole.
    Returns (new mask, changed).
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', not {mode!r}")
    holes = mode == "holes"
    work = ~mask if holes else mask
    lab, n = ndimage.label(work, structure=_EIGHT)
    if n == 0:
        return mask, False
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if holes:
        top, left, bottom, right = open_sides
        edge = []
        if top:
            edge.append(lab[0])
        if bottom:
            edge.append(lab[-1])
        if left:
            edge.append(lab[:, 0])
        if right:
            edge.append(lab[:, -1])
        if edge:
            ids = np.unique(np.concatenate(edge))
            small[ids[ids > 0] - 1] = False
        if not small.any():
            return mask, False
        fill = np.concatenate([[False], small])
        return mask | fill[lab], True
    if not small.any():
        return mask, False
    keep = ~small
    if not keep.any():
        keep[int(np.argmax(sizes))] = True
    return np.concatenate([[False], keep])[lab], True
