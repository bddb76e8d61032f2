"""Install a trained checkpoint as the built-in model (src/napari_sam/models/builtin_nuclei.pt, fp16).

Usage: python scripts/install_builtin.py runs/nsam_t_wbce/best.pt

Checks that the fp16 copy predicts like the float32 original (same quick validation on the val subset)
before replacing the shipped file. The file also records ``max_upscale``: the most the training images were
enlarged to fill the model's input (512 / the smallest long side of the train split), so that smaller images
are shown to the model at a scale it was trained on (see napari_sam.set_max_upscale), and ``zoom_window``: that
smallest long side, so that small objects of larger images are decoded from a window of that size shown at the same
scale (see napari_sam.set_zoom_window).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_full")
    ap.add_argument("--val-limit", type=int, default=12)
    args = ap.parse_args(argv)

    import torch

    from napari_sam.core.build import build_sam, builtin_checkpoint_path, load_model, read_checkpoint, save_checkpoint
    from napari_sam.core.config import MODEL_CONFIGS
    from napari_sam.core.training.data import load_split_folder
    from napari_sam.core.training.validate import quick_eval

    from napari_sam.core.training.data import read_split

    cfg, sd, meta = read_checkpoint(args.checkpoint)
    smallest = min(max(int(r["height"]), int(r["width"])) for r in read_split(args.data / "split.csv", "train"))
    # a registered config's current definition wins (e.g. checkpoints written before a field existed)
    model = build_sam(MODEL_CONFIGS.get(cfg.name, cfg))
    model.load_state_dict(sd)
    model.eval()
    meta["max_upscale"] = round(model.img_size / smallest, 3)
    meta["zoom_window"] = int(smallest)
    val = load_split_folder(args.data, "val", model.img_size, limit=args.val_limit)
    ref = quick_eval(model, val)
    out = builtin_checkpoint_path()
    tmp = out.with_suffix(".new.pt")
    save_checkpoint(model, tmp, half=True, **meta)
    half = quick_eval(load_model(tmp, device="cpu"), val)
    print(f"float32: {ref}\nfp16 file: {half}")
    if abs(half["box"] - ref["box"]) > 0.01 or abs(half["point"] - ref["point"]) > 0.01:
        tmp.unlink()
        print("fp16 copy differs from the original by more than 0.01 mIoU; not installed", file=sys.stderr)
        return 1
    tmp.replace(out)
    print(f"installed {out} ({out.stat().st_size / 1e6:.1f} MB), step {meta.get('step')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
