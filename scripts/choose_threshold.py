"""Choose a checkpoint's mask threshold (the logit above which a pixel is in a mask) on the ``val`` split, and record
it in the checkpoint (``mask_threshold``).

    python scripts/choose_threshold.py src/napari_sam/models/builtin_nuclei.pt

The paper's protocol (``napari_sam.core.evaluation``) on every ``val`` image of dsb2018_full, up to 8 nuclei per
image (the evaluation's fixed sample), at each threshold of the grid: one centre point (top-ranked mask), the box,
and 5 clicks for the model alone and as the annotator serves them (negative clicks cut, left-out positive ones
retried with a box). The threshold with the highest mean of those four mIoUs is stored (ties keep the one nearest
the paper's 0). ``load_model`` reads it;
prompts, segment everything and propagation binarise at it.
"""

from __future__ import annotations

from _val import model_and_items, parser, store


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, clicks=True)
    ap.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    args = ap.parse_args(argv)

    from napari_sam.core.build import set_mask_threshold
    from napari_sam.core.evaluation import evaluate_dataset

    model, items = model_and_items(args)
    rows = {}
    for t in args.grid:
        set_mask_threshold(model, t)
        alone = evaluate_dataset(model, items, n_clicks=args.clicks, max_objects=8).summary()["all"]
        ann = evaluate_dataset(model, items, prompts=("clicks",), n_clicks=args.clicks, max_objects=8,
                               enforce_negatives=True, follow_positives=True).summary()["all"]
        rows[t] = (alone["point"], alone["box"], alone["clicks"][-1], ann["clicks"][-1])
        n = alone["objects"]
        print(f"threshold {t:+.2f}: 1-point {rows[t][0]:.4f}, box {rows[t][1]:.4f}, {args.clicks} clicks "
              f"{rows[t][2]:.4f} (annotator {rows[t][3]:.4f}) on {n} {args.split} nuclei", flush=True)
    best = max(rows, key=lambda t: (round(sum(rows[t]) / 4, 4), -abs(t)))
    table = "; ".join(f"{t:g}: " + " / ".join(f"{v:.4f}" for v in r) for t, r in rows.items())
    store(args.checkpoint, mask_threshold=float(best), mask_threshold_source=(
        f"scripts/choose_threshold.py on {n} dsb2018_full {args.split} nuclei, mIoU 1-point / box / {args.clicks} "
        f"clicks / {args.clicks} clicks in the annotator (negatives cut, positives followed) per threshold: {table}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
