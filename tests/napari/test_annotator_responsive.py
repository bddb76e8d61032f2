"""The viewer never freezes: a 10 ms QTimer heartbeat measures the longest time the Qt event loop was
blocked while points are added, the image is embedded, masks are predicted and an object is committed.
Clicks made during the embedding are queued, not lost. A screenshot of the whole window is non-blank."""

from __future__ import annotations

import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import annotator, model, wait_idle  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.gui
MAX_BLOCK_S = 0.100


class Heartbeat:
    """Records the largest gap between ticks of a 10 ms QTimer (= the longest event-loop block)."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.max_gap = 0.0
        self.ticks = 0

    def _tick(self):
        now = time.perf_counter()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.ticks += 1

    def __enter__(self):
        self.last = time.perf_counter()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()
        self._tick()


def test_event_loop_never_blocked_and_clicks_queued(annotator, qtbot, tmp_path):
    viewer, w = annotator
    qtbot.wait(200)  # let the first frames draw before measuring
    with Heartbeat() as hb:
        w.add_point((60, 140))
        qtbot.waitUntil(lambda: w._embed_worker is not None, timeout=5000)  # the embedding runs ...
        w.add_point((200, 60))  # ... while the user keeps clicking
        w.toggle_polarity()
        w.add_point((90, 170))
        assert w._embed_worker is not None and w.result is None
        wait_idle(qtbot, w)
        n_prompts = len(w.result.prompts.points)
        w.commit()
        qtbot.wait(100)
    print(f"event loop: longest block {1000 * hb.max_gap:.1f} ms over {hb.ticks} ticks")
    assert n_prompts == 3  # all clicks made during the embedding reached the prediction
    assert hb.ticks > 20
    assert hb.max_gap < MAX_BLOCK_S, f"Qt event loop blocked for {1000 * hb.max_gap:.0f} ms"
    assert viewer.layers["SAM labels"].data.max() == 1


def test_window_screenshot_is_not_blank(annotator, qtbot, tmp_path):
    import imageio.v3 as iio

    viewer, w = annotator
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    path = tmp_path / "annotator.png"
    iio.imwrite(path, shot)
    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 20 and len(np.unique(rgb, axis=0)) > 200  # image, overlay, docks: not one flat colour
    # the dock widget is in the picture: its width is part of the window, beyond the canvas
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert img.shape[1] > canvas.shape[1]
