"""The npe2 manifest: it validates with imports, every python_name imports, and the sample data
(bundled with scikit-image, no download) opens in a viewer."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

MANIFEST = Path(importlib.import_module("napari_sam").__file__).parent / "napari.yaml"


def _commands():
    return yaml.safe_load(MANIFEST.read_text())["contributions"]["commands"]


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: c["id"])
def test_every_python_name_imports(cmd):
    module, _, attr = cmd["python_name"].partition(":")
    obj = getattr(importlib.import_module(module), attr)
    assert callable(obj)


@pytest.mark.slow
def test_npe2_validate_with_imports():
    exe = shutil.which("npe2", path=str(Path(sys.executable).parent)) or shutil.which("npe2")
    if exe is None:
        pytest.skip("npe2 command not installed")
    proc = subprocess.run([exe, "validate", "--imports", "napari-sam"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_widgets_and_samples_are_declared():
    c = yaml.safe_load(MANIFEST.read_text())["contributions"]
    assert {w["display_name"] for w in c["widgets"]} >= {"SAM annotator", "Segment everything", "3D propagation",
                                                         "Fine-tune"}
    assert {s["key"] for s in c["sample_data"]} == {"ihc", "hematoxylin", "cell"}


@pytest.mark.gui
def test_sample_data_opens_offline(make_napari_viewer):
    viewer = make_napari_viewer()
    for key in ("ihc", "hematoxylin", "cell"):
        viewer.open_sample("napari-sam", key)
    ihc, hema, cell = viewer.layers
    assert ihc.rgb and ihc.data.shape == (512, 512, 3) and ihc.data.dtype == np.uint8
    assert hema.data.dtype == np.float32 and hema.data.shape == (512, 512)
    assert 0 <= hema.data.min() < hema.data.max() <= 1
    assert cell.data.shape == (660, 550) and cell.data.std() > 5  # a real micrograph, not a blank array
