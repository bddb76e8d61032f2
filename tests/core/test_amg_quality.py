"""The learned candidate scorer of segment-everything (``rescore``): its features, its fit, its storage, and, with
the built-in model on held-out real images, that it estimates each candidate's true IoU better than the decoder's
IoU head and that thresholding by it keeps exactly what it scores above the threshold."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from napari_sam.core.amg import AutomaticMaskGenerator
from napari_sam.core.amg_quality import (
    DEFAULT_FLOORS, FEATURES, CandidateScorer, candidate_features, candidate_scorer, fit_candidate_scorer,
    scored_candidates, true_iou,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split_images(split: str, n: int):
    """The first ``n`` 256x256 images of a dsb2018_full split (split.csv order) and their instance labels."""
    from conftest import data_dir, read_image

    d = data_dir("dsb2018_full")
    with open(d / "split.csv", newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f) if r["split"] == split and r["height"] == "256"][:n]
    return [(read_image(d / "images" / f"{i}.png")[..., :3], read_image(d / "labels" / f"{i}.tif")) for i in ids]


@pytest.fixture(scope="module")
def builtin():
    from napari_sam.core.build import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module")
def val_proposals(builtin):
    """The built-in model's candidates (at its scorer's floors) for 3 held-out `val` images, with ground truth."""
    gen = AutomaticMaskGenerator(builtin, rescore=True)
    return [(gen.propose(image), gt) for image, gt in _split_images("val", 3)]


def _data(props_gt):
    """Features, true IoU and the IoU head's prediction of the candidates the scorer judges (the benchmark's own
    function, which fits and reports the shipped scorer)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from eval_amg import scorer_data

    return scorer_data(props_gt)


def test_the_built_in_model_has_a_scorer_and_recommends_it(builtin):
    from napari_sam.core.amg import recommended_settings

    scorer = candidate_scorer(builtin)
    assert scorer is not None and "train" in scorer.source
    assert scorer.floors == DEFAULT_FLOORS
    assert recommended_settings(builtin).get("rescore") == 1
    assert AutomaticMaskGenerator.for_model(builtin).rescore
    assert not AutomaticMaskGenerator.for_model(builtin, rescore=False).rescore
    assert not AutomaticMaskGenerator(builtin).rescore  # the plain constructor keeps the reference's behaviour


def test_scorer_estimates_true_iou_better_than_the_iou_head(val_proposals):
    """On held-out images, the mean squared error against each candidate's IoU with its best ground-truth nucleus
    is far lower for the learned estimate than for the decoder's predicted IoU."""
    x, y, head = _data(val_proposals)
    assert len(y) > 1000 and x.shape == (len(y), len(FEATURES)) and np.isfinite(x).all()
    est = val_proposals[0][0].scorer(x)
    mse_scorer, mse_head = float(((est - y) ** 2).mean()), float(((head - y) ** 2).mean())
    assert mse_scorer < 0.5 * mse_head, (mse_scorer, mse_head)
    # and it ranks: candidates it scores high are mostly real nuclei
    top = est > 0.7
    assert top.sum() > 50 and (y[top] > 0.5).mean() > 0.9


def test_features_are_what_they_say(val_proposals):
    pr, gt = val_proposals[0]
    crop = pr.crops[0]
    idx = scored_candidates(crop, DEFAULT_FLOORS)
    x = candidate_features(crop, idx, pr.maps())
    col = {k: x[:, i] for i, k in enumerate(FEATURES)}
    assert np.array_equal(col["predicted_iou"], crop.iou[idx].astype(np.float64))
    area = np.array([crop.mask(int(i)).area for i in idx])
    assert np.allclose(col["log_area"], np.log(area + 1))
    assert set(np.unique(col["point_inside"])) <= {0.0, 1.0} and col["point_inside"].mean() > 0.5
    assert (col["log_votes_0.8"] >= 0).all() and (col["log_votes_0.6"] >= col["log_votes_0.8"]).all()
    # the ranks of a point's candidates are 0, 1, ... by predicted IoU
    pts = crop.points[idx]
    for p in np.unique(pts, axis=0)[:50]:
        sel = (pts == p).all(1)
        ranks = col["rank_at_point"][sel]
        assert sorted(ranks) == list(range(sel.sum()))
        assert np.argmin(ranks) == np.argmax(col["predicted_iou"][sel])
    # intensity: the image's z-scored mean inside a mask, on the image itself
    z = pr.maps()[0]
    m = crop.mask(int(idx[0]))
    r0, c0, r1, c1 = m.box
    assert col["inside_intensity"][0] == pytest.approx(float(z[r0:r1 + 1, c0:c1 + 1][m.patch].mean()), rel=1e-5)
    # fluorescence nuclei are brighter than their surroundings: good candidates have positive contrast
    good = true_iou([crop.mask(int(i)) for i in idx], gt) > 0.7
    assert (col["contrast"][good] > 0).mean() > 0.9


def test_rescore_thresholds_and_ranks_by_the_scorer(val_proposals):
    pr, _ = val_proposals[1]
    q = pr.quality(0)
    assert q.shape == (len(pr.crops[0]),) and q.dtype == np.float32 and ((q >= 0) & (q <= 1)).all()
    # no suppression, no stability filter beyond the floor: exactly the candidates scored above the threshold
    recs = pr.filter(pred_iou_thresh=0.6, stability_score_thresh=0.0, box_nms_thresh=1.0, rescore=True)
    assert len(recs) == int((q > 0.6).sum()) > 0
    assert all(r["predicted_iou"] > 0.6 for r in recs)
    assert sorted(r["predicted_iou"] for r in recs) == sorted(q[q > 0.6].tolist())
    # with NMS, the kept masks are those the scorer ranks first (not the decoder's IoU head)
    plain = pr.filter(pred_iou_thresh=0.6, stability_score_thresh=0.0, box_nms_thresh=0.3)
    rescored = pr.filter(pred_iou_thresh=0.6, stability_score_thresh=0.0, box_nms_thresh=0.3, rescore=True)
    assert {r["point"] + r["bbox"] for r in plain} != {r["point"] + r["bbox"] for r in rescored}
    assert pr.quality(0) is q  # computed once


def test_fit_on_real_candidates_beats_the_iou_head(builtin):
    """A scorer fitted on two `train` images' candidates estimates their true IoU better than the IoU head; the
    fitted scorer survives a checkpoint round trip (weights_only load) exactly."""
    gen = AutomaticMaskGenerator(builtin, pred_iou_thresh=0.3, stability_score_thresh=0.5)
    x, y, head = _data([(gen.propose(image), gt) for image, gt in _split_images("train", 2)])
    scorer = fit_candidate_scorer(x, y, epochs=150)
    assert float(((scorer(x) - y) ** 2).mean()) < 0.5 * float(((head - y) ** 2).mean())
    buf = io.BytesIO()
    torch.save({"amg_quality": scorer.state()}, buf)
    buf.seek(0)
    again = CandidateScorer(torch.load(buf, weights_only=True)["amg_quality"])
    assert np.array_equal(again(x), scorer(x)) and again.floors == scorer.floors


def test_bad_input_gives_clear_errors(tiny_model, nuclei_sample, builtin):
    with pytest.raises(ValueError, match="rescore=True needs a candidate scorer"):
        AutomaticMaskGenerator(tiny_model, rescore=True)
    props = AutomaticMaskGenerator(tiny_model, points_per_side=4, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0).propose(nuclei_sample[0])
    with pytest.raises(ValueError, match="rescore needs a candidate scorer"):
        props.filter(pred_iou_thresh=0.0, stability_score_thresh=0.0, rescore=True)
    state = candidate_scorer(builtin).state()
    with pytest.raises(ValueError, match="fit it again"):
        CandidateScorer({**state, "features": state["features"][:-1]})
    with pytest.raises(ValueError, match="features"):
        fit_candidate_scorer(np.zeros((10, 3)), np.zeros(10))
    with pytest.raises(ValueError, match="not finite"):
        fit_candidate_scorer(np.full((10, len(FEATURES)), np.nan), np.zeros(10))


def test_constant_image_and_plumbing_on_random_weights(tiny_model, nuclei_sample, builtin):
    """Any model can carry a scorer (here the built-in one's, on a random-weight model): a constant image gives no
    masks, and rescoring runs end to end."""
    from napari_sam.core.amg import segment_everything

    state = candidate_scorer(builtin).state()  # judging every candidate: random weights predict IoUs near 0
    tiny_model.checkpoint_meta = {"amg_quality": {**state, "floors": {k: 0.0 for k in state["floors"]}}}
    try:
        gen = AutomaticMaskGenerator(tiny_model, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                     box_nms_thresh=1.0, rescore=True)
        assert gen.generate(np.full((64, 80), 7, np.uint8)) == []
        assert segment_everything(np.full((64, 80), 7, np.uint8), gen).max() == 0
        props = gen.propose(nuclei_sample[0])
        q = props.quality(0)
        with_mask = np.array([props.crops[0].mask(i) is not None for i in range(len(q))])
        scored = np.zeros(len(q), dtype=bool)
        scored[scored_candidates(props.crops[0], gen.scorer.floors)] = True  # (predicted IoU > 0: the floor)
        assert scored.sum() > 0 and ((q > 0) == scored).all() and not (scored & ~with_mask).any()
        recs = props.filter(**gen.thresholds())
        assert sorted(r["predicted_iou"] for r in recs) == sorted(q[with_mask].tolist())
        labels = segment_everything(nuclei_sample[0], gen)
        assert labels.shape == nuclei_sample[0].shape[:2] and labels.max() > 0
    finally:
        del tiny_model.checkpoint_meta


def test_intensity_features_equal_scipy_morphology(nuclei_sample):
    """The ring (square dilation by RING px, outside the mask) and boundary (4-neighbour erosion) the intensity
    features use, computed with shifted arrays, equal scipy.ndimage's on real nuclei, also at the image border."""
    from scipy import ndimage

    from napari_sam.core.amg_proposals import Mask
    from napari_sam.core.amg_quality import RING, _intensity_features, image_maps
    from napari_sam.core.image import to_rgb_uint8

    image, gt = nuclei_sample
    z, grad = image_maps(to_rgb_uint8(image).mean(-1))
    objs = [gt == i for i in np.unique(gt)[1:]]
    border = [o for o in objs if o[0].any() or o[:, 0].any() or o[-1].any() or o[:, -1].any()]
    assert border
    for full in objs[:20] + border:
        rr, cc = np.nonzero(full)
        box = np.array([rr.min(), cc.min(), rr.max(), cc.max()])
        got = _intensity_features(Mask(box, full[box[0]:box[2] + 1, box[1]:box[3] + 1]), z, grad)
        ring = ndimage.binary_dilation(full, structure=np.ones((3, 3)), iterations=RING) & ~full
        edge = full & ~ndimage.binary_erosion(np.pad(full, 1))[1:-1, 1:-1]
        want = (z[full].mean(), z[ring].mean(), z[full].std(), grad[edge].mean())
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
