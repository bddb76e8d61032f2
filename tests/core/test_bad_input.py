"""Every bad input of the issue ("Bad input" section) is a clear ValueError, never an error deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.core import SamPredictor
from napari_sam.core.image import to_rgb_uint8

from conftest import data_dir, read_image


@pytest.fixture(scope="module")
def predictor(tiny_model, nuclei_sample):
    p = SamPredictor(tiny_model)
    p.set_image(nuclei_sample[0])
    return p


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda im: np.where(np.arange(im.size).reshape(im.shape) == 77, np.nan, im.astype(np.float32)), "NaN or inf"),
        (lambda im: np.where(np.arange(im.size).reshape(im.shape) == 5, np.inf, im.astype(np.float64)), "NaN or inf"),
        (lambda im: im[:0], "too small"),
        (lambda im: im[:0, :0], "too small"),
        (lambda im: im[:1, :1], "too small"),
        (lambda im: im[:1], "too small"),
        (lambda im: im[None, :1, :1, None], "expected one 2D image"),
        (lambda im: np.stack([im] * 5, axis=-1), "expected one 2D image"),  # 5 "channels": not an image
        (lambda im: im.astype(complex), "complex"),
        (lambda im: im.astype(str), "dtype"),
    ],
    ids=["nan", "inf", "empty", "empty2", "one-pixel", "one-row", "4d", "5-channels", "complex", "strings"],
)
def test_bad_images(predictor, nuclei_sample, make, match):
    image = nuclei_sample[0][..., 0] if nuclei_sample[0].ndim == 3 else nuclei_sample[0]
    with pytest.raises(ValueError, match=match):
        predictor.compute_embedding(make(image))


def test_volume_without_channel_axis_is_refused(predictor):
    vol = read_image(data_dir("gonuclear_3d_nuclei") / "1135_crop_image.tif")
    assert vol.ndim == 3 and vol.shape[-1] == 100
    with pytest.raises(ValueError, match=r"expected one 2D image.*image\[z\]"):
        predictor.compute_embedding(vol)  # (set_image would also drop the module's image)
    to_rgb_uint8(vol[50])  # one plane is fine


def test_predict_before_set_image(tiny_model):
    p = SamPredictor(tiny_model)
    with pytest.raises(ValueError, match=r"call predictor.set_image\(image\)"):
        p.predict(points=[[10, 10]])
    with pytest.raises(RuntimeError):  # still a RuntimeError for callers written against the first version
        p.predict(box=[0, 0, 5, 5])


def test_points_outside_are_clipped_as_documented(predictor):
    h, w = predictor.original_size
    outside = predictor.predict(points=[[-40.0, w + 300.0], [h + 9.0, -2.0]], point_labels=[1, 0])
    clipped = predictor.predict(points=[[0.0, w - 1.0], [h - 1.0, 0.0]], point_labels=[1, 0])
    np.testing.assert_array_equal(outside.low_res_logits, clipped.low_res_logits)
    np.testing.assert_array_equal(outside.masks, clipped.masks)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"box": [50, 10, 20, 40]}, "min > max"),
        ({"box": [10, 60, 20, 40]}, "min > max"),
        ({"box": [1, 2, 3]}, r"box must have shape \(4,\)"),
        ({"box": [[1, 2, 3, 4, 5]]}, "box must have shape"),
        ({"box": [np.nan, 2, 3, 4]}, "NaN"),
        ({"box": [-90, -90, -50, -50]}, "entirely outside"),
        ({"points": [[10, 10], [20, 20]], "point_labels": [1]}, "one label .* per point"),
        ({"points": [[10, 10]], "point_labels": [1, 0, 1]}, "one label .* per point"),
        ({"points": [[10, 10]], "point_labels": [2]}, "1 \\(positive\\) or 0 \\(negative\\)"),
        ({"points": [10, 10, 10]}, r"points must have shape \(N, 2\)"),
        ({"points": np.zeros((0, 2))}, "no object or no point"),
        ({"points": np.zeros((0, 1, 2))}, "no object or no point"),
        ({"box": np.zeros((0, 4))}, "no object"),
        ({}, "no prompt"),
        ({"points": [[5, 5]], "mask_input": np.full((128, 128), np.nan)}, "mask_input contains NaN"),
        ({"points": [[5, 5]], "mask_input": np.zeros((128, 128)), "mask_windows": [0, 0, 9000, 50]},
         "not windows of this image"),
        ({"points": [[5, 5]], "mask_input": np.zeros((128, 128)), "mask_windows": [40, 40, 10, 10]},
         "not windows of this image"),
        ({"points": [[5, 5]], "mask_input": np.zeros((128, 128)), "mask_windows": [-8, 0, 10, 10]},
         "not windows of this image"),
        ({"points": [[5, 5]], "mask_input": np.zeros((128, 128)), "mask_windows": [np.nan, 0, 10, 10]},
         "not windows of this image"),
        ({"points": [[5, 5]], "mask_input": np.zeros((128, 128)), "mask_windows": [0, 0, 10]},
         "mask_windows has shape"),
        ({"points": [[np.inf, 3]]}, "NaN or inf"),
        ({"point_labels": [1]}, "without points"),
        ({"points": np.zeros((3, 1, 2)), "box": np.array([[0, 0, 9, 9]] * 2)}, "one box per object"),
        ({"points": [[5, 5]], "mask_input": np.zeros((64, 64))}, "mask_input has shape"),
        ({"points": np.zeros((2, 1, 2)), "mask_input": np.zeros((3, 1, 128, 128))}, "3 masks for 2 objects"),
    ],
)
def test_bad_prompts(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_embedding_of_another_model_is_refused(predictor):
    from napari_sam.core import ImageEmbedding

    import torch

    emb = ImageEmbedding(torch.zeros(1, 256, 64, 64), (100, 100), (1024, 1024))
    with pytest.raises(ValueError, match="does not fit this model"):
        predictor.set_embedding(emb)


def test_a_failed_set_image_leaves_no_image_set(tiny_model, nuclei_sample):
    """predict never answers for the image set before a set_image that failed."""
    p = SamPredictor(tiny_model)
    p.set_image(nuclei_sample[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        p.set_image(np.full((30, 30), np.nan))
    assert not p.is_image_set
    with pytest.raises(ValueError, match=r"call predictor.set_image\(image\)"):
        p.predict(points=[[10, 10]])


def test_very_elongated_images_work(tiny_model, nuclei_sample):
    """A strip whose short side would round to 0 pixels in the model input (the reference crashes in PIL)."""
    gray = nuclei_sample[0] if nuclei_sample[0].ndim == 2 else nuclei_sample[0][..., 0]
    strip = np.ascontiguousarray(np.tile(gray[:2], (1, 12)))  # (2, 12 * W) real pixels
    p = SamPredictor(tiny_model)
    p.set_image(strip)
    assert p.input_size[0] == 1 and p.input_size[1] == tiny_model.img_size
    r = p.predict(points=[[1, strip.shape[1] // 2]])
    assert r.masks.shape == (3,) + strip.shape


def test_bad_models_and_devices_name_the_fix(tmp_path):
    from napari_sam import load_model
    from napari_sam.core.checkpoints import CheckpointError

    with pytest.raises(ValueError, match=r"unknown model 'nope'; choose one of \['builtin'"):
        load_model("nope")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        load_model(device="gpu0")
    with pytest.raises(ValueError, match="needs a SAM model"):
        SamPredictor(5)


def test_stack_contrast_checks_every_slice_and_ignores_alpha(nuclei_sample):
    """A NaN in a slice the contrast sample skips is refused when the slice is read; an RGBA stack's slice
    converts exactly as the same 2D image does (alpha takes no part in the contrast)."""
    from napari_sam.core.embedding_store import volume_to_uint8

    gray = nuclei_sample[0] if nuclei_sample[0].ndim == 2 else nuclei_sample[0][..., 0]
    plane = gray.astype(np.float32)
    vol = np.stack([plane] * 40)
    vol[1, 3, 3] = np.nan  # 40 slices: every 2nd is sampled, slice 1 is not
    get = volume_to_uint8(vol)
    get(0)
    with pytest.raises(ValueError, match="slice 1 of the stack contains NaN"):
        get(1)
    rgba = np.stack([plane, plane / 2, plane / 3, np.full(plane.shape, 1e4, np.float32)], -1)
    np.testing.assert_array_equal(volume_to_uint8(rgba[None])(0), to_rgb_uint8(rgba))
