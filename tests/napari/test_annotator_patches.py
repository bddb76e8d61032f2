"""The annotator keeps predictions as patches (the box around the candidate masks) from the worker to the preview and
the commit, so that a small object of a large image costs little memory and redraw. What the user sees and commits is
exactly what the full-size path gives: checked with the built-in model on a real DSB2018 image, for a click decoded
zoomed, a refining click, a box large enough to be decoded from the whole image, and a batch."""

from __future__ import annotations

import csv

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import interior_point, wait_idle  # noqa: E402

from conftest import data_dir, read_image  # noqa: E402
from napari_sam.core import SamPredictor  # noqa: E402
from napari_sam.core import annotation as ann  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def builtin():
    from napari_sam.core.build import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module")
def large_sample():
    """A 520 x 696 fluorescence image of dsb2018_full (larger than the built-in model's 256-px zoom window)."""
    d = data_dir("dsb2018_full")
    with open(d / "split.csv", newline="") as f:
        i = next(r["id"] for r in csv.DictReader(f) if r["split"] == "val" and r["height"] == "520")
    return read_image(d / "images" / f"{i}.png")[..., :3], read_image(d / "labels" / f"{i}.tif")


def _full_path(w, pred, prompts, previous=None):
    """The reference: the prediction as the full-size path makes it, with the widget's options."""
    mask_input = window = prev = None
    if previous is not None:
        prev = previous.mask
        if w.ui.refine_check.isChecked():
            mask_input, window = previous.logits[previous.choice], previous.window
    pred.zoom = w.ui.zoom_check.isChecked()
    return ann.predict(pred, prompts, mask_input, w.ui.batch_check.isChecked(),
                       enforce_negatives=w.ui.enforce_check.isChecked(), mask_window=window,
                       follow_positives=w.ui.follow_check.isChecked(), previous=prev)


def _commit_reference(existing, ref, overwrite=False):
    out = existing.copy()
    plan = ann.plan_commit(existing, ref.objects(), ann.next_free_id(existing), overwrite)
    out = out.astype(plan.dtype)
    for i, r, c in plan.writes:
        out[r, c] = i
    return out


def _same_as_reference(w, viewer, ref):
    r = w.result
    np.testing.assert_array_equal(r.masks, ref.masks)
    # (the widget embeds in a worker thread, whose OpenMP thread count may differ from the main thread's: the
    # embeddings, and so the predicted IoUs, may differ in the last bit; the masks are cut far from such noise)
    np.testing.assert_allclose(r.iou, ref.iou, rtol=1e-5, atol=1e-6)
    assert r.choice == ref.choice
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data, ref.preview())


def test_patches_show_and_commit_exactly_the_full_size_masks(make_napari_viewer, qtbot, builtin, large_sample):
    from napari_sam._widgets._state import get_state

    img, gt = large_sample
    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(builtin, "builtin")
    viewer.add_image(img, name="cells")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("cells")
    pred = SamPredictor(builtin)
    pred.set_image(img)
    labels = viewer.layers["SAM labels"]
    ids, sizes = np.unique(gt[gt > 0], return_counts=True)
    small = [int(i) for i, s in zip(ids, sizes) if 150 < s < 1500]
    # the user's own objects: a commit must keep them (and the reference plans around them too)
    labels.data[gt == small[3]] = 900
    labels.refresh()
    existing = labels.data.copy()

    # a click on a small nucleus: decoded from its zoom window; three candidates, cycled
    click = interior_point(gt == small[0])
    w.add_point(click)
    wait_idle(qtbot, w)
    ref = _full_path(w, pred, ann.Prompts([click], [1]))
    assert tuple(w.result.window) != (0, 0) + img.shape[:2]  # (zoomed)
    _same_as_reference(w, viewer, ref)
    assert w.result.patches.size * 20 < w.result.masks.size  # only the box around the candidates is kept
    w.cycle_candidate()
    ref.choice = (ref.choice + 1) % 3
    _same_as_reference(w, viewer, ref)

    # a second click refines it (the previous mask and logits travel as the patch)
    second = (click[0] + 2, click[1] + 1)
    w.add_point(second)
    wait_idle(qtbot, w)
    ref = _full_path(w, pred, ann.Prompts([click, second], [1, 1]), previous=ref)
    _same_as_reference(w, viewer, ref)
    assert w.commit()
    expected = _commit_reference(existing, ref)
    np.testing.assert_array_equal(labels.data, expected)

    # a box over a cluster of nuclei, larger than half a window: decoded from the whole image; the old preview is
    # gone and the user's object is kept
    rr, cc = np.nonzero(np.isin(gt, small[3:9]))
    box = [rr.min(), cc.min(), max(rr.max(), rr.min() + 200), max(cc.max(), cc.min() + 200)]
    w.add_box(box)
    wait_idle(qtbot, w)
    ref = _full_path(w, pred, ann.Prompts(boxes=[box]))
    assert tuple(w.result.window) == (0, 0) + img.shape[:2]
    _same_as_reference(w, viewer, ref)
    assert w.commit()
    expected = _commit_reference(expected, ref)
    np.testing.assert_array_equal(labels.data, expected)
    assert (labels.data[existing == 900] == 900).all()

    # a batch of points: one object each
    w.ui.batch_check.setChecked(True)
    pts = [interior_point(gt == i) for i in small[10:14]]
    for p in pts:
        w.add_point(p)
    wait_idle(qtbot, w)
    ref = _full_path(w, pred, ann.Prompts(pts, [1] * len(pts)))
    _same_as_reference(w, viewer, ref)
    assert w.commit()
    np.testing.assert_array_equal(labels.data, _commit_reference(expected, ref))
    assert not viewer.layers["SAM preview"].data.any()  # the commit cleared the prompts and the preview
