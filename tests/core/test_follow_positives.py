"""Positive clicks the model leaves out are retried with a box (``core.annotation.follow_positive_points``): which
masks qualify, the exact box and prompts of the retry, the annotator's ``predict`` and the evaluation protocol, and
on real ``val`` nuclei with the built-in model, fewer left-out clicks and better masks after the second click."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import data_dir
from napari_sam.core.annotation import (Prompts, enforce_negative_points, follow_positive_points, left_out_positives,
                                        predict)
from napari_sam.core.evaluation import center_point, error_click, evaluate_image, instance_ids
from napari_sam.core.predictor import Prediction

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _disc(shape, center, radius):
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


class NearFirstClick:
    """Predictor-like: a point prompt gets the part of the true instance (under the first point) within ``radius`` of
    the first point, whatever the other points say; with a box it gets the instance inside the box. Records calls."""

    def __init__(self, labels: np.ndarray, radius: float = 3.0):
        self.labels, self.radius, self.calls = labels, radius, []

    def set_image(self, image):
        assert image.shape[:2] == self.labels.shape

    def predict(self, points=None, point_labels=None, box=None, mask_input=None, multimask=True, mask_windows=None,
                return_logits=False):
        single = np.ndim(points) == 2
        pts = np.asarray(points, np.float64).reshape(((1,) if single else (-1,)) + np.shape(points)[-2:])
        boxes = None if box is None else np.asarray(box, np.float64).reshape(-1, 4)
        self.calls.append(dict(points=pts, labels=np.asarray(point_labels).reshape(len(pts), -1), box=boxes,
                               mask_input=mask_input, mask_windows=mask_windows, multimask=multimask))
        out = []
        for j, p in enumerate(pts):
            first = tuple(np.rint(p[0]).astype(int))
            inst = self.labels == self.labels[first]
            if boxes is None:
                m = inst & _disc(self.labels.shape, first, self.radius)
            else:
                r0, c0, r1, c1 = np.rint(boxes[j]).astype(int)
                m = np.zeros_like(inst)
                m[r0: r1 + 1, c0: c1 + 1] = inst[r0: r1 + 1, c0: c1 + 1]
            out.append(m)
        k = 3 if multimask else 1
        masks = np.stack([np.stack([m] * k) for m in out])
        iou = np.full((len(out), k), 0.5, np.float32) + (box is not None) * 0.25
        low = np.full((len(out), k, 4, 4), 1.0 if box is not None else -1.0, np.float32)
        wins = np.tile(np.array([0, 0, *self.labels.shape]), (len(out), 1))
        if single:
            return Prediction(masks[0], iou[0], low[0], wins[0])
        return Prediction(masks, iou, low, wins)


def test_left_out_positives_flags_only_masks_missing_a_positive_point():
    masks = np.zeros((4, 20, 20), bool)
    masks[:, 5:10, 5:10] = True
    points = np.array([[[7, 7], [15, 15]],    # positive point outside: flagged
                       [[7, 7], [8, 8]],      # both inside
                       [[7, 7], [15, 15]],    # the outside one is negative
                       [[7, 7], [25, 25]]], np.float64)  # the outside one is off the image: not counted
    labels = np.array([[1, 1], [1, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(left_out_positives(masks, points, labels), [True, False, False, False])


def test_the_retry_box_spans_the_mask_the_previous_mask_and_the_positive_points():
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:30] = 1
    pred = NearFirstClick(labels)
    points = np.array([[[20, 20], [12, 27], [35, 35]], [[20, 20], [21, 21], [35, 35]]], np.float64)
    lab = np.array([[1, 1, 0], [1, 1, 0]])
    masks = np.stack([_disc(labels.shape, (20, 20), 3)] * 2)
    previous = np.zeros_like(masks)
    previous[0, 16:23, 14:18] = True
    mask_input = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    wins = np.array([[0, 0, 40, 40], [1, 1, 39, 39]])
    rows, again = follow_positive_points(pred, points, lab, masks, previous, mask_input, wins)
    np.testing.assert_array_equal(rows, [0])  # object 1 keeps both its positive points
    call = pred.calls[-1]
    # the disc spans rows/cols 17..23; the previous mask reaches row 16 and col 14; the positive click (12, 27);
    # the negative click (35, 35) does not count
    np.testing.assert_array_equal(call["box"], [[12, 14, 23, 27]])
    np.testing.assert_array_equal(call["points"], points[:1])
    np.testing.assert_array_equal(call["labels"], lab[:1])
    np.testing.assert_array_equal(call["mask_input"], mask_input[:1])
    np.testing.assert_array_equal(call["mask_windows"], wins[:1])
    assert call["multimask"] is False and again.masks.shape == (1, 1, 40, 40)
    box_only = np.zeros_like(labels, bool)
    box_only[12:24, 14:28] = True
    np.testing.assert_array_equal(again.masks[0, 0], box_only & (labels == 1))
    # nothing left out: no decoder call
    n = len(pred.calls)
    rows, again = follow_positive_points(pred, points[1:], lab[1:], masks[1:])
    assert len(rows) == 0 and again is None and len(pred.calls) == n


def test_predict_retries_a_left_out_positive_point_unless_told_not_to():
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:30] = 1
    labels[10:30, 30:36] = 2
    pred = NearFirstClick(labels)
    first = predict(pred, Prompts([[20, 20]], [1]))
    prompts = Prompts([[20, 20], [12, 27], [20, 32]], [1, 1, 0])
    raw = predict(pred, prompts, follow_positives=False, previous=first.mask)
    assert not raw.mask[12, 27] and pred.calls[-1]["box"] is None  # the model alone leaves the click out
    res = predict(pred, prompts, previous=first.mask)
    assert pred.calls[-1]["box"] is not None
    assert res.mask[12, 27] and res.iou[0] == pytest.approx(0.75) and np.all(res.logits == 1.0)
    # the retry's box spans the first mask and both positive points; the negative point still cuts its piece
    box = np.zeros_like(labels, bool)
    box[12:24, 17:28] = True
    np.testing.assert_array_equal(res.mask, enforce_negative_points(box & (labels == 1), prompts.points,
                                                                    prompts.labels))
    # a box of the user's is never replaced, and a lone point keeps its three candidates
    n = len(pred.calls)
    predict(pred, Prompts([[20, 20], [12, 27]], [1, 1], boxes=[[18, 18, 22, 22]]))
    predict(pred, Prompts([[20, 20]], [1]))
    assert len(pred.calls) == n + 2


def test_the_annotator_protocol_retries_left_out_clicks(nuclei_sample):
    """The click protocol with a predictor that follows only the first click: the model alone stays flat; with
    ``follow_positives`` the second round is exactly the instance inside the retry's box."""
    image, labels = nuclei_sample
    pred = NearFirstClick(labels)
    res = {f: evaluate_image(pred, image, labels, prompts=("clicks",), n_clicks=3, max_objects=6,
                             follow_positives=f)["clicks"] for f in (False, True)}
    np.testing.assert_array_equal(res[True][:, 0], res[False][:, 0])
    assert np.all(res[False] == res[False][:, :1])
    assert np.all(res[True][:, 1] > res[False][:, 1])
    i = instance_ids(labels, 6)[0]
    gt = labels == i
    c = center_point(gt)
    first = gt & _disc(labels.shape, c, 3)
    (r, cc), v = error_click(first, gt)
    assert v == 1
    rr, ccs = np.nonzero(first)
    r0, r1 = min(rr.min(), c[0], r), max(rr.max(), c[0], r)
    c0, c1 = min(ccs.min(), c[1], cc), max(ccs.max(), c[1], cc)
    want = np.zeros_like(gt)
    want[r0: r1 + 1, c0: c1 + 1] = gt[r0: r1 + 1, c0: c1 + 1]
    assert res[True][0, 1] == pytest.approx((want & gt).sum() / (want | gt).sum())


def test_builtin_model_follows_more_second_clicks_on_real_nuclei():
    """The built-in model on real ``val`` nuclei: the second click, at the centre of the first mask's largest error,
    is left out less often with the retry, and the masks after it are better."""
    from napari_sam.core.build import load_model
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.training.data import read_array, read_split

    d = data_dir("dsb2018_full")
    pred = SamPredictor(load_model(device="cpu"))
    left, ious = {False: 0, True: 0}, {False: [], True: []}
    n_pos = 0
    for row in read_split(d / "split.csv", "val")[:12]:
        image = read_array(d / "images" / f"{row['id']}.png")[..., :3]
        labels = read_array(d / "labels" / f"{row['id']}.tif")
        pred.set_image(image)
        for i in instance_ids(labels, 8):
            gt = labels == i
            c = center_point(gt)
            first = predict(pred, Prompts([c], [1]))
            click, v = error_click(first.mask, gt)
            if v != 1:
                continue
            n_pos += 1
            for follow in (False, True):
                r = predict(pred, Prompts([c, click], [1, 1]), follow_positives=follow, previous=first.mask)
                left[follow] += int(not r.mask[click])
                ious[follow].append((r.mask & gt).sum() / (r.mask | gt).sum())
    print(f"{n_pos} positive second clicks: left out {left[False]} -> {left[True]}, "
          f"mIoU {np.mean(ious[False]):.3f} -> {np.mean(ious[True]):.3f}")
    assert n_pos >= 20
    assert left[True] < 0.5 * left[False]
    assert np.mean(ious[True]) > np.mean(ious[False]) + 0.02
