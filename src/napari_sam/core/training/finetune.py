"""Fine-tuning a model on a lab's own labelled images (the paper's data engine), as a generator.

Decoder-only by default: the image encoder is frozen and each image is embedded once, so a few hundred steps
run in minutes on a laptop CPU. ``mode="full"`` trains every weight (slower; GPU advised).
The defaults (300 steps at lr 1e-4) were chosen on ISBI EM slices 0-4 -> 5-6 with the built-in model (box + 1-point
mIoU, against 150 / 300 steps at 3e-4 / 1e-4 / 3e-5); benchmarks/finetune_isbi.py then scores slices 7-9.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from ..image import denoise_of, max_upscale_of
from ..modeling.sam import Sam
from .data import from_arrays
from .trainer import TrainConfig, Trainer

FINETUNE_DEFAULTS = TrainConfig(mode="decoder", steps=300, lr=1e-4, warmup_steps=10, focal_ramp_steps=0,
                                objects_per_image=16, max_click_iters=3, click_prob=0.5, augment=False,
                                ckpt_every_s=1e12, eval_every_s=0, log_every=10)


def finetune_iter(model: Sam, images: list[np.ndarray] | np.ndarray, labels: list[np.ndarray] | np.ndarray,
                  steps: int = FINETUNE_DEFAULTS.steps, mode: str = "decoder", lr: float | None = None,
                  seed: int = 0, **overrides) -> Iterator[dict]:
    """Fine-tune ``model`` in place on (image, instance labels) pairs; yields progress records.

    images / labels: 2D arrays (H, W[, 3]) and (H, W) int labels, lists of them, or (Z, H, W) stacks (slices
    without labels are skipped). Yields {"phase": "embedding", "done", "total"} while images are embedded,
    then {"phase": "train", "step", "total", "loss", ...} after every step. Close the generator to cancel;
    the model keeps the weights of the last finished step and is left in eval mode.
    Raises :class:`~napari_sam.core.training.data.DataError` for bad or empty labels. The images are prepared with
    the model's preprocessing (``denoise``, ``max_upscale``), as at inference. ``steps`` must be an int >= 1 and
    ``lr`` (None: the default) a finite number > 0, else ValueError.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}; e.g. steps={FINETUNE_DEFAULTS.steps}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating))
                           or not math.isfinite(lr) or lr <= 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}; e.g. lr={FINETUNE_DEFAULTS.lr} (the default)")
    samples = from_arrays(images, labels, model.img_size, denoise_of(model), max_upscale_of(model))  # as at inference
    cfg = replace(FINETUNE_DEFAULTS, mode=mode, steps=int(steps), lr=FINETUNE_DEFAULTS.lr if lr is None else float(lr),
                  seed=seed, augment=mode != "decoder", **overrides)
    yield {"phase": "embedding", "done": 0, "total": len(samples)}
    trainer = Trainer(model, samples, cfg)
    yield {"phase": "embedding", "done": len(samples), "total": len(samples)}
    for rec in trainer.iter_fit():
        yield {"phase": "train", **rec}


def finetune(model: Sam, images, labels, steps: int = FINETUNE_DEFAULTS.steps, mode: str = "decoder",
             **kw) -> list[dict]:
    """Run :func:`finetune_iter` to the end; returns the per-step records."""
    return [r for r in finetune_iter(model, images, labels, steps, mode, **kw) if r["phase"] == "train"]
