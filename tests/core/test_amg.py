"""AutomaticMaskGenerator / segment_everything API on real images with a random-weight model (plumbing only):
record fields, live re-filtering equal to a fresh run, bad input, cancel and progress."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam import AutomaticMaskGenerator, segment_everything
from napari_sam.core.amg import Cancelled
from napari_sam.core.labels import records_to_labels

# random weights predict IoUs near 0: thresholds at 0 let every candidate through
OPEN = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def image(nuclei_sample):
    return nuclei_sample[0]


@pytest.fixture(scope="module")
def proposals(tiny_model, image):
    return AutomaticMaskGenerator(tiny_model, **OPEN).propose(image)


def test_records_are_consistent(tiny_model, image):
    recs = AutomaticMaskGenerator(tiny_model, box_nms_thresh=1.0, **OPEN).generate(image)
    assert len(recs) > 1
    h, w = image.shape[:2]
    for r in recs:
        seg = r["segmentation"]
        assert seg.shape == (h, w) and seg.dtype == bool
        rows, cols = np.nonzero(seg)
        assert r["area"] == rows.size > 0
        assert r["bbox"] == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)  # max exclusive
        assert 0 <= r["point"][0] < h and 0 <= r["point"][1] < w
        assert r["crop_box"] == (0, 0, h, w)
        assert 0.0 <= r["stability_score"] <= 1.0
    ious = [r["predicted_iou"] for r in recs]
    assert ious == sorted(ious, reverse=True)  # NMS order: best first


@pytest.mark.parametrize("th", [dict(box_nms_thresh=0.5), dict(box_nms_thresh=0.9, min_mask_region_area=200)])
def test_refilter_equals_a_fresh_run(tiny_model, image, proposals, th):
    kept = proposals.filter(pred_iou_thresh=0.0, stability_score_thresh=0.0, **th)
    fresh = AutomaticMaskGenerator(tiny_model, **OPEN, **th).generate(image)
    assert len(kept) == len(fresh) >= 1
    for a, b in zip(kept, fresh):
        assert a["bbox"] == b["bbox"] and a["area"] == b["area"]
        assert np.array_equal(a["segmentation_patch"].full(image.shape[:2]), b["segmentation"])


def test_decoder_sub_batches_do_not_change_the_outputs(tiny_model, image, proposals, monkeypatch):
    """The decoder runs in cache-sized sub-batches (amg.DECODER_BYTES); one point per sub-batch gives the same
    candidates (up to float rounding) and the same masks as the default."""
    import napari_sam.core.amg as amg

    monkeypatch.setattr(amg, "DECODER_BYTES", 1)
    one = AutomaticMaskGenerator(tiny_model, **OPEN).propose(image)
    for a, b in zip(one.crops, proposals.crops, strict=True):
        np.testing.assert_allclose(a.iou, b.iou, atol=1e-5)
        assert np.array_equal(a.points, b.points)
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    ra, rb = one.filter(**kw), proposals.filter(**kw)
    assert len(ra) == len(rb) > 1
    same = [np.array_equal(x["segmentation_patch"].full(image.shape[:2]), y["segmentation_patch"].full(image.shape[:2]))
            for x, y in zip(ra, rb)]
    assert np.mean(same) >= 0.98


def test_thresholds_drop_candidates(proposals):
    iou = np.concatenate([c.iou for c in proposals.crops])
    cut = float(np.median(iou))
    all_recs = proposals.filter(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    some = proposals.filter(pred_iou_thresh=max(cut, 1e-6), stability_score_thresh=0.0, box_nms_thresh=1.0)
    assert len(some) < len(all_recs)
    assert all(r["predicted_iou"] > cut for r in some)


def test_segment_everything_labels(tiny_model, image, proposals):
    lab = segment_everything(image, tiny_model, **OPEN, box_nms_thresh=1.0, min_object_area=0)
    assert lab.shape == image.shape[:2] and lab.dtype == np.int32
    recs = proposals.filter(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    assert np.array_equal(lab, records_to_labels(recs, image.shape[:2]))
    assert lab.max() > 1
    assert set(np.unique(lab)) - {0} == set(range(1, int(lab.max()) + 1))  # sequential ids


def test_constant_image_gives_empty_labels(tiny_model):
    const = np.full((64, 80), 7, dtype=np.uint16)
    assert AutomaticMaskGenerator(tiny_model, **OPEN).generate(const) == []
    lab = segment_everything(const, tiny_model, **OPEN)
    assert lab.shape == (64, 80) and not lab.any()


def test_image_smaller_than_crops(tiny_model, image):
    small = image[:12, :10]
    gen = AutomaticMaskGenerator(tiny_model, crop_n_layers=1, points_per_side=2, pred_iou_thresh=0.0,
                                 stability_score_thresh=0.0)
    recs = gen.generate(small)
    for r in recs:
        assert r["segmentation"].shape == (12, 10)
        r0, c0, r1, c1 = r["crop_box"]
        assert 0 <= r0 < r1 <= 12 and 0 <= c0 < c1 <= 10


@pytest.mark.parametrize("bad,word", [
    (dict(points_per_side=0), "points_per_side"), (dict(pred_iou_thresh=1.5), "pred_iou_thresh"),
    (dict(box_nms_thresh=-0.1), "box_nms_thresh"), (dict(crop_n_layers=-1), "crop_n_layers"),
    (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"), (dict(points_per_batch=0), "points_per_batch"),
    (dict(min_mask_region_area=-5), "min_mask_region_area"), (dict(stability_score_offset=-1), "offset"),
    (dict(points_per_side=None), "point_grids"), (dict(points_per_side=2.5), "points_per_side"),
    # point_grids: a list of non-empty (N, 2) grids in [0, 1] (they were reshaped or gave no masks, silently)
    (dict(point_grids=[np.full((4, 3), 0.5)]), r"point_grids\[0\] has shape \(4, 3\).*\(N, 2\)"),
    (dict(point_grids=[np.zeros((0, 2))]), r"point_grids\[0\] has shape \(0, 2\).*non-empty"),
    (dict(point_grids=[np.full((4, 2), 1.5)]), r"point_grids\[0\] has values outside \[0, 1\]"),
    (dict(point_grids=[np.full((4, 2), np.nan)]), r"point_grids\[0\] has values outside \[0, 1\] \(or NaN"),
    (dict(point_grids=np.full((4, 2), 0.5)), r"one array of shape \(4, 2\); pass a list"),
    (dict(point_grids=[]), "point_grids has 0 grid"),
])
def test_bad_parameters(tiny_model, bad, word):
    if "point_grids" in bad:
        bad = dict(bad, points_per_side=None)
    with pytest.raises(ValueError, match=word):
        AutomaticMaskGenerator(tiny_model, **bad)


def test_point_grids_equal_the_grid_of_points_per_side(tiny_model, image):
    from napari_sam.core.amg_utils import build_all_layer_point_grids

    grids = [g.tolist() for g in build_all_layer_point_grids(6, 0, 1)]  # lists are fine too
    gen = AutomaticMaskGenerator(tiny_model, **{**OPEN, "points_per_side": None}, point_grids=grids)
    ref = AutomaticMaskGenerator(tiny_model, **OPEN)
    assert np.array_equal(gen.point_grids[0], ref.point_grids[0])
    assert [r["bbox"] for r in gen.generate(image)] == [r["bbox"] for r in ref.generate(image)]


@pytest.mark.parametrize("area", [float("nan"), 2.7, -1, "16"])
def test_min_object_area_must_be_a_whole_number(tiny_model, area):
    with pytest.raises(ValueError, match=f"min_object_area={area!r} must be an integer >= 0"):
        segment_everything(np.zeros((16, 16), np.uint8), tiny_model, **OPEN, min_object_area=area)


def test_min_object_area_as_a_whole_float_is_that_number(tiny_model, image):
    a = segment_everything(image, tiny_model, **OPEN, min_object_area=40.0)
    assert np.array_equal(a, segment_everything(image, tiny_model, **OPEN, min_object_area=40))


def test_bad_images(tiny_model):
    gen = AutomaticMaskGenerator(tiny_model, **OPEN)
    with pytest.raises(ValueError, match="2D"):
        gen.generate(np.zeros((3, 32, 32, 5)))
    with pytest.raises(ValueError, match="NaN"):
        gen.generate(np.full((16, 16), np.nan))


def test_progress_and_cancel(tiny_model, image):
    gen = AutomaticMaskGenerator(tiny_model, points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0,
                                 stability_score_thresh=0.0)
    seen = []
    gen.propose(image, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(16, 64), (32, 64), (48, 64), (64, 64)]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        gen.propose(image, cancel=cancel)


def test_large_images_are_tiled(tiny_model, image):
    seen = []
    lab = segment_everything(image, tiny_model, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                             max_untiled=128, tile_size=128, halo=32, progress=lambda d, t: seen.append((d, t)))
    assert lab.shape == image.shape[:2] and lab.max() >= 1
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 x 2 tiles of the 256 x 256 image
    with pytest.raises(ValueError, match="halo"):
        segment_everything(image, tiny_model, halo=0)


def test_recommended_thresholds_come_from_the_checkpoint():
    """The built-in checkpoint stores segment-everything thresholds tuned on its val data; for_model (used by
    segment_everything, the CLI and the widget) starts from them, the plain constructor keeps the reference's."""
    from napari_sam.core.amg import REFERENCE_THRESHOLDS, recommended_thresholds
    from napari_sam.core.build import build_sam, builtin_checkpoint_path, load_model

    if not builtin_checkpoint_path().is_file():
        pytest.skip(f"the built-in model {builtin_checkpoint_path()} does not exist")
    model = load_model()
    rec = recommended_thresholds(model)
    assert rec == recommended_thresholds(None) and rec != REFERENCE_THRESHOLDS
    assert set(rec) == set(REFERENCE_THRESHOLDS)
    assert AutomaticMaskGenerator(model).thresholds()["pred_iou_thresh"] == 0.88
    gen = AutomaticMaskGenerator.for_model(model, stability_score_thresh=0.9)
    assert gen.pred_iou_thresh == rec["pred_iou_thresh"] and gen.box_nms_thresh == rec["box_nms_thresh"]
    assert gen.stability_score_thresh == 0.9  # what the caller sets wins
    assert recommended_thresholds(build_sam("nsam_t")) == REFERENCE_THRESHOLDS  # no metadata: the reference's


def test_recommended_crop_layers_come_from_the_checkpoint(tiny_model):
    """A checkpoint can store generator settings beside its thresholds (``amg_settings``); for_model builds its point
    grids with them unless the caller says otherwise. The built-in model stores 0 crop layers: one was tried (val
    F1 0.734 vs 0.645) and not adopted (first 24 test images 0.641 vs 0.667, with 5 model views per image); it
    stores part / merge resolution and its learned candidate scorer on and the label clean-up's min_object_area, all
    tuned on val."""
    from napari_sam.core.amg import recommended_settings
    from napari_sam.core.build import builtin_checkpoint_path

    if builtin_checkpoint_path().is_file():
        assert recommended_settings(None) == {"crop_n_layers": 0, "resolve_parts": 1, "rescore": 1,
                                                 "min_object_area": 16}
    tiny_model.checkpoint_meta = {"amg_settings": {"crop_n_layers": 1, "resolve_parts": 1, "min_object_area": 30}}
    try:
        assert recommended_settings(tiny_model) == {"crop_n_layers": 1, "resolve_parts": 1, "min_object_area": 30}
        gen = AutomaticMaskGenerator.for_model(tiny_model)
        assert gen.crop_n_layers == 1 and len(gen.point_grids) == 2 and gen.pred_iou_thresh == 0.88
        assert gen.resolve_parts and gen.thresholds()["resolve_parts"]
        assert not AutomaticMaskGenerator.for_model(tiny_model, resolve_parts=False).resolve_parts
        plain = AutomaticMaskGenerator.for_model(tiny_model, crop_n_layers=0)
        assert plain.crop_n_layers == 0 and len(plain.point_grids) == 1
        ref = AutomaticMaskGenerator(tiny_model)  # the constructor keeps the reference's
        assert ref.crop_n_layers == 0 and not ref.resolve_parts
    finally:
        del tiny_model.checkpoint_meta
