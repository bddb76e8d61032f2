"""Quick validation used during training: box and centre-point mIoU in the model's input frame.

Fast and deterministic (fixed objects, exact boxes, distance-transform centre points); the full paper protocol
at the original resolution is :mod:`napari_sam.core.evaluation`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..image import max_upscale_of
from ..predictor import canvas_input
from ..prompts import boxes_rc_to_xy, rc_to_xy
from .data import Sample


def center_points_rc(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(N, 2) (row, col) of each object's distance-transform maximum (the point farthest from its border)."""
    out = np.zeros((len(ids), 2), np.int64)
    objs = ndimage.find_objects(labels)
    for k, i in enumerate(ids):
        sl = objs[i - 1]
        m = np.pad(labels[sl] == i, 1)
        dt = ndimage.distance_transform_edt(m)
        r, c = np.unravel_index(int(np.argmax(dt)), dt.shape)
        out[k] = (r - 1 + sl[0].start, c - 1 + sl[1].start)
    return out


@torch.no_grad()
def quick_eval(model, samples: list[Sample], max_objects: int = 8) -> dict:
    """mIoU over objects (the first ``max_objects`` ids of each sample) for a box and a centre point
    (top-ranked and oracle of the 3 masks); also per group box mIoU. Leaves the model in eval mode."""
    model.eval()
    dev = model.device
    s_img = model.img_size
    res: dict[str, list[float]] = {"box": [], "point": [], "oracle": []}
    per_group: dict[str, list[float]] = {}
    for s in samples:
        ids = s.ids[:max_objects]
        h, w = s.labels.shape
        emb = model.image_encoder(canvas_input(model, s.image, mirror=bool(max_upscale_of(model))))
        pe = model.prompt_encoder.get_dense_pe()
        gt = torch.from_numpy(s.labels).to(dev)[None] == torch.as_tensor(ids, device=dev)[:, None, None]
        rows, cols = np.nonzero(gt.any(2).cpu().numpy()), np.nonzero(gt.any(1).cpu().numpy())
        boxes_rc = np.zeros((len(ids), 4), np.int64)  # (min_row, min_col, max_row, max_col), max inclusive
        for k in range(len(ids)):
            rr = rows[1][rows[0] == k]
            cc = cols[1][cols[0] == k]
            boxes_rc[k] = (rr.min(), cc.min(), rr.max(), cc.max())
        boxes_t = torch.as_tensor(boxes_rc_to_xy(boxes_rc), dtype=torch.float32, device=dev)
        rc = center_points_rc(s.labels, ids)
        pts = torch.as_tensor(rc_to_xy(rc), dtype=torch.float32, device=dev)[:, None]
        lab = torch.ones(len(ids), 1, dtype=torch.long, device=dev)

        def run(points, box, multi):
            sp, de = model.prompt_encoder(points=points, boxes=box, masks=None)
            low, iou = model.mask_decoder(emb, pe, sp, de, multi)
            up = F.interpolate(low, (s_img, s_img), mode="bilinear", align_corners=False)[..., :h, :w] > 0
            inter = (up & gt[:, None]).flatten(2).sum(-1).float()
            union = (up | gt[:, None]).flatten(2).sum(-1).float().clamp(min=1)
            return inter / union, iou

        bi, _ = run(None, boxes_t, False)
        pi, piou = run((pts, lab), None, True)
        res["box"] += bi[:, 0].tolist()
        res["point"] += pi.gather(1, piou.argmax(1, keepdim=True))[:, 0].tolist()
        res["oracle"] += pi.max(1).values.tolist()
        per_group.setdefault(s.group or "all", []).extend(bi[:, 0].tolist())
    out = {k: float(np.mean(v)) if v else 0.0 for k, v in res.items()}
    out["box_by_group"] = {g: float(np.mean(v)) for g, v in sorted(per_group.items())}
    out["objects"] = len(res["box"])
    return out
