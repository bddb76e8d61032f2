"""Segment-everything speed and memory: napari-sam vs Meta's SamAutomaticMaskGenerator, same weights, same image.

Usage::

    .venv/bin/python benchmarks/bench_amg.py                         # vit_t (random) + built-in, if present
    .venv/bin/python benchmarks/bench_amg.py --models vit_t --threads 2
    .venv/bin/python benchmarks/bench_amg.py --models builtin --checkpoint runs/builtin/last.pt

Each (model, implementation) runs in a fresh subprocess (peak RSS does not mix), torch limited to --threads.
``vit_t``: random weights (seeded), MobileSAM's own model object for the reference with the same state dict.
``builtin``: the trained nsam_t; the reference generator is given our model object (our modules are drop-in
compatible; Meta's predictor then runs our plain MaskDecoder, not the fast one). Three parameter sets: the
reference defaults, thresholds at 0 (every candidate is upsampled: our worst case), and "recommended" (the
model's own thresholds from its checkpoint, e.g. the built-in model's; else the reference's defaults; ours also
applies the part / merge resolution and the learned candidate scorer the model recommends, which the reference
lacks; the scorer's features are computed inside the timed run). Also
times the live re-filter (new thresholds on kept outputs + label image). One run each, twice: times from a run
with the default allocator (as users run it), peak RSS from a run with a fixed mmap threshold (see bench_engine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_IMAGE = (ROOT.parent / "shared" / "data" / "dsb2018_full" / "images" /
                 "1b518cd2ea84a389c267662840f3d902d0129fab27696215db2488de6d4316c5.png")
PARAMS = {"default": {}, "thresholds0": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
          "recommended": None}  # None: the model's recommended thresholds (napari_sam.core.amg), for both sides


def _models(name: str, checkpoint: str | None):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _install_reference_stubs, randomize_

    from napari_sam.core import build_sam, load_model

    _install_reference_stubs()
    if name == "builtin":
        ours = load_model(checkpoint)
        return ours, ours
    ours = randomize_(build_sam(name), seed=0).eval()
    from mobile_sam import sam_model_registry

    ref = sam_model_registry[name](checkpoint=None)
    ref.load_state_dict(ours.state_dict(), strict=False)
    return ours, ref.eval()


def worker(name: str, impl: str, pset: str, image_path: str, threads: int, checkpoint: str | None) -> dict:
    import torch
    from bench_engine import PeakRSS

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import read_image

    from napari_sam.core.image import to_rgb_uint8

    rgb = to_rgb_uint8(read_image(Path(image_path)))
    ours, ref = _models(name, checkpoint)
    params = PARAMS[pset]
    if params is None:
        from napari_sam.core.amg import recommended_thresholds

        params = recommended_thresholds(ours)
    out: dict = {}
    if impl == "ours":
        from napari_sam.core.amg import AutomaticMaskGenerator
        from napari_sam.core.labels import records_to_labels

        extra = {}
        if pset == "recommended":  # and the model's recommended part / merge resolution and learned candidate
            from napari_sam.core.amg import recommended_settings  # scorer (ours only; not in Meta's)

            rec = recommended_settings(ours)
            extra = {k: bool(rec.get(k, 0)) for k in ("resolve_parts", "rescore")}
        gen = AutomaticMaskGenerator(ours, **params, **extra)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            props = gen.propose(rgb)
            recs = props.filter(**gen.thresholds())
            masks = [r["segmentation_patch"].full(rgb.shape[:2]) for r in recs]  # same output as generate()
            out["generate_s"] = time.perf_counter() - t0
        out["peak_mb"] = mem.delta_mb
        out["masks"] = len(masks)
        del masks
        th = {**gen.thresholds(), "box_nms_thresh": 0.5}
        records_to_labels(props.filter(**gen.thresholds()), rgb.shape[:2], 16)  # warm: imports, mask cache
        t0 = time.perf_counter()
        recs = props.filter(**th)
        records_to_labels(recs, rgb.shape[:2], 16)
        out["refilter_ms"] = 1000 * (time.perf_counter() - t0)
        out["refilter_masks"] = len(recs)
    else:
        from segment_anything import SamAutomaticMaskGenerator

        gen = SamAutomaticMaskGenerator(ref, **params)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            recs = gen.generate(rgb)
            out["generate_s"] = time.perf_counter() - t0
        out["peak_mb"] = mem.delta_mb
        out["masks"] = len(recs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_t", "builtin"])
    p.add_argument("--checkpoint", default=None, help="checkpoint for 'builtin' (default: the packaged model)")
    p.add_argument("--params", nargs="+", default=list(PARAMS))
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "IMPL", "PARAMS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.image, a.threads, a.checkpoint)))
        return 0
    # as in bench_engine: a timing pass with the default allocator, as users run it, and a memory pass with a fixed
    # mmap threshold, so that freed large blocks go back to the OS and the peak RSS increase measures the run alone
    envs = {"time": dict(os.environ), "memory": dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")}
    rows = []
    for name in a.models:
        if name == "builtin" and a.checkpoint is None:
            from napari_sam.core.build import BUILTIN_FILE

            if not (ROOT / "src" / "napari_sam" / "models" / BUILTIN_FILE).is_file():
                print("built-in model not found; skipping 'builtin' (pass --checkpoint)", file=sys.stderr)
                continue
        for pset in a.params:
            res = {}
            for impl in ("ours", "reference"):
                cmd = [sys.executable, __file__, "--worker", name, impl, pset, "--image", a.image,
                       "--threads", str(a.threads)] + (["--checkpoint", a.checkpoint] if a.checkpoint else [])
                passes = {}
                for measure, env in envs.items():
                    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                    if r.returncode:
                        print(r.stderr)
                        return r.returncode
                    passes[measure] = json.loads(r.stdout.strip().splitlines()[-1])
                # time (and the live re-filter) from the timing pass, peak RSS from the memory pass
                res[impl] = {**passes["time"], "peak_mb": passes["memory"]["peak_mb"],
                             "generate_s_fixed_mmap": passes["memory"]["generate_s"]}
                print(f"{name} {pset} {impl}: {res[impl]}", file=sys.stderr, flush=True)
            rows.append((name, pset, res["ours"], res["reference"]))
    import torch

    print(f"\nImage {Path(a.image).name}; torch {torch.__version__}, {a.threads} threads, one run each "
          "(time: default allocator; memory: fixed mmap threshold).\n")
    print("| model | parameters | masks (ref / ours) | reference | ours | speed-up | peak RSS increase (ref / ours) "
          "| memory ratio | live re-filter |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, pset, o, r in rows:
        print(f"| {name} | {pset} | {r['masks']} / {o['masks']} | {r['generate_s']:.1f} s | {o['generate_s']:.1f} s | "
              f"{r['generate_s'] / o['generate_s']:.1f}x | {r['peak_mb']:.0f} / {o['peak_mb']:.0f} MB | "
              f"{r['peak_mb'] / max(o['peak_mb'], 1):.1f}x | {o['refilter_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
