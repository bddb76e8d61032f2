"""Interactive annotation logic without a viewer: prompts -> masks -> new label ids (pure numpy + torch).

The napari annotator delegates here; everything is testable without Qt. Coordinates are (row, col);
boxes are (min_row, min_col, max_row, max_col), max inclusive; label images are integer (H, W) arrays, 0 = background.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .embedding_store import EmbeddingCancelled, StackEmbeddings
from .predictor import ImageEmbedding, SamPredictor


def encoder_stages(model) -> list[torch.nn.Module]:
    """The image encoder's sequential stages (ViT blocks or TinyViT layers), used to report progress."""
    enc = model.image_encoder
    for name in ("blocks", "layers"):
        stages = getattr(enc, name, None)
        if stages is not None and len(stages):
            return list(stages)
    return [enc]


@contextlib.contextmanager
def _encoder_progress(model, progress: Callable[[int, int], None] | None, cancelled: Callable[[], bool] | None):
    """Report ``progress(done, total)`` after each encoder stage and raise :class:`EmbeddingCancelled` before
    a stage once ``cancelled()`` is true, for the encoder calls made inside the ``with`` block."""
    stages = encoder_stages(model)
    total = len(stages) + 1
    done = [0]

    def pre(_mod, _inp):
        if cancelled is not None and cancelled():
            raise EmbeddingCancelled("embedding cancelled")

    def post(_mod, _inp, _out):
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total - 1), total)

    handles = [s.register_forward_pre_hook(pre) for s in stages] + [s.register_forward_hook(post) for s in stages]
    try:
        if cancelled is not None and cancelled():
            raise EmbeddingCancelled("embedding cancelled")
        yield
    finally:
        for h in handles:
            h.remove()
    if progress is not None:
        progress(total, total)


def compute_embedding(
    predictor: SamPredictor,
    image: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> ImageEmbedding:
    """Embed one 2D image ((H, W) or (H, W, 3|4), any dtype) with progress and cancellation.

    ``progress(done, total)`` is called after each encoder stage; ``cancelled()`` is polled before each
    stage and aborts with :class:`EmbeddingCancelled`. Returns the :class:`ImageEmbedding`; no predictor
    state changes.
    """
    with _encoder_progress(predictor.model, progress, cancelled):
        return predictor.compute_embedding(image)


def stack_plane_embedding(
    stack: StackEmbeddings,
    z: int,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> ImageEmbedding:
    """Embedding of slice ``z`` of a stack through its disk cache (:class:`StackEmbeddings`): loaded if an
    earlier session stored it, else computed (with progress and cancellation as in :func:`compute_embedding`)
    and stored. The slice is normalised with the whole stack's contrast, as propagation does. Raises
    :class:`~napari_sam.core.embedding_store.StackChanged` when the slice was edited in place since the stack was
    opened (a stored embedding is checked too: one slice's hash); open the stack again."""
    if stack.is_computed(z):
        stack.check_slice(z)
        return stack[z]
    with _encoder_progress(stack.model, progress, cancelled):
        return stack[z]


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompts:
    """The prompts of one image plane. points: float (N, 2) (row, col); labels: int (N,) 1 positive /
    0 negative; boxes: float (M, 4) (min_row, min_col, max_row, max_col), max inclusive."""

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def __post_init__(self):
        object.__setattr__(self, "points", np.asarray(self.points, dtype=np.float64).reshape(-1, 2))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4))
        if len(self.points) != len(self.labels):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels; give one label per point")

    @property
    def empty(self) -> bool:
        return len(self.points) == 0 and len(self.boxes) == 0

    @property
    def n_positive(self) -> int:
        return int((self.labels == 1).sum())

    def key(self) -> tuple:
        return (self.points.round(3).tobytes(), self.labels.tobytes(), self.boxes.round(3).tobytes())

    def extends(self, other: "Prompts") -> bool:
        """True if ``self`` is ``other`` plus more points (same boxes): the previous logits may refine it."""
        n = len(other.points)
        return (not other.empty and len(self.points) > n and np.array_equal(self.points[:n], other.points)
                and np.array_equal(self.labels[:n], other.labels) and np.array_equal(self.boxes, other.boxes))


@dataclass
class Result:
    """A prediction on one plane. Single mode: ``masks`` bool (K, H, W) candidates (K = 3 for an ambiguous
    prompt, else 1), ``iou`` (K,), ``logits`` (K, L, L). Batch mode: one mask per object (B, H, W).
    ``window``: the zoom window (4,) whose frame ``logits`` are in (single mode; None: the whole image), to pass
    back with them as ``mask_window``.

    The masks are stored as ``patches`` bool (K, h, w): the region of the (H, W) plane ``shape`` starting at
    ``offset`` (row, col), all False outside it; ``shape`` None: the patch is the whole plane. :func:`predict` gives
    the zoom window's masks for an object decoded zoomed (single mode), else the whole plane's; :meth:`cropped`
    keeps only the box around every candidate's pixels, so that a small object of a large image costs little
    memory. ``masks``, ``mask``, ``objects`` and ``preview`` are full size either way (built on
    demand from a cropped result); ``patch_objects`` and ``preview_patch`` are the patch's."""

    patches: np.ndarray
    iou: np.ndarray
    logits: np.ndarray
    batch: bool = False
    prompts: Prompts | None = None
    choice: int = 0
    window: np.ndarray | None = None
    offset: tuple[int, int] = (0, 0)
    shape: tuple[int, int] | None = None

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(H, W) of the plane the masks are of."""
        return tuple(self.patches.shape[1:]) if self.shape is None else tuple(self.shape)

    @property
    def box(self) -> tuple[slice, slice]:
        """The patch's region of the plane, (row slice, col slice)."""
        (r0, c0), (h, w) = self.offset, self.patches.shape[1:]
        return slice(r0, r0 + h), slice(c0, c0 + w)

    def _full(self, patch: np.ndarray) -> np.ndarray:
        if self.shape is None:
            return patch
        out = np.zeros(patch.shape[:-2] + self.plane_shape, patch.dtype)
        out[(...,) + self.box] = patch
        return out

    @property
    def masks(self) -> np.ndarray:
        """The candidates (single mode) or objects (batch mode), bool (K, H, W) (a new array when cropped)."""
        return self._full(self.patches)

    @property
    def mask(self) -> np.ndarray:
        """The chosen candidate (single mode), bool (H, W)."""
        return self._full(self.patches[self.choice])

    def objects(self) -> list[np.ndarray]:
        """Masks to commit, one bool (H, W) per object."""
        return [self._full(m) for m in self.patch_objects()]

    def patch_objects(self) -> list[np.ndarray]:
        """Masks to commit, one bool (h, w) patch per object (at ``offset``)."""
        return [m for m in self.patches] if self.batch else [self.patches[self.choice]]

    def preview(self) -> np.ndarray:
        """uint8/uint16 (H, W) label image: object i (1-based) of the batch, or 1 for the chosen candidate."""
        return self._full(self.preview_patch())

    def preview_patch(self) -> np.ndarray:
        """:meth:`preview` within the patch, (h, w)."""
        objs = self.patch_objects()
        out = np.zeros(self.patches.shape[1:], dtype=np.uint16 if len(objs) > 255 else np.uint8)
        for i, m in enumerate(objs, 1):
            out[m & (out == 0)] = i
        return out

    def cropped(self) -> "Result":
        """This result with its masks kept only within the box around every candidate's (object's) pixels (an
        empty (K, 0, 0) patch when all are empty). The full-size masks are the same."""
        p = self.patches
        rows, cols = np.flatnonzero(p.any(2).any(0)), np.flatnonzero(p.any(1).any(0))
        r0, r1 = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        c0, c1 = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, 0)
        if self.shape is not None and (r0, c0, r1, c1) == (0, 0) + p.shape[1:]:
            return self
        offset = (self.offset[0] + r0, self.offset[1] + c0) if rows.size else (0, 0)
        return replace(self, patches=p[:, r0:r1, c0:c1].copy(), offset=offset, shape=self.plane_shape)


def plane_checksum(plane: np.ndarray) -> int:
    """A quick checksum (CRC-32) of an image plane's shape, dtype and pixels, to tell whether the plane was edited
    in place (about 3 GB/s, four times faster than :func:`~napari_sam.core.embedding_store.plane_digest`; not
    for cache keys)."""
    head = zlib.crc32(repr((np.shape(plane), str(np.asarray(plane).dtype))).encode())
    return zlib.crc32(memoryview(np.ascontiguousarray(plane)).cast("B"), head)


def enforce_negative_points(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Take out of ``mask`` what negative points inside it mark; a model may have ignored them.

    mask: bool (H, W); points: float (N, 2) (row, col) in pixels; labels: int (N,) 1 positive / 0 negative.
    Each connected part of the mask that holds a negative point is shared out among the clicks inside it by a
    marker watershed on the distance to the part's edge, and the pixels that go to a negative click are removed.
    The split follows the necks between the objects the part merged: a negative click on a neighbour the mask took
    in removes the neighbour, while one near the edge of the object (a mask a little too large there) takes only
    the rim beyond it. A part with negative points only goes entirely; a negative point on a positive one's pixel
    wins. Parts without a negative point, and masks no negative point falls in, are returned unchanged. Returns a
    new bool (H, W) array (or ``mask`` itself when nothing changes).
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    rc = np.rint(np.asarray(points, dtype=np.float64).reshape(-1, 2)).astype(np.int64)
    labels = np.asarray(labels).reshape(-1)
    inside = (rc[:, 0] >= 0) & (rc[:, 0] < h) & (rc[:, 1] >= 0) & (rc[:, 1] < w)
    rc, labels = rc[inside], labels[inside]
    neg = rc[labels == 0]
    neg = neg[mask[neg[:, 0], neg[:, 1]]] if len(neg) else neg
    if not len(neg):
        return mask
    comp, _ = ndimage.label(mask)
    region = np.isin(comp, np.unique(comp[neg[:, 0], neg[:, 1]]))
    rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = region[r0:r1, c0:c1]
    markers = np.zeros(sub.shape, dtype=np.int32)
    for (r, c), lab in sorted(zip(rc.tolist(), labels.tolist()), key=lambda t: -t[1]):  # negatives last: they win
        if r0 <= r < r1 and c0 <= c < c1 and sub[r - r0, c - c0]:
            markers[r - r0, c - c0] = 1 if lab == 1 else 2
    depth = ndimage.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1]  # to the nearest pixel outside the part
    parts = watershed(-depth, markers, mask=sub)
    out = mask.copy()
    out[r0:r1, c0:c1][parts == 2] = False
    return out


def left_out_positives(masks: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which masks leave out one of their own positive points.

    masks: bool (B, H, W); points: float (B, N, 2) (row, col) in pixels; labels: int (B, N) 1 positive,
    0 negative (other values are padding). Points outside the image are not counted. Returns bool (B,).
    """
    masks = np.asarray(masks, dtype=bool)
    b, h, w = masks.shape
    rc = np.rint(np.asarray(points, dtype=np.float64).reshape(b, -1, 2)).astype(np.int64)
    pos = (np.asarray(labels).reshape(b, -1) == 1) & (rc[..., 0] >= 0) & (rc[..., 0] < h) & (rc[..., 1] >= 0) \
        & (rc[..., 1] < w)
    r, c = np.clip(rc[..., 0], 0, h - 1), np.clip(rc[..., 1], 0, w - 1)
    return (pos & ~masks[np.arange(b)[:, None], r, c]).any(1)


def follow_positive_points(predictor: SamPredictor, points: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                           previous: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                           mask_windows: np.ndarray | None = None, origin: tuple[int, int] = (0, 0),
                           shape: tuple[int, int] | None = None, in_window: bool = False,
                           previous_origin: tuple[int, int] = (0, 0)):
    """Decode again, with a box, the objects whose mask leaves out one of their positive points.

    A small model often ignores a second positive click on an object it covered only in part (the built-in
    model did for 71 % of such clicks on `val`). For each such object the box spanning its mask, its
    ``previous`` mask and all its positive points is added to its points, and it is decoded once more (one
    decoder call for all of them), with the same ``mask_input``. A model follows a box far more readily than a
    second point.

    points: float (B, N, 2) (row, col); labels: int (B, N) 1 / 0; masks: bool (B, H, W), what the points gave
    (after :func:`enforce_negative_points` where that applies); previous: bool (B, H, W), the masks before the
    last click, or None; mask_input (B, 1, L, L) and mask_windows (B, 4): as in the first decode (or None).
    ``origin``, ``shape``: ``masks`` are (B, h, w), the region starting at ``origin`` (row, col) of an image of
    ``shape`` (H, W), zero outside (a window's masks, :meth:`~napari_sam.core.predictor.SamPredictor.predict`
    ``in_window``); ``previous`` is whole-image, or (B, h', w') from ``previous_origin``. ``in_window``: decode
    again with it (one object).
    Returns ``(rows, prediction)``: int (R,) the objects decoded again and their
    :class:`~napari_sam.core.predictor.Prediction` (leading axis R, one candidate each), or ``(rows, None)``
    when R = 0.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    off = np.array(origin, np.float64)
    left = left_out_positives(masks, points - off, labels)
    h, w = np.shape(masks)[1:] if shape is None else shape
    if shape is not None:  # a positive point of the image outside the region: left out too
        mh, mw = np.shape(masks)[1:]
        rc = np.rint(points).astype(np.int64)
        lr = rc - np.array(origin, np.int64)
        inside = (rc[..., 0] >= 0) & (rc[..., 0] < h) & (rc[..., 1] >= 0) & (rc[..., 1] < w)
        outside = (lr[..., 0] < 0) | (lr[..., 0] >= mh) | (lr[..., 1] < 0) | (lr[..., 1] >= mw)
        left |= ((labels == 1) & inside & outside).any(1)
    rows = np.nonzero(left)[0]
    if not len(rows):
        return rows, None
    boxes = np.zeros((len(rows), 4))
    for j, i in enumerate(rows):
        pos = points[i][labels[i] == 1]
        spans = []
        for area, o in ((masks[i], off), (None if previous is None else previous[i], np.array(previous_origin))):
            if area is not None:
                rr, cc = np.nonzero(area.any(1))[0], np.nonzero(area.any(0))[0]
                if len(rr):
                    spans.append((np.array((rr[0], cc[0])) + o, np.array((rr[-1], cc[-1])) + o))
        lo = np.minimum.reduce([pos.min(0)] + [a for a, _ in spans])
        hi = np.maximum.reduce([pos.max(0)] + [b for _, b in spans])
        boxes[j] = np.clip(np.concatenate([lo, hi]), 0, [h - 1, w - 1, h - 1, w - 1])
    return rows, predictor.predict(
        points=points[rows], point_labels=labels[rows], box=boxes, multimask=False,
        mask_input=None if mask_input is None else np.asarray(mask_input)[rows],
        mask_windows=None if mask_input is None or mask_windows is None else np.asarray(mask_windows)[rows],
        **({"in_window": True} if in_window else {}))


def predict(predictor: SamPredictor, prompts: Prompts, mask_input: np.ndarray | None = None,
            batch: bool = False, enforce_negatives: bool = True, mask_window: np.ndarray | None = None,
            follow_positives: bool = True, previous: np.ndarray | Result | None = None) -> Result:
    """Run the decoder for ``prompts`` on the predictor's current embedding.

    Single mode: all points (positive and negative) and at most one box describe ONE object; a lone
    point gives 3 candidates (ambiguity), otherwise 1; ``mask_input`` (L, L) logits refine it. With
    ``enforce_negatives`` (default) a negative point is a hard constraint: what it marks inside a candidate
    mask is taken out (:func:`enforce_negative_points`); ``logits`` and ``iou`` stay the model's.
    ``mask_window``: the previous result's ``window`` when ``mask_input`` is its logits (zoomed decoding).
    With ``follow_positives`` (default), a single mask that leaves out one of its positive points is decoded again
    with a box around it, its ``previous`` mask (bool (H, W), or the :class:`Result` these prompts extend, whose
    chosen mask it is; or None) and the positive points (:func:`follow_positive_points`); prompts with a box of the
    user's are left as they are.
    Batch mode: every box and every positive point is its own object (negative points are ignored).
    """
    if prompts.empty:
        raise ValueError("no prompts: add a point or draw a box first")
    if batch:
        masks, ious, logits = [], [], []
        if len(prompts.boxes):
            r = predictor.predict(box=prompts.boxes, multimask=False)
            masks.append(r.masks[:, 0]), ious.append(r.iou[:, 0]), logits.append(r.low_res_logits[:, 0])
        pos = prompts.points[prompts.labels == 1]
        if len(pos):
            r = predictor.predict(points=pos[:, None, :], point_labels=np.ones((len(pos), 1)), multimask=True)
            best = r.iou.argmax(1)
            ar = np.arange(len(pos))
            masks.append(r.masks[ar, best]), ious.append(r.iou[ar, best]), logits.append(r.low_res_logits[ar, best])
        if not masks:
            raise ValueError("batch mode needs boxes or positive points (negative points alone make no object)")
        return Result(np.concatenate(masks), np.concatenate(ious), np.concatenate(logits), True, prompts)
    if len(prompts.boxes) > 1:
        raise ValueError(f"{len(prompts.boxes)} boxes describe one object; keep one box or switch on batch mode")
    if len(prompts.points) and prompts.n_positive == 0 and not len(prompts.boxes):
        raise ValueError("only negative points: add a positive point (or a box) on the object")
    multimask = len(prompts.points) == 1 and not len(prompts.boxes) and mask_input is None
    # masks of the zoom window only (a small object of a large image); the same pixels as the whole image's
    windows = isinstance(predictor, SamPredictor)  # (a predictor-like object of the tests: whole-image masks)
    r = predictor.predict(
        points=prompts.points if len(prompts.points) else None,
        point_labels=prompts.labels if len(prompts.points) else None,
        box=prompts.boxes[0] if len(prompts.boxes) else None,
        mask_input=mask_input,
        multimask=multimask,
        mask_windows=mask_window if mask_input is not None else None,
        **({"in_window": True} if windows else {}),
    )
    shape = tuple(predictor.original_size) if windows else tuple(np.shape(r.masks)[-2:])

    def origin(pred) -> tuple[int, int]:
        if pred.windows is None or tuple(np.shape(pred.masks)[-2:]) == shape:
            return 0, 0
        return int(pred.windows[0]), int(pred.windows[1])

    def cut(candidates: np.ndarray, at: tuple[int, int]) -> np.ndarray:
        if not (enforce_negatives and (prompts.labels == 0).any()):
            return candidates
        local = prompts.points - np.array(at, np.float64)  # (points outside the region lie outside every mask)
        return np.stack([enforce_negative_points(m, local, prompts.labels) for m in candidates])

    at = origin(r)
    masks = cut(r.masks, at)
    if follow_positives and not multimask and not len(prompts.boxes) and prompts.n_positive:
        prev_at = (0, 0)
        if isinstance(previous, Result):  # (its patch: no full-size copy)
            previous, prev_at = previous.patches[previous.choice], previous.offset
        rows, again = follow_positive_points(
            predictor, prompts.points[None], prompts.labels[None], masks[None, 0], previous_origin=prev_at,
            previous=None if previous is None else np.asarray(previous, dtype=bool)[None],
            mask_input=None if mask_input is None else np.reshape(mask_input, (1, 1) + np.shape(mask_input)[-2:]),
            mask_windows=None if mask_window is None else np.reshape(mask_window, (1, 4)),
            origin=at, shape=shape, in_window=windows)
        if again is not None:
            r = again._replace(masks=again.masks[0], iou=again.iou[0], low_res_logits=again.low_res_logits[0],
                               windows=None if again.windows is None else again.windows[0])
            at = origin(r)
            masks = cut(r.masks, at)
    windowed = masks.shape[1:] != shape
    return Result(masks, r.iou, r.low_res_logits, False, prompts, int(np.argmax(r.iou)), r.windows,
                  offset=at if windowed else (0, 0), shape=shape if windowed else None)


# ------------------------------------------------------------------------------------------------ labels
def next_free_id(labels: np.ndarray) -> int:
    """The smallest id above every id in use (max + 1; 1 for an empty image)."""
    return int(np.max(labels, initial=0)) + 1 if np.size(labels) else 1


def dtype_for(dtype: np.dtype, max_id: int) -> np.dtype:
    """``dtype`` if it can hold ``max_id``, else the next wider integer type of the same kind."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"label images must have an integer dtype, not {dtype}")
    ladder = (np.uint8, np.uint16, np.uint32, np.uint64) if dtype.kind == "u" else (np.int8, np.int16, np.int32,
                                                                                   np.int64)
    for t in ladder:
        if np.dtype(t).itemsize >= dtype.itemsize and np.iinfo(t).max >= max_id:
            return np.dtype(t)
    raise ValueError(f"label id {max_id} does not fit any {dtype.kind}-integer type")


@dataclass
class CommitPlan:
    """What a commit writes: ``writes`` is a list of (label id, rows, cols) int arrays; ``skipped`` counts
    objects with no pixel left to write (entirely on existing objects); ``dtype`` the needed label dtype."""

    writes: list[tuple[int, np.ndarray, np.ndarray]]
    skipped: int
    dtype: np.dtype
    protected_pixels: int

    @property
    def ids(self) -> list[int]:
        return [w[0] for w in self.writes]


def plan_commit(existing: np.ndarray, masks: list[np.ndarray], first_id: int, overwrite: bool = False,
                offset: tuple[int, int] = (0, 0)) -> CommitPlan:
    """Plan writing bool ``masks`` into the label plane ``existing`` (H, W) as ids first_id, +1, ...

    Each mask is (H, W), or an (h, w) patch of the plane starting at ``offset`` (row, col) (a
    :class:`Result`'s ``patch_objects`` at its ``offset``). Without ``overwrite`` only background pixels (0) are
    written, so existing objects stay intact; objects of the same commit never overwrite each other either
    (earlier wins). Empty objects are skipped and take no id. Only the masks' region of ``existing`` is read.
    """
    existing = np.asarray(existing)
    o_r, o_c = (int(v) for v in offset)
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for m in masks:
        if m.ndim != 2 or o_r < 0 or o_c < 0 or o_r + m.shape[0] > existing.shape[0] \
                or o_c + m.shape[1] > existing.shape[1]:
            where = f" at offset {(o_r, o_c)}" if (o_r, o_c) != (0, 0) else ""
            raise ValueError(f"mask of shape {m.shape}{where} does not match the label plane {existing.shape}")
    # the pixels this commit writes (earlier objects win), over the masks' region only
    mine = np.zeros((max((m.shape[0] for m in masks), default=0), max((m.shape[1] for m in masks), default=0)),
                    dtype=bool)
    writes: list[tuple[int, np.ndarray, np.ndarray]] = []
    skipped = protected = 0
    next_id = first_id
    for m in masks:
        # work inside the mask's bounding box: an object is small next to a large plane
        rr = np.flatnonzero(m.any(1))
        if not rr.size:
            skipped += 1
            continue
        r0, r1 = int(rr[0]), int(rr[-1]) + 1
        cc = np.flatnonzero(m[r0:r1].any(0))
        c0, c1 = int(cc[0]), int(cc[-1]) + 1
        sub, box = m[r0:r1, c0:c1], (slice(r0, r1), slice(c0, c1))
        plane_box = (slice(o_r + r0, o_r + r1), slice(o_c + c0, o_c + c1))
        taken = mine[box] if overwrite else mine[box] | (existing[plane_box] != 0)
        allowed = sub & ~taken
        protected += int(np.count_nonzero(sub & taken))
        if not allowed.any():
            skipped += 1
            continue
        rows, cols = np.nonzero(allowed)
        writes.append((next_id, rows + (o_r + r0), cols + (o_c + c0)))
        mine[box] |= allowed
        next_id += 1
    return CommitPlan(writes, skipped, dtype_for(existing.dtype, max(next_id - 1, 0)), protected)
