"""``napari-sam segment``: segment everything in many files; resumable, one bad file never stops the batch.

Each INPUT (a file, a folder, or a glob) of .tif/.tiff/.png/.jpg/.jpeg becomes OUT/<name>_labels.tif, uint16 or
uint32 instance labels: (H, W) for a 2D image, (Z, H, W) for a stack segmented slice by slice. An existing
output is skipped (the batch resumes where it stopped) unless --overwrite; outputs are written to a temporary
file and renamed, so an interrupted run never leaves a half-written file that counts as finished.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import add_denoise_argument

# torch notes once that PIL's read-only resize output is wrapped without a copy: harmless, and noise in a CLI
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def add_amg_args(p: argparse.ArgumentParser) -> None:
    """The AutomaticMaskGenerator parameters as command-line options (the reference defaults)."""
    p.add_argument("--model", default=None, help="model name or checkpoint path (default: the built-in model)")
    add_denoise_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    g = p.add_argument_group("segment-everything parameters (Meta's SamAutomaticMaskGenerator meaning)")
    g.add_argument("--points-per-side", type=int, default=None,
                   help="default: the model's recommended value, else 32")
    g.add_argument("--points-per-batch", type=int, default=64)
    g.add_argument("--pred-iou-thresh", type=float, default=None,
                   help="default: the model's recommended value (built-in model), else 0.88")
    g.add_argument("--stability-score-thresh", type=float, default=None,
                   help="default: the model's recommended value (built-in model), else 0.95")
    g.add_argument("--stability-score-offset", type=float, default=1.0)
    g.add_argument("--box-nms-thresh", type=float, default=None,
                   help="default: the model's recommended value (built-in model), else 0.7")
    g.add_argument("--crop-n-layers", type=int, default=None,
                   help="default: the model's recommended value, else 0")
    g.add_argument("--crop-nms-thresh", type=float, default=0.7)
    g.add_argument("--crop-overlap-ratio", type=float, default=512 / 1500)
    g.add_argument("--crop-n-points-downscale-factor", type=int, default=1)
    g.add_argument("--min-mask-region-area", type=int, default=0)
    g.add_argument("--resolve-parts", action=argparse.BooleanOptionalAction, default=None,
                   help="drop masks that are parts of a larger one, or a larger one that several masks inside it "
                        "cover (not in the reference; default: the model's recommended setting, else off)")
    g.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=None,
                   help="threshold and rank candidates by the model's learned quality score instead of the "
                        "decoder's predicted IoU (not in the reference; needs a model that has one, as the "
                        "built-in model does; default: the model's recommended setting, else off)")
    g.add_argument("--min-object-area", type=int, default=None,
                   help="label clean-up: islands/holes below this many px (default: the model's recommended value, "
                        "else max(min-mask-region-area, 16))")


def amg_params(args: argparse.Namespace) -> dict:
    keys = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
            "crop_n_points_downscale_factor", "min_mask_region_area", "resolve_parts", "rescore")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def make_generator(args: argparse.Namespace):
    """Load the model once and build the generator (parameter errors surface here, before any file)."""
    from napari_sam.core.amg import AutomaticMaskGenerator
    from napari_sam.core.build import load_model

    area = getattr(args, "min_object_area", None)
    if area is not None and area < 0:  # checked once, not reported as a bad file for every input
        raise ValueError(f"--min-object-area must be >= 0 (pixels), got {area}")
    model = load_model(args.model, device=args.device, denoise=args.denoise)
    return AutomaticMaskGenerator.for_model(model, **amg_params(args))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment everything in image files (batch, resumable)", description=__doc__)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder for <name>_labels.tif")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_amg_args(p)
    p.set_defaults(func=run)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files from files, folders (non-recursive) and globs, in a stable order without duplicates."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and f.is_file())
        elif p.exists():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"input {item!r} does not exist (no file, folder or glob match)")
            files += [m for m in matches if m.suffix.lower() in SUFFIXES]
    seen, out = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def output_path(src: Path, out_dir: Path) -> Path:
    return out_dir / f"{src.stem}_labels.tif"


def read_planes(path: Path) -> tuple[np.ndarray, bool]:
    """(image, is_stack): a 2D image ((H, W), (H, W, 3|4)) or a stack ((Z, H, W), (Z, H, W, 3|4))."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        img = tifffile.imread(path)
    else:
        import imageio.v3 as iio

        img = iio.imread(path)
    img = np.asarray(img)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4)):
        return img, False
    if img.ndim == 3 or (img.ndim == 4 and img.shape[-1] in (3, 4)):
        return img, True
    raise ValueError(f"unsupported image shape {img.shape}: expected (H, W), (H, W, 3), (Z, H, W) or (Z, H, W, 3)")


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Atomic write: a temporary file in the same folder, then a rename."""
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
    tmp = path.with_name(f".{path.name}.partial")
    tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    os.replace(tmp, path)


class _Bar:
    def __init__(self, quiet: bool, prefix: str) -> None:
        self.quiet, self.prefix, self.last = quiet, prefix, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        n = 24 * done // max(total, 1)
        print(f"\r{self.prefix} [{'#' * n}{'.' * (24 - n)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def segment_file(src: Path, dst: Path, gen, min_object_area, quiet: bool, prefix: str) -> int:
    from napari_sam.core.amg import segment_everything

    img, stack = read_planes(src)
    planes = img if stack else img[None]
    out = []
    for z, plane in enumerate(planes):
        label = prefix + (f" z={z + 1}/{len(planes)}" if stack else "")
        out.append(segment_everything(plane, gen, min_object_area=min_object_area, progress=_Bar(quiet, label)))
    labels = np.stack(out) if stack else out[0]
    write_labels(dst, labels)
    return int(sum(int(p.max()) for p in out))


def run(args: argparse.Namespace) -> int:
    files = expand_inputs(args.inputs)
    if not files:
        raise FileNotFoundError("no .tif/.tiff/.png/.jpg input files found in " + " ".join(args.inputs))
    out_dir = Path(args.out)
    by_output: dict[Path, list[Path]] = {}
    for f in files:
        by_output.setdefault(output_path(f, out_dir), []).append(f)
    clash = {o: fs for o, fs in by_output.items() if len(fs) > 1}
    if clash:
        o, fs = next(iter(clash.items()))
        raise ValueError(f"{len(clash)} output name(s) would be shared by several inputs, e.g. {o.name} by "
                         f"{', '.join(str(f) for f in fs)}; segment them into separate --out folders, or rename them")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [f for f in files if args.overwrite or not output_path(f, out_dir).exists()]
    skipped = len(files) - len(todo)
    print(f"{len(files)} file(s): {skipped} already done (skipped), {len(todo)} to segment -> {out_dir}",
          file=sys.stderr)
    if not todo:
        return 0
    gen = make_generator(args)
    failed = []
    for k, src in enumerate(todo, start=1):
        prefix = f"[{k}/{len(todo)}] {src.name}"
        t0 = time.time()
        try:
            n = segment_file(src, output_path(src, out_dir), gen, args.min_object_area, args.quiet, prefix)
        except KeyboardInterrupt:
            print("\ninterrupted; finished outputs are kept, rerun the same command to resume", file=sys.stderr)
            return 130
        except Exception as e:  # one bad file must not stop the batch
            failed.append(src)
            print(f"\n{prefix}: error: {type(e).__name__}: {e} (skipped; fix or remove the file and rerun)",
                  file=sys.stderr)
            continue
        end = "\n" if args.quiet else "\r\033[K"
        print(f"{end}{prefix}: {n} objects in {time.time() - t0:.1f} s", file=sys.stderr)
    done = len(todo) - len(failed)
    print(f"done: {done} segmented, {skipped} skipped, {len(failed)} failed", file=sys.stderr)
    if failed:
        print("failed: " + ", ".join(str(f) for f in failed), file=sys.stderr)
        return 1
    return 0
