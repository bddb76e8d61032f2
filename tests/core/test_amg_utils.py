"""AMG helpers against the reference's own functions (segment_anything.utils.amg) and exact definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.core.amg_utils import (
    build_all_layer_point_grids, generate_crop_boxes, is_box_near_crop_edge, nms, remove_small_regions,
    stability_score,
)


@pytest.fixture(scope="module")
def ref_amg(reference):
    """The reference's pure AMG helpers (segment_anything.utils.amg)."""
    from segment_anything.utils import amg

    return amg


@pytest.mark.parametrize("shape,layers,ratio", [((256, 256), 0, 512 / 1500), ((520, 696), 2, 512 / 1500),
                                                 ((603, 1272), 1, 0.2)])
def test_crop_boxes_match_reference(ref_amg, shape, layers, ratio):
    ours, our_layers = generate_crop_boxes(shape, layers, ratio)
    ref, ref_layers = ref_amg.generate_crop_boxes(shape, layers, ratio)
    assert our_layers == ref_layers
    assert [(y0, x0, y1, x1) for x0, y0, x1, y1 in ref] == ours


def test_point_grids_match_reference(ref_amg):
    for ours, ref in zip(build_all_layer_point_grids(10, 2, 2), ref_amg.build_all_layer_point_grids(10, 2, 2)):
        np.testing.assert_array_equal(ours, ref[:, ::-1])  # (row, col) = (y, x)


def test_stability_score_matches_reference(ref_amg, nuclei_sample):
    img = torch.as_tensor(nuclei_sample[0][..., 0] if nuclei_sample[0].ndim == 3 else nuclei_sample[0])
    logits = torch.stack([(img.float() - t) / 8.0 for t in (10.0, 40.0, 90.0)])
    ours = stability_score(logits, 0.0, 1.0)
    ref = ref_amg.calculate_stability_score(logits, 0.0, 1.0)
    np.testing.assert_allclose(ours.numpy(), ref.float().numpy(), rtol=1e-6)
    assert stability_score(torch.full((1, 8, 8), -5.0), 0.0, 1.0).item() == 0.0  # empty: 0, not NaN


def _nms_bruteforce(boxes, scores, thr):
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i], boxes[j]
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_matches_definition(nuclei_sample):
    # boxes of the real ground-truth nuclei, jittered copies make duplicates to suppress
    from scipy import ndimage

    gt = nuclei_sample[1]
    sl = [s for s in ndimage.find_objects(gt) if s is not None]
    base = np.array([[s[0].start, s[1].start, s[0].stop - 1, s[1].stop - 1] for s in sl], dtype=np.float64)
    rng = np.random.default_rng(0)
    boxes = np.concatenate([base, base + rng.integers(-3, 4, base.shape)])
    scores = rng.random(len(boxes))
    for thr in (0.3, 0.7, 0.95):
        assert nms(boxes, scores, thr).tolist() == _nms_bruteforce(boxes.tolist(), scores.tolist(), thr)
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0


def test_box_near_crop_edge_matches_reference(ref_amg):
    boxes = np.array([[5, 5, 50, 50], [100, 100, 140, 150], [10, 200, 60, 255], [230, 230, 255, 255]])
    crop, orig = (0, 128, 256, 256), (0, 0, 256, 256)
    ref = ref_amg.is_box_near_crop_edge(torch.as_tensor(boxes[:, [1, 0, 3, 2]]) - torch.tensor([128, 0, 128, 0]),
                                        [128, 0, 256, 256], [0, 0, 256, 256])
    assert is_box_near_crop_edge(boxes, crop, orig).tolist() == ref.tolist()


def test_remove_small_regions_on_real_masks(nuclei_sample):
    from scipy import ndimage

    mask = nuclei_sample[1] > 0
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())[1:]
    thr = float(np.median(sizes))
    out, changed = remove_small_regions(mask, thr, "islands")
    assert changed
    np.testing.assert_array_equal(out, np.isin(lab, np.flatnonzero(sizes >= thr) + 1))
    # holes: punch real-shaped holes (eroded small nuclei) into a filled square, fill those below the threshold
    square = np.ones_like(mask)
    small_holes = mask & ~ndimage.binary_dilation(mask & np.isin(lab, np.flatnonzero(sizes >= thr) + 1),
                                                  iterations=2)
    punched = square & ~small_holes
    filled, changed = remove_small_regions(punched, sizes.max() + 1, "holes")
    assert changed and filled.all()
    same, changed = remove_small_regions(punched, 1, "holes")
    assert not changed and np.array_equal(same, punched)
    # every island small: the largest survives (reference behaviour)
    out, _ = remove_small_regions(mask, sizes.max() + 1, "islands")
    np.testing.assert_array_equal(out, lab == (np.argmax(sizes) + 1))
