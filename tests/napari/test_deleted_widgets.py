"""Work that ends after Qt deleted a widget (its dock was closed while an embedding, a segmentation or a model
change was under way) must not touch it: the callback is skipped, instead of a RuntimeError in the event loop.
Qt deletes the C++ side while the Python wrapper can live on (held by a script, a test or a pending callback)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.gui


def test_qt_alive_tells_deleted_widgets(qtbot):
    from qtpy import sip
    from qtpy.QtWidgets import QWidget

    from napari_sam._widgets._workers import qt_alive

    w = QWidget()
    assert qt_alive(w) and qt_alive(object())  # anything that is not a Qt object counts as alive
    sip.delete(w)
    assert not qt_alive(w)
    with pytest.raises(RuntimeError):
        w.objectName()


def test_worker_result_for_a_deleted_widget_is_dropped(qtbot):
    """``run_in_thread``: a widget method given as a callback is skipped once Qt has deleted the widget."""
    from qtpy import sip
    from qtpy.QtWidgets import QWidget

    from napari_sam._widgets._workers import process_events_until, run_in_thread

    calls = []

    class Dock(QWidget):
        def done(self, result):
            calls.append(result)
            self.setWindowTitle(str(result))  # raises RuntimeError on a deleted widget

        def finished(self):
            calls.append("finished")
            self.setWindowTitle("finished")

    release, ended = threading.Event(), threading.Event()
    alive, dead = Dock(), Dock()
    run_in_thread(lambda: 1, on_return=alive.done, on_finish=alive.finished)
    assert process_events_until(lambda: "finished" in calls, 10)
    assert calls == [1, "finished"] and alive.windowTitle() == "finished"

    calls.clear()
    worker = run_in_thread(release.wait, on_return=dead.done, on_finish=dead.finished)
    worker.finished.connect(ended.set)
    sip.delete(dead)  # the dock is closed while the work runs
    release.set()
    assert process_events_until(ended.is_set, 10)
    qtbot.wait(50)
    assert calls == []


def test_model_change_callback_of_a_deleted_widget_disconnects(qtbot, tiny_model):
    """``ViewerState.on_model_changed_while_alive``: when Qt's ``destroyed`` never reaches Python, the first
    model change after the widget's deletion disconnects the callback without calling it."""
    from qtpy import sip
    from qtpy.QtWidgets import QWidget

    from napari_sam._widgets._state import ViewerState

    state = ViewerState()
    seen = []

    def show(widget, model):
        seen.append(model)
        widget.setWindowTitle("model changed")  # raises RuntimeError on a deleted widget

    w = QWidget()
    callback = state.on_model_changed_while_alive(w, show)
    state.set_model(tiny_model, "a")
    assert seen == [tiny_model] and callback in state._callbacks
    w.destroyed.disconnect()  # as when Qt does not deliver ``destroyed`` to Python
    sip.delete(w)
    assert callback in state._callbacks
    state.set_model(tiny_model, "b")
    assert seen == [tiny_model] and callback not in state._callbacks
