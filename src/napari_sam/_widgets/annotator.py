"""SAM annotator dock widget: click an object, see its mask at once, commit it as a new label.

Every action is a public method, so a session can be scripted on a viewer::

    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("nuclei"); w.add_point((120, 200)); w.wait(); w.commit()

Heavy work (model loading, image embedding, prediction) runs in thread workers; the main thread only
reads prompts and shows results. Coordinates are (row, col) in the image layer's data coordinates.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from ..core import annotation as ann
from ..core.device import available_devices
from . import _layers as L
from ._annotator_jobs import AnnotatorJobs, _main_thread
from ._annotator_ui import MODEL_CHOICES, NEW_LAYER, SHORTCUTS, AnnotatorUI, bind_denoise
from ._state import get_state
from ._workers import CancelToken, ProgressRelay, on_dock_closed, process_events_until, qt_alive

if TYPE_CHECKING:
    import napari

DEBOUNCE_MS = 40


def _notify(msg: str, level: str = "info") -> None:
    from napari.utils import notifications

    {"info": notifications.show_info, "warning": notifications.show_warning,
     "error": notifications.show_error}[level](msg)


class AnnotatorWidget(AnnotatorJobs, QWidget):
    """Interactive point/box annotation with a SAM model (see the module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        # napari hands plugins a public-only proxy; keep the viewer itself so layer identity checks hold
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.main_thread_stats: dict[str, tuple[float, float]] = {}  # name -> (max wall s, max CPU s)
        self.state = get_state(napari_viewer)
        self.ui = AnnotatorUI(self)
        self.result: ann.Result | None = None  # the latest prediction shown in the preview
        self._result_plane: tuple = ()  # the plane index the result was predicted on
        self._result_check = None  # (embedding key, plane_checksum of the pixels) the result was predicted from
        self._checked_key = None  # the embedding whose pixels were last checked (or just computed from)
        self._preview_box: tuple | None = None  # (r0, c0, r1, c1): where the preview layer may hold pixels
        self._data_gen = self._result_gen = 0  # bumps when the image's data is replaced; that of the result
        self._closed = False  # the dock was closed (napari keeps the widget: it must stop acting)
        self._adopt_labels = True  # the first target may be the "SAM labels" an earlier annotator left
        self._refine_model = None  # weak reference to the model that last set the refine default
        self.image_layer = None
        self.points_layer = self.boxes_layer = self.preview_layer = self._preview_image = None
        self._version = 0  # bumps on every change of prompts / plane / image / model
        self._model_worker = self._embed_worker = self._predict_worker = None
        self._embed_key: Any = None
        self._embed_token = CancelToken()
        self._pending = False
        self._embed_ok = self._embed_restart = self._embed_quiet = False
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._update)
        self.ui.device_combo.addItems(["auto", *available_devices()])
        self._connect_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_combos)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._changed)
        self.state.on_model_changed_while_alive(self, lambda w, model: w._on_model_changed(model))
        bind_denoise(self, self.ui.denoise_spin, self.state)
        handlers = {key: self._key_handler(action) for key, (action, _) in SHORTCUTS.items()}
        for key, handler in handlers.items():
            self.viewer.bind_key(key, handler, overwrite=True)
        teardown = self._teardown_callback(handlers)
        self.destroyed.connect(teardown)
        on_dock_closed(self, self._weak(lambda w: w._on_dock_closed(teardown)))
        self._renames = L.RenameFollower(self.viewer, (self.ui.image_combo, self.ui.labels_combo),
                                         self._refresh_combos)
        self._refresh_combos()
        self._show_polarity()
        self._show_model()

    # ------------------------------------------------------------------ public API (scripting)
    def set_image_layer(self, layer) -> None:
        """Annotate ``layer`` (an Image layer or its name); prompt layers are created for it."""
        if isinstance(layer, str):
            layer = self.viewer.layers[layer]
        self.ui.image_combo.setCurrentText(layer.name)
        self._set_image(layer)

    def set_model(self, model: str = "builtin", device: str = "auto"):
        """Load ``model`` ("builtin", "vit_t", "vit_b", "vit_l", "vit_h" or a checkpoint path) in a worker."""
        if model in MODEL_CHOICES:
            self.ui.model_combo.setCurrentText(model)
        else:
            self.ui.model_combo.setCurrentText("checkpoint file")
            self.ui.checkpoint_edit.setText(str(model))
        self.ui.device_combo.setCurrentText(device)
        return self.load_model()

    def set_denoise(self, sigma: float) -> None:
        """Smooth images with a Gaussian of ``sigma`` image pixels before the encoder (0 = off), for noisy data.
        Shared by every napari-sam widget of this viewer; the current plane is embedded again."""
        self.state.set_denoise(sigma)

    @_main_thread
    def add_point(self, rc, positive: bool | None = None) -> None:
        """Add a prompt point at (row, col) of the current plane (image data coordinates); ``positive``
        None follows the current mode (see :meth:`toggle_polarity`)."""
        pts = self._ensure_layers()[0]
        pos = np.concatenate([np.asarray(L.plane_index(self.viewer, self.image_layer), float), rc])
        world = self.image_layer.data_to_world(pos)
        mode = L.is_positive_mode(pts)
        if positive is not None and positive != mode:
            L.set_polarity(pts, positive)
        pts.add(pts.world_to_data(world)[None])
        if positive is not None and positive != mode:
            L.set_polarity(pts, mode)

    @_main_thread
    def add_box(self, box) -> None:
        """Add a box prompt (min_row, min_col, max_row, max_col), max inclusive, on the current plane."""
        boxes = self._ensure_layers()[1]
        lead = list(L.plane_index(self.viewer, self.image_layer))
        r0, c0, r1, c1 = box
        corners = np.array([lead + [r0, c0], lead + [r0, c1], lead + [r1, c1], lead + [r1, c0]], float)
        boxes.add_rectangles(np.array([boxes.world_to_data(self.image_layer.data_to_world(c)) for c in corners]))

    @_main_thread
    def toggle_polarity(self) -> bool:
        """Switch new points between positive and negative; returns True if new points are positive."""
        pts = self._ensure_layers()[0]
        new = not L.is_positive_mode(pts)
        L.set_polarity(pts, new)
        self._show_polarity()
        return new

    @_main_thread
    def cycle_candidate(self) -> int:
        """Show the next of the candidate masks of an ambiguous prompt; returns its index."""
        r = self.result
        if r is None or r.batch or len(r.patches) < 2:
            self._message("only one candidate mask for these prompts (a single point gives three)")
            return 0 if r is None else r.choice
        r.choice = (r.choice + 1) % len(r.patches)
        self._show_result(r)
        return r.choice

    @_main_thread
    def commit(self) -> list[int]:
        """Write the preview object(s) into the target Labels layer with new ids, as one undo step.
        Existing objects are kept unless 'overwrite' is checked. Returns the new ids."""
        r = self.result
        if r is None or self.image_layer is None:
            self._message("nothing to commit: add a point or a box and wait for the preview", "warning")
            return []
        if self.busy:
            self._message("the prediction is still running; commit again in a moment", "warning")
            return []
        index = L.plane_index(self.viewer, self.image_layer)
        prompts, _ = L.read_prompts(self.points_layer, self.boxes_layer, self.image_layer, index)
        if self._result_gen != self._data_gen:
            self._message("the image's data changed since this preview was computed; wait for the new preview, "
                          "or add a point to predict again", "warning")
            return []
        if self._result_plane != index or r.prompts is None or r.prompts.key() != prompts.key():
            self._message("the preview is not of this plane's prompts (they changed, or the plane did, and no new "
                          "preview came: the embedding was cancelled or failed); add a point to predict again",
                          "warning")
            return []
        if self._edited_since_result(index):
            return []
        try:
            labels = self._target_labels()
            L.check_target(labels, self.image_layer)
            plane = np.asarray(labels.data[index])
            plan = ann.plan_commit(plane, r.patch_objects(), ann.next_free_id(labels.data),
                                   self.ui.overwrite_check.isChecked(), offset=r.offset)
            note = L.upgrade_dtype(labels, plan.dtype)
            L.write_plan(labels, index, plan)
        except (L.LayerError, ValueError) as exc:
            self._message(str(exc), "error")
            return []
        if not any(m.any() for m in r.patch_objects()):
            self._message("the predicted mask is empty: nothing to commit; move the point or draw a box", "warning")
            return []
        if not plan.writes:
            self._message("nothing new to commit: the mask lies entirely on existing objects (tick 'overwrite "
                          "existing objects' to replace them)", "warning")
            return []
        msg = f"committed object(s) {plan.ids} into {labels.name!r} (select it and press Ctrl+Z to undo)"
        if plan.skipped:
            msg += f"; {plan.skipped} object(s) lay entirely on existing labels and were skipped"
        if plan.protected_pixels:
            msg += f"; {plan.protected_pixels} pixels of existing objects were kept"
        self._message(f"{note}. {msg}" if note else msg, "warning" if note else "info")
        self.clear_prompts()
        return plan.ids

    def _edited_since_result(self, index: tuple) -> bool:
        """Whether the plane's pixels changed (edited in place: no napari event) since the shown preview was predicted
        from them (a checksum, ~15 ms for a 4096-px RGB plane). If so the preview is dropped, its embedding
        forgotten, and the prompts are predicted again from the new pixels: the user sees the new mask before
        committing it."""
        key, check = self._result_check or (None, None)
        data = L.full_resolution(self.image_layer)
        if check is None or not isinstance(data, np.ndarray) or ann.plane_checksum(data[index]) == check:
            return False
        self._forget_embedding(key)
        self._set_result(None)
        self._message("the image changed since this preview was predicted (edited in place): nothing committed; "
                      "predicting it again from the new pixels: check the new preview, then commit", "warning")
        self._changed()
        return True

    @_main_thread
    def clear_prompts(self) -> None:
        """Remove the prompts on the current plane and the preview."""
        if self.image_layer is not None:
            index = L.plane_index(self.viewer, self.image_layer)
            for layer in (self.points_layer, self.boxes_layer):
                if layer is None or not len(layer.data):
                    continue
                data = layer.data if layer is self.points_layer else [d[0] for d in layer.data]
                coords = L.to_image_coords(layer, self.image_layer, np.asarray(data).reshape(-1, layer.ndim))
                layer.selected_data = set(np.flatnonzero(L.in_plane(coords, index)).tolist())
                layer.remove_selected()
        self._set_result(None)

    def predict_now(self) -> None:
        """Re-predict immediately (skips the debounce)."""
        self._timer.stop()
        self._update()

    @property
    def busy(self) -> bool:
        """True while a model load, embedding or prediction is pending or running."""
        running = any(w is not None for w in (self._model_worker, self._embed_worker, self._predict_worker))
        return running or self._timer.isActive() or self._pending

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until idle (for scripts and the napari console). Returns False on timeout."""
        return process_events_until(lambda: not self.busy, timeout)

    def cancel(self) -> None:
        """Cancel a running embedding (the prompts stay; the next change restarts it)."""
        self._cancel_embedding(restart=False)

    # ------------------------------------------------------------------ wiring
    def _connect_ui(self) -> None:
        u = self.ui
        u.image_combo.currentTextChanged.connect(self._on_image_choice)
        u.load_button.clicked.connect(self.load_model)
        u.browse_button.clicked.connect(self._browse)
        u.cancel_button.clicked.connect(self.cancel)
        u.polarity_button.clicked.connect(self.toggle_polarity)
        u.cycle_button.clicked.connect(self.cycle_candidate)
        u.commit_button.clicked.connect(self.commit)
        u.clear_button.clicked.connect(self.clear_prompts)
        u.batch_check.toggled.connect(self._changed)
        u.enforce_check.toggled.connect(self._changed)
        u.follow_check.toggled.connect(self._changed)
        u.zoom_check.toggled.connect(self._changed)

    def _weak(self, fn):
        """``fn(widget, *args)`` as a callback that holds the widget weakly (no-op once it is gone, or once Qt has
        deleted it: a worker may finish after the dock was closed)."""
        ref = weakref.ref(self)

        def callback(*args):
            widget = ref()
            if widget is not None and qt_alive(widget):
                return fn(widget, *args)

        return callback

    def _key_handler(self, action: str):
        def run(widget, viewer):
            try:
                getattr(widget, action)()
            except (L.LayerError, ValueError) as exc:
                widget._message(str(exc), "warning")

        handler = self._weak(run)
        handler.__doc__ = f"napari-sam annotator: {action}"
        return handler

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.ui.model_combo.setCurrentText("checkpoint file")
            self.ui.checkpoint_edit.setText(path)

    def _refresh_combos(self, *_) -> None:
        import napari

        images = [lay.name for lay in self.viewer.layers if isinstance(lay, napari.layers.Image)]
        labels = [lay.name for lay in self.viewer.layers
                  if isinstance(lay, napari.layers.Labels) and lay.name != L.PREVIEW_NAME]
        for combo, items in ((self.ui.image_combo, images), (self.ui.labels_combo, [NEW_LAYER, *labels])):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(items)
            if cur in items:
                combo.setCurrentText(cur)
            combo.blockSignals(False)
        if self.image_layer is None and images:
            self._on_image_choice(self.ui.image_combo.currentText())

    def _on_image_choice(self, name: str) -> None:
        if name and name in self.viewer.layers and self.viewer.layers[name] is not self.image_layer:
            self._set_image(self.viewer.layers[name])

    def _set_image(self, layer) -> None:
        if self._closed:
            return  # the dock was closed: a layer event must not make it act again
        problem = L.image_problem(layer)
        if problem:
            self._message(problem, "warning")
            return
        old, self.image_layer = self.image_layer, layer
        if old is not None:
            old.events.data.disconnect(self._on_image_data)
        layer.events.data.connect(self._on_image_data)
        notes = []
        if old is not None and old is not layer:
            self._set_result(None)  # the preview is of the other image: never committed or refined here
            notes = self._switch_layers(old, layer)
        dtype = L.full_resolution(layer).dtype
        if dtype != np.uint8:
            notes.append(f"image {layer.name!r} is {dtype}: it is scaled to 8 bit per plane (0.5–99.5 percentiles)")
        self._ensure_layers()
        if notes:
            self._message("; ".join(notes).replace("{target}", repr(self.ui.labels_combo.currentText())))
        self._changed()

    def _switch_layers(self, old, new) -> list[str]:
        """Another image: prompt layers of another dimensionality are replaced (their points could not lie on
        its planes), and a target Labels layer that does not fit it or does not overlay it gives way to a new
        one. Returns what changed, for the status line."""
        notes = []
        if self.points_layer is not None and self.points_layer.ndim != new.ndim:
            for lay in (self.points_layer, self.boxes_layer):
                if lay is not None and lay in self.viewer.layers:
                    self.viewer.layers.remove(lay)  # (_on_layer_removed forgets them)
            self.points_layer = self.boxes_layer = None
            notes.append(f"new prompt layers for the {new.ndim}D image")
        name = self.ui.labels_combo.currentText()
        if name and name != NEW_LAYER and name in self.viewer.layers:
            if not L.fits_target(self.viewer.layers[name], new):
                self.ui.labels_combo.setCurrentText(NEW_LAYER)
                self._adopt_labels = True  # back on an image seen before: its "SAM labels" is found again
                notes.append(f"{name!r} does not fit or overlay {new.name!r}: objects now go to {{target}} "
                             "(choose another under 'labels')")
        return notes

    def _ensure_layers(self):
        if self.image_layer is None:
            raise L.LayerError(L.image_problem(None))
        if self.points_layer is None or self.points_layer not in self.viewer.layers:
            self.points_layer, self.boxes_layer = L.make_prompt_layers(self.viewer, self.image_layer)
            self.points_layer.events.data.connect(self._on_points_changed)
            self.points_layer.events.features.connect(self._on_points_changed)
            self.boxes_layer.events.data.connect(self._changed)
            self.points_layer.mode = "add"
        # create the preview (and a new target) now: adding layers costs napari a moment, not mid-click
        self._preview(L.image_shape(self.image_layer)[-2:])
        if self.ui.labels_combo.currentText() == NEW_LAYER:
            self._target_labels()
        self.viewer.layers.selection.active = self.points_layer
        return self.points_layer, self.boxes_layer

    @_main_thread
    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if layer is self.image_layer:
            self.image_layer = None
            layer.events.data.disconnect(self._on_image_data)
            self._cancel_embedding(restart=False, quiet=True)
            if not self._closed:
                self._removed_message(f"image {layer.name!r} was removed; choose another image")
        if layer is self.points_layer or layer is self.boxes_layer:
            self.points_layer = self.boxes_layer = None
        if layer is self.preview_layer:
            self.preview_layer = None
        self._refresh_combos()
        self._changed()

    def _removed_message(self, text: str) -> None:
        """Warn that the image was removed, unless the viewer is closing (it removes every layer, then closes its
        window: the notification is sent once control returns to the event loop, if the window is still shown)."""
        self.ui.status_label.setText(text)
        self.viewer.status = text
        shown = self.window().isVisible()

        def notify(w) -> None:
            if w.window().isVisible() or not shown:
                _notify(text, "warning")

        QTimer.singleShot(0, self._weak(notify))

    def _on_dock_closed(self, teardown) -> None:
        """napari's close button took the widget out of its dock without deleting it: stop the running embedding,
        predict no more, clear the preview (a new annotator reuses the layer) and unbind the shortcuts."""
        self._closed = True
        self._timer.stop()
        self._pending = False
        self._cancel_embedding(restart=False, quiet=True)
        self._set_result(None)
        teardown()

    @_main_thread
    def _on_image_data(self, *_) -> None:
        """The image's data was replaced (``layer.data = ...``): embeddings and the preview are of the old data."""
        self._data_gen += 1
        self._cancel_embedding(restart=True, quiet=True)
        self._changed()

    @_main_thread
    def _on_points_changed(self, *_) -> None:
        if self.points_layer is not None:
            L.style_points(self.points_layer)
        self._changed()

    @_main_thread
    def _changed(self, *_) -> None:
        """Prompts, plane, image or model changed: results in flight are stale; re-predict (debounced)."""
        self._version += 1
        if not self._closed:
            self._timer.start()

    def _on_model_changed(self, model) -> None:
        self._cancel_embedding(restart=True)
        self._show_model()
        self._changed()

    def _show_model(self) -> None:
        """The model's name and device; a new model sets its own default for *refine with the previous mask* (the
        built-in model refines better without its logits); the same model with other settings (denoising) keeps
        the user's choice."""
        m = self.state.model
        if m is not None and (self._refine_model is None or self._refine_model() is not m):
            from ..core.build import refine_logits_of

            self.ui.refine_check.setChecked(refine_logits_of(m))
            self._refine_model = weakref.ref(m)
        self.ui.model_label.setText("model: none loaded (loads on first click)" if m is None else
                                    f"model: {self.state.model_name or 'custom'} on {m.device}")

    def _show_polarity(self) -> None:
        pos = True if self.points_layer is None else L.is_positive_mode(self.points_layer)
        self.ui.polarity_label.setText("new points: POSITIVE (green)" if pos else "new points: NEGATIVE (magenta ×)")

    # ------------------------------------------------------------------ results and messages
    def _set_result(self, res: ann.Result | None, preview: np.ndarray | None = None, index: tuple = (),
                    check: tuple | None = None) -> None:
        self.result = res
        self._result_plane = index  # the plane the result was predicted on (commit checks it)
        self._result_gen = self._data_gen  # and the image data (results of replaced data are dropped before)
        self._result_check = check  # and its pixels (commit checks them: an edit in place sends no event)
        self._show_result(res, preview)

    def _show_result(self, res: ann.Result | None, preview: np.ndarray | None = None) -> None:
        """Show ``res`` in the preview layer; ``preview``: its ``preview_patch()`` when already made (worker)."""
        if res is None:
            self.ui.candidate_label.setText("candidate: –")
            if self.preview_layer is not None:
                self._write_preview(self.preview_layer, np.zeros((0, 0), np.uint8), (0, 0))
            return
        preview = res.preview_patch() if preview is None else preview
        self._write_preview(self._preview(res.plane_shape), preview, res.offset)
        if res.batch:
            self.ui.candidate_label.setText(f"batch: {len(res.patches)} objects")
        else:
            self.ui.candidate_label.setText(
                f"candidate {res.choice + 1}/{len(res.patches)}: predicted IoU {res.iou[res.choice]:.2f}")

    def _write_preview(self, lay, patch: np.ndarray, offset: tuple[int, int]) -> None:
        """Make the preview layer ``patch`` (h, w) at ``offset`` (row, col), zero elsewhere, touching only the box of
        the old and the new preview: napari redraws that box, not the whole plane (an 8192-px plane took
        seconds). Falls back to replacing the data when the box covers most of the plane or the ids need a wider
        dtype."""
        (r0, c0), (h, w) = offset, patch.shape
        new = (r0, c0, r0 + h, c0 + w) if h and w else None
        old = self._preview_box
        self._preview_box = new
        boxes = [b for b in (old, new) if b is not None]
        if not boxes:
            return
        a0, b0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        a1, b1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        data = lay.data
        wide = patch.size and int(patch.max()) > np.iinfo(data.dtype).max
        if wide or 2 * (a1 - a0) * (b1 - b0) > data.size:
            full = np.zeros(data.shape, np.promote_types(patch.dtype, data.dtype) if wide else data.dtype)
            full[r0:r0 + h, c0:c0 + w] = patch
            lay.data = full
            return
        want = np.zeros((a1 - a0, b1 - b0), data.dtype)
        want[r0 - a0:r0 - a0 + h, c0 - b0:c0 - b0 + w] = patch
        rows, cols = np.nonzero(data[a0:a1, b0:b1] != want)
        if rows.size:
            with lay.block_history():
                lay.data_setitem((rows + a0, cols + b0), want[rows, cols])  # redraws only the changed box
            reset = getattr(lay, "_reset_history", None)  # the preview is not undoable: drop napari's copy of it
            if reset is not None:
                reset()

    def _preview(self, shape):
        lay = self.preview_layer
        if lay is None or lay not in self.viewer.layers or lay.data.shape != shape \
                or self._preview_image is not self.image_layer:  # (another image: its transform may differ)
            if lay is not None and lay in self.viewer.layers:
                self.viewer.layers.remove(lay)
            im = self.image_layer
            lay = self._reusable_preview(shape)
            if lay is None:
                lay = self.viewer.add_labels(np.zeros(shape, np.uint8), name=L.PREVIEW_NAME, opacity=0.5,
                                             **L.overlay_kwargs(im, 2))
            else:
                lay.data = np.zeros(shape, np.uint8)
            lay.editable = False
            self.preview_layer, self._preview_image = lay, im
            self._preview_box = None  # (all zeros)
            if self.points_layer is not None:  # keep the prompts on top and active
                self.viewer.layers.move(self.viewer.layers.index(lay), self.viewer.layers.index(self.points_layer))
                self.viewer.layers.selection.active = self.points_layer
        return lay

    def _reusable_preview(self, shape):
        """The preview layer a closed annotator left, if it fits the image (shape and transform), else None."""
        import napari

        lay = self.viewer.layers[L.PREVIEW_NAME] if L.PREVIEW_NAME in self.viewer.layers else None
        if not isinstance(lay, napari.layers.Labels) or lay.data.shape != tuple(shape):
            return None
        want = napari.layers.Labels(np.zeros((1, 1), np.uint8), **L.overlay_kwargs(self.image_layer, 2))
        return lay if L.same_transform(lay, want) else None  # (scale, translate, rotate, shear and affine)

    def _target_labels(self):
        name = self.ui.labels_combo.currentText()
        if name and name != NEW_LAYER:
            return L.named_layer(self.viewer, name, "target labels", self._refresh_combos)
        im = self.image_layer
        lay = self._reusable_labels() if self._adopt_labels else None
        self._adopt_labels = False
        if lay is None:
            lay = self.viewer.add_labels(np.zeros(L.image_shape(im), np.uint32), name=L.LABELS_NAME,
                                         **L.overlay_kwargs(im))
        self.ui.labels_combo.setCurrentText(lay.name)
        if self.points_layer is not None:
            self.viewer.layers.selection.active = self.points_layer
        return lay

    def _reusable_labels(self):
        """A "SAM labels" layer (or "SAM labels [k]") made by an annotator of this viewer that fits and overlays the
        image, else None: a reopened annotator, or one back on an image seen before, goes on committing there
        instead of starting yet another layer."""
        import napari

        for lay in self.viewer.layers:
            if not (isinstance(lay, napari.layers.Labels) and (lay.name == L.LABELS_NAME
                                                               or lay.name.startswith(L.LABELS_NAME + " ["))):
                continue
            if L.fits_target(lay, self.image_layer):
                return lay
        return None

    def _message(self, text: str, level: str = "info") -> None:
        self.ui.status_label.setText(text)
        self.viewer.status = text
        _notify(text, level)

    def _teardown_callback(self, handlers):
        """A closure holding no reference to the widget (it runs once the widget is gone) that removes
        the viewer shortcuts. The shared-state model callback disconnects itself (``on_model_changed_while_alive``);
        napari's layer/viewer events hold only weak references to the widget's methods: no clean-up either."""
        viewer = self.viewer

        def teardown(*_):
            from napari.utils.key_bindings import coerce_keybinding

            for key, handler in handlers.items():
                if viewer.keymap.get(coerce_keybinding(key)) is handler:
                    viewer.bind_key(key, None)

        return teardown
