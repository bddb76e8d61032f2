"""Large images: memory and time of 3D propagation, segment-everything's kept outputs and the click annotator.

Three parts (``--part``), each comparing, in ONE run, the path the widgets take now with the old code itself (the
same calls into ``src`` of commit ``--old-commit``, default cc21ad2, extracted with ``git archive``; its rows are
left out where git cannot give it, or with ``--old-commit ''``) and, for propagation and everything, with a reference
path that does what they did before this work, built from public pieces still in the code. Ratios are printed as
path / new.

- **propagation**: a (Z, H, W) uint8 stack made of real GoNuclear data (crop 1135, its 100 x 100 slices around the
  middle tiled over the plane), 5 ground-truth nuclei of the middle slice (> 150 px), each placed in its own tile
  spread along the diagonal, propagated through every slice (strategy "point", XY only, stop rules off: every
  object reaches every slice, the worst case for memory). New: the widget's thread job
  ``napari_sam._widgets.propagate.run_propagation`` (bounding-box patches, per-slice digests instead of a copy of
  the label volume). Reference (the old job, commit cc21ad2): a full copy of the label volume, the objects'
  boolean volume of the first id (the old "present" check), ``iter_propagate_masks`` results kept as full (H, W)
  masks per slice, ``finish_slices``, ``fuse_views``, and ``plan_write`` on the copy with the full masks. Both plans
  ((z, row, col), old values, new values) must be identical: compared as SHA-256 of their int64 values.
- **everything**: an S x S RGB mosaic of real DSB2018 test images of 256 x 256 px (the first 256 of
  ``split.csv`` in a 16 x 16 grid, that 4096 px mosaic tiled when S > 4096, cut to S), the built-in model at its
  recommended settings (the widget's defaults) with ``--points-per-side``. New: the widget's thread job
  ``napari_sam._widgets.everything.run_generation(..., tiling=(TILE_SIZE, TILE_HALO))`` (TiledProposals;
  forced at every S: the widget itself tiles planes with a side over LARGE_PLANE = 2048 px). Reference: the same
  job untiled (``tiling=None``: ``AutomaticMaskGenerator.propose`` of the whole plane, what the widget did on
  large planes before). Each side then writes its first result (``filtered_labels`` at the thresholds) and
  re-filters once for a slider move (box NMS 0.3 -> 0.5, as bench_amg's live re-filter). Reported: peak RSS above
  the start during the run and first write; the kept outputs' memory afterwards, as RSS above the start after
  ``malloc_trim`` and as the bytes of the numpy arrays and torch storages reachable from them (each buffer once);
  the re-filter's time. The tiled labels must equal ``napari_sam.segment_everything`` of the mosaic with the same
  settings, tile size and halo (checked in the run, after the measurements; it runs the model again). Today's
  untiled path already keeps a compact uint8 image (core/amg_proposals.py), so it is no longer what the widget
  kept before: the old-code row is (its labels must equal today's untiled ones).
- **annotator**: the "SAM annotator" dock widget, driven headless through its scripting API as a user's clicks
  (``add_point``, ``wait``, ``commit``, ``clear_prompts``: the same calls on the new and the old code), on an
  N x N uint16 plane (``--ann-plane``): the real DSB2018 image ``ANN_IMAGE`` (256 x 320 px, channel 0 x 257)
  tiled and cut to N; the built-in model on the CPU; the viewer hidden (napari's canvas drawing is not measured).
  A warm-up click embeds the plane; then 5 clicks, each on the innermost pixel of a ground-truth nucleus (300 to
  1500 px) of the image's copy nearest the plane's centre, each followed by a Commit into the "SAM labels" layer.
  Per click: the result the widget holds (``widget.result``: bytes of its numpy arrays, as ``reachable_bytes``; the
  old code keeps the candidates as (3, N, N) bool masks, the new one a patch around them); the peak of numpy /
  Python allocations during the click (tracemalloc; it does NOT see torch's allocations, and slows Python down, so
  it is taken on a second, identical click after clearing the prompts: the embedding is cached, the prediction the
  same); the extra peak RSS of the timed click and of the commit (VmHWM, as below: torch included); the GUI-thread
  wall time of
  ``_predicted`` (applying the prediction: result and preview layer) and of ``commit``, read from the widget's
  ``main_thread_stats`` (the old code has both; a stat missing would print n/a); and the click -> preview latency
  (``add_point`` until the widget is idle, its 40 ms debounce included). Medians over the clicks, old / new. The
  committed label images of both arms must be identical (SHA-256 of their values, checked in the run). This part
  needs an X display: without DISPLAY the driver runs its arms under ``xvfb-run -a``.

Each arm runs in its own fresh subprocess (same setup in each; the stack's embeddings are computed before the
measurement, into a temporary disk cache: the new and reference arms share one, the old code has its own). Peak
memory is the kernel's own high-water mark: /proc/self/clear_refs "5" resets VmHWM after the setup, and the arm's
extra peak is VmHWM at the end minus VmRSS at the reset (exact, no sampling; it sees torch's and numpy's allocations
alike, which tracemalloc does not). Where clear_refs cannot be written, RSS is sampled every millisecond instead
(bench_engine.PeakRSS) and the table says so. Times are wall-clock seconds of one run, default allocator, torch
limited to ``--threads``.

    python benchmarks/bench_large.py [--part propagation|everything|annotator|all] [--stack Z H W] [--plane S]
                                     [--points-per-side N] [--ann-plane N] [--threads T]

Defaults (about a minute a part on 2 cores, under 1 GB of RSS): --stack 10 1024 1024, --plane 2048,
--points-per-side 8, --ann-plane 2048.
Sizes for the README: ``--part propagation --stack 50 2048 2048`` and ``--stack 10 4096 4096`` (the old arms peak
near 4 GB of RSS; ``--stack 20 4096 4096``, the size first measured, needs about 6.5 GB) and ``--part everything
--plane 4096`` and ``--plane 8192`` (about 3 GB), all with the default --points-per-side 8 and --threads 1, and
``--part annotator --ann-plane 4096`` and ``--ann-plane 8192`` (under 1.8 GB of RSS, a minute).

Numbers it gave (shared 2-core CPU, --threads 1, torch 2.13 CPU, one run; extra peak RSS of the job, new vs old
code (cc21ad2) and vs the reference from today's pieces; the plans identical in every run):

- propagation (50, 2048, 2048), 5 objects, 245 slices: new 0.23 GiB, 10.0 s; old code 2.77 GiB (12.0x), 12.2 s;
  reference 2.86 GiB (12.4x), 14.2 s. (10, 4096, 4096), 45 slices: new 0.44 GiB; old code 2.18 GiB (5.0x);
  reference 2.43 GiB (5.5x). (20, 4096, 4096) was not run here: the old arms would pass 6 GB of RSS.
- everything, kept arrays / kept RSS after trim / slider re-filter: 4096 (16 tiles): tiled 22 MB / 66 MB / 1.1 s;
  today's untiled 21 MB / 66 MB / 0.46 s; old code 214 MB (9.6x) / 259 MB (3.9x) / 0.44 s. 8192 (64 tiles):
  tiled 74 MB / 121 MB / 5.5 s; untiled 76 MB / 137 MB / 2.2 s; old code 831 MB (11.2x) / 892 MB (7.4x) / 4.1 s.
  Peak RSS during the run and first write about the same on every path (553 / 606 / 656 MB at 4096, 1.9 / 2.1 /
  2.3 GB at 8192). Tiled labels equal segment_everything's; at 8 points per side the untiled plane (shrunk 4x or
  8x to the model's input) gave 0 objects, the tiles 41 and 161.
- annotator, medians of 5 clicks, new vs old code (ratio old / new); result held / numpy+python peak of the click
  (tracemalloc) / extra peak RSS of the click / click -> preview / GUI thread in _predicted / in commit:
  2048: 0.2 / 0.3 / 26 MB / 221 ms / 5 ms / 53 ms vs 13 MB (64x) / 21 MB (67x) / 26 MB (1.0x) / 234 ms / 8 ms /
  55 ms. 4096: 0.2 / 0.3 / 21 MB / 212 ms / 7 ms / 171 ms vs 51 MB (254x) / 84 MB (264x) / 70 MB (3.3x) / 302 ms
  (1.4x) / 8 ms / 236 ms. 8192: 0.2 / 0.3 / 25 MB / 224 ms / 7 ms / 704 ms vs 202 MB (1013x) / 336 MB (1053x) /
  288 MB (11.6x) / 564 ms (2.5x) / 10 ms / 777 ms. Committed labels identical (SHA-256) at every size. One click
  of the five (a larger object, not decoded zoomed) still allocates (3, N, N) bool masks for a moment in the new
  code (tracemalloc 51 MB at 4096, 203 MB at 8192; held 0.6 / 1.6 MB). The commit's time and extra RSS (136 MB at
  4096, 539 MB at 8192: two copies of the uint32 labels plane) are napari's labels refresh, the same on both.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data"
N_OBJECTS = 5
PROP_PARAMS = dict(strategy="point", views="xy", iou_threshold=0.0, overlap_threshold=0.0, min_area=1,
                   max_regrowth=None, direction="both")  # every object goes through every slice
SLIDER = {"box_nms_thresh": 0.5}  # the slider move whose re-filter is timed


# ----------------------------------------------------------------------------------------------- memory helpers
def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Peak:
    """Extra peak RSS of a block: the kernel's VmHWM after a reset (clear_refs "5"), else sampled RSS."""

    def __enter__(self) -> "Peak":
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how, self._sampler = "VmHWM", None
        except OSError:
            from bench_engine import PeakRSS

            self.how, self._sampler = "sampled", PeakRSS().__enter__()
        self.base = _status()["VmRSS"]
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            self.peak = _status()["VmHWM"]
        else:
            self._sampler.__exit__(*exc)
            self.peak = self._sampler.peak

    @property
    def extra(self) -> int:
        return self.peak - self.base


def reachable_bytes(obj) -> int:
    """Bytes of the numpy arrays and torch storages reachable from ``obj`` through napari_sam objects, dicts, lists
    and tuples (each underlying buffer counted once; the learned candidate scorer, a part of the model, left out)."""
    import torch

    seen, buffers, total = set(), set(), 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in buffers:
                buffers.add(id(base))
                total += base.nbytes
        elif isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            if st.data_ptr() not in buffers:
                buffers.add(st.data_ptr())
                total += st.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif type(o).__module__.startswith("napari_sam") and type(o).__name__ != "CandidateScorer":
            stack.extend(getattr(o, "__dict__", {}).values())
            stack.extend(getattr(o, s) for s in getattr(type(o), "__slots__", ()) if hasattr(o, s))
    return total


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, np.int64))
        h.update(str(a.shape).encode())
        h.update(a.data)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- propagation
def gonuclear_stack(z_n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(volume (Z, H, W) uint8, labels (Z, H, W) int32 with N_OBJECTS nuclei on the middle slice, that slice)."""
    import tifffile

    d = DATA / "gonuclear_3d_nuclei"
    img = tifffile.imread(d / "1135_crop_image.tif")
    gt = tifffile.imread(d / "1135_crop_label.tif")
    if z_n > img.shape[0]:
        raise SystemExit(f"--stack Z={z_n}: GoNuclear crop 1135 has {img.shape[0]} slices")
    lo = max(0, min(img.shape[0] // 2 - z_n // 2, img.shape[0] - z_n))
    img, gt = img[lo: lo + z_n], gt[lo: lo + z_n]
    side = img.shape[1]
    reps_r, reps_c = -(-h // side), -(-w // img.shape[2])
    vol = np.ascontiguousarray(np.tile(img, (1, reps_r, reps_c))[:, :h, :w]).astype(np.uint8, copy=False)
    z = z_n // 2
    ids = [i for i in np.unique(gt[z]) if i and (gt[z] == i).sum() > 150][:N_OBJECTS]
    labels = np.zeros((z_n, reps_r * side, reps_c * img.shape[2]), np.int32)
    reps = max(1, min(h // side, w // img.shape[2]))  # whole tiles only: no nucleus is cut off
    for k, i in enumerate(ids):  # each nucleus in its own tile, spread along the diagonal
        t = (k * (reps - 1)) // max(len(ids) - 1, 1)
        r0, c0 = t * side, t * img.shape[2]
        labels[z, r0: r0 + side, c0: c0 + img.shape[2]][gt[z] == i] = 100 + k
    labels = np.ascontiguousarray(labels[:, :h, :w])
    labels += 0  # every page resident, as a user's label volume is
    return vol, labels, z


def old_propagation_job(volume, labels3d, z, model, params):
    """What the widget's job did before (commit cc21ad2), for objects drawn on slice z alone: a copy of the label
    volume, full (H, W) masks per propagated slice, the write planned against the copy. Returns (ids, plan)."""
    from napari_sam.core.embedding_store import StackEmbeddings
    from napari_sam.core.propagation import finish_slices, fuse_views, iter_propagate_masks, make_params
    from napari_sam.core.propagation_labels import plan_write, seeds_from_labels, split_by_span

    snap = np.array(labels3d)
    ids, _spanning = split_by_span(snap, z)
    ids, seeds = seeds_from_labels(snap, z, ids)
    emb = StackEmbeddings(volume, model)
    present = np.flatnonzero((snap == ids[0]).any(axis=(1, 2)))  # the old gaps / re-propagation check
    assert present.size == 1, "the benchmark's objects are drawn on one slice"
    scores = np.full((len(ids), volume.shape[0]), np.nan, np.float32)
    scores[:, z] = 1.0
    results: dict[int, dict[int, np.ndarray]] = {i: {} for i in range(len(ids))}
    for i, zz, m, s in iter_propagate_masks(volume, seeds, embeddings=emb, **params):
        results[i][zz] = m
        scores[i, zz] = s
    p = make_params(params)
    if p.smooth_z:
        for i, obj in results.items():
            results[i] = finish_slices(seeds[i], obj, scores[i])
    results = dict(enumerate(fuse_views(emb, seeds, [results[i] for i in range(len(ids))], scores, p)))
    index, values = plan_write(snap, ids, results, overwrite=False)
    return ids, results, (index, snap[index], values)


def propagation_arm(arm: str, stack: list[int], threads: int) -> dict:
    import torch

    from napari_sam.core.build import load_model
    from napari_sam.core.embedding_store import StackEmbeddings

    torch.set_num_threads(threads)
    vol, labels, z = gonuclear_stack(*stack)
    model = load_model(device="cpu")
    for _ in StackEmbeddings(vol, model).compute():  # from the shared disk cache after the first arm
        pass
    if arm in ("new", "old"):  # "old": this same call into the old code (PYTHONPATH set by the driver)
        from napari_sam._widgets.propagate import run_propagation

        with Peak() as mem:
            t0 = time.perf_counter()
            res = run_propagation(vol, labels, z, None, model, PROP_PARAMS, lambda: False, lambda *a: None)
            dt = time.perf_counter() - t0
        ids, results, ((zz, rr, cc), old, new) = res["ids"], res["results"], res["plan"]
    else:
        with Peak() as mem:
            t0 = time.perf_counter()
            ids, results, ((zz, rr, cc), old, new) = old_propagation_job(vol, labels, z, model, PROP_PARAMS)
            dt = time.perf_counter() - t0
    return {"extra_peak": mem.extra, "start_rss": mem.base, "how": mem.how, "time_s": dt,
            "labels_bytes": labels.nbytes,
            "objects": len(ids), "slices": sum(len(r) for r in results.values()), "voxels": int(new.size),
            "plan": _digest(zz, rr, cc, old, new)}


# ----------------------------------------------------------------------------------------------- everything
def dsb_mosaic(side: int) -> np.ndarray:
    """An (S, S, 3) uint8 mosaic of real DSB2018 256 x 256 images (see the module docstring)."""
    import imageio.v3 as iio

    d = DATA / "dsb2018_full"
    with open(d / "split.csv") as f:
        ids = [r["id"] for r in csv.DictReader(f) if r["height"] == "256" and r["width"] == "256"]
    n = min(16, -(-side // 256))
    imgs = [iio.imread(d / "images" / f"{i}.png")[..., :3] for i in ids[: n * n]]
    grid = np.concatenate([np.concatenate(imgs[r * n:(r + 1) * n], 1) for r in range(n)], 0)
    reps = -(-side // grid.shape[0])
    return np.ascontiguousarray(np.tile(grid, (reps, reps, 1))[:side, :side])


def everything_settings(model, pps: int) -> tuple[dict, dict]:
    """(run_generation's params, filtered_labels' params): the widget's defaults for ``model`` (its recommended
    thresholds and settings) with ``pps`` points per side."""
    from napari_sam.core.amg import AutomaticMaskGenerator, default_min_object_area

    g = AutomaticMaskGenerator.for_model(model, points_per_side=pps)
    gen_params = {"points_per_side": pps, "crop_n_layers": g.crop_n_layers,
                  "min_mask_region_area": g.min_mask_region_area, "resolve_parts": bool(g.resolve_parts),
                  "rescore": bool(g.rescore), **g.thresholds()}
    filt = {**g.thresholds(), "crop_nms_thresh": g.crop_nms_thresh, "min_mask_region_area": g.min_mask_region_area,
            "resolve_parts": bool(g.resolve_parts), "rescore": bool(g.rescore),
            "min_object_area": default_min_object_area(model, g.min_mask_region_area)}
    return gen_params, filt


def everything_arm(arm: str, side: int, pps: int, threads: int) -> dict:
    import torch

    from napari_sam._widgets.everything import filtered_labels, run_generation
    from napari_sam.core.build import load_model

    torch.set_num_threads(threads)
    mosaic = dsb_mosaic(side)
    model = load_model(device="cpu")
    gen_params, filt = everything_settings(model, pps)
    tiling = {}  # "untiled", and "old": untiled in the old code (its run_generation has no tiling)
    if arm == "tiled":
        from napari_sam._widgets.everything import TILE_HALO, TILE_SIZE

        tiling = {"tiling": (TILE_SIZE, TILE_HALO)}
    with Peak() as mem:
        t0 = time.perf_counter()
        props = run_generation(model, mosaic, gen_params, lambda: False, lambda *a: None, **tiling)["proposals"]
        first = filtered_labels(props, filt)  # the first write
        dt = time.perf_counter() - t0
    objects = int(len(np.unique(first)) - 1)
    t0 = time.perf_counter()
    moved = filtered_labels(props, {**filt, **SLIDER})
    refilter = time.perf_counter() - t0
    moved_objects = int(len(np.unique(moved)) - 1)
    first_digest = _digest(first)
    del moved, first
    _trim()
    out = {"extra_peak": mem.extra, "start_rss": mem.base, "how": mem.how, "time_s": dt, "refilter_s": refilter,
           "objects": objects,
           "moved_objects": moved_objects, "candidates": len(props), "tiles": len(getattr(props, "tiles", [props])),
           "kept_rss": _status()["VmRSS"] - mem.base, "kept_bytes": reachable_bytes(props), "labels": first_digest}
    if arm == "tiled":  # the widget's labels are napari_sam.segment_everything's (after the measurements)
        import napari_sam

        size, halo = tiling["tiling"]
        ref = napari_sam.segment_everything(mosaic, model, max_untiled=size, tile_size=size, halo=halo,
                                            points_per_side=pps, min_object_area=filt["min_object_area"])
        out["equal_segment_everything"] = _digest(ref) == first_digest
    return out


# ----------------------------------------------------------------------------------------------- annotator
ANN_IMAGE = "07fb37aafa6626608af90c1e18f6a743f29b6b233d2e427dcd1102df6a916cf5"  # DSB2018, 256 x 320, grey nuclei
ANN_CLICKS = 5


def dsb_plane(side: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(plane (S, S) uint16, clicks): DSB2018 image ANN_IMAGE (channel 0 x 257) tiled and cut to S x S, and the
    1 + ANN_CLICKS (row, col) points, each the innermost pixel (distance transform) of a ground-truth nucleus of
    300 to 1500 px, in the copy of the image nearest the plane's centre."""
    import imageio.v3 as iio
    import tifffile
    from scipy import ndimage as ndi

    d = DATA / "dsb2018_full"
    img = iio.imread(d / "images" / f"{ANN_IMAGE}.png")[..., 0].astype(np.uint16) * 257
    gt = tifffile.imread(d / "labels" / f"{ANN_IMAGE}.tif")
    reps = (-(-side // img.shape[0]), -(-side // img.shape[1]))
    plane = np.ascontiguousarray(np.tile(img, reps)[:side, :side])
    ids = [k for k in np.unique(gt)[1:] if 300 < (gt == k).sum() < 1500][: 1 + ANN_CLICKS]
    off = (side // 2 // img.shape[0]) * img.shape[0], (side // 2 // img.shape[1]) * img.shape[1]
    clicks = []
    for k in ids:
        dist = ndi.distance_transform_edt(np.pad(gt == k, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        clicks.append((int(r + off[0]), int(c + off[1])))
    if len(clicks) < 1 + ANN_CLICKS or max(max(rc) for rc in clicks) >= side:
        raise SystemExit(f"--ann-plane {side}: too small for {1 + ANN_CLICKS} whole nuclei of the centre copy")
    return plane, clicks


def _labels_digest(labels) -> str:
    """SHA-256 of a label image's values as int64 (row blocks: no int64 copy of a whole large plane)."""
    h = hashlib.sha256(str(labels.shape).encode())
    for r0 in range(0, labels.shape[0], 512):
        h.update(np.ascontiguousarray(np.asarray(labels[r0: r0 + 512], np.int64)).data)
    return h.hexdigest()


def annotator_arm(side: int, threads: int) -> dict:
    """The annotator dock widget driven headless on an (S, S) plane (see the module docstring); one dict per
    click. Run by the same calls on the new and the old code (both have add_point, wait, commit, clear_prompts,
    result and main_thread_stats; the result's mask storage differs: read through reachable_bytes)."""
    import tracemalloc

    import napari
    import torch

    from napari_sam._widgets._state import get_state
    from napari_sam.core.build import load_model

    torch.set_num_threads(threads)
    plane, clicks = dsb_plane(side)
    viewer = napari.Viewer(show=False)
    get_state(viewer).set_model(load_model(device="cpu"), "builtin")
    viewer.add_image(plane, name="plane")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("plane")

    def click(rc) -> float:
        t0 = time.perf_counter()
        w.add_point(rc)
        if not w.wait(600):
            raise SystemExit("the annotator did not become idle within 600 s")
        return time.perf_counter() - t0

    with Peak() as warm:
        click(clicks[0])  # warm-up: embeds the plane, creates the preview layer
    w.clear_prompts()
    w.wait()
    stat = lambda name: list(w.main_thread_stats.get(name, (None, None)))  # noqa: E731  [wall s, CPU s] or None
    out = []
    for rc in clicks[1:]:
        w.main_thread_stats.clear()
        with Peak() as mem:  # the timed click: no tracemalloc running (it slows Python down)
            latency = click(rc)
        predicted, update = stat("_predicted"), stat("_update")
        held = reachable_bytes(w.result)
        w.clear_prompts()  # the same click again, traced (the embedding is cached: the same prediction)
        w.wait()
        tracemalloc.start()
        click(rc)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        w.main_thread_stats.clear()
        with Peak() as cmem:
            ids = w.commit()
        w.wait()
        out.append({"latency_s": latency, "predicted_gui": predicted, "update_gui": update,
                    "commit_gui": stat("commit"), "held_bytes": held, "traced_peak": traced,
                    "click_extra_peak": mem.extra, "commit_extra_peak": cmem.extra, "how": mem.how,
                    "top_rss": max(mem.base + mem.extra, cmem.base + cmem.extra), "committed": [int(i) for i in ids]})
    labels = viewer.layers[w.ui.labels_combo.currentText()].data
    res = {"clicks": out, "labels": _labels_digest(labels), "labels_dtype": str(labels.dtype),
           "labelled_px": int(np.count_nonzero(labels)), "plane_bytes": plane.nbytes,
           "start_rss": warm.base, "highest_rss": max(warm.base + warm.extra, *(c["top_rss"] for c in out))}
    viewer.close()
    return res


# ----------------------------------------------------------------------------------------------- driver
def old_source(rev: str, into: str) -> str | None:
    """``src`` of commit ``rev`` of this repository extracted under ``into`` (git archive); None when it cannot be
    (no git, a shallow clone without it): the old-code rows are then left out."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", into], input=tar, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"old code {rev!r} not available ({e}); its rows are left out", file=sys.stderr)
        return None
    return str(Path(into) / "src")


def _env(src: str, **extra) -> dict:
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _child(args: list[str], env: dict, display: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if display and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or env.get("QT_QPA_PLATFORM")):
        if not shutil.which("xvfb-run"):
            raise SystemExit("--part annotator needs a display: set DISPLAY, or install xvfb-run (xvfb)")
        cmd = ["xvfb-run", "-a", *cmd]  # napari's canvas needs an X server (as the widget tests run)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"benchmark worker {args} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _mb(b: float) -> str:
    return f"{b / 1e6:.0f} MB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("propagation", "everything", "annotator", "all"), default="all")
    ap.add_argument("--stack", nargs=3, type=int, default=[10, 1024, 1024], metavar=("Z", "H", "W"),
                    help="propagation stack shape (README: 20 4096 4096)")
    ap.add_argument("--plane", type=int, default=2048, metavar="S", help="everything mosaic side (README: 4096)")
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--ann-plane", type=int, default=2048, metavar="N",
                    help="annotator plane side (README: 4096 and 8192)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-commit", default="cc21ad2", help="also run the old code of this commit (the state "
                    "before the large-image work), extracted with git archive; '' to skip")
    ap.add_argument("--worker", nargs=2, metavar=("PART", "ARM"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        part, arm = a.worker
        res = (propagation_arm(arm, a.stack, a.threads) if part == "propagation"
               else annotator_arm(a.ann_plane, a.threads) if part == "annotator"
               else everything_arm(arm, a.plane, a.points_per_side, a.threads))
        import napari_sam

        print(json.dumps({**res, "src": str(Path(napari_sam.__file__).parents[1])}))  # which code ran
        return 0
    common = ["--stack", *map(str, a.stack), "--plane", str(a.plane), "--points-per-side", str(a.points_per_side),
              "--ann-plane", str(a.ann_plane), "--threads", str(a.threads)]
    with tempfile.TemporaryDirectory(prefix="bench_large_") as tmp:
        old_src = old_source(a.old_commit, tmp) if a.old_commit else None
        return drive(a, common, str(ROOT / "src"), old_src, tmp)


def drive(a, common: list[str], new_src: str, old_src: str | None, tmp: str) -> int:
    """Run the arms of the chosen parts and print the tables; exit status 1 if a check fails."""
    ok = True
    import torch

    print(f"torch {torch.__version__}, {a.threads} thread(s), {os.cpu_count()} CPU(s); one run each, every arm in a "
          "fresh subprocess; ratios are path / new.\n")
    if a.part in ("propagation", "all"):
        res = {}
        for arm, src in (("reference", new_src), ("new", new_src), ("old", old_src)):
            if src is not None:
                env = _env(src, NAPARI_SAM_CACHE_DIR=str(Path(tmp) / f"cache_{'old' if arm == 'old' else 'new'}"))
                res[arm] = _child(["--worker", "propagation", arm, *common], env)
                print(f"propagation {arm}: {res[arm]}", file=sys.stderr, flush=True)
        ref, new = res["reference"], res["new"]
        same = all(r["plan"] == new["plan"] for r in res.values())
        ok &= same
        z_n, h, w = a.stack
        print(f"**3D propagation**, stack ({z_n}, {h}, {w}) uint8 from GoNuclear, labels int32 "
              f"({_gib(new['labels_bytes'])}); {new['objects']} objects, {new['slices']} slices propagated, "
              f"{new['voxels']} voxels written; RSS at the job's start {_gib(new['start_rss'])} (highest total: "
              f"{_gib(max(r['start_rss'] + r['extra_peak'] for r in res.values()))}); peak: {new['how']}.\n")
        print("| path | extra peak RSS | memory ratio (path / new) | job time | time ratio (path / new) "
              "| plan identical to new |")
        print("|---|---|---|---|---|---|")
        rows = [("new: run_propagation (patches, digests)", new),
                ("reference: the old job from today's pieces (copy of the labels, full masks, plan_write)", ref)]
        if "old" in res:
            rows.append((f"old code ({a.old_commit}): its run_propagation", res["old"]))
        for name, r in rows:
            eq = "" if r is new else ("yes" if r["plan"] == new["plan"] else "NO")
            print(f"| {name} | {_gib(r['extra_peak'])} | {_ratio(r['extra_peak'], new['extra_peak'])} | "
                  f"{r['time_s']:.1f} s | {_ratio(r['time_s'], new['time_s'])} | {eq} |")
        print()
    if a.part in ("everything", "all"):
        res = {}
        for arm, src in (("untiled", new_src), ("tiled", new_src), ("old", old_src)):
            if src is not None:
                res[arm] = _child(["--worker", "everything", arm, *common], _env(src))
                print(f"everything {arm}: {res[arm]}", file=sys.stderr, flush=True)
        ref, new = res["untiled"], res["tiled"]
        same = bool(new["equal_segment_everything"])
        ok &= same
        if "old" in res:
            ok &= res["old"]["labels"] == ref["labels"]
        s = a.plane
        print(f"**Segment everything**, DSB2018 mosaic {s} x {s}, built-in model, recommended settings, "
              f"{a.points_per_side} points per side; re-filter: box NMS -> {SLIDER['box_nms_thresh']}; "
              f"RSS at the start {_mb(new['start_rss'])} (highest total: "
              f"{_mb(max(r['start_rss'] + r['extra_peak'] for r in res.values()))}); peak: {new['how']}.\n")
        print("| path | tiles | candidates | objects | run + first write | peak RSS above start | kept RSS after trim "
              "| kept arrays | slider re-filter | labels == segment_everything |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = [("new: tiled (run_generation tiling=(TILE_SIZE, TILE_HALO))", new, "yes" if same else "NO"),
                ("reference: untiled (run_generation, propose of the whole plane)", ref, "")]
        if "old" in res:
            rows.append((f"old code ({a.old_commit}): untiled, as the widget ran it", res["old"],
                         "(labels = untiled: " + ("yes)" if res["old"]["labels"] == ref["labels"] else "NO)")))
        for name, r, eq in rows:
            print(f"| {name} | {r['tiles']} | {r['candidates']} | {r['objects']} | {r['time_s']:.1f} s | "
                  f"{_mb(r['extra_peak'])} | {_mb(r['kept_rss'])} | {_mb(r['kept_bytes'])} | "
                  f"{r['refilter_s']:.2f} s | {eq} |")
        for name, r, _ in rows[1:]:
            print(f"| ratio {name.split(':')[0]} / new | | | | {_ratio(r['time_s'], new['time_s'])} | "
                  f"{_ratio(r['extra_peak'], new['extra_peak'])} | {_ratio(r['kept_rss'], new['kept_rss'])} | "
                  f"{_ratio(r['kept_bytes'], new['kept_bytes'])} | {_ratio(r['refilter_s'], new['refilter_s'])} | |")
        print()
    if a.part in ("annotator", "all"):
        ok &= annotator_tables(a, common, new_src, old_src, tmp)
    if not ok:
        print("MISMATCH: a new path's result differs from its reference (see the tables)", file=sys.stderr)
    return 0 if ok else 1


def _ms(v) -> str:
    return "n/a" if v is None else f"{v * 1e3:.0f} ms" if v >= 0.0995 else f"{v * 1e3:.1f} ms"


def _mb2(b) -> str:
    return "n/a" if b is None else f"{b / 1e6:.1f} MB" if b < 9.95e6 else f"{b / 1e6:.0f} MB"


def _ann_values(c: dict) -> dict:
    """One click's reported values (None where the code ran has no such stat)."""
    return {"held": c["held_bytes"], "traced": c["traced_peak"], "rss": c["click_extra_peak"],
            "commit_rss": c["commit_extra_peak"],
            "predicted": c["predicted_gui"][0], "commit": c["commit_gui"][0], "latency": c["latency_s"]}


ANN_COLUMNS = (("held", "result held", _mb2), ("traced", "numpy/python peak in the click (tracemalloc)", _mb2),
               ("rss", "extra peak RSS of the click", _mb2),
               ("predicted", "GUI thread: apply prediction (_predicted)", _ms),
               ("latency", "click -> preview", _ms), ("commit", "GUI thread: commit", _ms),
               ("commit_rss", "extra peak RSS of the commit", _mb2))


def annotator_tables(a, common: list[str], new_src: str, old_src: str | None, tmp: str) -> bool:
    """Run the annotator arms (new code, old code) and print per-click and median tables; False if the committed
    labels differ."""
    res = {}
    for arm, src in (("new", new_src), ("old", old_src)):
        if src is not None:
            env = _env(src, NAPARI_SAM_CACHE_DIR=str(Path(tmp) / f"cache_ann_{arm}"))
            res[arm] = _child(["--worker", "annotator", arm, *common], env, display=True)
            print(f"annotator {arm}: {res[arm]}", file=sys.stderr, flush=True)
    new, n = res["new"], a.ann_plane
    same = "old" not in res or res["old"]["labels"] == new["labels"]
    print(f"**Annotator**, DSB2018 image tiled to a {n} x {n} uint16 plane ({_mb2(new['plane_bytes'])}), built-in "
          f"model, {ANN_CLICKS} single-point clicks on nuclei, each committed; RSS at the start "
          f"{_mb2(new['start_rss'])} (highest total, embedding included: "
          f"{_mb2(max(r['highest_rss'] for r in res.values()))}); RSS peak: {new['clicks'][0]['how']}. Committed "
          f"labels ({new['labels_dtype']}, {new['labelled_px']} px, ids "
          f"{[i for c in new['clicks'] for i in c['committed']]}): "
          + ("new == old (SHA-256 " + new["labels"][:12] + ")" if "old" in res and same
             else "no old code run" if "old" not in res else "DIFFER new vs old") + ".\n")
    head = "| path | click | " + " | ".join(t for _, t, _ in ANN_COLUMNS) + " |"
    print(head + "\n" + "|---" * head.count(" | ") + "|---|")
    names = {"new": "new", "old": f"old code ({a.old_commit})"}
    med = {}
    for arm, r in res.items():
        vals = [_ann_values(c) for c in r["clicks"]]
        for k, v in enumerate(vals, 1):
            print(f"| {names[arm]} | {k} | " + " | ".join(f(v[key]) for key, _, f in ANN_COLUMNS) + " |")
        med[arm] = {key: (None if any(v[key] is None for v in vals) else float(np.median([v[key] for v in vals])))
                    for key, _, _ in ANN_COLUMNS}
    print("\nMedian over the clicks, and ratio old / new:\n")
    head = "| path | " + " | ".join(t for _, t, _ in ANN_COLUMNS) + " |"
    print(head + "\n" + "|---" * head.count(" | ") + "|---|")
    for arm in res:
        print(f"| {names[arm]} | " + " | ".join(f(med[arm][key]) for key, _, f in ANN_COLUMNS) + " |")
    if "old" in res:
        print("| ratio old / new | " + " | ".join(
            "n/a" if med["old"][key] is None or med["new"][key] is None else _ratio(med["old"][key], med["new"][key])
            for key, _, _ in ANN_COLUMNS) + " |")
    print()
    return same


if __name__ == "__main__":
    sys.exit(main())
