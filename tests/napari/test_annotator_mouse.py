"""The annotator driven by real Qt input events, as a user drives it: mouse clicks on the canvas add prompt
points where the cursor is, the shortcut keys pressed on the canvas toggle polarity and commit. A real
DSB2018 image; a random-weight model (plumbing: the exact reference masks are compared, not quality)."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from qtpy.QtCore import QPoint, Qt  # noqa: E402

from annotator_helpers import annotator, model, wait_idle  # noqa: E402,F401  (fixtures)

from napari_sam.core import SamPredictor  # noqa: E402
from napari_sam.core.annotation import Prompts, predict  # noqa: E402

pytestmark = pytest.mark.gui


def _screen_pos(viewer, rc) -> QPoint:
    """Canvas widget pixel of image pixel (row, col): napari's vispy scene is (x, y) = (col, row)."""
    canvas = viewer.window._qt_viewer.canvas
    x, y = canvas.view.scene.transform.map([rc[1], rc[0], 0, 1])[:2]
    return QPoint(int(round(x)), int(round(y)))


def _click(qtbot, viewer, rc) -> None:
    native = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(native, Qt.LeftButton, pos=_screen_pos(viewer, rc))


def _key(qtbot, viewer, key, modifier=Qt.NoModifier) -> None:
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key, modifier)


def test_clicks_and_shortcut_keys_drive_the_annotator(annotator, qtbot, model, nuclei_sample):
    viewer, w = annotator
    img, _ = nuclei_sample
    viewer.reset_view()
    qtbot.wait(50)
    pts = w._ensure_layers()[0]
    assert pts.mode == "add" and viewer.layers.selection.active is pts

    _click(qtbot, viewer, (60, 140))  # a real left click on the canvas
    qtbot.waitUntil(lambda: len(pts.data) == 1, timeout=5000)
    wait_idle(qtbot, w)
    # the point sits under the cursor (one screen pixel is < 1 image pixel after reset_view on this window)
    np.testing.assert_allclose(pts.data[0], [60, 140], atol=1.0)
    assert bool(pts.features["positive"].iloc[0])
    p = SamPredictor(model)
    p.set_image(img)
    ref = predict(p, Prompts(pts.data.copy(), [1]))
    np.testing.assert_array_equal(w.result.masks, ref.masks)

    _key(qtbot, viewer, Qt.Key_N)  # N: negative mode
    qtbot.waitUntil(lambda: "NEGATIVE" in w.ui.polarity_label.text(), timeout=2000)
    _click(qtbot, viewer, (90, 170))
    qtbot.waitUntil(lambda: len(pts.data) == 2, timeout=5000)
    wait_idle(qtbot, w)
    assert list(pts.features["positive"]) == [True, False]
    np.testing.assert_allclose(pts.data[1], [90, 170], atol=1.0)
    shown = w.result.mask.copy()
    assert shown.any()

    _key(qtbot, viewer, Qt.Key_C, Qt.ShiftModifier)  # Shift-C: commit
    labels = viewer.layers["SAM labels"]
    qtbot.waitUntil(lambda: labels.data.any(), timeout=5000)
    np.testing.assert_array_equal(labels.data == 1, shown)
    assert len(pts.data) == 0  # prompts cleared after the commit
    labels.undo()
    assert not labels.data.any()
