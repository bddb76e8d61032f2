"""The paper's evaluation protocol for promptable segmentation, at the image's original resolution.

Per instance of a ground-truth label image (H, W) (0 = background):

- ``point``: one positive point at the object's centre (the maximum of its distance transform), multimask;
  scored by the top-ranked mask (highest predicted IoU) and by the oracle (best of the 3, ``oracle``).
- ``box``: the object's tight box (min_row, min_col, max_row, max_col), max inclusive; single mask.
- ``clicks``: k = 1..n interactive clicks: the centre point first (top-ranked mask), then each click at the
  centre of the largest error region of the current mask (missed -> positive, extra -> negative), all the
  clicks so far as the prompt, and the previous low-res logits as mask input where the model refines with
  them (the paper's protocol; :func:`napari_sam.core.build.refine_logits_of`); the IoU after each click.

mIoU is the mean over all evaluated instances of a data set (and per group, e.g. modality).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

PROMPTS = ("point", "box", "clicks")


def center_point(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of the maximum of the distance transform of a bool mask (the point deepest inside it)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size == 0:
        raise ValueError("center_point needs a mask with at least one True pixel; the mask is empty")
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dt = ndimage.distance_transform_edt(np.pad(mask[r0:r1, c0:c1], 1))
    r, c = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return int(r - 1 + r0), int(c - 1 + c0)


def error_click(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[int, int], int]:
    """The next simulated click: centre of the largest connected error region of ``pred`` vs ``gt``.

    Returns ((row, col), label): 1 if the region was missed (inside the object), 0 if it is extra. A perfect
    mask gets a positive click at the object's centre.
    """
    err = pred ^ gt
    if not err.any():
        return center_point(gt), 1
    lab, n = ndimage.label(err)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    region = lab == int(np.argmax(sizes))
    r, c = center_point(region)
    return (r, c), int(gt[r, c])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def instance_ids(labels: np.ndarray, max_objects: int | None = None, seed: int = 0) -> np.ndarray:
    """Instance ids of a label image; at most ``max_objects`` of them, a fixed random sample (seeded)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if max_objects is not None and ids.size > max_objects:
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_objects, replace=False))
    return ids


def click_candidates(predictor, image: np.ndarray, labels: np.ndarray, max_objects: int | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's one centre click on each instance of :func:`instance_ids`: the true IoU of each of the 3
    candidates and their predicted IoU, both (N, 3) float64 (for ranking studies, e.g. calibration)."""
    gts = [labels == i for i in instance_ids(labels, max_objects, seed)]
    if not gts:
        return np.zeros((0, 3)), np.zeros((0, 3))
    predictor.set_image(image)
    c = np.array([center_point(g) for g in gts], np.float64)
    p = predictor.predict(points=c[:, None], point_labels=np.ones((len(gts), 1)), multimask=True)
    return np.array([[iou(m, g) for m in ms] for ms, g in zip(p.masks, gts)]), p.iou.astype(np.float64)


def evaluate_image(predictor, image: np.ndarray, labels: np.ndarray, prompts: Iterable[str] = PROMPTS,
                   n_clicks: int = 5, max_objects: int | None = None, chunk: int = 16,
                   seed: int = 0, refine: bool | None = None, enforce_negatives: bool = False,
                   follow_positives: bool = False) -> dict[str, np.ndarray]:
    """Per-instance IoUs for one image: {"point": (N,), "oracle": (N,), "box": (N,), "clicks": (N, n_clicks)}.

    ``predictor`` is a :class:`napari_sam.core.predictor.SamPredictor`; ``labels`` (H, W) int must match the
    image's (H, W). ``prompts``: some of :data:`PROMPTS`, or one of them as a string; the ``box`` prompt is the
    object's tight box (min_row, min_col, max_row, max_col) with max inclusive. Objects are processed ``chunk`` at
    a time in one batched decoder call. ``refine``: feed each click round the previous low-res logits (None: as
    the predictor's model does, see ``refine_logits_of``).
    ``enforce_negatives``: the annotator's protocol, where each click round's mask loses what its negative clicks
    mark (:func:`napari_sam.core.annotation.enforce_negative_points`); the logits fed back stay the model's.
    ``follow_positives``: also the annotator's, where a click round's mask that leaves out one of its positive
    clicks is decoded again with a box around it, the previous round's mask and the positive clicks
    (:func:`napari_sam.core.annotation.follow_positive_points`); its logits are then fed back.
    """
    from .amg import _check_int
    from .annotation import enforce_negative_points, follow_positive_points
    from .build import refine_logits_of

    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    bad = set(prompts) - set(PROMPTS)
    if bad:
        raise ValueError(f"unknown prompt type(s) {sorted(bad)}; use {PROMPTS}")
    _check_int("n_clicks", n_clicks, 1)
    _check_int("chunk", chunk, 1)
    if max_objects is not None:
        _check_int("max_objects", max_objects, 1)
    labels = np.asarray(labels)
    if labels.shape != np.shape(image)[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match the image's {np.shape(image)[:2]}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be integers (instance ids, 0 = background), got dtype {labels.dtype}")
    if refine is None:
        refine = refine_logits_of(getattr(predictor, "model", None))
    ids = instance_ids(labels, max_objects, seed)
    out: dict[str, list] = {k: [] for k in ("point", "oracle", "box", "clicks")}
    if ids.size == 0:
        return {k: np.zeros((0,) if k != "clicks" else (0, n_clicks)) for k in out}
    predictor.set_image(image)
    for s in range(0, ids.size, chunk):
        part = ids[s: s + chunk]
        gts = [labels == i for i in part]
        centers = np.array([center_point(g) for g in gts], np.float64)
        if "point" in prompts or "clicks" in prompts:
            pred = predictor.predict(points=centers[:, None], point_labels=np.ones((len(part), 1)), multimask=True)
            ious = np.array([[iou(m, g) for m in ms] for ms, g in zip(pred.masks, gts)])
            top = np.argmax(pred.iou, axis=1)
            out["point"] += ious[np.arange(len(part)), top].tolist()
            out["oracle"] += ious.max(1).tolist()
        if "box" in prompts:
            boxes = []
            for g in gts:
                rr, cc = np.nonzero(g.any(1))[0], np.nonzero(g.any(0))[0]
                boxes.append([rr[0], cc[0], rr[-1], cc[-1]])
            pb = predictor.predict(box=np.array(boxes, np.float64), multimask=False)
            out["box"] += [iou(m[0], g) for m, g in zip(pb.masks, gts)]
        if "clicks" in prompts:
            curve = np.zeros((len(part), n_clicks))
            masks = pred.masks[np.arange(len(part)), top]
            low = pred.low_res_logits[np.arange(len(part)), top][:, None]
            wins = pred.windows  # the frames of the zoomed objects' logits (None: the whole image)
            curve[:, 0] = ious[np.arange(len(part)), top]
            pts, lab = centers[:, None], np.ones((len(part), 1))
            for k in range(1, n_clicks):
                new = [error_click(m, g) for m, g in zip(masks, gts)]
                pts = np.concatenate([pts, np.array([p for p, _ in new], np.float64)[:, None]], 1)
                lab = np.concatenate([lab, np.array([v for _, v in new], np.float64)[:, None]], 1)
                pc = predictor.predict(points=pts, point_labels=lab, mask_input=low if refine else None,
                                       multimask=False, mask_windows=wins if refine else None)
                previous, mask_in, win_in = masks, low, wins
                masks, low, wins = pc.masks[:, 0], pc.low_res_logits[:, :1], pc.windows
                if enforce_negatives:
                    masks = np.stack([enforce_negative_points(m, p, q) for m, p, q in zip(masks, pts, lab)])
                if follow_positives:
                    rows, again = follow_positive_points(predictor, pts, lab, masks, np.asarray(previous),
                                                         mask_in if refine else None, win_in if refine else None)
                    if again is not None:
                        low, wins = low.copy(), None if wins is None else wins.copy()
                        masks[rows], low[rows] = again.masks[:, 0], again.low_res_logits[:, :1]
                        if wins is not None:
                            wins[rows] = again.windows
                        if enforce_negatives:
                            for i in rows:
                                masks[i] = enforce_negative_points(masks[i], pts[i], lab[i])
                curve[:, k] = [iou(m, g) for m, g in zip(masks, gts)]
            out["clicks"] += curve.tolist()
    res = {k: np.asarray(v, np.float64) for k, v in out.items()}
    if res["clicks"].size == 0:
        res["clicks"] = np.zeros((0, n_clicks))
    return res


@dataclass
class EvalResult:
    """Per-instance IoUs of a data set, grouped; ``summary()`` gives the mIoUs."""

    dataset: str
    n_clicks: int = 5
    per_image: list[dict] = field(default_factory=list)

    def add(self, name: str, group: str, ious: dict[str, np.ndarray]) -> None:
        self.per_image.append({"name": name, "group": group, **{k: np.asarray(v) for k, v in ious.items()}})

    def _miou(self, rows: list[dict]) -> dict[str, float | list[float] | int]:
        def cat(k):
            arrs = [r[k] for r in rows if k in r and len(r[k])]
            return np.concatenate(arrs) if arrs else np.zeros(0)

        n_obj = sum(max(len(r[k]) for k in ("point", "box", "clicks")) for r in rows)
        out: dict = {"images": len(rows), "objects": int(n_obj)}
        for k in ("point", "oracle", "box"):
            v = cat(k)
            if v.size:
                out[k] = round(float(v.mean()), 4)
        c = cat("clicks")
        if c.size:
            out["clicks"] = [round(float(x), 4) for x in c.mean(0)]
        return out

    def summary(self) -> dict:
        groups = sorted({r["group"] for r in self.per_image if r["group"]})
        return {"dataset": self.dataset, "all": self._miou(self.per_image),
                "groups": {g: self._miou([r for r in self.per_image if r["group"] == g]) for g in groups}}


def evaluate_dataset(model, items: Iterable[tuple[str, np.ndarray, np.ndarray, str]], dataset: str = "",
                     prompts: Iterable[str] = PROMPTS, n_clicks: int = 5, max_objects: int | None = None,
                     progress: Callable[[int, str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, refine: bool | None = None,
                     enforce_negatives: bool = False, follow_positives: bool = False,
                     into: EvalResult | None = None) -> EvalResult:
    """Evaluate ``model`` on (name, image, labels, group) items; returns an :class:`EvalResult`. ``refine``,
    ``enforce_negatives``, ``follow_positives``: see :func:`evaluate_image`. ``into``: an EvalResult to add each
    image's IoUs to as it is done, so a caller keeps them when an image fails midway (default: a new one)."""
    from .predictor import SamPredictor

    predictor = SamPredictor(model)
    res = EvalResult(dataset, n_clicks) if into is None else into
    for i, (name, image, labels, group) in enumerate(items):
        if should_stop is not None and should_stop():
            break
        res.add(name, group, evaluate_image(predictor, image, labels, prompts, n_clicks, max_objects, refine=refine,
                                            enforce_negatives=enforce_negatives,
                                            follow_positives=follow_positives))
        if progress is not None:
            progress(i + 1, name)
    return res


def markdown_table(summaries: list[dict]) -> str:
    """One row per data set and group: mIoU for point (top / oracle), box and k clicks."""
    k = max((len(s["all"].get("clicks", [])) for s in summaries), default=0)
    head = "| data set | group | images | objects | 1-point | 1-point oracle | box |" + \
        "".join(f" {j} clicks |" for j in range(1, k + 1) if j in (1, 3, 5, 10) or j == k)
    cols = [j for j in range(1, k + 1) if j in (1, 3, 5, 10) or j == k]
    lines = [head, "|" + "---|" * (7 + len(cols))]
    for s in summaries:
        for g, m in [("all", s["all"])] + list(s["groups"].items()):
            f = (lambda key: f"{m[key]:.3f}" if key in m else "–")
            cl = "".join(f" {m['clicks'][j - 1]:.3f} |" if "clicks" in m else " – |" for j in cols)
            lines.append(f"| {s['dataset']} | {g} | {m['images']} | {m['objects']} | {f('point')} | "
                         f"{f('oracle')} | {f('box')} |{cl}")
    lines += [f"\n**Incomplete** ({s['dataset']}): {s['incomplete']}" for s in summaries if s.get("incomplete")]
    return "\n".join(lines) + "\n"


def write_results(summaries: list[dict], json_path: str | Path, md_path: str | Path | None = None) -> None:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summaries if len(summaries) != 1 else summaries[0], indent=1))
    if md_path is not None:
        Path(md_path).write_text(markdown_table(summaries))
