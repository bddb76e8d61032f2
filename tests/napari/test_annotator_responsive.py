"""The viewer never freezes. While points are added, the image is embedded, masks are predicted and an
object is committed: every main-thread entry point of the widget (they record their own CPU time) stays
under 100 ms, and a 10 ms QTimer heartbeat shows that nothing heavy (embedding, prediction) ran in the
main thread. CPU time, not wall time: this machine is shared (wall-clock gaps are printed).
Clicks made during the embedding are queued, not lost. A screenshot of the whole window is non-blank."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import annotator, model, wait_idle  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.gui
MAX_BLOCK_S = 0.100


class Heartbeat:
    """A 10 ms QTimer in the main thread. ``max_cpu``: the most main-thread CPU time spent between two
    ticks (work that blocked the event loop); ``max_gap``: the largest wall-clock gap, which also counts
    time the OS gave to other processes (on a shared, overloaded machine that dominates)."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.max_gap = self.max_cpu = 0.0
        self.ticks = 0

    def _tick(self):
        now, cpu = time.perf_counter(), time.thread_time()
        self.max_gap = max(self.max_gap, now - self.last)
        self.max_cpu = max(self.max_cpu, cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu
        self.ticks += 1

    def __enter__(self):
        self.last, self.last_cpu = time.perf_counter(), time.thread_time()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()
        self._tick()


def test_event_loop_never_blocked_and_clicks_queued(annotator, qtbot, tmp_path):
    viewer, w = annotator
    w.add_point((10, 10))  # warm-up: napari draws the first point (shader set-up), then we start afresh
    wait_idle(qtbot, w)
    w.clear_prompts()
    w.state.embeddings.clear()
    qtbot.wait(100)
    with Heartbeat() as hb:
        w.add_point((60, 140))
        qtbot.waitUntil(lambda: w._embed_worker is not None, timeout=5000)  # the embedding runs ...
        for action in (lambda: w.add_point((200, 60)), w.toggle_polarity, lambda: w.add_point((90, 170))):
            qtbot.wait(30)  # separate user events (each returns to the event loop) ...
            action()  # ... made while the embedding runs
        assert w._embed_worker is not None and w.result is None
        wait_idle(qtbot, w)
        n_prompts = len(w.result.prompts.points)
        w.commit()
        qtbot.wait(100)
    ours = max(w.main_thread_stats.items(), key=lambda kv: kv[1][1])
    print(f"event loop: our slowest main-thread call {ours[0]} {1000 * ours[1][1]:.1f} ms CPU "
          f"({1000 * ours[1][0]:.1f} ms wall); longest block between heartbeats {1000 * hb.max_cpu:.1f} ms CPU, "
          f"{1000 * hb.max_gap:.1f} ms wall, {hb.ticks} ticks (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    assert n_prompts == 3  # all clicks made during the embedding reached the prediction
    assert {"add_point", "_update", "_predicted", "commit"} <= set(w.main_thread_stats)
    assert ours[1][1] < MAX_BLOCK_S, f"{ours[0]} blocked the Qt event loop for {1000 * ours[1][1]:.0f} ms"
    # guard: nothing heavy (embedding ~1 s CPU, prediction) ran in the main thread, napari's redraws included
    assert hb.max_cpu < 2.5 * MAX_BLOCK_S, f"Qt event loop blocked for {1000 * hb.max_cpu:.0f} ms"
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
