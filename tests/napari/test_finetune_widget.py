"""The fine-tune dock widget on a real DSB2018 image and its labels with a random-weight model (plumbing):
it trains a copy in a worker, reports a loss curve, switches the viewer's model, saves a loadable checkpoint;
cancel leaves the model unchanged; empty labels give a clear message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

napari = pytest.importorskip("napari")

pytestmark = pytest.mark.gui


@pytest.fixture
def scene(make_napari_viewer, qtbot, tiny_model, nuclei_sample):
    from napari_sam._widgets._state import get_state
    from napari_sam._widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(tiny_model, "random nsam_t")
    viewer.add_image(nuclei_sample[0], name="nuclei")
    viewer.add_labels(nuclei_sample[1].astype(np.int32), name="committed")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    return viewer, widget


def test_finetune_switches_the_model_and_saves(scene, qtbot, tiny_model, tmp_path):
    from napari_sam._widgets._state import get_state
    from napari_sam.core.build import load_model

    viewer, widget = scene
    state = get_state(viewer)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    assert widget.image_combo.currentText() == "nuclei" and widget.labels_combo.currentText() == "committed"
    assert widget.run(steps=3)
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "done", widget.status.text()
    assert len(widget.losses) == 3 and widget.curve.values == widget.losses
    assert state.model is widget.tuned and state.model is not tiny_model and "finetuned" in state.model_name
    # decoder-only: encoder unchanged, decoder changed; the original model object is untouched
    tuned = widget.tuned.state_dict()
    assert all(torch.equal(tuned[k], before[k]) for k in before if k.startswith("image_encoder."))
    assert any(not torch.equal(tuned[k], before[k]) for k in before if k.startswith("mask_decoder."))
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    path = widget.save(tmp_path / "tuned.pt")
    loaded = load_model(path, device="cpu")
    w = "mask_decoder.iou_token.weight"
    torch.testing.assert_close(loaded.state_dict()[w], tuned[w].half().float())


def test_cancel_keeps_the_model(scene, qtbot, tiny_model):
    from napari_sam._widgets._state import get_state

    viewer, widget = scene
    assert widget.run(steps=10000)
    qtbot.waitUntil(lambda: len(widget.losses) >= 1, timeout=120000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=60000)
    assert widget.result == "cancelled" and get_state(viewer).model is tiny_model
    assert len(widget.losses) < 10000


def test_empty_labels_give_a_clear_message(scene, qtbot, tiny_model):
    """The check runs in the worker (a large empty volume is scanned in full) and leaves the model as it was."""
    from napari_sam._widgets._state import get_state

    viewer, widget = scene
    viewer.layers["committed"].data = np.zeros_like(viewer.layers["committed"].data)
    assert widget.run(steps=2)
    qtbot.waitUntil(lambda: not widget.busy(), timeout=60000)
    assert widget.result == "failed" and "'committed' has no objects" in widget.status.text()
    assert get_state(viewer).model is tiny_model and widget.tuned is None and not widget.save_btn.isEnabled()


def test_save_runs_in_a_worker_and_reports_failure(scene, qtbot, tmp_path):
    """The Save button's path: the checkpoint is written in a worker; a path that cannot be written (here an
    existing folder) is a message, not a traceback, and the button comes back."""
    from napari_sam.core.build import load_model

    viewer, widget = scene
    assert widget.save_in_thread(tmp_path / "x.pt") is None and "fine-tune first" in widget.status.text()
    assert widget.run(steps=1)
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "done" and widget.save_btn.isEnabled()
    folder = tmp_path / "a_folder.pt"
    folder.mkdir()
    assert widget.save_in_thread(folder) is not None and not widget.save_btn.isEnabled()
    qtbot.waitUntil(lambda: widget._saving is None, timeout=60000)
    assert widget.status.text().startswith(f"could not save {folder}") and widget.save_btn.isEnabled()
    assert folder.is_dir() and not list(folder.iterdir()) and sorted(tmp_path.iterdir()) == [folder]
    widget.save_in_thread(tmp_path / "tuned.pt")
    qtbot.waitUntil(lambda: widget._saving is None, timeout=60000)
    assert widget.status.text() == f"saved {tmp_path / 'tuned.pt'}"
    w = "mask_decoder.iou_token.weight"
    torch.testing.assert_close(load_model(tmp_path / "tuned.pt", device="cpu").state_dict()[w],
                               widget.tuned.state_dict()[w].half().float())


def test_without_a_model_the_worker_loads_the_built_in_one(make_napari_viewer, qtbot, nuclei_sample):
    """No model chosen yet: Run returns at once and the built-in model is loaded in the worker (not in the GUI
    thread), becomes the viewer's model, and its fine-tuned copy replaces it."""
    from napari_sam._widgets._state import get_state
    from napari_sam._widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer(show=True)
    viewer.add_image(nuclei_sample[0], name="nuclei")
    viewer.add_labels(nuclei_sample[1].astype(np.int32), name="committed")
    widget = FinetuneWidget(viewer)
    state = get_state(viewer)
    assert state.model is None
    assert widget.run(steps=2)
    assert state.model is None and widget.busy()  # nothing loaded in the GUI thread
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "done", widget.status.text()
    assert state.model is widget.tuned and state.model_name == "builtin+finetuned"


def test_the_sam_preview_is_not_offered_as_labels(make_napari_viewer, nuclei_sample, tiny_model):
    """The annotator's preview layer holds no committed objects: it is neither listed nor chosen by default."""
    from napari_sam._widgets._layers import PREVIEW_NAME
    from napari_sam._widgets._state import get_state
    from napari_sam._widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(tiny_model, "random nsam_t")
    viewer.add_image(nuclei_sample[0], name="nuclei")
    viewer.add_labels(np.zeros(nuclei_sample[1].shape, np.uint8), name=PREVIEW_NAME)
    viewer.add_labels(nuclei_sample[1].astype(np.int32), name="committed")
    widget = FinetuneWidget(viewer)
    items = [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())]
    assert items == ["committed"] and widget.labels_combo.currentText() == "committed"
    viewer.layers.remove(PREVIEW_NAME)
    viewer.add_labels(np.zeros(nuclei_sample[1].shape, np.uint8), name=PREVIEW_NAME)  # added later: not listed
    assert widget.labels_combo.count() == 1 and widget.labels_combo.currentText() == "committed"


def test_multiscale_image_trains_at_full_resolution(scene, qtbot, tiny_model):
    """A multiscale image is tuned on its full-resolution level (its labels have that shape); labels of another
    shape are refused at once, naming both layers and shapes, and nothing starts."""
    from napari_sam._widgets._state import get_state

    viewer, widget = scene
    img = viewer.layers["nuclei"].data
    viewer.layers.remove("nuclei")
    viewer.add_image([img, img[::2, ::2]], multiscale=True, name="pyramid")
    widget.image_combo.setCurrentText("pyramid")
    assert widget.run(steps=1)
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "done", widget.status.text()
    state = get_state(viewer)
    tuned = state.model
    small = viewer.add_labels(np.asarray(viewer.layers["committed"].data)[::2, ::2], name="small")
    widget.labels_combo.setCurrentText("small")
    assert not widget.run(steps=1) and not widget.busy()
    h, w = img.shape[:2]
    assert widget.status.text() == (f"labels 'small' have shape {small.data.shape} but image 'pyramid' has {(h, w)}; "
                                    "choose a Labels layer of the image's shape")
    assert state.model is tuned


def test_renamed_layers_stay_chosen(scene, qtbot):
    """Renaming a layer renames it in the lists and keeps it chosen: fine-tuning runs on it."""
    viewer, widget = scene
    viewer.layers["nuclei"].name = "cells"
    viewer.layers["committed"].name = "my objects"
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == ["cells"]
    assert widget.image_combo.currentText() == "cells" and widget.labels_combo.currentText() == "my objects"
    viewer.add_labels(np.zeros_like(viewer.layers["my objects"].data), name="other")
    viewer.layers["my objects"].name = "mine"  # the choice follows the layer, not the first in the list
    assert widget.labels_combo.currentText() == "mine"
    assert widget.run(steps=1)
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "done", widget.status.text()


def _gate(monkeypatch):
    """Hold the fine-tune worker at its start until the returned event is set."""
    import threading

    import napari_sam._widgets.finetune as ft

    gate, real = threading.Event(), ft.run_finetune

    def gated(*a, **k):
        assert gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(ft, "run_finetune", gated)
    return gate


def test_a_model_loaded_while_tuning_stays_and_the_tuned_copy_can_be_saved(scene, qtbot, tiny_model, tmp_path,
                                                                           monkeypatch):
    """The user loads another model while fine-tuning runs: when it ends that model stays the viewer's (under its
    name); the tuned copy of the model it started from is kept for Save, and the message says so."""
    import copy

    from napari_sam._widgets._state import get_state
    from napari_sam.core.build import load_model

    viewer, widget = scene
    state = get_state(viewer)
    other = copy.deepcopy(tiny_model)
    gate = _gate(monkeypatch)
    try:
        assert widget.run(steps=2)
        state.set_model(other, "other model")
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "done" and widget.tuned is not None and widget.save_btn.isEnabled()
    assert state.model is other and state.model_name == "other model"
    text = widget.status.text()
    assert "'other model'" in text and "'random nsam_t' was not switched in" in text and "Save model" in text
    path = widget.save(tmp_path / "tuned.pt")
    w = "mask_decoder.iou_token.weight"
    torch.testing.assert_close(load_model(path, device="cpu").state_dict()[w],
                               widget.tuned.state_dict()[w].half().float())


def test_closing_the_dock_stops_tuning_and_keeps_the_model(scene, qtbot, tiny_model, monkeypatch):
    """napari's close button only takes the widget out of its dock: the training is cancelled and the viewer's
    model is not switched when the worker ends."""
    from napari_sam._widgets._state import get_state

    viewer, widget = scene
    gate = _gate(monkeypatch)
    try:
        assert widget.run(steps=2)
        viewer.window.remove_dock_widget(widget)
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=120000)
    assert widget.result == "cancelled" and get_state(viewer).model is tiny_model
