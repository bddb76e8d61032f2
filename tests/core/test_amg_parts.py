"""Part / whole resolution of a segment-everything mask set (``resolve_parts``), on real ground-truth nuclei and on
the built-in model's proposals for a real image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_sam.core.amg_proposals import PART_CONTAINED, Mask, resolve_parts_of
from napari_sam.core.labels import records_to_labels


def _mask(full: np.ndarray) -> Mask:
    r, c = np.nonzero(full)
    box = np.array([r.min(), c.min(), r.max(), c.max()], np.int64)
    return Mask(box, full[box[0]: box[2] + 1, box[1]: box[3] + 1].copy())


def _records(masks):
    return [{"segmentation_patch": _mask(m), "predicted_iou": 0.9} for m in masks]


def _resolved(masks):
    keep = resolve_parts_of([_mask(m) for m in masks])
    return [m for m, k in zip(masks, keep) if k], keep


def _objects(gt):
    return [gt == i for i in np.unique(gt) if i > 0]


def _close_pair(gt):
    """Two distinct nuclei whose 3-px dilations touch, the larger first."""
    objs = _objects(gt)
    for i, a in enumerate(objs):
        grown = ndimage.binary_dilation(a, iterations=3)
        for b in objs[i + 1:]:
            if (grown & ndimage.binary_dilation(b, iterations=3)).any():
                return (a, b) if a.sum() >= b.sum() else (b, a)
    raise AssertionError("the sample has no two nearby nuclei")


def test_a_part_of_a_nucleus_is_dropped(nuclei_sample):
    gt = nuclei_sample[1]
    objs = _objects(gt)
    big = max(objs, key=np.sum)
    rr, cc = np.nonzero(big)
    part = big & (np.arange(gt.shape[0])[:, None] < np.median(rr))  # its upper half: a piece of it
    masks = objs + [part]
    # painted as they are, the part takes its pixels from the nucleus: one nucleus becomes two objects
    assert records_to_labels(_records(masks), gt.shape).max() == len(objs) + 1
    kept, keep = _resolved(masks)
    assert keep.tolist() == [True] * len(objs) + [False]
    lab = records_to_labels(_records(kept), gt.shape)
    assert lab.max() == len(objs) and np.array_equal(lab > 0, gt > 0)


def test_a_merge_of_two_nuclei_is_dropped(nuclei_sample):
    gt = nuclei_sample[1]
    objs = _objects(gt)
    a, b = _close_pair(gt)
    merge = ndimage.binary_closing(a | b, iterations=3) | a | b  # one mask over both, bridged
    kept, keep = _resolved([merge] + objs)
    assert keep.tolist() == [False] + [True] * len(objs)
    lab = records_to_labels(_records(kept), gt.shape)
    assert lab.max() == len(objs) and np.array_equal(lab > 0, gt > 0)


def test_a_lone_mask_inside_a_larger_one_is_a_part(nuclei_sample):
    """One mask inside a larger one (or several covering less than half of it) is read as a part of the larger."""
    gt = nuclei_sample[1]
    a, b = _close_pair(gt)
    grown = ndimage.binary_dilation(a, iterations=6)
    assert _resolved([grown, a])[1].tolist() == [True, False]
    # a mask that only half lies inside (below PART_CONTAINED) is not a part: both stay
    rr, _ = np.nonzero(a)
    shifted = np.roll(a, int(np.ptp(rr)) + 1, axis=0)
    assert 0 < (shifted & grown).sum() < PART_CONTAINED * shifted.sum()
    assert _resolved([grown, shifted])[1].tolist() == [True, True]
    # disjoint masks are all kept, in any order
    objs = _objects(gt)
    assert _resolved(objs)[1].all() and _resolved(objs[::-1])[1].all()


def test_nested_merges_and_parts_resolve_from_the_largest(nuclei_sample):
    """A merge over a nucleus and its part: the merge goes (two masks inside it cover it), then the part goes."""
    gt = nuclei_sample[1]
    a, b = _close_pair(gt)
    merge = ndimage.binary_closing(a | b, iterations=3) | a | b
    rr, _ = np.nonzero(a)
    part = a & (np.arange(gt.shape[0])[:, None] < np.median(rr))
    kept, keep = _resolved([merge, a, b, part])
    assert keep.tolist() == [False, True, True, False]


def test_the_pipeline_applies_it(tiny_model, nuclei_sample):
    """filter(resolve_parts=True) = the reference's filter, then resolve_parts_of; segment_everything passes it on and
    cleans with the model's recommended min_object_area."""
    from napari_sam.core.amg import AutomaticMaskGenerator, segment_everything

    image = nuclei_sample[0]
    opened = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    props = AutomaticMaskGenerator(tiny_model, **opened).propose(image)
    plain = props.filter(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    keep = resolve_parts_of([r["segmentation_patch"] for r in plain])
    assert 0 < keep.sum() < len(plain)  # random weights give nested masks: some go
    resolved = props.filter(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, resolve_parts=True)
    assert [r["bbox"] for r in resolved] == [r["bbox"] for r, k in zip(plain, keep) if k]
    tiny_model.checkpoint_meta = {"amg_settings": {"min_object_area": 30}}
    try:
        lab = segment_everything(image, tiny_model, resolve_parts=True, **opened)
    finally:
        del tiny_model.checkpoint_meta
    assert np.array_equal(lab, records_to_labels(resolved, image.shape[:2], 30))


@pytest.fixture(scope="module")
def large_nuclei():
    """The first two `val` images of dsb2018_full at 360x360 px: large, textured fluorescence nuclei."""
    import csv

    from conftest import data_dir, read_image

    d = data_dir("dsb2018_full")
    with open(d / "split.csv", newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f) if r["split"] == "val" and r["height"] == "360"][:2]
    return [(read_image(d / "images" / f"{i}.png")[..., :3], read_image(d / "labels" / f"{i}.tif")) for i in ids]


def test_built_in_model_on_large_nuclei(large_nuclei, one_torch_thread):
    """With the built-in model, a grid of points on large textured nuclei gives pieces of them besides the whole
    nuclei. Resolving parts leaves no kept mask inside another and raises instance F1@0.5 against the ground truth
    (held-out `val` images, the split the setting was chosen on)."""
    import sys
    from pathlib import Path

    from napari_sam.core.amg import AutomaticMaskGenerator, recommended_thresholds
    from napari_sam.core.build import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from eval_amg import match_stats, summarize

    model = load_model(device="cpu")
    gen = AutomaticMaskGenerator(model)
    th = recommended_thresholds(model)
    stats = {False: [], True: []}
    for image, gt in large_nuclei:
        props = gen.propose(image, iou_floor=th["pred_iou_thresh"], stability_floor=th["stability_score_thresh"])
        for parts in stats:
            recs = props.filter(**th, resolve_parts=parts)
            stats[parts].append(match_stats(gt, records_to_labels(recs, gt.shape, 48)))
            if parts:
                masks = [r["segmentation_patch"] for r in recs]
                assert resolve_parts_of(masks).all()  # nothing left to resolve
    f1 = {k: summarize(v)["F1@0.5"] for k, v in stats.items()}
    assert f1[True] > f1[False] + 0.1, f1
