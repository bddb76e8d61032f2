"""Background work for the widgets: the only module that imports ``napari.qt.threading``.

:func:`run_in_thread` runs a function in a napari thread worker. The function never raises into napari
(which would show a traceback dialog): exceptions are caught in the thread and handed to ``on_error`` as
an ``Exception`` in the main thread, where the widget shows a clear message. Progress reported from the
thread (``ProgressRelay.report(done, total)``) arrives in the main thread through a queued Qt signal.
A callback that is a method of a widget Qt has deleted (the dock was closed while the work ran) is skipped
(:func:`qt_alive`).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import QApplication


# torch warns once that PIL's read-only resize output is wrapped without a copy; harmless here, and
# napari would otherwise show it as a viewer notification.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ProgressRelay(QObject):
    """Carries ``(done, total)`` from a worker thread to the main thread (Qt queued connection)."""

    progressed = Signal(int, int)

    def report(self, done: int, total: int) -> None:
        self.progressed.emit(int(done), int(total))


def qt_alive(obj: Any) -> bool:
    """Whether the C++ side of the Qt object ``obj`` still exists (True for anything else).

    Qt deletes a closed dock's widgets while their Python wrappers can live on (held by a script, a test or a
    pending callback); touching such a widget raises RuntimeError.
    """
    if not isinstance(obj, QObject):
        return True
    try:
        obj.objectName()
    except RuntimeError:
        return False
    return True


def _skip_if_deleted(callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``callback``, doing nothing once the Qt object it is a method of has been deleted."""
    if callback is None:
        return None
    owner = getattr(callback, "__self__", None)

    def call(*args: Any) -> Any:
        if qt_alive(owner):
            return callback(*args)
        return None

    return call


class _DockClosed(QObject):
    def __init__(self, widget: QObject, callback: Callable[[], None]) -> None:
        super().__init__(widget)
        self._callback = callback
        self._docked = widget.parent() is not None
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.ParentChange:
            if obj.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._callback()
        return False


def on_dock_closed(widget: QObject, callback: Callable[[], None]) -> QObject:
    """Call ``callback()`` when ``widget`` leaves its dock. napari's close button (``remove_dock_widget``) only
    takes the widget out of its dock (``setParent(None)``) and does not delete it, so without this its workers
    would finish and write into layers after the panel is gone. Returns the watcher (owned by ``widget``)."""
    return _DockClosed(widget, callback)


class CancelToken:
    """A thread-safe flag polled by long computations (``token.cancelled()``)."""

    def __init__(self) -> None:
        self._ev = threading.Event()

    def cancel(self) -> None:
        self._ev.set()

    def cancelled(self) -> bool:
        return self._ev.is_set()


def run_in_thread(
    func: Callable[..., Any],
    *args: Any,
    on_return: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    **kwargs: Any,
):
    """Start ``func(*args, **kwargs)`` in a napari thread worker and return the worker.

    ``on_return(result)`` or ``on_error(exception)`` runs in the main thread, then ``on_finish()``; callbacks
    that are methods of a widget Qt has since deleted are skipped.
    """
    # napari keeps every worker it made (the window's task list) until the viewer closes: the job and its callbacks
    # live in this dict, emptied as the job ends, so a finished job holds none of its arrays (images, masks, plans)
    held: dict[str, Any] = dict(zip(("func", "args", "kwargs"), (func, args, kwargs)))
    held.update(zip(("return", "error", "finish"), map(_skip_if_deleted, (on_return, on_error, on_finish))))

    def guarded():
        f, a, kw = held.pop("func"), held.pop("args"), held.pop("kwargs")
        try:
            return f(*a, **kw)
        except BaseException as exc:  # noqa: BLE001 - everything is reported as a message, never re-raised
            return _Failed(exc)
        finally:
            del f, a, kw

    def returned(result):
        if isinstance(result, _Failed):
            callback, result = held.get("error"), result.exc
        else:
            callback = held.get("return")
        held.pop("return", None), held.pop("error", None)
        if callback is not None:
            callback(result)

    def finished():
        callback = held.pop("finish", None)
        held.clear()
        if callback is not None:
            callback()

    worker = create_worker(guarded, _start_thread=False, _connect={"returned": returned, "finished": finished})
    worker.start()
    return worker


def process_events_until(done: Callable[[], bool], timeout: float) -> bool:
    """Process Qt events until ``done()`` is true or ``timeout`` seconds pass (for scripts and tests).

    Returns ``done()`` at the end, i.e. False on timeout.
    """
    end = time.monotonic() + timeout
    while not done() and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.005)
    return done()
