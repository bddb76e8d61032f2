"""Choose whether a checkpoint's corrective clicks are refined with the previous mask's logits, on the ``val``
split, and record the choice in the checkpoint (``refine_logits``).

    python scripts/choose_refine.py src/napari_sam/models/builtin_nuclei.pt

The paper's click protocol (``napari_sam.core.evaluation``: centre click, then each click at the centre of the
largest error region) on every ``val`` image of dsb2018_full, up to 8 nuclei per image (the evaluation's fixed
sample), with the previous low-res logits fed back to each round and without; each for the model alone and as the
annotator serves it (negative clicks cut, left-out positive ones retried with a box). The setting with the higher
mean of the two mIoUs after the last click is stored (ties keep the paper's: on). ``load_model`` reads it; the
annotator's *refine with the previous mask* and ``napari-sam evaluate`` start from it.
"""

from __future__ import annotations

from _val import model_and_items, parser, store


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, clicks=True).parse_args(argv)

    from napari_sam.core.evaluation import evaluate_dataset

    model, items = model_and_items(args)
    miou = {}
    for refine in (True, False):
        for enforce in (False, True):
            res = evaluate_dataset(model, items, prompts=("clicks",), n_clicks=args.clicks, max_objects=8,
                                   refine=refine, enforce_negatives=enforce, follow_positives=enforce)
            summary = res.summary()["all"]
            miou[refine, enforce], n = summary["clicks"], summary["objects"]
            print(f"refine {'on ' if refine else 'off'}, {'annotator' if enforce else 'model alone'}: mIoU after "
                  f"1..{args.clicks} clicks {miou[refine, enforce]} ({n} {args.split} nuclei)", flush=True)
    score = {r: (miou[r, False][-1] + miou[r, True][-1]) / 2 for r in (True, False)}
    choice = score[False] > score[True]
    store(args.checkpoint, refine_logits=not choice, refine_logits_source=(
        f"scripts/choose_refine.py on {n} dsb2018_full {args.split} nuclei, mIoU after {args.clicks} clicks, model "
        f"alone / annotator (negatives cut, positives followed): {miou[True, False][-1]:.4f} / "
        f"{miou[True, True][-1]:.4f} with the logits fed back, {miou[False, False][-1]:.4f} / "
        f"{miou[False, True][-1]:.4f} without"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
