"""Label volumes <-> propagation: seeds from the objects of one slice, and the write plan of the results.

Pure numpy (no napari). Label volumes are (Z, Y, X) integer arrays, 0 = background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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


def plan_write(labels: np.ndarray, ids: Sequence[int], results: Mapping[int, Mapping[int, np.ndarray]],
               overwrite: bool = False) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Which voxels change when object ``ids[i]`` takes mask ``results[i][z]`` on slice z.

    On each propagated slice, the object's old voxels outside the new mask are cleared and the new mask is
    written where the voxel is background or already this object; other objects' voxels are only taken with
    ``overwrite=True``. Objects earlier in ``ids`` win where two new masks overlap.

    Returns ((z, row, col) index arrays, new values) of the changed voxels, ready for one undoable write.
    """
    labels = np.asarray(labels)
    touched = sorted({z for r in results.values() for z in r})
    zs, rows, cols, vals = [], [], [], []
    for z in touched:
        old = labels[z]
        new = old.copy()
        for i, lab in enumerate(ids):
            m = results.get(i, {}).get(z)
            if m is None:
                continue
            new[(old == lab) & ~m] = 0
        claimed = np.zeros(old.shape, bool)
        for i, lab in enumerate(ids):
            m = results.get(i, {}).get(z)
            if m is None:
                continue
            free = (new == 0) | (new == lab) | (overwrite & ~claimed)
            w = m & free & ~claimed
            new[w] = lab
            claimed |= w
        r, c = np.nonzero(new != old)
        zs.append(np.full(r.shape, z))
        rows.append(r)
        cols.append(c)
        vals.append(new[r, c])
    if not zs:
        empty = np.zeros(0, np.int64)
        return (empty, empty, empty), np.zeros(0, labels.dtype)
    return (np.concatenate(zs), np.concatenate(rows), np.concatenate(cols)), np.concatenate(vals)


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
