"""Write a training run's learning curve (history.jsonl) as a markdown file.

Usage: python scripts/learning_curve.py runs/X/history.jsonl [more.jsonl ...] --out docs/results/learning_curve.md

Several history files (e.g. a run and the runs it was resumed from) are merged by step; the last record of a
step wins. Validation rows come from the evaluation records, training rows are averaged over ``--bin`` steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    evals: dict[int, dict] = {}
    train: dict[int, dict] = {}
    for p in paths:
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            (evals if "eval" in rec else train)[rec["step"]] = rec
    return [evals[k] for k in sorted(evals)], [train[k] for k in sorted(train)]


def table(evals: list[dict], train: list[dict], bin_steps: int) -> str:
    out = ["## Validation (fixed val subset, input frame; selection metric box + 1-point)", "",
           "| step | train time (min) | val box mIoU | val 1-point mIoU | val oracle | box by modality |",
           "|---|---|---|---|---|---|"]
    for r in evals:
        e = r["eval"]
        groups = ", ".join(f"{g} {v:.2f}" for g, v in sorted(e.get("box_by_group", {}).items()))
        out.append(f"| {r['step']} | {r['elapsed'] / 60:.1f} | {e['box']:.3f} | {e['point']:.3f} | "
                   f"{e['oracle']:.3f} | {groups} |")
    out += ["", f"## Training (mean over {bin_steps} steps)", "",
            "| steps | lr | train loss | train IoU, first prompt | train IoU, last iteration |",
            "|---|---|---|---|---|"]
    chunk: list[dict] = []
    for r in train:
        chunk.append(r)
        if r["step"] // bin_steps != (chunk[0]["step"] - 1) // bin_steps or r is train[-1]:
            n = len(chunk)
            out.append(f"| {chunk[0]['step']}-{r['step']} | {sum(c['lr'] for c in chunk) / n:.2e} | "
                       f"{sum(c['loss'] for c in chunk) / n:.3f} | {sum(c['iou_first'] for c in chunk) / n:.3f} | "
                       f"{sum(c['iou_last'] for c in chunk) / n:.3f} |")
            chunk = []
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("history", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--bin", type=int, default=200, help="training steps per row")
    ap.add_argument("--title", default="# Built-in model: learning curve")
    args = ap.parse_args(argv)
    evals, train = read(args.history)
    text = args.title + "\n\n" + table(evals, train, args.bin)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
