"""Slice-by-slice propagation of 2D objects through a stack: one prompt -> a 3D object.

From each prompted slice outward, the next slice is prompted from the previous slice's mask (a strategy of
:data:`STRATEGIES`: its box, its low-res logits, an interior positive point at the distance-transform maximum).
A direction stops when the predicted IoU falls below ``iou_threshold``, the IoU with the previous slice's mask
below ``overlap_threshold``, or the mask has fewer than ``min_area`` pixels. Between two prompted slices of one
object, both ends propagate toward the middle; if one stops early, the other goes on. All objects (and all
directions) step in lock-step, so every slice runs one batched decoder call for all objects on it. By default
(``views="orthogonal"``) each object is then propagated the same way through the stack's XZ and YZ planes too,
and a voxel is kept where 2 of the 3 views have it (:mod:`napari_sam.core.propagation_views`).

Axis order: volumes (Z, Y, X) or (Z, Y, X, C); points (row, col) on slice z; boxes (min_row, min_col, max_row,
max_col) inclusive. "forward"/"up" is increasing z, "backward"/"down" decreasing z.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from .amg import _check_int, _check_unit
from .build import checkpoint_meta
from .embedding_store import StackEmbeddings, validate_stack
from .image import check_denoise
from .predictor import SamPredictor
from .prompts import validate_points
from .propagation_labels import Mask, Patch, as_patch, from_patch, paste, patch_box, tight, to_patch, union_box
from .propagation_views import VIEWS, check_spacing, orthogonal_views

# What the next slice is prompted with, and each strategy's own stop rule and candidate choice (make_params applies
# them; a caller's values win). "point_raw" (the default) prompts like micro-sam and stops like it, but ranks the 3
# candidates by the model's uncalibrated IoU head and also stops below predicted IoU 0.4 (chosen on GoNuclear crop
# 1135 among 0 / 0.3 / 0.4 / 0.5, raw and denoised; benchmarks/eval_propagation.py). "microsam" is micro-sam's
# default as is (one positive point at the previous mask's interior maximum, stop at IoU with the previous slice
# < 0.5, no predicted-IoU stop, no z smoothing, no regrowth stop).
_BOX_STOP = dict(iou_threshold=0.6, overlap_threshold=0.3, select="iou")
STRATEGIES: dict[str, dict] = {
    "point_raw": dict(box=False, logits=False, point=True, overlap_threshold=0.5, iou_threshold=0.4,
                      select="raw_iou"),
    "box": dict(box=True, logits=False, point=False, **_BOX_STOP),
    "box_logits": dict(box=True, logits=True, point=False, **_BOX_STOP),
    "point": dict(box=False, logits=False, point=True, **_BOX_STOP),
    "point_box": dict(box=True, logits=False, point=True, **_BOX_STOP),
    "point_logits": dict(box=False, logits=True, point=True, **_BOX_STOP),
    "point_box_logits": dict(box=True, logits=True, point=True, **_BOX_STOP),
    "microsam": dict(box=False, logits=False, point=True, overlap_threshold=0.5, iou_threshold=0.0, select="iou",
                     smooth_z=False, max_regrowth=None, views="xy"),
}
DIRECTIONS = {"both": (1, -1), "forward": (1,), "up": (1,), "backward": (-1,), "down": (-1,)}
SEED_SELECT = ("consistency", "iou")
SELECT = ("iou", "raw_iou", "overlap")
SEED_REACH = 2  # choose_seed looks this many slices up and down


@dataclass(frozen=True)
class PropagationParams:
    """strategy: key of STRATEGIES. iou_threshold: stop when the predicted IoU is below it. overlap_threshold:
    stop when IoU(mask, previous slice's mask) is below it. min_area: stop when the mask has fewer pixels.
    direction: "both", "forward"/"up" (+z), "backward"/"down" (-z). max_slices: at most this many slices per
    direction (None: no limit). box_extension: the box from the previous mask grows by this fraction of its
    size on each side. select: among the 3 candidates of a point-only prompt keep the one with the highest
    predicted IoU ("iou"), the highest predicted IoU without the checkpoint's candidate calibration
    ("raw_iou": ``candidate_bias`` subtracted, see :func:`raw_candidate_ious`; that score is also reported and
    stopped on), or the highest IoU with the previous slice's mask ("overlap"). seed_select
    (:func:`propagate_object` with one point, ambiguous): keep the candidate the neighbouring slices agree with
    best ("consistency", see :func:`choose_seed`) or the one with the highest predicted IoU ("iou").
    converge_iou (:func:`repropagate` only): a direction ends where the new mask has this IoU with the old one.
    smooth_z: the finished 3D object keeps a pixel of a propagated slice only where at least 2 of the slices z - 1,
    z, z + 1 have it (:func:`smooth_z`; prompted slices are kept as they are). :func:`propagate_object`,
    :func:`propagate_masks` and the widget apply it; the generators yield the slices as decoded.
    max_regrowth: moving away from its prompted slice, an object whose mask has narrowed to 1 / (1 + max_regrowth)
    of its widest so far stops where the mask grows back to more than (1 + max_regrowth) times its narrowest since
    that widest slice (a nucleus narrows toward its ends; growing back, the mask has run into the next one). A mask
    that only grows, from a click near a nucleus's end toward its middle, is never stopped by it. Not applied
    between two prompted slices; None (the default): off. On GoNuclear, 0.5 helps clicks on a nucleus's widest
    slice a little (+0.013 mean 3D IoU, denoise 2) and hurts clicks near its end (-0.026), so it is off.
    views: "orthogonal" (the default; not for ``microsam``) also propagates each object through the stack's XZ and
    YZ planes and keeps a voxel where 2 of the 3 views have it (:mod:`napari_sam.core.propagation_views`; on
    GoNuclear mean 3D IoU 0.569 -> 0.704); "xy": slices only (for time-lapse (T, Y, X) stacks). spacing: the
    (z, y, x) voxel size (None: isotropic), to resample z in those views. view_step: every how many rows/columns
    a view plane is taken. view_denoise: Gaussian sigma (pixels) smoothing the view planes (at least; the model's
    own sigma if larger). :func:`propagate_object`, :func:`propagate_masks` and the widget apply the views; the
    generators and :func:`repropagate` work in XY slices only."""

    strategy: str = "point_raw"
    iou_threshold: float = 0.4  # (the defaults are the default strategy's; other strategies bring their own)
    overlap_threshold: float = 0.5
    min_area: int = 10
    direction: str = "both"
    max_slices: int | None = None
    box_extension: float = 0.0
    select: str = "raw_iou"
    seed_select: str = "iou"
    converge_iou: float = 0.9
    smooth_z: bool = True
    max_regrowth: float | None = None
    views: str = "orthogonal"
    spacing: tuple[float, float, float] | None = None
    view_step: int = 2
    view_denoise: float = 2.0

    def spec(self) -> dict:
        """The prompt recipe of the strategy: {"box": bool, "logits": bool, "point": bool}."""
        return {k: STRATEGIES[self.strategy][k] for k in ("box", "logits", "point")}


def make_params(params: Mapping) -> PropagationParams:
    """PropagationParams from keyword arguments: the strategy's own thresholds (e.g. micro-sam's) first, then
    what the caller gave. Unknown names, strategies or directions raise with the valid choices."""
    names = {f.name for f in fields(PropagationParams)}
    bad = sorted(set(params) - names)
    if bad:
        raise TypeError(f"unknown propagation parameter(s) {bad}; valid: {sorted(names)}")
    strategy = params.get("strategy", PropagationParams.strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if params.get("select", "iou") not in SELECT:
        raise ValueError(f"unknown select {params['select']!r}; choose one of {SELECT}")
    if params.get("seed_select", "consistency") not in SEED_SELECT:
        raise ValueError(f"unknown seed_select {params['seed_select']!r}; choose one of {SEED_SELECT}")
    direction = params.get("direction", PropagationParams.direction)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {sorted(DIRECTIONS)}")
    if params.get("views", "orthogonal") not in VIEWS:
        raise ValueError(f"unknown views {params['views']!r}; choose one of {VIEWS}")
    over = {k: v for k, v in STRATEGIES[strategy].items() if k in names}
    p = PropagationParams(**{**over, **params})
    _check_unit("iou_threshold", p.iou_threshold)
    _check_unit("overlap_threshold", p.overlap_threshold)
    _check_int("min_area", p.min_area, 0)
    if p.max_slices is not None:
        _check_int("max_slices", p.max_slices, 0)  # 0: the prompted slice only; None: no limit
    if not (isinstance(p.box_extension, (int, float, np.integer, np.floating)) and np.isfinite(p.box_extension)
            and p.box_extension >= 0):
        raise ValueError(f"box_extension={p.box_extension!r} must be a number >= 0 (0.1: the box grows by 10% of "
                         "its size on each side)")
    if p.spacing is not None:
        object.__setattr__(p, "spacing", check_spacing(p.spacing))
    if isinstance(p.view_step, (bool, np.bool_)) or not isinstance(p.view_step, (int, np.integer)) or p.view_step < 1:
        raise ValueError(f"view_step={p.view_step!r} must be an int >= 1 (1: every row and column)")
    object.__setattr__(p, "view_denoise", check_denoise(p.view_denoise))
    if p.max_regrowth is not None and not (np.isfinite(p.max_regrowth) and p.max_regrowth >= 0):
        raise ValueError(f"max_regrowth={p.max_regrowth!r} must be a number >= 0 (0.5: stop where the mask grows "
                         "to 1.5x its smallest so far), or None for no such stop")
    return p


def raw_candidate_ious(model, ious: np.ndarray) -> np.ndarray:
    """Predicted IoUs (..., 3) of the multimask candidates without the checkpoint's ranking calibration.

    A calibrated checkpoint (scripts/calibrate_candidates.py) has ``candidate_bias`` (3 floats) added to its
    IoU head's multimask outputs, chosen for a first click on 2D nuclei; this subtracts it (a no-op for
    checkpoints without one)."""
    bias = checkpoint_meta(model).get("candidate_bias")
    return np.asarray(ious) if bias is None else np.asarray(ious) - np.asarray(bias, dtype=np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def smooth_z(slices: Mapping[int, np.ndarray], keep=()) -> dict[int, np.ndarray]:
    """One object's slices {z: (Y, X) bool} -> the same with each pixel of a slice kept only where at least 2 of
    the slices z - 1, z, z + 1 have it (a majority along z; a missing slice counts as empty). Slices in ``keep``
    (the prompted ones) are returned unchanged; slices left empty are dropped. On GoNuclear this removes
    slice-to-slice flicker and trims the ends a little: mean 3D IoU +0.01-0.02 on both crops, raw and denoised."""
    keep = set(int(z) for z in keep)
    out = {}
    for z, m in slices.items():
        if z in keep:
            out[z] = m
            continue
        votes = m.astype(np.uint8)
        for nz in (z - 1, z + 1):
            if nz in slices:
                votes += slices[nz]
        sm = votes >= 2
        if sm.any():
            out[z] = sm
    return out


def finish_slices(seeds: Mapping[int, np.ndarray], propagated: Mapping[int, np.ndarray],
                  scores: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """One object's propagated slices {z: (Y, X) bool} after :func:`smooth_z` beside its prompted ``seeds`` {z: mask}
    (kept as drawn): the propagated slices that remain. ``scores`` (Z,), if given, get NaN on the dropped ones."""
    kept = smooth_z({**{int(z): np.asarray(m, bool) for z, m in seeds.items()}, **propagated}, keep=seeds)
    if scores is not None:
        scores[[z for z in propagated if z not in kept]] = np.nan
    return {z: m for z, m in kept.items() if z in propagated}


def smooth_patches(slices: Mapping[int, Patch], keep=()) -> dict[int, Patch]:
    """:func:`smooth_z` on one object's slices as patches {z: (row0, col0, (h, w) bool)} (the same result, as
    patches): each slice is voted on in the bounding box of it and its two neighbours only."""
    keep = set(int(z) for z in keep)
    out = {}
    for z, p in slices.items():
        if z in keep:
            out[z] = p
            continue
        near = [slices[nz] for nz in (z - 1, z + 1) if nz in slices]
        box = union_box([patch_box(q) for q in (p, *near)])
        if box is None:
            continue
        votes = paste(p, box).astype(np.uint8)
        for q in near:
            votes += paste(q, box)
        sm = votes >= 2
        if sm.any():
            out[z] = tight(sm, box)
    return out


def finish_patches(seeds: Mapping[int, Mask], propagated: Mapping[int, Patch],
                   scores: np.ndarray | None = None) -> dict[int, Patch]:
    """:func:`finish_slices` with the propagated slices as patches (the seeds full masks or patches): the same
    slices, as patches."""
    kept = smooth_patches({**{int(z): as_patch(m) for z, m in seeds.items()}, **propagated}, keep=seeds)
    if scores is not None:
        scores[[z for z in propagated if z not in kept]] = np.nan
    return {z: m for z, m in kept.items() if z in propagated}


def fuse_views(embeddings: StackEmbeddings, seeds: Sequence[Mapping[int, np.ndarray]],
               slices: Sequence[Mapping[int, np.ndarray]], scores: np.ndarray, params: PropagationParams,
               cancel: Callable[[], bool] | None = None, progress: Callable[[int, int], None] | None = None,
               points: Sequence | None = None, patches: bool = False) -> list[dict[int, np.ndarray]]:
    """The finished XY ``slices`` of each object (per object {z: (Y, X) bool}, seeds not included) with
    ``params.views`` applied (:func:`napari_sam.core.propagation_views.orthogonal_views` for "orthogonal").
    points: per object None or [(z, (row, col)), ...], the user's positive clicks (they prompt the views where
    they lie inside the seed mask; otherwise the mask's centroid does).
    ``scores`` (B, Z) is updated in place: NaN where an object is gone; a slice only the orthogonal views found
    gets that object's lowest XY score (the XY decoder did not reach it). Seeds keep their scores.
    patches: ``slices`` are given, and returned, as patches {z: (row0, col0, (h, w) bool)} (seeds stay full masks).
    """
    if params.views != "orthogonal":
        return [dict(s) for s in slices]
    fused = orthogonal_views(embeddings, seeds, slices, params, params.spacing, cancel, progress, points,
                             patches=patches)
    for i, (obj, seed) in enumerate(zip(fused, seeds)):
        row = scores[i]
        xy = [float(row[z]) for z in slices[i] if np.isfinite(row[z])]
        low = min(xy) if xy else float(np.nanmin(row)) if np.isfinite(row).any() else np.nan
        for z in range(row.shape[0]):
            if z in seed:
                continue
            if z not in obj:
                row[z] = np.nan
            elif not np.isfinite(row[z]):
                row[z] = low
    return fused


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(4,) (min_row, min_col, max_row, max_col), inclusive, of a non-empty 2D mask."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return np.array([rows[0], cols[0], rows[-1], cols[-1]], dtype=np.float64)


def interior_point(mask: np.ndarray, max_side: int = 64) -> np.ndarray:
    """(row, col) of the maximum of the distance transform: the point deepest inside the mask. Large masks are
    subsampled to at most ``max_side`` pixels a side first (the point stays inside the mask)."""
    r0, c0, r1, c1 = mask_box(mask).astype(int)
    crop = mask[r0: r1 + 1, c0: c1 + 1]
    f = max(1, -(-max(crop.shape) // max_side))
    small = np.pad(crop[::f, ::f], 1)
    dist = ndimage.distance_transform_edt(small)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    r, c = r0 + (r - 1) * f, c0 + (c - 1) * f
    if not mask[r, c]:  # cannot happen for f == 1; guard the subsampled case
        rr, cc = np.nonzero(crop)
        k = int(np.argmin((rr + r0 - r) ** 2 + (cc + c0 - c) ** 2))
        r, c = rr[k] + r0, cc[k] + c0
    return np.array([r, c], dtype=np.float64)


class _Track:
    """One object moving through the stack in one direction."""

    def __init__(self, obj: int, z: int, step: int, end: int, mask: np.ndarray, logits: np.ndarray | None):
        self.obj, self.z, self.step, self.end = obj, z, step, end
        self.mask, self.logits = mask, logits
        self.partner: _Track | None = None
        self.stopped = False  # by a stop rule (not by reaching its end)
        self.count = 0
        # max_regrowth: the widest mask so far, and the narrowest since that one
        self.peak_area = self.low_area = int(np.count_nonzero(mask))

    def next_z(self, max_slices: int | None) -> int | None:
        nz = self.z + self.step
        if self.stopped or (nz - self.end) * self.step > 0 or (max_slices is not None and self.count >= max_slices):
            return None
        return nz


def _resolve(volume, model, embeddings):
    vol = validate_stack(volume)
    if embeddings is None:
        if model is None or isinstance(model, (str, os.PathLike)):
            from .build import load_model

            model = load_model(model)
        embeddings = StackEmbeddings(vol, model)
    elif isinstance(embeddings, StackEmbeddings):
        if model is not None and not isinstance(model, (str, os.PathLike)) and model is not embeddings.model:
            raise ValueError("embeddings were computed with another model; pass only one of model/embeddings")
        model = embeddings.model
        if embeddings.volume.shape != vol.shape or (embeddings.volume is not vol and
                                                    not np.array_equal(embeddings.volume, vol)):
            raise ValueError("embeddings were computed for another stack (shape or data differ); "
                             "build them with StackEmbeddings(volume, model)")
    else:
        raise TypeError("embeddings must be a StackEmbeddings (napari_sam.core.embedding_store) or None")
    if model is None:
        raise ValueError("no model: pass model=... or embeddings=StackEmbeddings(volume, model)")
    return vol, SamPredictor(model), embeddings


def _check_z(z, n: int) -> int:
    if isinstance(z, (bool, np.bool_)) or not isinstance(z, (int, np.integer)):
        raise TypeError(f"slice index z must be an int, got {z!r}")
    if not 0 <= z < n:
        raise ValueError(f"slice z={z} is outside the volume, which has {n} slice(s) (0 .. {n - 1})")
    return int(z)


def _predict_step(predictor: SamPredictor, tracks: list[_Track], spec: dict, params: PropagationParams):
    """One batched decoder call for all tracks arriving on the same slice -> (masks, scores, logits)."""
    b = len(tracks)
    boxes = None
    if spec["box"]:
        boxes = np.stack([mask_box(t.mask) for t in tracks])
        if params.box_extension:
            ext = params.box_extension * (boxes[:, 2:] - boxes[:, :2] + 1)
            boxes = np.concatenate([boxes[:, :2] - ext, boxes[:, 2:] + ext], axis=1)
            h, w = tracks[0].mask.shape
            boxes = np.clip(boxes, 0, [h - 1, w - 1, h - 1, w - 1])
    points = np.stack([interior_point(t.mask)[None] for t in tracks]) if spec["point"] else None
    logits = None
    if spec["logits"]:
        logits = np.stack([t.logits for t in tracks])[:, None]
    multimask = boxes is None and logits is None  # a single point is ambiguous: pick among 3
    pred = predictor.predict(points=points, point_labels=None if points is None else np.ones((b, 1)),
                             box=boxes, mask_input=logits, multimask=multimask)
    masks, ious, low = pred.masks, pred.iou, pred.low_res_logits
    if masks.ndim == 3:  # not batched (cannot happen with stacked prompts, kept for safety)
        masks, ious, low = masks[None], ious[None], low[None]
    if multimask and params.select == "raw_iou":
        ious = raw_candidate_ious(predictor.model, ious)
    if multimask and params.select == "overlap":
        best = np.array([np.argmax([mask_iou(m, t.mask) for m in ms]) for ms, t in zip(masks, tracks)])
    else:
        best = np.argmax(ious, axis=1)
    idx = np.arange(b)
    return masks[idx, best], ious[idx, best], low[idx, best]


def iter_tracks(predictor: SamPredictor, embeddings: StackEmbeddings, tracks: list[_Track],
                params: PropagationParams, spec: dict,
                cancel: Callable[[], bool] | None = None) -> Iterator[tuple[int, int, np.ndarray, float]]:
    """Advance all tracks in lock-step; yields (object, z, mask (Y, X) bool, predicted IoU) per accepted slice."""
    while True:
        if cancel is not None and cancel():
            return
        groups: dict[int, list[_Track]] = defaultdict(list)
        for t in tracks:
            nz = t.next_z(params.max_slices)
            if nz is not None:
                groups[nz].append(t)
        if not groups:
            return
        for nz in sorted(groups):
            group = groups[nz]
            predictor.set_embedding(embeddings[nz])
            masks, scores, lows = _predict_step(predictor, group, spec, params)
            for t, m, s, low in zip(group, masks, scores, lows):
                area = int(np.count_nonzero(m))
                regrown = (params.max_regrowth is not None and t.partner is None
                           and (1 + params.max_regrowth) * t.low_area <= t.peak_area  # it had narrowed ...
                           and area > (1 + params.max_regrowth) * t.low_area)  # ... and grows back
                if (area < max(params.min_area, 1) or s < params.iou_threshold
                        or mask_iou(m, t.mask) < params.overlap_threshold or regrown):
                    t.stopped = True
                    p = t.partner
                    if p is not None and not p.stopped:  # the other end fills the rest of the gap
                        p.end = t.z + t.step
                    continue
                t.z, t.mask, t.logits, t.count = nz, m, low, t.count + 1
                if area > t.peak_area:
                    t.peak_area = t.low_area = area
                else:
                    t.low_area = min(t.low_area, area)
                yield t.obj, nz, m, float(s)


def _seed_tracks(obj: int, seeds: Mapping[int, tuple[np.ndarray, np.ndarray | None]], n: int,
                 directions: tuple[int, ...], fixed_ends: tuple[int, int] | None = None) -> list[_Track]:
    """Tracks of one object with seed slices {z: (mask, logits)}: outward from the first and last seed (only in
    ``directions``), and toward each other between consecutive seeds (always)."""
    zs = sorted(seeds)
    lo_end, hi_end = fixed_ends if fixed_ends is not None else (0, n - 1)
    tracks = []
    if -1 in directions:
        tracks.append(_Track(obj, zs[0], -1, lo_end, *seeds[zs[0]]))
    if 1 in directions:
        tracks.append(_Track(obj, zs[-1], 1, hi_end, *seeds[zs[-1]]))
    for a, b in zip(zs[:-1], zs[1:]):
        if b - a < 2:
            continue
        mid = (a + b) // 2
        fw = _Track(obj, a, 1, mid, *seeds[a])
        bw = _Track(obj, b, -1, mid + 1, *seeds[b])
        fw.partner, bw.partner = bw, fw
        tracks += [fw, bw]
    return tracks


def iter_propagate_masks(volume: np.ndarray, seeds: Sequence[Mapping[int, np.ndarray]], model=None,
                         embeddings: StackEmbeddings | None = None, cancel: Callable[[], bool] | None = None,
                         **params) -> Iterator[tuple[int, int, np.ndarray, float]]:
    """Generator: propagate several objects at once, each from its seed masks {z: (Y, X) bool}.

    Yields (object index, z, mask (Y, X) bool, predicted IoU) for every propagated slice (seeds are not
    yielded), in lock-step order. ``params``: fields of :class:`PropagationParams`.
    """
    vol, predictor, emb = _resolve(volume, model, embeddings)
    p = make_params(params)
    spec = p.spec()
    tracks = []
    for i, obj_seeds in enumerate(seeds):
        if not obj_seeds:
            raise ValueError(f"object {i} has no seed slice")
        clean = {}
        for z, m in obj_seeds.items():
            z = _check_z(z, vol.shape[0])
            m = np.asarray(m, dtype=bool)
            if m.shape != vol.shape[1:3]:
                raise ValueError(f"seed mask of object {i} on slice {z} has shape {m.shape}; expected "
                                 f"{vol.shape[1:3]}")
            if not m.any():
                raise ValueError(f"seed mask of object {i} on slice {z} is empty")
            clean[z] = (m, _mask_to_logits(m, predictor, emb) if spec["logits"] else None)
        tracks += _seed_tracks(i, clean, vol.shape[0], DIRECTIONS[p.direction])
    yield from iter_tracks(predictor, emb, tracks, p, spec, cancel)


def _mask_to_logits(mask: np.ndarray, predictor: SamPredictor, emb: StackEmbeddings) -> np.ndarray:
    """Low-res logits (L, L) standing for a given mask (±10 inside/outside, in the model's padded frame)."""
    L = predictor.model.prompt_encoder.mask_input_size[0]
    img = predictor.model.img_size
    h, w = emb.input_size
    from PIL import Image

    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) > 127
    canvas = np.zeros((img, img), bool)
    canvas[:h, :w] = resized
    low = np.asarray(Image.fromarray(canvas.astype(np.uint8) * 255).resize((L, L), Image.BILINEAR)) > 127
    return np.where(low, 10.0, -10.0).astype(np.float32)


def propagate_masks(volume: np.ndarray, seeds: Sequence[Mapping[int, np.ndarray]], model=None,
                    embeddings: StackEmbeddings | None = None, cancel: Callable[[], bool] | None = None,
                    progress: Callable[[int, int, int], None] | None = None,
                    **params) -> tuple[np.ndarray, np.ndarray]:
    """Propagate several objects in one batched pass.

    Returns (labels (Z, Y, X) int32 with object i as value i + 1 (seeds included; where objects overlap the
    first one written keeps the voxel), scores (B, Z) float32: predicted IoU per slice, 1.0 on seed slices,
    NaN where the object is absent). ``progress(object, z, slices_done)`` is called per propagated slice.
    """
    vol, _predictor, emb = _resolve(volume, model, embeddings)
    p = make_params(params)
    labels = np.zeros(vol.shape[:3], np.int32)
    scores = np.full((len(seeds), vol.shape[0]), np.nan, np.float32)
    for i, obj_seeds in enumerate(seeds):
        for z, m in obj_seeds.items():
            if 0 <= z < vol.shape[0] and np.shape(m) == vol.shape[1:3]:
                sl = labels[z]
                sl[np.asarray(m, bool) & (sl == 0)] = i + 1
                scores[i, z] = 1.0
    done = 0
    slices: list[dict[int, np.ndarray]] = [dict() for _ in seeds]
    for i, z, m, s in iter_propagate_masks(vol, seeds, None, emb, cancel, **params):
        slices[i][z] = m
        scores[i, z] = s
        done += 1
        if progress is not None:
            progress(i, z, done)
    if p.smooth_z:
        slices = [finish_slices(seeds[i], obj, scores[i]) for i, obj in enumerate(slices)]
    seed_masks = [{int(z): np.asarray(m, bool) for z, m in obj.items()} for obj in seeds]
    for i, obj in enumerate(fuse_views(emb, seed_masks, slices, scores, p, cancel)):
        for z, m in obj.items():
            sl = labels[z]
            sl[m & (sl == 0)] = i + 1
    return labels, scores


def iter_propagate_object(volume: np.ndarray, z: int, points=None, point_labels=None, box=None, model=None,
                          embeddings: StackEmbeddings | None = None, cancel: Callable[[], bool] | None = None,
                          **params) -> Iterator[tuple[int, np.ndarray, float]]:
    """Generator form of :func:`propagate_object`: yields (z, mask (Y, X) bool, predicted IoU), the prompted
    slice first, then the propagated slices in lock-step order (alternating directions)."""
    vol, predictor, emb = _resolve(volume, model, embeddings)
    z = _check_z(z, vol.shape[0])
    if points is None and box is None:
        raise ValueError("give a prompt on slice z: points=(N, 2) (row, col) and/or box=(4,)")
    p = make_params(params)
    if points is not None:
        if np.shape(points)[-1:] == (3,):
            raise ValueError(f"points has shape {np.shape(points)}: points are (row, col) on slice z; give z on its "
                             "own, e.g. propagate_object(volume, z, points=[[row, col]])")
        validate_points(points, point_labels, vol.shape[1:3])
    predictor.set_embedding(emb[z])
    single_point = box is None and np.asarray(points).reshape(-1, 2).shape[0] == 1
    pred = predictor.predict(points=points, point_labels=point_labels, box=box, multimask=single_point)
    if np.ndim(pred.iou) != 1:
        raise ValueError("propagate_object takes the prompt of ONE object; for several use propagate_masks")
    k = choose_seed(predictor, emb, z, pred.masks, pred.iou, points, point_labels, p.seed_select)
    seed, score = pred.masks[k], float(pred.iou[k])
    if not seed.any():
        raise ValueError(f"the prompt gives an empty mask on slice {z}; move the point or draw a box")
    yield z, seed, score
    spec = p.spec()
    tracks = _seed_tracks(0, {z: (seed, pred.low_res_logits[k])}, vol.shape[0], DIRECTIONS[p.direction])
    for _obj, zz, m, s in iter_tracks(predictor, emb, tracks, p, spec, cancel):
        yield zz, m, s


def choose_seed(predictor: SamPredictor, embeddings: StackEmbeddings, z: int, masks: np.ndarray, ious: np.ndarray,
                points=None, point_labels=None, how: str = "consistency") -> int:
    """Index of the candidate mask to start a 3D object from, for the prompt of slice ``z``.

    masks: (K, Y, X) bool candidates of one prompt on slice z, ious: (K,) their predicted IoUs; points (N, 2)
    (row, col) and point_labels (N,) the prompt. "iou" keeps the highest predicted IoU. "consistency" (for an
    ambiguous one-point prompt, K > 1): each non-empty candidate's box, with the same points, prompts the slices
    up to :data:`SEED_REACH` above and below, and the candidate whose masks there overlap it most (mean IoU)
    wins; ties go to the predicted IoU. A real object continues into its neighbours; a wrong part or a merge of
    several objects usually does not. The predictor is left on slice z. One decoder call per neighbour slice.
    """
    ious = np.asarray(ious, np.float64)
    if how not in SEED_SELECT:
        raise ValueError(f"unknown seed_select {how!r}; choose one of {SEED_SELECT}")
    ok = [k for k in range(len(masks)) if masks[k].any()]
    near = [z + d for d in range(-SEED_REACH, SEED_REACH + 1) if d and 0 <= z + d < len(embeddings)]
    if how == "iou" or len(ok) < 2 or not near:
        return int(np.argmax(ious))
    boxes = np.stack([mask_box(masks[k]) for k in ok])
    pts = labs = None
    if points is not None:
        pts = np.broadcast_to(np.asarray(points, np.float64).reshape(1, -1, 2), (len(ok),) + (np.size(points) // 2, 2))
        labs = np.ones(pts.shape[:2]) if point_labels is None else np.broadcast_to(
            np.asarray(point_labels, np.float64).reshape(1, -1), pts.shape[:2])
    agree = np.zeros(len(ok))
    for zz in near:
        predictor.set_embedding(embeddings[zz])
        q = predictor.predict(points=pts, point_labels=labs, box=boxes, multimask=False)
        agree += [mask_iou(q.masks[i, 0], masks[k]) for i, k in enumerate(ok)]
    predictor.set_embedding(embeddings[z])
    return ok[int(np.argmax(agree / len(near) + 1e-6 * ious[ok]))]


def propagate_object(volume: np.ndarray, z: int, points=None, point_labels=None, box=None, model=None,
                     embeddings: StackEmbeddings | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
    """Segment one object in 3D from a prompt on slice ``z``.

    volume: (Z, Y, X) or (Z, Y, X, C), any dtype. points: (N, 2) (row, col) on slice z, point_labels (N,)
    1/0; box: (4,) (min_row, min_col, max_row, max_col), max inclusive. model: a Sam, a name/path for
    load_model, or None (the built-in model, or the model of ``embeddings``). embeddings: a StackEmbeddings of
    ``volume`` (default: one is opened in the disk cache). params: :class:`PropagationParams` fields, and
    ``cancel`` (callable).

    Returns (mask (Z, Y, X) bool, scores (Z,) float32: predicted IoU per slice, NaN where the object is absent).
    """
    vol, _predictor, emb = _resolve(volume, model, embeddings)
    p = make_params({k: v for k, v in params.items() if k != "cancel"})
    mask = np.zeros(vol.shape[:3], bool)
    scores = np.full(vol.shape[0], np.nan, np.float32)
    slices = {}
    for zz, m, s in iter_propagate_object(vol, z, points, point_labels, box, None, emb, **params):
        slices[zz] = m
        scores[zz] = s
    seed = {z: slices.pop(z)}
    if p.smooth_z:
        slices = finish_slices(seed, slices, scores)
    clicks = None
    if points is not None:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        labs = np.ones(len(pts)) if point_labels is None else np.asarray(point_labels).reshape(-1)
        clicks = [[(z, (float(r), float(c))) for (r, c), lab in zip(pts, labs) if lab == 1]]
    slices = fuse_views(emb, [seed], [slices], scores[None], p, params.get("cancel"), points=clicks)[0]
    for zz, m in {**seed, **slices}.items():
        mask[zz] = m
    return mask, scores


def repropagate(volume: np.ndarray, mask: np.ndarray, z: int, corrected: np.ndarray, model=None,
                embeddings: StackEmbeddings | None = None, fixed: Sequence[int] = (),
                cancel: Callable[[], bool] | None = None, **params) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Redo only the range a correction affects: ``corrected`` (Y, X) replaces slice z of the 3D ``mask``, then
    each direction propagates until its new mask agrees with the old one (IoU >= params converge_iou, default
    0.9; the rest is kept),
    it stops (old slices up to the next fixed slice are cleared), or it reaches a ``fixed`` (prompted) slice.

    Returns (new mask (Z, Y, X) bool (the input is not modified), scores (Z,) float32 (NaN where not
    recomputed), (first, last) slice range that was recomputed). :func:`repropagate_patches` does the same on
    the object's slices as bounding-box patches.
    """
    vol = validate_stack(volume)
    old = np.asarray(mask, dtype=bool)
    if old.shape != vol.shape[:3]:
        raise ValueError(f"mask has shape {old.shape}; expected the volume's {vol.shape[:3]}")
    slices = {k: to_patch(old[k]) for k in range(old.shape[0]) if old[k].any()}
    changed, scores, (first, last) = repropagate_patches(vol, slices, z, corrected, model, embeddings, fixed, cancel,
                                                         **params)
    new = old.copy()
    for zz, p in changed.items():
        new[zz] = from_patch(p, old.shape[1:])
    return new, scores, (first, last)


def _patch_iou(a: Patch, b: Patch) -> float:
    """:func:`mask_iou` of two patches."""
    box = union_box([patch_box(a), patch_box(b)])
    return 0.0 if box is None else mask_iou(paste(a, box), paste(b, box))


def repropagate_patches(volume: np.ndarray, slices: Mapping[int, Patch], z: int, corrected: np.ndarray, model=None,
                        embeddings: StackEmbeddings | None = None, fixed: Sequence[int] = (),
                        cancel: Callable[[], bool] | None = None, **params
                        ) -> tuple[dict[int, Patch], np.ndarray, tuple[int, int]]:
    """:func:`repropagate` with the 3D object as its slices' bounding-box patches {z: (row0, col0, (h, w) bool)}
    (slices where it is absent left out). Returns (the slices of the recomputed range (first, last) as patches
    (an empty patch where the object was cleared), scores (Z,) float32, (first, last))."""
    vol, predictor, emb = _resolve(volume, model, embeddings)
    z = _check_z(z, vol.shape[0])
    old = {int(k): p for k, p in slices.items() if patch_box(p) is not None}
    corrected = np.asarray(corrected, dtype=bool)
    if corrected.shape != vol.shape[1:3]:
        raise ValueError(f"corrected slice has shape {corrected.shape}; expected {vol.shape[1:3]}")
    p = make_params(params)
    spec = p.spec()
    new = {z: to_patch(corrected)}
    scores = np.full(vol.shape[0], np.nan, np.float32)
    scores[z] = 1.0
    if not corrected.any():
        return new, scores, (z, z)
    lo = max([f + 1 for f in fixed if f < z], default=0)
    hi = min([f - 1 for f in fixed if f > z], default=vol.shape[0] - 1)
    logits = _mask_to_logits(corrected, predictor, emb) if spec["logits"] else None
    tracks = [_Track(0, z, s, lo if s < 0 else hi, corrected, logits) for s in DIRECTIONS[p.direction]]
    first = last = z
    for _o, zz, m, s in iter_tracks(predictor, emb, tracks, p, spec, cancel):
        t = next(t for t in tracks if t.z == zz and not t.stopped)
        new[zz], scores[zz] = to_patch(m), s
        converged = zz in old and _patch_iou(new[zz], old[zz]) >= p.converge_iou
        first, last = min(first, zz), max(last, zz)
        if converged:
            t.stopped = True
    for t in tracks:  # a direction that stopped without converging: its stale old slices go
        if t.stopped and not (t.z in old and _patch_iou(new.get(t.z, old[t.z]), old[t.z]) >= p.converge_iou):
            rng = range(t.z + t.step, t.end + t.step, t.step)
            for zz in rng:
                if zz not in old:
                    break
                new[zz] = to_patch(np.zeros((0, 0), bool))
                first, last = min(first, zz), max(last, zz)
    return new, scores, (first, last)
