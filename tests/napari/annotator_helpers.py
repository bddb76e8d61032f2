"""Helpers and fixtures for the annotator widget tests (imported by the test modules; not a conftest so
that ``from conftest import ...`` elsewhere keeps meaning tests/conftest.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_API", "pyqt5")


@pytest.fixture(scope="session")
def model():
    """A random-weight nsam_t whose outputs react clearly to the prompts (std 0.2): plumbing only."""
    from conftest import randomize_

    from napari_sam.core import build_sam, get_config

    return randomize_(build_sam(get_config("nsam_t")), seed=1, std=0.2).eval()


@pytest.fixture
def annotator(make_napari_viewer, qtbot, model, nuclei_sample):
    """(viewer, widget): the SAM annotator opened by plugin name on a real DSB2018 image, with a
    random-weight model injected (plumbing only)."""
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model, "random nsam_t")
    img, _ = nuclei_sample
    viewer.add_image(img, name="nuclei")
    dw, widget = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    qtbot.waitUntil(dw.isVisible, timeout=5000)
    widget.set_image_layer("nuclei")
    return viewer, widget


def wait_idle(qtbot, widget, timeout: int = 60000) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of ``mask`` farthest from its border, (row, col)."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(r), int(c)
