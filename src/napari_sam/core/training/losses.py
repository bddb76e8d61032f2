"""Losses of the SAM recipe: focal + dice on mask logits, MSE between predicted and actual IoU.

All functions take logits and targets of shape (B, K, H, W) (K masks per object) and return per-mask
losses (B, K) so the caller can pick the lowest-loss mask of a multimask output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               weight: torch.Tensor | None = None, balanced: bool = False) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels -> (B, K). ``target`` is float 0/1.

    ``weight`` (B, 1, H, W): a weighted mean instead (e.g. 1 in a window around the object, 0 elsewhere).
    ``balanced``: no alpha; the mean over object pixels and the mean over background pixels count half each
    (a model that cannot yet tell them apart is pushed to p = 0.5, not to all-background).
    """
    target = target.expand_as(logits)
    if balanced:
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = (ce * (1 - p_t) ** gamma).flatten(2)
        w = (weight if weight is not None else torch.ones_like(target[:, :1])).expand_as(logits).flatten(2)
        t = target.expand_as(logits).flatten(2)
        pos = (loss * w * t).sum(-1) / (w * t).sum(-1).clamp(min=1e-6)
        neg = (loss * w * (1 - t)).sum(-1) / (w * (1 - t)).sum(-1).clamp(min=1e-6)
        return 0.5 * (pos + neg)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    if weight is not None:
        w = weight.expand_as(loss).flatten(2)
        return (loss.flatten(2) * w).sum(-1) / w.sum(-1).clamp(min=1e-6)
    return loss.flatten(2).mean(-1)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the object pixels up-weighted to balance the background -> (B, K).

    Each object pixel weighs (1 - f) / f, with f the object's share of the mask (at least 0.1 %), each
    background pixel 1, so object and background contribute equally; the mean over pixels is halved.
    Trained from scratch on nuclei (< 1 % of an image), the paper's focal loss drives every logit to
    background before the model can tell a nucleus from its surroundings; this loss does not (see
    ``benchmarks/exp_bce_loss.py`` and the model card).
    """
    target = target.expand_as(logits)
    f = target.mean(dim=(-1, -2), keepdim=True).clamp(min=1e-3)
    w = torch.where(target > 0.5, (1 - f) / f, torch.ones_like(target))
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).flatten(2).mean(-1) / 2


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice coefficient of sigmoid(logits) vs target -> (B, K)."""
    p = torch.sigmoid(logits).flatten(2)
    t = target.flatten(2)
    num = 2 * (p * t).sum(-1) + eps
    den = p.sum(-1) + t.sum(-1) + eps
    return 1 - num / den


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with target > 0.5 -> (B, K), no gradient; empty vs empty counts as 1."""
    with torch.no_grad():
        pred = (logits > 0).flatten(2)
        t = (target > 0.5).flatten(2)
        inter = (pred & t).sum(-1).float()
        union = (pred | t).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def roi_weight(target: torch.Tensor, margin_frac: float = 0.5, min_margin: int = 4) -> torch.Tensor:
    """(B, 1, H, W) weights: 1 in each object's box grown by max(``min_margin``, ``margin_frac`` x side), else 0.

    Small nuclei cover < 1 % of an image; a focal loss averaged over the whole image drives a model trained
    from scratch to all-background. Averaged over this window (positives ~ 20-50 %) it does not.
    """
    t = target[:, 0] > 0.5
    b, h, w = t.shape
    rows, cols = t.any(2), t.any(1)
    ar_h, ar_w = torch.arange(h, device=t.device), torch.arange(w, device=t.device)
    y0 = torch.where(rows, ar_h, h).min(-1).values
    y1 = torch.where(rows, ar_h, -1).max(-1).values
    x0 = torch.where(cols, ar_w, w).min(-1).values
    x1 = torch.where(cols, ar_w, -1).max(-1).values
    my = torch.clamp((margin_frac * (y1 - y0 + 1)).long(), min=min_margin)
    mx = torch.clamp((margin_frac * (x1 - x0 + 1)).long(), min=min_margin)
    in_r = (ar_h[None] >= (y0 - my)[:, None]) & (ar_h[None] <= (y1 + my)[:, None])
    in_c = (ar_w[None] >= (x0 - mx)[:, None]) & (ar_w[None] <= (x1 + mx)[:, None])
    return (in_r[:, :, None] & in_c[:, None, :]).float()[:, None]


def sam_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor, focal_weight: float = 20.0,
             dice_weight: float = 1.0, iou_weight: float = 1.0,
             weight: torch.Tensor | None = None, balanced: bool = False,
             pixel_loss: str = "focal") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask mask loss (B, K) and per-mask IoU MSE (B, K).

    ``pixel_loss="focal"`` (the paper): focal_weight * focal + dice_weight * dice; ``"wbce"``:
    :func:`weighted_bce` + dice_weight * dice (focal_weight, ``weight`` and ``balanced`` are not used).
    logits (B, K, H, W); target (B, 1 or K, H, W) float; iou_pred (B, K); ``weight`` (B, 1, H, W) optional
    focal weights (:func:`roi_weight`); dice is always over the whole mask.
    """
    if pixel_loss not in ("focal", "wbce"):
        raise ValueError(f"unknown pixel_loss {pixel_loss!r}; use 'focal' (the paper's) or 'wbce'")
    target = target.expand_as(logits)
    mask = dice_weight * dice_loss(logits, target)
    if pixel_loss == "wbce":
        mask = mask + weighted_bce(logits, target)
    elif focal_weight > 0:
        mask = mask + focal_weight * focal_loss(logits, target, weight=weight, balanced=balanced)
    iou_mse = iou_weight * (iou_pred - mask_iou(logits, target)) ** 2
    return mask, iou_mse
