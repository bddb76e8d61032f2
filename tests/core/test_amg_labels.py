"""Mask records -> label image, on real ground-truth nuclei: exact reconstruction, deterministic overlaps,
small islands and holes cleaned."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_sam.core.labels import records_to_labels


def _records(gt):
    return [{"segmentation": gt == i, "predicted_iou": 0.9} for i in np.unique(gt) if i > 0]


def _raster_order(gt):
    """Expected ids: objects numbered by the raster position of their first pixel."""
    ids = [i for i in np.unique(gt) if i > 0]
    first = {i: np.flatnonzero(gt.ravel() == i)[0] for i in ids}
    out = np.zeros(gt.shape, np.int32)
    for k, i in enumerate(sorted(ids, key=first.get), start=1):
        out[gt == i] = k
    return out


def test_ground_truth_round_trip_any_order(nuclei_sample):
    gt = nuclei_sample[1]
    recs = _records(gt)
    expected = _raster_order(gt)
    assert np.array_equal(records_to_labels(recs, gt.shape), expected)
    rng = np.random.default_rng(0)
    shuffled = [recs[i] for i in rng.permutation(len(recs))]
    assert np.array_equal(records_to_labels(shuffled, gt.shape), expected)


def test_overlap_goes_to_the_smaller_mask(nuclei_sample):
    gt = nuclei_sample[1]
    ids = [i for i in np.unique(gt) if i > 0]
    sizes = {i: int((gt == i).sum()) for i in ids}
    small = min(ids, key=sizes.get)
    big = ndimage.binary_dilation(gt == small, iterations=6)  # a larger mask swallowing the small nucleus
    recs = [{"segmentation": big, "predicted_iou": 0.99}, {"segmentation": gt == small, "predicted_iou": 0.5}]
    for order in (recs, recs[::-1]):
        lab = records_to_labels(order, gt.shape)
        assert lab.max() == 2
        inner = np.unique(lab[gt == small])
        assert inner.size == 1 and inner[0] > 0
        assert np.array_equal(lab == inner[0], gt == small)
        assert np.array_equal(lab > 0, big)


def test_islands_and_holes_cleaned(nuclei_sample):
    gt = nuclei_sample[1]
    ids = [i for i in np.unique(gt) if i > 0]
    target = max(ids, key=lambda i: (gt == i).sum())
    obj = gt == target
    rr, cc = np.nonzero(obj)
    r, c = int(np.median(rr)), int(np.median(cc))
    holed = obj.copy()
    holed[r - 1 : r + 2, c - 1 : c + 2] = False  # a 9-px hole inside the nucleus
    island = np.zeros_like(obj)
    free = np.argwhere(ndimage.distance_transform_edt(gt == 0) > 5)[0]
    island[free[0], free[1]] = True  # a 1-px speck far from any nucleus
    recs = [{"segmentation": holed | island, "predicted_iou": 0.9}]
    cleaned = records_to_labels(recs, gt.shape, min_area=20)
    assert np.array_equal(cleaned > 0, obj)
    raw = records_to_labels(recs, gt.shape, min_area=0)
    assert np.array_equal(raw > 0, holed | island)
    assert not records_to_labels(recs, gt.shape, min_area=int(obj.sum()) + 10).any()  # too small: dropped


def test_no_records():
    assert not records_to_labels([], (5, 7)).any()


def _whole_image_reference(recs, shape, min_area):
    """records_to_labels' rules done plainly on whole-image arrays: paint (largest first; ties: higher
    predicted_iou, then lower box), clean every object in painting order (islands, then holes in its box), number
    by the raster position of each object's first pixel (np.unique)."""
    from napari_sam.core.labels import _as_mask

    items = sorted(((-m.area, -r["predicted_iou"], tuple(int(v) for v in m.box), m)
                    for r in recs if (m := _as_mask(r)) is not None), key=lambda t: t[:3])
    out = np.zeros(shape, np.int32)
    for lab, (_, _, _, m) in enumerate(items, start=1):
        out[m.full(shape)] = lab
    for lab, (_, _, (r0, c0, r1, c1), _) in enumerate(items, start=1):
        if min_area <= 0:
            break
        pieces, _ = ndimage.label(out == lab, structure=np.ones((3, 3), bool))
        small = np.bincount(pieces.ravel()) < min_area
        small[0] = False
        out[small[pieces]] = 0
        view = out[r0 : r1 + 1, c0 : c1 + 1]
        holes, _ = ndimage.label(view != lab)
        size = np.bincount(holes.ravel())
        fill = size < min_area
        fill[0] = False
        fill[np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))] = False
        view[fill[holes] & (view == 0)] = lab
    ids, first = np.unique(out.ravel(), return_index=True)
    order = ids[ids > 0][np.argsort(first[ids > 0], kind="stable")]
    lut = np.zeros(len(items) + 1, np.int32)
    lut[order] = np.arange(1, order.size + 1)
    return lut[out]


def test_cleanup_in_boxes_equals_the_whole_image_rules(nuclei_sample):
    """records_to_labels works in the masks' boxes only; on the built-in model's dense, overlapping candidates on
    a real image (painting cuts many objects into pieces, clean-up frees pixels that become holes of others) it
    gives exactly the whole-image rules' label image, and records_to_objects gives its objects, tight, in label
    order."""
    from napari_sam.core.amg import AutomaticMaskGenerator
    from napari_sam.core.build import load_model
    from napari_sam.core.labels import paint_objects, records_to_objects

    image = nuclei_sample[0]
    th = dict(pred_iou_thresh=0.3, stability_score_thresh=0.5, box_nms_thresh=1.0)
    recs = AutomaticMaskGenerator(load_model(device="cpu"), points_per_side=16, **th).propose(image).filter(**th)
    assert len(recs) > 50
    for a in (0, 16, 48, 300):
        expected = _whole_image_reference(recs, image.shape[:2], a)
        assert np.array_equal(records_to_labels(recs, image.shape[:2], a), expected), a
        objects = records_to_objects(recs, image.shape[:2], a)
        assert len(objects) == expected.max() and np.array_equal(paint_objects(objects, image.shape[:2]), expected)
        for r, c, patch in objects:
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
