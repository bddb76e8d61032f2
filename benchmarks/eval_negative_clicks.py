"""Do negative clicks do what a user means? Two protocols on the dsb2018_full ``test`` split, as in the annotator.

The annotator predicts one object from all points of a plane (``napari_sam.core.annotation.predict``) and feeds
the previous logits back where the model refines with them (official checkpoints; the built-in model does not,
``napari_sam.core.build.refine_logits_of``). Per image, the ``--per-image`` largest nuclei are used.

* **carve**: a positive click at the nucleus centre (distance-transform maximum) gives a mask; a negative click
  at the masked nucleus pixel farthest from it follows. Success: the negative pixel leaves the mask, the positive
  one stays, the mask shrinks (what ``tests/napari/test_annotator_quality.py`` asks of one nucleus).
* **neighbour**: positive clicks at the centres of nucleus A and a touching neighbour B give a mask holding both;
  the click on B then turns negative (the natural correction of a mask that took in a neighbour). Success: B's
  centre leaves the mask and A's stays; also the IoU of the result with A.

Both are reported with the previous logits fed back and without, for the model alone
(``enforce_negatives=False``) and as the annotator serves it (negative points as hard constraints,
``napari_sam.core.annotation.enforce_negative_points``, and a positive click the model leaves out retried with a
box, ``follow_positive_points``).

    python benchmarks/eval_negative_clicks.py --model src/napari_sam/models/builtin_nuclei.pt [--model OTHER.pt]
        [--json docs/results/negative_clicks.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_sam.core.evaluation import center_point, iou

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018_full"


def evaluate(model_path: str, split: str = "test", per_image: int = 5, limit: int | None = None,
             enforce: bool = True) -> dict:
    import imageio.v3 as iio
    import tifffile

    from napari_sam.core import SamPredictor, load_model
    from napari_sam.core.annotation import Prompts, predict

    model = load_model(model_path, device="cpu")
    pred = SamPredictor(model)
    rows = [r for r in csv.DictReader(open(DATA / "split.csv")) if r["split"] == split][:limit]
    carve = {"logits": [], "plain": []}
    nb = {"logits": [], "plain": [], "iou_logits": [], "iou_plain": [], "iou_before": []}
    for r in rows:
        image = iio.imread(DATA / "images" / f"{r['id']}.png")
        gt = tifffile.imread(DATA / "labels" / f"{r['id']}.tif")
        pred.set_image(image)
        ids, counts = np.unique(gt[gt > 0], return_counts=True)
        for i in ids[np.argsort(-counts, kind="stable")][:per_image]:
            a = gt == i
            ca = center_point(a)
            first = predict(pred, Prompts([ca], [1]))
            before = first.mask
            if before[ca]:
                rr, cc = np.nonzero(a & before)
                k = int(np.argmax((rr - ca[0]) ** 2 + (cc - ca[1]) ** 2))
                q = (int(rr[k]), int(cc[k]))
                for key, mi in (("logits", first.logits[first.choice]), ("plain", None)):
                    after = predict(pred, Prompts([ca, q], [1, 0]), mask_input=mi, enforce_negatives=enforce,
                                    mask_window=first.window, follow_positives=enforce, previous=before).mask
                    carve[key].append(bool(not after[q] and after[ca] and after.sum() < before.sum()))
            ring = ndimage.binary_dilation(a, iterations=3) & ~a
            touching = np.unique(gt[ring])
            touching = touching[(touching > 0) & (touching != i)]
            if not len(touching):
                continue
            b = gt == touching[0]
            cb = center_point(b)
            both = predict(pred, Prompts([ca, cb], [1, 1]), follow_positives=enforce, previous=before)
            if not (both.mask[ca] and both.mask[cb]):
                continue
            nb["iou_before"].append(iou(both.mask, a))
            for key, mi in (("logits", both.logits[both.choice]), ("plain", None)):
                after = predict(pred, Prompts([ca, cb], [1, 0]), mask_input=mi, enforce_negatives=enforce,
                                mask_window=both.window, follow_positives=enforce).mask
                nb[key].append(bool(after[ca] and not after[cb]))
                nb["iou_" + key].append(iou(after, a))
    return {
        "model": model_path, "enforce_negatives": enforce, "split": split, "images": len(rows), "per_image": per_image,
        "carve": {"cases": len(carve["logits"]), "success_with_logits": float(np.mean(carve["logits"])),
                  "success_without_logits": float(np.mean(carve["plain"]))},
        "neighbour": {"cases": len(nb["logits"]), "success_with_logits": float(np.mean(nb["logits"])),
                      "success_without_logits": float(np.mean(nb["plain"])),
                      "iou_a_before": float(np.mean(nb["iou_before"])),
                      "iou_a_with_logits": float(np.mean(nb["iou_logits"])),
                      "iou_a_without_logits": float(np.mean(nb["iou_plain"]))},
    }


def table(results: list[dict]) -> str:
    lines = ["| model | negative points | carve cases | carve ok (logits / none) | neighbour cases "
             "| neighbour removed (logits / none) | IoU with A: both clicks positive -> after (logits / none) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        c, n = r["carve"], r["neighbour"]
        how = "hard constraints (annotator)" if r["enforce_negatives"] else "model only"
        lines.append(f"| {Path(r['model']).name} | {how} | {c['cases']} | {c['success_with_logits']:.2f} / "
                     f"{c['success_without_logits']:.2f} | {n['cases']} | {n['success_with_logits']:.2f} / "
                     f"{n['success_without_logits']:.2f} | {n['iou_a_before']:.2f} -> {n['iou_a_with_logits']:.2f} / "
                     f"{n['iou_a_without_logits']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="checkpoint or model name (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="first N images of the split")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write the table, with a title and the protocol, here")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"data folder {DATA} is absent", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [evaluate(m, args.split, args.per_image, args.limit, enforce) for m in args.model
               for enforce in (False, True)]
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.md:
        n = results[0]["images"]
        Path(args.md).write_text(
            f"# Negative clicks, dsb2018_full {args.split} ({n} images, {args.per_image} largest nuclei each)\n\n"
            "`python benchmarks/eval_negative_clicks.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`. "
            "carve: a positive click at the centre, then a negative click at the farthest masked pixel; ok = that "
            "pixel leaves, the positive stays, the mask shrinks. neighbour: positive clicks at the centres of a "
            "nucleus A and a touching B, then B's click turned negative; removed = B's centre leaves and A's stays. "
            "logits: the previous logits fed back (the paper; official checkpoints in the annotator); none: not "
            "(the built-in model in the annotator).\n\n" + table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
