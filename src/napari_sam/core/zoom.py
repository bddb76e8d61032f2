"""Zoomed decoding: prompts on small objects of a large image are decoded from a window of the image encoded at the
scale the model was trained on, instead of from the whole image shrunk to the model's input.

A model trained on 256-px images enlarged to its 512-px input sees the nuclei of a 1024-px image at a quarter of
that scale when the whole image is shrunk to 512 px. With a ``zoom_window`` of 256 image pixels, a prompt whose
extent fits in half a window is decoded from the 256-px window around it, enlarged 2x like the training images
(see :meth:`napari_sam.core.predictor.SamPredictor.predict`). Window embeddings are computed on demand and cached
with the image's embedding.

Coordinates are napari/numpy (row, col) image pixels; a window is (min_row, min_col, max_row, max_col), max
exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

#: window origins snap to multiples of window / SNAP, so nearby prompts share a window (and its embedding)
SNAP = 8
#: the low-res logit given to the parts of a resampled mask input that its old window did not see
OUTSIDE_LOGIT = -20.0

Window = tuple[int, int, int, int]


def check_zoom_window(value) -> int | None:
    """Validate a ``zoom_window`` setting (the window side in image pixels, >= 16; None or 0 = off) -> int or None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"zoom_window={value!r} must be a number of image pixels (e.g. 256), or None / 0 for off") \
            from None
    if v == 0:
        return None
    if not np.isfinite(v) or v < 16 or v != int(v):
        raise ValueError(f"zoom_window={value!r} must be a whole number of image pixels >= 16 (e.g. 256), "
                         "or None / 0 for off")
    return int(v)


def check_windows(windows, shape: tuple[int, int]) -> np.ndarray:
    """Validate ``mask_windows`` (a previous prediction's ``windows``): (4,) or (B, 4) whole numbers (min_row,
    min_col, max_row, max_col), max exclusive, inside an image of ``shape`` (H, W). Returns (B, 4) int64."""
    try:
        w = np.asarray(windows, dtype=np.float64)
    except (TypeError, ValueError):
        w = np.full(1, np.nan)
    if w.ndim not in (1, 2) or w.shape[-1] != 4 or w.size == 0:
        raise ValueError(f"mask_windows has shape {np.shape(windows)}; pass the `windows` of the prediction whose "
                         "low_res_logits are the mask_input: (4,) or (B, 4) (min_row, min_col, max_row, max_col)")
    w = w.reshape(-1, 4)
    h, wd = shape
    if not (np.isfinite(w).all() and (w == np.round(w)).all() and (w[:, :2] >= 0).all() and (w[:, 0] < w[:, 2]).all()
            and (w[:, 1] < w[:, 3]).all() and (w[:, 2] <= h).all() and (w[:, 3] <= wd).all()):
        raise ValueError(f"mask_windows {np.asarray(windows).tolist()} are not windows of this image {tuple(shape)}: "
                         "whole numbers (min_row, min_col, max_row, max_col), max exclusive, inside the image; pass "
                         "the `windows` of the prediction whose low_res_logits are the mask_input")
    return w.astype(np.int64)


def zoom_window_of(model) -> int | None:
    """The model's ``zoom_window`` (None: prompts are always decoded from the whole image, as the reference does)."""
    return getattr(model, "zoom_window", None) or None


@dataclass(eq=False)
class ZoomSource:
    """What zoomed decoding needs beside the whole-image embedding: the preprocessed image ``rgb`` (H, W, 3)
    uint8, the window side ``window`` in image pixels, and the window embeddings computed so far (``cache``,
    keyed by window)."""

    rgb: np.ndarray
    window: int
    cache: dict = field(default_factory=dict)


def prompt_extents(points: np.ndarray | None, boxes: np.ndarray | None, nb: int) -> np.ndarray:
    """(nb, 4) float (min_row, min_col, max_row, max_col) spanned by each object's points (B, N, 2) (row, col)
    and box (B, 4); every object has at least one of them."""
    parts = []
    if points is not None:
        p = np.broadcast_to(points, (nb,) + points.shape[1:])
        parts.append(np.concatenate([p.min(1), p.max(1)], 1))
    if boxes is not None:
        parts.append(np.broadcast_to(boxes, (nb, 4)))
    ext = parts[0].astype(np.float64)
    for q in parts[1:]:
        ext = np.concatenate([np.minimum(ext[:, :2], q[:, :2]), np.maximum(ext[:, 2:], q[:, 2:])], 1)
    return ext


def choose_window(extent, shape: tuple[int, int], side: int) -> Window | None:
    """The window of side ``side`` (clipped to the image ``shape`` (H, W)) for a prompt spanning ``extent``
    (min_row, min_col, max_row, max_col), or None (decode from the whole image) when the extent is larger than
    half a window. The window is centred on the extent with its origin snapped to multiples of side / SNAP, so
    the prompt keeps at least side / 4 - side / (2 * SNAP) pixels from every window edge inside the image."""
    r0, c0, r1, c1 = (float(v) for v in extent)
    if max(r1 - r0, c1 - c0) > side / 2:
        return None
    step = max(side // SNAP, 1)

    def axis(lo: float, hi: float, n: int) -> tuple[int, int]:
        if n <= side:
            return 0, n
        o = int(round(((lo + hi) / 2 - side / 2) / step)) * step
        o = min(max(o, 0), n - side)
        return o, o + side

    a0, a1 = axis(r0, r1, shape[0])
    b0, b1 = axis(c0, c1, shape[1])
    return a0, b0, a1, b1


def fits(extent, window: Window, shape: tuple[int, int], side: int) -> bool:
    """Whether ``extent`` lies in ``window`` at least side / 8 pixels from each window edge that is not an image
    edge (the test for keeping an object's window as its prompts change)."""
    m = side / 8
    r0, c0, r1, c1 = (float(v) for v in extent)
    w0, w1, w2, w3 = window
    lo_r = w0 if w0 == 0 else w0 + m
    lo_c = w1 if w1 == 0 else w1 + m
    hi_r = w2 if w2 == shape[0] else w2 - m
    hi_c = w3 if w3 == shape[1] else w3 - m
    return r0 >= lo_r and c0 >= lo_c and r1 <= hi_r and c1 <= hi_c and max(r1 - r0, c1 - c0) <= side / 2


def resample_logits(low: torch.Tensor, src: tuple, dst: tuple, img_size: int) -> torch.Tensor:
    """Low-res mask logits (n, 1, L, L) of frame ``src`` -> the same mask in frame ``dst`` (bilinear).

    A frame is (row0, col0, h, w, input_h, input_w): the image region (row0, col0, h, w) in image pixels that was
    resized to (input_h, input_w) in the model input, whose L x L logits cover the whole ``img_size`` canvas. Cells of
    ``dst`` outside ``src``'s image region get :data:`OUTSIDE_LOGIT`.
    """
    n, _, L, _ = low.shape
    s_r0, s_c0, s_h, s_w, s_ih, s_iw = src
    d_r0, d_c0, d_h, d_w, d_ih, d_iw = dst
    cell = img_size / L  # input pixels per low-res cell
    k = torch.arange(L, dtype=torch.float64, device=low.device) + 0.5
    rows = d_r0 + k * cell * (d_h / d_ih)  # image coordinates of dst's cell centres
    cols = d_c0 + k * cell * (d_w / d_iw)
    u_r = (rows - s_r0) * (s_ih / s_h) / cell  # src low-res coordinates, cell centres at k + 0.5
    u_c = (cols - s_c0) * (s_iw / s_w) / cell
    ok_r = (rows >= s_r0) & (rows < s_r0 + s_h) & (rows < d_r0 + d_h)
    ok_c = (cols >= s_c0) & (cols < s_c0 + s_w) & (cols < d_c0 + d_w)
    gy, gx = torch.meshgrid(2 * u_r / L - 1, 2 * u_c / L - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1).to(low.dtype)[None].expand(n, -1, -1, -1)
    out = F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ok = (ok_r[:, None] & ok_c[None, :]).to(low.device)
    return torch.where(ok, out, torch.full_like(out, OUTSIDE_LOGIT))
