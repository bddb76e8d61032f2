"""Background jobs: a finished job holds none of its data. napari keeps every worker it made until the viewer
closes; before, each kept its function, arguments and callbacks, so every click of the annotator on an 8192-px
image kept its (3, H, W) masks (+2 GB over 20 clicks)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

napari = pytest.importorskip("napari")

pytestmark = pytest.mark.gui


def test_a_finished_job_keeps_no_reference_to_its_data(make_napari_viewer, qtbot, nuclei_sample):
    from napari_sam._widgets._workers import run_in_thread

    make_napari_viewer()
    image = np.array(nuclei_sample[0])  # real pixels, a private copy
    arg_ref, result_ref, seen = weakref.ref(image), [], []

    def job(img):
        out = img.astype(np.float32) * 2  # a result as large as the input
        result_ref.append(weakref.ref(out))
        return out

    def callback_holding(payload):  # a callback closing over an array, as the widgets' closures do
        return lambda out: seen.append(payload.shape == out.shape)

    payload = np.array(nuclei_sample[0])
    payload_ref, on_return = weakref.ref(payload), callback_holding(payload)
    worker = run_in_thread(job, image, on_return=on_return, on_finish=lambda: seen.append("finished"))
    qtbot.waitUntil(lambda: "finished" in seen, timeout=20000)
    assert seen == [True, "finished"]
    del image, payload, on_return, job
    gc.collect()
    assert arg_ref() is None and result_ref[0]() is None and payload_ref() is None
    assert worker is not None  # the worker itself lives on (napari keeps it), empty


def test_the_embedding_cache_is_bounded_in_bytes(nuclei_sample):
    """Each cached embedding of a large image keeps the image copy zoomed decoding reads (192 MB at 8192 px), so
    the viewer's cache is bounded in bytes too, not only in entries; the newest entry always stays."""
    import torch

    from napari_sam._widgets._state import EmbeddingLRU
    from napari_sam.core.predictor import ImageEmbedding
    from napari_sam.core.zoom import ZoomSource

    gray = nuclei_sample[0] if nuclei_sample[0].ndim == 2 else nuclei_sample[0][..., 0]
    rgb = np.ascontiguousarray(np.repeat(np.tile(gray, (4, 4))[..., None], 3, -1))  # 1024 px of real pixels

    def emb():
        return ImageEmbedding(torch.zeros(1, 128, 32, 32), rgb.shape[:2], (512, 512), ZoomSource(rgb.copy(), 256))

    one = rgb.nbytes + 128 * 32 * 32 * 4
    cache = EmbeddingLRU(max_items=32, max_bytes=3 * one)
    for k in range(5):
        cache.put(k, (emb(), b"digest"))
    assert len(cache) == 3 and cache.nbytes == 3 * one and 0 not in cache and 4 in cache
    cache.put("huge", (ImageEmbedding(torch.zeros(1, 128, 32, 32), (8, 8), (512, 512),
                                      ZoomSource(np.zeros((4096, 1024, 3), np.uint8), 256)), None))
    assert len(cache) == 1 and "huge" in cache  # the newest entry stays, whatever its size
    cache.put(5, None)  # an invalidated entry costs nothing
    assert len(cache) == 1 and cache.nbytes == 0
