"""Qt controls of the annotator dock widget (layout only; behaviour lives in annotator.py)."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

MODEL_CHOICES = ["builtin", "vit_t", "vit_b", "vit_l", "vit_h", "checkpoint file"]
NEW_LAYER = "new layer"

# key -> (action, description). Keys unused by napari's default shortcuts (napari/utils/shortcuts.py).
SHORTCUTS = {
    "N": ("toggle_polarity", "toggle positive / negative points"),
    "Shift-M": ("cycle_candidate", "next candidate mask (ambiguous prompt)"),
    "Shift-C": ("commit", "commit the preview into the labels layer"),
    "Shift-X": ("clear_prompts", "clear the prompts of this plane"),
}


def shortcuts_text() -> str:
    return "\n".join(f"{k:<8} {d}" for k, (_, d) in SHORTCUTS.items())


def denoise_spin_box() -> QDoubleSpinBox:
    """The "denoise σ" control: Gaussian sigma in image pixels applied before the encoder (0 = off)."""
    from ..core.image import MAX_DENOISE

    box = QDoubleSpinBox()
    box.setRange(0.0, MAX_DENOISE)
    box.setSingleStep(0.5)
    box.setDecimals(1)
    box.setSuffix(" px")
    box.setSpecialValueText("off")
    box.setToolTip("Smooth each image (or slice) with a Gaussian of this sigma before the model sees it. For noisy "
                   "data such as confocal stacks try 1-3 px. Shared by all napari-sam widgets of this viewer.")
    return box


def bind_denoise(widget, box: QDoubleSpinBox, state) -> None:
    """Keep ``box`` and the viewer's denoising sigma (``state``: its ViewerState) in step, both ways."""

    def show(w, sigma: float) -> None:
        if box.value() != sigma:
            box.blockSignals(True)
            box.setValue(sigma)
            box.blockSignals(False)

    show(widget, state.denoise)
    box.valueChanged.connect(state.set_denoise)
    state.on_model_changed_while_alive(widget, show, denoise=True)


class AnnotatorUI:
    """All sub-widgets as attributes, so tests and scripts can set them directly."""

    def __init__(self, parent: QWidget) -> None:
        lay = QVBoxLayout(parent)
        setup = QGroupBox("Image and model")
        form = QFormLayout(setup)
        self.image_combo = QComboBox()
        form.addRow("image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.addItems(MODEL_CHOICES)
        form.addRow("model", self.model_combo)
        row = QHBoxLayout()
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path to a .pt / .pth checkpoint")
        self.browse_button = QPushButton("…")
        row.addWidget(self.checkpoint_edit)
        row.addWidget(self.browse_button)
        form.addRow("file", row)
        self.device_combo = QComboBox()
        form.addRow("device", self.device_combo)
        self.denoise_spin = denoise_spin_box()
        form.addRow("denoise σ", self.denoise_spin)
        self.load_button = QPushButton("Load model")
        self.model_label = QLabel("model: none loaded")
        self.model_label.setWordWrap(True)
        form.addRow(self.load_button, self.model_label)
        lay.addWidget(setup)

        prog = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        prog.addWidget(self.progress)
        prog.addWidget(self.cancel_button)
        lay.addLayout(prog)

        out = QGroupBox("Prompts and labels")
        f2 = QFormLayout(out)
        self.labels_combo = QComboBox()
        f2.addRow("target labels", self.labels_combo)
        self.overwrite_check = QCheckBox("overwrite existing objects")
        self.batch_check = QCheckBox("batch: each box / positive point is an object")
        self.refine_check = QCheckBox("refine with the previous mask")
        self.refine_check.setToolTip("Decode each new click with the previous mask's logits as mask input (the "
                                     "paper's protocol). Each model sets its default: on for official "
                                     "checkpoints, off for the built-in model, whose clicks refine better without")
        self.refine_check.setChecked(True)
        self.enforce_check = QCheckBox("negative points always cut the mask")
        self.enforce_check.setToolTip("Where the model ignores a negative point inside the mask, take out what it "
                                      "marks: a neighbour the mask took in, or the rim beyond a point at the edge")
        self.enforce_check.setChecked(True)
        self.follow_check = QCheckBox("positive points: retry with a box when left out")
        self.follow_check.setToolTip("Where the mask leaves out one of your positive points, decode it once more with "
                                     "a box around the mask, the previous mask and the positive points")
        self.follow_check.setChecked(True)
        self.zoom_check = QCheckBox("zoom in on small objects")
        self.zoom_check.setToolTip("On images larger than the model's zoom window (256 px for the built-in model), "
                                   "decode a small object from the window around it, encoded at the scale the model "
                                   "was trained on (one more encoder pass per new region). Objects larger than half "
                                   "a window always use the whole image.")
        self.zoom_check.setChecked(True)
        for w in (self.overwrite_check, self.batch_check, self.refine_check, self.enforce_check, self.follow_check,
                  self.zoom_check):
            f2.addRow(w)
        self.polarity_label = QLabel()
        self.candidate_label = QLabel("candidate: –")
        f2.addRow(self.polarity_label)
        f2.addRow(self.candidate_label)
        lay.addWidget(out)

        btns = QHBoxLayout()
        self.polarity_button = QPushButton("+/- (N)")
        self.cycle_button = QPushButton("Next mask (Shift-M)")
        self.commit_button = QPushButton("Commit (Shift-C)")
        self.clear_button = QPushButton("Clear (Shift-X)")
        for b in (self.polarity_button, self.cycle_button, self.commit_button, self.clear_button):
            btns.addWidget(b)
        lay.addLayout(btns)

        self.status_label = QLabel("Choose an image, then click on an object in the 'SAM points' layer.")
        self.status_label.setWordWrap(True)
        lay.addWidget(self.status_label)
        keys = QLabel("Shortcuts:\n" + shortcuts_text())
        keys.setStyleSheet("font-family: monospace")
        lay.addWidget(keys)
        lay.addStretch(1)
