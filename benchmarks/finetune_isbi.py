"""Fine-tuning shown to help: decoder-only fine-tuning of a model on 7 of the 10 ISBI 2012 EM slices,
evaluated (point / box / 5 clicks) on the other 3 before and after. Writes JSON + a markdown table.

Usage: python benchmarks/finetune_isbi.py [--model builtin|PATH] [--steps 300] [--lr 1e-4]
       [--out docs/results/isbi_finetune]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012_em_neurites_2d"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-objects", type=int, default=40, help="evaluated instances per test slice (seeded)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/isbi_finetune")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from napari_sam.core.build import load_model, save_checkpoint
    from napari_sam.core.evaluation import evaluate_dataset, markdown_table
    from napari_sam.core.training import finetune
    from napari_sam.core.training.data import pairs_from_folder, read_array

    pairs = pairs_from_folder(args.data)
    if len(pairs) != 10:
        raise SystemExit(f"expected 10 slices in {args.data}, found {len(pairs)}")
    train, test = pairs[:7], pairs[7:]
    items = [(i.stem, read_array(i), read_array(lab), "") for i, lab in test]
    model = load_model(args.model, device="cpu")

    def run_eval(tag: str) -> dict:
        t0 = time.time()
        s = evaluate_dataset(model, items, f"isbi2012 test slices ({tag})", n_clicks=5,
                             max_objects=args.max_objects).summary()
        s["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(s["all"]), flush=True)
        return s

    before = run_eval("before")
    t0 = time.time()
    recs = finetune(model, [read_array(i) for i, _ in train], [read_array(lab) for _, lab in train],
                    steps=args.steps, mode="decoder", lr=args.lr)
    t_ft = time.time() - t0
    print(f"fine-tuned {args.steps} steps in {t_ft:.0f} s; loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}")
    after = run_eval(f"after {args.steps} decoder-only steps")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"train_slices": [i.stem for i, _ in train], "test_slices": [i.stem for i, _ in test],
              "model": args.model or "builtin", "steps": args.steps, "lr": args.lr, "finetune_seconds": round(t_ft),
              "threads": args.threads, "loss_first_last": [recs[0]["loss"], recs[-1]["loss"]],
              "before": before, "after": after}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown_table([before, after]))
    save_checkpoint(model, Path("runs") / "isbi_finetuned.pt", half=True, finetuned_on=result["train_slices"])
    print(markdown_table([before, after]))


if __name__ == "__main__":
    main()
