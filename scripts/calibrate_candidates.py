"""Calibrate which of the 3 candidate masks a one-click prompt ranks first: a bias on the predicted IoU of the
third (whole-object) candidate, chosen on the ``val`` split and written into the IoU head of a checkpoint.

    python scripts/calibrate_candidates.py src/napari_sam/models/builtin_nuclei.pt

For every ``val`` image of dsb2018_full, up to 8 nuclei (the evaluation's fixed sample) are clicked at their centre
(the paper's protocol); the bias that maximises the mIoU of the top-ranked candidate is added to the bias of the
IoU head's last layer for that candidate. Box prompts and single-mask outputs are unaffected. The checkpoint records
``candidate_bias`` and how it was chosen. Run it once, on a checkpoint that has none.
"""

from __future__ import annotations

import numpy as np
from _val import model_and_items, parser, store


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    args = ap.parse_args(argv)

    from napari_sam.core.build import read_checkpoint
    from napari_sam.core.evaluation import click_candidates
    from napari_sam.core.predictor import SamPredictor

    meta = read_checkpoint(args.checkpoint)[2]
    if "candidate_bias" in meta:
        ap.error(f"{args.checkpoint} is calibrated already: {meta['candidate_bias']}")
    model, items = model_and_items(args)
    pred = SamPredictor(model)
    pairs = [click_candidates(pred, image, labels, max_objects=8) for _, image, labels, _ in items]
    g, s = np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])
    n = np.arange(len(g))
    scores = {round(float(d), 2): float(g[n, (s + [0, 0, d]).argmax(1)].mean()) for d in np.arange(-0.2, 0.41, 0.01)}
    best = max(scores, key=lambda d: (scores[d], -abs(d)))
    print(f"{len(g)} {args.split} nuclei: top-ranked 1-click mIoU {scores[0.0]:.4f} -> {scores[best]:.4f} "
          f"with bias {best:+.2f} on the third candidate (oracle {g.max(1).mean():.4f})")

    def add_bias(obj: dict) -> None:
        layers = [k for k in obj["model"] if k.startswith("mask_decoder.iou_prediction_head.layers.") and
                  k.endswith(".bias")]
        key = max(layers, key=lambda k: int(k.split(".")[-2]))  # the last layer: one output per mask token
        bias = obj["model"][key]
        bias[3] = (bias[3].float() + best).to(bias.dtype)  # token 0: single mask; 1-3: the multimask candidates

    store(args.checkpoint, add_bias, candidate_bias=[0.0, 0.0, best], candidate_bias_source=(
        f"scripts/calibrate_candidates.py on {len(g)} dsb2018_full {args.split} nuclei: "
        f"1-click mIoU {scores[0.0]:.4f} -> {scores[best]:.4f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
