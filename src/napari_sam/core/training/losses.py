"""Losses of the SAM recipe: focal + dice on mask logits, MSE between predicted and actual IoU.

All functions take logits and targets of shape (B, K, H, W) (K masks per object) and return per-mask
losses (B, K) so the caller can pick the lowest-loss mask of a multimask output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels -> (B, K). ``target`` is float 0/1."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)


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


def sam_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor, focal_weight: float = 20.0,
             dice_weight: float = 1.0, iou_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask mask loss (B, K) = focal_weight * focal + dice_weight * dice, and per-mask IoU MSE (B, K).

    logits (B, K, H, W); target (B, 1 or K, H, W) float; iou_pred (B, K).
    """
    target = target.expand_as(logits)
    mask = dice_weight * dice_loss(logits, target)
    if focal_weight > 0:
        mask = mask + focal_weight * focal_loss(logits, target)
    iou_mse = iou_weight * (iou_pred - mask_iou(logits, target)) ** 2
    return mask, iou_mse
