"""Evaluation protocol: centre points, error clicks and mIoU bookkeeping on real labels, with an oracle
predictor (exact masks) giving IoU 1 and a degraded one giving the exact expected IoU."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_sam.core.evaluation import (EvalResult, center_point, error_click, evaluate_image, instance_ids,
                                        markdown_table)
from napari_sam.core.predictor import Prediction


class OraclePredictor:
    """Predictor-like object answering every prompt with the true instance under it (from the labels).

    ``erode`` > 0 returns masks eroded by that many pixels (a known, imperfect answer)."""

    def __init__(self, labels: np.ndarray, erode: int = 0):
        self.labels, self.erode = labels, erode
        self.calls = []

    def set_image(self, image):
        assert image.shape[:2] == self.labels.shape

    def _mask(self, inst: int) -> np.ndarray:
        m = self.labels == inst
        return ndimage.binary_erosion(m, iterations=self.erode) if self.erode else m

    def predict(self, points=None, point_labels=None, box=None, mask_input=None, multimask=True, mask_windows=None):
        self.calls.append((None if points is None else np.array(points), box, mask_input is not None))
        if points is not None:
            first = np.asarray(points)[:, 0].astype(int)  # the first (centre) point names the object
            ids = self.labels[first[:, 0], first[:, 1]]
        else:
            b = np.asarray(box).astype(int)
            ids = np.array([np.bincount(self.labels[r0:r1 + 1, c0:c1 + 1].ravel())[1:].argmax() + 1
                            for r0, c0, r1, c1 in b])
        k = 3 if multimask else 1
        masks = np.stack([np.stack([self._mask(i)] * k) for i in ids])
        iou = np.tile(np.linspace(0.9, 0.8, k), (len(ids), 1))
        return Prediction(masks, iou, np.zeros((len(ids), k, 4, 4), np.float32))


def test_center_point_is_the_distance_transform_maximum(nuclei_sample):
    _, labels = nuclei_sample
    for i in instance_ids(labels)[:15]:
        m = labels == i
        r, c = center_point(m)
        dt = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        assert m[r, c] and dt[r, c] == dt.max()


def test_error_click_targets_the_largest_error_region(nuclei_sample):
    _, labels = nuclei_sample
    ids = instance_ids(labels)
    gt = labels == ids[0]
    other = labels == ids[1]
    # a prediction missing the object's lower half and adding a whole other (larger) nucleus
    pred = gt.copy()
    rows = np.nonzero(gt.any(1))[0]
    pred[rows[len(rows) // 2]:] = False
    missed = gt & ~pred
    big_extra = other if other.sum() > missed.sum() else np.zeros_like(other)
    (r, c), lab = error_click(pred | big_extra, gt)
    if big_extra.any():
        assert big_extra[r, c] and lab == 0
    else:
        assert missed[r, c] and lab == 1
    (r, c), lab = error_click(pred, gt)
    assert missed[r, c] and lab == 1
    (r, c), lab = error_click(gt, gt)  # perfect: a positive click at the centre
    assert (r, c) == center_point(gt) and lab == 1


def test_oracle_predictor_scores_iou_one_for_every_prompt(nuclei_sample):
    image, labels = nuclei_sample
    pred = OraclePredictor(labels)
    res = evaluate_image(pred, image, labels, n_clicks=3, chunk=7)
    n = len(instance_ids(labels))
    assert res["point"].shape == (n,) and res["box"].shape == (n,) and res["clicks"].shape == (n, 3)
    for k in ("point", "oracle", "box", "clicks"):
        assert np.all(res[k] == 1.0), k
    # click rounds pass the previous logits and one more point each round
    click_calls = [c for c in pred.calls if c[2]]
    assert [c[0].shape[1] for c in click_calls[:2]] == [2, 3]


def test_click_rounds_follow_the_models_refine_setting(nuclei_sample):
    """Without refinement (the built-in model's setting) no click round gets logits; the clicks are the same."""
    from types import SimpleNamespace

    image, labels = nuclei_sample
    calls = {}
    for name, refine, model in (("model off", None, SimpleNamespace(refine_logits=False)),
                                ("forced off", False, None), ("default on", None, None)):
        pred = OraclePredictor(labels, erode=1)
        if model is not None:
            pred.model = model
        res = evaluate_image(pred, image, labels, prompts=("clicks",), n_clicks=3, max_objects=5, refine=refine)
        assert res["clicks"].shape == (5, 3)
        calls[name] = pred.calls
    for name in ("model off", "forced off"):
        assert not any(c[2] for c in calls[name]), name
        assert [c[0].tolist() for c in calls[name]] == [c[0].tolist() for c in calls["default on"]]
    assert sum(c[2] for c in calls["default on"]) == 2  # both click rounds of the one chunk


def test_enforced_negative_clicks_cut_what_the_model_ignores(nuclei_sample):
    """A predictor answering every prompt with its object grown by 3 px (negative clicks ignored): the model alone
    stays flat; the annotator's protocol cuts the mask at each negative click, exactly as the annotator does."""
    from napari_sam.core.annotation import enforce_negative_points

    class Grown(OraclePredictor):
        def _mask(self, inst):
            return ndimage.binary_dilation(self.labels == inst, iterations=3)

    image, labels = nuclei_sample
    res = {e: evaluate_image(Grown(labels), image, labels, prompts=("clicks",), n_clicks=3, max_objects=6,
                             enforce_negatives=e)["clicks"] for e in (False, True)}
    np.testing.assert_array_equal(res[True][:, 0], res[False][:, 0])  # the first click: nothing to enforce
    assert np.all(res[False] == res[False][:, :1])
    assert np.all(res[True][:, 1:] != res[False][:, 1:])
    # round 2 exactly: the grown mask cut at the first error click (the ring's centre, a negative click)
    i = instance_ids(labels, 6)[0]
    gt, grown = labels == i, ndimage.binary_dilation(labels == i, iterations=3)
    (r, c), v = error_click(grown, gt)
    assert v == 0
    cut = enforce_negative_points(grown, np.array([center_point(gt), (r, c)], np.float64), np.array([1, 0]))
    assert res[True][0, 1] == pytest.approx((cut & gt).sum() / (cut | gt).sum())


def test_degraded_predictor_gives_the_exact_iou_and_a_summary(nuclei_sample):
    image, labels = nuclei_sample
    res = evaluate_image(OraclePredictor(labels, erode=1), image, labels, prompts=("box",), max_objects=10)
    ids = instance_ids(labels, 10)
    expected = [(ndimage.binary_erosion(labels == i)).sum() / (labels == i).sum() for i in ids]
    np.testing.assert_allclose(res["box"], expected)
    er = EvalResult("dsb", 5)
    er.add("a", "fluo", res)
    s = er.summary()
    assert s["all"]["box"] == pytest.approx(np.mean(expected), abs=1e-4) and s["all"]["objects"] == 10
    assert "| dsb | fluo | 1 | 10 |" in markdown_table([s])


def test_bad_input_is_rejected(nuclei_sample):
    image, labels = nuclei_sample
    with pytest.raises(ValueError, match="does not match"):
        evaluate_image(OraclePredictor(labels), image, labels[:-1])
    with pytest.raises(ValueError, match="unknown prompt"):
        evaluate_image(OraclePredictor(labels), image, labels, prompts=("lasso",))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_clicks=0), "n_clicks=0 must be an integer >= 1"), (dict(n_clicks=-1), "n_clicks=-1 must be"),
    (dict(n_clicks=2.5), "n_clicks=2.5 must be an integer"), (dict(chunk=0), "chunk=0 must be an integer >= 1"),
    (dict(max_objects=0), "max_objects=0 must be"), (dict(max_objects=-1), "max_objects=-1 must be"),
    (dict(prompts="lasso"), r"unknown prompt type\(s\) \['lasso'\]"),
])
def test_bad_arguments_are_named(nuclei_sample, kwargs, match):
    image, labels = nuclei_sample
    with pytest.raises(ValueError, match=match):
        evaluate_image(OraclePredictor(labels), image, labels, **kwargs)


def test_float_labels_are_refused_not_scored(nuclei_sample):
    image, labels = nuclei_sample
    # labels + 0.5 would make the background (0.5) an "object" scored like the others
    with pytest.raises(ValueError, match="labels must be integers.*float64"):
        evaluate_image(OraclePredictor(labels), image, labels + 0.5, prompts=("box",))
    res = evaluate_image(OraclePredictor(labels), image, labels.astype(np.uint16), prompts=("box",), max_objects=4)
    np.testing.assert_array_equal(res["box"], np.ones(4))


def test_one_prompt_as_a_string_is_that_prompt(nuclei_sample):
    image, labels = nuclei_sample
    one = evaluate_image(OraclePredictor(labels, erode=1), image, labels, prompts="box", max_objects=5)
    ref = evaluate_image(OraclePredictor(labels, erode=1), image, labels, prompts=("box",), max_objects=5)
    assert one["box"].shape == (5,) and one["point"].size == 0
    np.testing.assert_array_equal(one["box"], ref["box"])


def test_center_point_of_an_empty_mask_is_refused():
    with pytest.raises(ValueError, match="mask is empty"):
        center_point(np.zeros((8, 8), bool))


def _one_image_folder(tmp_path, tiny_model, nuclei_sample):
    """(folder, checkpoint): the real sample image and its labels as ``a_image.png`` / ``a_label.tif``, and the
    random-weight model saved as a checkpoint file."""
    import tifffile
    from imageio.v3 import imwrite

    from napari_sam.core.build import save_checkpoint

    image, labels = nuclei_sample
    data = tmp_path / "data"
    data.mkdir()
    imwrite(data / "a_image.png", image)
    tifffile.imwrite(data / "a_label.tif", labels)
    return data, save_checkpoint(tiny_model, tmp_path / "random.pt")


def test_cli_train_and_evaluate_on_a_folder(tmp_path, tiny_model, nuclei_sample):
    """Plumbing of ``napari-sam train`` (2 decoder-only steps) and ``napari-sam evaluate`` on a real image."""
    import json

    from napari_sam.cli import main
    from napari_sam.core.build import load_model

    data, ck = _one_image_folder(tmp_path, tiny_model, nuclei_sample)
    assert main(["train", "--images", str(data), "--model", str(ck), "--mode", "decoder", "--steps", "2",
                 "--objects", "3", "--out", str(tmp_path / "run"), "--log-every", "1"]) == 0
    tuned = load_model(tmp_path / "run" / "final.pt")
    assert tuned.checkpoint_meta["step"] == 2 and "napari-sam" in tuned.checkpoint_meta["command"]
    out = tmp_path / "res.json"
    assert main(["evaluate", "--images", str(data), "--model", str(tmp_path / "run" / "final.pt"), "--prompt", "box",
                 "point", "--max-objects", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["all"]["objects"] == 3 and 0 <= res["all"]["box"] <= 1 and "clicks" not in res["all"]
    assert out.with_suffix(".md").read_text().startswith("| data set |")
    assert res["zoom_window"] is None  # a random-weight model has none
    for flag in ("--steps", "--log-every", "--objects"):  # no training run starts on a count that is not > 0
        assert main(["train", "--images", str(data), "--model", str(ck), "--mode", "decoder", flag, "0",
                     "--out", str(tmp_path / "bad")]) == 2
        assert not (tmp_path / "bad").exists()
    assert main(["evaluate", "--images", str(data), "--model", str(ck), "--prompt", "box", "--max-objects", "3",
                 "--zoom-window", "128", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["zoom_window"] == 128
    assert main(["evaluate", "--images", str(tmp_path / "missing"), "--model", str(ck), "--out", str(out)]) == 2


def test_cli_evaluate_keeps_the_images_done_when_one_fails(tmp_path, tiny_model, nuclei_sample, capsys):
    """An image that fails midway (here the third, whose labels do not match it) leaves the results of the ones
    before it in <out>.partial.json / .md, marked incomplete; --out itself is not written."""
    import json

    import tifffile
    from imageio.v3 import imwrite

    from napari_sam.cli import main

    data, ck = _one_image_folder(tmp_path, tiny_model, nuclei_sample)
    imwrite(data / "b_image.png", nuclei_sample[0])
    tifffile.imwrite(data / "b_label.tif", nuclei_sample[1])
    imwrite(data / "c_image.png", nuclei_sample[0])
    tifffile.imwrite(data / "c_label.tif", nuclei_sample[1][:-1])
    out = tmp_path / "res" / "r.json"
    assert main(["evaluate", "--images", str(data), "--model", str(ck), "--prompt", "box", "--max-objects", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    partial = tmp_path / "res" / "r.partial.json"
    assert f"the 2 image(s) done so far are in {partial}" in err and "c_label.tif has shape" in err
    assert not out.exists()
    res = json.loads(partial.read_text())
    assert res["all"]["images"] == 2 and res["all"]["objects"] == 4 and 0 <= res["all"]["box"] <= 1
    assert res["incomplete"].startswith("stopped after 2 image(s), at the one after 'b_image': c_label.tif has shape")
    assert "**Incomplete**" in partial.with_suffix(".md").read_text()


def test_cli_train_stops_on_sigterm_saves_and_resumes(tmp_path, tiny_model, nuclei_sample):
    """A cluster's time limit or ``kill`` sends SIGTERM: ``napari-sam train`` finishes its step, saves last.pt and
    final.pt, says how to resume and exits 1; the same command resumes from that step."""
    import os
    import signal
    import subprocess
    import sys

    from napari_sam.core.build import load_model

    data, ck = _one_image_folder(tmp_path, tiny_model, nuclei_sample)
    cmd = [sys.executable, "-m", "napari_sam", "train", "--images", str(data), "--model", str(ck), "--mode",
           "decoder", "--objects", "3", "--out", str(tmp_path / "run"), "--log-every", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, "--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stdout:  # wait for the first logged step
        if line.startswith('{"step"'):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "SIGTERM" in err and "run the same command to resume" in err and "Traceback" not in err
    step = load_model(tmp_path / "run" / "final.pt").checkpoint_meta["step"]
    assert 1 <= step < 100000 and (tmp_path / "run" / "last.pt").is_file()
    out = subprocess.run([*cmd, "--steps", str(step + 1)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and f"resumed from {tmp_path / 'run'}/last.pt at step {step}" in out.stdout
    assert load_model(tmp_path / "run" / "final.pt").checkpoint_meta["step"] == step + 1
