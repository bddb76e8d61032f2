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

    def on_return(out):  # a callback closing over the input, as the widgets' closures do
        seen.append(float(out.mean()) == 2 * float(image.mean()))

    worker = run_in_thread(job, image, on_return=on_return, on_finish=lambda: seen.append("finished"))
    qtbot.waitUntil(lambda: "finished" in seen, timeout=20000)
    assert seen == [True, "finished"]
    del image, on_return, job
    gc.collect()
    assert arg_ref() is None and result_ref[0]() is None
    assert worker is not None  # the worker itself lives on (napari keeps it), empty
