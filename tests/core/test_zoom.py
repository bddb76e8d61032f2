"""Zoomed decoding (napari_sam.core.zoom): small objects of large images are decoded from the window around their
prompt, encoded at the scale the model was trained on. Geometry and resampling against exact references; the
zoomed path against the same model run on the window itself; quality on held-out `val` images of dsb2018_full."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import data_dir, read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def builtin():
    from napari_sam.core.build import load_model

    return load_model(device="cpu")


def _val_images(height: int, n: int):
    d = data_dir("dsb2018_full")
    with open(d / "split.csv", newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f) if r["split"] == "val" and int(r["height"]) == height][:n]
    return [(read_image(d / "images" / f"{i}.png")[..., :3], read_image(d / "labels" / f"{i}.tif")) for i in ids]


def test_window_choice_geometry():
    from napari_sam.core.zoom import SNAP, choose_window, fits

    rng = np.random.default_rng(0)
    shape, side = (1024, 700), 256
    step = side // SNAP
    for _ in range(500):
        size = rng.uniform(0, side / 2, 2)
        r0, c0 = rng.uniform(0, shape[0] - size[0]), rng.uniform(0, shape[1] - size[1])
        ext = (r0, c0, r0 + size[0], c0 + size[1])
        w = choose_window(ext, shape, side)
        assert w[2] - w[0] == side and w[3] - w[1] == side
        for lo, hi, n in ((w[0], w[2], shape[0]), (w[1], w[3], shape[1])):
            assert 0 <= lo and hi <= n and (lo % step == 0 or hi == n)
        # inside, and away from every window edge that is not the image's
        margin = side / 4 - step / 2
        assert (w[0] == 0 or ext[0] - w[0] >= margin) and (w[2] == shape[0] or w[2] - ext[2] >= margin)
        assert (w[1] == 0 or ext[1] - w[1] >= margin) and (w[3] == shape[1] or w[3] - ext[3] >= margin)
        assert fits(ext, w, shape, side)
    assert choose_window((0, 0, 10, side / 2 + 1), shape, side) is None  # too large: the whole image
    assert choose_window((5, 5, 20, 20), (200, 900), side)[::2] == (0, 200)  # a short axis is taken whole
    assert not fits((200, 100, 235, 120), (0, 0, 256, 256), shape, side)  # too close to the window's inner edge


def test_resampled_logits_exact_references():
    from napari_sam.core.zoom import OUTSIDE_LOGIT, resample_logits

    low = torch.randn(2, 1, 16, 16)
    frame = (64, 32, 40, 40, 64, 64)  # a 40x40 image region shown at 64x64 in a 64-px input: 16x16 cells of 4 px
    assert torch.allclose(resample_logits(low, frame, frame, 64), low, atol=1e-6)
    # the region two cells (5 image pixels) further down: the logits move up two cells
    moved = resample_logits(low, frame, (69, 32, 40, 40, 64, 64), 64)
    assert torch.allclose(moved[..., :14, :], low[..., 2:, :], atol=1e-6)
    assert (moved[..., 14:, :] == OUTSIDE_LOGIT).all()  # beyond the source region's image content


def test_zoomed_prediction_equals_the_model_on_the_window(builtin):
    from napari_sam.core.predictor import SamPredictor

    image, labels = _val_images(520, 1)[0]
    pred = SamPredictor(builtin)
    pred.set_image(image)
    ids = [i for i in np.unique(labels)[1:] if (labels == i).sum() > 200][:3]
    boxes = []
    for i in ids:
        rr, cc = np.nonzero(labels == i)
        boxes.append([rr.min(), cc.min(), rr.max(), cc.max()])
    boxes = np.array(boxes, np.float64)
    p = pred.predict(box=boxes, multimask=False)
    assert p.windows.shape == (len(ids), 4)
    for b, m, w in zip(boxes, p.masks[:, 0], p.windows):
        r0, c0, r1, c1 = w
        assert (r1 - r0, c1 - c0) == (256, 256)
        assert not m[:r0].any() and not m[r1:].any() and not m[:, :c0].any() and not m[:, c1:].any()
        alone = SamPredictor(builtin)
        alone.set_image(image[r0:r1, c0:c1])
        ref = alone.predict(box=b - [r0, c0, r0, c0], multimask=False)
        assert ref.windows is None  # a 256-px image is not zoomed
        assert np.array_equal(m[r0:r1, c0:c1], ref.masks[0])
    # a prompt larger than half a window is decoded from the whole image
    big = pred.predict(box=np.array([0, 0, 300, 300.0]), multimask=False)
    assert tuple(big.windows) == (0, 0) + image.shape[:2]


def test_an_object_keeps_its_window_and_moves_its_logits_when_it_must(builtin):
    from napari_sam.core.evaluation import center_point, iou
    from napari_sam.core.predictor import SamPredictor

    image, labels = _val_images(520, 1)[0]
    pred = SamPredictor(builtin)
    pred.set_image(image)
    i = max(np.unique(labels)[1:], key=lambda k: (labels == k).sum())
    gt = labels == i
    c = np.array(center_point(gt), np.float64)
    first = pred.predict(points=c[None], multimask=False)
    # a second click near the first keeps the window (and so reuses the logits as they are)
    second = pred.predict(points=np.array([c, c + 3]), point_labels=[1, 1], mask_input=first.low_res_logits,
                          mask_windows=first.windows, multimask=False)
    assert np.array_equal(second.windows, first.windows)
    assert iou(second.masks[0], gt) > 0.6
    # without mask_windows, the previous prediction's windows are assumed (the usual predict -> refine loop)
    pred.predict(points=c[None], multimask=False)
    implicit = pred.predict(points=np.array([c, c + 3]), point_labels=[1, 1], mask_input=first.low_res_logits,
                            multimask=False)
    assert np.array_equal(implicit.masks, second.masks)
    # the same logits handed to a frame that sees the object at another offset still mean the same object:
    # resampled into the whole image's frame, they alone (no point) reproduce it
    whole = (0, 0) + image.shape[:2]
    moved = pred._reframe(pred._require(), torch.as_tensor(first.low_res_logits[None]),
                          tuple(int(v) for v in first.windows), whole)
    from napari_sam.core.transforms import upsample_masks

    e = pred._require()
    again = upsample_masks(moved[0], builtin.img_size, e.input_size, e.original_size, builtin.mask_threshold)[0]
    assert iou(again, first.masks[0]) > 0.8


def test_zoom_helps_on_held_out_large_images(builtin):
    """val 520x696 fluorescence images (held out; 9 images, 72 nuclei): one click and a box, whole image vs zoom."""
    from napari_sam.core.build import set_zoom_window
    from napari_sam.core.evaluation import evaluate_image
    from napari_sam.core.predictor import SamPredictor

    items = _val_images(520, 9)
    scores = {}
    for zoom in (None, 256):
        set_zoom_window(builtin, zoom)
        pred = SamPredictor(builtin)
        res = [evaluate_image(pred, im, lab, prompts=("point", "box"), max_objects=8) for im, lab in items]
        scores[zoom] = {k: float(np.mean(np.concatenate([r[k] for r in res]))) for k in ("point", "box")}
    set_zoom_window(builtin, 256)
    assert sum(len(r["point"]) for r in res) == 72
    assert scores[256]["point"] >= scores[None]["point"] + 0.03, scores  # 0.758 -> 0.834
    assert scores[256]["box"] >= scores[None]["box"] + 0.01, scores  # 0.824 -> 0.850


def test_settings_and_checkpoints(builtin, tmp_path):
    from napari_sam.core.build import load_model, read_checkpoint, save_checkpoint, set_zoom_window
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.zoom import check_zoom_window

    assert builtin.zoom_window == 256  # the built-in file's setting
    assert load_model(device="cpu", zoom_window=0).zoom_window is None
    for bad in (-1, 8, 100.5, "x"):
        with pytest.raises(ValueError, match="zoom_window"):
            check_zoom_window(bad)
    m = load_model(device="cpu", zoom_window=None)
    assert SamPredictor(m).compute_embedding(np.zeros((600, 600), np.uint8)).source is None
    set_zoom_window(m, 300)
    assert read_checkpoint(save_checkpoint(m, tmp_path / "m.pt"))[2]["zoom_window"] == 300
    assert load_model(tmp_path / "m.pt", device="cpu").zoom_window == 300
    emb = SamPredictor(m).compute_embedding(np.zeros((300, 200), np.uint8))
    assert emb.source is None  # not larger than the window: nothing to zoom


def test_objects_larger_than_their_window_are_decoded_from_the_whole_image(builtin, nuclei_sample):
    """A real nuclei image enlarged until its largest nucleus spans 300+ px, more than a window could hold: a click
    on it gets exactly the whole-image decode (what the model gives with zoom off)."""
    from napari_sam.core.build import load_model
    from napari_sam.core.evaluation import center_point, iou
    from napari_sam.core.predictor import SamPredictor

    image, labels = nuclei_sample
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    big = ids[np.argmax(counts)]
    rr, cc = np.nonzero(labels == big)
    f = int(np.ceil(300 / max(np.ptp(rr), np.ptp(cc))))
    image = np.kron(image, np.ones((f, f) + (1,) * (image.ndim - 2), image.dtype))
    labels = np.kron(labels, np.ones((f, f), labels.dtype))
    pt = np.array([center_point(labels == big)], np.float64)
    pred = SamPredictor(builtin)
    pred.set_image(image)
    p = pred.predict(points=pt, multimask=False)
    assert tuple(p.windows) == (0, 0) + labels.shape and iou(p.masks[0], labels == big) > 0.7
    plain = SamPredictor(load_model(device="cpu", zoom_window=None))
    plain.set_image(image)
    assert np.array_equal(p.masks, plain.predict(points=pt, multimask=False).masks)


def test_window_embeddings_are_bounded(builtin, monkeypatch):
    from napari_sam.core import predictor as P

    monkeypatch.setattr(P, "ZOOM_CACHE_WINDOWS", 3)
    pred = P.SamPredictor(builtin)
    emb = pred.set_image(np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8))
    for r in (100, 300, 500, 700, 300):
        pred.predict(points=np.array([[r, 500.0]]), multimask=False)
    assert len(emb.source.cache) == 3
    assert list(emb.source.cache)[-1] == tuple(pred.predict(points=np.array([[300, 500.0]])).windows)


def test_zoom_can_be_switched_off_per_predictor_and_logits_follow(builtin):
    """predictor.zoom = False (the annotator's checkbox) decodes from the whole image, and logits of a zoomed
    prediction are moved into the whole image's frame, so refining across the switch keeps the object."""
    from napari_sam.core.evaluation import center_point, iou
    from napari_sam.core.predictor import SamPredictor

    image, labels = _val_images(520, 1)[0]
    i = max(np.unique(labels)[1:], key=lambda k: (labels == k).sum())
    c = np.array([center_point(labels == i)], np.float64)
    pred = SamPredictor(builtin)
    pred.set_image(image)
    zoomed = pred.predict(points=c, multimask=False)
    assert tuple(zoomed.windows) != (0, 0) + labels.shape
    pred.zoom = False
    flat = pred.predict(points=c, multimask=False)
    assert tuple(flat.windows) == (0, 0) + labels.shape
    ref = SamPredictor(builtin)
    ref.fast_decoder = pred.fast_decoder
    ref.set_embedding(pred._require()._replace(source=None))
    assert np.array_equal(flat.masks, ref.predict(points=c, multimask=False).masks)
    refined = pred.predict(points=c, mask_input=zoomed.low_res_logits, mask_windows=zoomed.windows, multimask=False)
    assert iou(refined.masks[0], labels == i) > 0.6


def test_annotation_masks_of_the_window_only_are_the_whole_image_masks(builtin):
    """``annotation.predict`` keeps a zoomed object's masks for its window only (``in_window``): a small nucleus of a
    large image no longer costs (3, H, W) masks. Its results equal exactly those of the whole-image masks, on a real
    image with the built-in model: single clicks, a second positive click far off the mask (decoded again with a box),
    a negative click (cut out), refinement with the previous logits and mask (or result), and small and large
    boxes."""
    from napari_sam.core import annotation as ann
    from napari_sam.core.evaluation import center_point
    from napari_sam.core.predictor import SamPredictor

    class WholeImageMasks(SamPredictor):
        def predict(self, *args, in_window=False, **kwargs):
            return super().predict(*args, **kwargs)

    image, labels = _val_images(520, 1)[0]
    cut, whole = SamPredictor(builtin), WholeImageMasks(builtin)
    cut.set_embedding(whole.set_image(image))
    ids = [i for i in np.unique(labels)[1:] if 150 < (labels == i).sum() < 1500][:6]
    seen = {"windowed": 0, "followed": 0, "large": 0}

    def same(prompts, **kw):
        a = ann.predict(cut, prompts, **kw)
        if isinstance(kw.get("previous"), ann.Result):  # the previous result itself (its patch): as its full mask
            kw["previous"] = kw["previous"].mask
        b = ann.predict(whole, prompts, **kw)
        assert b.shape is None and b.patches.shape[1:] == image.shape[:2]
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.iou, b.iou)
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.window, b.window)
        assert a.choice == b.choice
        seen["windowed"] += a.shape is not None and a.patches.shape[1:] == (256, 256)
        seen["large"] += a.window is not None and tuple(a.window) == (0, 0) + image.shape[:2]
        return a

    for n, i in enumerate(ids):
        c = np.array(center_point(labels == i), np.float64)
        first = same(ann.Prompts([c], [1]))
        far = c + (40, -35) if n % 2 else c + (-25, 30)  # a second positive click off the mask
        two = ann.Prompts([c, far], [1, 1])
        followed = same(two, previous=first.mask)
        same(two, previous=first.cropped())
        seen["followed"] += not np.array_equal(followed.masks, same(two, follow_positives=False).masks)
        same(two, mask_input=first.logits[first.choice], mask_window=first.window, previous=first.mask)
        same(ann.Prompts([c, c + (3, 3)], [1, 0]))  # a negative click next to the positive one
        rr, cc = np.nonzero(labels == i)
        same(ann.Prompts(boxes=[[rr.min(), cc.min(), rr.max(), cc.max()]]))
    same(ann.Prompts(boxes=[[20, 30, 400, 500]]))  # a box of the whole image
    assert seen["windowed"] >= 10 and seen["followed"] >= 1 and seen["large"] >= 1, seen
