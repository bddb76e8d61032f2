"""SamPredictor plumbing on a real image: batched prompts, embeddings reuse, devices, the fast decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.core import SamPredictor
from napari_sam.core.device import available_devices, resolve_device

from conftest import data_dir, read_image

SAMPLE = "05_fluo_b1f23c4d"  # 520 x 696 grayscale fluorescence, non-square


@pytest.fixture(scope="module")
def sample():
    d = data_dir("dsb2018_stage1_nuclei_2d")
    image, label = read_image(d / f"{SAMPLE}_image.png"), read_image(d / f"{SAMPLE}_label.tif")
    ids = np.unique(label)[1:][:5]
    boxes, centres = [], []
    for i in ids:
        r, c = np.nonzero(label == i)
        boxes.append([r.min(), c.min(), r.max(), c.max()])
        centres.append([r.mean(), c.mean()])
    return image, np.array(boxes, float), np.array(centres)


@pytest.fixture(scope="module")
def predictor(tiny_model, sample):
    p = SamPredictor(tiny_model)
    p.set_image(sample[0])
    return p


def _agree(a, b):
    return (a == b).mean()


def test_shapes_and_dtypes(predictor, sample):
    image = sample[0]
    L = predictor.model.prompt_encoder.mask_input_size[0]
    out = predictor.predict(points=sample[2][:1])
    assert out.masks.shape == (3, *image.shape) and out.masks.dtype == bool
    assert out.iou.shape == (3,) and out.iou.dtype == np.float32
    assert out.low_res_logits.shape == (3, L, L)
    single = predictor.predict(points=sample[2][:1], multimask=False, return_logits=True)
    assert single.masks.shape == (1, *image.shape) and single.masks.dtype == np.float32
    assert _agree(single.masks > 0, predictor.predict(points=sample[2][:1], multimask=False).masks) >= 0.9999


def test_many_boxes_in_one_call_equal_one_by_one(predictor, sample):
    boxes = sample[1]
    batch = predictor.predict(box=boxes, multimask=False)
    assert batch.masks.shape == (len(boxes), 1, *sample[0].shape) and batch.iou.shape == (len(boxes), 1)
    for i, box in enumerate(boxes):
        one = predictor.predict(box=box, multimask=False)
        np.testing.assert_allclose(batch.low_res_logits[i], one.low_res_logits, atol=1e-5)
        np.testing.assert_allclose(batch.iou[i], one.iou, atol=1e-5)
        assert _agree(batch.masks[i], one.masks) >= 0.9999


def test_many_point_sets_in_one_call_equal_one_by_one(predictor, sample):
    c = sample[2]
    pts = np.stack([c[[0, 1]], c[[2, 3]], c[[4, 0]]])  # (B=3, N=2, 2): one positive, one negative each
    labels = np.array([[1, 0]] * 3)
    batch = predictor.predict(points=pts, point_labels=labels)
    assert batch.masks.shape == (3, 3, *sample[0].shape)
    for i in range(3):
        one = predictor.predict(points=pts[i], point_labels=labels[i])
        np.testing.assert_allclose(batch.low_res_logits[i], one.low_res_logits, atol=1e-5)
        assert _agree(batch.masks[i], one.masks) >= 0.9999
    # one point set shared by several boxes, and a mask prompt shared by all
    both = predictor.predict(points=c[:1], box=sample[1][:3], mask_input=batch.low_res_logits[0, :1])
    assert both.masks.shape == (3, 3, *sample[0].shape)


def test_fast_decoder_equals_the_module(predictor, sample):
    cases = [dict(points=sample[2][:2], point_labels=[1, 0]), dict(box=sample[1], multimask=False),
             dict(points=sample[2][:1], box=sample[1][0]),
             dict(points=sample[2][:1], mask_input=np.random.default_rng(0).normal(size=(128, 128)))]
    try:
        for kw in cases:
            predictor.fast_decoder = True
            fast = predictor.predict(**kw)
            predictor.fast_decoder = False
            plain = predictor.predict(**kw)
            np.testing.assert_allclose(fast.low_res_logits, plain.low_res_logits, atol=1e-5)
            np.testing.assert_allclose(fast.iou, plain.iou, atol=1e-5)
    finally:
        predictor.fast_decoder = True


def test_masks_only_above_the_iou_floor_equal_all_masks(predictor, sample):
    """Segment everything skips the mask upscaling of points whose candidates all fail the IoU floor: the masks
    it computes equal the full decoder's, the skipped ones are -inf placeholders, the IoUs are unchanged."""
    rows, cols = np.meshgrid(np.linspace(20, 500, 6), np.linspace(20, 680, 6), indexing="ij")
    pts = np.stack([cols.ravel(), rows.ravel()], 1)  # (x, y) model frame of the 520 x 696 image
    coords = torch.as_tensor(predictor.transform.apply_coords(pts, predictor.original_size)[:, None],
                             dtype=torch.float32)
    labels = torch.ones(len(pts), 1, dtype=torch.int64)
    low, iou = predictor.predict_torch(coords, labels)
    floor = float(np.median(iou.max(1).values.numpy()))  # about half the points have a candidate above it
    low2, iou2 = predictor.predict_torch(coords, labels, iou_floor=floor)
    torch.testing.assert_close(iou2, iou, rtol=0, atol=0)
    above = (iou > floor).any(1)
    assert 0 < int(above.sum()) < len(pts)
    torch.testing.assert_close(low2[above], low[above], rtol=0, atol=1e-5)
    assert torch.isneginf(low2[~above]).all()


def test_decoder_cache_follows_weight_changes(tiny_model, sample):
    import copy

    model = copy.deepcopy(tiny_model)
    p = SamPredictor(model)
    p.set_image(sample[0])
    before = p.predict(points=sample[2][:1]).low_res_logits
    with torch.no_grad():  # e.g. a fine-tuning step on the decoder
        model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.v_proj.weight.mul_(5.0)
        model.prompt_encoder.no_mask_embed.weight.add_(2.0)
    after = p.predict(points=sample[2][:1])
    p.fast_decoder = False
    plain = p.predict(points=sample[2][:1])
    changed = np.abs(after.low_res_logits - before).max()
    assert np.abs(after.low_res_logits - plain.low_res_logits).max() < changed / 100  # a stale cache fails


def test_embedding_reuse_and_input_kinds(tiny_model, predictor, sample):
    emb = predictor.compute_embedding(sample[0])
    other = SamPredictor(tiny_model)
    other.set_embedding(emb)
    a, b = predictor.predict(box=sample[1][0]), other.predict(box=sample[1][0])
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    # (H, W), (H, W, 1) and (H, W, 3) of the same grayscale image give the same embedding
    g = sample[0]
    for variant in (g[..., None], np.repeat(g[..., None], 3, axis=2)):
        torch.testing.assert_close(predictor.compute_embedding(variant).features, emb.features, rtol=0, atol=0)


def test_device_selection(monkeypatch, tiny_model):
    assert resolve_device("cpu") == torch.device("cpu")
    assert "cpu" in available_devices()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")  # CUDA first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")  # then Apple MPS
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")  # then CPU
    assert SamPredictor(tiny_model, device="cpu").device == torch.device("cpu")
