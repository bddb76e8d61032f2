"""Segment-everything quality on dsb2018_full: instance F1 at IoU 0.5 and mean matched IoU.

Usage::

    .venv/bin/python benchmarks/eval_amg.py                           # built-in model, test split, all images
    .venv/bin/python benchmarks/eval_amg.py --model runs/builtin/last.pt --limit 20 --reference-limit 8
    .venv/bin/python benchmarks/eval_amg.py --tune-on val --limit 20  # pick live thresholds on val, then test
    .venv/bin/python benchmarks/eval_amg.py --fit-scorer 160 --tune-on val --tune-limit 64 \
        --store-thresholds src/napari_sam/models/builtin_nuclei.pt     # how the built-in model's settings were made

Compares, with the SAME model:
  * ``ours``      — our generator + label image with clean-up (islands/holes < 16 px), thresholds tuned on
                    the val split with --tune-on val, else the model's recommended ones (= segment_everything);
  * ``ours@ref``  — our AutomaticMaskGenerator at the reference's default parameters, records painted with
                    no clean-up (what the reference pipeline produces, at our speed);
  * ``meta@ref``  — Meta's SamAutomaticMaskGenerator itself at its defaults (on --reference-limit images;
                    slow), fed our model object (our modules are drop-in compatible).
Images are the first N of the split in split.csv order (deterministic). Never tunes on test.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018_full"
REF_DEFAULTS = dict(points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95, box_nms_thresh=0.7)


def match_stats(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> tuple[int, int, int, list[float]]:
    """(TP, FP, FN, IoUs of matched pairs) for two instance label images; IoU > thr matches are unique."""
    g = gt.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    ng, npred = int(g.max()) + 1, int(p.max()) + 1
    inter = np.bincount(g * npred + p, minlength=ng * npred).reshape(ng, npred)
    area_g, area_p = inter.sum(1), inter.sum(0)
    inter = inter[1:, 1:]
    union = area_g[1:, None] + area_p[None, 1:] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    gi, pi = np.nonzero(iou > thr)
    n_gt, n_pred = int((area_g[1:] > 0).sum()), int((area_p[1:] > 0).sum())
    tp = len(gi)
    return tp, n_pred - tp, n_gt - tp, iou[gi, pi].tolist()


def summarize(stats: list[tuple]) -> dict:
    tp = sum(s[0] for s in stats)
    fp = sum(s[1] for s in stats)
    fn = sum(s[2] for s in stats)
    ious = [v for s in stats for v in s[3]]
    return {"images": len(stats), "TP": tp, "FP": fp, "FN": fn,
            "F1@0.5": round(2 * tp / max(2 * tp + fp + fn, 1), 4),
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
            "mean_matched_IoU": round(float(np.mean(ious)) if ious else 0.0, 4)}


def load_split(split: str, limit: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    import imageio.v3 as iio
    import tifffile

    with open(DATA / "split.csv") as f:
        ids = [r["id"] for r in csv.DictReader(f) if r["split"] == split]
    ids = ids[:limit] if limit else ids
    return [(i, iio.imread(DATA / "images" / f"{i}.png"), tifffile.imread(DATA / "labels" / f"{i}.tif")) for i in ids]


def tune_grid(rescore: bool):
    """(pred_iou, stability, box NMS) choices: the decoder's IoU head, or the learned scorer's IoU estimate."""
    if rescore:  # the scorer's estimate is calibrated: a finer threshold range, and stability mostly left to it
        return ((0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7), (0.5, 0.7), (0.3, 0.4, 0.5))
    return ((0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.88), (0.5, 0.7, 0.85, 0.95), (0.3, 0.4, 0.5, 0.7))


def tune(gen, images, min_area_choices=(0, 16, 48), parts_choices=(False, True)) -> dict:
    """Grid over the live thresholds on kept model outputs (one model run per image): best F1 on ``images``.
    With a candidate scorer in the model's checkpoint, also over rescore on / off."""
    from napari_sam.core.labels import records_to_labels

    props = [(gen.propose(img, iou_floor=0.3, stability_floor=0.5), gt) for _, img, gt in images]
    if gen.scorer is not None:
        report_scorer(props)
    best = None
    for rescore in ((False, True) if gen.scorer is not None else (False,)):
        pious, stabs, nmss = tune_grid(rescore)
        for piou in pious:
            for stab in stabs:
                for nms in nmss:
                    for parts in parts_choices:
                        recs = [(pr.filter(pred_iou_thresh=piou, stability_score_thresh=stab, box_nms_thresh=nms,
                                           resolve_parts=parts, rescore=rescore), gt) for pr, gt in props]
                        for ma in min_area_choices:
                            stats = [match_stats(gt, records_to_labels(r, gt.shape, ma)) for r, gt in recs]
                            f1 = summarize(stats)["F1@0.5"]
                            if best is None or f1 > best[0]:
                                best = (f1, dict(pred_iou_thresh=piou, stability_score_thresh=stab,
                                                 box_nms_thresh=nms, resolve_parts=parts, rescore=rescore,
                                                 min_object_area=ma))
        print(f"best so far (rescore {rescore}): F1@0.5 {best[0]:.4f} with {best[1]}", file=sys.stderr, flush=True)
    print(f"tuned on {len(images)} val images: F1@0.5 {best[0]:.4f} with {best[1]}", file=sys.stderr)
    return {**best[1], "F1@0.5": best[0]}


def scorer_data(props_gt: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, true IoU and the decoder's predicted IoU of the candidates the scorer judges, over (proposals,
    ground truth) pairs."""
    from napari_sam.core.amg_quality import DEFAULT_FLOORS, FEATURES, candidate_features, scored_candidates, true_iou

    xs, ys, heads = [np.zeros((0, len(FEATURES)))], [np.zeros(0)], [np.zeros(0)]
    for pr, gt in props_gt:
        floors = pr.scorer.floors if pr.scorer is not None else DEFAULT_FLOORS
        for crop in pr.crops:
            idx = scored_candidates(crop, floors)
            xs.append(candidate_features(crop, idx, pr.maps()))
            ys.append(true_iou([crop.mask(int(i)) for i in idx], gt))
            heads.append(crop.iou[idx].astype(np.float64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(heads)


def report_scorer(props_gt: list) -> dict:
    """Mean squared error of the learned scorer and of the decoder's IoU head against the candidates' true IoU."""
    x, y, head = scorer_data(props_gt)
    scorer = props_gt[0][0].scorer
    out = {"candidates": len(y), "mse_scorer": float(((scorer(x) - y) ** 2).mean()),
           "mse_iou_head": float(((head - y) ** 2).mean())}
    print(f"candidate IoU estimate on {len(props_gt)} images, {len(y)} candidates: MSE scorer "
          f"{out['mse_scorer']:.4f}, decoder IoU head {out['mse_iou_head']:.4f}", file=sys.stderr, flush=True)
    return out


def fit_scorer(model, images, crop_n_layers: int = 0):
    """Fit a candidate scorer on the candidates of ``images`` (floors 0.3 / 0.5) and attach it to ``model``'s
    metadata (``amg_quality``), so that generators built from ``model`` afterwards have it."""
    from napari_sam.core.amg import AutomaticMaskGenerator
    from napari_sam.core.amg_quality import DEFAULT_FLOORS, fit_candidate_scorer

    gen = AutomaticMaskGenerator(model, pred_iou_thresh=DEFAULT_FLOORS["pred_iou_thresh"],
                                 stability_score_thresh=DEFAULT_FLOORS["stability_score_thresh"],
                                 crop_n_layers=crop_n_layers)
    t = time.perf_counter()
    props = []
    for k, (name, img, gt) in enumerate(images):
        props.append((gen.propose(img), gt))
        if (k + 1) % 20 == 0:
            print(f"scorer data: {k + 1}/{len(images)} images", file=sys.stderr, flush=True)
    x, y, head = scorer_data(props)
    scorer = fit_candidate_scorer(x, y, source=f"benchmarks/eval_amg.py --fit-scorer: the candidates of the first "
                                  f"{len(images)} dsb2018_full train images ({len(y)} candidates)")
    print(f"fitted the candidate scorer on {len(y)} candidates of {len(images)} train images in "
          f"{time.perf_counter() - t:.0f} s: train MSE {float(((scorer(x) - y) ** 2).mean()):.4f} (decoder IoU "
          f"head {float(((head - y) ** 2).mean()):.4f})", file=sys.stderr, flush=True)
    model.checkpoint_meta = {**(getattr(model, "checkpoint_meta", None) or {}), "amg_quality": scorer.state()}
    return scorer


def store_thresholds(path: Path, params: dict, source: str, crop_n_layers: int = 0, scorer=None) -> None:
    """Write tuned live thresholds (``amg_thresholds``), the crop layers they were tuned with, the tuned
    part / merge resolution and rescoring (``amg_settings``) and a fitted candidate scorer (``amg_quality``)
    into a checkpoint's metadata, atomically."""
    import torch

    from napari_sam.core.build import write_checkpoint_file

    obj = torch.load(path, map_location="cpu", weights_only=False)
    obj["amg_thresholds"] = {k: float(params[k]) for k in ("pred_iou_thresh", "stability_score_thresh",
                                                             "box_nms_thresh")}
    obj["amg_settings"] = {"crop_n_layers": int(crop_n_layers), "resolve_parts": int(bool(params["resolve_parts"])),
                           "rescore": int(bool(params.get("rescore", False))),
                           "min_object_area": int(params["min_object_area"])}
    if scorer is not None:
        obj["amg_quality"] = scorer.state()
    obj["amg_thresholds_source"] = source
    write_checkpoint_file(obj, path)
    print(f"stored {obj['amg_thresholds']}, {obj['amg_settings']} in {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name / checkpoint (default: the built-in model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N images of the split")
    ap.add_argument("--reference-limit", type=int, default=0, help="also run Meta's generator on the first N")
    ap.add_argument("--tune-on", default=None, help="split to tune live thresholds on (e.g. val), never test")
    ap.add_argument("--tune-limit", type=int, default=16)
    ap.add_argument("--store-thresholds", type=Path, default=None,
                    help="write the tuned thresholds into this checkpoint's metadata (e.g. the built-in model file)")
    ap.add_argument("--crop-n-layers", type=int, default=None,
                    help="our generator's crop layers (default: the model's recommended setting, else 0); the "
                         "reference-parameter rows always use 0, the reference's default")
    ap.add_argument("--fit-scorer", type=int, default=0, metavar="N",
                    help="fit a learned candidate scorer on the first N train images' candidates, then tune with "
                         "and without it (with --tune-on); --store-thresholds stores it too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.tune_on == "test":
        ap.error("never tune on the test split")
    import torch

    from napari_sam.core.amg import AutomaticMaskGenerator
    from napari_sam.core.build import load_model
    from napari_sam.core.labels import records_to_labels

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    images = load_split(args.split, args.limit)
    from napari_sam.core.amg import default_min_object_area, recommended_settings, recommended_thresholds

    rec = recommended_settings(model)
    crop = rec.get("crop_n_layers", 0) if args.crop_n_layers is None else args.crop_n_layers
    scorer = fit_scorer(model, load_split("train", args.fit_scorer), crop) if args.fit_scorer else None
    # what segment_everything uses
    ours_params = dict(recommended_thresholds(model), min_object_area=default_min_object_area(model),
                       resolve_parts=bool(rec.get("resolve_parts", 0)), rescore=bool(rec.get("rescore", 0)))
    if args.tune_on:
        ours_params = tune(AutomaticMaskGenerator(model, pred_iou_thresh=0.3, stability_score_thresh=0.5,
                                                  crop_n_layers=crop), load_split(args.tune_on, args.tune_limit))
        f1 = ours_params.pop("F1@0.5")
        if args.store_thresholds:
            store_thresholds(args.store_thresholds, ours_params, f"benchmarks/eval_amg.py tune() on the first "
                             f"{args.tune_limit} dsb2018_full {args.tune_on} images with {crop} crop layer(s): "
                             f"F1@0.5 {f1:.3f}", crop, scorer)
    min_area = ours_params.pop("min_object_area")
    ours_th = {**REF_DEFAULTS, **ours_params}
    ours_th.pop("points_per_side")
    ref_th = {k: v for k, v in REF_DEFAULTS.items() if k != "points_per_side"}
    # without crop layers one model run per image serves both settings: kept outputs are re-filtered (equal to a
    # fresh run, tested); with them, the reference-parameter row runs its own generator without crops
    gen = AutomaticMaskGenerator(model, points_per_side=REF_DEFAULTS["points_per_side"], crop_n_layers=crop,
                                 rescore=ours_th["rescore"])
    gen_ref = gen if crop == 0 else AutomaticMaskGenerator(model, points_per_side=REF_DEFAULTS["points_per_side"])
    floors = dict(iou_floor=min(ours_th["pred_iou_thresh"], ref_th["pred_iou_thresh"]),
                  stability_floor=min(ours_th["stability_score_thresh"], ref_th["stability_score_thresh"]))
    results: dict[str, list] = {"ours": [], "ours@ref": [], "meta@ref": []}
    times: dict[str, float] = {k: 0.0 for k in results}
    meta = None
    if args.reference_limit:
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest  # torchvision stand-ins for Meta's package (tested in the test suite)

        conftest._install_reference_stubs()
        from segment_anything import SamAutomaticMaskGenerator

        meta = SamAutomaticMaskGenerator(model, **REF_DEFAULTS)
    for k, (name, img, gt) in enumerate(images):
        t = time.perf_counter()
        props = gen.propose(img, **floors)
        t_model = time.perf_counter() - t
        props_ref, t_ref = props, t_model
        if gen_ref is not gen:
            t = time.perf_counter()
            props_ref = gen_ref.propose(img, **floors)
            t_ref = time.perf_counter() - t
        for key, th, ma, pr, tm in (("ours", ours_th, min_area, props, t_model),
                                    ("ours@ref", ref_th, 0, props_ref, t_ref)):
            t = time.perf_counter()
            recs = pr.filter(**th)
            results[key].append(match_stats(gt, records_to_labels(recs, gt.shape, ma)))
            times[key] += tm + time.perf_counter() - t
        if meta is not None and k < args.reference_limit:
            t = time.perf_counter()
            mrecs = meta.generate(img)
            times["meta@ref"] += time.perf_counter() - t
            conv = [{"segmentation": r["segmentation"], "predicted_iou": r["predicted_iou"]} for r in mrecs]
            results["meta@ref"].append(match_stats(gt, records_to_labels(conv, gt.shape, 0)))
        print(f"[{k + 1}/{len(images)}] {name[:12]} gt {int(gt.max())}: " + ", ".join(
            f"{m} F1 {summarize(v)['F1@0.5']:.3f}" for m, v in results.items() if v), file=sys.stderr, flush=True)
    out = {"model": args.model or "built-in", "split": args.split, "ours_params": {**ours_th,
           "min_object_area": min_area, "crop_n_layers": crop}, "reference_params": REF_DEFAULTS}
    print(f"\n| method | images | F1@0.5 | precision | recall | mean matched IoU | s / image |")
    print("|---|---|---|---|---|---|---|")
    for m, v in results.items():
        if not v:
            continue
        s = summarize(v)
        out[m] = {**s, "seconds_per_image": round(times[m] / len(v), 2)}
        print(f"| {m} | {s['images']} | {s['F1@0.5']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | "
              f"{s['mean_matched_IoU']:.3f} | {times[m] / len(v):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
