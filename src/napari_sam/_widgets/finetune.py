"""Fine-tune dock widget: tune the current model on the objects committed in a Labels layer (the data engine).

Decoder-only by default (frozen encoder, each image embedded once), in a worker thread with progress, cancel
and a loss curve; on success the tuned model becomes the viewer's model (annotator included) and can be
saved as a checkpoint file. All training logic is :func:`napari_sam.core.training.finetune_iter`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QObject, QPointF, Qt, Signal
from qtpy.QtGui import QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                            QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from . import _layers as L
from ._state import get_state
from ._workers import CancelToken, on_dock_closed, run_in_thread


class LossCurve(QWidget):
    """A minimal line plot of the training loss (no plotting dependency)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(80)

    def set_values(self, values: list[float]) -> None:
        self.values = list(values)
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.fillRect(self.rect(), Qt.black)
        if len(self.values) < 2:
            return
        v = np.asarray(self.values, float)
        lo, hi = float(v.min()), float(v.max())
        span = hi - lo or 1.0
        w, h = self.width() - 4, self.height() - 4
        pts = [QPointF(2 + w * i / (len(v) - 1), 2 + h * (1 - (x - lo) / span)) for i, x in enumerate(v)]
        p.setPen(QPen(Qt.green, 1.5))
        p.drawPolyline(QPolygonF(pts))
        p.setPen(Qt.white)
        p.drawText(4, 14, f"loss {v[-1]:.3f}")


class _Relay(QObject):
    step = Signal(int, int, float)  # step, total, loss
    phase = Signal(str)


def run_finetune(model, images, labels, steps: int, mode: str, lr: float, cancel: CancelToken, relay: _Relay,
                 labels_name: str = "labels"):
    """Worker body: fine-tune a copy of ``model`` (None: the built-in model, loaded here) on ``images`` and their
    ``labels`` (the layers' arrays, 2D or stacks); returns (tuned model, losses, finished, the built-in model if it
    was loaded here, else None). Empty ``labels`` (named ``labels_name`` in the message) raise ValueError."""
    from napari_sam.core.training import finetune_iter

    images, labels = np.asarray(images), np.asarray(labels)  # read here: a large (lazy) level would freeze the viewer
    if not (labels.any() if labels.ndim < 3 else any(plane.any() for plane in labels)):  # stops at a labelled plane
        raise ValueError(f"Labels layer {labels_name!r} has no objects: commit some objects first")
    loaded = None
    if model is None:
        from napari_sam.core.build import load_model

        relay.phase.emit("loading the built-in model…")
        model = loaded = load_model(device="cpu")
    tuned = copy.deepcopy(model).cpu()
    losses: list[float] = []
    gen = finetune_iter(tuned, images, labels, steps=steps, mode=mode, lr=lr)
    try:
        for rec in gen:
            if cancel.cancelled():
                break
            if rec["phase"] == "embedding":
                relay.phase.emit(f"embedding {rec['done']}/{rec['total']} image(s)…")
            else:
                losses.append(float(rec["loss"]))
                relay.step.emit(int(rec["step"]), int(rec["total"]), float(rec["loss"]))
    finally:
        gen.close()
    tuned.eval()
    return tuned, losses, not cancel.cancelled(), loaded


class FinetuneWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self._worker = self._saving = None
        self._cancel: CancelToken | None = None
        self._base = (None, "")  # the model being tuned (None: the built-in one, loaded by the worker) and its name
        self.losses: list[float] = []
        self.tuned = None
        self.result: str = ""
        self._relay = _Relay()
        self._relay.step.connect(self._on_step)
        self._relay.phase.connect(self._message)
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._renames = L.RenameFollower(self.viewer, (), self._refresh)  # renamed layers stay listed and chosen
        self._refresh()
        on_dock_closed(self, self.cancel)  # the close button: stop training, switch nothing in

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        from napari_sam.core.training.finetune import FINETUNE_DEFAULTS  # (torch: imported when the widget opens)

        self.image_combo, self.labels_combo = QComboBox(), QComboBox()
        self.steps = QSpinBox()
        self.steps.setRange(1, 100000)
        self.steps.setValue(FINETUNE_DEFAULTS.steps)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(FINETUNE_DEFAULTS.lr)
        self.mode = QComboBox()
        self.mode.addItems(["decoder", "full"])
        self.mode.setToolTip("decoder: frozen encoder, fast on a CPU; full: all weights (slow without a GPU)")
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("labels (committed objects)", self.labels_combo)
        form.addRow("steps", self.steps)
        form.addRow("learning rate", self.lr)
        form.addRow("mode", self.mode)
        self.run_btn, self.cancel_btn, self.save_btn = QPushButton("Fine-tune"), QPushButton("Cancel"), \
            QPushButton("Save model…")
        self.cancel_btn.setEnabled(False)
        self.save_btn.setEnabled(False)
        self.run_btn.clicked.connect(lambda: self.run())
        self.cancel_btn.clicked.connect(self.cancel)
        self.save_btn.clicked.connect(self._save_dialog)
        buttons = QHBoxLayout()
        for b in (self.run_btn, self.cancel_btn, self.save_btn):
            buttons.addWidget(b)
        self.progress = QProgressBar()
        self.curve = LossCurve()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.curve)
        lay.addWidget(self.status)

    def _refresh(self, *_) -> None:
        for combo, kind in ((self.image_combo, napari.layers.Image), (self.labels_combo, napari.layers.Labels)):
            L.refill(combo, [ly for ly in self.viewer.layers if isinstance(ly, kind) and ly.name != L.PREVIEW_NAME])

    def _message(self, text: str) -> None:
        self.status.setText(text)

    def _on_step(self, step: int, total: int, loss: float) -> None:
        self.losses.append(loss)
        self.progress.setMaximum(total)
        self.progress.setValue(step)
        self.curve.set_values(self.losses)
        self._message(f"step {step}/{total}, loss {loss:.4f}")

    # ------------------------------------------------------------------ actions
    def busy(self) -> bool:
        return self._worker is not None

    def run(self, steps: int | None = None) -> bool:
        """Start fine-tuning on the chosen layers; returns False (with a message) if it cannot start."""
        if self.busy():
            self._message("fine-tuning is already running")
            return False
        names = [ly.name for ly in self.viewer.layers]
        img_name, lab_name = self.image_combo.currentText(), self.labels_combo.currentText()
        if img_name not in names or lab_name not in names:
            self._message("choose an image layer and a Labels layer with committed objects first")
            return False
        image_layer, labels_layer = self.viewer.layers[img_name], self.viewer.layers[lab_name]
        image, labels = L.full_resolution(image_layer), L.full_resolution(labels_layer)  # the worker reads them
        if tuple(labels.shape) != L.image_shape(image_layer):
            self._message(f"labels {lab_name!r} have shape {tuple(labels.shape)} but image {img_name!r} has "
                          f"{L.image_shape(image_layer)}; choose a Labels layer of the image's shape")
            return False
        model = self.state.model  # None: the worker loads the built-in model
        self._base = (model, (self.state.model_name or "model") if model is not None else "builtin")
        if steps is not None:
            self.steps.setValue(steps)
        self.losses, self.tuned = [], None
        self.curve.set_values([])
        self._cancel = CancelToken()
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._message("starting…")
        self._worker = run_in_thread(run_finetune, model, image, labels, self.steps.value(), self.mode.currentText(),
                                     self.lr.value(), self._cancel, self._relay, lab_name, on_return=self._done,
                                     on_error=self._failed, on_finish=self._finished)
        return True

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    def _done(self, result) -> None:
        tuned, losses, finished, loaded = result
        base, base_name = self._base
        if loaded is not None and self.state.model is None:
            self.state.set_model(loaded, "builtin")
            base = loaded
        if not finished or self._cancel.cancelled():  # (also when the dock was closed: its close button cancels)
            self.result = "cancelled"
            self._message("cancelled: the model is unchanged")
            return
        self.tuned = tuned
        self.save_btn.setEnabled(self._saving is None)
        self.result = "done"
        done = f"done: loss {losses[0]:.4f} → {losses[-1]:.4f}"
        if self.state.model is not base:  # the user loaded another model meanwhile: it stays
            self._message(f"{done}; the viewer now uses {self.state.model_name or 'another model'!r}, so the tuned "
                          f"copy of {base_name!r} was not switched in: save it with Save model…")
            return
        name = f"{base_name}+finetuned"
        self.state.set_model(tuned, name)
        self._message(f"{done}; the viewer now uses {name!r}")

    def _failed(self, exc: BaseException) -> None:
        self.result = "failed"
        self._message(f"fine-tuning failed: {exc}")

    def _finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def save(self, path: str | Path) -> Path:
        """Save the tuned model as a checkpoint that ``napari_sam.load_model(path)`` reads (synchronous, for
        scripts; the Save button uses :meth:`save_in_thread`)."""
        if self.tuned is None:
            raise RuntimeError("nothing to save: fine-tune first")
        return self._save_job()(path)

    def _save_job(self):
        """The one spelling of the save: ``job(path) -> Path`` for the tuned model as it is now (fp16, with the
        number of fine-tuning steps), for :meth:`save` and the Save button's worker alike."""
        from functools import partial

        from napari_sam.core.build import save_checkpoint

        return partial(save_checkpoint, self.tuned, half=True, finetuned_steps=len(self.losses))

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save fine-tuned model", "finetuned.pt", "Checkpoint (*.pt)")
        if path:
            self.save_in_thread(path)

    def save_in_thread(self, path: str | Path):
        """Save the tuned model to ``path`` in a worker (a large model takes seconds); the status line says where it
        went or why it failed. Returns the worker (None if there is nothing to save)."""
        if self.tuned is None:
            self._message("nothing to save: fine-tune first")
            return None
        self.save_btn.setEnabled(False)
        self._save_path = path
        self._message(f"saving {path}…")
        self._saving = run_in_thread(self._save_job(), path, on_return=self._save_done, on_error=self._save_failed,
                                     on_finish=self._saved)
        return self._saving

    def _save_done(self, path: Path) -> None:
        self._message(f"saved {path}")

    def _save_failed(self, exc: BaseException) -> None:
        self._message(f"could not save {self._save_path}: {exc}")

    def _saved(self) -> None:
        self._saving = None
        self.save_btn.setEnabled(self.tuned is not None)
