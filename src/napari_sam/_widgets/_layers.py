"""napari layers <-> annotation data: prompt layers, the current image plane, undoable Labels writes.

All coordinates returned here are data coordinates of the IMAGE layer, (row, col) of its last two axes;
prompt layers may have their own scale/translate (points are mapped through world coordinates).
"""

from __future__ import annotations

import warnings

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..core.annotation import CommitPlan, Prompts

if TYPE_CHECKING:
    import napari

POINTS_NAME = "SAM points"
BOXES_NAME = "SAM boxes"
PREVIEW_NAME = "SAM preview"
LABELS_NAME = "SAM labels"
POSITIVE_COLOR = np.array([0.1, 1.0, 0.2, 1.0])
NEGATIVE_COLOR = np.array([1.0, 0.15, 0.6, 1.0])


class LayerError(ValueError):
    """A layer cannot be used as asked; the message says why and what to do."""


def image_problem(layer) -> str | None:
    """Why ``layer`` cannot be annotated (None if it can)."""
    import napari

    if layer is None:
        return "no image layer: open an image (File > Open, or File > Open Sample > napari-sam) and select it"
    if not isinstance(layer, napari.layers.Image):
        return f"layer {layer.name!r} is not an Image layer; choose an image to annotate"
    if layer.ndim < 2:
        return f"image {layer.name!r} has {layer.ndim} dimension(s); the annotator needs 2D planes"
    return None


def plane_index(viewer: napari.Viewer, image) -> tuple[int, ...]:
    """Indices of the leading (non-plane) axes of ``image`` at the viewer's current slice."""
    lead = image.ndim - 2
    if lead == 0:
        return ()
    pos = image.world_to_data(np.asarray(viewer.dims.point))
    shape = image_shape(image)
    return tuple(int(np.clip(np.round(pos[i]), 0, shape[i] - 1)) for i in range(lead))


def full_resolution(layer):
    """A layer's data; for a multiscale layer its full-resolution level (``data`` alone is the lowest)."""
    return layer.data[0] if layer.multiscale else layer.data


def image_shape(image) -> tuple[int, ...]:
    """Spatial shape of an image layer (no RGB channel axis)."""
    return tuple(full_resolution(image).shape[: image.ndim])


def image_plane(image, index: tuple[int, ...]) -> np.ndarray:
    """The 2D plane ``index`` of ``image``: (H, W) or (H, W, C) for RGB, as a numpy array."""
    return np.asarray(full_resolution(image)[index])


def _plain(layer) -> bool:
    """Whether ``layer``'s data -> world transform is scale and translate alone (no rotate, shear or affine)."""
    d = layer.ndim
    return bool(np.allclose(layer.rotate, np.eye(d)) and np.allclose(layer.shear, 0)
                and np.allclose(layer.affine.affine_matrix, np.eye(d + 1)))


def overlay_kwargs(image, ndim: int | None = None) -> dict:
    """Keyword arguments that give a new layer of ``ndim`` axes (the image's last ones; default all) the image's
    data -> world transform, so it overlays the image: scale and translate, and rotate, shear and affine alike.
    A 2D layer over an nD image gets the transform of the image's planes (their last two world axes)."""
    d = image.ndim if ndim is None else ndim
    if _plain(image):
        return dict(scale=image.scale[-d:], translate=image.translate[-d:])
    if d == image.ndim:
        return dict(scale=image.scale, translate=image.translate, rotate=image.rotate, shear=image.shear,
                    affine=image.affine.affine_matrix)
    # a plane of an nD image: the 2D affine map of (row, col) to the last two world axes, read off the transform
    o = np.zeros(image.ndim)
    w0 = np.asarray(image.data_to_world(o))[-2:]
    a = np.eye(3)
    for k in (0, 1):
        e = o.copy()
        e[image.ndim - 2 + k] = 1
        a[:2, k] = np.asarray(image.data_to_world(e))[-2:] - w0
    a[:2, 2] = w0
    return dict(affine=a)


def make_prompt_layers(viewer: napari.Viewer, image):
    """The Points and Shapes prompt layers for ``image`` (our own layers of those names are reused, new points
    positive; else they are created on top, with the image's transform)."""
    kw = overlay_kwargs(image)
    pts = viewer.layers[POINTS_NAME] if POINTS_NAME in viewer.layers else None
    if _ours(pts, "Points", image) and "positive" in pts.features:
        set_polarity(pts, True)
    else:  # absent, or a layer of the user's that happens to have the name (napari gives ours a suffix)
        pts = viewer.add_points(
            np.zeros((0, image.ndim)), name=POINTS_NAME, ndim=image.ndim, size=10, border_width=0.15,
            border_color="white", features={"positive": np.zeros(0, dtype=bool)}, **kw)
        set_polarity(pts, True)
    boxes = viewer.layers[BOXES_NAME] if BOXES_NAME in viewer.layers else None
    if not _ours(boxes, "Shapes", image):
        boxes = viewer.add_shapes(ndim=image.ndim, name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                                  edge_width=2, **kw)
    return pts, boxes


def _ours(layer, kind: str, image) -> bool:
    """Whether ``layer`` can serve as the prompt layer of ``kind`` ("Points" / "Shapes") for ``image``."""
    import napari

    return isinstance(layer, getattr(napari.layers, kind)) and layer.ndim == image.ndim


def set_polarity(points, positive: bool) -> None:
    """New points get ``positive`` (feature, colour and symbol set up front: no restyling per click)."""
    points.selected_data = set()  # napari applies current_* to selected points: change none of them
    points.feature_defaults = {"positive": bool(positive)}
    points.current_face_color = POSITIVE_COLOR if positive else NEGATIVE_COLOR
    points.current_symbol = "disc" if positive else "cross"


def is_positive_mode(points) -> bool:
    return bool(points.feature_defaults["positive"].iloc[0])


def style_points(points) -> None:
    """Positive points: green discs; negative: magenta crosses."""
    n = len(points.data)
    if n == 0:
        return
    pos = np.asarray(points.features["positive"], dtype=bool)
    colors = np.where(pos[:, None], POSITIVE_COLOR, NEGATIVE_COLOR)
    if not np.array_equal(points.face_color, colors):
        points.face_color = colors
    symbols = np.where(pos, "disc", "cross")
    if [str(s.value) for s in np.atleast_1d(points.symbol)] != list(symbols):
        points.symbol = list(symbols)


def same_transform(layer, image) -> bool:
    """Whether ``layer`` and ``image`` have the same axes and data -> world transform (scale, translate, rotate,
    shear and affine): the same data coordinates are the same place."""
    return layer.ndim == image.ndim and all(np.allclose(getattr(layer, a), getattr(image, a))
                                            for a in ("scale", "translate", "rotate", "shear")) \
        and np.allclose(layer.affine.affine_matrix, image.affine.affine_matrix)


def to_image_coords(layer, image, data: np.ndarray) -> np.ndarray:
    """(N, layer.ndim) data coordinates of ``layer`` -> (N, image.ndim) data coordinates of ``image``."""
    if data.size == 0:
        return np.zeros((0, image.ndim))
    if same_transform(layer, image):
        return np.asarray(data, dtype=np.float64)
    return np.array([image.world_to_data(layer.data_to_world(p)) for p in data], dtype=np.float64)


def in_plane(coords: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    lead = len(index)
    if lead == 0:
        return np.ones(len(coords), dtype=bool)
    return np.all(np.round(coords[:, :lead]) == np.asarray(index), axis=1)


def read_prompts(points, boxes, image, index: tuple[int, ...]) -> tuple[Prompts, int]:
    """Prompts on plane ``index`` of ``image`` from the prompt layers, and how many points lie outside
    the image (those are dropped). Only rectangles count as boxes."""
    shape = image_shape(image)[-2:]
    pts = np.zeros((0, 2))
    labels = np.zeros(0, dtype=np.int64)
    outside = 0
    if points is not None and len(points.data):
        c = to_image_coords(points, image, np.asarray(points.data))
        keep = in_plane(c, index)
        rc = c[keep][:, -2:]
        lab = np.asarray(points.features["positive"], dtype=bool)[keep].astype(np.int64)
        inside = (rc[:, 0] >= -0.5) & (rc[:, 0] <= shape[0] - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] <= shape[1] - 0.5)
        outside = int((~inside).sum())
        pts, labels = rc[inside], lab[inside]
    bx = []
    if boxes is not None and len(boxes.data):
        for verts, kind in zip(boxes.data, boxes.shape_type):
            if kind != "rectangle":
                continue
            c = to_image_coords(boxes, image, np.asarray(verts))
            if not in_plane(c[:1], index)[0]:
                continue
            lo, hi = c[:, -2:].min(0), c[:, -2:].max(0)
            lo = np.maximum(lo, 0)
            hi = np.minimum(hi, np.asarray(shape) - 1)
            if np.all(hi > lo):
                bx.append(np.concatenate([lo, hi]))
    return Prompts(pts, labels, np.asarray(bx).reshape(-1, 4)), outside


def named_layer(viewer: napari.Viewer, name: str, what: str, refresh: Callable[[], None]):
    """The layer called ``name``; where it has gone (removed, or renamed behind a widget's back), ``refresh()`` the
    widget's layer choices and raise LayerError saying to choose the ``what`` again."""
    if name in viewer.layers:
        return viewer.layers[name]
    refresh()
    raise LayerError(f"the {what} layer {name!r} is no longer in the viewer (removed or renamed); choose the {what} "
                     "again")


def refill(combo, layers: list) -> None:
    """List ``layers`` in the QComboBox ``combo`` by name (each layer its item's data), without signals; the layer
    chosen before stays chosen, renamed or not."""
    chosen = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for lay in layers:
        combo.addItem(lay.name, lay)
    combo.setCurrentIndex(next((i for i, lay in enumerate(layers) if lay is chosen), 0 if layers else -1))
    combo.blockSignals(False)


class RenameFollower:
    """Keeps a widget's layer choices right when a layer is renamed: ``refresh()`` (the widget's own refill of
    its combo boxes) runs, and each combo box of ``combos`` that showed the old name shows the new one (combo
    boxes filled by :func:`refill` follow their layers by themselves). The widget keeps this object; napari
    holds only weak references to it."""

    def __init__(self, viewer: napari.Viewer, combos, refresh: Callable[[], None]) -> None:
        self.combos, self.refresh = list(combos), refresh
        self._names: dict[int, str] = {}
        viewer.layers.events.inserted.connect(self._on_inserted)
        for layer in viewer.layers:
            self._watch(layer)

    def _watch(self, layer) -> None:
        self._names[id(layer)] = layer.name
        layer.events.name.connect(self._on_name)

    def _on_inserted(self, event) -> None:
        self._watch(event.value)

    def _on_name(self, event) -> None:
        layer = event.source
        old, new = self._names.get(id(layer)), layer.name
        self._names[id(layer)] = new
        chosen = [c for c in self.combos if old is not None and c.currentText() == old]
        self.refresh()
        for combo in chosen:
            combo.setCurrentText(new)


def fits_target(labels, image) -> bool:
    """Whether ``labels`` can receive objects for ``image`` (:func:`check_target`) and overlays it
    (:func:`same_transform`)."""
    try:
        check_target(labels, image)
    except LayerError:
        return False
    return same_transform(labels, image)


def check_target(labels, image) -> None:
    """Raise LayerError unless ``labels`` can receive objects for ``image``."""
    shape = image_shape(image)
    if tuple(labels.data.shape) != shape:
        raise LayerError(f"labels layer {labels.name!r} has shape {tuple(labels.data.shape)} but image "
                         f"{image.name!r} has {shape}; choose a matching Labels layer or 'new layer'")
    if not np.issubdtype(labels.data.dtype, np.integer):
        raise LayerError(f"labels layer {labels.name!r} has dtype {labels.data.dtype}; it needs integers")


def stroke_in_progress(labels) -> bool:
    """Whether a brush, eraser or fill stroke is under way on ``labels``: napari stages a stroke's history until
    the mouse is released, and only then emits ``events.paint``. napari has no public flag for it, so its private
    ``_block_history`` is read (without the plugin proxy's warning); False where it is absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bool(getattr(labels, "_block_history", False))


_WIDENING: set[int] = set()  # ids of the layers whose data upgrade_dtype is replacing right now


def widening(layer) -> bool:
    """Whether ``layer``'s ``events.data`` comes from :func:`upgrade_dtype` (every value kept, only the dtype
    wider): a watcher of replaced data (e.g. 3D propagation's edit log) can tell it from new data."""
    return id(getattr(layer, "__wrapped__", layer)) in _WIDENING


def upgrade_dtype(labels, dtype: np.dtype) -> str | None:
    """Widen the label dtype in place if needed (data kept); returns a message if it changed."""
    old = labels.data.dtype
    if np.dtype(dtype) == old:
        return None
    key = id(getattr(labels, "__wrapped__", labels))  # (a plugin's viewer hands out proxies; events name the layer)
    _WIDENING.add(key)
    try:
        labels.data = np.asarray(labels.data).astype(dtype)
    finally:
        _WIDENING.discard(key)
    return (f"labels layer {labels.name!r} ran out of ids for {old}; converted to {np.dtype(dtype)} "
            "(all labels and the undo history kept)")


def write_plan(labels, index: tuple[int, ...], plan: CommitPlan) -> int:
    """Write ``plan`` into plane ``index`` of ``labels`` as ONE undo step (Ctrl+Z reverts it).
    Returns the number of pixels written."""
    if not plan.writes:
        return 0
    rows = np.concatenate([w[1] for w in plan.writes])
    cols = np.concatenate([w[2] for w in plan.writes])
    values = np.concatenate([np.full(len(w[1]), w[0], dtype=labels.data.dtype) for w in plan.writes])
    lead = tuple(np.full(len(rows), i, dtype=np.intp) for i in index)
    with labels.block_history():
        labels.data_setitem((*lead, rows, cols), values)
    return int(len(rows))
