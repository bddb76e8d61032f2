"""The paper's interactive prompt simulation, batched over objects, in the model's input frame.

Coordinates are SAM (x, y) pixels of the resized (longest side = img_size) image. Masks are (B, H, W) bool
tensors. Randomness comes from an explicit ``torch.Generator`` so a resumed run repeats exactly.
"""

from __future__ import annotations

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
    noise = torch.randn(box.shape, generator=gen, device=box.device) * std_frac * side
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
