"""Propagation plumbing on a real GoNuclear crop with a random-weight nsam_t (no quality claims here:
benchmarks/eval_propagation.py measures quality with the trained built-in model)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import data_dir, read_image
from napari_sam.core.embedding_store import StackEmbeddings
from napari_sam.core.predictor import SamPredictor
from napari_sam.core.propagation import (
    STRATEGIES,
    interior_point,
    iter_propagate_object,
    make_params,
    mask_box,
    propagate_masks,
    propagate_object,
    repropagate,
    smooth_z,
)

NO_STOP = dict(iou_threshold=0.0, overlap_threshold=0.0, min_area=1, max_regrowth=None, smooth_z=False,
               views="xy")  # no stop rules, no finishing: the XY machinery alone (the views: test_propagation_views)
SEED_ONLY = dict(views="xy", strategy="point", max_slices=0)  # the prompted slice only


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def volume():
    vol = read_image(data_dir("gonuclear_3d_nuclei") / "1135_crop_image.tif")
    return np.ascontiguousarray(vol[40:48, :96, :96])  # (8, 96, 96) uint8


@pytest.fixture(scope="module")
def emb(volume, tiny_model):
    return StackEmbeddings(volume, tiny_model, cache=False).compute_all()


def test_propagate_object_shapes_seed_and_generator(volume, emb, tiny_model):
    mask, scores = propagate_object(volume, 4, points=[[48, 48]], embeddings=emb, strategy="point", **NO_STOP)
    assert mask.shape == (8, 96, 96) and mask.dtype == bool
    assert scores.shape == (8,) and scores.dtype == np.float32
    # the prompted slice is exactly what the predictor gives for that prompt
    pred = SamPredictor(tiny_model)
    pred.set_embedding(emb[4])
    ref = pred.predict(points=np.array([[48.0, 48.0]]), multimask=True)
    k = int(np.argmax(ref.iou))
    assert np.array_equal(mask[4], ref.masks[k]) and scores[4] == pytest.approx(float(ref.iou[k]))
    assert np.isfinite(scores).all() and mask.any(axis=(1, 2)).all()  # no stop rule: every slice
    steps = list(iter_propagate_object(volume, 4, points=[[48, 48]], embeddings=emb, strategy="point", **NO_STOP))
    assert [z for z, _, _ in steps] == [4, 3, 5, 2, 6, 1, 7, 0]  # lock-step, both directions
    for z, m, s in steps:
        assert np.array_equal(m, mask[z]) and s == pytest.approx(float(scores[z]), rel=1e-4)


def test_every_strategy_and_direction(volume, emb):
    seed = propagate_object(volume, 3, points=[[48, 48]], embeddings=emb, **SEED_ONLY)[0][3]
    for strategy in STRATEGIES:
        labels, scores = propagate_masks(volume, [{3: seed}], embeddings=emb, strategy=strategy, max_slices=1,
                                         **NO_STOP)
        assert scores[0, 3] == 1.0 and np.isnan(scores[0, [0, 1, 5, 6, 7]]).all(), strategy
        assert set(np.unique(labels)) <= {0, 1}
    for extra in ({"select": "overlap"}, {"box_extension": 0.2}):
        labels, scores = propagate_masks(volume, [{3: seed}], embeddings=emb, strategy="point_box" if
                                         "box_extension" in extra else "point", max_slices=1, **extra, **NO_STOP)
        assert scores[0, 3] == 1.0 and np.isnan(scores[0, [0, 1, 5, 6, 7]]).all()
    # choosing the candidate by overlap keeps the one closest to the previous slice's mask
    by_iou = propagate_masks(volume, [{3: seed}], embeddings=emb, strategy="point", max_slices=1, **NO_STOP)[0]
    by_overlap = propagate_masks(volume, [{3: seed}], embeddings=emb, strategy="point", max_slices=1,
                                 select="overlap", **NO_STOP)[0]
    for z in (2, 4):
        iou = [float(((lab[z] == 1) & seed).sum() / ((lab[z] == 1) | seed).sum()) for lab in (by_iou, by_overlap)]
        assert iou[1] >= iou[0]
    up = list(iter_propagate_object(volume, 3, points=[[48, 48]], embeddings=emb, strategy="point",
                                    direction="up", **NO_STOP))
    down = list(iter_propagate_object(volume, 3, points=[[48, 48]], embeddings=emb, strategy="point",
                                      direction="down", **NO_STOP))
    assert [z for z, _, _ in up] == [3, 4, 5, 6, 7] and [z for z, _, _ in down] == [3, 2, 1, 0]


def test_uncalibrated_ranking_undoes_the_checkpoints_candidate_bias(volume, emb, tiny_model):
    """select="raw_iou" ranks (and scores) point-prompt candidates as the IoU head did before
    scripts/calibrate_candidates.py added ``candidate_bias`` to it."""
    import torch

    seed = propagate_object(volume, 3, points=[[48, 48]], embeddings=emb, **SEED_ONLY)[0][3]
    run = dict(embeddings=emb, strategy="point", max_slices=2, **NO_STOP)
    ref_labels, ref_scores = propagate_masks(volume, [{3: seed}], **run)
    head = tiny_model.mask_decoder.iou_prediction_head.layers[-1].bias
    saved = getattr(tiny_model, "checkpoint_meta", None)
    try:
        with torch.no_grad():
            head[3] += 10.0  # token 3 = the third candidate: it now always ranks first
        tiny_model.checkpoint_meta = {"candidate_bias": [0.0, 0.0, 10.0]}
        raw_labels, raw_scores = propagate_masks(volume, [{3: seed}], select="raw_iou", **run)
        cal_labels = propagate_masks(volume, [{3: seed}], select="iou", **run)[0]
    finally:
        with torch.no_grad():
            head[3] -= 10.0
        tiny_model.checkpoint_meta = saved
    assert np.array_equal(raw_labels, ref_labels)
    np.testing.assert_allclose(raw_scores, ref_scores, atol=1e-4)
    assert not np.array_equal(cal_labels, ref_labels)  # the bias does change the choice


def test_stop_rules(volume, emb):
    kw = dict(points=[[48, 48]], embeddings=emb, views="xy", strategy="point")
    mask, scores = propagate_object(volume, 4, iou_threshold=1.0, **kw)  # random weights: predicted IoU stays below
    assert mask.any(axis=(1, 2)).tolist() == [False] * 4 + [True] + [False] * 3
    mask, _ = propagate_object(volume, 4, min_area=volume.shape[1] * volume.shape[2] + 1, iou_threshold=0, **kw)
    assert mask.any(axis=(1, 2)).sum() == 1  # "vanished" under min_area
    mask, _ = propagate_object(volume, 4, max_slices=2, **{**NO_STOP, **kw})
    assert mask.any(axis=(1, 2)).tolist() == [False, False, True, True, True, True, True, False]


def test_strategy_defaults_and_bad_parameters():
    from napari_sam.core.propagation import PropagationParams

    default = make_params({})
    assert default == PropagationParams() and default.strategy == "point_raw"  # direct defaults = the strategy's
    assert (default.select, default.iou_threshold, default.overlap_threshold) == ("raw_iou", 0.4, 0.5)
    box = make_params({"strategy": "box_logits"})
    assert (box.select, box.iou_threshold, box.overlap_threshold) == ("iou", 0.6, 0.3)
    assert make_params({"strategy": "box_logits", "iou_threshold": 0.5}).iou_threshold == 0.5
    assert make_params({"strategy": "microsam"}).select == "iou"
    assert make_params({"strategy": "microsam"}).overlap_threshold == 0.5
    assert make_params({"strategy": "microsam"}).iou_threshold == 0.0
    assert make_params({"strategy": "microsam", "overlap_threshold": 0.2}).overlap_threshold == 0.2
    with pytest.raises(TypeError, match="unknown propagation parameter"):
        make_params({"treshold": 0.5})
    with pytest.raises(ValueError, match="unknown strategy"):
        make_params({"strategy": "magic"})
    with pytest.raises(ValueError, match="unknown direction"):
        make_params({"direction": "sideways"})
    with pytest.raises(ValueError, match="unknown select"):
        make_params({"select": "best"})


@pytest.mark.parametrize("bad,match", [
    # each of these propagated nothing, or dropped a stop rule, or failed with a misleading message
    (dict(iou_threshold=5), r"iou_threshold=5 must be a number in \[0, 1\]"),
    (dict(iou_threshold=float("nan")), r"iou_threshold=nan must be a number in \[0, 1\]"),
    (dict(overlap_threshold=float("nan")), r"overlap_threshold=nan must be a number in \[0, 1\]"),
    (dict(overlap_threshold=-0.1), r"overlap_threshold=-0.1 must be"),
    (dict(min_area=-1), "min_area=-1 must be an integer >= 0"), (dict(min_area=2.5), "min_area=2.5 must be"),
    (dict(max_slices=-1), "max_slices=-1 must be an integer >= 0"),
    (dict(box_extension=-5), "box_extension=-5 must be a number >= 0"),
    (dict(box_extension=float("inf")), "box_extension=inf must be a number >= 0"),
])
def test_parameters_out_of_range_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        make_params(bad)
    assert make_params({"max_slices": 0, "min_area": 0, "box_extension": 0.25}).max_slices == 0  # the limits pass


def test_prompt_helpers():
    m = np.zeros((20, 30), bool)
    m[2:9, 5:26] = True
    m[9:15, 5:8] = True  # an L: the interior point must lie inside the thick bar
    assert mask_box(m).tolist() == [2, 5, 14, 25]
    r, c = interior_point(m)
    assert m[int(r), int(c)] and 4 <= r <= 6
    big = np.zeros((400, 400), bool)  # subsampled path: still inside, near the exact maximum
    big[20:220, 30:380] = True
    big[220:390, 30:90] = True
    r, c = interior_point(big)
    exact = interior_point(big, max_side=10_000)
    assert big[int(r), int(c)] and np.abs(np.array([r, c]) - exact).max() <= 8 and abs(exact[0] - 120) <= 1


def test_batched_objects_equal_single_runs(volume, emb):
    first = propagate_object(volume, 2, points=[[30, 30]], embeddings=emb, **SEED_ONLY)[0][2]
    second = propagate_object(volume, 5, points=[[70, 60]], embeddings=emb, **SEED_ONLY)[0][5]
    seeds = [{2: first}, {5: second}]
    labels, scores = propagate_masks(volume, seeds, embeddings=emb, strategy="point_box", **NO_STOP)
    for i, s in enumerate(seeds):
        lab1, sc1 = propagate_masks(volume, [s], embeddings=emb, strategy="point_box", **NO_STOP)
        np.testing.assert_allclose(scores[i], sc1[0], atol=1e-4)
        valid = np.isfinite(sc1[0])
        assert (np.isfinite(scores[i]) == valid).all()
        # where objects do not overlap, the batched pass gives the single run's voxels
        only_i = (lab1 == 1) & ~((labels != 0) & (labels != i + 1))
        agree = np.count_nonzero((labels == i + 1) & only_i) / max(np.count_nonzero(only_i), 1)
        assert agree > 0.99


def test_fill_between_two_prompted_slices_from_both_ends(volume, emb):
    seed1 = propagate_object(volume, 1, points=[[48, 48]], embeddings=emb, **SEED_ONLY)[0][1]
    big6 = propagate_object(volume, 6, points=[[48, 48]], embeddings=emb, **SEED_ONLY)[0][6]
    labels, scores = propagate_masks(volume, [{1: seed1, 6: big6}], embeddings=emb, strategy="point", **NO_STOP)
    assert np.isfinite(scores[0]).all()  # gap 2..5 filled, and outward 0 and 7
    tiny6 = np.zeros_like(seed1)
    tiny6[90:93, 90:93] = True  # a seed the model's masks never overlap with: its end stops at once
    labels, scores = propagate_masks(volume, [{1: seed1, 6: tiny6}], embeddings=emb, views="xy", strategy="point",
                                     overlap_threshold=0.3, iou_threshold=0.0, min_area=1)
    # the lower end went on past the middle (3) up to the slice next to the stopped end
    assert np.isfinite(scores[0, [0, 1, 2, 3, 4, 5, 6]]).all() and np.isnan(scores[0, 7])
    assert labels[6].sum() == 9


def test_repropagation_redoes_only_the_affected_range(volume, emb):
    kw = dict(embeddings=emb, strategy="point", **NO_STOP)
    mask, _ = propagate_object(volume, 4, points=[[48, 48]], **kw)
    corrected = mask[4].copy()
    corrected[:10] = False  # a small correction: the next slices agree with the old ones again
    new, scores, (lo, hi) = repropagate(volume, mask, 4, corrected, converge_iou=0.5, **kw)
    assert (lo, hi) == (3, 5) and np.isnan(scores[[0, 1, 2, 6, 7]]).all()
    assert np.array_equal(new[[0, 1, 2, 6, 7]], mask[[0, 1, 2, 6, 7]]) and np.array_equal(new[4], corrected)
    new, scores, (lo, hi) = repropagate(volume, mask, 4, corrected, converge_iou=1.01, fixed=[1], **kw)
    assert (lo, hi) == (2, 7) and np.array_equal(new[:2], mask[:2])  # never past the prompted slice 1
    assert not np.shares_memory(new, mask)


def test_bad_input(volume, emb, tiny_model):
    with pytest.raises(ValueError, match="2D image"):
        propagate_object(volume[0], 0, points=[[5, 5]], model=tiny_model)
    with pytest.raises(ValueError, match=r"slice z=8 is outside the volume, which has 8 slice\(s\)"):
        propagate_object(volume, 8, points=[[5, 5]], embeddings=emb, views="xy")
    with pytest.raises(ValueError, match="outside the volume"):
        propagate_object(volume, -1, points=[[5, 5]], embeddings=emb, views="xy")
    with pytest.raises(ValueError, match="give a prompt"):
        propagate_object(volume, 2, embeddings=emb, views="xy")
    for pts in ([[2, 22, 22]], [2, 22, 22]):  # (z, row, col): z is its own argument
        with pytest.raises(ValueError, match=r"points are \(row, col\) on slice z; give z on its own"):
            propagate_object(volume, 2, points=pts, embeddings=emb, views="xy")
    with pytest.raises(ValueError, match=r"points must have shape \(N, 2\) or \(B, N, 2\).*got \(1, 4\)"):
        propagate_object(volume, 2, points=[[1, 2, 22, 22]], embeddings=emb, views="xy")
    with pytest.raises(ValueError, match="point_labels has shape"):
        propagate_object(volume, 2, points=[[22, 22], [30, 30]], point_labels=[1], embeddings=emb, views="xy")
    with pytest.raises(ValueError, match="another stack"):
        propagate_object(volume[:, ::-1], 2, points=[[5, 5]], embeddings=emb, views="xy")
    with pytest.raises(ValueError, match="seed mask of object 0 on slice 1 is empty"):
        propagate_masks(volume, [{1: np.zeros((96, 96), bool)}], embeddings=emb, views="xy")


def test_single_slice_and_anisotropic_volumes(volume, tiny_model):
    one = volume[3:4]  # a one-slice "volume": the prompted slice only, no error
    mask, scores = propagate_object(one, 0, points=[[48, 48]], model=tiny_model, strategy="point", **NO_STOP)
    assert mask.shape == (1, 96, 96) and np.isfinite(scores).all()
    flat = np.ascontiguousarray(volume[2:5, ::1, ::3])  # 3 thin slices, 96 x 32 pixels
    mask, scores = propagate_object(flat, 1, points=[[48, 16]], model=tiny_model, strategy="point", **NO_STOP)
    assert mask.shape == (3, 96, 32) and np.isfinite(scores).all()


def test_confidence_text_and_write_plan():
    from napari_sam.core.propagation_labels import confidence_text, plan_write, seeds_from_labels

    s = np.array([np.nan, 0.9, 1.0, 0.2, np.nan, 0.5, np.nan], np.float32)
    assert confidence_text(3, s) == "label 3: z 1–5, lowest 0.20 at z 3\n▇█▂·▅"
    assert confidence_text(3, np.full(4, np.nan)) == "label 3: not propagated"
    labels = np.zeros((3, 4, 4), np.uint16)
    labels[1, :2, :2] = 5  # object 5 seeded on slice 1
    labels[2, 0, 0] = 7  # another object's voxel on slice 2
    labels[2, 3, 3] = 5  # a stale voxel of object 5 on slice 2
    ids, seeds = seeds_from_labels(labels, 1)
    assert ids == [5] and np.array_equal(seeds[0][1], labels[1] == 5)
    with pytest.raises(ValueError, match=r"label\(s\) \[9\] are not on slice 1"):
        seeds_from_labels(labels, 1, [9])
    new = np.zeros((4, 4), bool)
    new[:2, :2] = True
    (z, r, c), v = plan_write(labels, [5], {0: {2: new}})
    out = labels.copy()
    out[z, r, c] = v
    assert out[2, 0, 0] == 7 and out[2, 3, 3] == 0  # kept the other object, cleared the stale voxel
    assert np.count_nonzero(out[2] == 5) == 3
    (z, r, c), v = plan_write(labels, [5], {0: {2: new}}, overwrite=True)
    out[z, r, c] = v
    assert out[2, 0, 0] == 5


def test_z_smoothing_exact_reference():
    a = np.zeros((3, 5), bool)
    a[1, 1:4] = True
    b = np.zeros((3, 5), bool)
    b[1, 2:5] = True
    b[0, 0] = True  # a one-slice speck
    c = a.copy()
    out = smooth_z({0: a, 1: b, 2: c}, keep=[2])
    assert np.array_equal(out[0], a & b)  # slice -1 is missing: 2 of (a, b) needed
    assert np.array_equal(out[1], (a.astype(int) + b + c) >= 2) and not out[1][0, 0]
    assert out[2] is c  # a prompted slice stays as it is
    assert smooth_z({0: a, 1: ~a & b}) == {}  # nothing two neighbouring slices agree on


def test_propagate_object_and_masks_finish_with_z_smoothing(volume, emb):
    raw, raw_scores = propagate_object(volume, 4, points=[[48, 48]], embeddings=emb, views="xy", strategy="point",
                                       iou_threshold=0.0, overlap_threshold=0.0, min_area=1, smooth_z=False)
    sm, scores = propagate_object(volume, 4, points=[[48, 48]], embeddings=emb, views="xy", strategy="point",
                                  iou_threshold=0.0, overlap_threshold=0.0, min_area=1)
    ref = smooth_z({z: raw[z] for z in range(8) if raw[z].any()}, keep=[4])
    assert all(np.array_equal(sm[z], ref.get(z, np.zeros_like(raw[z]))) for z in range(8))
    assert np.array_equal(np.isfinite(scores), [z in ref for z in range(8)])
    labels, _ = propagate_masks(volume, [{4: raw[4]}], embeddings=emb, views="xy", strategy="point", iou_threshold=0.0,
                                overlap_threshold=0.0, min_area=1)
    assert np.array_equal(labels == 1, sm)


class _DiskPredictor:
    """Exact reference for the stop rules: on slice z it returns a disk of radius RADII[z] around (32, 32)."""

    RADII = {0: 9, 1: 5, 2: 6, 3: 8, 4: 10, 5: 8, 6: 6, 7: 9, 8: 12}

    def __init__(self):
        self.z, self.model = None, None
        yy, xx = np.mgrid[:64, :64]
        self.dist = np.hypot(yy - 32, xx - 32)

    def set_embedding(self, z):
        self.z = z

    def predict(self, points=None, point_labels=None, box=None, mask_input=None, multimask=True):
        from napari_sam.core.predictor import Prediction

        b = len(points)
        m = np.broadcast_to(self.dist <= self.RADII[self.z], (b, 3, 64, 64))
        return Prediction(m, np.full((b, 3), 0.9, np.float32), np.zeros((b, 3, 16, 16), np.float32))


def test_regrowth_stop_exact_reference():
    """From slice 4 (radius 10) the disk narrows both ways, then grows back: with max_regrowth 0.5 each direction
    stops at the first slice whose area exceeds 1.5x its smallest since the widest, once it has narrowed to 1 / 1.5
    of the widest (z 7: r 9 vs r 6; z 0: r 9 vs r 5). From slice 1 (r 5, near an end) the disk grows to r 10 at z 4:
    that is no regrowth; it narrows to r 6 at z 6 and grows back at z 7. Down, z 0 (r 9) only grows: kept."""
    from napari_sam.core.propagation import _seed_tracks, iter_tracks

    pred = _DiskPredictor()

    def run(z=4, **kw):
        p = make_params({"strategy": "point", "iou_threshold": 0.0, "overlap_threshold": 0.0, **kw})
        tracks = _seed_tracks(0, {z: (pred.dist <= pred.RADII[z], None)}, 9, (1, -1))
        return sorted(z for _o, z, _m, _s in iter_tracks(pred, list(range(9)), tracks, p, p.spec()))

    assert run(max_regrowth=0.5) == [1, 2, 3, 5, 6]
    assert run(max_regrowth=None) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert run(max_regrowth=1.5) == [1, 2, 3, 5, 6, 7]  # up: r 9 vs 6 is 2.25x (kept), r 12 vs 6 4x; down: 3.2x
    assert run(z=1, max_regrowth=0.5) == [0, 2, 3, 4, 5, 6]
    assert run(z=1, max_regrowth=None) == [0, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="max_regrowth"):
        make_params({"max_regrowth": -1})


def test_split_by_span_keeps_objects_that_reach_other_slices_apart():
    from napari_sam.core.propagation_labels import split_by_span

    labels = np.zeros((4, 6, 6), np.uint16)
    labels[1, :2, :2] = 3  # on slice 1 alone
    labels[1, 3:, 3:] = 7
    labels[3, 0, 0] = 7  # 7 also on slice 3
    labels[1, 0, 5] = 9
    labels[0, 5, 5] = 9  # 9 also on slice 0
    labels[2, 2, 2] = 4  # not on slice 1 at all
    assert split_by_span(labels, 1) == ([3], [7, 9])
    assert split_by_span(labels, 2) == ([4], [])
    assert split_by_span(labels[1:2], 0) == ([3, 7, 9], [])


def _plan_dense(labels, ids, results, overwrite=False):
    """The write plan as it was made on full (Y, X) masks, a whole slice at a time (the reference for patches)."""
    zs, rows, cols, vals = [], [], [], []
    for z in sorted({z for r in results.values() for z in r}):
        old = labels[z]
        new = old.copy()
        masks = [(lab, results.get(i, {}).get(z)) for i, lab in enumerate(ids)]
        for lab, m in masks:
            if m is not None:
                new[(old == lab) & ~m] = 0
        claimed = np.zeros(old.shape, bool)
        for lab, m in masks:
            if m is not None:
                w = m & ((new == 0) | (new == lab) | (overwrite & ~claimed)) & ~claimed
                new[w] = lab
                claimed |= w
        r, c = np.nonzero(new != old)
        zs.append(np.full(r.shape, z))
        rows.append(r)
        cols.append(c)
        vals.append(new[r, c])
    return (np.concatenate(zs), np.concatenate(rows), np.concatenate(cols)), np.concatenate(vals)


@pytest.fixture(scope="module")
def nuclei():
    """GoNuclear crop 1135's ground-truth nuclei, slices 40-55 (real 3D objects, touching each other)."""
    return read_image(data_dir("gonuclear_3d_nuclei") / "1135_crop_label.tif")[40:56].astype(np.int32)


def test_patches_hold_exactly_the_masks(nuclei):
    from napari_sam.core.propagation_labels import from_patch, paste, patch_box, to_patch

    for lab in np.unique(nuclei[5])[1:]:
        m = nuclei[5] == lab
        r0, c0, p = to_patch(m)
        rows, cols = np.nonzero(m)
        assert (r0, c0, p.shape) == (rows.min(), cols.min(), (np.ptp(rows) + 1, np.ptp(cols) + 1))
        assert np.array_equal(from_patch((r0, c0, p), m.shape), m) and p.sum() == m.sum()
        assert patch_box((r0, c0, p)) == (r0, c0, r0 + p.shape[0], c0 + p.shape[1])
        assert np.array_equal(paste((r0, c0, p), (10, 20, 60, 90)), m[10:60, 20:90])  # clipped to a box
    r0, c0, p = to_patch(np.zeros((7, 9), bool))
    assert p.shape == (0, 0) and patch_box((r0, c0, p)) is None and not from_patch((r0, c0, p), (7, 9)).any()


def test_smoothing_patches_equals_full_masks(nuclei):
    """smooth_patches / finish_patches give exactly smooth_z / finish_slices on real nuclei (several touching
    objects' slices as one flickering object, so the majority adds and removes pixels), scores included."""
    from napari_sam.core.propagation import finish_patches, finish_slices, smooth_patches
    from napari_sam.core.propagation_labels import from_patch, to_patch

    labs = [lab for lab in np.unique(nuclei[8])[1:] if (nuclei == lab).sum() > 500][:4]
    assert len(labs) == 4
    for k, lab in enumerate(labs):
        # object k: nucleus lab, on odd slices joined by its neighbour in the list (flicker between slices)
        full = {z: (nuclei[z] == lab) | ((nuclei[z] == labs[(k + 1) % 4]) & (z % 2 == 1))
                for z in range(nuclei.shape[0])}
        full = {z: m for z, m in full.items() if m.any()}
        patches = {z: to_patch(m) for z, m in full.items()}
        ref = smooth_z(full, keep=[8])
        got = smooth_patches(patches, keep=[8])
        assert sorted(got) == sorted(ref)
        assert all(np.array_equal(from_patch(got[z], nuclei.shape[1:]), ref[z]) for z in ref)
        seeds = {8: full[8]}
        prop = {z: m for z, m in full.items() if z != 8}
        s_ref, s_got = np.linspace(0.1, 1, 16, dtype=np.float32), np.linspace(0.1, 1, 16, dtype=np.float32)
        ref = finish_slices(seeds, prop, s_ref)
        got = finish_patches(seeds, {z: patches[z] for z in prop}, s_got)
        assert sorted(got) == sorted(ref) and np.array_equal(s_got, s_ref, equal_nan=True)
        assert all(np.array_equal(from_patch(got[z], nuclei.shape[1:]), ref[z]) for z in ref)


@pytest.mark.parametrize("overwrite", [False, True])
def test_write_plan_of_patches_equals_full_masks(nuclei, overwrite):
    """plan_write with patches gives exactly the plan made on full masks (voxels, order, values): real nuclei
    moved and grown so that they take background, each other's and other objects' voxels, and one slice cleared."""
    from scipy import ndimage

    from napari_sam.core.propagation_labels import plan_write, to_patch

    ids = [lab for lab in np.unique(nuclei[3])[1:] if (nuclei[3] == lab).sum() > 200][:3]
    results = {}
    for i, lab in enumerate(ids):
        results[i] = {}
        for z in range(nuclei.shape[0]):
            m = ndimage.binary_dilation(np.roll(nuclei[z] == lab, (i + 1) * 3, axis=1), iterations=2)
            if m.any():
                results[i][z] = m
    results[0][7] = np.zeros(nuclei.shape[1:], bool)  # object 0 cleared on slice 7
    ref_index, ref_values = _plan_dense(nuclei, ids, results, overwrite)
    index, values = plan_write(nuclei, ids, {i: {z: to_patch(m) for z, m in r.items()} for i, r in results.items()},
                               overwrite)
    assert ref_values.size > 1000 and (ref_values == 0).any() and len(set(ref_values.tolist())) >= 3
    assert all(np.array_equal(a, b) for a, b in zip(index, ref_index)) and np.array_equal(values, ref_values)
    assert values.dtype == nuclei.dtype
    index, values = plan_write(nuclei, ids, results, overwrite)  # full masks still work
    assert all(np.array_equal(a, b) for a, b in zip(index, ref_index)) and np.array_equal(values, ref_values)


def test_repropagate_patches_is_repropagate(volume, emb):
    """The patch form of a re-propagation gives exactly the slices of the full one, and no full mask."""
    from napari_sam.core.propagation import repropagate_patches
    from napari_sam.core.propagation_labels import from_patch, to_patch

    kw = dict(embeddings=emb, strategy="point", **NO_STOP)
    mask, _ = propagate_object(volume, 4, points=[[48, 48]], **kw)
    corrected = mask[4].copy()
    corrected[:10] = False
    for extra in (dict(converge_iou=0.5), dict(converge_iou=1.01, fixed=[1]), dict(iou_threshold=0.99)):
        new, scores, rng = repropagate(volume, mask, 4, corrected, **(kw | extra))
        got, got_scores, got_rng = repropagate_patches(volume, {z: to_patch(mask[z]) for z in range(8)}, 4,
                                                       corrected, **(kw | extra))
        assert got_rng == rng and np.array_equal(got_scores, scores, equal_nan=True)
        assert all(isinstance(p, tuple) for p in got.values())
        out = mask.copy()
        for z, p in got.items():
            out[z] = from_patch(p, mask.shape[1:])
        assert np.array_equal(out, new)
