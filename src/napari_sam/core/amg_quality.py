"""A learned quality score for segment-everything candidates (not in the reference; opt-in, ``rescore``).

The decoder's IoU head judges each mask alone. Whether a candidate is a good object also shows in how it relates
to the other candidates of the same image: how many other prompts found about the same box, how its area
compares with the image's typical object, whether its own prompt point lies inside it, how it ranks among the
3 masks of its point. :class:`CandidateScorer` is a small MLP on :data:`FEATURES` that regresses each candidate's
true IoU with the best-matching ground-truth object. It is fitted (:func:`fit_candidate_scorer`) on the
candidates of a training split; a checkpoint stores it as ``amg_quality`` metadata
(``benchmarks/eval_amg.py --fit-scorer``), and :meth:`MaskProposals.filter(rescore=True)
<napari_sam.core.amg_proposals.MaskProposals.filter>` then thresholds and ranks by its score instead of the
predicted IoU.

Features are computed over all candidates of one crop that pass the scorer's floors (predicted IoU and stability
the training candidates were kept at), so they need every such candidate's full-resolution mask: about 0.3 s for
the ~1200 candidates of a 256x256 image. Core code: no napari, no Qt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .amg_proposals import CropProposals, Mask

#: per-candidate features, in column order
FEATURES = (
    "predicted_iou", "stability", "log_area", "log_area_fraction", "box_fill", "point_inside",
    "log_votes_0.8", "log_votes_0.6", "log_area_vs_typical", "abs_log_area_vs_typical", "touches_border",
    "logit_max", "mean_positive_logit", "rank_at_point",
    "inside_intensity", "ring_intensity", "contrast", "abs_contrast", "contrast_vs_typical", "inside_intensity_std",
    "boundary_gradient", "voters_mean_iou", "voters_mean_stability",
)
#: width (px) of the ring around a mask whose intensity the mask's is compared with
RING = 3
#: candidates the scorer was fitted on: predicted IoU above, stability at least (MaskProposals floors)
DEFAULT_FLOORS = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.5}


def box_iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """(N, N) IoU of inclusive boxes (N, 4) (min_row, min_col, max_row, max_col)."""
    b = np.asarray(boxes, dtype=np.float64)
    r0 = np.maximum(b[:, None, 0], b[None, :, 0])
    c0 = np.maximum(b[:, None, 1], b[None, :, 1])
    r1 = np.minimum(b[:, None, 2], b[None, :, 2])
    c1 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(r1 - r0 + 1, 0, None) * np.clip(c1 - c0 + 1, 0, None)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area[:, None] + area[None, :] - inter)


def scored_candidates(crop: CropProposals, floors: dict[str, float]) -> np.ndarray:
    """Indices (int64) of the crop's candidates the scorer judges: above its floors, with a non-empty mask."""
    sel = (crop.iou > floors["pred_iou_thresh"]) & (crop.stability >= floors["stability_score_thresh"])
    return np.asarray([i for i in np.flatnonzero(sel) if crop.mask(i) is not None], dtype=np.int64)


def image_maps(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a grayscale image (H, W): its intensity z-scored over the image, and the gradient magnitude of that
    over its mean; both (H, W) float32."""
    g = np.asarray(gray, dtype=np.float32)
    z = (g - g.mean()) / max(float(g.std()), 1e-6)
    gr, gc = np.gradient(z)
    mag = np.hypot(gr, gc)
    return z, (mag / max(float(mag.mean()), 1e-6)).astype(np.float32)


def _intensity_features(m: Mask, z: np.ndarray, grad: np.ndarray) -> tuple[float, ...]:
    """(mean z inside, mean z in the RING px ring around it (a square dilation), z std inside, mean gradient on
    the mask's boundary pixels)."""
    h, w = z.shape
    r0, c0, r1, c1 = (int(v) for v in m.box)
    p = m.patch
    inside = z[r0 : r1 + 1, c0 : c1 + 1][p]
    pad = np.zeros((p.shape[0] + 2 * RING, p.shape[1] + 2 * RING), dtype=bool)
    pad[RING:-RING, RING:-RING] = p
    grown = pad.copy()
    for k in range(1, RING + 1):
        grown[k:] |= pad[:-k]
        grown[:-k] |= pad[k:]
    rows = grown.copy()
    for k in range(1, RING + 1):
        grown[:, k:] |= rows[:, :-k]
        grown[:, :-k] |= rows[:, k:]
    ring = grown & ~pad
    a0, b0 = r0 - RING, c0 - RING  # the padded window's origin; clip it to the image
    ring = ring[max(-a0, 0) : h - a0, max(-b0, 0) : w - b0]
    around = z[max(a0, 0) : max(a0, 0) + ring.shape[0], max(b0, 0) : max(b0, 0) + ring.shape[1]][ring]
    mean_in = float(inside.mean())
    interior = p.copy()  # erosion by the 4-neighbourhood; outside the patch is background
    interior[0, :] = interior[-1, :] = False
    interior[:, 0] = interior[:, -1] = False
    interior[1:-1, 1:-1] &= p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = p & ~interior
    return (mean_in, float(around.mean()) if around.size else mean_in, float(inside.std()),
            float(grad[r0 : r1 + 1, c0 : c1 + 1][edge].mean()))


def candidate_features(crop: CropProposals, idx: np.ndarray, maps: tuple[np.ndarray, ...]) -> np.ndarray:
    """(len(idx), len(FEATURES)) float64 features of the crop's candidates ``idx`` (all with a mask), computed
    relative to each other: call it with all of :func:`scored_candidates`. maps: :func:`image_maps` of the whole
    image (the masks are in the image frame)."""
    n = len(idx)
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    masks = [crop.mask(int(i)) for i in idx]
    boxes = np.stack([m.box for m in masks]).astype(np.int64)
    area = np.array([m.area for m in masks], dtype=np.float64)
    box_area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    r0, c0, r1, c1 = crop.crop_box
    iou, stab, pts = crop.iou[idx].astype(np.float64), crop.stability[idx].astype(np.float64), crop.points[idx]
    inside = np.array([_point_inside(m, p) for m, p in zip(masks, pts)], dtype=np.float64)
    overlap = box_iou_matrix(boxes)
    voters = overlap > 0.8
    votes8, votes6 = voters.sum(1), (overlap > 0.6).sum(1)
    confident = iou > 0.7
    typical = np.median(area[confident]) if confident.sum() >= 3 else np.median(area)
    border = ((boxes[:, 0] <= r0) | (boxes[:, 1] <= c0) | (boxes[:, 2] >= r1 - 1) | (boxes[:, 3] >= c1 - 1))
    logit_max, logit_mean = np.zeros(n), np.zeros(n)
    for j, i in enumerate(idx):
        lg = crop.windows[int(i)][6]
        logit_max[j] = float(lg.max())
        pos = lg[lg > 0]
        logit_mean[j] = float(pos.mean()) if pos.numel() else 0.0
    # rank of the predicted IoU among the candidates of the same prompt point (0 = the point's best)
    _, group = np.unique(pts, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((-iou, group))
    starts = np.searchsorted(group[order], group[order], side="left")
    rank = np.empty(n)
    rank[order] = np.arange(n) - starts
    rel = np.log(area / typical)
    inten = np.array([_intensity_features(m, *maps) for m in masks])
    contrast = inten[:, 0] - inten[:, 1]
    # nuclei are brighter than their surroundings in fluorescence, darker in brightfield / H&E: the image's sign
    sign = np.sign(np.median(contrast[confident] if confident.sum() >= 3 else contrast)) or 1.0
    return np.stack([iou, stab, np.log(area + 1), np.log(area / ((r1 - r0) * (c1 - c0))), area / box_area, inside,
                     np.log(votes8), np.log(votes6), rel, np.abs(rel), border.astype(np.float64), logit_max,
                     logit_mean, rank, inten[:, 0], inten[:, 1], contrast, np.abs(contrast), sign * contrast,
                     inten[:, 2], inten[:, 3], voters @ iou / votes8, voters @ stab / votes8], axis=1)


def _point_inside(m: Mask, p: np.ndarray) -> bool:
    r, c = int(p[0]) - int(m.box[0]), int(p[1]) - int(m.box[1])
    return 0 <= r < m.patch.shape[0] and 0 <= c < m.patch.shape[1] and bool(m.patch[r, c])


def true_iou(masks: list[Mask], gt: np.ndarray) -> np.ndarray:
    """(N,) float64: each mask's IoU with the ground-truth object (instance labels (H, W), 0 = background) it
    overlaps most; 0 where it lies on background only."""
    gt = np.asarray(gt).astype(np.int64)
    gt_area = np.bincount(gt.ravel())
    out = np.zeros(len(masks))
    for j, m in enumerate(masks):
        r0, c0, r1, c1 = (int(v) for v in m.box)
        counts = np.bincount(gt[r0 : r1 + 1, c0 : c1 + 1][m.patch], minlength=len(gt_area))
        counts[0] = 0
        v = int(counts.argmax())
        if counts[v]:
            out[j] = counts[v] / (m.area + gt_area[v] - counts[v])
    return out


class CandidateScorer:
    """An MLP (len(FEATURES) -> hidden -> hidden -> 1, ReLU, sigmoid) estimating a candidate's true IoU.

    ``state``: what :meth:`state` returns (the checkpoint's ``amg_quality``): "features" (names, must equal
    :data:`FEATURES`), "floors", "mean"/"std" (feature normalisation) and "layers" [(weight (out, in), bias)].
    """

    def __init__(self, state: dict[str, Any]) -> None:
        features = tuple(state.get("features", ()))
        if features != FEATURES:
            raise ValueError(f"this candidate scorer was fitted on features {features}, not this version's "
                             f"{FEATURES}: fit it again (benchmarks/eval_amg.py --fit-scorer)")
        self.floors = {k: float(v) for k, v in state["floors"].items()}
        self.mean = np.asarray(state["mean"], dtype=np.float32)
        self.std = np.asarray(state["std"], dtype=np.float32)
        self.layers = [(np.asarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32)) for w, b in state["layers"]]
        self.source = str(state.get("source", ""))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N, len(FEATURES)) features -> (N,) float32 estimated IoU in (0, 1)."""
        h = (np.asarray(x, dtype=np.float32) - self.mean) / self.std
        for k, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if k < len(self.layers) - 1:
                h = np.maximum(h, 0)
        return (1.0 / (1.0 + np.exp(-h[:, 0]))).astype(np.float32)

    def state(self) -> dict[str, Any]:
        import torch

        return {"features": list(FEATURES), "floors": dict(self.floors), "source": self.source,
                "mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy()),
                "layers": [(torch.from_numpy(w.copy()), torch.from_numpy(b.copy())) for w, b in self.layers]}


def candidate_scorer(model) -> CandidateScorer | None:
    """The scorer a model's checkpoint stores (``amg_quality``), or None. ``model``: a loaded Sam or None for
    the built-in model."""
    from .build import checkpoint_meta

    state = checkpoint_meta(model).get("amg_quality")
    return CandidateScorer(state) if state else None


def fit_candidate_scorer(x: np.ndarray, y: np.ndarray, hidden: int = 32, epochs: int = 400, lr: float = 1e-2,
                         weight_decay: float = 1e-4, seed: int = 0, floors: dict[str, float] | None = None,
                         source: str = "") -> CandidateScorer:
    """Fit the MLP by full-batch Adam on the mean squared error between its sigmoid output and ``y``.

    x: (N, len(FEATURES)) features (:func:`candidate_features`); y: (N,) true IoU in [0, 1] (:func:`true_iou`).
    floors: the floors the candidates were kept at (default :data:`DEFAULT_FLOORS`)."""
    import torch

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need features (N, {len(FEATURES)}) and N targets with N >= 2; got {x.shape} and "
                         f"{y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features or targets are not finite")
    mean, std = x.mean(0), x.std(0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    dims = [x.shape[1], hidden, hidden, 1]
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        lin = torch.nn.Linear(a, b)
        bound = 1 / np.sqrt(a)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss = ((torch.sigmoid(net(xt)[:, 0]) - yt) ** 2).mean()
        loss.backward()
        opt.step()
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]
    return CandidateScorer({"features": FEATURES, "floors": dict(floors or DEFAULT_FLOORS), "source": source,
                            "mean": mean, "std": std,
                            "layers": [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in lins]})
