"""Label volumes <-> propagation: seeds from the objects of one slice, and the write plan of the results.

Pure numpy (no napari). Label volumes are (Z, Y, X) integer arrays, 0 = background. A propagated object's slice is
kept as a bounding-box *patch* (row0, col0, (h, w) bool), not a full (Y, X) mask: on a (50, 4096, 4096) stack
5 objects' full masks take ~4 GB, their patches a few MB. :func:`to_patch` / :func:`from_patch` convert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

from .boxes import mask_box

Patch = tuple[int, int, np.ndarray]  # (row0, col0, (h, w) bool): a 2D mask's bounding box and what it holds there
Mask = Union[Patch, np.ndarray]  # a patch, or a full (Y, X) bool mask


def to_patch(mask: np.ndarray) -> Patch:
    """A (Y, X) bool mask as its bounding-box patch (row0, col0, (h, w) bool copy); an empty mask gives
    (0, 0, (0, 0) array)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask has shape {m.shape}; a patch is made from a 2D (Y, X) mask")
    box = mask_box(m)
    if box is None:
        return 0, 0, np.zeros((0, 0), bool)
    r0, c0, r1, c1 = box
    return r0, c0, m[r0:r1, c0:c1].copy()


def is_patch(mask) -> bool:
    return isinstance(mask, tuple) and len(mask) == 3


def as_patch(mask: Mask) -> Patch:
    """A patch as it is; a full (Y, X) mask as its patch (:func:`to_patch`)."""
    return mask if is_patch(mask) else to_patch(mask)


def patch_box(patch: Patch) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1), ends exclusive, of a patch's pixels; None for an empty patch."""
    r0, c0, m = patch
    if not m.any():
        return None
    return r0, c0, r0 + m.shape[0], c0 + m.shape[1]


def union_box(boxes) -> tuple[int, int, int, int] | None:
    """The smallest (row0, col0, row1, col1) holding every box given (None entries skipped); None if none."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    b = np.asarray(boxes)
    return int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())


def paste(patch: Patch, box: tuple[int, int, int, int]) -> np.ndarray:
    """The patch's pixels inside ``box`` (row0, col0, row1, col1): a (row1 - row0, col1 - col0) bool array."""
    r0, c0, m = patch
    out = np.zeros((box[2] - box[0], box[3] - box[1]), bool)
    a0, b0 = max(r0, box[0]), max(c0, box[1])
    a1, b1 = min(r0 + m.shape[0], box[2]), min(c0 + m.shape[1], box[3])
    if a0 < a1 and b0 < b1:
        out[a0 - box[0]: a1 - box[0], b0 - box[1]: b1 - box[1]] = m[a0 - r0: a1 - r0, b0 - c0: b1 - c0]
    return out


def from_patch(patch: Mask, shape: tuple[int, int]) -> np.ndarray:
    """A patch (or a full mask, returned as bool) as a full (Y, X) bool mask of ``shape``."""
    if not is_patch(patch):
        return np.asarray(patch, dtype=bool)
    return paste(patch, (0, 0, int(shape[0]), int(shape[1])))


def tight(mask: np.ndarray, box: tuple[int, int, int, int]) -> Patch:
    """The patch of ``mask`` (bool, the size of ``box``) placed at ``box``'s corner, cut to its own bounding box."""
    r0, c0, m = to_patch(mask)
    return (box[0] + r0, box[1] + c0, m) if m.size else (0, 0, m)


def seeds_from_labels(labels: np.ndarray, z: int, ids: Sequence[int] | None = None
                      ) -> tuple[list[int], list[dict[int, np.ndarray]]]:
    """The objects of slice ``z`` as propagation seeds: (label ids, [{z: (Y, X) bool mask}] one per id).

    ids: which labels (default: every label present on slice z). Raises ValueError for an id absent there.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels have shape {labels.shape}; propagation needs a (Z, Y, X) label volume")
    if not 0 <= z < labels.shape[0]:
        raise ValueError(f"slice z={z} is outside the label volume (0 .. {labels.shape[0] - 1})")
    sl = labels[z]
    present = [int(i) for i in np.unique(sl) if i != 0]
    if ids is None:
        ids = present
    missing = [int(i) for i in ids if int(i) not in present]
    if missing:
        raise ValueError(f"label(s) {missing} are not on slice {z}; annotate the object on this slice first "
                         "(or move to a slice where it is)")
    return [int(i) for i in ids], [{int(z): sl == i} for i in ids]


def split_by_span(labels: np.ndarray, z: int) -> tuple[list[int], list[int]]:
    """The labels of slice ``z`` of a (Z, Y, X) label volume, split into those found on no other slice and those
    that already span other slices: ([ids on z alone], [ids also elsewhere]), each ascending. One pass over the
    volume, a slice at a time."""
    labels = np.asarray(labels)
    on_z = np.unique(labels[z])
    on_z = on_z[on_z != 0]
    elsewhere: set[int] = set()
    for k in range(labels.shape[0]):
        if k == z or len(elsewhere) == len(on_z):
            continue
        hit = np.isin(labels[k], on_z)
        if hit.any():
            elsewhere.update(int(i) for i in np.unique(labels[k][hit]))
    return [int(i) for i in on_z if int(i) not in elsewhere], sorted(elsewhere)


def plan_write(labels: np.ndarray, ids: Sequence[int], results: Mapping[int, Mapping[int, Mask]],
               overwrite: bool = False) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Which voxels change when object ``ids[i]`` takes mask ``results[i][z]`` on slice z (:func:`plan_slice` on
    each propagated slice, in z order).

    labels: (Z, Y, X) (only the propagated slices are read); results: per object index {z: full
    (Y, X) bool mask or patch (row0, col0, bool)}. Returns ((z, row, col) index arrays, new values) of the changed
    voxels, ready for one undoable write.
    """
    labels = np.asarray(labels)
    touched = sorted({z for r in results.values() for z in r})
    zs, rows, cols, vals = [], [], [], []
    for z in touched:
        r, c, v = plan_slice(labels[z], ids, [results.get(i, {}).get(z) for i in range(len(ids))],
                             overwrite)
        zs.append(np.full(r.shape, z))
        rows.append(r)
        cols.append(c)
        vals.append(v)
    if not zs:
        empty = np.zeros(0, np.int64)
        return (empty, empty, empty), np.zeros(0, labels.dtype)
    return (np.concatenate(zs), np.concatenate(rows), np.concatenate(cols)), np.concatenate(vals)


def plan_slice(old: np.ndarray, ids: Sequence[int], masks: Sequence[Mask | None], overwrite: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The write of one slice: object ``ids[i]`` takes ``masks[i]`` (a full (Y, X) bool mask or a patch; None:
    that object is not on this slice). Its old voxels outside the new mask are cleared and the new mask is written
    where the voxel is background or already this object; other objects' voxels are only taken with
    ``overwrite=True``. Objects earlier in ``ids`` win where two new masks overlap.

    old: (Y, X) labels (not modified). Returns (rows, cols, new values) of the changed pixels, in row-major order.
    Only the bounding box of the masks and of the objects' old pixels is worked on."""
    old = np.asarray(old)
    live = [(lab, as_patch(m)) for lab, m in zip(ids, masks) if m is not None]
    if not live:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, old.dtype)
    mine = np.isin(old, [lab for lab, _ in live])
    box = union_box([patch_box(p) for _, p in live] + [mask_box(mine)])
    del mine
    if box is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, old.dtype)
    region = old[box[0]: box[2], box[1]: box[3]]
    new = region.copy()
    cut = [(lab, paste(p, box)) for lab, p in live]
    for lab, m in cut:
        new[(region == lab) & ~m] = 0
    claimed = np.zeros(region.shape, bool)
    for lab, m in cut:
        free = (new == 0) | (new == lab) | (overwrite & ~claimed)
        w = m & free & ~claimed
        new[w] = lab
        claimed |= w
    r, c = np.nonzero(new != region)
    return r + box[0], c + box[1], new[r, c]


BARS = "▁▂▃▄▅▆▇█"


def confidence_text(label: int, scores: np.ndarray) -> str:
    """Two lines per object: its slice range and weakest slice, then one bar per slice (predicted IoU 0..1,
    '·' where the object is absent), so drift along the stack is visible at a glance."""
    s = np.asarray(scores, dtype=np.float64)
    present = np.flatnonzero(np.isfinite(s))
    if present.size == 0:
        return f"label {label}: not propagated"
    lo, hi = int(present[0]), int(present[-1])
    bars = "".join("·" if not np.isfinite(v) else BARS[int(round(np.clip(v, 0, 1) * (len(BARS) - 1)))]
                   for v in s[lo: hi + 1])
    worst = lo + int(np.nanargmin(s[lo: hi + 1]))
    return f"label {label}: z {lo}–{hi}, lowest {s[worst]:.2f} at z {worst}\n{bars}"
