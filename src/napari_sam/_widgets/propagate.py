"""3D propagation dock widget: turn the objects annotated on one slice into 3D objects.

Scriptable::

    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "3D propagation")
    w.set_layers("nuclei", "SAM labels"); w.propagate(direction="both", scope="current"); w.wait()

The image is (Z, Y, X) (or (T, Z, Y, X): the displayed volume at the current T). The labels layer has the
image's shape. Objects are those of the labels layer on the current slice: the selected label ("current")
or every label there ("all"; objects that already span other slices are left as they are, so their slices drawn or
corrected by hand are never replaced). A current object drawn on several slices with gaps is filled between them from
both ends; one that already spans a run of slices (a correction of a 3D object) is re-propagated: only the
range the correction affects is redone. With "orthogonal views" checked (the default, except for a stack whose
first axis is labelled t or time) each object is also propagated through the XZ and YZ planes, z resampled to the
image layer's scale, and a voxel is kept where 2 of the 3 views have it. Work runs in a thread worker (progress,
cancel); the result is written into the labels layer as ONE undoable step, and never over other objects'
voxels unless "overwrite" is checked. What the user paints, erases or fills while it runs is kept as it is: the write
is planned against each propagated slice as it was at the start (the slice then, told by a digest, and the user's
paint events since; no copy of the label volume is made), and results are kept as bounding-box patches.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout,
    QWidget,
)

from ..core.embedding_store import EmbeddingCacheWarning, EmbeddingCancelled, StackEmbeddings, select_volume
from ..core.propagation import (
    STRATEGIES, PropagationParams, finish_patches, fuse_views, iter_propagate_masks, make_params,
    repropagate_patches,
)
from ..core.propagation_labels import confidence_text, plan_slice, seeds_from_labels, split_by_span, to_patch
from ..core.propagation_views import ViewsWarning, view_embeddings, views_fit
from . import _layers as L
from ._annotator_ui import bind_denoise, denoise_spin_box
from ._state import get_state
from ._workers import CancelToken, ProgressRelay, on_dock_closed, process_events_until, run_in_thread

if TYPE_CHECKING:
    import napari

DIRECTIONS = {"through the volume": "both", "up (+z)": "up", "down (−z)": "down"}
SCOPES = {"current object": "current", "all objects on this slice": "all"}


def run_propagation(volume, labels3d, z, ids, model, params, cancel, report, denoise: float = 0.0,
                    overwrite: bool = False, edits: EditLog | None = None) -> dict[str, Any]:
    """Thread job: :func:`propagate_objects` on ``labels3d`` (the layer's live data: the user may paint meanwhile),
    then the write planned against each propagated slice as it was when the run started (:func:`plan_from_start`),
    so that the main thread only checks and writes the changed voxels: ``out["plan"]`` = ((z, row, col) index
    arrays, the start values there, the new values), or None when cancelled or nothing was propagated;
    ``out["skipped"]``: slices whose start could not be told (left as they are). No copy of the volume is made:
    a digest of each slice is taken first, and ``edits`` (an :class:`EditLog` fed by the layer's paint events)
    gives back what the user changed since."""
    start = slice_digests(labels3d, edits)
    out = propagate_objects(volume, labels3d, z, ids, model, params, cancel, report, denoise)
    out["plan"], out["skipped"], out["start"], out["overwrite"] = None, [], start, overwrite
    if not out["cancelled"] and out["ids"]:
        index, old, new, out["skipped"] = plan_from_start(labels3d, start, edits, out["ids"], out["results"],
                                                          overwrite)
        out["plan"] = (index, old, new)
    return out


class EditLog:
    """What the user does to a labels layer while a propagation runs: napari's history atoms of every paint, erase,
    fill or commit (``events.paint``; each holds the pixels' values before it) in order, and whether the layer's
    data was replaced (``events.data``). ``lead``: the layer's leading indices of the propagated (Z, Y, X) volume.
    Connect :meth:`on_paint` and :meth:`on_data` before the run reads the labels."""

    def __init__(self, lead=()) -> None:
        self.lead = tuple(int(i) for i in lead)
        self.atoms: list = []
        self.replaced = False

    def on_paint(self, event=None) -> None:
        self.atoms.extend(getattr(event, "value", None) or ())

    def on_data(self, event=None) -> None:
        if not L.widening(getattr(event, "source", None)):  # a widened dtype keeps every value: not a replacement
            self.replaced = True

    def __len__(self) -> int:
        return len(self.atoms)

    def restore(self, plane: np.ndarray, z: int, since: int = 0) -> np.ndarray:
        """Put back into ``plane`` (slice z of the volume, a (Y, X) copy, modified in place) the values the atoms
        logged from number ``since`` on found, latest first: the slice as it was before those edits. An atom of
        another kind is left out (the digest check then refuses the slice)."""
        pos = (*self.lead, int(z))
        for atom in reversed(self.atoms[since:]):
            key = getattr(atom, "slice_key", None)
            if key is not None:  # napari's _MaskedPaintAtom: (slice_key, mask or None, old_values, new_value)
                if len(key) != len(pos) + 2 or not all(isinstance(k, slice) for k in key):
                    continue
                at = tuple(p - (k.start or 0) for k, p in zip(key, pos))
                if not all(k.start is None or k.start <= p for k, p in zip(key, pos)) or not all(
                        k.stop is None or p < k.stop for k, p in zip(key, pos)):
                    continue
                region = plane[key[-2], key[-1]]
                if atom.mask is None:  # the whole box changed: old_values is the box as it was
                    region[...] = np.asarray(atom.old_values)[at]
                else:
                    was = np.zeros(atom.mask.shape, np.asarray(atom.old_values).dtype)
                    was[atom.mask] = atom.old_values
                    region[atom.mask[at]] = was[at][atom.mask[at]]
            elif isinstance(atom, tuple) and len(atom) == 3 and isinstance(atom[0], tuple) \
                    and len(atom[0]) == len(pos) + 2:  # data_setitem's (indices, old values, new values)
                *index, old = np.broadcast_arrays(*atom[0], np.asarray(atom[1]))
                here = np.ones(old.shape, bool)
                for ix, p in zip(index, pos):
                    here &= ix == p
                plane[index[-2][here], index[-1][here]] = old[here]
        return plane


def _digest(plane: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(plane).data).digest()


def slice_digests(labels3d, edits: EditLog | None = None) -> list[tuple[int, bytes]]:
    """Per slice of ``labels3d`` (Z, Y, X): (how many edits ``edits`` had logged before it was read, the SHA-256 of
    its values then): what :func:`plan_from_start` checks a slice's start against. One slice at a time."""
    return [(len(edits) if edits is not None else 0, _digest(labels3d[k])) for k in range(labels3d.shape[0])]


def plan_from_start(labels3d, start: list[tuple[int, bytes]], edits: EditLog | None, ids, results, overwrite: bool):
    """The write of ``results`` (per object {z: patch}) planned, slice by slice, against each propagated slice as it
    was when the run read it: the slice now, with the edits logged since put back (:meth:`EditLog.restore`) and
    checked against its start digest. A slice that does not check out (changed in a way no paint event told: an
    undo or redo, a script writing into the data) is left out. Returns ((z, row, col) index arrays, the start
    values there, the new values, [slices left out]); the main thread keeps every voxel whose value is no longer
    the start value, exactly as against a copy of the whole volume taken at the start. Indices are int32 (12.5
    million voxels written: 150 MB instead of 300 MB)."""
    touched = sorted({z for r in results.values() for z in r})
    parts, skipped = [], []
    for z in touched:
        since, want = start[z]
        plane = np.array(labels3d[z])  # a copy: the user may paint meanwhile
        if edits is not None:
            edits.restore(plane, z, since)
        if _digest(plane) != want:
            skipped.append(z)
            continue
        r, c, v = plan_slice(plane, ids, [results.get(i, {}).get(z) for i in range(len(ids))], overwrite)
        parts.append((np.full(r.shape, z, np.int32), r.astype(np.int32), c.astype(np.int32), plane[r, c], v))
    if not parts:
        empty = np.zeros(0, np.int32)
        none = np.zeros(0, labels3d.dtype)
        return (empty, empty, empty), none, none, skipped
    zz, rr, cc, old, new = (np.concatenate(a) for a in zip(*parts))
    return (zz, rr, cc), old, new, skipped


def propagate_objects(volume, labels3d, z, ids, model, params, cancel, report, denoise: float = 0.0
                      ) -> dict[str, Any]:
    """Load the model if needed, open the stack's cached embeddings, propagate the objects ``ids``
    of slice z with ``params`` (PropagationParams fields). One object drawn on several slices with gaps between
    them: the gaps are filled from both ends. One object already spanning a run of slices: only the range
    its correction on slice z affects is redone. ``ids`` None: every object drawn on slice z alone; those that
    already span other slices are left as they are, with a note. Returns {"model", "ids", "results": {i: {z: patch}}
    (the object's slice z as its bounding-box patch (row0, col0, (h, w) bool), see
    :mod:`napari_sam.core.propagation_labels`; an empty patch clears it), "scores": (B, Z), "notes", "cancelled",
    "range"}. ``denoise``: the viewer's sigma for a model loaded here. ``labels3d`` is read slice by slice."""
    notes = []
    if model is None:
        from ..core.build import load_model

        model = load_model(denoise=denoise)  # the built-in model; CheckpointError says what to do when it is missing
    if ids is None:  # all objects: those that already span other slices keep them (drawn or corrected by hand)
        ids, spanning = split_by_span(labels3d, z)
        if spanning:
            notes.append(f"label(s) {spanning} already span other slices and are left as they are (choose "
                         "'current object' to redo one)")
        if not ids:
            return {"model": model, "ids": [], "results": {}, "scores": np.zeros((0, labels3d.shape[0])),
                    "notes": notes, "cancelled": False, "range": None}
    ids, seeds = seeds_from_labels(labels3d, z, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmbeddingCacheWarning)
        emb = StackEmbeddings(volume, model, cancelled=cancel)
    notes += [str(w.message) for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    n = volume.shape[0]
    total = len(ids) * max(n - 1, 1)
    results: dict[int, dict[int, tuple]] = {i: {} for i in range(len(ids))}
    scores = np.full((len(ids), n), np.nan, np.float32)
    scores[:, z] = 1.0
    report(0, total)
    present = np.flatnonzero([np.any(labels3d[k] == ids[0]) for k in range(n)]) if len(ids) == 1 else np.array([z])
    gaps = present.size > 1 and np.any(np.diff(present) > 1)
    if gaps:  # the object was drawn on several slices with gaps: fill them from both ends, then outward
        seeds = [{int(zz): np.asarray(labels3d[zz] == ids[0]) for zz in present}]
        scores[0, present] = 1.0
    elif present.size > 1:  # a correction of a 3D object: redo only the affected range
        obj = {int(zz): to_patch(labels3d[zz] == ids[0]) for zz in present}
        new, sc, (lo, hi) = repropagate_patches(volume, obj, z, seeds[0][z], embeddings=emb, cancel=cancel,
                                                **params)
        results[0] = {zz: new.get(zz, obj.get(zz, to_patch(np.zeros((0, 0), bool)))) for zz in range(lo, hi + 1)
                      if zz != z}
        scores[0] = sc
        report(total, total)
        return {"model": model, "ids": ids, "results": results, "scores": scores, "notes": notes,
                "cancelled": cancel(), "range": (lo, hi)}
    done = 0
    for i, zz, m, s in iter_propagate_masks(volume, seeds, embeddings=emb, cancel=cancel, **params):
        results[i][zz] = to_patch(m)  # the full (Y, X) mask goes: ~16 MB a slice at 4096 x 4096
        scores[i, zz] = s
        done += 1
        report(done, total)
    p = make_params(params)
    if p.smooth_z:  # as propagate_masks does
        for i, obj in results.items():
            results[i] = finish_patches(seeds[i], obj, scores[i])
    if not cancel():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = fuse_views(emb, seeds, [results[i] for i in range(len(ids))], scores, p, cancel,
                               lambda d, t: report(total + d, total + t), patches=True)
        notes += [str(w.message) for w in caught if issubclass(w.category, (ViewsWarning, EmbeddingCacheWarning))]
        results = dict(enumerate(fused))
    return {"model": model, "ids": ids, "results": results, "scores": scores, "notes": notes,
            "cancelled": cancel(), "range": None}


def run_embedding(volume, model, cancel, report, denoise: float = 0.0, spacing=None) -> dict[str, Any]:
    """Thread job: embed every slice of ``volume`` into the disk cache (progress, cancel); with ``spacing`` (the
    orthogonal views are on) every plane of its two views too, as propagation will use them."""
    if model is None:
        from ..core.build import load_model

        model = load_model(denoise=denoise)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmbeddingCacheWarning)
        emb = StackEmbeddings(volume, model, cancelled=cancel)
        stores = [emb]
        p = PropagationParams()
        if spacing is not None and views_fit(volume, spacing, p.view_step):
            stores += view_embeddings(emb, spacing, p.view_step, p.view_denoise)
        offset, grand = 0, sum(len(s.missing()) for s in stores)
        for store in stores:
            todo = len(store.missing())
            for done, _total in store.compute(cancel=cancel):
                report(offset + done, grand)
            offset += todo
    notes = [str(w.message) for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    return {"model": model, "notes": notes, "cancelled": cancel(), "missing": sum(len(s.missing()) for s in stores),
            "views": len(stores) > 1, "where": "memory" if emb.in_memory else str(emb.path)}


class PropagateWidget(QWidget):
    """Propagate annotated objects up, down or through the volume (see the module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.worker = None
        self.last_scores: dict[int, np.ndarray] = {}
        self._token = CancelToken()
        self._target: tuple | None = None
        self._edits: EditLog | None = None
        self._watched = None
        self._pending: dict | None = None  # a finished result waiting for the user's brush stroke to end
        self._stroke_timer = QTimer(self)
        self._stroke_timer.setInterval(50)
        self._stroke_timer.timeout.connect(self._write_after_stroke)
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._renames = L.RenameFollower(self.viewer, (), self._refresh)  # renamed layers stay listed and chosen
        self._refresh()
        on_dock_closed(self, self.cancel)  # the close button: stop the work, write nothing

    # ----------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        self.image_combo, self.labels_combo = QComboBox(), QComboBox()
        self.direction_combo, self.scope_combo, self.strategy_combo = QComboBox(), QComboBox(), QComboBox()
        self.direction_combo.addItems(list(DIRECTIONS))
        self.scope_combo.addItems(list(SCOPES))
        self.strategy_combo.addItems(list(STRATEGIES))
        self.strategy_combo.setCurrentText(PropagationParams.strategy)
        self.overwrite_check = QCheckBox("overwrite other labels")
        self.views_check = QCheckBox("orthogonal views (XZ, YZ)")
        self.views_check.setChecked(PropagationParams.views == "orthogonal")
        self.views_check.setToolTip(
            "also propagate through the stack's XZ and YZ planes (z resampled to the image layer's scale) and keep "
            "a voxel where 2 of the 3 views have it: better ends of 3D objects, about 3x the work. Off for "
            "time-lapse (T, Y, X) stacks, and by default for layers whose stack axis is labelled t or time")
        self.propagate_button, self.cancel_button = QPushButton("Propagate"), QPushButton("Cancel")
        self.embed_button = QPushButton("Precompute embeddings")
        self.embed_button.setToolTip("embed every slice now, and the orthogonal views' planes if they are on "
                                     "(cached on disk: reopening the stack is instant)")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("idle")
        self.status_label, self.confidence_label = QLabel(""), QLabel("")
        self.status_label.setWordWrap(True)
        self.confidence_label.setStyleSheet("font-family: monospace")
        form = QFormLayout()
        self.denoise_spin = denoise_spin_box()
        bind_denoise(self, self.denoise_spin, self.state)
        for name, w in (("image", self.image_combo), ("labels", self.labels_combo), ("direction",
                        self.direction_combo), ("objects", self.scope_combo), ("strategy", self.strategy_combo),
                        ("denoise σ", self.denoise_spin)):
            form.addRow(name, w)
        buttons = QHBoxLayout()
        buttons.addWidget(self.propagate_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.views_check)
        lay.addWidget(self.overwrite_check)
        lay.addLayout(buttons)
        lay.addWidget(self.embed_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.status_label)
        lay.addWidget(QLabel("per-slice confidence (predicted IoU):"))
        lay.addWidget(self.confidence_label)
        lay.addStretch()
        self.propagate_button.clicked.connect(lambda: self.propagate())
        self.cancel_button.clicked.connect(self.cancel)
        self.embed_button.clicked.connect(lambda: self.precompute())
        self.image_combo.currentTextChanged.connect(self._image_changed)

    def _refresh(self, *_) -> None:
        import napari

        image = self.image_combo.currentData()
        for combo, kind in ((self.image_combo, napari.layers.Image), (self.labels_combo, napari.layers.Labels)):
            L.refill(combo, [lay for lay in self.viewer.layers if isinstance(lay, kind) and lay.ndim >= 3
                           and lay.name != L.PREVIEW_NAME])
        if self.image_combo.currentData() is not image:  # another image: its defaults; else the choices stay
            self._image_changed(self.image_combo.currentText())

    def _image_changed(self, name: str) -> None:
        """A stack whose first displayed axis is labelled as time is not a volume: no orthogonal views for it."""
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            label = str(self.viewer.dims.axis_labels[-3] if layer.ndim >= 3 else "").lower()
            self.views_check.setChecked(label not in ("t", "time") and PropagationParams.views == "orthogonal")

    # ----------------------------------------------------------------- public API
    def set_layers(self, image, labels) -> None:
        """Choose the image and labels layers (layers or names)."""
        self.image_combo.setCurrentText(getattr(image, "name", image))
        self.labels_combo.setCurrentText(getattr(labels, "name", labels))

    def busy(self) -> bool:
        return self.worker is not None or self._pending is not None

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until the running propagation finished (for scripts and tests)."""
        return process_events_until(lambda: not self.busy(), timeout)

    def cancel(self) -> None:
        """Stop the running propagation; nothing is written."""
        self._token.cancel()
        if self._pending is not None:  # a result waiting for a brush stroke to end: dropped now
            self._pending = None
            self._stroke_timer.stop()
            self._watch(None, None)
            self._message("propagation cancelled; nothing was written")

    def propagate(self, direction: str | None = None, scope: str | None = None, strategy: str | None = None,
                  **params) -> bool:
        """Start propagating; direction "both"/"up"/"down", scope "current"/"all" (default: the widget's
        choices); ``params``: other PropagationParams fields (thresholds; ``views`` and ``spacing`` default to
        the checkbox and the image layer's scale). Returns False (with a message) if the layers do not allow it."""
        if self.busy():
            self._message("a propagation is running; wait or cancel it", "warning")
            return False
        try:
            image, labels, lead, volume, labels3d, z = self._inputs()
        except ValueError as e:
            self._message(str(e), "error")
            return False
        direction = direction or DIRECTIONS[self.direction_combo.currentText()]
        scope = scope or SCOPES[self.scope_combo.currentText()]
        strategy = strategy or self.strategy_combo.currentText()
        ids = None  # all: the worker keeps those drawn on this slice alone (split_by_span)
        if scope == "current":
            ids = [int(labels.selected_label)]
            if ids[0] == 0 or not np.any(labels3d[z] == ids[0]):
                self._message(f"label {ids[0]} is not on slice {z}: select a label painted or committed on "
                              "this slice (or choose 'all objects on this slice')", "error")
                return False
        elif not np.any(labels3d[z]):
            self._message(f"slice {z} has no labels: annotate objects on it first", "error")
            return False
        views = "orthogonal" if self.views_check.isChecked() else "xy"
        params = {"views": views, "spacing": tuple(float(s) for s in image.scale[-3:]), **params,
                  "strategy": strategy, "direction": direction}
        try:
            make_params(params)
        except (TypeError, ValueError) as e:
            self._message(str(e), "error")
            return False
        if L.stroke_in_progress(labels):  # (napari's encircle-and-fill stays open across clicks) its pixels are
            self._message(f"a brush stroke on {labels.name!r} is under way: finish it first, then propagate",
                          "warning")  # not reported yet: the run could not tell them from its result
            return False
        self._target = (labels, lead, z)
        self._watch(labels, EditLog(lead))  # from here on, the user's edits are logged: they survive the write
        self._start("propagating %p%")
        self._message(f"propagating from slice {z}" + ("" if self.state.model is not None else
                                                        " (loading the built-in model first)"))
        self.worker = run_in_thread(run_propagation, volume, labels3d, z, ids, self.state.model, params,
                                    self._token.cancelled, self._relay.report, denoise=self.state.denoise,
                                    overwrite=self.overwrite_check.isChecked(), edits=self._edits,
                                    on_return=self._done, on_error=self._failed, on_finish=self._finished)
        return True

    def precompute(self) -> bool:
        """Embed every slice of the displayed volume now, into the disk cache (progress, cancel); with "orthogonal
        views" checked, every plane of its XZ and YZ views too (at the image layer's scale)."""
        if self.busy():
            self._message("busy; wait or cancel first", "warning")
            return False
        try:
            image, idx = self._image_input()
        except ValueError as e:
            self._message(str(e), "error")
            return False
        volume = np.asarray(select_volume(image.data, idx))
        self._start("embedding %p%")
        spacing = tuple(float(s) for s in image.scale[-3:]) if self.views_check.isChecked() else None
        self.worker = run_in_thread(run_embedding, volume, self.state.model, self._token.cancelled,
                                    self._relay.report, denoise=self.state.denoise, spacing=spacing,
                                    on_return=self._embedded, on_error=self._failed,
                                    on_finish=self._finished)
        return True

    def _embedded(self, out: dict) -> None:
        if self.state.model is None:
            self.state.set_model(out["model"], "builtin")
        for note in out["notes"]:
            self._message(note, "warning")
        state = "cancelled" if out["cancelled"] else "done"
        views = " (with the orthogonal views' planes)" if out["views"] else ""
        self._message(f"embedding {state}: {out['missing']} slice(s) left{views}; stored in {out['where']}")

    def _start(self, text: str) -> None:
        self._token = CancelToken()
        self.progress.setFormat(text)
        self.progress.setValue(0)
        self.cancel_button.setEnabled(True)
        self.propagate_button.setEnabled(False)
        self.embed_button.setEnabled(False)

    # ----------------------------------------------------------------- internals
    def _image_input(self):
        """The chosen image layer, checked, and the data index of the viewer's current point in it; ValueError
        (LayerError) saying what to do otherwise."""
        iname = self.image_combo.currentText()
        if not iname:
            raise ValueError("no 3D image layer: open a (Z, Y, X) stack")
        image = L.named_layer(self.viewer, iname, "image", self._refresh)
        if image.rgb:
            raise ValueError(f"image {iname!r} is RGB; propagation needs a grayscale (Z, Y, X) stack")
        if image.multiscale:
            raise ValueError(f"image {iname!r} is multiscale; propagation needs a single-scale stack")
        plane = tuple(image.data.shape[-2:])
        if min(plane) < 8:  # e.g. (Y, X, 2): two channels read as a stack of (X, 2) slices
            raise ValueError(f"image {iname!r} has slices of {plane} pixels: its last axis looks like channels; "
                             "split them (right-click the layer › Split Stack) and propagate on one")
        step = image.world_to_data(np.asarray(self.viewer.dims.point))
        return image, [int(np.clip(np.round(step[i]), 0, image.data.shape[i] - 1)) for i in range(image.ndim)]

    def _inputs(self):
        image, idx = self._image_input()
        iname, lname = image.name, self.labels_combo.currentText()
        if not lname:
            raise ValueError("no labels layer: annotate objects on a slice with the SAM annotator first")
        labels = L.named_layer(self.viewer, lname, "labels", self._refresh)
        if tuple(labels.data.shape) != tuple(image.data.shape):
            raise ValueError(f"labels {lname!r} have shape {labels.data.shape} but image {iname!r} has "
                             f"{image.data.shape}; use a labels layer of the image's shape")
        lead = tuple(idx[: image.ndim - 3])
        volume = np.asarray(select_volume(image.data, idx))
        labels3d = select_volume(labels.data, idx)  # a view: the worker reads it slice by slice
        return image, labels, lead, volume, labels3d, idx[image.ndim - 3]

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setValue(int(100 * done / max(total, 1)))

    def _watch(self, labels, edits: EditLog | None) -> None:
        """Log ``labels``' paint events and data replacements into ``edits`` (None: stop logging)."""
        if self._watched is not None:
            layer, log = self._watched
            layer.events.paint.disconnect(log.on_paint)
            layer.events.data.disconnect(log.on_data)
        self._watched, self._edits = None, edits
        if edits is not None:
            labels.events.paint.connect(edits.on_paint)
            labels.events.data.connect(edits.on_data)
            self._watched = (labels, edits)

    def _done(self, out: dict) -> None:
        labels = self._target[0] if self._target is not None else None
        if L.stroke_in_progress(labels) and not (out["cancelled"] or self._token.cancelled()):
            # a brush, eraser or fill stroke is in progress: napari reports its pixels only when the mouse is
            # released, and a write now would split the stroke's undo step; write when it ends (the log goes on)
            self._pending = out
            self._stroke_timer.start()
            self._message("propagation finished; it is written when your brush stroke ends")
            return
        self._write(out, recheck=True)  # (a stroke that ended after the worker planned: its slice is planned here)

    def _write_after_stroke(self) -> None:
        labels = self._target[0] if self._target is not None else None
        if self._pending is None or (L.stroke_in_progress(labels) and labels in self.viewer.layers):
            return
        self._stroke_timer.stop()
        out, self._pending = self._pending, None
        self._write(out, recheck=True)

    def _recheck(self, labels, lead, edits: EditLog, out: dict) -> None:
        """Plan again, here, the slices the worker left out: a stroke in progress when it read them (its pixels
        not yet reported) made them differ from their start; now that it ended (or was aborted), the log tells
        their start again. Slices still not told stay left out."""
        skipped = out["skipped"]
        results = {i: {z: r[z] for z in skipped if z in r} for i, r in out["results"].items()}
        current = select_volume(labels.data, (*lead, 0, 0, 0))
        (z2, r2, c2), old2, new2, out["skipped"] = plan_from_start(current, out["start"], edits, out["ids"],
                                                                    results, out["overwrite"])
        (zz, rr, cc), old, new = out["plan"]
        out["plan"] = ((np.concatenate([zz, z2]), np.concatenate([rr, r2]), np.concatenate([cc, c2])),
                       np.concatenate([old, old2.astype(old.dtype)]), np.concatenate([new, new2.astype(new.dtype)]))

    def _write(self, out: dict, recheck: bool) -> None:
        edits = self._edits
        self._watch(None, None)  # our own write is not the user's
        if self.state.model is None:
            self.state.set_model(out["model"], "builtin")
        for note in out["notes"]:
            self._message(note, "warning")
        if out["cancelled"] or self._token.cancelled():  # (also when the dock was closed: its close button cancels)
            self._message("propagation cancelled; nothing was written")
            return
        labels, lead, z = self._target
        if not out["ids"]:
            self._message(f"every object on slice {z} already spans other slices, and those are kept: choose "
                          "'current object' to propagate one (it redoes only the range a correction affects)",
                          "warning")
            return
        if labels not in self.viewer.layers:
            self._message("the labels layer was removed; nothing was written", "warning")
            return
        if edits is not None and edits.replaced:
            self._message("the labels layer's data was replaced while propagating; nothing was written "
                          "(propagate again)", "warning")
            return
        if recheck and out["skipped"] and edits is not None:
            self._recheck(labels, lead, edits, out)
        if out["skipped"]:
            self._message(f"slice(s) {out['skipped']} changed while propagating in a way napari does not report "
                          "(an undo or redo, or a script writing into the data): they were left as they are "
                          "(propagate again to redo them)", "warning")
        (zz, rr, cc), old, values = out["plan"]
        current = select_volume(labels.data, (*lead, 0, 0, 0))
        mine = np.asarray(current[zz, rr, cc]) != old  # painted while it ran: the user's, kept
        if mine.any():
            zz, rr, cc, values = zz[~mine], rr[~mine], cc[~mine], values[~mine]
            self._message(f"{int(mine.sum())} voxel(s) painted while propagating were kept as painted", "warning")
        if values.size:
            lead_idx = tuple(np.full(zz.shape, i) for i in lead)
            with labels.block_history():  # one undo step for the whole 3D result
                labels.data_setitem((*lead_idx, zz, rr, cc), values)
        known = labels.metadata.setdefault("sam_confidence", {})
        self.last_scores = {}
        for i, lab in enumerate(out["ids"]):
            s = out["scores"][i]
            prev = np.asarray(known.get(lab, []), dtype=np.float32)
            if out["range"] is not None and prev.shape == s.shape:  # a re-propagation updates its range only
                lo, hi = out["range"]
                s = prev.copy()
                s[lo: hi + 1] = out["scores"][i][lo: hi + 1]
            self.last_scores[lab] = s
            known[lab] = s.tolist()
        self.confidence_label.setText("\n".join(confidence_text(k, v) for k, v in self.last_scores.items()))
        n = sum(len(r) for r in out["results"].values())
        if out["range"] is not None:
            lo, hi = out["range"]
            self._message(f"re-propagated label {out['ids'][0]} from slice {z}: only slices {lo}–{hi} were "
                          f"affected; {values.size} voxels changed (Ctrl+Z undoes it)")
            return
        self._message(f"propagated {len(out['ids'])} object(s) from slice {z} over {n} slice(s); "
                      f"{values.size} voxels changed (Ctrl+Z undoes it)")

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, EmbeddingCancelled):  # while the stack was read, before any work
            self._message("cancelled; nothing was written")
            return
        self._message(f"propagation failed: {exc}", "error")

    def _finished(self) -> None:
        if self._pending is None:  # (a result waiting for a stroke keeps logging the user's edits)
            self._watch(None, None)
        self.worker = None
        self.progress.setFormat("idle")
        self.progress.setValue(0)
        self.cancel_button.setEnabled(False)
        self.propagate_button.setEnabled(True)
        self.embed_button.setEnabled(True)

    def _message(self, text: str, level: str = "info") -> None:
        from napari.utils import notifications

        self.status_label.setText(text)
        self.viewer.status = text
        {"info": notifications.show_info, "warning": notifications.show_warning,
         "error": notifications.show_error}[level](text)
