"""``import napari_sam`` and ``napari_sam.core`` (and using the engine) pull in no GUI module."""

from __future__ import annotations

import subprocess
import sys

GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def test_core_imports_no_gui_modules():
    code = f"""
import sys
import napari_sam
import napari_sam.core
from napari_sam.core import *  # noqa
from napari_sam import load_model, available_models, SamPredictor  # the lazy public API
import napari_sam.core.modeling.fast_decoder, napari_sam.core.transforms, napari_sam.core.checkpoints
assert callable(load_model) and "vit_b" in available_models() and SamPredictor.__name__ == "SamPredictor"
bad = sorted(m for m in sys.modules if m.split(".")[0] in {GUI!r})
print("GUI:" + ",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "GUI:", out.stdout
