"""Layers the user set up in other ways than ours: images with rotate, shear or an affine (clicks land on the right
pixel and every layer we add overlays the image), switching between images of other dimensionality or transform,
a layer of the user's that has the name of one of ours, and layers renamed while a widget shows them."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import annotator, interior_point, model, wait_idle  # noqa: E402,F401

from napari_sam.core.build import builtin_checkpoint_path  # noqa: E402

pytestmark = pytest.mark.gui


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def _same_place(layer, image, rc) -> bool:
    """Whether pixel ``rc`` (row, col) of ``layer``'s planes is drawn where the image's pixel ``rc`` is."""
    lead = [0] * (image.ndim - 2)
    a = np.asarray(image.data_to_world(np.array(lead + list(rc), float)))[-2:]
    b = np.asarray(layer.data_to_world(np.array([0] * (layer.ndim - 2) + list(rc), float)))[-2:]
    return bool(np.allclose(a, b))


@pytest.mark.slow
@pytest.mark.skipif(not builtin_checkpoint_path().is_file(), reason="the built-in model file does not exist")
@pytest.mark.parametrize("transform", [dict(rotate=30), dict(shear=[0.3]),
                                       dict(affine=[[1, 0.3, 5], [0, 1, 7], [0, 0, 1]], scale=(0.5, 0.5))],
                         ids=["rotate", "shear", "affine+scale"])
def test_a_click_on_a_rotated_or_sheared_image_segments_that_nucleus(make_napari_viewer, qtbot, nuclei_sample,
                                                                     transform):
    """With the built-in model on a real nucleus: the click is read at the right pixel (before, prompt layers
    ignored rotate and shear: the wrong pixel or 'outside the image'), and the preview and labels overlay it."""
    viewer = make_napari_viewer(show=True)
    img, gt = nuclei_sample
    image = viewer.add_image(img, name="nuclei", **transform)
    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("nuclei")
    ids, counts = np.unique(gt[gt > 0], return_counts=True)
    border = set(np.unique(np.concatenate([gt[0], gt[-1], gt[:, 0], gt[:, -1]])).tolist())
    inner = [i for _, i in sorted(zip(counts, ids), reverse=True) if i not in border]
    target = gt == inner[len(inner) // 2]  # the nucleus of test_annotator_quality's click (IoU >= 0.7 there too)
    w.add_point(interior_point(target))
    wait_idle(qtbot, w, timeout=120000)
    assert w.result is not None, w.ui.status_label.text()
    new = w.commit()
    assert new, w.ui.status_label.text()
    labels = viewer.layers[w.ui.labels_combo.currentText()]
    assert _iou(np.asarray(labels.data) == new[0], target) >= 0.7
    r, c = interior_point(target)
    for layer in (labels, w.preview_layer, w.points_layer):
        assert _same_place(layer, image, (r, c)), layer.name


def test_switching_to_a_stack_gives_new_prompt_layers_and_target(annotator, qtbot, nuclei_sample):
    """From a 2D image to a (Z, H, W) stack: the 2D prompt layers would read every click as z = 0 (clicks on
    other planes were ignored without a word) and the 2D target cannot hold the stack's objects."""
    viewer, w = annotator
    img, gt = nuclei_sample
    w.add_point(interior_point(gt == 1))
    wait_idle(qtbot, w)
    assert w.commit()
    stack = np.stack([img] * 4)
    viewer.add_image(stack, name="stack")
    w.set_image_layer("stack")
    assert "new prompt layers for the 3D image" in w.ui.status_label.text()
    assert "'SAM labels' does not fit" in w.ui.status_label.text()
    assert w.points_layer.ndim == 3 and w.boxes_layer.ndim == 3
    viewer.dims.set_current_step(0, 2)
    w.add_point(interior_point(gt == 2))
    wait_idle(qtbot, w)
    assert w.result is not None and w._result_plane == (2,)
    new = w.commit()
    target = viewer.layers[w.ui.labels_combo.currentText()]
    assert new and target.data.shape == stack.shape and target is not viewer.layers["SAM labels"]
    assert (np.asarray(target.data)[2] == new[0]).any() and not np.asarray(target.data)[[0, 1, 3]].any()


def test_switching_to_an_image_drawn_elsewhere_gives_a_target_that_overlays_it(annotator, qtbot, nuclei_sample):
    """Same shape, other scale and translate: the preview and a new target follow the new image's transform;
    a same-shaped image drawn in the same place keeps the target (channels of one sample)."""
    viewer, w = annotator
    img, gt = nuclei_sample
    first_target = w.ui.labels_combo.currentText()
    viewer.add_image(img, name="same place")
    w.set_image_layer("same place")
    assert w.ui.labels_combo.currentText() == first_target
    moved = viewer.add_image(img, name="moved", scale=(0.5, 0.5), translate=(300, 0))
    w.set_image_layer("moved")
    assert w.ui.labels_combo.currentText() != first_target
    w.add_point(interior_point(gt == 3))
    wait_idle(qtbot, w)
    assert w.commit()
    target = viewer.layers[w.ui.labels_combo.currentText()]
    assert _same_place(target, moved, (10, 20)) and _same_place(w.preview_layer, moved, (10, 20))
    assert not np.asarray(viewer.layers[first_target].data).any()


def test_a_users_layer_named_like_ours_is_left_alone(make_napari_viewer, qtbot, model, nuclei_sample):
    """A Points layer of the user's called 'SAM points' (no 'positive' feature): the annotator opened with a
    KeyError traceback; now it makes its own prompt layer beside it."""
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model, "random nsam_t")
    img, gt = nuclei_sample
    viewer.add_image(img, name="nuclei")
    mine = viewer.add_points([[10, 10]], name="SAM points")
    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("nuclei")
    assert w.points_layer is not mine and len(mine.data) == 1
    w.add_point(interior_point(gt == 1))
    wait_idle(qtbot, w)
    assert w.result is not None and len(w.result.prompts.points) == 1 and w.result.prompts.labels[0] == 1


def test_renamed_layers_stay_chosen(annotator, qtbot, nuclei_sample):
    """Renaming the image or the target: the choices follow the layer (before, the next commit went to a new
    'SAM labels' layer); segment-everything's choices follow too."""
    viewer, w = annotator
    img, gt = nuclei_sample
    target = viewer.layers[w.ui.labels_combo.currentText()]
    target.name = "my nuclei"
    viewer.layers["nuclei"].name = "raw"
    assert w.ui.labels_combo.currentText() == "my nuclei" and w.ui.image_combo.currentText() == "raw"
    w.add_point(interior_point(gt == 1))
    wait_idle(qtbot, w)
    new = w.commit()
    assert new and (np.asarray(target.data) == new[0]).any()
    assert [ly.name for ly in viewer.layers if isinstance(ly, napari.layers.Labels)] == ["SAM preview", "my nuclei"]
    dw, ev = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    ev.set_image_layer("raw")
    ev.set_target("my nuclei")
    target.name = "everything"
    viewer.layers["raw"].name = "raw2"
    assert ev.target_combo.currentText() == "everything" and ev.image_combo.currentText() == "raw2"


def test_another_images_preview_is_never_committed_and_targets_are_found_again(annotator, qtbot, nuclei_sample):
    """Switching images drops the preview (it was of the other image: before, Commit wrote it into the new image's
    labels, and the next click refined with its logits); switching back and forth between images of two shapes
    finds each image's labels layer again instead of making a new one at every switch."""
    viewer, w = annotator
    img, gt = nuclei_sample
    w.add_point(interior_point(gt == 1))
    wait_idle(qtbot, w)
    assert w.result is not None
    viewer.add_image(img.copy(), name="same shape")
    w.set_image_layer("same shape")
    assert w.result is None and w.commit() == [] and not np.asarray(viewer.layers["SAM labels"].data).any()
    viewer.add_image(img[:128, :160].copy(), name="small")
    for name in ("small", "nuclei", "small", "nuclei", "small"):
        w.set_image_layer(name)
    labels = [ly.name for ly in viewer.layers if isinstance(ly, napari.layers.Labels)]
    assert labels == ["SAM preview", "SAM labels", "SAM labels [1]"] and w.ui.labels_combo.currentText() == \
        "SAM labels [1]"
    assert "objects now go to 'SAM labels [1]'" in w.ui.status_label.text()


def test_a_closed_annotator_makes_no_layers(annotator, qtbot, nuclei_sample):
    """After its ✕ (napari keeps the widget), removing the image and adding another made the closed annotator
    choose it and create its prompt, preview and labels layers."""
    viewer, w = annotator
    viewer.window.remove_dock_widget(w)
    before = [ly.name for ly in viewer.layers]
    viewer.layers.remove("nuclei")
    viewer.add_image(nuclei_sample[0].copy(), name="next")
    assert [ly.name for ly in viewer.layers] == [n for n in before if n != "nuclei"] + ["next"]
    assert w.image_layer is None
