"""The annotator dock widget on real images with a random-weight model (plumbing): prompts reach the
model in the right axes and polarity, candidates cycle, the previous logits refine, commits are one undo
step with the next free id, per-plane embeddings of a stack, and shortcuts registered on the viewer."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import annotator, model, wait_idle  # noqa: E402,F401  (fixtures)

from napari_sam.core import SamPredictor  # noqa: E402
from napari_sam.core.annotation import Prompts, predict  # noqa: E402

pytestmark = pytest.mark.gui
TOL = 2e-4  # float noise between threads; other prompts change these random-weight logits by > 2e-3


def _reference(model, image, prompts, mask_input=None, batch=False):
    p = SamPredictor(model)
    p.set_image(image)
    return predict(p, prompts, mask_input, batch)


def test_point_cycle_refine_commit_undo(annotator, qtbot, model, nuclei_sample):
    viewer, w = annotator
    img, _ = nuclei_sample
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    r1 = w.result
    ref = _reference(model, img, Prompts([[60, 140]], [1]))
    assert r1.masks.shape == (3, 256, 256)
    np.testing.assert_array_equal(r1.masks, ref.masks)
    # (row, col) reached the model unflipped (random weights react weakly to points: tight tolerances)
    np.testing.assert_allclose(r1.logits, ref.logits, rtol=0, atol=TOL)
    assert not np.allclose(r1.logits, _reference(model, img, Prompts([[140, 60]], [1])).logits, rtol=0, atol=TOL)
    preview = viewer.layers["SAM preview"]
    np.testing.assert_array_equal(preview.data == 1, r1.mask)
    assert f"{r1.iou[r1.choice]:.2f}" in w.ui.candidate_label.text()
    first = r1.choice
    assert w.cycle_candidate() == (first + 1) % 3
    np.testing.assert_array_equal(preview.data == 1, r1.masks[(first + 1) % 3])
    assert f"candidate {(first + 1) % 3 + 1}/3" in w.ui.candidate_label.text()

    # a negative point refines with the logits of the shown candidate
    w.toggle_polarity()
    w.add_point((90, 170))
    wait_idle(qtbot, w)
    prompts = Prompts([[60, 140], [90, 170]], [1, 0])
    ref2 = _reference(model, img, prompts, mask_input=r1.logits[r1.choice])
    np.testing.assert_array_equal(w.result.masks, ref2.masks)
    np.testing.assert_allclose(w.result.logits, ref2.logits, rtol=0, atol=TOL)
    assert not np.allclose(w.result.logits, _reference(model, img, prompts).logits, rtol=0, atol=TOL)  # refined
    pts = viewer.layers["SAM points"]
    assert list(pts.features["positive"]) == [True, False]
    assert [str(s.value) for s in pts.symbol] == ["disc", "cross"]  # negatives look different
    assert not np.allclose(pts.face_color[0], pts.face_color[1])

    ids = w.commit()
    labels = viewer.layers["SAM labels"]
    assert ids == [1]
    np.testing.assert_array_equal(labels.data == 1, ref2.mask)
    assert len(pts.data) == 0 and not preview.data.any()  # prompts cleared after a commit
    assert "committed" in w.ui.status_label.text()

    # the next object gets the next id and never overwrites object 1
    w.toggle_polarity()
    w.add_box((20, 100, 120, 220))
    wait_idle(qtbot, w)
    ref3 = _reference(model, img, Prompts(boxes=[[20, 100, 120, 220]]))
    np.testing.assert_array_equal(w.result.masks, ref3.masks)
    before = np.asarray(labels.data).copy()
    if (ref3.mask & (before == 0)).any():
        assert w.commit() == [2]
        assert np.array_equal(labels.data[before == 1], before[before == 1])
        labels.undo()  # one undo step removes the whole commit
        np.testing.assert_array_equal(labels.data, before)
    else:
        assert w.commit() == [] and "nothing new to commit" in w.ui.status_label.text()
    labels.undo()
    assert not labels.data.any()


def test_batch_mode_commits_every_box_and_positive_point(annotator, qtbot, model, nuclei_sample):
    viewer, w = annotator
    img, _ = nuclei_sample
    w.ui.batch_check.setChecked(True)
    w.add_box((10, 10, 60, 70))
    w.add_point((200, 200))
    w.add_point((150, 40), positive=False)  # ignored in batch mode
    w.add_point((120, 230))
    wait_idle(qtbot, w)
    ref = _reference(model, img, Prompts([[200, 200], [150, 40], [120, 230]], [1, 0, 1],
                                              [[10, 10, 60, 70]]), batch=True)
    assert w.result.batch and w.result.masks.shape == (3, 256, 256)
    np.testing.assert_array_equal(w.result.masks, ref.masks)
    w.ui.overwrite_check.setChecked(True)
    ids = w.commit()
    labels = viewer.layers["SAM labels"].data
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 1
    taken = np.zeros(img.shape, bool)
    for i, m in zip(ids, [m for m in ref.masks if m.any()]):
        np.testing.assert_array_equal(labels == i, m & ~taken)  # earlier objects win overlaps
        taken |= m


def _open_stack(make_napari_viewer, model, data):
    """(viewer, annotator widget) on the stack ``data`` (layer "stack"), with ``model`` injected."""
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model)
    viewer.add_image(data, name="stack")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("stack")
    return viewer, w


def _clicked_on_plane_1(make_napari_viewer, qtbot, model, nuclei_sample):
    """(viewer, widget, volume): a two-plane stack (the image and its mirror) with a click at (60, 100) on plane 1,
    predicted."""
    img, _ = nuclei_sample
    vol = np.stack([img, np.ascontiguousarray(img[:, ::-1])])
    viewer, w = _open_stack(make_napari_viewer, model, vol)
    viewer.dims.set_current_step(0, 1)
    w.add_point((60, 100))
    wait_idle(qtbot, w)
    return viewer, w, vol


def test_stack_uses_current_plane_and_caches_per_plane(make_napari_viewer, qtbot, model, nuclei_sample):
    from napari_sam._widgets._state import get_state

    viewer, w, vol = _clicked_on_plane_1(make_napari_viewer, qtbot, model, nuclei_sample)
    np.testing.assert_array_equal(w.result.masks, _reference(model, vol[1], Prompts([[60, 100]], [1])).masks)
    assert len(get_state(viewer).embeddings) == 1
    w.commit()
    labels = viewer.layers["SAM labels"].data
    assert labels.shape == vol.shape and labels[1].any() and not labels[0].any()
    viewer.dims.set_current_step(0, 0)
    w.add_point((60, 100))
    wait_idle(qtbot, w)
    assert len(get_state(viewer).embeddings) == 2  # one cached embedding per plane
    np.testing.assert_array_equal(w.result.masks, _reference(model, vol[0], Prompts([[60, 100]], [1])).masks)
    viewer.dims.set_current_step(0, 1)
    w.add_point((30, 30))
    wait_idle(qtbot, w)
    assert len(get_state(viewer).embeddings) == 2  # plane 1 came from the cache


def test_a_preview_of_another_plane_is_never_committed(make_napari_viewer, qtbot, model, nuclei_sample):
    """Predict on plane 1, move to plane 0 and click, cancel that plane's embedding: plane 1's preview is still
    shown, but Commit refuses it (it would land on plane 0) and writes nothing; after a new preview it commits."""
    viewer, w, _ = _clicked_on_plane_1(make_napari_viewer, qtbot, model, nuclei_sample)
    assert w.result is not None and w.result.mask.any()
    viewer.dims.set_current_step(0, 0)
    w.add_point((60, 100))
    w.predict_now()
    assert w._embed_worker is not None
    w.cancel()
    wait_idle(qtbot, w)
    assert w.result is not None  # plane 1's preview is still there
    assert w.commit() == []
    assert "not of this plane's prompts" in w.ui.status_label.text()
    assert "SAM labels" not in viewer.layers or not viewer.layers["SAM labels"].data.any()
    w.predict_now()  # embeds plane 0 and predicts again
    wait_idle(qtbot, w)
    ids = w.commit()
    labels = viewer.layers["SAM labels"].data
    assert ids and (labels[0] == ids[0]).any() and not labels[1].any()


def test_stack_planes_come_from_the_disk_cache_in_a_new_session(make_napari_viewer, qtbot, model, nuclei_sample):
    """Planes of a stack are embedded through the on-disk cache: a new viewer on the same data runs no encoder,
    gives the same masks; changed data is embedded again (never a stale cache)."""
    from napari_sam.core.embedding_store import embeddings_dir

    img, _ = nuclei_sample
    gray = img if img.ndim == 2 else img[..., 0]
    vol = np.stack([gray, np.ascontiguousarray(gray[::-1]), np.ascontiguousarray(gray[:, ::-1])])
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))

    def session(data):
        viewer, w = _open_stack(make_napari_viewer, model, data)
        viewer.dims.set_current_step(0, 2)
        w.add_point((60, 100))
        wait_idle(qtbot, w)
        return w.result

    try:
        first = session(vol)
        assert len(calls) == 1 and len(list(embeddings_dir().iterdir())) == 1
        second = session(vol.copy())  # the same data reopened: loaded from disk
        assert len(calls) == 1
        np.testing.assert_array_equal(second.masks, first.masks)
        changed = vol.copy()
        changed[2, :20] = 0
        session(changed)
        assert len(calls) == 2 and len(list(embeddings_dir().iterdir())) == 2
    finally:
        hook.remove()


def test_shortcuts_are_viewer_keybindings_without_clashes(annotator, qtbot):
    from napari.utils.key_bindings import coerce_keybinding
    from napari.utils.shortcuts import default_shortcuts
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    from napari_sam._widgets._annotator_ui import SHORTCUTS

    viewer, w = annotator
    napari_keys = {str(kb) for kbs in default_shortcuts.values() for kb in kbs}
    for key in SHORTCUTS:
        kb = coerce_keybinding(key)
        assert str(kb) not in napari_keys, f"{key} clashes with a napari default shortcut"
        assert kb in viewer.keymap  # registered the napari way
    text = "\n".join(lbl.text() for lbl in w.findChildren(type(w.ui.status_label)))
    assert all(k in text for k in SHORTCUTS)  # listed in the widget
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    assert w.ui.polarity_label.text().startswith("new points: POSITIVE")
    QTest.keyClick(canvas, Qt.Key_N)
    qtbot.waitUntil(lambda: "NEGATIVE" in w.ui.polarity_label.text(), timeout=3000)
    QTest.keyClick(canvas, Qt.Key_N)
    qtbot.waitUntil(lambda: "POSITIVE" in w.ui.polarity_label.text(), timeout=3000)
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    QTest.keyClick(canvas, Qt.Key_C, Qt.ShiftModifier)  # commit
    qtbot.waitUntil(lambda: "SAM labels" in viewer.layers, timeout=3000)
    assert viewer.layers["SAM labels"].data.max() == 1


def test_closing_the_dock_leaves_nothing_behind(make_napari_viewer, qtbot, model, nuclei_sample):
    import gc
    import weakref

    from qtpy.QtCore import QCoreApplication, QEvent, Qt
    from qtpy.QtTest import QTest

    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model)
    viewer.add_image(nuclei_sample[0], name="nuclei")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("nuclei")
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    ref = weakref.ref(w)
    viewer.window.remove_dock_widget("all")
    del w
    for _ in range(3):
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        gc.collect()
        qtbot.wait(20)
    assert ref() is None  # shortcuts, shared state and finished workers hold the widget only weakly
    get_state(viewer).set_model(model)  # a model change reaches no dead widget and drops its callback
    assert get_state(viewer)._callbacks == []
    canvas = viewer.window._qt_viewer.canvas.native
    QTest.keyClick(canvas, Qt.Key_N)  # the shortcuts of a closed annotator do nothing (and never raise)
    QTest.keyClick(canvas, Qt.Key_C, Qt.ShiftModifier)
    viewer.layers["SAM points"].add([[10.0, 10.0]])
    viewer.layers.remove("nuclei")
    qtbot.wait(100)
    assert not viewer.layers["SAM labels"].data.any()
