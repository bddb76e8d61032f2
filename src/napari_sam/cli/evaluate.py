"""``napari-sam evaluate``: the paper's protocol (centre point, box, k clicks) on image + label folders."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import add_denoise_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="mIoU of a model for point / box / click prompts on labelled images",
                       description=__doc__)
    p.add_argument("--images", required=True, help="image folder (<name>_image.* files, or images/<id>.png)")
    p.add_argument("--labels", default=None, help="label folder (default: the image folder, <name>_label.tif)")
    p.add_argument("--split-csv", default=None, help="CSV id,split,modality (dsb2018_full); groups by modality")
    p.add_argument("--split", default="test", help="split to evaluate with --split-csv")
    p.add_argument("--model", default=None, help="model name or checkpoint path (default: the built-in model)")
    add_denoise_argument(p)
    p.add_argument("--zoom-window", type=int, default=None,
                   help="decode small objects of larger images from windows of this many pixels (default: the "
                        "model's, 256 for the built-in model; 0 = always the whole image)")
    p.add_argument("--refine", choices=("model", "on", "off"), default="model",
                   help="feed each click round the previous mask's logits: on (the paper), off, or model: as the "
                        "model does (the built-in model: off; official checkpoints: on)")
    p.add_argument("--mask-threshold", type=float, default=None, metavar="LOGIT",
                   help="the logit above which a pixel is in a mask (default: the model's; the built-in model's was "
                        "chosen on val, official checkpoints use the paper's 0)")
    p.add_argument("--enforce-negatives", action="store_true",
                   help="the annotator's click protocol: each mask loses what its negative clicks mark")
    p.add_argument("--follow-positives", action="store_true",
                   help="the annotator's click protocol: a mask that leaves out a positive click is decoded again "
                        "with a box around it, the previous mask and the positive clicks")
    p.add_argument("--prompt", nargs="+", default=["point", "box", "clicks"], choices=("point", "box", "clicks"))
    p.add_argument("--clicks", type=int, default=5, help="number of interactive clicks (1..10)")
    p.add_argument("--max-objects", type=int, default=None, help="evaluate a fixed random sample per image")
    p.add_argument("--slices", type=int, default=None, help="for 3D stacks: evaluate every n-th z slice, e.g. 4")
    p.add_argument("--name", default=None, help="data set name in the results (default: the folder name)")
    p.add_argument("--out", required=True, help="JSON results file (a .md table is written beside it)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def iter_items(args: argparse.Namespace):
    """(name, image, labels, group) from the folders; 3D stacks are split into z slices."""
    import numpy as np

    from napari_sam.core.training.data import pairs_from_folder, read_array, read_split

    if args.split_csv:
        root = Path(args.images)
        rows = sorted(read_split(args.split_csv, args.split), key=lambda r: r["id"])
        lab_dir = Path(args.labels) if args.labels else root / "labels"
        img_dir = root / "images" if (root / "images").is_dir() else root
        for r in rows:
            lp = lab_dir / f"{r['id']}.tif"
            if not lp.is_file():
                raise FileNotFoundError(f"label file {lp} is missing for image {r['id']}")
            yield r["id"], read_array(img_dir / f"{r['id']}.png"), read_array(lp), r.get("modality", "")
        return
    step = args.slices or 1
    for ip, lp in pairs_from_folder(args.images, args.labels):  # (a list: every label file is found first)
        img, lab = read_array(ip), read_array(lp)
        if lab.ndim not in (2, 3) or img.shape[:lab.ndim] != lab.shape or img.ndim > lab.ndim + 1:
            raise ValueError(f"{lp.name} has shape {lab.shape} but {ip.name} has {img.shape}: labels must be "
                             "(H, W) for an (H, W) or (H, W, 3) image, or (Z, H, W) for a (Z, H, W) stack")
        if lab.ndim == 3:
            for z in range(0, lab.shape[0], step):
                if lab[z].any():
                    yield f"{ip.stem}[z={z}]", np.asarray(img[z]), np.asarray(lab[z]), ""
        else:
            yield ip.stem, img, lab, ""


def run(args: argparse.Namespace) -> int:
    import torch

    from napari_sam.core.build import load_model
    from napari_sam.core.evaluation import EvalResult, evaluate_dataset, markdown_table, write_results
    from napari_sam.core.messages import first_line

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.clicks <= 10:
        raise ValueError(f"--clicks must be between 1 and 10, got {args.clicks}")
    for flag in ("max_objects", "slices"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    out = Path(args.out)
    if out.suffix.lower() == ".md":
        raise ValueError(f"--out {out} is the JSON results file (the markdown table is written beside it, as .md): "
                         f"give it a .json name, e.g. {out.with_suffix('.json')}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'results.json'}")
    model = load_model(args.model, device="cpu", denoise=args.denoise,
                       zoom_window="checkpoint" if args.zoom_window is None else args.zoom_window,
                       refine_logits="checkpoint" if args.refine == "model" else args.refine == "on",
                       mask_threshold="checkpoint" if args.mask_threshold is None else args.mask_threshold)
    name = args.name or Path(args.images).resolve().name
    t0 = time.time()
    res = EvalResult(name, args.clicks)
    try:
        evaluate_dataset(model, iter_items(args), name, args.prompt, args.clicks, args.max_objects,
                         progress=lambda i, n: print(f"\r{i} images", end="", file=sys.stderr, flush=True),
                         enforce_negatives=args.enforce_negatives, follow_positives=args.follow_positives, into=res)
    except (Exception, KeyboardInterrupt) as exc:
        if not res.per_image:
            raise
        # keep what was measured: the images done so far go to a file of their own, marked incomplete
        partial = out.with_name(out.stem + ".partial.json")
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else first_line(exc)
        summary = _summary(res, args, model, t0)
        summary["incomplete"] = f"stopped after {len(res.per_image)} image(s), at the one after " \
                                f"{res.per_image[-1]['name']!r}: {why}"
        write_results([summary], partial, partial.with_suffix(".md"))
        print(f"\nnapari-sam evaluate: the {len(res.per_image)} image(s) done so far are in {partial} "
              f"(and {partial.with_suffix('.md').name})", file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise
    summary = _summary(res, args, model, t0)
    write_results([summary], out, out.with_suffix(".md"))
    print(file=sys.stderr)
    print(markdown_table([summary]))
    print(json.dumps(summary["all"]))
    return 0


def _summary(res, args: argparse.Namespace, model, t0: float) -> dict:
    """The results file's content: the mIoUs and the settings they were measured with."""
    from napari_sam.core.build import refine_logits_of

    summary = res.summary()
    summary["model"] = str(args.model or "builtin")
    summary["max_objects"] = args.max_objects
    summary["zoom_window"] = getattr(model, "zoom_window", None)
    summary["refine_logits"] = refine_logits_of(model)
    summary["mask_threshold"] = float(model.mask_threshold)
    summary["enforce_negatives"] = args.enforce_negatives
    summary["follow_positives"] = args.follow_positives
    summary["seconds"] = round(time.time() - t0, 1)
    return summary
