"""Large images in tiles with a halo, stitched without seams.

Each tile is its core region plus a ``halo`` on every side (clipped to the image). A segmenter labels each tile;
an object is *cut* if it touches a tile side that is not an image border. Whole objects belong to the tile whose
core holds their centroid (so objects in the halo are not doubled); cut pieces are always kept, and a cut piece
that substantially overlaps an object from another tile is merged with it (union), so objects crossing tile
borders come out whole. Memory: one tile's segmentation plus the (H, W) int32 label image.

:func:`segment_tiled` segments and stitches in one go; :class:`TiledProposals` keeps each tile's candidate masks so
that new thresholds re-filter and re-stitch them without the model. Both stitch with one :class:`Stitcher`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from .boxes import mask_box


def tile_boxes(shape: tuple[int, int], tile_size: int, halo: int) -> list[tuple[tuple, tuple]]:
    """[(core, tile), ...]: boxes (min_row, min_col, max_row, max_col), max exclusive, row-major order."""
    if tile_size < 16:
        raise ValueError(f"tile_size={tile_size} is too small; use at least 16 (e.g. 1024)")
    if halo < 0:
        raise ValueError(f"halo={halo} must be >= 0")
    h, w = shape
    out = []
    for r0 in range(0, h, tile_size):
        for c0 in range(0, w, tile_size):
            core = (r0, c0, min(r0 + tile_size, h), min(c0 + tile_size, w))
            tile = (max(0, r0 - halo), max(0, c0 - halo), min(h, core[2] + halo), min(w, core[3] + halo))
            out.append((core, tile))
    return out


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [0]

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class Stitcher:
    """Stitches per-tile label images into one (H, W) int32 label image, tile by tile (the rules of the module
    docstring). ``add`` the tiles of :func:`tile_boxes` in its order, then call :meth:`labels`.

    Two objects merge when one of them is cut by a tile border and their overlap is at least ``merge_overlap`` of
    the smaller one (counted where both tiles saw the image). Memory: the (H, W) int32 label image and a few
    numbers per object.
    """

    def __init__(self, shape: tuple[int, int], merge_overlap: float = 0.5) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.merge_overlap = merge_overlap
        self.out = np.zeros(self.shape, dtype=np.int32)
        self._uf = _UnionFind()
        self._cut = [False]
        self._tile_of = [(0, 0, 0, 0)]
        self._box = [(0, 0, 0, 0)]  # per object: the box of its pixels in ``out`` (max exclusive)
        self._first = [None]  # per object: (row, col) of its first pixel in ``out`` (raster order), None if none

    def add(self, core: tuple, tile: tuple, lab: np.ndarray) -> None:
        """Add one tile's labels ``lab`` ((tile rows, tile cols) int, 0 background); ``core`` and ``tile`` are
        its boxes from :func:`tile_boxes` (min_row, min_col, max_row, max_col), max exclusive."""
        t0, l0, t1, l1 = tile
        lab = np.asarray(lab)
        if lab.shape != (t1 - t0, l1 - l0):
            raise ValueError(f"segmenter returned shape {lab.shape} for a tile of shape {(t1 - t0, l1 - l0)}")
        objects = [(sl[0].start, sl[1].start, lab[sl] == i)
                   for i, sl in enumerate(ndimage.find_objects(lab), start=1) if sl is not None]
        self.add_objects(core, tile, objects)

    def add_objects(self, core: tuple, tile: tuple, objects: list) -> None:
        """:meth:`add` for a tile's objects given as [(row, col, patch), ...] in label order, ``patch`` the
        object's tight bool window placed at (row, col) of the tile (what
        :func:`~napari_sam.core.labels.records_to_objects` gives): no pass over the whole tile."""
        h, w = self.shape
        out, uf, cut, tile_of, boxes, first = self.out, self._uf, self._cut, self._tile_of, self._box, self._first
        t0, l0, t1, l1 = tile
        open_sides = (t0 > 0, l0 > 0, t1 < h, l1 < w)
        seen = {}  # earlier objects' pixels inside this tile (counted when needed)
        for r, c, m in objects:
            rs, cs = slice(r, r + m.shape[0]), slice(c, c + m.shape[1])
            is_cut = ((open_sides[0] and rs.start == 0) or (open_sides[1] and cs.start == 0)
                      or (open_sides[2] and rs.stop == t1 - t0) or (open_sides[3] and cs.stop == l1 - l0))
            if not is_cut:
                rr, cc = np.nonzero(m)
                cr, ccol = t0 + rs.start + rr.mean(), l0 + cs.start + cc.mean()
                if not (core[0] <= cr < core[2] and core[1] <= ccol < core[3]):
                    continue  # another tile's core owns this whole object
            g = uf.add()
            cut.append(is_cut)
            tile_of.append(tile)
            r_off, c_off = t0 + rs.start, l0 + cs.start
            region = out[r_off : r_off + m.shape[0], c_off : c_off + m.shape[1]]
            under = region[m]
            ids, counts = np.unique(under[under > 0], return_counts=True)
            for e, n in zip(ids.tolist(), counts.tolist()):
                if not (is_cut or cut[e]):
                    continue
                # compare only where both tiles saw the image: the overlap of their windows
                e0, e1, e2, e3 = tile_of[e]
                sub = m[max(0, e0 - r_off) : max(0, e2 - r_off), max(0, e1 - c_off) : max(0, e3 - c_off)]
                if e not in seen:
                    b0, b1, b2, b3 = boxes[e]
                    win = out[max(b0, t0) : min(b2, t1), max(b1, l0) : min(b3, l1)]
                    seen[e] = int(np.count_nonzero(win == e))
                if n >= self.merge_overlap * min(int(sub.sum()), seen[e]):
                    uf.union(e, g)
            new = m & (region == 0)
            region[new] = g
            b = mask_box(new)
            if b is not None:
                boxes.append((r_off + b[0], c_off + b[1], r_off + b[2], c_off + b[3]))
                first.append((r_off + b[0], c_off + int(np.argmax(new[b[0]]))))
            else:
                boxes.append((0, 0, 0, 0))
                first.append(None)

    def labels(self) -> np.ndarray:
        """The stitched label image (H, W) int32, objects renumbered 1..N in raster order (of their first
        pixel)."""
        n = len(self._uf.parent)
        root = np.array([self._uf.find(i) for i in range(n)], dtype=np.int64)
        best = {}  # root -> first pixel of its members' pixels
        for i in range(1, n):
            f = self._first[i]
            if f is not None:
                r = int(root[i])
                if r not in best or f < best[r]:
                    best[r] = f
        rank = np.zeros(n, dtype=np.int32)
        for k, r in enumerate(sorted(best, key=best.get), start=1):
            rank[r] = k
        lut = rank[root]
        boxes = self._box
        if sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) >= self.out.size:
            return lut[self.out]  # boxes cover the image more than once: one pass over it is cheaper
        out = np.zeros(self.shape, dtype=np.int32)  # objects renumbered in their boxes only
        for i in range(1, n):
            r0, c0, r1, c1 = boxes[i]
            if r1 > r0:
                src = self.out[r0:r1, c0:c1]
                out[r0:r1, c0:c1][src == i] = lut[i]
        return out


def segment_tiled(image: np.ndarray, segment: Callable[[np.ndarray], np.ndarray], tile_size: int = 1024,
                  halo: int = 128, merge_overlap: float = 0.5,
                  progress: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """Label image (H, W) int32 from ``segment(tile) -> (h, w) int labels`` run tile by tile.

    image: (H, W) or (H, W, C). Two objects merge when one of them is cut by a tile border and their overlap
    is at least ``merge_overlap`` of the smaller one (:class:`Stitcher`). progress(done_tiles, n_tiles);
    cancel() -> True stops with napari_sam.core.amg.Cancelled. Labels are renumbered 1..N in raster order.
    """
    from .amg import Cancelled

    h, w = image.shape[:2]
    stitcher = Stitcher((h, w), merge_overlap)
    boxes = tile_boxes((h, w), tile_size, halo)
    for k, (core, tile) in enumerate(boxes):
        if cancel is not None and cancel():
            raise Cancelled("tiled segmentation was cancelled")
        t0, l0, t1, l1 = tile
        stitcher.add(core, tile, segment(image[t0:t1, l0:l1]))
        if progress is not None:
            progress(k + 1, len(boxes))
    return stitcher.labels()


class TiledProposals:
    """Kept model outputs of a large image, tile by tile: one
    :class:`~napari_sam.core.amg_proposals.MaskProposals` per tile of :func:`tile_boxes` (in the tile's own
    frame), re-filtered and stitched without running the model again (what the segment-everything widget keeps for
    its live thresholds on a large plane). Made by
    :meth:`~napari_sam.core.amg.AutomaticMaskGenerator.propose_tiled`.

    :meth:`labels` gives exactly what :func:`~napari_sam.core.amg.segment_everything` gives for the image at the
    same thresholds, tile size and halo: each tile's :meth:`MaskProposals.labels`, stitched by one
    :class:`Stitcher`.
    """

    def __init__(self, image_shape: tuple[int, int], boxes: list[tuple[tuple, tuple]], tiles: list,
                 tile_size: int, halo: int, merge_overlap: float = 0.5) -> None:
        if len(boxes) != len(tiles):
            raise ValueError(f"{len(tiles)} tile proposals for {len(boxes)} tile boxes")
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.boxes = list(boxes)  # [(core, tile), ...] (min_row, min_col, max_row, max_col), max exclusive
        self.tiles = list(tiles)  # one MaskProposals per tile, in the tile's frame
        self.tile_size, self.halo, self.merge_overlap = int(tile_size), int(halo), merge_overlap

    def __len__(self) -> int:
        """The number of kept candidates over all tiles."""
        return sum(len(p) for p in self.tiles)

    def labels(self, min_object_area: int = 0, cancel: Callable[[], bool] | None = None,
               **thresholds) -> np.ndarray:
        """The stitched label image (H, W) int32 of the candidates passing ``thresholds``
        (:meth:`MaskProposals.filter`'s arguments), each tile cleaned with ``min_object_area`` as
        :func:`~napari_sam.core.labels.records_to_labels` does. A tile whose passing records did not change since
        the last call reuses its objects (:meth:`MaskProposals.objects`); the work stays in the objects' boxes.
        cancel() -> True between tiles stops with napari_sam.core.amg.Cancelled (what the widget's stale
        re-filters do when a slider moves again)."""
        from .amg import Cancelled

        stitcher = Stitcher(self.image_shape, self.merge_overlap)
        for (core, tile), p in zip(self.boxes, self.tiles):
            if cancel is not None and cancel():
                raise Cancelled("re-filtering the tiles was cancelled")
            stitcher.add_objects(core, tile, p.objects(min_object_area, **thresholds))
        return stitcher.labels()
