"""``napari-sam embed STACK.tif``: precompute a stack's embeddings into the disk cache (optional).

Opening the same stack in napari (with the same model) then needs no encoder run. (Z, Y, X) stacks, TYX
time-lapses (T as Z), and one time point of a (T, Z, Y, X) array (``--t``). ``--views`` also embeds every plane of
the stack's XZ and YZ views (3D propagation's orthogonal views), z resampled with ``--spacing Z Y X``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import add_denoise_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="precompute the embeddings of a 3D stack into the disk cache",
                              description=__doc__.splitlines()[0])
    p.add_argument("stack", type=Path, help="a TIFF (or any imageio-readable) stack, (Z, Y, X) or (T, Z, Y, X)")
    p.add_argument("--model", default=None, help="builtin (default), vit_b, vit_t, ... or a checkpoint path")
    add_denoise_argument(p)
    p.add_argument("--t", type=int, default=None, help="time point of a (T, Z, Y, X) array")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="folder for the stores (default: the user cache dir, or $NAPARI_SAM_CACHE_DIR)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--views", action="store_true",
                   help="also embed the planes of the XZ and YZ views that 3D propagation uses (not for time-lapses)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="voxel size for --views, e.g. 0.28 0.127 0.127 (default: isotropic), as in napari's scale")
    p.set_defaults(func=run)


def _read(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio

    return iio.imread(path)


def run(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np

    from ..core.build import load_model
    from ..core.embedding_store import EmbeddingCacheWarning, StackEmbeddings

    data = _read(args.stack)
    if data.ndim == 4 and data.shape[-1] not in (1, 3, 4):
        if args.t is None:
            raise ValueError(f"{args.stack} has shape {data.shape} (T, Z, Y, X): choose a time point with --t")
        if not 0 <= args.t < data.shape[0]:
            raise ValueError(f"--t {args.t} is outside 0 .. {data.shape[0] - 1}")
        data = data[args.t]
    data = np.ascontiguousarray(data)
    model = load_model(args.model, device=args.device, denoise=args.denoise)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmbeddingCacheWarning)
        emb = StackEmbeddings(data, model, cache=args.cache_dir or True)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if emb.in_memory:
        print("error: the disk cache cannot be used, so precomputing would be lost", file=sys.stderr)
        return 1
    stores = [("slices", emb)]
    if args.views:
        from ..core.propagation import PropagationParams
        from ..core.propagation_views import check_spacing, view_embeddings, views_fit

        p, spacing = PropagationParams(), check_spacing(args.spacing)
        if not views_fit(data, spacing, p.view_step):
            raise ValueError(f"{args.stack} ({data.shape}) gets no orthogonal views: it has fewer than 3 slices, or "
                             "its views would exceed 2 GiB; drop --views")
        xz, yz = view_embeddings(emb, spacing, p.view_step, p.view_denoise)
        stores += [("XZ planes", xz), ("YZ planes", yz)]
    t0 = time.perf_counter()
    for what, store in stores:
        for done, total in store.compute():
            print(f"\rembedding {done}/{total} {what}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        print(f"{len(store)} {what} of {args.stack} cached in {store.path} ({time.perf_counter() - t0:.1f} s)")
    return 0
