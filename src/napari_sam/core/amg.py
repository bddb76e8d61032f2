"""Segment everything: the paper's automatic mask generation, filtering on low-res logits.

:class:`AutomaticMaskGenerator` has the parameters and meaning of Meta's ``SamAutomaticMaskGenerator``. It is
faster because it (1) filters by predicted IoU and stability on the low-res logits and upsamples only the
survivors, and only in the window where they have foreground, (2) keeps masks as tight patches instead of
full-size tensors and RLEs, (3) runs NMS in numpy without torchvision.

Coordinates are (row, col); the records' boxes (``bbox``, ``crop_box``) are (min_row, min_col, max_row, max_col)
with max exclusive (``image[r0:r1, c0:c1]``), unlike box prompts (:mod:`napari_sam.core.prompts`: max inclusive).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from .amg_proposals import CropProposals, MaskProposals
from .amg_quality import candidate_scorer
from .amg_utils import build_all_layer_point_grids, generate_crop_boxes, stability_score
from .image import to_rgb_uint8
from .modeling.sam import Sam
from .predictor import SamPredictor
from .prompts import rc_to_xy
from .tiling import TiledProposals, segment_tiled, tile_boxes
from .transforms import _upsample_operators, scale_coords

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised inside generation when the ``cancel`` callback returns True."""


# cap on one image-sized decoder tensor per sub-batch (vit_*: 2 points, nsam_t: 16). The decoder is memory-bound;
# tensors this small stay in the CPU cache and reuse freed blocks (64 MB ones page-faulted: 1.4-1.6x slower)
DECODER_BYTES = 8 * 2**20
THRESHOLDS = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
              "min_mask_region_area", "resolve_parts", "rescore")


REFERENCE_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "box_nms_thresh": 0.7}
#: what a checkpoint's ``amg_settings`` may recommend: generator settings, and the label clean-up's min_object_area
GENERATOR_SETTINGS = ("crop_n_layers", "points_per_side", "resolve_parts", "rescore")
RECOMMENDABLE_SETTINGS = (*GENERATOR_SETTINGS, "min_object_area")


def recommended_thresholds(model: Sam | None = None) -> dict[str, float]:
    """Segment-everything thresholds for ``model``: the reference defaults, overridden by the ``amg_thresholds``
    a checkpoint stores in its metadata (tuned on its validation data; the built-in model has them).

    ``model``: a loaded :class:`Sam`, or None for the built-in model (its file's metadata is read).
    """
    from .build import checkpoint_meta

    rec = checkpoint_meta(model).get("amg_thresholds") or {}
    return {**REFERENCE_THRESHOLDS, **{k: float(v) for k, v in rec.items() if k in REFERENCE_THRESHOLDS}}


def recommended_settings(model: Sam | None = None) -> dict[str, int]:
    """Generator settings a checkpoint recommends beside its thresholds (``amg_settings`` in its metadata, chosen
    on its validation data), e.g. {"crop_n_layers": 0, "resolve_parts": 1, "rescore": 1, "min_object_area": 48};
    {} when it stores none.

    ``model``: a loaded :class:`Sam`, or None for the built-in model."""
    from .build import checkpoint_meta

    settings = checkpoint_meta(model).get("amg_settings") or {}
    return {k: int(v) for k, v in settings.items() if k in RECOMMENDABLE_SETTINGS}


def default_min_object_area(model: Sam | None = None, min_mask_region_area: int = 0) -> int:
    """The label clean-up's ``min_object_area`` (px) when none is given: the checkpoint's recommended value, else
    max(min_mask_region_area, 16). ``model``: a loaded :class:`Sam`, or None for the built-in model."""
    return int(recommended_settings(model).get("min_object_area", max(min_mask_region_area, 16)))


class AutomaticMaskGenerator:
    """Masks for everything in an image from a grid of point prompts (the reference's parameters).

    model: a :class:`Sam` (any of ours: vit_b/l/h, vit_t, nsam_t), a model name / checkpoint path, or None for
    the built-in model. point_grids: optional list of (N, 2) (row, col) grids normalised to [0, 1], one per
    crop layer, exclusive with points_per_side.

    resolve_parts (not in the reference; off by default): after NMS, drop masks that are parts of a larger mask,
    or the larger mask when several masks inside it cover it (:func:`~napari_sam.core.amg_proposals.resolve_parts_of`).
    A grid of points gives both a nucleus and pieces of it; box NMS keeps both.

    rescore (not in the reference; off by default): threshold and rank candidates by the learned candidate
    scorer the model's checkpoint stores (:mod:`~napari_sam.core.amg_quality`) instead of the decoder's
    predicted IoU; ``pred_iou_thresh`` then applies to the scorer's IoU estimate. Candidates are then kept down
    to the scorer's floors (predicted IoU 0.3, stability 0.5 for the built-in model), which it was fitted on.
    """

    def __init__(
        self,
        model: Sam | str | os.PathLike | None = None,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        resolve_parts: bool = False,
        rescore: bool = False,
    ) -> None:
        _check_int("points_per_batch", points_per_batch, 1)
        _check_int("crop_n_layers", crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        _check_int("min_mask_region_area", min_mask_region_area, 0)
        for name, v in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                        ("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh)):
            _check_unit(name, v)
        if not (np.isfinite(stability_score_offset) and stability_score_offset >= 0):
            raise ValueError(f"stability_score_offset={stability_score_offset!r} must be a number >= 0 (default 1.0)")
        if not (0 <= crop_overlap_ratio < 1):
            raise ValueError(f"crop_overlap_ratio={crop_overlap_ratio!r} must lie in [0, 1) (default 512/1500)")
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side (e.g. 32) or point_grids")
        if points_per_side is not None:
            _check_int("points_per_side", points_per_side, 1)
            self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                           crop_n_points_downscale_factor)
        else:
            self.point_grids = _check_grids(point_grids)
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(f"point_grids has {len(self.point_grids)} grid(s); crop_n_layers={crop_n_layers} "
                                 f"needs {crop_n_layers + 1}")
        self.predictor = model if isinstance(model, SamPredictor) else SamPredictor(model)
        self.scorer = candidate_scorer(self.model)
        if rescore and self.scorer is None:
            raise ValueError("rescore=True needs a candidate scorer in the model's checkpoint ('amg_quality' "
                             "metadata; the built-in model has one): use rescore=False, or fit a scorer with "
                             "benchmarks/eval_amg.py --fit-scorer")
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.resolve_parts = bool(resolve_parts)
        self.rescore = bool(rescore)

    @classmethod
    def for_model(cls, model: Sam | str | os.PathLike | None = None, **params) -> "AutomaticMaskGenerator":
        """A generator with the reference's defaults, except the thresholds and settings the model's checkpoint
        recommends (:func:`recommended_thresholds`, :func:`recommended_settings`), except what ``params`` set.
        What ``segment_everything``, the CLI and the widget use; the plain constructor keeps the reference's
        defaults exactly."""
        gen = cls(model, **params)
        settings = {k: v for k, v in recommended_settings(gen.model).items()
                    if k in GENERATOR_SETTINGS and k not in params}
        if settings and "point_grids" not in params:
            gen = cls(gen.model, **params, **settings)
        for k, v in recommended_thresholds(gen.model).items():
            if k not in params:
                setattr(gen, k, v)
        return gen

    @property
    def model(self) -> Sam:
        return self.predictor.model

    def thresholds(self) -> dict[str, float]:
        """The parameters :meth:`MaskProposals.filter` takes (the live ones)."""
        return {k: getattr(self, k) for k in THRESHOLDS}

    # ------------------------------------------------------------------ public
    def generate(self, image: np.ndarray, progress: Progress | None = None,
                 cancel: Cancel | None = None) -> list[dict]:
        """Mask records for a 2D image ((H, W), (H, W, 3) or (H, W, 4), any dtype), best first.

        Each record: segmentation bool (H, W); area int; bbox (min_row, min_col, max_row, max_col), max
        exclusive; predicted_iou; stability_score (on the low-res logits); point (row, col) of the prompt;
        crop_box (min_row, min_col, max_row, max_col), max exclusive. A constant image gives [] without running
        the model.
        """
        records = self.propose(image, progress=progress, cancel=cancel).filter(**self.thresholds())
        shape = np.shape(image)[:2]
        for r in records:
            r["segmentation"] = r.pop("segmentation_patch").full(shape)
        return records

    def propose(self, image: np.ndarray, progress: Progress | None = None, cancel: Cancel | None = None,
                iou_floor: float | None = None, stability_floor: float | None = None) -> MaskProposals:
        """Run the model and keep every candidate with predicted IoU > ``iou_floor`` and stability >=
        ``stability_floor`` (default: this generator's thresholds; with ``rescore``, at most the scorer's
        floors). Call ``.filter(**thresholds)`` on the result as often as you like.
        progress(done_points, total_points); cancel() -> True stops with :class:`Cancelled`."""
        iou_floor = self.pred_iou_thresh if iou_floor is None else min(iou_floor, self.pred_iou_thresh)
        stab_floor = (self.stability_score_thresh if stability_floor is None
                      else min(stability_floor, self.stability_score_thresh))
        if self.rescore:
            iou_floor = min(iou_floor, self.scorer.floors["pred_iou_thresh"])
            stab_floor = min(stab_floor, self.scorer.floors["stability_score_thresh"])
        floors = {"pred_iou_thresh": iou_floor, "stability_score_thresh": stab_floor}
        rgb = to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        if rgb.min() == rgb.max():  # constant image: nothing to segment
            return MaskProposals((h, w), [], floors, self.scorer, rgb)
        crop_boxes, layers = generate_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        total = sum(len(self.point_grids[lay]) for lay in layers)
        done = 0
        crops = []
        for box, layer in zip(crop_boxes, layers):
            crop = self._process_crop(rgb, box, layer, iou_floor, stab_floor, cancel,
                                      lambda n, d0=done: progress and progress(d0 + n, total))
            done += len(self.point_grids[layer])
            crops.append(crop)
        # (the scorer's intensity features read the RGB's channel mean: kept as a compact uint8 copy)
        return MaskProposals((h, w), crops, floors, self.scorer, rgb)

    def points_per_image(self) -> int:
        """How many point prompts :meth:`propose` decodes for one image (every crop of every crop layer)."""
        _, layers = generate_crop_boxes((64, 64), self.crop_n_layers, self.crop_overlap_ratio)
        return sum(len(self.point_grids[lay]) for lay in layers)

    def propose_tiled(self, image: np.ndarray, tile_size: int = 1024, halo: int = 128,
                      progress: Progress | None = None, cancel: Cancel | None = None,
                      iou_floor: float | None = None, stability_floor: float | None = None) -> TiledProposals:
        """:meth:`propose` for each tile of a large image (:func:`~napari_sam.core.tiling.tile_boxes`: ``tile_size``
        cores with a ``halo``), kept as :class:`~napari_sam.core.tiling.TiledProposals`: its ``labels(min_area,
        **thresholds)`` is exactly :func:`segment_everything`'s tiled result at those thresholds, tile size and
        halo. image: 2D, as for :meth:`propose`. progress(done_points, total_points) counts the points of all
        tiles; cancel() -> True stops with :class:`Cancelled` between tiles and inside one. Memory kept: the
        candidates of every tile, whose grayscale copies share one compact (uint8) copy of the image."""
        from .amg_proposals import compact_gray_source

        if not (16 <= tile_size and 0 < halo < tile_size):
            raise ValueError(f"tiling needs 16 <= tile_size and 0 < halo < tile_size; got tile_size={tile_size}, "
                             f"halo={halo}")
        rgb = to_rgb_uint8(image)
        boxes = tile_boxes(rgb.shape[:2], tile_size, halo)
        per_tile = self.points_per_image()
        total = per_tile * len(boxes)
        gray = compact_gray_source(rgb)  # one copy for all tiles: each tile keeps a view of it
        del rgb
        tiles = []
        for k, (_, (t0, l0, t1, l1)) in enumerate(boxes):
            _check_cancel(cancel)
            tile = gray[t0:t1, l0:l1]
            if tile.ndim == 2:  # (the model reads RGB)
                tile = np.repeat(tile[..., None], 3, axis=-1)
            p = self.propose(tile, progress=None if progress is None else
                             (lambda d, t, d0=k * per_tile: progress(d0 + d, total)),
                             cancel=cancel, iou_floor=iou_floor, stability_floor=stability_floor)
            p._gray_source = gray[t0:t1, l0:l1]  # the shared copy, not one per tile
            tiles.append(p)
            if progress is not None:
                progress((k + 1) * per_tile, total)
        return TiledProposals(gray.shape[:2], boxes, tiles, tile_size, halo)

    # ------------------------------------------------------------------ internals
    def _process_crop(self, rgb, box, layer, iou_floor, stab_floor, cancel, progress) -> CropProposals:
        r0, c0, r1, c1 = box
        sub = rgb[r0:r1, c0:c1]
        size = sub.shape[:2]
        _check_cancel(cancel)
        emb = self.predictor.set_image(sub)
        model = self.model
        L = model.prompt_encoder.mask_input_size[0]
        a, b = _upsample_operators(L, model.img_size, tuple(emb.input_size), tuple(size))
        crop = CropProposals(tuple(box), layer, a, b, float(model.mask_threshold))
        row_ranges, col_ranges = _support(a), _support(b)
        # low-res rows/cols that cover the resized image (the rest is padding): stability is scored there
        valid = tuple(int(np.ceil(s * L / model.img_size)) for s in emb.input_size)
        pts_rc = self.point_grids[layer] * np.array(size, dtype=np.float64)[None]
        coords = scale_coords(rc_to_xy(pts_rc), size, emb.input_size)
        coords = torch.as_tensor(coords, dtype=torch.float32, device=self.predictor.device)
        n = len(pts_rc)
        for s in range(0, n, self.points_per_batch):
            _check_cancel(cancel)
            e = min(n, s + self.points_per_batch)
            low, iou = self._decode(coords[s:e, None, :], iou_floor)
            k = low.shape[1]
            low, iou = low.flatten(0, 1).float().cpu(), iou.flatten(0, 1).float().cpu()
            pts = np.repeat(pts_rc[s:e], k, axis=0) + np.array([r0, c0])
            keep = torch.ones(len(iou), dtype=torch.bool)
            if iou_floor > 0:
                keep &= iou > iou_floor
            stab = torch.zeros(len(iou))
            if keep.any():
                stab[keep] = stability_score(low[keep][:, : valid[0], : valid[1]], model.mask_threshold,
                                             self.stability_score_offset)
            if stab_floor > 0:
                keep &= stab >= stab_floor
            idx = torch.nonzero(keep).flatten()
            if len(idx):
                sel = low[idx]
                crop.windows += _windows(sel, model.mask_threshold, row_ranges, col_ranges)
                crop.iou += iou[idx].tolist()
                crop.stability += stab[idx].tolist()
                crop.points += pts[idx.numpy()].tolist()
            progress(e)
        crop.finish()
        return crop

    def _decode(self, pc: torch.Tensor, iou_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (B, 1, 2) points; split into sub-batches whose per-point image-sized decoder tensors stay
        under DECODER_BYTES (the decoder is independent per point, so results are identical). With
        ``iou_floor`` > 0, points none of whose candidates has predicted IoU above it skip the mask upscaling
        (their logits are -inf placeholders: the caller drops those candidates by the same floor)."""
        c = self.model.prompt_encoder.embed_dim
        g = self.model.prompt_encoder.image_embedding_size
        step = max(1, min(len(pc), DECODER_BYTES // (4 * c * g[0] * g[1])))
        lows, ious = [], []
        with torch.inference_mode():
            for s in range(0, len(pc), step):
                sub = pc[s : s + step]
                labels = torch.ones(sub.shape[:2], dtype=torch.int64, device=sub.device)
                low, iou = self.predictor.predict_torch(sub, labels, multimask_output=True,
                                                        iou_floor=iou_floor if iou_floor > 0 else None)
                lows.append(low)
                ious.append(iou)
        return torch.cat(lows), torch.cat(ious)


def _support(op: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For an upsampling operator (n_out, L): per low-res index the first/last output index it touches, and per
    output index the first/last low-res index it reads (all inclusive)."""
    nz = (op != 0).numpy()
    n_out, L = nz.shape
    out_first = np.where(nz.any(0), nz.argmax(0), n_out)
    out_last = np.where(nz.any(0), n_out - 1 - nz[::-1].argmax(0), -1)
    in_first = nz.argmax(1)
    in_last = L - 1 - nz[:, ::-1].argmax(1)
    # an output index range is contiguous; carry monotone bounds so that empty columns do not break it
    out_first = np.minimum.accumulate(out_first[::-1])[::-1]
    out_last = np.maximum.accumulate(out_last)
    return out_first, out_last, in_first, in_last


def _windows(low: torch.Tensor, thr: float, rows, cols) -> list:
    """Per mask (N, L, L): the output window that can hold foreground and the low-res logits it reads."""
    fg = low > thr
    r_any, c_any = fg.any(2).numpy(), fg.any(1).numpy()
    out = []
    for i in range(low.shape[0]):
        r = np.flatnonzero(r_any[i])
        if r.size == 0:
            out.append(None)
            continue
        c = np.flatnonzero(c_any[i])
        o_r0, o_r1 = int(rows[0][r[0]]), int(rows[1][r[-1]]) + 1
        o_c0, o_c1 = int(cols[0][c[0]]), int(cols[1][c[-1]]) + 1
        if o_r1 <= o_r0 or o_c1 <= o_c0:  # foreground only in the padding, outside the image
            out.append(None)
            continue
        l_r0, l_r1 = int(rows[2][o_r0]), int(rows[3][o_r1 - 1]) + 1
        l_c0, l_c1 = int(cols[2][o_c0]), int(cols[3][o_c1 - 1]) + 1
        out.append((o_r0, o_r1, o_c0, o_c1, l_r0, l_c0, low[i, l_r0:l_r1, l_c0:l_c1].clone()))
    return out


def _check_cancel(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("segment-everything was cancelled")


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}={v!r} must be an integer >= {lo}")


def _check_unit(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 <= v <= 1:
        raise ValueError(f"{name}={v!r} must be a number in [0, 1]")


def _check_grids(point_grids) -> list[np.ndarray]:
    """point_grids as the reference takes them: a list of (N, 2) grids in [0, 1], one per crop layer."""
    if isinstance(point_grids, np.ndarray) and point_grids.ndim == 2:
        raise ValueError(f"point_grids is one array of shape {point_grids.shape}; pass a list of (N, 2) grids, one "
                         "per crop layer, e.g. point_grids=[grid]")
    grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
    for i, g in enumerate(grids):
        if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
            raise ValueError(f"point_grids[{i}] has shape {g.shape}; each grid must be a non-empty (N, 2) array of "
                             "(row, col) points normalised to [0, 1]")
        if not (np.all(np.isfinite(g)) and g.min() >= 0 and g.max() <= 1):
            raise ValueError(f"point_grids[{i}] has values outside [0, 1] (or NaN/inf); grid points are (row, col) "
                             "normalised to [0, 1]: divide pixel coordinates by the image's (height, width)")
    return grids


def segment_everything(image: np.ndarray, model: Sam | str | os.PathLike | None = None, *,
                       max_untiled: int = 2048, tile_size: int = 1024, halo: int = 128,
                       min_object_area: int | None = None, progress: Progress | None = None,
                       cancel: Cancel | None = None, **params) -> np.ndarray:
    """One instance label image (H, W) int32 (0 background) for a 2D image, using the built-in model by default.

    model: a Sam, a model name / checkpoint path, None (built-in), or an :class:`AutomaticMaskGenerator`
    (then ``params`` must be empty). ``params`` are :class:`AutomaticMaskGenerator` parameters; thresholds not
    given are the model's recommended ones (:func:`recommended_thresholds`). Overlaps go to
    the smaller mask (deterministic); islands and holes smaller than ``min_object_area`` (default: the model's
    recommended value, else max(min_mask_region_area, 16) px) are cleaned. Images with a side over ``max_untiled``
    px are segmented in ``tile_size`` tiles with a ``halo`` and stitched (objects cut by a tile border are merged).
    With the model's recommended ``resolve_parts``, parts of objects and merges of several are dropped first; with
    its recommended ``rescore``, candidates are thresholded and ranked by its learned candidate scorer.
    progress(done, total) counts points (or tiles when tiled). A constant image gives all zeros.
    """
    if isinstance(model, AutomaticMaskGenerator):
        if params:
            raise ValueError("pass parameters to the AutomaticMaskGenerator, not to segment_everything")
        gen = model
    else:
        gen = AutomaticMaskGenerator.for_model(model, **params)
    rgb = to_rgb_uint8(image)
    if min_object_area is None:
        min_object_area = default_min_object_area(gen.model, gen.min_mask_region_area)
    if isinstance(min_object_area, (float, np.floating)) and float(min_object_area).is_integer():
        min_object_area = int(min_object_area)  # a whole number given as a float (e.g. 16.0)
    _check_int("min_object_area", min_object_area, 0)
    min_area = int(min_object_area)
    if not (16 <= tile_size and 0 < halo < tile_size and max_untiled >= tile_size):
        raise ValueError(f"tiling needs 16 <= tile_size, 0 < halo < tile_size and max_untiled >= tile_size; got "
                         f"tile_size={tile_size}, halo={halo}, max_untiled={max_untiled}")

    def one(tile: np.ndarray, prog: Progress | None = None) -> np.ndarray:
        return gen.propose(tile, progress=prog, cancel=cancel).labels(min_area, **gen.thresholds())

    if max(rgb.shape[:2]) <= max_untiled:
        return one(rgb, progress)
    return segment_tiled(rgb, one, tile_size=tile_size, halo=halo, progress=progress, cancel=cancel)
