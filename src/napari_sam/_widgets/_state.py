"""Per-viewer state shared by the napari-sam widgets: the current model, predictor and embedding cache.

One :class:`ViewerState` per viewer (no global singleton): ``get_state(viewer)``. The annotator,
segment-everything, propagation and fine-tuning widgets all read the model from here, so switching
the model in one place (e.g. after fine-tuning) switches it everywhere.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from ._workers import qt_alive

_STATES: "weakref.WeakKeyDictionary[Any, ViewerState]" = weakref.WeakKeyDictionary()


#: the most bytes the embeddings of one viewer keep in memory (features, and the image copy zoomed decoding reads)
EMBEDDING_CACHE_BYTES = 2 << 30


def _nbytes(value: Any) -> int:
    """Memory of a cached value: an ImageEmbedding's features and its zoom source's image copy (an 8192-px image
    keeps a 192 MB RGB copy), through tuples; 0 for anything else."""
    feats = getattr(value, "features", None)
    if feats is None and isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    n = 0
    if hasattr(feats, "element_size"):
        n += feats.numel() * feats.element_size()
    rgb = getattr(getattr(value, "source", None), "rgb", None)
    if isinstance(rgb, np.ndarray):
        n += rgb.nbytes
    return n


class EmbeddingLRU:
    """Bounded LRU of image embeddings keyed by e.g. (layer id, data hash, slice index, model key): at most
    ``max_items`` entries and ``max_bytes`` of them (:func:`_nbytes`; the newest entry is kept whatever its size)."""

    def __init__(self, max_items: int = 32, max_bytes: int = EMBEDDING_CACHE_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            self._sizes[key] = _nbytes(value)
            while len(self._d) > 1 and (len(self._d) > self.max_items or sum(self._sizes.values()) > self.max_bytes):
                old, _ = self._d.popitem(last=False)
                self._sizes.pop(old, None)

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._sizes.clear()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d


class ViewerState:
    """Model and caches of one viewer. ``model_changed`` callbacks receive the new model."""

    def __init__(self) -> None:
        self.model = None  # napari_sam.core.modeling.sam.Sam
        self.model_name: str = ""
        self.model_key: int = 0  # bumps on every model change; part of embedding cache keys
        self.denoise: float = 0.0  # Gaussian sigma (image pixels) the model smooths images with; see set_denoise
        self.embeddings = EmbeddingLRU()
        self.stacks = EmbeddingLRU(max_items=4)  # StackEmbeddings (disk cache) of the stacks being annotated
        self._callbacks: list[Callable[[Any], None]] = []
        self._denoise_callbacks: list[Callable[[Any], None]] = []

    def set_model(self, model, name: str = "") -> None:
        """Share ``model``. A model that carries its own denoising sigma (a checkpoint saved with one) sets the
        viewer's; otherwise the viewer's sigma is applied to it, so the choice survives a model switch."""
        from ..core.build import set_denoise
        from ..core.image import denoise_of

        old = self.denoise
        if model is not None:
            if denoise_of(model):
                self.denoise = denoise_of(model)
            elif self.denoise:
                set_denoise(model, self.denoise)
        self.model = model
        self.model_name = name or getattr(getattr(model, "config", None), "name", "")
        self.model_key += 1
        self.embeddings.clear()
        self.stacks.clear()
        for cb in list(self._callbacks):
            cb(model)
        if self.denoise != old:
            for cb in list(self._denoise_callbacks):
                cb(self.denoise)

    def set_denoise(self, sigma: float) -> None:
        """Smooth every image with a Gaussian of ``sigma`` image pixels before the encoder (0 = off). Embeddings
        computed with another sigma are dropped, and the widgets are told as for a model change."""
        from ..core.build import set_denoise
        from ..core.image import check_denoise

        sigma = check_denoise(sigma)
        if sigma == self.denoise:
            return
        self.denoise = sigma
        if self.model is not None:
            self.set_model(set_denoise(self.model, sigma), self.model_name)
        for cb in list(self._denoise_callbacks):
            cb(sigma)

    def on_model_changed(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def on_model_changed_while_alive(self, widget, fn: Callable[[Any, Any], None],
                                     denoise: bool = False) -> Callable[[Any], None]:
        """Call ``fn(widget, model)`` on model changes (``denoise``: ``fn(widget, sigma)`` on changes of the
        viewer's denoising sigma) while the Qt ``widget`` exists: the widget is held weakly,
        and the callback is disconnected when the widget is destroyed, or at the latest on the first model
        change after the widget is gone or deleted by Qt (Qt does not always deliver ``destroyed`` to Python once
        the wrapper is collected). Returns the registered callback."""
        ref = weakref.ref(widget)

        def callback(value) -> None:
            w = ref()
            if w is None or not qt_alive(w):
                self.disconnect(callback)
            else:
                fn(w, value)

        (self._denoise_callbacks if denoise else self._callbacks).append(callback)
        widget.destroyed.connect(lambda *_: self.disconnect(callback))
        return callback

    def disconnect(self, callback: Callable[[Any], None]) -> None:
        for lst in (self._callbacks, self._denoise_callbacks):
            if callback in lst:
                lst.remove(callback)


def get_state(viewer) -> ViewerState:
    """The :class:`ViewerState` of ``viewer``, created on first use.

    napari passes plugin widgets a proxy of the viewer; the proxy and the viewer share one state.
    """
    viewer = getattr(viewer, "__wrapped__", viewer)
    st = _STATES.get(viewer)
    if st is None:
        st = ViewerState()
        _STATES[viewer] = st
    return st
