"""What the scripts that tune a checkpoint on a split of dsb2018_full share (choose_refine, choose_threshold,
calibrate_candidates): their common arguments, and the split's images and labels."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with ``checkpoint``, ``--data`` (dsb2018_full) and ``--split`` (val); ``doc``: the script's
    docstring, whose first line describes it."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_full")
    ap.add_argument("--split", default="val")
    return ap


def split_items(data: Path, split: str) -> list[tuple]:
    """(id, image (H, W, 3) uint8, labels (H, W) int, modality) for every image of ``split`` in ``data``'s
    split.csv, in the file's order."""
    from napari_sam.core.training.data import read_array, read_split

    return [(r["id"], read_array(data / "images" / f"{r['id']}.png")[..., :3],
             read_array(data / "labels" / f"{r['id']}.tif"), r.get("modality", ""))
            for r in read_split(data / "split.csv", split)]
