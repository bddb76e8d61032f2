"""Speed of the built-in model on CPU: image-encoder time at 512x512 and prompt->mask latency.

With zoomed decoding (the built-in model's ``zoom_window``), a click on a nucleus of this 520x696 image (a `val`
image of ../shared/data/dsb2018_full; random pixels where it is absent) is decoded from the
256-px window around it: ``point_ms`` is a prompt in a window already encoded, ``point_new_window_ms`` the first
prompt in a new one (one more encoder pass). The box spans more than half a window, so it uses the whole image.

Compared in the same run with MobileSAM's TinyViT architecture (vit_t, 1024 px; random weights, same code
path), printed as ratios. Usage: python benchmarks/bench_builtin.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def bench(model, image: np.ndarray, repeats: int, point: tuple[float, float] | None = None) -> dict[str, float]:
    from napari_sam.core.predictor import SamPredictor

    pred = SamPredictor(model)
    s = model.img_size
    x = torch.rand(1, 3, s, s) * 255
    with torch.inference_mode():
        enc = _median_ms(lambda: model.image_encoder(model.preprocess(x)), repeats)
    embed = _median_ms(lambda: pred.set_image(image), max(3, repeats // 2))
    pred.set_image(image)
    h, w = image.shape[:2]
    pts = np.array([point if point is not None else (h / 2, w / 2)], np.float64)
    point = _median_ms(lambda: pred.predict(points=pts, multimask=False), repeats * 3)
    point3 = _median_ms(lambda: pred.predict(points=pts, multimask=True), repeats * 3)
    emb = pred._require()

    def new_window():
        if emb.source is not None:
            emb.source.cache.clear()
        pred.predict(points=pts, multimask=False)

    point_new = _median_ms(new_window, repeats)
    box = _median_ms(lambda: pred.predict(box=np.array([h / 4, w / 4, h / 2, w / 2]), multimask=False), repeats * 3)
    return {"encoder_ms": enc, "set_image_ms": embed, "point_ms": point, "point_multimask_ms": point3,
            "point_new_window_ms": point_new, "box_ms": box,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def real_image() -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """The first 520x696 `val` image of ../shared/data/dsb2018_full (a typical DSB size) and the centre of its
    nucleus nearest the image centre; random pixels of that size when the data is absent."""
    import csv
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018_full"
    if not (d / "split.csv").is_file():
        return (np.random.default_rng(0).random((520, 696, 3)) * 255).astype(np.uint8), None, "random 520x696 RGB"
    import imageio.v3 as iio
    import tifffile
    from scipy import ndimage

    with open(d / "split.csv", newline="") as f:
        i = next(r["id"] for r in csv.DictReader(f) if r["split"] == "val" and r["height"] == "520")
    image, labels = iio.imread(d / "images" / f"{i}.png")[..., :3], tifffile.imread(d / "labels" / f"{i}.tif")
    ids = np.unique(labels[labels > 0])
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, ids))
    c = centres[np.argmin(((centres - np.array(labels.shape) / 2) ** 2).sum(1))]
    return image, (float(c[0]), float(c[1])), f"dsb2018_full val image {i[:8]} (520x696), a click on a nucleus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from napari_sam.core.build import build_sam, load_model

    image, point, what = real_image()
    ours = bench(load_model(args.model, device="cpu"), image, args.repeats, point)
    flat = bench(load_model(args.model, device="cpu", zoom_window=0), image, args.repeats, point)
    ref = bench(build_sam("vit_t").eval(), image, max(3, args.repeats // 3), point)
    print(f"threads={args.threads}, {what}, median of repeats")
    print("| metric | built-in (nsam_t, 512 px) | built-in, zoom off | MobileSAM vit_t (1024 px) "
          "| ratio built-in / vit_t |")
    print("|---|---|---|---|---|")
    for k in ours:
        print(f"| {k} | {ours[k]:.1f} | {flat[k]:.1f} | {ref[k]:.1f} | {ours[k] / ref[k]:.2f} |")


if __name__ == "__main__":
    main()
