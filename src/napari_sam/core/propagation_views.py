"""Orthogonal views for 3D propagation: an object is also propagated through the stack's XZ and YZ planes.

Slice-by-slice propagation sees a nucleus only in (Y, X) slices, where its ends in z are small, dim and blurred;
there the 2D masks are worst. Resliced along Y (planes (Z, X)) and along X (planes (Z, Y)), with z resampled to
the in-plane pixel size (``spacing``), the same nucleus is a whole blob again, its ends in z an edge in the plane.
:func:`orthogonal_views` prompts each view with one positive point inside the object's prompted (or seed) mask,
propagates it through that view's planes with the same strategy and stop rules, and keeps a voxel where at least
2 of the 3 views (XY, XZ, YZ) have it. Prompted slices stay as drawn.

On GoNuclear (benchmarks/eval_propagation.py, one click on each nucleus's widest slice) mean 3D IoU goes from
0.569 (XY only) to 0.704, and with ``denoise=2`` from 0.618 to 0.724. The resliced planes are interpolated in z,
which turns pixel noise into streaks the model takes for texture; they are smoothed with ``view_denoise`` (sigma 2
px, or the model's own sigma if larger). Every ``view_step``-th plane is used (2: half the decoder calls, the same
quality there); a voxel between two planes takes the nearer one.

Axis order: volumes (Z, Y, X) or (Z, Y, X, C); ``spacing`` (z, y, x) voxel size in any one unit. A view array is
(P, Z', W) (or (P, Z', W, C)): plane p is volume row (axis 1) or column (axis 2) ``p * step``, Z' the resampled z.
Not for time-lapse (T, Y, X) stacks: there the first axis is not space (``views="xy"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .embedding_store import StackEmbeddings
from .image import check_denoise, denoise_of
from .predictor import SamPredictor
from .propagation_labels import as_patch, from_patch, paste, patch_box, tight, union_box

VIEWS = ("orthogonal", "xy")


class ViewsWarning(UserWarning):
    """The orthogonal views were skipped (the stack is too large for them)."""


VIEW_AXES = (1, 2)  # reslice along Y (planes (Z, X)), then along X (planes (Z, Y))
MAX_VIEW_BYTES = 2 << 30  # both resliced views together; a larger stack propagates in XY only (with a warning)


def check_spacing(spacing) -> tuple[float, float, float]:
    """(z, y, x) voxel size as 3 positive finite floats (None: isotropic (1, 1, 1)). Raises ValueError."""
    if spacing is None:
        return (1.0, 1.0, 1.0)
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing={spacing!r} must be 3 numbers: the (z, y, x) voxel size, e.g. (0.28, 0.127, "
                         "0.127) in µm, or None for isotropic voxels") from None
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing={spacing!r} must be 3 positive numbers: the (z, y, x) voxel size, e.g. "
                         "(0.28, 0.127, 0.127) in µm (a napari layer's scale), or None for isotropic voxels")
    return sp


def resampled_depth(n_z: int, spacing, axis: int) -> int:
    """Number of z rows of a view along ``axis`` (1 or 2): z resampled to that view's in-plane pixel size."""
    sp = check_spacing(spacing)
    return max(n_z, 1) if n_z < 2 else max(2, int(round(n_z * sp[0] / sp[3 - axis])))


def z_rows(n_z: int, depth: int) -> np.ndarray:
    """(n_z,) float: the view row of each volume slice (end slices on the first and last rows)."""
    return np.arange(n_z) * ((depth - 1) / (n_z - 1) if n_z > 1 else 0.0)


def reslice(volume: np.ndarray, axis: int, spacing=None, step: int = 1) -> np.ndarray:
    """Planes of ``volume`` (Z, Y, X[, C]) across ``axis`` (1: every ``step``-th row y, planes (Z', X); 2: every
    ``step``-th column x, planes (Z', Y)), z linearly interpolated to Z' = :func:`resampled_depth` rows.

    Returns (P, Z', W[, C]) of the volume's dtype (integers rounded and clipped, bool at 0.5). With isotropic
    ``spacing`` and step 1 this is exactly ``np.moveaxis(volume, axis, 0)``."""
    if axis not in VIEW_AXES:
        raise ValueError(f"axis={axis!r}: reslice along 1 (Y) or 2 (X)")
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step={step!r} must be an int >= 1 (every step-th plane)")
    planes = np.moveaxis(np.asarray(volume), axis, 0)[::step]  # (P, Z, W[, C])
    n_z = planes.shape[1]
    depth = resampled_depth(n_z, spacing, axis)
    if depth == n_z:
        return np.ascontiguousarray(planes)
    src = np.arange(depth) * ((n_z - 1) / (depth - 1))  # the (fractional) slice of each view row
    lo = np.minimum(np.floor(src).astype(int), n_z - 2)
    w = (src - lo).astype(np.float32).reshape((1, -1) + (1,) * (planes.ndim - 2))
    out = np.empty((planes.shape[0], depth) + planes.shape[2:], planes.dtype)
    for p0 in range(0, planes.shape[0], 32):  # a few planes at a time: bounded float32 scratch
        chunk = planes[p0: p0 + 32].astype(np.float32)
        vals = chunk[:, lo] * (1 - w) + chunk[:, lo + 1] * w
        if planes.dtype == bool:
            vals = vals >= 0.5
        elif np.issubdtype(planes.dtype, np.integer):
            info = np.iinfo(planes.dtype)
            vals = np.clip(np.rint(vals), info.min, info.max)
        out[p0: p0 + 32] = vals
    return out


def view_point(mask: np.ndarray, axis: int, step: int) -> tuple[int, float] | None:
    """Where a view is prompted from a 2D (Y, X) ``mask``: its centroid moved to the nearest line the view samples
    (rows, axis 1, or columns, axis 2, at multiples of ``step``), or if that falls outside the mask the deepest
    mask pixel on a sampled line -> (plane index, position along the plane's width); None if no sampled line
    crosses the mask. (On GoNuclear the centroid gives 0.718 mean 3D IoU, the deepest pixel 0.706.)"""
    rr, cc = np.nonzero(mask)
    if rr.size == 0:
        return None
    r, c = rr.mean(), cc.mean()
    if axis == 1:
        p, at = int(round(r / step)), (int(round(r / step)) * step, int(round(c)))
    else:
        p, at = int(round(c / step)), (int(round(r)), int(round(c / step)) * step)
    if at[0] < mask.shape[0] and at[1] < mask.shape[1] and mask[at]:
        return p, float(c if axis == 1 else r)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    lines = np.zeros(mask.shape, bool)
    if axis == 1:
        lines[::step] = True
    else:
        lines[:, ::step] = True
    dist = np.where(lines & mask, dist, 0)
    if not dist.any():
        return None
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (r // step, float(c)) if axis == 1 else (c // step, float(r))


def _inside(mask: np.ndarray, r: float, c: float) -> bool:
    r, c = int(round(r)), int(round(c))
    return 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and bool(mask[r, c])


def _view_seeds(predictor: SamPredictor, emb: StackEmbeddings, seeds: Sequence[Mapping[int, np.ndarray]],
                axis: int, step: int, rows: np.ndarray, points=None) -> list[dict[int, np.ndarray]]:
    """Each object's seed masks in one view: its seed slices' points grouped by plane, one prompt per plane."""
    out = []
    for i, obj in enumerate(seeds):
        prompts: dict[int, list] = {}
        for z, m in obj.items():
            clicks = [] if points is None or points[i] is None else [
                (r, c) for zz, (r, c) in points[i] if zz == z and _inside(m, r, c)]
            if clicks:  # the user's own positive clicks inside the mask
                for r, c in clicks:
                    pt = (int(round(r)), c) if axis == 1 else (int(round(c)), r)
                    prompts.setdefault(min(int(round(pt[0] / step)), emb.n_slices - 1), []).append((rows[z], pt[1]))
                continue
            pt = view_point(np.asarray(m, bool), axis, step)
            if pt is not None:
                prompts.setdefault(pt[0], []).append((rows[z], pt[1]))
        masks = {}
        for p, pts in sorted(prompts.items()):
            predictor.set_embedding(emb[p])
            pred = predictor.predict(points=np.asarray(pts, np.float64), multimask=len(pts) == 1)
            k = int(np.argmax(pred.iou))
            if pred.masks[k].any():
                masks[p] = pred.masks[k]
        out.append(masks)
    return out


def _z_range(seeds: Mapping[int, np.ndarray], n_z: int, direction: str, max_slices: int | None) -> tuple[int, int]:
    """The slices the XY propagation may reach: (first, last), inclusive."""
    lo, hi = min(seeds), max(seeds)
    first = lo if direction in ("forward", "up") else 0
    last = hi if direction in ("backward", "down") else n_z - 1
    if max_slices is not None:
        first, last = max(first, lo - max_slices), min(last, hi + max_slices)
    return first, last


def view_bytes(volume: np.ndarray, spacing=None, step: int = 2) -> int:
    """Bytes the two resliced views of ``volume`` (Z, Y, X[, C]) take (compare :data:`MAX_VIEW_BYTES`)."""
    n_z = volume.shape[0]
    size = sum(-(-volume.shape[a] // step) * resampled_depth(n_z, spacing, a) * volume.shape[3 - a]
               for a in VIEW_AXES)
    return size * volume.itemsize * (volume.shape[3] if volume.ndim == 4 else 1)


def views_fit(volume: np.ndarray, spacing=None, step: int = 2) -> bool:
    """Whether ``volume`` (Z, Y, X[, C]) gets orthogonal views: at least 3 slices, and views of at most
    :data:`MAX_VIEW_BYTES` (:func:`orthogonal_views` propagates the others in XY only)."""
    return volume.shape[0] >= 3 and view_bytes(volume, spacing, step) <= MAX_VIEW_BYTES


def view_embeddings(embeddings: StackEmbeddings, spacing=None, step: int = 2,
                    view_denoise: float = 2.0) -> list[StackEmbeddings]:
    """The StackEmbeddings of the stack's two views (along Y, then X): planes from :func:`reslice`, smoothed with
    ``max(model's sigma, view_denoise)``, stored where ``embeddings`` are (disk cache or memory), planes encoded on
    first use. Kept on ``embeddings`` for its next calls. ``.compute()`` on them precomputes the views."""
    sp = check_spacing(spacing)
    model = embeddings.model
    sigma = max(denoise_of(model), check_denoise(view_denoise))
    cache = embeddings.path.parent if embeddings.path is not None and not embeddings.in_memory else False
    known = embeddings.__dict__.setdefault("_views", {})  # the views of this stack, kept for its next objects
    out = []
    for axis in VIEW_AXES:
        key = (axis, sp, int(step), sigma)
        if key not in known:
            known[key] = StackEmbeddings(reslice(embeddings.volume, axis, sp, int(step)), model, cache=cache,
                                         denoise=sigma)
        out.append(known[key])
    return out


def orthogonal_views(embeddings: StackEmbeddings, seeds: Sequence[Mapping[int, np.ndarray]],
                     slices: Sequence[Mapping[int, np.ndarray]], params, spacing=None,
                     cancel: Callable[[], bool] | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     points=None, patches: bool = False) -> list[dict[int, np.ndarray]]:
    """Fuse each object's XY propagation with its propagation through the XZ and YZ views (module docstring).

    embeddings: the StackEmbeddings of the (Z, Y, X[, C]) volume; seeds: per object {z: (Y, X) bool} prompted
    masks; slices: per object {z: (Y, X) bool} its propagated XY slices (seeds not included, z smoothing done);
    params: a PropagationParams (strategy, stop rules, direction, max_slices, smooth_z, view_step, view_denoise).
    Returns per object {z: (Y, X) bool}: the slices (seeds not included) where at least 2 of the 3 views have
    the object, within the z range the direction allows. A stack of fewer than 3 slices, or one whose views would
    need more than :data:`MAX_VIEW_BYTES`, is returned as it came (the latter with a warning).
    ``progress(done, total)`` is called per propagated view plane (total: an upper bound). patches: ``slices``
    are given, and returned, as patches {z: (row0, col0, (h, w) bool)} (the seeds stay full masks); the vote
    then works in each object's bounding box only."""
    from .propagation import finish_slices, iter_propagate_masks

    vol = embeddings.volume
    n_z, n_y, n_x = vol.shape[:3]
    sp = check_spacing(spacing)
    step = int(params.view_step)
    if n_z < 3:
        return [dict(s) for s in slices]
    depths = {a: resampled_depth(n_z, sp, a) for a in VIEW_AXES}
    size = view_bytes(vol, sp, step)
    if size > MAX_VIEW_BYTES:
        warnings.warn(f"the orthogonal views of this {vol.shape} stack would take {size / 2**30:.1f} GiB; it is "
                      "propagated in XY slices only. Crop the stack, or pass views='xy' to skip this warning",
                      ViewsWarning, stacklevel=3)
        return [dict(s) for s in slices]
    model = embeddings.model
    predictor = SamPredictor(model)
    view_params = {"strategy": params.strategy, "iou_threshold": params.iou_threshold,
                   "overlap_threshold": params.overlap_threshold, "min_area": params.min_area,
                   "box_extension": params.box_extension, "select": params.select,
                   "max_regrowth": params.max_regrowth}
    total = len(seeds) * sum(-(-vol.shape[a] // step) for a in VIEW_AXES)
    done = 0
    views = []  # per axis: per object {plane: (Z', W) bool}
    for axis, emb in zip(VIEW_AXES, view_embeddings(embeddings, sp, step, params.view_denoise)):
        view = emb.volume
        rows = z_rows(n_z, depths[axis])
        vseeds = _view_seeds(predictor, emb, seeds, axis, step, rows, points)
        found = [dict(s) for s in vseeds]
        live = [i for i, s in enumerate(vseeds) if s]
        for i, p, m, _s in iter_propagate_masks(view, [vseeds[i] for i in live], embeddings=emb, cancel=cancel,
                                                **view_params):
            found[live[i]][p] = m
            done += 1
            if progress is not None:
                progress(done, total)
        if cancel is not None and cancel():
            return [dict(s) for s in slices]
        if params.smooth_z:
            found = [{**s, **finish_slices(s, {p: m for p, m in f.items() if p not in s})} if s else {}
                     for s, f in zip(vseeds, found)]
        views.append(found)
    out = []
    for i, obj_seeds in enumerate(seeds):
        first, last = _z_range(obj_seeds, n_z, params.direction, params.max_slices)
        out.append(_vote(obj_seeds, slices[i], views[0][i], views[1][i], (n_z, n_y, n_x), depths, step,
                         first, last, patches))
    return out


def _vote(seeds, xy, xz, yz, shape, depths, step, first, last, patches: bool = False) -> dict[int, np.ndarray]:
    """One object's slices where >= 2 of XY, XZ, YZ have it, within [first, last]; seed slices excluded. Seeds and
    XY slices may be full (Y, X) masks or patches; the votes are counted in the bounding box of everything that
    votes. Returns full masks, or with ``patches`` patches (row0, col0, (h, w) bool)."""
    n_z, n_y, n_x = shape
    planes = {z: as_patch(m) for z, m in {**xy, **seeds}.items() if first <= z <= last}
    plane_of = {}
    boxes = [patch_box(p) for p in planes.values()]
    for axis, view in ((1, xz), (2, yz)):
        n_line = (n_y, n_x)[axis - 1]
        plane_of[axis] = np.minimum((np.arange(n_line) + step // 2) // step, -(-n_line // step) - 1)
        for p, m in view.items():
            lines = np.flatnonzero(plane_of[axis] == p)
            along = np.flatnonzero(np.asarray(m).any(axis=0))
            if lines.size and along.size:  # the lines this plane stands for, and where along them it has pixels
                a, b = (lines, along) if axis == 1 else (along, lines)
                boxes.append((int(a[0]), int(b[0]), int(a[-1]) + 1, int(b[-1]) + 1))
    box = union_box(boxes)
    if box is None:
        return {}
    r0, c0, r1, c1 = box
    votes = np.zeros((last - first + 1, r1 - r0, c1 - c0), np.uint8)
    for z, p in planes.items():
        votes[z - first] += paste(p, box)
    for axis, view in ((1, xz), (2, yz)):
        if not view:
            continue
        rows = np.clip(np.rint(z_rows(n_z, depths[axis])[first: last + 1]).astype(int), 0, depths[axis] - 1)
        lo, hi, a0, a1 = (r0, r1, c0, c1) if axis == 1 else (c0, c1, r0, r1)
        for line in range(lo, hi):
            m = view.get(int(plane_of[axis][line]))
            if m is None:
                continue
            sub = m[rows][:, a0: a1]  # (slices, the box's width along the line)
            if axis == 1:
                votes[:, line - r0, :] += sub
            else:
                votes[:, :, line - c0] += sub
    out = {}
    for k in range(votes.shape[0]):
        z = first + k
        if z in seeds:
            continue
        m = votes[k] >= 2
        if m.any():
            out[z] = tight(m, box) if patches else from_patch(tight(m, box), (n_y, n_x))
    return out
