"""Bad input gives a clear message in the viewer, never a traceback (pytest-qt fails a test on any
exception raised in a Qt callback), and no label data is lost. Random-weight model: plumbing only."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import annotator, model, wait_idle  # noqa: E402,F401  (fixtures)

from conftest import data_dir, read_image  # noqa: E402

pytestmark = pytest.mark.gui


def test_no_image_layer(make_napari_viewer, qtbot, model):
    from napari_sam._widgets._layers import LayerError
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model)
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    assert w.commit() == []
    assert "nothing to commit" in w.ui.status_label.text()
    with pytest.raises(LayerError, match="no image layer"):
        w.add_point((3, 3))
    viewer.window._qt_viewer.canvas.native.setFocus()
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.keyClick(viewer.window._qt_viewer.canvas.native, Qt.Key_N)  # shortcut without an image: a message
    qtbot.waitUntil(lambda: "no image layer" in w.ui.status_label.text(), timeout=3000)
    viewer.add_labels(np.zeros((5, 5), int), name="not an image")
    w.set_image_layer("not an image")
    assert "not an Image layer" in w.ui.status_label.text()


def test_rgb_16bit_float_images_and_point_outside(annotator, qtbot):
    viewer, w = annotator
    d = data_dir("dsb2018_stage1_nuclei_2d")
    rgb = read_image(d / "10_color_he_6b0ac2ab_image.png")
    gray = read_image(d / "00_fluo_c35e6e3e_image.png")
    images = {"rgb": rgb, "u16": gray.astype(np.uint16) * 257, "f32": gray.astype(np.float32) / 255.0}
    assert rgb.ndim == 3 and rgb.shape[-1] == 3
    for name, data in images.items():
        viewer.add_image(data, name=name, rgb=name == "rgb")
        w.set_image_layer(name)
        if name != "rgb":
            assert "scaled to 8 bit" in w.ui.status_label.text()
        w.clear_prompts()
        w.add_point((20, 20))
        wait_idle(qtbot, w)
        assert w.result is not None and w.result.masks.shape[1:] == data.shape[:2], name
    w.clear_prompts()
    w.add_point((20, 20))
    w.add_point((5000, 20))  # outside the image
    wait_idle(qtbot, w)
    assert "outside the image" in w.ui.status_label.text()
    assert len(w.result.prompts.points) == 1
    nan = images["f32"].copy()
    nan[0, 0] = np.nan
    viewer.add_image(nan, name="nan")
    w.set_image_layer("nan")
    w.add_point((20, 20))
    wait_idle(qtbot, w)
    assert "NaN" in w.ui.status_label.text() and "cannot embed" in w.ui.status_label.text()


def test_layer_deleted_while_embedding(annotator, qtbot):
    viewer, w = annotator
    w.add_point((40, 40))
    w.predict_now()  # starts the embedding worker
    assert w._embed_worker is not None
    viewer.layers.remove("nuclei")
    wait_idle(qtbot, w)
    assert w.image_layer is None and w.result is None
    assert "was removed" in w.ui.status_label.text()


def test_switching_model_mid_run(annotator, qtbot, nuclei_sample, tiny_model):
    from napari_sam._widgets._state import get_state
    from napari_sam.core import SamPredictor
    from napari_sam.core.annotation import Prompts, predict

    viewer, w = annotator
    state = get_state(viewer)
    w.add_point((40, 40))
    w.predict_now()  # embedding with the first model is running
    assert w._embed_worker is not None
    state.set_model(tiny_model, "other")  # e.g. after fine-tuning, or a new choice in the widget
    wait_idle(qtbot, w)
    p = SamPredictor(tiny_model)
    p.set_image(nuclei_sample[0])
    ref = predict(p, Prompts([[40, 40]], [1]))
    np.testing.assert_allclose(w.result.logits, ref.logits, rtol=0, atol=1e-6)  # the new model's answer
    assert len(state.embeddings) == 1 and all(k[3] == state.model_key for k in state.embeddings._d)


def test_refine_checkbox_follows_each_model(annotator, qtbot, tiny_model):
    """*refine with the previous mask* starts from each model's own setting (the built-in model's is off); a
    user's change holds until the model changes."""
    import copy

    from napari_sam._widgets._state import get_state
    from napari_sam.core.build import set_refine_logits

    viewer, w = annotator
    state = get_state(viewer)
    assert w.ui.refine_check.isChecked()  # a model built in code refines, as the reference does
    plain = set_refine_logits(copy.deepcopy(tiny_model), False)
    state.set_model(plain, "plain")
    assert not w.ui.refine_check.isChecked()
    w.ui.refine_check.setChecked(True)
    w.add_point((40, 40))
    wait_idle(qtbot, w)
    assert w.ui.refine_check.isChecked()  # predicting does not reset the user's choice
    state.set_model(tiny_model, "other")
    assert w.ui.refine_check.isChecked()


def test_small_int_labels_run_out_of_ids(annotator, qtbot, nuclei_sample):
    viewer, w = annotator
    _, gt = nuclei_sample
    existing = gt.astype(np.uint8)
    existing[existing > 0] += 200
    existing[0, 0] = 255
    before = existing.copy()
    viewer.add_labels(existing, name="mine")
    w.ui.labels_combo.setCurrentText("mine")
    w.add_point((128, 128))
    wait_idle(qtbot, w)
    ids = w.commit()
    lab = viewer.layers["mine"]
    assert ids == [256]
    assert lab.data.dtype == np.uint16
    assert "uint16" in w.ui.status_label.text() or "uint16" in viewer.status
    kept = before != 0
    assert np.array_equal(lab.data[kept], before[kept])  # nothing overwritten, nothing lost
    assert (lab.data == 256).any()
    lab.undo()
    assert np.array_equal(lab.data, before)


def test_model_from_a_local_file_and_a_missing_file(make_napari_viewer, qtbot, tmp_path, model):
    from napari_sam._widgets._state import get_state
    from napari_sam.core import save_checkpoint

    viewer = make_napari_viewer(show=True)
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_model(str(tmp_path / "nope.pt"))
    qtbot.waitUntil(lambda: w._model_worker is None, timeout=30000)
    assert "could not load model" in w.ui.status_label.text() and "does not exist" in w.ui.status_label.text()
    assert get_state(viewer).model is None
    path = save_checkpoint(model, tmp_path / "mine.pt")
    w.set_model(str(path), device="cpu")
    qtbot.waitUntil(lambda: w._model_worker is None, timeout=30000)
    loaded = get_state(viewer).model
    assert loaded is not None and get_state(viewer).model_name == str(path)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    assert "loaded on cpu" in w.ui.status_label.text() and "on cpu" in w.ui.model_label.text()


def test_cancel_embedding_then_resume(annotator, qtbot):
    viewer, w = annotator
    seen = []
    w.ui.progress.valueChanged.connect(seen.append)
    w.add_point((40, 40))
    w.predict_now()
    assert w._embed_worker is not None and w.ui.cancel_button.isEnabled()
    w.ui.cancel_button.click()
    wait_idle(qtbot, w)
    assert w.result is None and "cancelled" in w.ui.status_label.text()
    assert not w.ui.cancel_button.isEnabled() and len(w.state.embeddings) == 0
    w.add_point((60, 60))  # the next change starts it again; both points are used
    wait_idle(qtbot, w)
    assert w.result is not None and len(w.result.prompts.points) == 2
    assert any(0 < v <= 100 for v in seen)  # the progress bar moved during the embedding


def test_callbacks_after_qt_deleted_the_widget_do_nothing(annotator):
    """A worker that finishes after the dock was closed (Qt deleted the widget, its Python wrapper still alive)
    must not touch it: its callback is a no-op instead of a RuntimeError in the event loop."""
    from qtpy import sip

    _, w = annotator
    calls = []
    callback = w._weak(lambda widget: calls.append(widget.ui.progress.value()))
    callback()
    assert calls == [0]
    sip.delete(w)
    callback()
    assert calls == [0]
    with pytest.raises(RuntimeError):
        w.ui.progress.value()


def test_a_renamed_target_layer_stays_the_target(annotator, qtbot):
    """Renaming the chosen target: the choice follows it and Commit writes there (it used to create a fresh
    "SAM labels" layer and commit there, ids restarting at 1; then it refused with a message)."""
    viewer, w = annotator
    mine = viewer.add_labels(np.zeros(viewer.layers["nuclei"].data.shape[:2], np.int32), name="mine")
    w.ui.labels_combo.setCurrentText("mine")
    w.add_point((60, 100))
    wait_idle(qtbot, w)
    n_layers = len(viewer.layers)
    mine.name = "renamed"
    assert w.ui.labels_combo.currentText() == "renamed"
    assert w.commit() and mine.data.any() and len(viewer.layers) == n_layers
