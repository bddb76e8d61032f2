"""Which of the 3 candidates of a one-click prompt starts a 3D object (propagation.choose_seed), on the real GoNuclear
crop 1135 with the trained built-in model (denoise 2): the default way to choose (the predicted IoU or agreement
with the neighbouring slices) must pick seeds about as good as the other (within 0.02 mIoU), and propagate_object must
start from the chosen one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import data_dir, read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def crop():
    from napari_sam.core import load_model
    from napari_sam.core.embedding_store import StackEmbeddings

    d = data_dir("gonuclear_3d_nuclei")
    vol, gt = read_image(d / "1135_crop_image.tif"), read_image(d / "1135_crop_label.tif")
    model = load_model(device="cpu", denoise=2)
    return vol, gt, model, StackEmbeddings(vol, model, cache=False)


def _prompts(gt, min_voxels=1000):
    """(label, z of its largest slice, (row, col) centroid there) for nuclei of >= min_voxels whose centroid is
    inside them (the benchmark also uses the deepest pixel otherwise)."""
    out = []
    for lab in np.unique(gt)[1:]:
        obj = gt == lab
        if obj.sum() < min_voxels:
            continue
        z = int(np.argmax(obj.sum(axis=(1, 2))))
        c = np.round(np.argwhere(obj[z]).mean(0))
        if obj[z, int(c[0]), int(c[1])]:
            out.append((int(lab), z, c))
    return out


def test_the_default_seed_choice_is_the_better_one(crop):
    from napari_sam.core.evaluation import iou
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.propagation import PropagationParams, choose_seed

    vol, gt, model, emb = crop
    pred = SamPredictor(model)
    by = {"iou": [], "consistency": []}
    for lab, z, c in _prompts(gt):
        pred.set_embedding(emb[z])
        p = pred.predict(points=c[None], multimask=True)
        for how in by:
            k = choose_seed(pred, emb, z, p.masks, p.iou, c[None], None, how)
            by[how].append(iou(p.masks[k], gt[z] == lab))
            assert torch.equal(pred.get_image_embedding(), emb[z].features)  # the predictor is left on slice z
        assert by["iou"][-1] == iou(p.masks[int(np.argmax(p.iou))], gt[z] == lab)
    assert len(by["iou"]) >= 30
    # with the stage-2b model the predicted IoU (the default since) gives 0.820 here and neighbour agreement
    # 0.787; in 3D both propagate alike (benchmarks/eval_propagation.py, denoise 2, point_raw: 0.604 vs 0.603).
    # The stage-2 model was the other way round in 2D (0.834 vs 0.846), and its consistency seeds propagated
    # better (box + logits, raw stacks: 0.464 vs 0.392), so consistency was its default.
    default = PropagationParams().seed_select
    other = next(k for k in by if k != default)
    assert np.mean(by[default]) >= np.mean(by[other]) - 0.02, {k: np.mean(v) for k, v in by.items()}


def test_propagate_object_starts_from_the_chosen_seed(crop):
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.propagation import choose_seed, propagate_object

    vol, gt, model, emb = crop
    lab, z, c = _prompts(gt)[0]
    pred = SamPredictor(model)
    pred.set_embedding(emb[z])
    p = pred.predict(points=c[None], multimask=True)
    for how in ("iou", "consistency"):
        k = choose_seed(pred, emb, z, p.masks, p.iou, c[None], None, how)
        mask, scores = propagate_object(vol, z, points=c[None], embeddings=emb, seed_select=how, max_slices=1)
        assert np.array_equal(mask[z], p.masks[k]) and scores[z] == pytest.approx(float(p.iou[k]))
    from napari_sam.core.embedding_store import StackEmbeddings

    one = StackEmbeddings(vol[z:z + 1], model, cache=False)  # no neighbour to ask: the predicted IoU decides
    pred.set_embedding(one[0])
    q = pred.predict(points=c[None], multimask=True)
    assert choose_seed(pred, one, 0, q.masks, q.iou, c[None]) == int(np.argmax(q.iou))
    with pytest.raises(ValueError, match="seed_select"):
        propagate_object(vol, z, points=c[None], embeddings=emb, seed_select="largest")


def test_a_click_near_one_end_of_a_nucleus_propagates_through_it(crop):
    """A microscopist clicks a nucleus on whatever slice is shown, often near one of its ends. Propagating toward
    the nucleus's middle the mask grows, and no stop rule may take that for running into the next nucleus (the last
    release's default regrowth stop did: mean 3D IoU 0.415 here, 47 % of the nuclei reaching their widest slice).
    Clicked on the first slice where each nucleus reaches 40 % of its largest area, with the default rules (the
    orthogonal views at the crop's voxel size): mean 3D IoU 0.732 on this crop (0.758 when clicked on the widest
    slice; in XY slices alone 0.664 / 0.669; benchmarks/eval_propagation.py --denoise 2 --click-side 0.4)."""
    from napari_sam.core.propagation import interior_point, propagate_object

    vol, gt, model, emb = crop
    ious, through = [], []
    for lab in np.unique(gt)[1:]:
        obj = gt == lab
        if obj.sum() < 1000:
            continue
        areas = obj.sum(axis=(1, 2))
        z = int(np.flatnonzero(areas >= 0.4 * areas.max())[0])
        c = np.round(np.argwhere(obj[z]).mean(0))
        if not obj[z, int(c[0]), int(c[1])]:
            c = interior_point(obj[z])
        mask, _ = propagate_object(vol, z, points=[c], embeddings=emb, model=model, spacing=(0.2837, 0.1268, 0.1268))
        ious.append((mask & obj).sum() / (mask | obj).sum())
        zl = int(np.argmax(areas))
        through.append((mask[zl] & obj[zl]).sum() / (mask[zl] | obj[zl]).sum() > 0.5)
    assert len(ious) >= 30
    assert np.mean(through) >= 0.7, np.mean(through)  # the widest slice is reached and segmented
    assert np.mean(ious) >= 0.68, np.mean(ious)
