"""The annotator's background chain: model loading -> embedding of the current plane -> prediction.

Each step runs in a thread worker (``_workers.run_in_thread``); the main thread only starts jobs and
applies results. A result is applied only if nothing changed meanwhile (``_version``); prompts added
while the embedding runs are picked up when it ends (queued, not lost). Each cached embedding keeps a checksum of
the pixels it is of (:func:`~napari_sam.core.annotation.plane_checksum`, taken before it is computed). A click does
not pay for it: the plane is checked against it when the embedding is served again (the first prediction from a
cached embedding after the plane, image or embedding changed) and when Commit is pressed, so an image edited in place
(no napari event) is embedded again and never committed from the old pixels' prediction.

Predictions travel to the main thread as a patch (:meth:`~napari_sam.core.annotation.Result.cropped`): the box
around the candidate masks, not (3, H, W) masks of the whole plane.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import replace

import numpy as np

from ..core import annotation as ann
from ..core.embedding_store import EmbeddingCacheWarning, StackChanged, StackEmbeddings
from . import _layers as L
from ._workers import CancelToken, run_in_thread


def _main_thread(fn):
    """Record the wall and CPU time each main-thread entry point takes (``widget.main_thread_stats``):
    the responsiveness test asserts that none of our code blocks the event loop for long."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(self, *args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            old = self.main_thread_stats.get(fn.__name__, (0.0, 0.0))
            self.main_thread_stats[fn.__name__] = (max(old[0], wall), max(old[1], cpu))

    return wrapper


class AnnotatorJobs:
    """Mixin of :class:`~napari_sam._widgets.annotator.AnnotatorWidget`: the worker chain."""

    def load_model(self):
        """Load the model chosen in the widget (in a worker); the result is shared by all widgets."""
        if self._model_worker is not None:
            return self._message("a model is already loading; wait for it to finish", "warning")
        choice = self.ui.model_combo.currentText()
        name = self.ui.checkpoint_edit.text().strip() if choice == "checkpoint file" else choice
        if not name:
            return self._message("choose a checkpoint file (the '…' button) or another model", "warning")
        device = self.ui.device_combo.currentText()
        from ..core.build import load_model

        self._start_progress(f"loading {name}")
        self._model_worker = run_in_thread(
            load_model, name, device=None if device == "auto" else device, progress=self._relay.report,
            on_return=self._weak(lambda w, m: w._model_loaded(m, name)),
            on_error=self._weak(lambda w, e: w._model_failed(e, name)), on_finish=self._weak(type(self)._model_done))
        return self._model_worker

    def _cancel_embedding(self, restart: bool, quiet: bool = False) -> None:
        if self._embed_worker is not None:
            self._embed_restart, self._embed_quiet = restart, quiet
            self._embed_token.cancel()

    # ------------------------------------------------------------------ the update chain
    @_main_thread
    def _update(self) -> None:
        """Model -> embedding of the current plane -> prediction, each step in a worker when needed."""
        image = self.image_layer
        if self._closed:
            return  # the dock was closed
        if image is None or self.points_layer is None:
            return self._set_result(None)
        if self.state.model is None:
            if self._model_worker is None:
                self.load_model()
            return
        dims = self.viewer.dims
        if dims.ndisplay != 2 or tuple(dims.displayed) != (dims.ndim - 2, dims.ndim - 1):
            return self._message("the annotator works on 2D views of the last two axes: switch to 2D "
                                 "(Ctrl+Y) and keep the default axis order", "warning")
        index = L.plane_index(self.viewer, image)
        prompts, outside = L.read_prompts(self.points_layer, self.boxes_layer, image, index)
        if outside:
            self._message(f"{outside} point(s) outside the image were ignored", "warning")
        if prompts.empty:
            return self._set_result(None)
        key = (id(image), (id(image.data), self._data_gen), index, self.state.model_key)
        cached = self.state.embeddings.get(key)  # (embedding, plane_checksum of its pixels or None)
        if cached is None:
            return self._start_embedding(image, index, key)
        emb, check = cached
        verify = check is not None and key != self._checked_key  # served again: are they still its pixels?
        if self._predict_worker is not None:
            self._pending = True  # re-run when the running prediction ends (stale results are dropped)
            return
        self._pending = False
        r = self.result
        mask_input = mask_window = previous = None
        if (r is not None and not r.batch and not self.ui.batch_check.isChecked() and r.prompts is not None
                and self._result_plane == index and self._result_gen == self._data_gen
                and prompts.extends(r.prompts)):
            previous = replace(r)  # (a copy: cycling the candidates changes r.choice meanwhile)
            if self.ui.refine_check.isChecked():
                mask_input, mask_window = r.logits[r.choice], r.window
        version, batch, model = self._version, self.ui.batch_check.isChecked(), self.state.model
        enforce, follow, zoom = (self.ui.enforce_check.isChecked(), self.ui.follow_check.isChecked(),
                                 self.ui.zoom_check.isChecked())
        data = L.full_resolution(image)

        def job():
            from ..core.predictor import SamPredictor

            if verify and ann.plane_checksum(data[index]) != check:
                return None  # the plane was edited in place since it was embedded
            p = SamPredictor(model)
            p.set_embedding(emb)
            p.zoom = zoom
            res = ann.predict(p, prompts, mask_input, batch, enforce_negatives=enforce, mask_window=mask_window,
                              follow_positives=follow, previous=previous).cropped()
            return res, res.preview_patch()

        self._predict_worker = run_in_thread(
            job, on_return=self._weak(lambda w, out: w._predicted(out, version, index, key, check, verify)),
            on_error=self._weak(lambda w, e: w._message(f"prediction failed: {e}", "error")),
            on_finish=self._weak(type(self)._predict_done))

    def _start_embedding(self, image, index, key) -> None:
        if self._embed_worker is not None:
            if self._embed_key == key:
                if self._embed_token.cancelled():  # cancelled (Cancel, then a click): embed again when it ends
                    self._embed_restart = self._embed_quiet = True
                return  # clicks made meanwhile are queued: _update runs again when it ends
            self._cancel_embedding(restart=True)
            return  # the old run ends soon (cancelled); _embed_done restarts the chain
        data = L.full_resolution(image)
        model, model_key = self.state.model, self.state.model_key
        self._embed_key, self._embed_token = key, CancelToken()
        self._embed_ok = self._embed_restart = self._embed_quiet = False
        token, report = self._embed_token, self._relay.report
        self._start_progress("embedding image" + (f" plane {index}" if index else ""))

        stacks, stack_key = self.state.stacks, (id(image), (id(image.data), self._data_gen), index[:-1], model_key)
        hashed = isinstance(data, np.ndarray)  # in-memory data can be edited in place: keep a checksum of its pixels

        def open_stack():
            stack = StackEmbeddings(data[tuple(index[:-1])], model,  # (Z, Y, X[, C]) around the plane
                                    cancelled=token.cancelled)
            stacks.put(stack_key, stack)
            return stack

        def job():
            from ..core.predictor import SamPredictor

            # the checksum is taken first: an edit while the embedding runs is caught later (commit, or served again)
            check = ann.plane_checksum(data[index]) if hashed else None
            if not index:  # a 2D image: memory only
                emb = ann.compute_embedding(SamPredictor(model), np.asarray(data), report, token.cancelled)
                return emb, check, []
            # a plane of a stack: through the on-disk embedding cache, so reopening the data is instant
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", EmbeddingCacheWarning)
                stack = stacks.get(stack_key)
                stack = open_stack() if stack is None else stack
                try:
                    emb = ann.stack_plane_embedding(stack, index[-1], report, token.cancelled)
                except StackChanged:  # edited in place since it was hashed: hash it again (a new cache key)
                    stack = open_stack()
                    emb = ann.stack_plane_embedding(stack, index[-1], report, token.cancelled)
            notes = [str(c.message) for c in caught if issubclass(c.category, EmbeddingCacheWarning)]
            return emb, check, notes

        def done(w, out):
            emb, check, notes = out
            w._embed_ok = True
            for note in notes:
                w._message(note, "warning")
            if model_key == w.state.model_key:
                w.state.embeddings.put(key, (emb, check))
                w._checked_key = key  # just computed from these pixels: its first click need not check them

        def failed(w, exc):
            w._embed_ok = False
            if not isinstance(exc, ann.EmbeddingCancelled):
                w._message(f"cannot embed image {image.name!r}: {exc}", "error")
            elif not (w._embed_restart or w._embed_quiet):
                w._message("embedding cancelled; change a prompt to start it again")

        self._embed_worker = run_in_thread(job, on_return=self._weak(done), on_error=self._weak(failed),
                                           on_finish=self._weak(type(self)._embed_done))

    @_main_thread
    def _embed_done(self) -> None:
        self._stop_progress()
        self._embed_worker = None
        if self._embed_ok or self._embed_restart:
            self._timer.start()  # predict with every prompt added meanwhile, or embed the new plane / model

    @_main_thread
    def _predicted(self, out, version: int, index: tuple, key, check, verified: bool) -> None:
        if self._closed:
            return  # the dock was closed
        if out is None:  # the plane's pixels are not those it was embedded from: embed it again
            self._forget_embedding(key)
            self._message("the image changed since it was embedded (edited in place); embedding it again")
            return self._changed()
        if verified:
            self._checked_key = key
        res, preview = out
        if version != self._version:
            return  # stale: prompts changed while it ran
        self._set_result(res, preview, index, (key, check))

    def _forget_embedding(self, key) -> None:
        """The embedding cached under ``key`` is of pixels the plane no longer holds (edited in place)."""
        self.state.embeddings.put(key, None)
        if self._checked_key == key:
            self._checked_key = None

    @_main_thread
    def _predict_done(self) -> None:
        self._predict_worker = None
        if self._pending:
            self._pending = False
            self._timer.start()

    @_main_thread
    def _model_loaded(self, model, name: str) -> None:
        self.state.set_model(model, name)
        self._message(f"model {name!r} loaded on {model.device}")

    def _model_failed(self, exc, name: str) -> None:
        self._message(f"could not load model {name!r}: {exc}", "error")

    def _model_done(self) -> None:
        self._stop_progress()
        self._model_worker = None

    def _start_progress(self, text: str) -> None:
        self.ui.progress.setValue(0)
        self.ui.progress.setFormat(text + " %p%")
        self.ui.cancel_button.setEnabled(True)

    def _stop_progress(self) -> None:
        self.ui.progress.setValue(0)
        self.ui.progress.setFormat("idle")
        self.ui.cancel_button.setEnabled(False)

    @_main_thread
    def _on_progress(self, done: int, total: int) -> None:
        self.ui.progress.setValue(int(100 * done / max(total, 1)))

