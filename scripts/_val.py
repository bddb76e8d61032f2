"""What the scripts that tune a checkpoint on a split of dsb2018_full share (choose_refine, choose_threshold,
calibrate_candidates): their common arguments, the split's images and labels, and writing the choice into the
checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str, clicks: bool = False) -> argparse.ArgumentParser:
    """An argument parser with ``checkpoint``, ``--data`` (dsb2018_full) and ``--split`` (val), and with ``clicks``
    also ``--clicks`` (5) and ``--threads``; ``doc``: the script's docstring, whose first line describes it."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_full")
    ap.add_argument("--split", default="val")
    if clicks:
        ap.add_argument("--clicks", type=int, default=5)
        ap.add_argument("--threads", type=int, default=None)
    return ap


def split_items(data: Path, split: str) -> list[tuple]:
    """(id, image (H, W, 3) uint8, labels (H, W) int, modality) for every image of ``split`` in ``data``'s
    split.csv, in the file's order."""
    from napari_sam.core.training.data import read_array, read_split

    return [(r["id"], read_array(data / "images" / f"{r['id']}.png")[..., :3],
             read_array(data / "labels" / f"{r['id']}.tif"), r.get("modality", ""))
            for r in read_split(data / "split.csv", split)]


def model_and_items(args: argparse.Namespace):
    """The checkpoint's model (on the CPU, with ``args.threads`` torch threads if given) and its split's items."""
    import torch

    from napari_sam.core.build import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_model(args.checkpoint, device="cpu"), split_items(args.data, args.split)


def store(checkpoint: Path, edit=None, **entries) -> None:
    """Write ``entries`` (a setting and how it was chosen) into the checkpoint file, after ``edit(obj)`` changes its
    weights if given, atomically."""
    import torch

    from napari_sam.core.build import write_checkpoint_file

    obj = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if edit is not None:
        edit(obj)
    obj.update(entries)
    write_checkpoint_file(obj, checkpoint)
    print(f"wrote {checkpoint}: " + ", ".join(f"{k}={v}" for k, v in entries.items() if not k.endswith("_source")))
