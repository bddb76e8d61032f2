"""Pack the train and val splits of ``dsb2018_full`` compactly for a machine that cannot read ``../shared``.

Grey images (R == G == B) are stored as one-channel PNGs; the loader gives back the same RGB pixels
(``to_rgb_uint8`` repeats uint8 grey unchanged). Labels are copied; ``split.csv`` keeps the packed rows.

    python scripts/pack_training_data.py ../shared/data/dsb2018_full .gpu/dsb   # ~40 MB
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np


def main(src: str, dst: str, splits: tuple[str, ...] = ("train", "val")) -> None:
    src_p, dst_p = Path(src), Path(dst)
    (dst_p / "images").mkdir(parents=True, exist_ok=True)
    (dst_p / "labels").mkdir(exist_ok=True)
    with open(src_p / "split.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if r["split"] in splits]
    for r in rows:
        img = iio.imread(src_p / "images" / f"{r['id']}.png")
        grey = img.ndim == 3 and all(np.array_equal(img[..., 0], img[..., c]) for c in (1, 2))
        iio.imwrite(dst_p / "images" / f"{r['id']}.png", img[..., 0] if grey else img)
        shutil.copyfile(src_p / "labels" / f"{r['id']}.tif", dst_p / "labels" / f"{r['id']}.tif")
    with open(dst_p / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"packed {len(rows)} images of {', '.join(splits)} into {dst_p}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
