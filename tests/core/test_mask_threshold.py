"""The mask threshold (the logit above which a pixel is in a mask): a per-model setting stored in the checkpoint
(the built-in model's chosen on ``val`` by scripts/choose_threshold.py; the paper's 0 otherwise), read by
``load_model``, overridable, carried through save / fine-tune, and what every mask is binarised at."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_setting_loads_saves_and_overrides(tmp_path, tiny_model):
    from napari_sam.core.build import (builtin_checkpoint_path, load_model, read_checkpoint, save_checkpoint,
                                       set_mask_threshold)

    meta = read_checkpoint(builtin_checkpoint_path())[2]
    assert "choose_threshold.py" in meta["mask_threshold_source"]
    assert load_model(device="cpu").mask_threshold == meta["mask_threshold"] > 0
    assert load_model(device="cpu", mask_threshold=0).mask_threshold == 0.0
    assert tiny_model.mask_threshold == 0.0  # built in code: the reference's
    path = save_checkpoint(tiny_model, tmp_path / "plain.pt")
    assert "mask_threshold" not in read_checkpoint(path)[2] and load_model(path, device="cpu").mask_threshold == 0
    set_mask_threshold(tiny_model, 0.75)
    try:
        assert read_checkpoint(save_checkpoint(tiny_model, tmp_path / "t.pt"))[2]["mask_threshold"] == 0.75
        assert load_model(tmp_path / "t.pt", device="cpu").mask_threshold == 0.75
    finally:
        set_mask_threshold(tiny_model, 0.0)
    for bad in ("high", None, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="mask_threshold=.* must be a"):
            set_mask_threshold(tiny_model, bad)


def test_masks_are_the_logits_above_the_threshold():
    """On a real nucleus image, every prompt's bool mask is exactly its logits above the model's threshold, and a
    higher threshold gives nested, smaller masks."""
    from napari_sam.core.build import load_model, set_mask_threshold
    from napari_sam.core.evaluation import center_point, instance_ids
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.training.data import read_array, read_split

    d = data_dir("dsb2018_full")
    rid = read_split(d / "split.csv", "val")[0]["id"]
    image, labels = read_array(d / "images" / f"{rid}.png")[..., :3], read_array(d / "labels" / f"{rid}.tif")
    pts = np.array([[center_point(labels == i)] for i in instance_ids(labels, 6)], np.float64)
    model = load_model(device="cpu")
    pred = SamPredictor(model)
    pred.set_image(image)
    areas = []
    for t in (0.0, model.mask_threshold, 2.0):
        set_mask_threshold(model, t)
        kw = dict(points=pts, point_labels=np.ones(pts.shape[:2]), multimask=True)
        masks, logits = pred.predict(**kw).masks, pred.predict(**kw, return_logits=True).masks
        np.testing.assert_array_equal(masks, logits > t)
        areas.append(masks.sum((2, 3)))
        if len(areas) > 1:
            assert (areas[-1] <= areas[-2]).all() and (areas[-1] < areas[-2]).any()


def test_cli_evaluate_follows_the_model_and_the_flag(tmp_path):
    """``napari-sam evaluate`` on real nuclei: the built-in model binarises at its own threshold by default (the same
    numbers as passing it), ``--mask-threshold 0`` gives the paper's masks and other numbers; the JSON records it."""
    from napari_sam.cli import main
    from napari_sam.core.build import checkpoint_meta

    d = data_dir("stardist_dsb2018_2d")
    t = checkpoint_meta()["mask_threshold"]
    out = {}
    for flag in (None, str(t), "0"):
        path = tmp_path / f"{flag}.json"
        extra = [] if flag is None else ["--mask-threshold", flag]
        assert main(["evaluate", "--images", str(d), "--prompt", "box", "--max-objects", "6", "--threads", "1",
                     *extra, "--out", str(path)]) == 0
        out[flag] = json.loads(path.read_text())
    assert out[None]["mask_threshold"] == t and out["0"]["mask_threshold"] == 0.0
    assert out[None]["all"]["box"] == out[str(t)]["all"]["box"] != out["0"]["all"]["box"]


def test_finetuned_models_keep_the_threshold(tmp_path):
    """Fine-tuning starts from ``load_model``, so the tuned checkpoint keeps the base model's threshold."""
    from napari_sam.core.build import load_model, read_checkpoint, save_checkpoint
    from napari_sam.core.training.trainer import make_model

    model = make_model("builtin", "decoder", "cpu")
    assert model.mask_threshold == load_model(device="cpu").mask_threshold > 0
    path = save_checkpoint(model, tmp_path / "tuned.pt")
    assert read_checkpoint(path)[2]["mask_threshold"] == model.mask_threshold
