"""Segment-everything dock widget: automatic masks for the current image plane, with live thresholds.

Scriptable::

    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    w.set_image_layer("nuclei"); w.run(points_per_side=16); w.wait(); w.set_thresholds(pred_iou_thresh=0.9)

The model runs once in a thread worker (progress, cancel); its outputs are kept, so moving a threshold slider
re-filters them and rewrites the result without running the model again. A plane with a side over LARGE_PLANE px is
segmented in tiles (TILE_SIZE px cores with a TILE_HALO px halo, as ``napari_sam.segment_everything`` and
``napari-sam segment`` do): the outputs of every tile are kept, and a slider move re-filters and re-stitches them.
Results go into a new Labels layer ("SAM everything") or into a chosen Labels layer of the image's shape; existing
labels are kept unless "overwrite" is checked, and every write (including each slider change) is ONE undo step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox,
    QVBoxLayout, QWidget,
)
from superqt import QLabeledDoubleSlider, QLabeledSlider

from ..core.amg import AutomaticMaskGenerator, recommended_settings, recommended_thresholds
from ..core.tiling import tile_boxes
from . import _layers as L
from ._annotator_ui import bind_denoise, denoise_spin_box
from ._state import get_state
from ._workers import CancelToken, ProgressRelay, on_dock_closed, process_events_until, qt_alive, run_in_thread

if TYPE_CHECKING:
    import napari

NEW_LAYER = "[new layer]"
OUTPUT_NAME = "SAM everything"
FLOOR = 0.5  # candidates are kept down to this IoU / stability (or lower thresholds), so sliders go that low live
LIVE = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "min_object_area")
LARGE_PLANE = 2048  # the side above which a plane is tiled (segment_everything()'s max_untiled default)
TILE_SIZE = 1024  # tiles' core size and halo on a large plane (segment_everything()'s tile_size and halo defaults)
TILE_HALO = 128


def run_generation(model, image: np.ndarray, params: dict, cancel, report, denoise: float = 0.0,
                   tiling: tuple[int, int] | None = None) -> dict:
    """Thread job: load the built-in model if needed (with the viewer's ``denoise`` sigma), run the model once,
    keep the candidates: MaskProposals, or with ``tiling`` = (tile_size, halo) TiledProposals (the model runs tile
    by tile; ``report`` counts the points of all tiles)."""
    if model is None:
        from ..core.build import load_model

        model = load_model(denoise=denoise)
    gen = AutomaticMaskGenerator(model, **params)
    floors = {"pred_iou_thresh": FLOOR, "stability_score_thresh": FLOOR}
    if gen.scorer is not None:  # keep what the scorer judges, so that rescoring can be switched on live
        floors = {k: min(v, gen.scorer.floors[k]) for k, v in floors.items()}
    kw = dict(progress=report, cancel=cancel, iou_floor=min(floors["pred_iou_thresh"], gen.pred_iou_thresh),
              stability_floor=min(floors["stability_score_thresh"], gen.stability_score_thresh))
    if tiling is not None:
        proposals = gen.propose_tiled(image, tile_size=tiling[0], halo=tiling[1], **kw)
    else:
        proposals = gen.propose(image, **kw)
    return {"model": model, "proposals": proposals, "generator": gen}


class SegmentEverythingWidget(QWidget):
    """Automatic mask generation for the current plane of an image layer (see the module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.worker = None
        self.proposals = None
        self.generator = None
        self.last_refilter_s = 0.0
        self._token = CancelToken()
        self._target = None  # (labels layer, plane index, highest id off the plane, overwrite)
        # the target plane before our first write, right after our last one, and the pixels the user changed since
        # our first (painted, erased, committed): a re-filter rebuilds the plane from these
        self._base = self._expected = self._edited = None
        self._writing = False
        # paint events by others on the target: how many (and how many our last write accounted for), and the
        # highest id they painted (on any plane: ids committed since _make_target scanned the layer)
        self._paints = self._paints_seen = self._painted_max = 0
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(60)
        self._timer.timeout.connect(self._refilter_in_worker)
        self._refilter_worker = None  # a slider move's re-filter runs here, off the main thread
        self._after_stroke = QTimer(self)  # a write waits for the user's brush stroke on the target to end
        self._after_stroke.setInterval(50)
        self._after_stroke.timeout.connect(self._stroke_ended)
        self._refilter_version = 0
        self._refilter_again = False
        self._build_ui()
        self._model = self.state.model  # the model the settings and the kept outputs are for
        self._run_model = None  # the viewer's model when Run was pressed
        self._use_recommended(self.state.model)
        self.state.on_model_changed_while_alive(self, type(self)._model_changed)
        on_dock_closed(self, self._closed)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._renames = L.RenameFollower(self.viewer, (self.image_combo, self.target_combo), self._refresh)
        self._refresh()

    def _use_recommended(self, model) -> None:
        """Set the threshold sliders, crop layers and points per side to the model's recommended values (None:
        the built-in model's), without re-filtering anything."""
        try:
            rec, settings = recommended_thresholds(model), recommended_settings(model)
        except Exception:  # an unreadable built-in file: keep the reference defaults
            return
        live = (*self.sliders.values(), self.parts_check, self.rescore_check)
        for w in live:
            w.blockSignals(True)
        try:
            for k, v in rec.items():
                self.sliders[k].setValue(v)
            self.crop_spin.setValue(settings.get("crop_n_layers", 0))
            self.points_spin.setValue(settings.get("points_per_side", 32))
            self.parts_check.setChecked(bool(settings.get("resolve_parts", 0)))
            self.rescore_check.setChecked(bool(settings.get("rescore", 0)))
            self.sliders["min_object_area"].setValue(settings.get("min_object_area", 16))
        finally:
            for w in live:
                w.blockSignals(False)

    def _model_changed(self, model) -> None:
        """Another model (loaded, fine-tuned): its recommended settings, and the kept outputs of the old one are
        dropped (the result stays as written; the next Run uses the new model). The same model with another
        denoising sigma changes nothing: the user's thresholds and the result stay."""
        if model is self._model:
            return
        self._model = model
        self._use_recommended(model)
        if self.proposals is not None:
            self._forget()
            self._message("the model changed: its recommended settings are set; the result stays as it is "
                          "(Segment everything runs the new model)")

    def _forget(self) -> None:
        """Drop the kept outputs; a re-filter scheduled or running writes nothing."""
        self._timer.stop()
        self._after_stroke.stop()
        self._refilter_version += 1
        self.proposals = None
        self._release_target()

    def _closed(self) -> None:
        """napari's close button took the widget out of its dock (it lives on): stop its work, write nothing."""
        self._token.cancel()
        self._forget()

    # ----------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        self.image_combo, self.target_combo = QComboBox(), QComboBox()
        self.points_spin = QSpinBox()
        self.points_spin.setRange(1, 128)
        self.points_spin.setValue(32)
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(0, 3)
        self.min_region_spin = QSpinBox()
        self.min_region_spin.setRange(0, 100000)
        self.sliders = {}
        for key, lo, default in (("pred_iou_thresh", 0.0, 0.88), ("stability_score_thresh", 0.0, 0.95),
                                 ("box_nms_thresh", 0.0, 0.7)):
            s = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
            s.setRange(lo, 1.0)
            s.setDecimals(2)
            s.setValue(default)
            s.valueChanged.connect(self._schedule)
            self.sliders[key] = s
        area = QLabeledSlider(Qt.Orientation.Horizontal)
        area.setRange(0, 2000)
        area.setValue(16)
        area.valueChanged.connect(self._schedule)
        self.sliders["min_object_area"] = area
        self.parts_check = QCheckBox("drop parts of objects and merges of several")
        self.parts_check.setToolTip("A grid of points gives both a nucleus and pieces of it, and both two touching "
                                    "nuclei and their union: keep the whole nuclei (live, no model run)")
        self.parts_check.toggled.connect(self._schedule)
        self.rescore_check = QCheckBox("rank by the learned quality score")
        self.rescore_check.setToolTip("Threshold and rank candidates by the model's learned candidate scorer (its "
                                      "estimate of each mask's IoU, from the mask, its neighbours and the image) "
                                      "instead of the decoder's predicted IoU; 'pred IoU' then applies to it. "
                                      "Needs a model that has one (the built-in model does). Live, no model run")
        self.rescore_check.toggled.connect(self._schedule)
        self.denoise_spin = denoise_spin_box()
        bind_denoise(self, self.denoise_spin, self.state)
        self.overwrite_check = QCheckBox("overwrite existing labels")
        self.run_button, self.cancel_button = QPushButton("Segment everything"), QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("idle")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        form = QFormLayout()
        for name, w in (("image", self.image_combo), ("output", self.target_combo),
                        ("points per side", self.points_spin), ("crop layers", self.crop_spin),
                        ("min mask region area", self.min_region_spin),
                        ("pred IoU ≥", self.sliders["pred_iou_thresh"]),
                        ("stability ≥", self.sliders["stability_score_thresh"]),
                        ("box NMS IoU", self.sliders["box_nms_thresh"]),
                        ("min object area (px)", self.sliders["min_object_area"]),
                        ("parts / merges", self.parts_check),
                        ("quality score", self.rescore_check),
                        ("denoise σ", self.denoise_spin)):
            form.addRow(name, w)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.overwrite_check)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status_label)
        lay.addStretch()
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)

    def _refresh(self, *_) -> None:
        import napari

        cur_img, cur_tgt = self.image_combo.currentText(), self.target_combo.currentText()
        self.image_combo.clear()
        self.image_combo.addItems([x.name for x in self.viewer.layers if isinstance(x, napari.layers.Image)])
        self.target_combo.clear()
        self.target_combo.addItems([NEW_LAYER] + [x.name for x in self.viewer.layers
                                                  if isinstance(x, napari.layers.Labels) and x.name != L.PREVIEW_NAME])
        if cur_img:
            self.image_combo.setCurrentText(cur_img)
        if cur_tgt:
            self.target_combo.setCurrentText(cur_tgt)

    def _message(self, text: str, level: str = "info") -> None:
        self.status_label.setText(text)
        if level != "info":
            from napari.utils import notifications

            getattr(notifications, f"show_{level}")(text)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)

    # ----------------------------------------------------------------- public API
    def set_image_layer(self, layer) -> None:
        self.image_combo.setCurrentText(getattr(layer, "name", layer))

    def set_target(self, layer) -> None:
        """Write results into ``layer`` (a Labels layer or its name), or NEW_LAYER."""
        self.target_combo.setCurrentText(getattr(layer, "name", layer))

    def thresholds(self) -> dict:
        return {k: s.value() for k, s in self.sliders.items()}

    def set_thresholds(self, **values) -> None:
        """Set live thresholds (pred_iou_thresh, stability_score_thresh, box_nms_thresh, min_object_area) and
        re-filter at once."""
        for k, v in values.items():
            if k not in self.sliders:
                raise ValueError(f"unknown threshold {k!r}; choose from {LIVE}")
            self.sliders[k].blockSignals(True)
            self.sliders[k].setValue(v)
            self.sliders[k].blockSignals(False)
        self.refilter()

    def busy(self) -> bool:
        """True while the model runs or a re-filter is scheduled or running."""
        return (self.worker is not None or self._refilter_worker is not None or self._timer.isActive()
                or self._after_stroke.isActive())

    def wait(self, timeout: float = 300.0) -> bool:
        return process_events_until(lambda: not self.busy(), timeout)

    def cancel(self) -> None:
        """Stop the running model; nothing is written."""
        self._token.cancel()

    def run(self, **params) -> bool:
        """Run the model on the current plane. ``params``: AutomaticMaskGenerator parameters overriding the
        widget's. Returns False (with a message) if the inputs do not allow it."""
        if self.worker is not None:
            self._message("segment-everything is running; wait or cancel it", "warning")
            return False
        try:
            image, index, plane = self._image()
            self._target_layer(image)  # checked now, not after minutes of model work
        except ValueError as e:
            self._message(str(e), "error")
            return False
        p = {"points_per_side": self.points_spin.value(), "crop_n_layers": self.crop_spin.value(),
             "min_mask_region_area": self.min_region_spin.value(), "resolve_parts": self.parts_check.isChecked(),
             "rescore": self.rescore_check.isChecked()}
        p.update({k: v for k, v in self.thresholds().items() if k != "min_object_area"})
        p.update(params)
        try:
            _validate(p)
        except ValueError as e:
            self._message(str(e), "error")
            return False
        for k in LIVE:  # thresholds given here become the sliders' values
            if k in params:
                self.sliders[k].blockSignals(True)
                self.sliders[k].setValue(params[k])
                self.sliders[k].blockSignals(False)
        p.pop("min_object_area", None)
        self._timer.stop()  # a re-filter of the previous outputs is no longer wanted
        self._after_stroke.stop()
        self._refilter_version += 1
        self.proposals = None
        self._release_target()
        self._token = CancelToken()
        self._run_model = self.state.model  # None: the worker loads the built-in model (one loaded meanwhile is fine)
        self._plane = (image, index, plane.shape[:2])
        self.progress.setFormat("segmenting %p%")
        self.progress.setValue(0)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        note = "" if self.state.model is not None else " (loading the built-in model first)"
        tiling = None
        if max(plane.shape[:2]) > LARGE_PLANE:  # tiled as segment_everything() tiles it
            tiling = (TILE_SIZE, TILE_HALO)
            n = len(tile_boxes(plane.shape[:2], TILE_SIZE, TILE_HALO))
            self._message(f"running the model{note}; this plane is {plane.shape[0]} x {plane.shape[1]} px: it is "
                          f"segmented in {n} tiles of {TILE_SIZE} px (with a {TILE_HALO} px overlap), stitched")
        else:
            self._message("running the model" + note)
        self.worker = run_in_thread(run_generation, self.state.model, plane, p, self._token.cancelled,
                                    self._relay.report, denoise=self.state.denoise, tiling=tiling,
                                    on_return=self._done, on_error=self._failed, on_finish=self._finished)
        return True

    def refilter(self) -> int:
        """Apply the current thresholds to the kept model outputs and rewrite the result (one undo step), now.
        Returns the number of objects (0, with an error message and the layer unchanged, if they cannot apply).
        Slider moves do the same in a worker (the viewer stays live on large images)."""
        if self.proposals is None or self._target is None:
            return 0
        self._timer.stop()
        self._refilter_version += 1  # a re-filter still running in a worker is now stale
        t0 = time.perf_counter()
        snap = self._snapshot()
        try:
            result = filter_and_plan(self.proposals, self._filter_params(), snap)
        except ValueError as e:  # rescoring with a model that has no scorer: the result stays as it was
            self._message(str(e), "error")
            return 0
        return self._show_filtered(result, snap, t0)

    def _filter_params(self) -> dict:
        th, g = self.thresholds(), self.generator
        return dict(pred_iou_thresh=th["pred_iou_thresh"], stability_score_thresh=th["stability_score_thresh"],
                    box_nms_thresh=th["box_nms_thresh"], crop_nms_thresh=g.crop_nms_thresh,
                    min_mask_region_area=g.min_mask_region_area, resolve_parts=self.parts_check.isChecked(),
                    rescore=self.rescore_check.isChecked(), min_object_area=int(th["min_object_area"]))

    def _show_filtered(self, result: PlaneWrite, snap: Snapshot, t0: float) -> int:
        kept = self._apply(result, snap)
        self.last_refilter_s = time.perf_counter() - t0
        tiles = getattr(self.proposals, "tiles", None)
        where = f" in {len(tiles)} tiles" if tiles is not None else ""
        msg = f"{result.n_objects} objects ({len(self.proposals)} kept candidates{where}; re-filtered in " \
              f"{1000 * self.last_refilter_s:.0f} ms)"
        if kept:
            msg += f"; {kept} pixel(s) painted meanwhile were kept"
        self._message(msg)
        return result.n_objects

    def _refilter_in_worker(self) -> None:
        if self.proposals is None or self._target is None:
            return
        if self._stroking():  # its pixels are reported on release: snapshot after it
            self._after_stroke.start()
            return
        if self._refilter_worker is not None:  # one at a time; the latest values run when it ends
            self._refilter_version += 1  # the running one is stale: it stops at its next tile
            self._refilter_again = True
            return
        self._refilter_version += 1
        version, proposals, t0 = self._refilter_version, self.proposals, time.perf_counter()
        snap = self._snapshot()

        def stale() -> bool:  # (read in the worker: an int compared, no Qt)
            return version != self._refilter_version

        def done(result):  # (closures: run_in_thread cannot see that they belong to this widget)
            if (qt_alive(self) and version == self._refilter_version and proposals is self.proposals
                    and self._target is not None):
                if result.n_objects and self._painted_max > result.offset:
                    self._refilter_again = True  # an id the plan gives was committed meanwhile: plan again
                elif self._stroking():  # a write now would split the stroke's undo step
                    self._after_stroke.start()  # and miss its unreported pixels: plan again when it ends
                else:
                    self._show_filtered(result, snap, t0)

        def failed(exc):
            from ..core.amg import Cancelled

            if qt_alive(self) and not isinstance(exc, Cancelled):  # (a stale re-filter stopped: newer values run)
                self._message(str(exc), "error")

        def finished():
            self._refilter_worker = None
            if self._refilter_again and qt_alive(self):
                self._refilter_again = False
                self._refilter_in_worker()

        self._refilter_worker = run_in_thread(filter_and_plan, proposals, self._filter_params(), snap, stale,
                                              on_return=done, on_error=failed, on_finish=finished)

    # ----------------------------------------------------------------- internals
    def _stroking(self) -> bool:
        """Whether the user's brush stroke is under way on the target (a removed target's never ends: False)."""
        layer = self._target[0] if self._target is not None else None
        return layer is not None and L.stroke_in_progress(layer) and layer in self.viewer.layers

    def _stroke_ended(self) -> None:
        if self._stroking():
            return
        self._after_stroke.stop()
        self._refilter_in_worker()

    def _schedule(self, *_) -> None:
        if self.proposals is not None:
            self._timer.start()

    def _image(self):
        name = self.image_combo.currentText()
        image = L.named_layer(self.viewer, name, "image", self._refresh) if name else None
        problem = L.image_problem(image)
        if problem:
            raise ValueError(problem)
        index = L.plane_index(self.viewer, image)
        return image, index, L.image_plane(image, index)

    def _done(self, result: dict) -> None:
        if result["proposals"] is None:
            return
        if self._token.cancelled():  # too late to stop the model (e.g. the dock was closed as it ended)
            self._message("cancelled; nothing was written")
            return
        if self._run_model is not None and self.state.model is not self._run_model:
            self._message("the model changed while segment-everything ran; nothing was written: run it again to "
                          "use the new model", "warning")
            return
        if self.state.model is None:
            self._model = result["model"]  # the settings were the built-in model's: they stay
            self.state.set_model(result["model"])
        self.generator, self.proposals = result["generator"], result["proposals"]
        try:
            self._target = self._make_target()
        except ValueError as e:
            self.proposals = None
            self._message(str(e), "error")
            return
        self._refilter_in_worker()  # the first result, off the main thread too

    def _failed(self, exc: BaseException) -> None:
        from ..core.amg import Cancelled

        if isinstance(exc, Cancelled):
            self._message("cancelled; nothing was written")
        else:
            self._message(f"segment-everything failed: {exc}", "error")

    def _finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setFormat("idle")

    def _target_layer(self, image):
        """The chosen existing Labels layer, checked against ``image`` (None: a new layer is to be made)."""
        import napari

        name = self.target_combo.currentText()
        if name == NEW_LAYER or not name:
            return None
        layer = L.named_layer(self.viewer, name, "output", self._refresh)
        if not isinstance(layer, napari.layers.Labels):
            raise ValueError(f"{name!r} is not a Labels layer; choose a Labels layer or {NEW_LAYER}")
        L.check_target(layer, image)
        return layer

    def _make_target(self):
        image, index, shape2 = self._plane
        full = L.image_shape(image)
        layer = self._target_layer(image)
        created = layer is None
        if created:
            layer = self.viewer.add_labels(np.zeros(full, dtype=np.int32), name=OUTPUT_NAME,
                                           **L.overlay_kwargs(image))
            self._refresh()
            self.target_combo.setCurrentText(layer.name)
        data = np.asarray(layer.data)
        # the highest id off this plane (our writes only touch this plane; the ids on it are read at each write);
        # a layer made just now holds none
        others = 0 if created else max((int(data[i].max()) for i in np.ndindex(data.shape[:len(index)])
                                        if i != index), default=0)
        self._base = np.array(data[index])
        self._edited = np.zeros(self._base.shape, bool)
        self._expected, self._paints_seen, self._painted_max = None, self._paints, 0
        layer.events.paint.connect(self._on_paint)
        return layer, index, others, self.overwrite_check.isChecked()

    def _release_target(self) -> None:
        if self._target is not None:
            self._target[0].events.paint.disconnect(self._on_paint)
        self._target = self._base = self._expected = self._edited = None

    def _on_paint(self, event=None) -> None:
        """A write to the target that is not ours (a brush, the eraser, a fill, the annotator's commit): the next
        re-filter first marks the pixels of our plane that differ from our last write as the user's, and gives
        new ids past the highest id painted (on any plane). (napari emits the event before it changes the data.)
        Undo and redo emit none: alone, they leave the plane ours."""
        if not self._writing:
            self._paints += 1
            self._painted_max = max(self._painted_max, _highest_new_id(getattr(event, "value", None)))

    def _snapshot(self) -> Snapshot:
        """What a re-filter's write is planned against (taken in the main thread; the plan is made in a worker):
        a copy of the target plane now, and our bookkeeping. Paint events from here on are checked in
        :meth:`_apply`."""
        layer, index, others, overwrite = self._target
        return Snapshot(np.array(layer.data[index]), self._base, self._edited, self._expected,
                        self._paints != self._paints_seen, max(others, self._painted_max), overwrite,
                        layer.data.dtype, self._paints)

    def _apply(self, plan: PlaneWrite, snap: Snapshot) -> int:
        """Write ``plan`` in ONE undo step. Pixels the user changed since the snapshot are left as they are now
        (the next re-filter counts them as the user's). Returns how many such pixels the plan would have
        written."""
        layer, index = self._target[:2]
        self._edited, self._expected, self._paints_seen = plan.edited, plan.expected, snap.paints
        rows, cols, values = plan.rows, plan.cols, plan.values
        kept = 0
        if self._paints != snap.paints:  # someone painted meanwhile: write only where the plane is still as planned
            ok = np.asarray(layer.data[index])[rows, cols] == snap.plane[rows, cols]
            kept = int(ok.size - np.count_nonzero(ok))
            rows, cols, values = rows[ok], cols[ok], values[ok]
        if plan.expected.dtype != layer.data.dtype and np.can_cast(layer.data.dtype, plan.expected.dtype):
            L.upgrade_dtype(layer, plan.expected.dtype)
        if rows.size == 0:
            return kept
        lead = tuple(np.full(rows.size, i, dtype=np.intp) for i in index)
        self._writing = True
        try:
            with layer.block_history():
                layer.data_setitem((*lead, rows, cols), values.astype(layer.data.dtype, copy=False))
        finally:
            self._writing = False
        return kept


@dataclass(eq=False)
class Snapshot:
    """The target plane when a re-filter started (``plane``, a copy) and the widget's bookkeeping then: the plane
    before our first write (``base``), the pixels the user changed since (``edited``), the plane right after our
    last write (``expected``), whether paint events came since it (``user_wrote``), the highest id off the plane
    or painted by others (``others``), the overwrite choice, the layer's dtype and the count of paint events by
    others so far (``paints``)."""

    plane: np.ndarray
    base: np.ndarray
    edited: np.ndarray
    expected: np.ndarray | None
    user_wrote: bool
    others: int
    overwrite: bool
    dtype: np.dtype
    paints: int = 0


@dataclass(eq=False)
class PlaneWrite:
    """A planned write: the pixels (``rows``, ``cols``) whose values change to ``values``, the plane as it will
    be (``expected``, in the dtype the layer needs), the user's pixels (``edited``), the object count and the id
    offset (the new ids are ``offset + 1`` on)."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    expected: np.ndarray
    edited: np.ndarray
    n_objects: int
    offset: int = 0


def plan_plane_write(labels: np.ndarray, snap: Snapshot) -> PlaneWrite:
    """Replace our previous write with ``labels`` (H, W): the plane is rebuilt from the labels it held before our
    first write, the pixels the user changed since (kept as they are, never written over) and ``labels``. The new
    ids start past every id of the layer but ours, so ids committed meanwhile (e.g. by the annotator) are never
    reused; a dtype too narrow for them becomes int64. Pure: runs in a worker."""
    edited = snap.edited
    if snap.user_wrote and snap.expected is not None:
        edited = edited | (snap.plane != snap.expected)
    current = np.where(edited, snap.plane, snap.base)
    offset = max(snap.others, int(current.max(initial=0)))
    rows, cols = np.nonzero((labels > 0) & ~edited)
    if not snap.overwrite:
        free = current[rows, cols] == 0
        rows, cols = rows[free], cols[free]
    new = current.astype(np.int64)
    new[rows, cols] = labels[rows, cols].astype(np.int64) + offset
    dtype = np.dtype(snap.dtype)
    if new.max(initial=0) > np.iinfo(dtype).max:
        dtype = np.dtype(np.int64)
    changed_r, changed_c = np.nonzero(new != snap.plane)
    return PlaneWrite(changed_r, changed_c, new[changed_r, changed_c].astype(dtype), new.astype(dtype), edited,
                      int(labels.max(initial=0)), offset)


def _highest_new_id(atoms) -> int:
    """The highest label a paint event's history atoms (napari's ``events.paint`` value) wrote: a
    ``_MaskedPaintAtom``'s ``new_value`` or the new values of an ``(indices, old, new)`` tuple (0: none)."""
    top = 0
    for atom in atoms or ():
        new = getattr(atom, "new_value", None)
        if new is None and isinstance(atom, tuple) and len(atom) == 3:
            new = atom[2]
        if new is not None and np.size(new):
            top = max(top, int(np.max(new)))
    return top


def filter_and_plan(proposals, params: dict, snap: Snapshot, cancel=None) -> PlaneWrite:
    """:func:`filtered_labels` and :func:`plan_plane_write`, for a worker."""
    return plan_plane_write(filtered_labels(proposals, params, cancel), snap)


def filtered_labels(proposals, params: dict, cancel=None) -> np.ndarray:
    """The label image (H, W) int32 of the kept model outputs ``proposals`` (MaskProposals, or TiledProposals:
    re-filtered tile by tile and stitched) under ``params`` (MaskProposals.filter's arguments and
    ``min_object_area``); ValueError when they cannot apply. cancel() -> True (a newer slider move) stops it
    between tiles with napari_sam.core.amg.Cancelled. Pure: runs in a worker for slider moves."""
    params = dict(params)
    area = params.pop("min_object_area")
    return proposals.labels(area, cancel=cancel, **params)


def _validate(params: dict) -> None:
    """Raise ValueError for out-of-range parameters without building a model."""
    from ..core import amg

    for k in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        amg._check_unit(k, params[k])
    amg._check_int("points_per_side", params["points_per_side"], 1)
    amg._check_int("crop_n_layers", params["crop_n_layers"], 0)
    amg._check_int("min_mask_region_area", params["min_mask_region_area"], 0)
