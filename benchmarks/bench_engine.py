"""Engine speed and memory: napari-sam vs the reference SamPredictor, same random weights, same real image.

Usage::

    .venv/bin/python benchmarks/bench_engine.py                 # vit_t and vit_b, 3 repeats
    .venv/bin/python benchmarks/bench_engine.py --models vit_t --repeats 5 --threads 2

Each model runs in fresh subprocesses holding both implementations with identically seeded weights; the same
real image (../shared/data) is fed to both, and calls alternate (ours, reference, ours, ...) so that load from
other processes affects both alike. Times are medians over ``--repeats`` runs, taken with the default allocator
and no memory sampling; ratios are reference / ours (> 1 means we are faster). Peak memory is the largest RSS
increase during one call, measured in a second subprocess with a fixed mmap threshold (freed large blocks go back
to the OS, so RSS deltas measure each call alone; that setting slows every large allocation, so it is not used
for timing). Prints a markdown table.
The machine may be busy (other processes): ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "dsb2018_stage1_nuclei_2d" / "05_fluo_b1f23c4d_image.png"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond from /proc (Linux) or psutil."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import psutil

            return psutil.Process().memory_info().rss

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> "PeakRSS":
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _models(name: str):
    """Our random-weight model and the reference model holding the same state dict."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _install_reference_stubs, randomize_  # noqa: E402  (test helpers, no pytest needed)

    from napari_sam.core import build_sam, get_config

    ours = randomize_(build_sam(get_config(name)), seed=0).eval()
    _install_reference_stubs()
    if name == "vit_t":
        from mobile_sam import SamPredictor as RefPredictor
        from mobile_sam import sam_model_registry
    else:
        from segment_anything import SamPredictor as RefPredictor
        from segment_anything import sam_model_registry
    ref = sam_model_registry[name](checkpoint=None)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    ref.eval()  # after loading: MobileSAM caches its attention biases in eval()
    assert not unexpected and all(k.startswith("image_encoder.") and "head" in k for k in missing), missing
    return ours, ref, RefPredictor


def worker(name: str, image_path: str, repeats: int, threads: int, measure: str = "time") -> dict:
    """Both implementations in one process, calls interleaved (ours, reference, ours, ...) so that load from
    other processes hits both alike. measure: "time" (median seconds, keys ``*_s``) or "memory" (peak RSS
    increase in MB, keys ``*_peak_mb``). Returns {"ours": {...}, "reference": {...}}."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import read_image

    from napari_sam.core import SamPredictor
    from napari_sam.core.image import to_rgb_uint8

    ours, ref, RefPredictor = _models(name)
    rgb = to_rgb_uint8(read_image(Path(image_path)))
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(0)
    point_rc = np.array([[h * 0.4, w * 0.6]])
    box_rc = np.array([h * 0.2, w * 0.3, h * 0.6, w * 0.7])
    tl = rng.uniform(0, 1, (16, 2)) * [h * 0.8, w * 0.8]
    boxes_rc = np.concatenate([tl, tl + rng.uniform(10, 60, (16, 2))], 1)

    p, r = SamPredictor(ours), RefPredictor(ref)

    def ref_many_boxes():
        b = torch.as_tensor(boxes_rc[:, [1, 0, 3, 2]], dtype=torch.float32)
        b = r.transform.apply_boxes_torch(b, r.original_size)
        masks, _, _ = r.predict_torch(None, None, boxes=b, multimask_output=False)
        return masks.cpu().numpy()

    fns = {
        "encoder": (lambda: p.set_image(rgb), lambda: r.set_image(rgb)),
        "point": (lambda: p.predict(points=point_rc, point_labels=[1], multimask=True),
                  lambda: r.predict(point_coords=point_rc[:, ::-1].copy(), point_labels=np.array([1]),
                                    multimask_output=True)),
        "box": (lambda: p.predict(box=box_rc, multimask=False),
                lambda: r.predict(box=box_rc[[1, 0, 3, 2]], multimask_output=False)),
        "boxes16": (lambda: p.predict(box=boxes_rc, multimask=False), ref_many_boxes),
    }
    out: dict = {"ours": {}, "reference": {}}
    for key, pair in fns.items():
        n = repeats if key in ("encoder", "boxes16") else 3 * repeats
        if measure == "memory":
            n = 1
        times: dict = {"ours": [], "reference": []}
        peaks: dict = {"ours": [], "reference": []}
        for i in range(n + 1):
            for impl, fn in zip(("ours", "reference"), pair):
                if measure == "memory":
                    with PeakRSS() as mem:
                        fn()
                    peaks[impl].append(mem.delta_mb)
                    continue
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if i or key == "encoder":  # prompt calls: the first is a warm-up
                    times[impl].append(dt)
        for impl in out:
            if measure == "memory":
                out[impl][key + "_peak_mb"] = max(peaks[impl])
            else:
                out[impl][key + "_s"] = statistics.median(times[impl])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_t", "vit_b"])
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.image, a.repeats, a.threads, a.measure)))
        return 0
    if not Path(a.image).is_file():
        print(f"image {a.image} not found (needs ../shared/data next to the repo, or --image PATH)")
        return 1
    rows = []
    # memory pass: fixed mmap threshold, so freed large blocks go back to the OS and RSS deltas measure each
    # call alone; timing pass: the default allocator, as users run it
    envs = {"time": dict(os.environ), "memory": dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")}
    for name in a.models:
        res: dict = {"ours": {}, "reference": {}}
        for measure, env in envs.items():
            cmd = [sys.executable, __file__, "--worker", name, "--image", a.image, "--measure", measure,
                   "--repeats", str(a.repeats), "--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if r.returncode:
                print(r.stderr)
                return r.returncode
            part = json.loads(r.stdout.strip().splitlines()[-1])
            for impl in res:
                res[impl].update(part[impl])
        print(f"{name}: {res}", file=sys.stderr)
        rows.append((name, res["ours"], res["reference"]))
    import torch

    print(f"\nImage {Path(a.image).name}; torch {torch.__version__}, {a.threads} threads, "
          f"median of {a.repeats} (encoder, 16 boxes) / {3 * a.repeats} (1 point, 1 box) interleaved runs.\n")
    print("| model | measure | reference | ours | speed-up / memory ratio |")
    print("|---|---|---|---|---|")
    for name, o, r in rows:
        for key, label in (("encoder_s", "encoder (set_image)"), ("point_s", "prompt->mask, 1 point"),
                           ("box_s", "prompt->mask, 1 box"), ("boxes16_s", "prompt->mask, 16 boxes")):
            unit, f = ("s", 1.0) if key == "encoder_s" else ("ms", 1000.0)
            print(f"| {name} | {label} | {r[key] * f:.3g} {unit} | {o[key] * f:.3g} {unit} | "
                  f"{r[key] / o[key]:.2f}x |")
        for key, label in (("encoder_peak_mb", "peak RSS increase, encoder"),
                           ("boxes16_peak_mb", "peak RSS increase, 16 boxes")):
            print(f"| {name} | {label} | {r[key]:.0f} MB | {o[key]:.0f} MB | "
                  f"{r[key] / max(o[key], 1e-3):.2f}x less |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
