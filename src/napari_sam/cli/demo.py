"""``napari-sam demo``: segment everything in a sample image with the built-in model, headless and offline.

Writes OUT/labels.tif (instance labels, uint16) and OUT/overlay.png (the image with coloured objects and
their outlines). Without --image it uses scikit-image's bundled immunohistochemistry sample (512 x 512 RGB,
hematoxylin-stained nuclei), so it runs with nothing but the installed packages.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .segment import _Bar, add_amg_args, make_generator, read_planes, write_labels


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="segment a sample image with the built-in model; write labels.tif and overlay.png",
                       description=__doc__)
    p.add_argument("--image", default=None, help="a 2D image file (default: a bundled scikit-image sample)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true")
    add_amg_args(p)
    p.set_defaults(func=run)


def sample_image() -> np.ndarray:
    """The default demo image: skimage.data.immunohistochemistry(), (512, 512, 3) uint8, bundled (no download)."""
    from skimage import data

    return data.immunohistochemistry()


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image with each object tinted in its own colour and outlined."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    from napari_sam.core.image import to_rgb_uint8

    rgb = to_rgb_uint8(image)
    if labels.max() == 0:
        return rgb
    out = label2rgb(labels, image=rgb, alpha=0.35, bg_label=0, image_alpha=1.0)
    out = (np.clip(out, 0, 1) * 255).astype(np.uint8)
    out[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return out


def run(args: argparse.Namespace) -> int:
    import imageio.v3 as iio

    from napari_sam.core.amg import segment_everything

    if args.image is None:
        image, name = sample_image(), "skimage.data.immunohistochemistry()"
    else:
        image, stack = read_planes(Path(args.image))
        if stack:
            raise ValueError(f"{args.image} is a stack of shape {image.shape}; the demo takes one 2D image "
                             "(use `napari-sam segment` for stacks)")
        name = args.image
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    gen = make_generator(args)
    model_name = getattr(gen.model.config, "name", "?")
    print(f"segmenting {name} {image.shape} with model {args.model or 'built-in'} ({model_name})", file=sys.stderr)
    t1 = time.time()
    labels = segment_everything(image, gen, min_object_area=args.min_object_area,
                                progress=_Bar(args.quiet, "segment everything"))
    t2 = time.time()
    write_labels(out / "labels.tif", labels)
    iio.imwrite(out / "overlay.png", overlay(image, labels))
    n = int(labels.max())
    areas = np.bincount(labels.ravel())[1:]
    print(f"\n{n} objects (median area {int(np.median(areas)) if n else 0} px) in {t2 - t1:.1f} s "
          f"(model load {t1 - t0:.1f} s) -> {out / 'labels.tif'}, {out / 'overlay.png'}", file=sys.stderr)
    return 0
