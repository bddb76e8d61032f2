"""The paper's interactive prompt simulation, batched over objects, in the model's input frame.

Coordinates are SAM (x, y) pixels of the resized (longest side = img_size) image. Masks are (B, H, W) bool
tensors. Randomness comes from an explicit ``torch.Generator`` so a resumed run repeats exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def _sample_pixels(region: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly random pixel of each region (B, H, W) -> (x, y) float (B, 2) and ``valid`` (B,).

    Empty regions get the image centre and valid False.
    """
    b, h, w = region.shape
    nz = region.reshape(b, -1).nonzero()  # (K, 2) sorted by batch index
    counts = torch.bincount(nz[:, 0], minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(b, generator=gen).to(region.device)
    pick = starts + (u * counts).long().clamp(max=(counts - 1).clamp(min=0))
    valid = counts > 0
    flat = torch.where(valid, nz[pick.clamp(max=max(len(nz) - 1, 0)), 1] if len(nz) else pick,
                       torch.full_like(pick, (h // 2) * w + w // 2))
    xy = torch.stack([flat % w, flat // w], dim=-1).float()
    return xy, valid


def sample_points(masks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One positive point uniformly inside each mask -> (B, 1, 2) (x, y)."""
    xy, _ = _sample_pixels(masks, gen)
    return xy[:, None, :]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (B, 4) (x0, y0, x1, y1) of non-empty masks (B, H, W), inclusive pixel indices."""
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(-1).values
    y1 = torch.where(rows, ar_h, -1).max(-1).values
    x0 = torch.where(cols, ar_w, w).min(-1).values
    x1 = torch.where(cols, ar_w, -1).max(-1).values
    return torch.stack([x0, y0, x1, y1], dim=-1).float()


def noisy_boxes(masks: torch.Tensor, gen: torch.Generator, std_frac: float = 0.1, max_noise: float = 20.0,
                limit: tuple[int, int] | None = None) -> torch.Tensor:
    """Tight boxes with per-coordinate Gaussian noise of std ``std_frac`` x side, clipped to +-``max_noise`` px."""
    box = mask_boxes(masks)
    side = torch.stack([box[:, 2] - box[:, 0] + 1, box[:, 3] - box[:, 1] + 1] * 2, dim=-1)
    noise = torch.randn(box.shape, generator=gen).to(box.device) * std_frac * side  # gen: a CPU generator
    box = box + noise.clamp(-max_noise, max_noise)
    h, w = limit if limit is not None else masks.shape[1:]
    box[:, 0::2] = box[:, 0::2].clamp(0, w - 1)
    box[:, 1::2] = box[:, 1::2].clamp(0, h - 1)
    lo = torch.minimum(box[:, :2], box[:, 2:])
    hi = torch.maximum(box[:, :2], box[:, 2:])
    return torch.cat([lo, hi], dim=-1)


def corrective_clicks(pred: torch.Tensor, gt: torch.Tensor, gen: torch.Generator,
                      scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A click uniformly in each object's error region: a missed pixel -> positive (1), an extra one -> negative (0).

    pred, gt: (B, h, w) bool (possibly at a lower resolution than the model input; ``scale`` maps their pixel
    indices to input pixels). Returns points (B, 1, 2) (x, y) and labels (B, 1). Where there is no error
    (a perfect mask), the click is a positive one inside the object.
    """
    err = pred ^ gt
    xy, valid = _sample_pixels(err, gen)
    fallback, _ = _sample_pixels(gt, gen)
    xy = torch.where(valid[:, None], xy, fallback)
    b = torch.arange(gt.shape[0], device=gt.device)
    xi, yi = xy[:, 0].long(), xy[:, 1].long()
    label = gt[b, yi, xi].long()  # inside the object -> it was missed -> positive
    label = torch.where(valid, label, torch.ones_like(label))
    xy = (xy + 0.5) * scale - 0.5
    return xy[:, None, :], label[:, None]


# ------------------------------------------------------------------ negative-click lessons
# The paper's corrective clicks put a negative point only on the false-positive pixels of one object, so a model
# trained on them never sees the two situations a user meets most: the mask has taken in a neighbouring object,
# or the user wants less of the object than the model gave. These helpers build both lessons.


def nearest_neighbours(labels: np.ndarray, ids: np.ndarray, min_px: int = 16, reach: float = 3.0) -> np.ndarray:
    """For each id in ``ids``, the id of the nearest other object of ``labels`` (H, W) int, or 0 if none is near.

    "Near": centroid distance at most ``reach`` x (r_a + r_b), with r the radius of a disc of the object's
    area. Objects under ``min_px`` pixels are not candidates. Returns (len(ids),) int64.
    """
    n = int(labels.max()) + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n).astype(np.float64)
    rr, cc = np.divmod(np.arange(flat.size), labels.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rr, minlength=n) / area
        cx = np.bincount(flat, weights=cc, minlength=n) / area
    cand = np.nonzero(area >= min_px)[0]
    cand = cand[cand != 0]
    out = np.zeros(len(ids), dtype=np.int64)
    if cand.size < 2:
        return out
    rad = np.sqrt(area / np.pi)
    for k, a in enumerate(np.asarray(ids)):
        d = np.hypot(cy[cand] - cy[a], cx[cand] - cx[a])
        d[cand == a] = np.inf
        j = int(np.argmin(d))
        if d[j] <= reach * (rad[a] + rad[cand[j]]):
            out[k] = cand[j]
    return out


def _dist2(masks: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Squared distance (B, H, W) of every pixel of the grid of ``masks`` (B, H, W) to ``xy`` (B, 2) (x, y)."""
    h, w = masks.shape[1:]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)[:, None]
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)[None, :]
    return (xs[None] - xy[:, 0, None, None]) ** 2 + (ys[None] - xy[:, 1, None, None]) ** 2


def far_points(masks: torch.Tensor, from_xy: torch.Tensor, gen: torch.Generator,
               min_frac: float = 0.6) -> torch.Tensor:
    """A random pixel of each mask (B, H, W) whose distance to ``from_xy`` (B, 2) (x, y) is at least ``min_frac``
    of the mask's largest such distance -> (B, 2) (x, y). Empty masks give ``from_xy``."""
    d2 = _dist2(masks, from_xy)
    d2 = torch.where(masks, d2, torch.full_like(d2, -1.0))
    dmax = d2.flatten(1).max(1).values
    region = masks & (d2 >= (min_frac ** 2) * dmax[:, None, None])
    xy, valid = _sample_pixels(region, gen)
    return torch.where(valid[:, None], xy, from_xy)


def split_toward(masks: torch.Tensor, keep_xy: torch.Tensor, drop_xy: torch.Tensor) -> torch.Tensor:
    """The part of each mask (B, H, W) bool nearer to ``keep_xy`` than to ``drop_xy`` (B, 2) (x, y): what a
    positive click at ``keep_xy`` and a negative one at ``drop_xy`` inside the same object ask for."""
    return masks & (_dist2(masks, keep_xy) < _dist2(masks, drop_xy))
