"""The SAM training loop: interactive prompt simulation, multimask min-loss, IoU head, checkpoint + resume.

Per step: ``images_per_step`` images (groups balanced), one encoder pass each, up to ``objects_per_image``
objects per image decoded in one batch. The first prompt is a positive point (multimask, only the lowest-loss
mask is back-propagated) or a noisy box. In a share ``click_prob`` of the steps, 1..``max_click_iters``
corrective-click iterations and (with p=0.5) one iteration without a new click follow, each fed the previous
low-res logits (detached) as mask input; only the first and the last iteration are back-propagated unless
``grad_all_iters``. This samples the paper's 11-iteration schedule at a CPU-affordable cost. Losses are
computed at ``loss_res`` (default: the 128 px low-res logits themselves, against area-downsampled soft targets):
dice + object-weighted BCE (``pixel_loss="wbce"``, the default) or dice + ``focal_ramp`` * 20 * focal (the
paper's ``"focal"``, which collapses to all-background when training from scratch on small nuclei), plus
MSE(predicted IoU, actual IoU).
"""

from __future__ import annotations

import json
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..build import build_sam, load_model, save_checkpoint
from ..device import resolve_device
from ..image import max_upscale_of
from ..messages import first_line
from ..modeling.sam import Sam
from ..predictor import canvas_input
from .data import Sample
from .losses import mask_iou, roi_weight, sam_loss
from .simulate import (corrective_clicks, far_points, mask_boxes, nearest_neighbours, noisy_boxes, sample_points,
                       split_toward)
from .validate import quick_eval


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad mode)."""


@dataclass
class TrainConfig:
    mode: str = "scratch"  # scratch | full | decoder
    steps: int = 10000
    max_minutes: float | None = None  # time box (training time, kept across resumes)
    lr: float = 1e-3
    min_lr_frac: float = 0.05
    weight_decay: float = 0.01
    warmup_steps: int = 200
    images_per_step: int = 1
    objects_per_image: int = 10
    min_object_px: int = 16  # objects smaller than this (at input size) are not sampled
    max_click_iters: int = 3
    click_prob: float = 0.5  # share of steps that continue with corrective clicks
    grad_all_iters: bool = False  # False: back-propagate the first and the last iteration only (CPU budget)
    edit_prob: float = 0.0  # share of steps that are negative-click lessons (neighbour removal, carving)
    encoder_lr_mult: float = 1.0  # the image encoder's learning rate relative to ``lr``
    point_prob: float = 0.5
    pixel_loss: str = "wbce"  # "wbce" (object-weighted BCE + dice; learns from scratch) or "focal" (the paper's)
    focal_weight: float = 20.0
    focal_ramp_steps: int = 400
    focal_start_iou: float = 0.0  # >0: no focal term until the running mean IoU of first prompts reaches it
    focal_balanced: bool = False  # see losses.focal_loss(balanced=True)
    roi_focal: bool = True  # focal loss averaged over a window around each object (see losses.roi_weight)
    loss_res: int = 128
    augment: bool = True
    zoom_prob: float = 0.0  # share of images zoomed by a log-uniform factor in zoom_range (see zoom_noise_pair)
    zoom_range: tuple[float, float] = (0.6, 1.7)
    noise_prob: float = 0.0  # share of images blurred (sigma <= 1.5 px) and given Gaussian noise (std <= 0.08)
    amp: bool = False  # mixed precision: bfloat16 autocast of the forward passes (GPU; also CPU), fp32 weights + losses
    data_on_device: bool | None = None  # keep the training images on the model's device and augment them there
    #                                     (None: when the model is on an accelerator, where the CPU would starve it)
    balance_groups: bool = True
    seed: int = 0
    ckpt_every_s: float = 300.0
    eval_every_s: float = 600.0
    eval_every_steps: int = 0
    log_every: int = 20


def _lr_factor(frac: float, step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


Pair = tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]


def augment_pair(image: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 rng: np.random.Generator) -> Pair:
    """Random rot90, flip and intensity jitter (gain, offset, gamma) of (h, w, 3) uint8 + (h, w) labels.

    Numpy arrays or tensors (on any device; the same draws of ``rng``, the same result up to float rounding)."""
    k = int(rng.integers(4))
    flip = rng.random() < 0.5
    gamma = float(np.exp(rng.normal(0, 0.25)))
    gain, offset = float(rng.uniform(0.75, 1.25)), float(rng.uniform(-0.08, 0.08))
    if isinstance(image, torch.Tensor):
        image, labels = torch.rot90(image, k, (0, 1)), torch.rot90(labels, k, (0, 1))
        if flip:
            image, labels = image.flip(1), labels.flip(1)
        x = (image.float() / 255.0) ** gamma * gain + offset
        return (x.clamp(0, 1) * 255).to(torch.uint8), labels.contiguous()
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    if flip:
        image, labels = image[:, ::-1], labels[:, ::-1]
    x = (image.astype(np.float32) / 255.0) ** gamma
    x = x * gain + offset
    image = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def zoom_noise_pair(image: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, rng: np.random.Generator,
                    zoom_prob: float = 0.5, zoom_range: tuple[float, float] = (0.6, 1.7),
                    noise_prob: float = 0.3) -> Pair:
    """Scale and image-quality augmentation of an (h, w, 3) uint8 image + (h, w) integer labels.

    With probability ``zoom_prob`` a factor f, log-uniform in ``zoom_range``: f > 1 crops a random
    (h/f, w/f) window and enlarges it back to (h, w); f < 1 shrinks the pair to (f*h, f*w) (the canvas pads it,
    as a small image at inference). Image bilinear (antialiased when shrinking), labels nearest. With probability
    ``noise_prob``: a Gaussian blur (sigma uniform in [0, 1.5] px) then Gaussian noise (std uniform in
    [0.01, 0.08] of the range, the same in every channel). Numpy in, numpy out; tensors stay on their device.
    Objects may leave the window: callers take the object ids from the returned labels."""
    as_np = isinstance(image, np.ndarray)
    img = torch.from_numpy(np.ascontiguousarray(image)) if as_np else image
    lab = torch.from_numpy(np.ascontiguousarray(labels)) if as_np else labels
    h, w = lab.shape
    x = None
    if rng.random() < zoom_prob:
        lo, hi = np.log(zoom_range[0]), np.log(zoom_range[1])
        f = float(np.exp(rng.uniform(lo, hi)))
        if f > 1:
            ch, cw = max(8, round(h / f)), max(8, round(w / f))
            r0, c0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            img, lab, size = img[r0:r0 + ch, c0:c0 + cw], lab[r0:r0 + ch, c0:c0 + cw], (h, w)
        else:
            size = (max(8, round(h * f)), max(8, round(w * f)))
        x = F.interpolate(img.permute(2, 0, 1)[None].float(), size=size, mode="bilinear", align_corners=False,
                          antialias=f < 1)
        lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(lab.dtype)
    if rng.random() < noise_prob:
        sigma, std = float(rng.uniform(0.0, 1.5)), float(rng.uniform(0.01, 0.08))
        gen = torch.Generator(device=img.device).manual_seed(int(rng.integers(2**31)))
        x = img.permute(2, 0, 1)[None].float() if x is None else x
        if sigma >= 0.3:
            r = int(math.ceil(3 * sigma))
            k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=torch.float32) / sigma) ** 2)
            k = (k / k.sum()).repeat(3, 1, 1, 1)
            if min(x.shape[-2:]) > r:
                x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(3, 1, 1, -1), groups=3)
                x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(3, 1, -1, 1), groups=3)
        noise = torch.randn((1, 1, *x.shape[-2:]), generator=gen, device=x.device) * (255.0 * std)
        x = x + noise
    if x is not None:
        img = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).contiguous()
    lab = lab.contiguous()
    return (img.numpy(), lab.numpy()) if as_np else (img, lab)


def _target_at(masks: torch.Tensor, r: int) -> torch.Tensor:
    """Bool masks (B, S, S) at input size -> float (B, 1, r, r) targets: the share of each cell inside the object."""
    t = masks[:, None].float()
    return t if t.shape[-1] == r else F.adaptive_avg_pool2d(t, r)


def _logits_at(low: torch.Tensor, r: int) -> torch.Tensor:
    """Decoder logits (B, K, L, L) -> (B, K, r, r), bilinear, where the loss is taken."""
    return low if low.shape[-1] == r else F.interpolate(low, size=(r, r), mode="bilinear", align_corners=False)


def _to_input(model: Sam, image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A resized sample image -> encoder input, padded as at inference (mirrored with the model's max_upscale)."""
    return canvas_input(model, image, mirror=bool(max_upscale_of(model)))


def _pad_labels(labels: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """(h, w) labels -> (size, size) int32 on ``device``, zero-padded at the bottom and right."""
    out = torch.zeros((size, size), dtype=torch.int32, device=device)
    out[: labels.shape[0], : labels.shape[1]] = torch.as_tensor(labels, device=device)
    return out


class Trainer:
    """Train ``model`` on ``samples`` (validated, resized :class:`Sample` s); evaluate on ``val``.

    ``out_dir`` receives ``last.pt`` (full state for resume), ``best.pt`` (best model by val box + point mIoU,
    a normal checkpoint), ``history.jsonl``. ``progress(info)`` is called every ``log_every`` steps and
    after each evaluation; ``should_stop()`` is polled every step (cancel). ``cfg.mode == "decoder"`` freezes the
    image encoder (``requires_grad`` False, left so afterwards); the other modes make every weight trainable.
    """

    def __init__(self, model: Sam, samples: list[Sample], cfg: TrainConfig, val: list[Sample] | None = None,
                 out_dir: str | Path | None = None, progress: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, meta: dict[str, Any] | None = None) -> None:
        if cfg.pixel_loss not in ("wbce", "focal"):
            raise TrainingError(f"unknown pixel loss {cfg.pixel_loss!r}; use wbce or focal")
        if cfg.mode not in ("scratch", "full", "decoder"):
            raise TrainingError(f"unknown mode {cfg.mode!r}; use scratch, full or decoder")
        if not samples:
            raise TrainingError("no training samples")
        self.model, self.samples, self.cfg, self.val = model, samples, cfg, val or []
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.should_stop, self.meta = progress, should_stop, meta or {}
        self.img_size = model.img_size
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # set both ways: a model object that went through a decoder-only run comes back with a frozen encoder
        train_params = []
        for n, p in model.named_parameters():
            p.requires_grad_(cfg.mode != "decoder" or not n.startswith("image_encoder."))
            if p.requires_grad:
                train_params.append(p)
        enc = {id(p) for p in model.image_encoder.parameters()}
        groups = [{"params": [p for p in train_params if id(p) not in enc], "lr_mult": 1.0}]
        if any(id(p) in enc for p in train_params):
            groups.append({"params": [p for p in train_params if id(p) in enc], "lr_mult": cfg.encoder_lr_mult})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        self.step, self.elapsed, self.best = 0, 0.0, -1.0
        self.iou_ema, self.focal_start = 0.0, (0 if cfg.focal_start_iou <= 0 else None)
        self.history: list[dict] = []
        groups = sorted({s.group for s in samples})
        self.groups = {g: [i for i, s in enumerate(samples) if s.group == g] for g in groups}
        self._embeddings: dict[int, torch.Tensor] = {}
        self._areas = [np.bincount(s.labels.ravel(), minlength=int(s.ids.max()) + 1)[s.ids] for s in samples]
        on_dev = cfg.data_on_device if cfg.data_on_device is not None else model.device.type != "cpu"
        self._on_device: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if on_dev and cfg.mode != "decoder":
            self._on_device = [(torch.tensor(np.ascontiguousarray(s.image)).to(model.device),
                                torch.from_numpy(s.labels).to(model.device)) for s in samples]
        if cfg.mode == "decoder":
            self._cache_embeddings()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "elapsed": self.elapsed, "best": self.best, "rng": self.rng.bit_generator.state,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "history": self.history,
                "cfg": asdict(self.cfg), "config": self.model.config.to_dict(), "iou_ema": self.iou_ema,
                "focal_start": self.focal_start}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step, self.elapsed, self.best = st["step"], st["elapsed"], st["best"]
        self.rng.bit_generator.state = st["rng"]
        self.gen.set_state(st["gen"].cpu())  # (a state loaded onto an accelerator: RNG states must be on the CPU)
        torch.set_rng_state(st["torch_rng"].cpu())
        self.history = list(st["history"])
        self.iou_ema = st.get("iou_ema", 0.0)
        self.focal_start = st.get("focal_start", 0 if self.cfg.focal_start_iou <= 0 else None)
        if self.cfg.focal_start_iou > 0 and self.focal_start is not None and self.iou_ema < self.cfg.focal_start_iou:
            self.focal_start = None  # resumed with an adaptive ramp: wait for the IoU again
        if self.cfg.focal_start_iou <= 0 and self.focal_start is None:
            self.focal_start = self.step  # resumed with a fixed ramp: it starts now

    def save_state(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.out_dir / "last.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``last.pt`` (or ``path``) if it exists; returns whether a state was restored."""
        path = Path(path) if path is not None else (self.out_dir / "last.pt" if self.out_dir else None)
        if path is None or not path.is_file():
            return False
        # on the CPU: the RNG states must stay there; the model and the optimizer move theirs to the weights' device
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise TrainingError(f"cannot resume from {path}: it is damaged or from a run with another model or "
                                f"mode ({first_line(e)}). Start afresh with --no-resume, or choose another --out "
                                "folder") from e
        return True

    # ---------------------------------------------------------------- data
    def _cache_embeddings(self) -> None:
        self.model.image_encoder.eval()
        with torch.no_grad():
            for i, s in enumerate(self.samples):
                self._embeddings[i] = self.model.image_encoder(_to_input(self.model, s.image)).cpu()

    def _pick_images(self) -> list[int]:
        out = []
        keys = list(self.groups)
        for _ in range(self.cfg.images_per_step):
            if self.cfg.balance_groups and len(keys) > 1:
                g = keys[int(self.rng.integers(len(keys)))]
                out.append(self.groups[g][int(self.rng.integers(len(self.groups[g])))])
            else:
                out.append(int(self.rng.integers(len(self.samples))))
        return out

    def _objects(self, i: int) -> np.ndarray:
        """Up to ``objects_per_image`` random ids of sample ``i`` (those of at least ``min_object_px`` pixels)."""
        return self._pick(self.samples[i].ids, self._areas[i])

    def _objects_in(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Up to ``objects_per_image`` random ids present in (augmented) ``labels``, as :meth:`_objects`."""
        counts = torch.bincount(torch.as_tensor(labels).flatten().long()).cpu().numpy()
        counts[0] = 0
        ids = np.flatnonzero(counts)
        return self._pick(ids, counts[ids])

    def _pick(self, ids: np.ndarray, areas: np.ndarray) -> np.ndarray:
        """Up to ``objects_per_image`` of ``ids`` at random, among those of at least ``min_object_px`` pixels
        (all of them when none is that large)."""
        ok = ids[areas >= self.cfg.min_object_px]
        ok = ok if ok.size else ids
        k = min(self.cfg.objects_per_image, ok.size)
        return self.rng.choice(ok, size=k, replace=False) if k else ok

    # ---------------------------------------------------------------- step
    def train_step(self) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        dev = model.device
        idx = self._pick_images()
        imgs, gts, owner, pairs, pads = [], [], [], [], []
        for j, i in enumerate(idx):
            s = self.samples[i]
            image, labels = self._on_device[i] if self._on_device is not None else (s.image, s.labels)
            ids = None
            if cfg.augment and cfg.mode != "decoder":
                image, labels = augment_pair(image, labels, self.rng)
                if cfg.zoom_prob > 0 or cfg.noise_prob > 0:
                    zi, zl = zoom_noise_pair(image, labels, self.rng, cfg.zoom_prob, cfg.zoom_range, cfg.noise_prob)
                    zids = self._objects_in(zl)
                    if zids.size:  # (a window without objects: keep the un-zoomed pair)
                        image, labels, ids = zi, zl, zids
            if ids is None:
                ids = self._objects(i)
            pairs.append((labels, ids))
            lab = _pad_labels(labels, self.img_size, dev)
            pads.append(lab)
            gts.append(lab[None] == torch.as_tensor(ids, device=dev)[:, None, None])
            owner += [j] * len(ids)
            imgs.append(image)
        gt = torch.cat(gts)  # (B, S, S) bool at input size
        owner_t = torch.as_tensor(owner, device=dev)
        edit = cfg.edit_prob > 0 and self.rng.random() < cfg.edit_prob
        if edit:  # the neighbour of each object (0: none near), from the same augmented labels
            nb = torch.cat([torch.as_tensor(nearest_neighbours(np.asarray(torch.as_tensor(lab_j).cpu()), ids_j,
                                                               cfg.min_object_px))
                            for lab_j, ids_j in pairs]).to(dev)
            nb_mask = (torch.stack(pads)[owner_t] == nb[:, None, None]) & (nb[:, None, None] > 0)
        if cfg.mode == "decoder":
            emb = torch.cat([self._embeddings[i] for i in idx]).to(dev)
        else:
            x = torch.cat([_to_input(model, im) for im in imgs])
            with self._autocast():
                emb = model.image_encoder(x)
        emb = emb[owner_t]
        pe = model.prompt_encoder.get_dense_pe()
        if edit:
            return self._edit_step(emb, pe, gt, nb_mask)
        r = cfg.loss_res
        target = _target_at(gt, r)
        gt_r = target[:, 0] > 0.5
        wroi = roi_weight(target) if cfg.roi_focal else None
        scale = self.img_size / r
        if self.focal_start is None:
            ramp = 0.0
        elif cfg.focal_ramp_steps > 0:
            ramp = min(1.0, (self.step - self.focal_start) / cfg.focal_ramp_steps)
        else:
            ramp = 1.0
        use_point = self.rng.random() < cfg.point_prob
        n_click, n_iter = 0, 1
        if cfg.max_click_iters > 0 and self.rng.random() < cfg.click_prob:
            n_click = int(self.rng.integers(1, cfg.max_click_iters + 1))
            n_iter = 1 + n_click + int(self.rng.random() < 0.5)
        if use_point:
            pts, plab, boxes = sample_points(gt, self.gen).to(dev), torch.ones(len(gt), 1, dtype=torch.long,
                                                                                 device=dev), None
        else:
            pts, plab, boxes = None, None, noisy_boxes(gt, self.gen).to(dev)
        mask_in, total, ious, n_grad = None, 0.0, [], 0
        bidx = torch.arange(len(gt), device=dev)
        for it in range(n_iter):
            multi = it == 0 and use_point
            grad = cfg.grad_all_iters or it == 0 or it == n_iter - 1
            with torch.set_grad_enabled(grad):
                with self._autocast():
                    sparse, dense = model.prompt_encoder(points=(pts, plab) if pts is not None else None,
                                                         boxes=boxes, masks=mask_in)
                    low, iou_pred = model.mask_decoder(emb if grad else emb.detach(), pe, sparse, dense, multi)
                low, iou_pred = low.float(), iou_pred.float()
                logits = _logits_at(low, r)
                mloss, iloss = sam_loss(logits, target, iou_pred, focal_weight=cfg.focal_weight * ramp,
                                        weight=wroi, balanced=cfg.focal_balanced,
                                        pixel_loss=cfg.pixel_loss)
                best = mloss.argmin(1) if multi else torch.zeros(len(gt), dtype=torch.long, device=dev)
            if grad:
                total = total + mloss[bidx, best].mean() + iloss.mean()
                n_grad += 1
            sel = logits[bidx, best].detach()
            ious.append(float(mask_iou(sel[:, None], target).mean()))
            mask_in = low[bidx, best].detach()[:, None]
            if it < n_click:  # a corrective click for the next iteration
                p, lab = corrective_clicks(sel > 0, gt_r, self.gen, scale=scale)
                pts = p.to(dev) if pts is None else torch.cat([pts, p.to(dev)], 1)
                plab = lab.to(dev) if plab is None else torch.cat([plab, lab.to(dev)], 1)
        loss = total / n_grad
        self._check_finite(loss)
        self.iou_ema = 0.95 * self.iou_ema + 0.05 * ious[0]
        if self.focal_start is None and self.iou_ema >= cfg.focal_start_iou:
            self.focal_start = self.step
        self._apply(loss)
        return {"loss": float(loss.detach()), "iou_first": ious[0], "iou_last": ious[-1], "n_iter": n_iter,
                "objects": len(gt), "focal_ramp": ramp}

    def _edit_step(self, emb: torch.Tensor, pe: torch.Tensor, gt: torch.Tensor, nb_mask: torch.Tensor
                   ) -> dict[str, float]:
        """A negative-click lesson for every object A of the step (see ``TrainConfig.edit_prob``).

        Where A has a neighbour B: positive clicks in A and B ask for A u B; then the click in B turns into a
        negative one at another pixel of B, with the mask fed back, and the target is A alone. Otherwise
        (carving): a positive click in A asks for A; then a negative click at a far pixel q of A asks for the
        part of A nearer the positive click than q. With p = 0.5 one more iteration without a new click follows.
        Every iteration is back-propagated.
        """
        cfg, model, dev = self.cfg, self.model, gt.device
        r, n = cfg.loss_res, len(gt)
        has_nb = nb_mask.flatten(1).any(1)
        p_a = sample_points(gt, self.gen).to(dev)[:, 0]
        p_b = sample_points(nb_mask, self.gen).to(dev)[:, 0]
        q_b = sample_points(nb_mask, self.gen).to(dev)[:, 0]
        q_a = far_points(gt, p_a, self.gen)
        pad = torch.zeros_like(p_a)
        # iteration 0: (A, B) positive or (A, padding); iteration 1: (A positive, B or far-A negative)
        pts0 = torch.stack([p_a, torch.where(has_nb[:, None], p_b, pad)], 1)
        lab0 = torch.stack([torch.ones(n, dtype=torch.long, device=dev),
                            torch.where(has_nb, 1, -1)], 1)
        pts1 = torch.stack([p_a, torch.where(has_nb[:, None], q_b, q_a)], 1)
        lab1 = torch.stack([torch.ones(n, dtype=torch.long, device=dev), torch.zeros(n, dtype=torch.long,
                                                                                      device=dev)], 1)
        first = gt | nb_mask
        second = torch.where(has_nb[:, None, None], gt, split_toward(gt, p_a, q_a))
        n_iter = 2 + int(self.rng.random() < 0.5)
        mask_in, total, ious = None, 0.0, []
        for it in range(n_iter):
            tgt_full = first if it == 0 else second
            target = _target_at(tgt_full, r)
            pts, plab = (pts0, lab0) if it == 0 else (pts1, lab1)
            with self._autocast():
                sparse, dense = model.prompt_encoder(points=(pts, plab), boxes=None, masks=mask_in)
                low, iou_pred = model.mask_decoder(emb, pe, sparse, dense, False)
            low, iou_pred = low.float(), iou_pred.float()
            logits = _logits_at(low, r)
            mloss, iloss = sam_loss(logits, target, iou_pred, focal_weight=cfg.focal_weight,
                                    weight=roi_weight(target) if cfg.roi_focal else None,
                                    balanced=cfg.focal_balanced, pixel_loss=cfg.pixel_loss)
            total = total + mloss[:, 0].mean() + iloss.mean()
            ious.append(float(mask_iou(logits[:, :1].detach(), target).mean()))
            mask_in = low[:, :1].detach()
        loss = total / n_iter
        self._check_finite(loss)
        self._apply(loss)
        return {"loss": float(loss.detach()), "iou_first": ious[0], "iou_last": ious[-1], "n_iter": n_iter,
                "objects": n, "focal_ramp": 1.0, "edit": 1.0, "iou_edit": ious[-1]}

    def _autocast(self) -> torch.autocast:
        """bfloat16 autocast of a forward pass when ``cfg.amp`` (no loss scaling is needed with bfloat16)."""
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({float(loss.detach())}) at step {self.step}; lower the learning rate (--lr) or "
                "check the images for NaN/inf values"
            )

    def _apply(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()

    @torch.no_grad()
    def eval_loss(self, max_objects: int | None = None) -> float:
        """Deterministic loss (full focal weight) of exact-box prompts on the first objects of every sample."""
        model, dev, r = self.model, self.model.device, self.cfg.loss_res
        model.eval()
        pe = model.prompt_encoder.get_dense_pe()
        losses = []
        for i, s in enumerate(self.samples):
            ids = s.ids[: max_objects or self.cfg.objects_per_image]
            lab = _pad_labels(s.labels, self.img_size, dev)
            gt = lab[None] == torch.as_tensor(ids, device=dev)[:, None, None]
            emb = self._embeddings[i].to(dev) if i in self._embeddings else \
                model.image_encoder(_to_input(model, s.image))
            sparse, dense = model.prompt_encoder(points=None, boxes=mask_boxes(gt), masks=None)
            low, iou_pred = model.mask_decoder(emb, pe, sparse, dense, False)
            logits = _logits_at(low, r)
            target = _target_at(gt, r)
            m, iou_l = sam_loss(logits, target, iou_pred, focal_weight=self.cfg.focal_weight,
                                weight=roi_weight(target) if self.cfg.roi_focal else None,
                                balanced=self.cfg.focal_balanced, pixel_loss=self.cfg.pixel_loss)
            losses.append(float((m + iou_l).mean()))
        return float(np.mean(losses))

    # ---------------------------------------------------------------- loop
    def _set_lr(self) -> float:
        frac = self.step / max(self.cfg.steps, 1)
        if self.cfg.max_minutes:
            frac = max(frac, self.elapsed / (60 * self.cfg.max_minutes))
        lr = self.cfg.lr * _lr_factor(frac, self.step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.progress is not None:
            self.progress(rec)

    def evaluate(self) -> dict:
        res = quick_eval(self.model, self.val)
        score = res["box"] + res["point"]
        rec = {"step": self.step, "elapsed": round(self.elapsed, 1), "eval": res, "score": score}
        if score > self.best:
            self.best = score
            rec["best"] = True
            if self.out_dir is not None:
                save_checkpoint(self.model, self.out_dir / "best.pt", step=self.step, val=res, **self.meta)
        self._log(rec)
        return res

    def _done(self) -> bool:
        if self.step >= self.cfg.steps:
            return True
        return bool(self.cfg.max_minutes) and self.elapsed >= 60 * self.cfg.max_minutes

    def fit(self) -> list[dict]:
        """Train until ``steps`` or the time box; returns the history. Resumable: state in ``out_dir/last.pt``."""
        for _ in self.iter_fit():
            pass
        return self.history

    def iter_fit(self):
        """Generator form of :meth:`fit` (for a napari ``thread_worker``): yields {"step", "loss", ...} after
        every step; ``close()`` it or make ``should_stop()`` true to stop (the state is saved either way)."""
        cfg = self.cfg
        t_ck = t_ev = time.monotonic()
        acc: dict[str, float] = {}
        n = 0
        try:
            while not self._done():
                if self.should_stop is not None and self.should_stop():
                    break
                t0 = time.monotonic()
                self.model.train()
                if cfg.mode == "decoder":
                    self.model.image_encoder.eval()
                lr = self._set_lr()
                out = self.train_step()
                self.step += 1
                self.elapsed += time.monotonic() - t0
                for k, v in out.items():
                    acc[k] = acc.get(k, 0.0) + v
                n += 1
                if self.step % cfg.log_every == 0 or self._done():
                    self._log({"step": self.step, "elapsed": round(self.elapsed, 1), "lr": lr,
                               **{k: round(v / n, 4) for k, v in acc.items()}})
                    acc, n = {}, 0
                now = time.monotonic()
                ev = (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0) or \
                    (cfg.eval_every_s and now - t_ev >= cfg.eval_every_s)
                if self.val and ev:
                    self.evaluate()
                    t_ev = time.monotonic()
                if self.out_dir is not None and now - t_ck >= cfg.ckpt_every_s:
                    self.save_state()
                    t_ck = time.monotonic()
                yield {"step": self.step, "total": cfg.steps, "lr": lr, **out}
            if self.val and self._done() and not (self.history and self.history[-1].get("eval")
                                                  and self.history[-1]["step"] == self.step):
                self.evaluate()
        finally:
            self.model.eval()
            if self.out_dir is not None:
                self.save_state()
                save_checkpoint(self.model, self.out_dir / "final.pt", step=self.step, **self.meta)


def make_model(init: str, mode: str, device: str | torch.device | None = "cpu") -> Sam:
    """``init``: a registered config name (scratch) or a model name / checkpoint path (fine-tuning); ``device``:
    as :func:`napari_sam.core.device.resolve_device` takes it ("auto" / None: an accelerator when there is one)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training tolerates TF32 and runs several times faster
        torch.backends.cudnn.allow_tf32 = True
    if mode == "scratch":
        return build_sam(init).to(dev)
    return load_model(init, device=dev).train()
