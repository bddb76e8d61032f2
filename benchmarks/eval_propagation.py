"""Propagation quality on GoNuclear 3D nuclei: one positive point per nucleus, mean 3D IoU per strategy.

For every ground-truth nucleus of at least ``--min-voxels`` voxels in ../shared/data/gonuclear_3d_nuclei, one
positive point at the center of its largest slice (the centroid, or the deepest interior pixel when the centroid
falls outside), propagate through the volume, and score the 3D IoU with the ground truth. All nuclei of a volume
propagate in one batched pass per strategy (identical to one propagate_object call each, up to float noise).

    python benchmarks/eval_propagation.py --model src/napari_sam/models/builtin_nuclei.pt [--json out.json]

Prints one markdown table (mean / median 3D IoU, slices per nucleus, time per object-slice) and the best strategy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gonuclear_3d_nuclei"
VOLUMES = ("1135", "1136")

# (name, strategy, extra params): the strategies of napari_sam.core.propagation plus micro-sam's default
RUNS = [
    ("box", "box", {}),
    ("box + logits", "box_logits", {}),
    ("box (+10%) + logits", "box_logits", {"box_extension": 0.1}),
    ("point", "point", {}),
    ("point, candidate by overlap", "point", {"select": "overlap"}),
    ("point + box", "point_box", {}),
    ("point + logits", "point_logits", {}),
    ("point + box + logits", "point_box_logits", {}),
    ("micro-sam default (point, stop IoU<0.5)", "microsam", {}),
]


def nucleus_prompts(gt: np.ndarray, min_voxels: int):
    """[(label, z of the largest slice, (row, col) center)] for nuclei with >= min_voxels voxels."""
    from napari_sam.core.propagation import interior_point

    ids, counts = np.unique(gt, return_counts=True)
    out = []
    for lab, n in zip(ids, counts):
        if lab == 0 or n < min_voxels:
            continue
        obj = gt == lab
        areas = obj.sum(axis=(1, 2))
        z = int(np.argmax(areas))
        rr, cc = np.nonzero(obj[z])
        center = np.array([rr.mean(), cc.mean()])
        r, c = np.round(center).astype(int)
        if not obj[z, r, c]:
            center = interior_point(obj[z])
        out.append((int(lab), z, center))
    return out


def iou3d(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def evaluate(model, strategies, min_voxels: int, cache, log=print, limit: int | None = None) -> dict:
    from napari_sam.core.embedding_store import StackEmbeddings
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.propagation import iter_propagate_masks
    from tifffile import imread as read_tif

    results = {name: [] for name, _, _ in strategies}
    slices = {name: 0 for name, _, _ in strategies}
    times = {name: 0.0 for name, _, _ in strategies}
    seeds_ok = []
    for vid in VOLUMES:
        vol = read_tif(DATA / f"{vid}_crop_image.tif")
        gt = read_tif(DATA / f"{vid}_crop_label.tif")
        t0 = time.perf_counter()
        emb = StackEmbeddings(vol, model, cache=cache)
        emb.compute_all()
        log(f"{vid}: embeddings of {vol.shape[0]} slices in {time.perf_counter() - t0:.1f} s")
        prompts = nucleus_prompts(gt, min_voxels)[:limit]
        pred = SamPredictor(model)
        seeds, objs = [], []
        for lab, z, center in prompts:  # the prompted slice: one point, best of 3 candidates
            pred.set_embedding(emb[z])
            p = pred.predict(points=center[None], multimask=True)
            k = int(np.argmax(p.iou))
            seeds.append({z: p.masks[k]})
            objs.append(lab)
            seeds_ok.append(iou3d(p.masks[k], gt[z] == lab))
        for name, strategy, extra in strategies:
            masks = [np.zeros(gt.shape, bool) for _ in objs]
            for i, s in enumerate(seeds):
                for z, m in s.items():
                    masks[i][z] = m
            t0 = time.perf_counter()
            n = 0
            for i, z, m, _s in iter_propagate_masks(vol, seeds, embeddings=emb, strategy=strategy, **extra):
                masks[i][z] = m
                n += 1
            times[name] += time.perf_counter() - t0
            slices[name] += n
            results[name] += [iou3d(masks[i], gt == lab) for i, lab in enumerate(objs)]
            log(f"{vid}: {name}: mean 3D IoU {np.mean(results[name][-len(objs):]):.3f} ({len(objs)} nuclei)")
    return {"results": results, "slices": slices, "times": times, "seed_iou": seeds_ok}


def table(out: dict) -> str:
    rows = ["| strategy | mean 3D IoU | median | propagated slices / nucleus | ms / object-slice |",
            "|---|---|---|---|---|"]
    for name, ious in out["results"].items():
        n = max(len(ious), 1)
        ms = f"{1000 * out['times'][name] / out['slices'][name]:.1f}" if out["slices"][name] else "–"
        rows.append(f"| {name} | {np.mean(ious):.3f} | {np.median(ious):.3f} | {out['slices'][name] / n:.1f} | "
                    f"{ms} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint path or name (default: the built-in model)")
    ap.add_argument("--min-voxels", type=int, default=1000)
    ap.add_argument("--strategies", default=None, help="comma-separated strategy keys (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true", help="keep embeddings in memory (no disk cache)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many nuclei per volume (smoke runs)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_sam.core.build import load_model

    model = load_model(args.model, device="cpu")
    runs = RUNS if args.strategies is None else [r for r in RUNS if r[1] in args.strategies.split(",")]
    out = evaluate(model, runs, args.min_voxels, cache=not args.no_cache, log=lambda s: print(s, file=sys.stderr),
                   limit=args.limit)
    n = len(next(iter(out["results"].values())))
    print(f"GoNuclear 3D ({', '.join(VOLUMES)}), {n} nuclei >= {args.min_voxels} voxels, model "
          f"{args.model or 'builtin'}; prompted-slice 2D IoU {np.mean(out['seed_iou']):.3f}\n")
    print(table(out))
    best = max(out["results"], key=lambda k: np.mean(out["results"][k]))
    print(f"\nbest: {best} ({np.mean(out['results'][best]):.3f})")
    if args.json:
        args.json.write_text(json.dumps({k: (v if not isinstance(v, dict) else {kk: (list(map(float, vv)) if
                                         isinstance(vv, list) else float(vv)) for kk, vv in v.items()})
                                         for k, v in out.items() if k != "seed_iou"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
