"""Layer adapters without a viewer: prompts in image data coordinates of the current plane (3D, scaled
layers, points outside), one-step undoable Labels writes, dtype upgrade keeping the data."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_sam._widgets import _layers as L  # noqa: E402
from napari_sam.core.annotation import next_free_id, plan_commit  # noqa: E402


def test_read_prompts_3d_plane_scaled_and_outside(nuclei_sample):
    img, _ = nuclei_sample
    vol = np.stack([img, img[::-1], img.T])  # (3, 256, 256)
    image = napari.layers.Image(vol, scale=(2.0, 0.5, 0.5), translate=(0, 10, 10))
    # prompt layer in other units: world = data * 1.0, so image data = (world - translate) / scale
    pts = napari.layers.Points(
        np.array([[2.0, 10 + 0.5 * 40, 10 + 0.5 * 50], [2.0, 10 + 0.5 * 60, 10 + 0.5 * 70],
                  [4.0, 10 + 0.5 * 10, 10 + 0.5 * 10], [2.0, 10 + 0.5 * 300, 10 + 0.5 * 20]]),
        features={"positive": [True, False, True, True]})
    boxes = napari.layers.Shapes(ndim=3)
    boxes.add_rectangles(np.array([[2.0, 10 + 5, 10 + 6], [2.0, 10 + 5, 10 + 20], [2.0, 10 + 25, 10 + 20],
                                   [2.0, 10 + 25, 10 + 6]]))
    boxes.add_ellipses(np.array([[2.0, 15, 15], [2.0, 15, 25], [2.0, 25, 25], [2.0, 25, 15]]))  # not a box
    prompts, outside = L.read_prompts(pts, boxes, image, (1,))  # world z = 2 -> plane 1
    assert outside == 1
    np.testing.assert_allclose(prompts.points, [[40, 50], [60, 70]])
    np.testing.assert_array_equal(prompts.labels, [1, 0])
    np.testing.assert_allclose(prompts.boxes, [[10, 12, 50, 40]])
    other, _ = L.read_prompts(pts, boxes, image, (2,))
    np.testing.assert_allclose(other.points, [[10, 10]])
    assert len(other.boxes) == 0
    assert L.image_shape(image) == (3, 256, 256)
    assert np.array_equal(L.image_plane(image, (1,)), img[::-1])


def test_rgb_image_shape_and_problem_messages(nuclei_sample):
    rgb = napari.layers.Image(np.zeros((20, 30, 3), np.uint8), rgb=True)
    assert L.image_shape(rgb) == (20, 30)
    assert L.image_plane(rgb, ()).shape == (20, 30, 3)
    assert "no image layer" in L.image_problem(None)
    assert "not an Image layer" in L.image_problem(napari.layers.Labels(np.zeros((4, 4), int)))
    labels = napari.layers.Labels(np.zeros((20, 31), np.uint8), name="bad")
    with pytest.raises(L.LayerError, match="shape"):
        L.check_target(labels, rgb)


def test_write_plan_is_one_undo_step_and_dtype_upgrade_keeps_labels(nuclei_sample):
    _, gt = nuclei_sample
    data = np.stack([np.zeros_like(gt), gt]).astype(np.uint8)  # plane 1 holds the real nuclei
    data[1][data[1] > 0] += 200  # ids up to 239
    data[0, 0, 0] = 255  # the next free id needs uint16
    orig = int(data[1, 5, 5])
    labels = napari.layers.Labels(data)
    labels.data_setitem((np.array([1]), np.array([5]), np.array([5])), 7)  # an earlier edit, one undo step
    before = np.asarray(labels.data).copy()
    m1 = np.zeros(gt.shape, bool)
    m1[100:140, 100:140] = True
    m2 = np.zeros(gt.shape, bool)
    m2[10:30, 200:240] = True
    plan = plan_commit(labels.data[1], [m1, m2], next_free_id(labels.data))
    assert plan.ids == [256, 257]
    msg = L.upgrade_dtype(labels, plan.dtype)
    assert "uint16" in msg and labels.data.dtype == np.uint16
    assert np.array_equal(labels.data, before)  # nothing lost by the upgrade
    n = L.write_plan(labels, (1,), plan)
    assert n == sum(len(w[1]) for w in plan.writes) > 0
    after = np.asarray(labels.data).copy()
    assert set(np.unique(after[1])) >= {256, 257}
    kept = before[1] != 0
    assert np.array_equal(after[1][kept], before[1][kept])  # existing nuclei intact
    labels.undo()  # ONE undo removes both objects
    assert np.array_equal(labels.data, before)
    labels.undo()  # the history from before the upgrade is kept: the earlier edit is undone too
    assert labels.data[1, 5, 5] == orig != 7 and labels.data.dtype == np.uint16
    labels.redo()
    labels.redo()
    assert np.array_equal(labels.data, after)


def test_overlay_kwargs_give_new_layers_the_images_transform(nuclei_sample):
    """A layer made with overlay_kwargs is drawn where the image is: whole-image layers copy scale, translate,
    rotate, shear and affine; a 2D preview over a (Z, H, W) stack gets its planes' transform."""
    import napari

    from napari_sam._widgets import _layers as L

    img = nuclei_sample[0] if nuclei_sample[0].ndim == 2 else nuclei_sample[0][..., 0]
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # about z: the planes turn in place
    stack = napari.layers.Image(np.stack([img] * 3), scale=(4, 0.5, 0.7), translate=(2, 30, -8), rotate=rot,
                                shear=[0, 0, 0.2])
    flat = napari.layers.Image(img, rotate=25, affine=[[1, 0.3, 5], [0, 1, 7], [0, 0, 1]], scale=(0.5, 2))
    for image, ndim in ((stack, 3), (stack, 2), (flat, 2)):
        layer = napari.layers.Labels(np.zeros(image.data.shape[-ndim:], np.uint8), **L.overlay_kwargs(image, ndim))
        for rc in ((0, 0), (10, 200), (250, 3)):
            lead = [1] * (image.ndim - 2)
            a = np.asarray(image.data_to_world(np.array(lead + list(rc), float)))[-2:]
            b = np.asarray(layer.data_to_world(np.array([1] * (ndim - 2) + list(rc), float)))[-2:]
            np.testing.assert_allclose(a, b, atol=1e-9)
        assert L.same_transform(layer, image) == (ndim == image.ndim)
