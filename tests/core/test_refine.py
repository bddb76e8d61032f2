"""Whether corrective clicks are refined with the previous mask's logits: a per-model setting stored in the
checkpoint (the built-in model's, chosen on ``val`` by scripts/choose_refine.py, is off), read by ``load_model``,
overridable, and followed by the click protocol of ``napari-sam evaluate``."""

from __future__ import annotations

import json

import pytest

from conftest import data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_setting_loads_saves_and_overrides(tmp_path, tiny_model):
    model = tiny_model
    from napari_sam.core.build import (builtin_checkpoint_path, load_model, read_checkpoint, refine_logits_of,
                                       save_checkpoint, set_refine_logits)

    meta = read_checkpoint(builtin_checkpoint_path())[2]
    assert meta["refine_logits"] is False and "choose_refine.py" in meta["refine_logits_source"]
    assert refine_logits_of(load_model(device="cpu")) is False
    assert refine_logits_of(load_model(device="cpu", refine_logits=True)) is True
    assert refine_logits_of(model) is True  # built in code: the reference's behaviour
    path = save_checkpoint(model, tmp_path / "plain.pt")
    assert "refine_logits" not in read_checkpoint(path)[2] and refine_logits_of(load_model(path, device="cpu"))
    set_refine_logits(model, False)
    try:
        assert read_checkpoint(save_checkpoint(model, tmp_path / "off.pt"))[2]["refine_logits"] is False
        assert refine_logits_of(load_model(tmp_path / "off.pt", device="cpu")) is False
    finally:
        set_refine_logits(model, True)
    for bad in ("no", 0, None):
        with pytest.raises(ValueError, match="refine_logits must be True or False"):
            set_refine_logits(model, bad)


def test_cli_evaluate_follows_the_model_and_the_flag(tmp_path):
    """``napari-sam evaluate`` on real EM slices: the built-in model's clicks without logits by default, the
    same numbers as ``--refine off``, and other numbers with ``--refine on``; the JSON records the setting."""
    from napari_sam.cli import main

    d = data_dir("isbi2012_em_neurites_2d")
    out = {}
    for flag in ("model", "off", "on"):
        path = tmp_path / f"{flag}.json"
        assert main(["evaluate", "--images", str(d), "--prompt", "clicks", "--clicks", "3", "--max-objects", "4",
                     "--threads", "1", "--refine", flag, "--out", str(path)]) == 0
        out[flag] = json.loads(path.read_text())
    assert out["model"]["refine_logits"] is False and out["on"]["refine_logits"] is True
    assert out["model"]["all"]["clicks"] == out["off"]["all"]["clicks"]
    assert out["on"]["all"]["clicks"][0] == out["off"]["all"]["clicks"][0]  # the first click has no mask input
    assert out["on"]["all"]["clicks"][1:] != out["off"]["all"]["clicks"][1:]
