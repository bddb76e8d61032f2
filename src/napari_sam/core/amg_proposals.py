"""Kept model outputs of segment-everything, re-filtered without running the model again.

:class:`MaskProposals` holds, for every candidate mask that passed the *floor* thresholds, its predicted IoU,
its stability score (computed on the low-res logits) and a small window of its low-res logits. Full-resolution
masks are upsampled lazily, only for candidates that survive the current thresholds, and cached as tight
bool patches. :meth:`MaskProposals.filter` applies the reference pipeline (IoU, stability, crop-edge filter,
box NMS per crop, NMS across crops, small-region clean-up) in milliseconds, so thresholds can change live.
Optionally (``resolve_parts``, not in the reference) a mask lying inside a larger one is resolved as a part of it or
the larger one as a merge of several (:func:`resolve_parts_of`), and (``rescore``, not in the reference) a learned
candidate scorer (:mod:`napari_sam.core.amg_quality`) replaces the predicted IoU for thresholding and ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .amg_utils import box_area, is_box_near_crop_edge, nms, remove_small_regions
from .boxes import mask_box


@dataclass
class Mask:
    """One mask as a tight patch: ``patch`` bool (h, w) placed at (``box[0]``, ``box[1]``) of the image.

    box: (min_row, min_col, max_row, max_col), max inclusive, image frame.
    """

    box: np.ndarray
    patch: np.ndarray

    @property
    def area(self) -> int:
        return int(self.patch.sum())

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        r0, c0, r1, c1 = (int(v) for v in self.box)
        out[r0 : r1 + 1, c0 : c1 + 1] = self.patch
        return out


@dataclass
class CropProposals:
    """Candidates of one crop. Windows: per candidate (out_r0, out_r1, out_c0, out_c1, lr_r0, lr_c0, logits)
    or None for a mask with no foreground; out_* are crop-frame output rows/cols (inclusive-exclusive)."""

    crop_box: tuple[int, int, int, int]  # (min_row, min_col, max_row, max_col), max exclusive
    layer: int
    row_op: torch.Tensor  # (crop_h, L) upsampling operator
    col_op: torch.Tensor  # (crop_w, L)
    mask_threshold: float
    iou: list = field(default_factory=list)
    stability: list = field(default_factory=list)
    points: list = field(default_factory=list)  # (row, col), image frame
    windows: list = field(default_factory=list)
    _masks: dict = field(default_factory=dict)  # candidate -> Mask or None: the last filter's survivors (see trim)
    _boxes: dict = field(default_factory=dict)  # candidate -> its mask's box, or None for an empty mask

    def __len__(self) -> int:
        return len(self.windows)

    def finish(self) -> None:
        self.iou = np.asarray(self.iou, dtype=np.float32).reshape(-1)
        self.stability = np.asarray(self.stability, dtype=np.float32).reshape(-1)
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)

    def box(self, i: int) -> np.ndarray | None:
        """The box of candidate i's full-resolution mask (:attr:`Mask.box`; kept once computed), or None if it is
        empty."""
        if i not in self._boxes:
            self.mask(i)
        return self._boxes[i]

    def trim(self, keep) -> None:
        """Drop the cached full-resolution masks except those of candidates ``keep`` (their boxes stay): what
        kept proposals hold between re-filters is the boxes and the current result's masks, not a mask for every
        candidate a threshold ever let through."""
        masks = self._masks
        self._masks = {i: masks[i] for i in keep if i in masks}

    def mask(self, i: int) -> Mask | None:
        """Full-resolution mask of candidate i (cached until :meth:`trim`), or None if it is empty."""
        m = self._masks.get(i, False)  # (one lookup: a worker may trim while another thread reads)
        if m is not False:
            return m
        if i in self._boxes and self._boxes[i] is None:
            return None
        w = self.windows[i]
        m = None
        if w is not None:
            o_r0, o_r1, o_c0, o_c1, l_r0, l_c0, logits = w
            a = self.row_op[o_r0:o_r1, l_r0 : l_r0 + logits.shape[0]]
            b = self.col_op[o_c0:o_c1, l_c0 : l_c0 + logits.shape[1]]
            patch = ((a @ logits @ b.T) > self.mask_threshold).numpy()
            b = mask_box(patch)
            if b is not None:
                patch = patch[b[0] : b[2], b[1] : b[3]]
                r, c = self.crop_box[0] + o_r0, self.crop_box[1] + o_c0
                box = np.array([r + b[0], c + b[1], r + b[2] - 1, c + b[3] - 1], dtype=np.int64)
                m = Mask(box, np.ascontiguousarray(patch))
        self._masks[i] = m
        self._boxes[i] = None if m is None else m.box
        return m


def compact_gray_source(image: np.ndarray) -> np.ndarray:
    """What :class:`MaskProposals` keeps for its grayscale image: for uint8 RGB (H, W, 3) with equal channels,
    one channel (H, W) uint8; other uint8 RGB as it is (a copy); anything else (a float32 gray image) as it is."""
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3:
        if a.shape[-1] == 1 or (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            return np.ascontiguousarray(a[..., 0])
        return a.copy()
    return a


class MaskProposals:
    """All kept candidates of one image; :meth:`filter` turns them into the final mask set."""

    def __init__(self, image_shape: tuple[int, int], crops: list[CropProposals], floors: dict[str, float],
                 scorer=None, gray: np.ndarray | None = None):
        self.image_shape = tuple(image_shape)
        self.crops = crops
        self.floors = dict(floors)  # thresholds the candidates were kept at; filter() cannot go below
        self.scorer = scorer  # a CandidateScorer (the model checkpoint's) or None
        # gray: (H, W) float32 grayscale image, or the uint8 RGB model input (H, W, 3) whose channel mean it is;
        # the grayscale image for a candidate scorer's intensity features, kept compact (see :attr:`gray`)
        self._gray_source = None if gray is None else compact_gray_source(gray)
        self._quality: dict[int, np.ndarray] = {}
        self._last_objects = None  # (key, objects) of the last :meth:`objects`

    @property
    def gray(self) -> np.ndarray | None:
        """(H, W) float32 grayscale image (the mean of the model input's RGB channels), for a candidate scorer's
        intensity features; made when asked from the compact copy kept (uint8, one channel when the image is
        gray), so kept proposals hold no float copy of the image."""
        src = self._gray_source
        if src is None or src.dtype != np.uint8:
            return src
        if src.ndim == 2:
            return src.astype(np.float32)  # (v + v + v) / 3 == v exactly
        return src.mean(-1, dtype=np.float32)

    @gray.setter
    def gray(self, value: np.ndarray | None) -> None:
        self._gray_source = None if value is None else compact_gray_source(value)

    def maps(self) -> tuple[np.ndarray, ...]:
        """The scorer's image maps (:func:`~napari_sam.core.amg_quality.image_maps`); made at each call (not kept:
        two float32 copies of the image)."""
        from .amg_quality import image_maps

        gray = self.gray
        if gray is None:
            raise ValueError("these proposals kept no grayscale image for the scorer's intensity features")
        return image_maps(gray)

    def __len__(self) -> int:
        return sum(len(c) for c in self.crops)

    def quality(self, ci: int) -> np.ndarray:
        """(len(crop),) float32: the learned scorer's IoU estimate for each candidate of crop ``ci`` (computed once
        and cached), 0 for candidates below the scorer's floors or with an empty mask."""
        if self.scorer is None:
            raise ValueError("rescore needs a candidate scorer, and this model's checkpoint has none ('amg_quality'"
                             " metadata; the built-in model has one): turn rescore off, or fit a scorer with "
                             "benchmarks/eval_amg.py --fit-scorer")
        if ci not in self._quality:  # every crop's at once: the image maps are made once and not kept
            from .amg_quality import candidate_features, scored_candidates

            maps = None
            for k, crop in enumerate(self.crops):
                if k in self._quality:
                    continue
                q = np.zeros(len(crop), dtype=np.float32)
                idx = scored_candidates(crop, self.scorer.floors)
                if len(idx):
                    maps = self.maps() if maps is None else maps
                    q[idx] = self.scorer(candidate_features(crop, idx, maps))
                self._quality[k] = q
        return self._quality[ci]

    def labels(self, min_object_area: int = 0, cancel=None, **thresholds) -> np.ndarray:
        """The instance label image (H, W) int32 of :meth:`filter` (``thresholds``: its arguments), painted and
        cleaned by :func:`~napari_sam.core.labels.records_to_labels` with ``min_object_area``. What
        :func:`~napari_sam.core.amg.segment_everything` returns for an untiled image. ``cancel`` (for the same
        call as :meth:`TiledProposals.labels`): cancel() -> True before the work stops with
        napari_sam.core.amg.Cancelled."""
        from .labels import paint_objects

        if cancel is not None and cancel():
            from .amg import Cancelled

            raise Cancelled("re-filtering was cancelled")
        return paint_objects(self.objects(min_object_area, **thresholds), self.image_shape)

    def objects(self, min_object_area: int = 0, **thresholds) -> list:
        """The objects of :meth:`labels` as :func:`~napari_sam.core.labels.records_to_objects` gives them
        ([(row, col, patch), ...] in label order). The last result is kept with the records it was made of: when
        new thresholds give the same records (same masks, scores and order) and the same ``min_object_area``, it
        is reused (records_to_objects gives the same objects for them)."""
        from .labels import records_to_objects

        records = self.filter(**thresholds)
        key = (int(min_object_area), [(r["predicted_iou"], tuple(int(v) for v in r["segmentation_patch"].box),
                                       r["segmentation_patch"].patch) for r in records])
        last = getattr(self, "_last_objects", None)  # (one read: the widget's worker and the main thread may both)
        if last is not None and _same_records(last[0], key):
            return last[1]
        objects = records_to_objects(records, self.image_shape, min_object_area)
        self._last_objects = (key, objects)
        return objects

    def filter(self, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
               box_nms_thresh: float = 0.7, crop_nms_thresh: float = 0.7,
               min_mask_region_area: int = 0, resolve_parts: bool = False, rescore: bool = False) -> list[dict]:
        """Records of the masks passing these thresholds (the reference's meaning), best first.

        resolve_parts: after the reference's steps, drop the parts of objects and the merges of several objects
        (:func:`resolve_parts_of`); off by default, as in the reference.
        rescore: threshold (``pred_iou_thresh``) and rank (NMS) by the learned scorer's IoU estimate
        (:meth:`quality`) instead of the decoder's predicted IoU; records then carry it as ``predicted_iou``.
        Off by default, as in the reference; needs a model whose checkpoint has a scorer.

        Each record: segmentation_patch (Mask), area, bbox (min_row, min_col, max_row, max_col) max exclusive,
        predicted_iou, stability_score, point (row, col), crop_box. Thresholds below the floors the
        candidates were kept at act as the floors.
        """
        h, w = self.image_shape
        all_masks, all_boxes, iou, stab, pts, crop_idx, cand = [], [], [], [], [], [], []
        for ci, crop in enumerate(self.crops):
            if len(crop) == 0:
                continue
            score = self.quality(ci) if rescore else crop.iou
            sel = np.ones(len(crop), dtype=bool)
            if pred_iou_thresh > 0:
                sel &= score > pred_iou_thresh
            if stability_score_thresh > 0:
                sel &= crop.stability >= stability_score_thresh
            idx = [i for i in np.flatnonzero(sel) if crop.box(i) is not None]
            if not idx:
                continue
            idx = np.asarray(idx)
            boxes = np.stack([crop.box(i) for i in idx])
            if crop.crop_box != (0, 0, h, w):
                idx_keep = ~is_box_near_crop_edge(boxes, crop.crop_box, (0, 0, h, w))
                idx, boxes = idx[idx_keep], boxes[idx_keep]
            keep = nms(boxes, score[idx], box_nms_thresh)
            idx, boxes = idx[keep], boxes[keep]
            all_masks += [crop.mask(i) for i in idx]
            all_boxes.append(boxes)
            iou.append(score[idx])
            stab.append(crop.stability[idx])
            pts.append(crop.points[idx])
            crop_idx.append(np.full(len(idx), ci))
            cand.append(idx)
        if not all_masks:
            self._trim([], [])
            return []
        boxes = np.concatenate(all_boxes)
        iou, stab, pts, crop_idx, cand = (np.concatenate(x) for x in (iou, stab, pts, crop_idx, cand))
        order = np.arange(len(all_masks))
        if len(self.crops) > 1:
            crop_boxes = np.array([self.crops[c].crop_box for c in crop_idx], dtype=np.float64)
            order = nms(boxes, 1.0 / box_area(crop_boxes), crop_nms_thresh)
        masks = [all_masks[i] for i in order]
        boxes, iou, stab, pts, crop_idx, cand = (x[order] for x in (boxes, iou, stab, pts, crop_idx, cand))
        if min_mask_region_area > 0:
            keep, masks, boxes = _clean_small_regions(masks, (h, w), min_mask_region_area,
                                                      max(box_nms_thresh, crop_nms_thresh))
            iou, stab, pts, crop_idx, cand = iou[keep], stab[keep], pts[keep], crop_idx[keep], cand[keep]
        if resolve_parts:
            keep = np.flatnonzero(resolve_parts_of(masks))
            masks = [masks[i] for i in keep]
            iou, stab, pts, crop_idx, cand = iou[keep], stab[keep], pts[keep], crop_idx[keep], cand[keep]
        self._trim(crop_idx, cand)
        records = []
        for k, m in enumerate(masks):
            r0, c0, r1, c1 = (int(v) for v in m.box)
            records.append({
                "segmentation_patch": m,
                "area": m.area,
                "bbox": (r0, c0, r1 + 1, c1 + 1),
                "predicted_iou": float(iou[k]),
                "stability_score": float(stab[k]),
                "point": (float(pts[k, 0]), float(pts[k, 1])),
                "crop_box": tuple(int(v) for v in self.crops[crop_idx[k]].crop_box),
            })
        return records

    def _trim(self, crop_idx, cand) -> None:
        """Keep the full-resolution masks of the result (candidates ``cand`` of crops ``crop_idx``) only."""
        crop_idx, cand = np.asarray(crop_idx, dtype=np.int64), np.asarray(cand, dtype=np.int64)
        for ci, crop in enumerate(self.crops):
            crop.trim(cand[crop_idx == ci].tolist())


def _same_records(a: tuple, b: tuple) -> bool:
    """Whether two :meth:`MaskProposals.objects` keys (min_object_area, [(predicted_iou, box, patch), ...]) are
    equal: the same numbers, and patches the same array or equal arrays."""
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for (ia, ba, pa), (ib, bb, pb) in zip(a[1], b[1]):
        if ia != ib or ba != bb or not (pa is pb or np.array_equal(pa, pb)):
            return False
    return True


def _clean_small_regions(masks: list[Mask], shape: tuple[int, int], min_area: int, nms_thresh: float):
    """The reference's postprocess_small_regions on patches: fill small holes, drop small islands, prefer
    unchanged masks in a new NMS. Returns (kept indices into masks, kept masks, their boxes)."""
    h, w = shape
    new, scores = [], []
    for m in masks:
        r0, c0, r1, c1 = m.box
        open_sides = (r0 > 0, c0 > 0, r1 < h - 1, c1 < w - 1)
        patch, ch1 = remove_small_regions(m.patch, min_area, "holes", open_sides)
        patch, ch2 = remove_small_regions(patch, min_area, "islands")
        if ch1 or ch2:
            b = mask_box(patch)
            if b is None:  # cannot happen (the largest island stays), kept for safety
                new.append(Mask(np.zeros(4, np.int64), np.zeros((0, 0), bool)))
            else:
                box = np.array([r0 + b[0], c0 + b[1], r0 + b[2] - 1, c0 + b[3] - 1], dtype=np.int64)
                new.append(Mask(box, patch[b[0] : b[2], b[1] : b[3]].copy()))
        else:
            new.append(m)
        scores.append(0.0 if (ch1 or ch2) else 1.0)
    boxes = np.stack([m.box for m in new])
    keep = nms(boxes, np.asarray(scores), nms_thresh)
    return keep, [new[i] for i in keep], boxes[keep]


#: a mask lies inside another when at least this fraction of its pixels does
PART_CONTAINED = 0.85
#: two or more masks inside a larger one that together cover at least this fraction of it replace it
PARTS_COVER = 0.5


def _inside(a: Mask, b: Mask) -> tuple[np.ndarray, int, int]:
    """The pixels of ``a`` that ``b`` also has, on the intersection of their boxes (which must overlap), and that
    intersection's origin (row, col) in ``b.patch``."""
    r0, c0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    r1, c1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    va = a.patch[r0 - a.box[0]: r1 - a.box[0] + 1, c0 - a.box[1]: c1 - a.box[1] + 1]
    vb = b.patch[r0 - b.box[0]: r1 - b.box[0] + 1, c0 - b.box[1]: c1 - b.box[1] + 1]
    return va & vb, int(r0 - b.box[0]), int(c0 - b.box[1])


def resolve_parts_of(masks: list[Mask], contained: float = PART_CONTAINED, cover: float = PARTS_COVER) -> np.ndarray:
    """Part / whole resolution of a mask set: bool keep (N,).

    A grid of point prompts gives, for one nucleus, both the whole nucleus and (from a point on a bright spot or
    an edge) a part of it; and for two touching nuclei both of them and their union. Box NMS keeps all of
    these, since a part's box overlaps the whole's box little. Going from the largest mask to the smallest, each
    still-kept mask B with kept smaller masks inside it (at least ``contained`` of their pixels in B):

    - if there are two or more and together they cover at least ``cover`` of B, B is a merge of them: B goes;
    - otherwise they are parts of B: they go.

    Deterministic: ties in area keep the input order (larger first). Masks with no larger mask around them are
    always kept.
    """
    n = len(masks)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    boxes = np.stack([np.asarray(m.box, dtype=np.int64) for m in masks])
    area = np.array([m.area for m in masks], dtype=np.int64)
    # i may lie inside j only if i is smaller and their boxes overlap
    cand = ((area[:, None] < area[None, :])
            & (np.maximum(boxes[:, None, 0], boxes[None, :, 0]) <= np.minimum(boxes[:, None, 2], boxes[None, :, 2]))
            & (np.maximum(boxes[:, None, 1], boxes[None, :, 1]) <= np.minimum(boxes[:, None, 3], boxes[None, :, 3])))
    for j in sorted(range(n), key=lambda k: (-area[k], k)):
        if not keep[j]:
            continue
        big = masks[j]
        kids, covered = [], np.zeros_like(big.patch)
        for i in np.flatnonzero(cand[:, j] & keep):
            inside, r0, c0 = _inside(masks[i], big)
            if inside.sum() >= contained * area[i]:
                kids.append(i)
                covered[r0: r0 + inside.shape[0], c0: c0 + inside.shape[1]] |= inside
        if not kids:
            continue
        if len(kids) >= 2 and covered.sum() >= cover * area[j]:
            keep[j] = False
        else:
            keep[kids] = False
    return keep
