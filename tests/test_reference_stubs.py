"""The torchvision/timm stand-ins of conftest.py (the reference packages need them) behave like the originals
for what the references use: PIL bilinear resize, box_area, batched_nms by class, timm helpers."""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from conftest import data_dir, read_image


def test_stand_ins_are_installed_only_where_missing(reference, mobile_reference):
    tv = sys.modules["torchvision"]
    assert reference.SamPredictor is not None and mobile_reference.sam_model_registry["vit_t"] is not None
    assert sys.modules["torchvision.transforms.functional"] is tv.transforms.functional
    assert sys.modules["timm.models.layers"].DropPath is not None


def test_resize_and_to_pil_image(reference):
    from torchvision.transforms.functional import resize, to_pil_image

    img = read_image(data_dir("dsb2018_stage1_nuclei_2d") / "10_color_he_6b0ac2ab_image.png")
    pil = to_pil_image(img)
    assert isinstance(pil, Image.Image) and pil.size == (img.shape[1], img.shape[0])
    out = np.asarray(resize(pil, (819, 1024)))
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((1024, 819), Image.BILINEAR)))
    assert resize(pil, (img.shape[0], img.shape[1])) is pil


def _brute_nms(boxes, scores, idxs, thr):
    order = np.argsort(-scores, kind="stable")
    keep = []
    for i in order:
        ok = True
        for j in keep:
            if idxs[i] != idxs[j]:
                continue
            lt = np.maximum(boxes[i, :2], boxes[j, :2])
            rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = np.prod(np.clip(rb - lt, 0, None))
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_batched_nms_and_box_area(reference):
    from torchvision.ops.boxes import batched_nms, box_area

    label = read_image(data_dir("dsb2018_stage1_nuclei_2d") / "00_fluo_c35e6e3e_label.tif")
    boxes = []
    for i in np.unique(label)[1:]:
        r, c = np.nonzero(label == i)
        boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    boxes = np.array(boxes, dtype=np.float32)
    rng = np.random.default_rng(0)
    # real boxes plus jittered near-duplicates, in two classes
    dup = boxes + rng.normal(0, 1.5, boxes.shape).astype(np.float32)
    all_boxes = np.concatenate([boxes, dup])
    scores = rng.uniform(size=len(all_boxes)).astype(np.float32)
    idxs = rng.integers(0, 2, len(all_boxes))
    keep = batched_nms(torch.from_numpy(all_boxes), torch.from_numpy(scores), torch.from_numpy(idxs),
                       iou_threshold=0.5)
    assert keep.dtype == torch.int64
    assert keep.tolist() == _brute_nms(all_boxes, scores, idxs, 0.5)
    assert 0 < len(keep) < len(all_boxes)
    np.testing.assert_allclose(box_area(torch.from_numpy(boxes)).numpy(),
                               (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    empty = batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), iou_threshold=0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_timm_helpers(mobile_reference):
    from timm.models.layers import DropPath, to_2tuple, trunc_normal_
    from timm.models.registry import register_model

    x = torch.randn(3, 4)
    assert torch.equal(DropPath(0.0)(x), x)
    assert to_2tuple(7) == (7, 7) and to_2tuple((1, 2)) == (1, 2)
    t = torch.empty(1000)
    trunc_normal_(t, std=0.02)
    assert t.abs().max() <= 2.0 and 0.01 < float(t.std()) < 0.03
    f = lambda: 1  # noqa: E731
    assert register_model(f) is f
