"""Experiment (2026-11-22): the trainer with pos-weighted BCE + dice in place of its focal loss (monkeypatched).

Result, 9 min on an idle 2-core CPU, from scratch: val box mIoU 0.018 (step 353) -> 0.144 (step 716), 1-point 0.189;
train IoU 0.29 and rising. The old recipe stayed at 0.016 for 1,600 steps. Next: make this the trainer default and retrain.
"""
import sys, time, torch, torch.nn.functional as F
import napari_sam.core.training.trainer as T
from napari_sam.core.training.losses import dice_loss, mask_iou
def bce_dice(logits, target, iou_pred, focal_weight=20.0, dice_weight=1.0, iou_weight=1.0, weight=None, **kw):
    target = target.expand_as(logits)
    pos = target.mean(dim=(-1, -2), keepdim=True).clamp(min=1e-3)
    w = torch.where(target > 0.5, (1 - pos) / pos, torch.ones_like(target))
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).flatten(2).mean(-1) / 2
    return dice_loss(logits, target) + bce, iou_weight * (iou_pred - mask_iou(logits, target)) ** 2
T.sam_loss = bce_dice
from napari_sam.cli import main
sys.exit(main(["train", "--images", "/work/shared/data/dsb2018_full", "--split-csv", "/work/shared/data/dsb2018_full/split.csv",
  "--split", "train", "--val-split", "val", "--val-limit", "6", "--model", "nsam_t", "--mode", "scratch", "--out", "/tmp/exp_bce",
  "--steps", "100000", "--max-minutes", "9", "--lr", "1e-3", "--warmup", "50", "--objects", "8", "--threads", "2",
  "--eval-every-min", "4", "--ckpt-every-min", "10", "--no-resume"]))
