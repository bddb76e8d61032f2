"""Image normalisation, (row, col) <-> (x, y), resizing, and logits -> image-size masks against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sam.core.image import to_rgb_uint8
from napari_sam.core.prompts import boxes_rc_to_xy, rc_to_xy, validate_points
from napari_sam.core.transforms import ResizeLongestSide, preprocess_shape, upsample_logits, upsample_masks

from conftest import data_dir, read_image


def reference_postprocess(low: torch.Tensor, img_size: int, input_size, original_size) -> torch.Tensor:
    """Meta's Sam.postprocess_masks, verbatim: 1024x1024, crop, resize."""
    m = F.interpolate(low, (img_size, img_size), mode="bilinear", align_corners=False)
    m = m[..., : input_size[0], : input_size[1]]
    return F.interpolate(m, original_size, mode="bilinear", align_corners=False)


def blob_logits(n: int, L: int, seed: int) -> torch.Tensor:
    """Smooth logits with small objects, large objects, an empty mask and a full one."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    out = []
    for i in range(n):
        cy, cx = torch.randint(0, L, (2,), generator=g).tolist()
        r = [3, 10, 40, 200][i % 4]
        out.append(r - torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2.0) + 0.3 * torch.randn(L, L, generator=g))
    out.append(torch.full((L, L), -5.0))
    out.append(torch.full((L, L), 5.0))
    return torch.stack(out)


@pytest.mark.parametrize("original", [(603, 1272), (512, 512), (256, 320), (1024, 1024), (2, 3000), (700, 50)])
def test_upsampling_equals_reference_postprocess(original):
    low = blob_logits(8, 256, seed=sum(original))
    input_size = preprocess_shape(*original, 1024)
    ref = reference_postprocess(low[:, None], 1024, input_size, original)[:, 0]
    ours = upsample_logits(low, 1024, input_size, original)
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-4
    masks = upsample_masks(low, 1024, input_size, original)
    assert masks.dtype == bool and masks.shape == (len(low), *original)
    assert not masks[-2].any() and masks[-1].all()
    agree = (masks == (ref > 0).numpy()).mean()
    assert agree >= 0.9999
    # and the thresholded window equals thresholding our own full-size logits exactly but for ties at 0
    differ = masks != (ours > 0).numpy()
    assert float(ours.abs().numpy()[differ].max(initial=0.0)) < 1e-4


def test_upsample_masks_threshold():
    low = blob_logits(4, 256, seed=1)
    masks = upsample_masks(low, 1024, (1024, 768), (400, 300), threshold=2.0)
    full = upsample_logits(low, 1024, (1024, 768), (400, 300))
    assert (masks == (full > 2.0).numpy()).mean() >= 0.9999


def test_resize_matches_pil_and_reference_shapes(reference):
    from segment_anything.utils.transforms import ResizeLongestSide as RefResize

    image = to_rgb_uint8(read_image(data_dir("dsb2018_stage1_nuclei_2d") / "09_fluo_9bb6e39d_image.png"))
    ours, ref = ResizeLongestSide(1024), RefResize(1024)
    np.testing.assert_array_equal(ours.apply_image(image), ref.apply_image(image))
    boxes = np.array([[0, 0, 346, 259], [10.5, 20.25, 30, 40]])
    np.testing.assert_allclose(ours.apply_boxes(boxes, image.shape[:2]), ref.apply_boxes(boxes, image.shape[:2]))


def test_rc_to_xy_is_the_axis_swap():
    rc = np.array([[1.0, 2.0], [3.5, 4.5]])
    np.testing.assert_array_equal(rc_to_xy(rc), [[2.0, 1.0], [4.5, 3.5]])
    np.testing.assert_array_equal(boxes_rc_to_xy(np.array([[1, 2, 3, 4]])), [[2, 1, 4, 3]])
    pts, labels = validate_points([[5, 6]], None, (10, 10))
    assert pts.shape == (1, 1, 2) and labels.tolist() == [[1]]


class TestToRgbUint8:
    def test_uint8_rgb_kept_bit_exact_and_rgba_drops_alpha(self, nuclei_sample):
        rgb = to_rgb_uint8(read_image(data_dir("dsb2018_stage1_nuclei_2d") / "10_color_he_6b0ac2ab_image.png"))
        np.testing.assert_array_equal(to_rgb_uint8(rgb), rgb)
        rgba = np.concatenate([rgb, np.zeros(rgb.shape[:2] + (1,), np.uint8)], axis=2)
        np.testing.assert_array_equal(to_rgb_uint8(rgba), rgb)

    def test_grayscale_becomes_three_equal_channels(self):
        gray = read_image(data_dir("dsb2018_stage1_nuclei_2d") / "05_fluo_b1f23c4d_image.png")
        out = to_rgb_uint8(gray)
        assert out.shape == gray.shape + (3,) and out.dtype == np.uint8
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], gray)
        np.testing.assert_array_equal(to_rgb_uint8(gray[..., None]), out)

    def test_16_bit_and_float_are_normalised_robustly(self):
        img16 = read_image(data_dir("stardist_dsb2018_2d") / "img2d_image.tif")
        assert img16.dtype == np.uint16
        out = to_rgb_uint8(img16)
        lo, hi = np.percentile(img16, [0.5, 99.5])
        expected = np.clip(np.rint((img16.astype(float) - lo) * 255 / (hi - lo)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(out[..., 0], expected)
        assert out.min() == 0 and out.max() == 255
        # a scaled float copy normalises to the same image: the result does not depend on the units
        np.testing.assert_array_equal(to_rgb_uint8(img16.astype(np.float32) * 0.01 - 3), out)
        # a hot pixel does not crush the contrast
        hot = img16.copy()
        hot[0, 0] = 65535
        diff = np.abs(to_rgb_uint8(hot).astype(int) - out)
        diff[0, 0] = 0  # the hot pixel itself saturates
        assert diff.max() <= 1

    def test_constant_and_bool_images(self):
        assert not to_rgb_uint8(np.full((5, 7), 3.0)).any()
        b = to_rgb_uint8(np.eye(4, dtype=bool))
        assert b[0, 0, 0] == 255 and b[0, 1, 0] == 0
