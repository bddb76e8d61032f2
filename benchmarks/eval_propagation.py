"""Propagation quality on GoNuclear 3D nuclei: one positive point per nucleus, mean 3D IoU per strategy.

For every ground-truth nucleus of at least ``--min-voxels`` voxels in ../shared/data/gonuclear_3d_nuclei, one
positive point at the center of its largest slice (the centroid, or the deepest interior pixel when the centroid
falls outside), propagate through the volume, and score the 3D IoU with the ground truth. All nuclei of a volume
propagate in one batched pass per strategy (identical to one propagate_object call each, up to float noise). The
voxel size (for the orthogonal views) is read from each tif.

    python benchmarks/eval_propagation.py --model src/napari_sam/models/builtin_nuclei.pt [--json out.json]
    python benchmarks/eval_propagation.py --click-side 0.4 --strategies point_raw   # clicks near a nucleus end

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
RUNS = [  # most informative first: a time-boxed run (--strategies) still compares the main ones
    ("point, uncalibrated ranking, micro-sam's stop, z smoothing, orthogonal views (default)", "point_raw", {}),
    ("the same in XY slices only (views='xy')", "point_raw", {"views": "xy"}),
    ("the same, orthogonal views at every row and column (view_step 1)", "point_raw", {"view_step": 1}),
    ("the same, orthogonal views without smoothing them (view_denoise 0)", "point_raw", {"view_denoise": 0}),
    ("the same with the regrowth stop (max_regrowth 0.5)", "point_raw", {"max_regrowth": 0.5}),
    ("the same without z smoothing", "point_raw", {"smooth_z": False}),
    ("box + logits", "box_logits", {}),
    ("point", "point", {}),
    ("micro-sam default (point, stop IoU<0.5)", "microsam", {}),
    ("point + box + logits", "point_box_logits", {}),
    ("box", "box", {}),
    ("point + box", "point_box", {}),
    ("box (+10%) + logits", "box_logits", {"box_extension": 0.1}),
    ("point, candidate by overlap", "point", {"select": "overlap"}),
    ("point + logits", "point_logits", {}),
    ("point, uncalibrated ranking", "point", {"select": "raw_iou"}),
]


def nucleus_prompts(gt: np.ndarray, min_voxels: int, side: float | None = None):
    """[(label, z of the largest slice, (row, col) center)] for nuclei with >= min_voxels voxels. With ``side``
    (e.g. 0.4), z is instead the first slice (lowest z) where the nucleus reaches that fraction of its largest
    slice's area: a click near one end of the nucleus."""
    from napari_sam.core.propagation import interior_point

    ids, counts = np.unique(gt, return_counts=True)
    out = []
    for lab, n in zip(ids, counts):
        if lab == 0 or n < min_voxels:
            continue
        obj = gt == lab
        areas = obj.sum(axis=(1, 2))
        z = int(np.argmax(areas)) if side is None else int(np.flatnonzero(areas >= side * areas.max())[0])
        rr, cc = np.nonzero(obj[z])
        center = np.array([rr.mean(), cc.mean()])
        r, c = np.round(center).astype(int)
        if not obj[z, r, c]:
            center = interior_point(obj[z])
        out.append((int(lab), z, center))
    return out


def tif_spacing(path: Path) -> tuple[float, float, float]:
    """(z, y, x) voxel size of an ImageJ tif (its ``spacing`` and X/Y resolution tags), in its unit."""
    from tifffile import TiffFile

    with TiffFile(path) as tif:
        page, meta = tif.pages[0], tif.imagej_metadata or {}
        y, x = (page.tags[k].value for k in ("YResolution", "XResolution"))
        return float(meta.get("spacing", 1.0)), y[1] / y[0], x[1] / x[0]


def iou3d(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def evaluate(model, strategies, min_voxels: int, cache, log=print, limit: int | None = None,
             on_strategy=None, crops=VOLUMES, seed_select: str = "iou", side: float | None = None) -> dict:
    """Embed both volumes, prompt every nucleus once, then run each strategy over all nuclei."""
    from tifffile import imread

    from napari_sam.core.embedding_store import StackEmbeddings
    from napari_sam.core.predictor import SamPredictor
    from napari_sam.core.propagation import choose_seed, finish_slices, fuse_views, iter_propagate_masks, make_params

    out = {"results": {}, "slices": {}, "times": {}, "seed_iou": [], "crops": {}}
    volumes, spacing = [], {}
    for vid in crops:
        vol, gt = imread(DATA / f"{vid}_crop_image.tif"), imread(DATA / f"{vid}_crop_label.tif")
        spacing[vid] = tif_spacing(DATA / f"{vid}_crop_image.tif")
        t0 = time.perf_counter()
        emb = StackEmbeddings(vol, model, cache=cache).compute_all()
        log(f"{vid}: embeddings of {vol.shape[0]} slices in {time.perf_counter() - t0:.1f} s")
        pred = SamPredictor(model)
        seeds, objs, clicks, failed = [], [], [], 0
        for lab, z, center in nucleus_prompts(gt, min_voxels, side)[:limit]:  # one point, one of 3 candidates
            pred.set_embedding(emb[z])
            p = pred.predict(points=center[None], multimask=True)
            k = choose_seed(pred, emb, z, p.masks, p.iou, center[None], None, seed_select)
            out["seed_iou"].append(iou3d(p.masks[k], gt[z] == lab))
            if not p.masks[k].any():  # nothing to propagate: this nucleus scores 3D IoU 0 in every strategy
                failed += 1
                continue
            seeds.append({z: p.masks[k]})
            clicks.append([(z, tuple(center))])
            objs.append(lab)
        if failed:
            log(f"{vid}: {failed} nuclei got an empty mask on their prompted slice (3D IoU 0)")
        volumes.append((vol, gt, emb, seeds, objs, clicks, failed))
        out["crops"][vid] = len(objs) + failed  # nuclei of this crop, in order in every result list
    for name, strategy, extra in strategies:
        ious, n, t = [], 0, 0.0
        for vid, (vol, gt, emb, seeds, objs, clicks, failed) in zip(crops, volumes):
            params = make_params({"strategy": strategy, "spacing": spacing[vid], **extra})
            slices = [{} for _ in objs]
            scores = np.full((len(objs), gt.shape[0]), np.nan, np.float32)
            t0 = time.perf_counter()
            for i, z, m, s in iter_propagate_masks(vol, seeds, embeddings=emb, **params.__dict__):
                slices[i][z], scores[i, z] = m, s
                n += 1
            if params.smooth_z:  # as propagate_masks finishes an object
                slices = [finish_slices(s, obj) for s, obj in zip(seeds, slices)]
            slices = fuse_views(emb, seeds, slices, scores, params, points=clicks)  # as propagate_object
            t += time.perf_counter() - t0
            masks = [np.zeros(gt.shape, bool) for _ in objs]
            for i, s in enumerate(seeds):
                for z, m in {**slices[i], **s}.items():
                    masks[i][z] = m
            ious += [iou3d(masks[i], gt == lab) for i, lab in enumerate(objs)] + [0.0] * failed
        out["results"][name], out["slices"][name], out["times"][name] = ious, n, t
        log(f"{name}: mean 3D IoU {np.mean(ious):.3f} over {len(ious)} nuclei ({t:.0f} s)")
        if on_strategy is not None:
            on_strategy(out)
    return out


def table(out: dict) -> str:
    crops = out.get("crops", {})
    rows = ["| strategy | mean 3D IoU | median | " + "".join(f"crop {c} | " for c in crops)
            + "propagated slices / nucleus | ms / object-slice |", "|---|---|---|" + "---|" * len(crops) + "---|---|"]
    for name, ious in out["results"].items():
        n = max(len(ious), 1)
        ms = f"{1000 * out['times'][name] / out['slices'][name]:.1f}" if out["slices"][name] else "–"
        per, start = [], 0
        for k in crops.values():
            per.append(f"{np.mean(ious[start:start + k]):.3f} | " if k else "– | ")
            start += k
        rows.append(f"| {name} | {np.mean(ious):.3f} | {np.median(ious):.3f} | {''.join(per)}"
                    f"{out['slices'][name] / n:.1f} | {ms} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint path or name (default: the built-in model)")
    ap.add_argument("--min-voxels", type=int, default=1000)
    ap.add_argument("--strategies", default=None, help="comma-separated strategy keys (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true", help="keep embeddings in memory (no disk cache)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many nuclei per volume (smoke runs)")
    ap.add_argument("--denoise", type=float, default=None,
                    help="Gaussian sigma (pixels) smoothing each slice before the encoder (default: the model's)")
    ap.add_argument("--max-upscale", type=float, default=-1,
                    help="the most a slice is enlarged for the encoder (default: the model's; 0 = no limit)")
    ap.add_argument("--volumes", default=",".join(VOLUMES), help="comma-separated crops to use")
    ap.add_argument("--seed-select", default="iou", choices=("consistency", "iou"),
                    help="which of the 3 candidates of the click starts the object (see propagation.choose_seed)")
    ap.add_argument("--click-side", type=float, default=None, metavar="FRACTION",
                    help="click each nucleus on the first slice where it reaches FRACTION (e.g. 0.4) of its largest "
                         "slice's area, near one end, instead of on its largest slice (the issue's protocol)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here, updated after each strategy")
    args = ap.parse_args(argv)
    if args.click_side is not None and not 0 < args.click_side <= 1:
        ap.error(f"--click-side {args.click_side} must lie in (0, 1]")
    torch.set_num_threads(args.threads)
    from napari_sam.core.build import load_model

    model = load_model(args.model, device="cpu", denoise=args.denoise,
                       max_upscale="checkpoint" if args.max_upscale == -1 else args.max_upscale)
    volumes = tuple(args.volumes.split(","))
    runs = RUNS if args.strategies is None else [r for r in RUNS if r[1] in args.strategies.split(",")]
    model_name = args.model or "builtin"

    def report(out, final=False):
        n = len(next(iter(out["results"].values())))
        text = (f"GoNuclear 3D ({', '.join(volumes)}), {n} nuclei >= {args.min_voxels} voxels, model {model_name}, "
                f"denoise {model.denoise:g} px, max upscale {model.max_upscale or 'none'}, seed by {args.seed_select}, "
                + ("clicked on the largest slice" if args.click_side is None else
                   f"clicked on the first slice at {args.click_side:g} of the largest area") + "; "
                f"prompted-slice 2D IoU {np.mean(out['seed_iou']):.3f}\n\n"
                f"{table(out)}\n")
        best = max(out["results"], key=lambda k: np.mean(out["results"][k]))
        text += f"\nbest: {best} ({np.mean(out['results'][best]):.3f})\n"
        if args.out:
            args.out.write_text(text)
        if args.json:
            args.json.write_text(json.dumps({
                "results": {k: [float(x) for x in v] for k, v in out["results"].items()},
                "slices": out["slices"], "times": out["times"], "seed_iou": [float(x) for x in out["seed_iou"]],
                "crops": out["crops"], "denoise": model.denoise, "max_upscale": model.max_upscale,
                "seed_select": args.seed_select, "click_side": args.click_side,
            }, indent=1))
        if final:
            print(text)

    out = evaluate(model, runs, args.min_voxels, cache=not args.no_cache, log=lambda s: print(s, file=sys.stderr),
                   limit=args.limit, on_strategy=report, crops=volumes, seed_select=args.seed_select,
                   side=args.click_side)
    report(out, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
