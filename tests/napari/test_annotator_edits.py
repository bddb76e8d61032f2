"""The annotator when the data under it changes or the user acts mid-run, on real images with a random-weight model
(plumbing): images and stacks edited in place or replaced are embedded again (never a stale embedding, in memory
or in the disk cache), a click right after Cancel is embedded, a denoise change keeps the user's refine choice,
and napari's close button stops a closed annotator."""

from __future__ import annotations

import threading

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import annotator, model, wait_idle  # noqa: E402,F401  (fixtures)

from napari_sam.core import SamPredictor  # noqa: E402
from napari_sam.core.annotation import Prompts, predict  # noqa: E402

pytestmark = pytest.mark.gui
TOL = 2e-4  # float noise between threads; these random-weight logits differ by > 5e-3 between the images


def _reference(model, image, prompts):
    p = SamPredictor(model)
    p.set_image(image)
    return predict(p, prompts)


def _assert_predicted_on(result, model, image, old_image, prompts):
    """``result`` is the prediction of ``prompts`` on ``image``, not on ``old_image`` (the random-weight model's
    masks barely depend on the image: its logits tell)."""
    np.testing.assert_allclose(result.logits, _reference(model, image, prompts).logits, rtol=0, atol=TOL)
    assert not np.allclose(result.logits, _reference(model, old_image, prompts).logits, rtol=0, atol=TOL)


@pytest.fixture
def gate(monkeypatch):
    """Holds every 2D embedding until ``gate.set()`` (a run that stays running while the test acts), or until it is
    cancelled (then it ends at once, as a real encoder stage does: waiting out the hold raced the tests' 60 s waits)."""
    import time

    from napari_sam.core import annotation as ann

    ev, compute = threading.Event(), ann.compute_embedding

    def gated(*args, **kwargs):
        cancelled = args[3] if len(args) > 3 else kwargs.get("cancelled")
        end = time.monotonic() + 60
        while not ev.wait(0.02) and time.monotonic() < end:
            if cancelled is not None and cancelled():
                break
        return compute(*args, **kwargs)

    monkeypatch.setattr(ann, "compute_embedding", gated)
    yield ev
    ev.set()


def test_image_edited_in_place_is_embedded_again(annotator, qtbot, model, nuclei_sample):
    """An in-place edit (no napari data event: ``layer.refresh()`` only), then a click: the click is predicted from
    the cached embedding without checking the pixels (a click does not pay for a checksum of the plane); Commit
    checks them, commits nothing, and the prompts are predicted again from the new pixels."""
    viewer, w = annotator
    img, _ = nuclei_sample
    layer = viewer.layers["nuclei"]
    layer.data = img.copy()  # (the layer holds the shared fixture's array)
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    w.clear_prompts()
    layer.data[:] = img[:, ::-1]
    layer.refresh()
    w.add_point((60, 115))
    wait_idle(qtbot, w)
    assert w.commit() == []
    assert "changed since this preview" in w.ui.status_label.text()
    assert not viewer.layers["SAM labels"].data.any()
    wait_idle(qtbot, w)
    _assert_predicted_on(w.result, model, np.ascontiguousarray(img[:, ::-1]), img, Prompts([[60, 115]], [1]))


def test_commit_after_an_in_place_edit_commits_only_a_preview_of_the_new_pixels(annotator, qtbot, model,
                                                                                 nuclei_sample):
    """The preview is shown, then the image is edited in place and Commit is pressed with no new click: nothing is
    committed (the preview shows the old pixels' object), the same prompts are predicted again from the new pixels,
    and the next Commit writes that new preview, as one undo step."""
    viewer, w = annotator
    img, _ = nuclei_sample
    layer = viewer.layers["nuclei"]
    layer.data = img.copy()
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    old = w.result
    flipped = np.ascontiguousarray(img[:, ::-1])
    layer.data[:] = flipped
    layer.refresh()
    labels = viewer.layers["SAM labels"]
    assert w.commit() == []
    assert "changed since this preview" in w.ui.status_label.text() and "nothing committed" in w.ui.status_label.text()
    assert not labels.data.any()
    assert w.result is None or w.result is not old
    wait_idle(qtbot, w)
    _assert_predicted_on(w.result, model, flipped, img, Prompts([[60, 140]], [1]))
    shown = w.result.mask
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data == 1, shown)
    assert shown.any() and w.commit() == [1]
    np.testing.assert_array_equal(labels.data == 1, shown)
    labels.undo()
    assert not labels.data.any()


def test_clicks_do_not_checksum_the_plane_commit_and_a_plane_served_again_do(annotator, qtbot, monkeypatch,
                                                                            nuclei_sample):
    """The plane's pixels are checksummed when the embedding is computed, when it is served again (another plane
    or image was predicted on meanwhile) and at Commit; not on every click (0.16 s per click at 8192 px)."""
    from napari_sam.core import annotation as ann

    viewer, w = annotator
    calls = []
    checksum = ann.plane_checksum
    monkeypatch.setattr(ann, "plane_checksum", lambda plane: calls.append(plane.shape) or checksum(plane))
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    assert len(calls) == 1  # (the embedding's)
    for rc in ((62, 150), (70, 120), (40, 100)):
        w.add_point(rc)
        wait_idle(qtbot, w)
    assert len(calls) == 1 and w.result is not None and len(w.result.prompts.points) == 4
    assert w.commit()
    assert len(calls) == 2
    img, _ = nuclei_sample
    viewer.add_image(np.ascontiguousarray(img[::-1]), name="other")
    w.set_image_layer("other")
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    assert len(calls) == 3  # (the other image's embedding)
    w.set_image_layer("nuclei")  # its embedding is served again from the cache: checked once
    for rc in ((60, 140), (62, 150)):
        w.add_point(rc)
        wait_idle(qtbot, w)
    assert len(calls) == 4 and w.result is not None


def test_replaced_image_is_predicted_again_and_its_old_preview_never_committed(annotator, qtbot, model, nuclei_sample,
                                                                            gate):
    """``layer.data = new`` with a preview shown: the prompts are predicted again on the new data; while its
    embedding is cancelled, Commit refuses the old preview (it shows the old image's object)."""
    viewer, w = annotator
    img, _ = nuclei_sample
    gate.set()
    w.add_point((60, 140))
    wait_idle(qtbot, w)
    old = w.result
    gate.clear()
    flipped = np.ascontiguousarray(img[:, ::-1])
    viewer.layers["nuclei"].data = flipped
    w.predict_now()
    assert w._embed_worker is not None  # the new data is being embedded
    w.cancel()
    wait_idle(qtbot, w)
    gate.set()
    assert w.result is old
    assert w.commit() == []
    assert "data changed" in w.ui.status_label.text()
    assert "SAM labels" not in viewer.layers or not viewer.layers["SAM labels"].data.any()
    viewer.layers["nuclei"].data = flipped.copy()  # replaced again: predicted without another click
    wait_idle(qtbot, w)
    _assert_predicted_on(w.result, model, flipped, img, Prompts([[60, 140]], [1]))


def test_stack_edited_in_place_is_embedded_again_and_the_disk_cache_stays_right(make_napari_viewer, qtbot, model,
                                                                                 nuclei_sample):
    """Planes of a stack come from its StackEmbeddings (hashed when opened): after an in-place edit the annotated
    plane is embedded from the new pixels, and the disk cache of the original data never holds them."""
    from napari_sam._widgets._state import get_state
    from napari_sam.core.embedding_store import StackEmbeddings

    img, _ = nuclei_sample
    gray = img if img.ndim == 2 else np.ascontiguousarray(img[..., 0])
    orig = np.stack([gray, np.roll(gray, 30, axis=1), np.roll(gray, 60, axis=1)])
    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model)
    layer = viewer.add_image(orig.copy(), name="stack")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("stack")
    for z in (0, 2):  # plane 2 embedded (and cached) before the edit, plane 0 after it
        viewer.dims.set_current_step(0, z)
        w.add_point((60, 100))
        wait_idle(qtbot, w)
        w.clear_prompts()
    layer.data[:] = orig[:, ::-1]
    layer.refresh()
    edited = np.ascontiguousarray(orig[:, ::-1])
    for z in (1, 2):
        viewer.dims.set_current_step(0, z)
        w.add_point((60, 100))
        wait_idle(qtbot, w)
        _assert_predicted_on(w.result, model, edited[z], orig[z], Prompts([[60, 100]], [1]))
        w.clear_prompts()
    cached = StackEmbeddings(orig, model)  # the original stack, opened by a later session
    assert cached.missing() == [1]
    fresh = StackEmbeddings(orig, model, cache=False)
    for z in (0, 2):
        np.testing.assert_array_equal(cached.features(z), fresh.features(z))


def test_a_click_right_after_cancel_is_embedded(annotator, qtbot, model, nuclei_sample, gate):
    """Cancel, then a click while the cancelled run winds down (same image and plane): the click is embedded
    and predicted when that run ends, quietly (no 'cancelled' message)."""
    viewer, w = annotator
    img, _ = nuclei_sample
    w.add_point((10, 10))
    w.predict_now()
    assert w._embed_worker is not None
    w.cancel()
    w.clear_prompts()
    w.add_point((60, 140))
    w.predict_now()
    gate.set()
    wait_idle(qtbot, w)
    assert w.result is not None
    np.testing.assert_allclose(w.result.logits, _reference(model, img, Prompts([[60, 140]], [1])).logits, rtol=0,
                               atol=TOL)
    assert "cancelled" not in w.ui.status_label.text()


def test_a_denoise_change_keeps_the_refine_choice(annotator, qtbot, model):
    """The refine default is the model's; a denoise change (another widget, same model) keeps the user's choice,
    a new model sets its own default again."""
    import copy

    from napari_sam._widgets._state import get_state
    from napari_sam.core.build import refine_logits_of, set_refine_logits

    viewer, w = annotator
    state = get_state(viewer)
    state.set_model(copy.deepcopy(model), "copy")  # (denoising is set on the model: keep the shared one as is)
    default = w.ui.refine_check.isChecked()
    assert default == refine_logits_of(state.model)
    w.ui.refine_check.setChecked(not default)
    state.set_denoise(1.0)
    assert w.ui.denoise_spin.value() == 1.0
    assert w.ui.refine_check.isChecked() is (not default)
    state.set_model(set_refine_logits(copy.deepcopy(model), default), "another")
    assert w.ui.refine_check.isChecked() is default


def test_the_close_button_stops_the_annotator_and_a_new_one_takes_over(annotator, qtbot, model, nuclei_sample,
                                                                       gate, monkeypatch):
    """napari's close button (``remove_dock_widget``: the widget is not deleted) cancels the running embedding,
    unbinds the shortcuts and stops predicting; a new annotator reuses the preview and labels layers. Closing the viewer
    warns of no removed image."""
    from napari.utils.key_bindings import coerce_keybinding

    import napari_sam._widgets.annotator as mod
    from napari_sam._widgets._annotator_ui import SHORTCUTS

    viewer, w = annotator
    img, _ = nuclei_sample
    w.add_point((60, 140))
    w.predict_now()
    assert w._embed_worker is not None
    viewer.window.remove_dock_widget(w)
    assert w._embed_token.cancelled()
    gate.set()
    wait_idle(qtbot, w)
    assert all(coerce_keybinding(k) not in viewer.keymap for k in SHORTCUTS)
    viewer.layers["SAM points"].add([[62.0, 140.0]])
    qtbot.wait(200)
    assert not w.busy and w.result is None and not viewer.layers["SAM preview"].data.any()
    _, w2 = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w2.set_image_layer("nuclei")
    w2.add_point((60, 140))
    wait_idle(qtbot, w2)
    assert w2.result is not None and w2.preview_layer is viewer.layers["SAM preview"]
    assert [lay.name for lay in viewer.layers].count("SAM preview") == 1 and "SAM preview [1]" not in viewer.layers
    assert w2.commit() and w2.ui.labels_combo.currentText() == "SAM labels"  # the same target, no "SAM labels [1]"
    assert [lay.name for lay in viewer.layers].count("SAM labels") == 1 and "SAM labels [1]" not in viewer.layers
    assert all(coerce_keybinding(k) in viewer.keymap for k in SHORTCUTS)
    notes = []
    monkeypatch.setattr(mod, "_notify", lambda text, level="info": notes.append(text))
    viewer.close()
    qtbot.wait(50)
    assert not [n for n in notes if "was removed" in n]
