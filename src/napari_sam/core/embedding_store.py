"""Image embeddings of a whole stack (ZYX, TYX, or one 3D view of TZYX), cached on disk in a zarr store.

``StackEmbeddings(volume, model)`` gives ``emb[z] -> ImageEmbedding`` (computed lazily, or all at once with the
generator :meth:`StackEmbeddings.compute`). The store lives in ``cache_dir() / "embeddings" / KEY`` where KEY
hashes the data (shape, dtype, bytes), the model (config + weights) and our version: the same stack with the
same model reopens instantly, changed data or weights never reuse a stale cache. Features are stored float16,
(Z, C, G, G), one chunk per slice. Each slice has a CRC32 written *after* its chunk: a slice whose chunk is
missing, torn or corrupted (crash, full disk) is recomputed, never returned. An unreadable store is rebuilt.
The data is hashed once, when the object is made; a slice edited in place afterwards is caught when it is read
for its embedding (its own hash no longer matches): :class:`StackChanged`, and nothing is stored under the key.
A read-only, full or too-small cache folder falls back to memory with an :class:`EmbeddingCacheWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .checkpoints import cache_dir
from .image import check_denoise, denoise_of, denoise_plane, max_upscale_of
from .predictor import ImageEmbedding, encoder_input
from .transforms import input_shape

STORE_FORMAT = 1
MAX_BYTES_ENV = "NAPARI_SAM_EMBED_CACHE_MB"
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB for all cached stacks together
READ_CACHE_BYTES = 256 << 20  # slices read from disk are kept in memory up to this size (LRU)
_LAST_USED = "last_used"


class EmbeddingCacheWarning(UserWarning):
    """The disk cache could not be used; embeddings are kept in memory for this session."""


def embeddings_dir() -> Path:
    """Folder that holds one zarr store per (stack, model): ``cache_dir() / "embeddings"``."""
    return cache_dir() / "embeddings"


def max_cache_bytes() -> int:
    """Size limit of :func:`embeddings_dir` in bytes: $NAPARI_SAM_EMBED_CACHE_MB, else 4 GiB."""
    env = os.environ.get(MAX_BYTES_ENV)
    return int(float(env) * (1 << 20)) if env else DEFAULT_MAX_BYTES


def validate_stack(volume: np.ndarray) -> np.ndarray:
    """Check a stack: (Z, Y, X) or (Z, Y, X, C) with C in 1, 3, 4. Raises ValueError naming the fix."""
    vol = np.asarray(volume)
    if vol.ndim == 2:
        raise ValueError(f"got a 2D image of shape {vol.shape}; a stack needs 3 axes (Z, Y, X). For a single "
                         "image use SamPredictor, or add an axis: image[None]")
    if vol.ndim == 3 and vol.shape[-1] in (3, 4) and min(vol.shape[:2]) > 4:
        raise ValueError(f"array of shape {vol.shape} looks like one RGB(A) image, not a (Z, Y, X) stack; "
                         "pass a stack of RGB images as (Z, Y, X, 3), or one image to SamPredictor")
    if vol.ndim == 4 and vol.shape[-1] not in (1, 3, 4):
        raise ValueError(f"got a 4D array of shape {vol.shape}; for time-lapse 3D data (T, Z, Y, X) pass the "
                         "displayed volume, e.g. data[t] (see select_volume), or a (Z, Y, X, C) RGB stack")
    if vol.ndim not in (3, 4):
        raise ValueError(f"stack has shape {vol.shape}; expected (Z, Y, X) or (Z, Y, X, C)")
    if vol.shape[0] < 1 or vol.shape[1] < 2 or vol.shape[2] < 2:
        raise ValueError(f"stack of shape {vol.shape} is empty or its slices are smaller than 2x2 pixels")
    return vol


def select_volume(data: np.ndarray, current_step: Sequence[int], ndim_displayed: int = 3) -> np.ndarray:
    """The 3D (Z, Y, X) volume shown for ``current_step`` in an N-D array: the last 3 axes at the leading
    indices of ``current_step`` (e.g. (T, Z, Y, X) at step (t, z, y, x) -> data[t]). 3D data is returned as is."""
    arr = np.asarray(data) if not hasattr(data, "shape") else data
    if arr.ndim <= 3:
        return arr
    lead = tuple(int(i) for i in current_step[: arr.ndim - 3])
    return np.asarray(arr[lead])


class EmbeddingCancelled(Exception):
    """Raised when ``cancelled()`` turned true while a stack was read or a slice embedded."""


class StackChanged(ValueError):
    """A slice of a stack was edited in place after the stack was hashed for its cache key."""


def plane_digest(plane: np.ndarray) -> bytes:
    """Content hash of one slice or image (shape, dtype and bytes)."""
    h = hashlib.blake2b(repr((plane.shape, str(plane.dtype))).encode(), digest_size=16)
    h.update(np.ascontiguousarray(plane).reshape(-1).view(np.uint8))
    return h.digest()


def volume_hash(volume: np.ndarray, cancelled: Callable[[], bool] | None = None,
                digests: list[bytes] | None = None) -> str:
    """Content hash of an array (shape, dtype and bytes), computed slice by slice (no full copy); raises
    :class:`EmbeddingCancelled` between slices once ``cancelled()`` is true (a large stack takes seconds).
    ``digests``: a list that receives the :func:`plane_digest` of each slice, in order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((volume.shape, str(volume.dtype))).encode())
    for plane in volume:
        if cancelled is not None and cancelled():
            raise EmbeddingCancelled("cancelled while reading the stack")
        digest = plane_digest(plane)
        h.update(digest)
        if digests is not None:
            digests.append(digest)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's config and weights; recomputed when any parameter changed in place (fine-tuning)."""
    tensors = list(model.state_dict().values())
    version = sum(t._version for t in tensors) + sum(p._version for p in model.parameters())
    ptrs = hash(tuple(t.data_ptr() for t in tensors))
    cached = getattr(model, "_nsam_fingerprint", None)
    if cached is not None and cached[0] == (version, ptrs):
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    cfg = getattr(model, "config", None)
    h.update(json.dumps(cfg.to_dict() if cfg is not None else type(model).__name__, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    try:
        model._nsam_fingerprint = ((version, ptrs), digest)
    except AttributeError:
        pass
    return digest


def stack_key(volume: np.ndarray, model: torch.nn.Module, denoise: float | None = None,
              cancelled: Callable[[], bool] | None = None, digests: list[bytes] | None = None) -> str:
    """Cache key of (data, model, its denoising (``denoise``: instead of the model's), napari-sam version, store
    format). ``cancelled``, ``digests``: see :func:`volume_hash`."""
    from napari_sam import __version__

    text = f"{volume_hash(volume, cancelled, digests)}-{model_fingerprint(model)}-{__version__}-{STORE_FORMAT}"
    denoise = denoise_of(model) if denoise is None else check_denoise(denoise)
    if denoise:
        text += f"-denoise{denoise!r}"
    if max_upscale_of(model):
        text += f"-max_upscale{max_upscale_of(model)!r}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def volume_to_uint8(volume: np.ndarray, denoise: float = 0.0) -> Callable[[int], np.ndarray]:
    """A function z -> (Y, X, 3) uint8 slice. uint8 data is kept; other dtypes are normalised with percentiles
    of the whole stack (0.5, 99.5; from at most 16 slices), so all slices share one contrast. ``denoise`` > 0
    smooths each slice in 2D first (:func:`napari_sam.core.image.denoise_plane`, sigma in pixels)."""
    denoise = check_denoise(denoise)
    vol = volume
    if vol.dtype == np.uint8 or vol.dtype == bool:
        lo = hi = None
    else:
        step = max(1, vol.shape[0] // 16)
        sample = np.asarray(vol[::step], dtype=np.float64)
        if sample.ndim == 4 and sample.shape[-1] == 4:
            sample = sample[..., :3]  # alpha is dropped from each slice, so it takes no part in the contrast
        if not np.all(np.isfinite(sample)):
            raise ValueError("stack contains NaN or inf; replace them, e.g. np.nan_to_num(volume)")
        lo, hi = np.percentile(sample, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(sample.min()), float(sample.max())

    def get(z: int, plane: np.ndarray | None = None) -> np.ndarray:  # plane: vol[z], when already read
        plane = np.asarray(vol[z] if plane is None else plane)
        if plane.ndim == 3 and plane.shape[-1] == 1:
            plane = plane[..., 0]
        if plane.ndim == 3 and plane.shape[-1] == 4:
            plane = plane[..., :3]
        if plane.dtype == bool:
            plane = plane.astype(np.uint8) * 255
        if plane.dtype.kind == "f" and not np.all(np.isfinite(plane)):  # (the contrast sample skips slices)
            raise ValueError(f"slice {z} of the stack contains NaN or inf; replace them, e.g. np.nan_to_num(volume)")
        plane = denoise_plane(plane, denoise)
        if lo is not None:
            if hi <= lo:
                plane = np.zeros(plane.shape, np.uint8)
            else:
                plane = np.clip(np.rint((plane.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255)
                plane = plane.astype(np.uint8)
        if plane.ndim == 2:
            plane = np.repeat(plane[..., None], 3, axis=-1)
        return np.ascontiguousarray(plane)

    return get


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _is_store(path: Path) -> bool:
    """Whether a folder is one of our embedding stores (a zarr group with a ``features`` array)."""
    return path.is_dir() and (path / "features").is_dir() and any((path / f).exists() for f in ("zarr.json",
                                                                                                ".zgroup"))


def clean_cache(max_bytes: int | None = None, keep: Sequence[str] = (), root: Path | None = None) -> list[Path]:
    """Delete the least recently used stores until the stores of the folder hold at most ``max_bytes``; returns
    those deleted. Anything else in the folder (a user's files, when it is one of theirs) is never touched."""
    root = embeddings_dir() if root is None else root
    limit = max_cache_bytes() if max_bytes is None else max_bytes
    if not root.is_dir():
        return []
    stores = []
    for p in root.iterdir():
        if _is_store(p):
            marker = p / _LAST_USED
            used = marker.stat().st_mtime if marker.exists() else p.stat().st_mtime
            stores.append((used, p, _dir_size(p)))
    total = sum(s for _, _, s in stores)
    removed = []
    for _used, p, size in sorted(stores, key=lambda s: s[0]):
        if total <= limit:
            break
        if p.name in keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        total -= size
        removed.append(p)
    return removed


class StackEmbeddings:
    """Embeddings of every slice of a stack; ``emb[z]`` -> :class:`ImageEmbedding` (features (1, C, G, G) float32,
    rounded through float16 so fresh and cached values are identical).

    volume: (Z, Y, X) or (Z, Y, X, C) array (any dtype); model: a Sam. cache: True (disk store in
    :func:`embeddings_dir`, falling back to memory with a warning if it cannot be used), False (memory only),
    or a folder to hold the stores. max_bytes: size limit of that folder (default :func:`max_cache_bytes`).
    The model's preprocessing (``denoise``, ``max_upscale``; taken when the object is made) is part of the key.
    denoise: a Gaussian sigma (pixels) for these slices instead of the model's (None: the model's).
    cancelled: polled while the stack is read for its cache key; raises :class:`EmbeddingCancelled`.
    The data is hashed here: a slice edited in place later raises :class:`StackChanged` when it is embedded (or
    checked, :meth:`check_slice`); open the stack again.
    """

    def __init__(self, volume: np.ndarray, model: torch.nn.Module, cache: bool | str | os.PathLike = True,
                 max_bytes: int | None = None, denoise: float | None = None,
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.volume = validate_stack(volume)
        self.model = model
        self.n_slices = int(self.volume.shape[0])
        self.original_size = (int(self.volume.shape[1]), int(self.volume.shape[2]))
        self.max_upscale = max_upscale_of(model)
        self.input_size = input_shape(*self.original_size, model.img_size, self.max_upscale)
        g = model.prompt_encoder.image_embedding_size
        self.feature_shape = (int(model.prompt_encoder.embed_dim), int(g[0]), int(g[1]))
        self.denoise = denoise_of(model) if denoise is None else check_denoise(denoise)
        self._digests: list[bytes] = []  # plane_digest of each slice when the key was made
        self.key = stack_key(self.volume, model, self.denoise, cancelled, self._digests)
        self._slice = volume_to_uint8(self.volume, self.denoise)
        self._mem: dict[int, np.ndarray] = {}  # slices not on disk (memory mode, or not yet written)
        self._read: OrderedDict[int, np.ndarray] = OrderedDict()  # recently read from disk (LRU)
        self._read_budget = READ_CACHE_BYTES
        self._features = None  # zarr array (Z, C, G, G) float16
        self._crc = None  # zarr array (Z,) int64, -1 = not written
        self._crc_cache: np.ndarray | None = None
        self._writable = True
        self.path: Path | None = None
        self.max_bytes = max_cache_bytes() if max_bytes is None else int(max_bytes)
        if cache:
            root = embeddings_dir() if cache is True else Path(cache)
            self._open_store(root)

    # ------------------------------------------------------------------ store
    @property
    def in_memory(self) -> bool:
        """True when the disk cache is not used (disabled, or it failed and we fell back to memory)."""
        return self._features is None or not self._writable

    def _attrs(self) -> dict:
        return {"format": STORE_FORMAT, "key": self.key, "shape": list(self.volume.shape),
                "dtype": str(self.volume.dtype), "feature_shape": list(self.feature_shape),
                "original_size": list(self.original_size), "input_size": list(self.input_size),
                "model": getattr(getattr(self.model, "config", None), "name", "")}

    def _open_store(self, root: Path) -> None:
        try:
            import zarr
        except ImportError:  # pragma: no cover - zarr is a dependency
            warnings.warn("zarr is not installed: embeddings are kept in memory (pip install zarr)",
                          EmbeddingCacheWarning, stacklevel=3)
            return
        path = root / self.key
        need = self.n_slices * int(np.prod(self.feature_shape)) * 2
        if need > self.max_bytes:
            warnings.warn(f"the embeddings of this stack need {need / 2**20:.0f} MiB, more than the cache limit "
                          f"of {self.max_bytes / 2**20:.0f} MiB; they are kept in memory. Raise the limit with "
                          f"{MAX_BYTES_ENV}=<MiB>", EmbeddingCacheWarning, stacklevel=3)
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                if self._try_open(zarr, path):
                    (path / _LAST_USED).touch()
                    return
                warnings.warn(f"the embedding cache {path} is damaged or incomplete; rebuilding it",
                              EmbeddingCacheWarning, stacklevel=3)
                shutil.rmtree(path)
            clean_cache(self.max_bytes - need, keep=(self.key,), root=root)
            grp = zarr.open_group(str(path), mode="w", attributes={"building": True})
            feats = grp.create_array("features", shape=(self.n_slices, *self.feature_shape),
                                     chunks=(1, *self.feature_shape), dtype="float16", compressors=None,
                                     fill_value=0)
            crc = grp.create_array("crc", shape=(self.n_slices,), chunks=(self.n_slices,), dtype="int64",
                                   compressors=None, fill_value=-1)
            grp.attrs.update(self._attrs())  # written last: a store without them is rebuilt
            grp.attrs["building"] = False
            (path / _LAST_USED).touch()
            self._features, self._crc, self.path = feats, crc, path
            self._crc_cache = np.full(self.n_slices, -1, np.int64)
        except OSError as e:
            self._features = self._crc = None
            warnings.warn(f"cannot use the embedding cache folder {root} ({e.strerror or e}); embeddings are "
                          f"kept in memory for this session. Free space, make it writable, or set "
                          f"NAPARI_SAM_CACHE_DIR to another folder", EmbeddingCacheWarning, stacklevel=3)

    def _try_open(self, zarr, path: Path) -> bool:
        try:
            grp = zarr.open_group(str(path), mode="r+")
            attrs = dict(grp.attrs)
            if attrs.get("building", True) or {k: attrs.get(k) for k in self._attrs()} != self._attrs():
                return False
            feats, crc = grp["features"], grp["crc"]
            if feats.shape != (self.n_slices, *self.feature_shape) or feats.dtype != np.float16:
                return False
            crcs = np.asarray(crc[:], dtype=np.int64)
        except Exception:  # any unreadable metadata or index: rebuild
            return False
        self._features, self._crc, self.path, self._crc_cache = feats, crc, path, crcs
        return True

    def _store_slices(self, items: Sequence[tuple[int, np.ndarray]]) -> None:
        """Keep (z, float16 features) pairs; on disk, the chunks first, then the CRC index (crash-safe order)."""
        for z, feats16 in items:
            self._mem[z] = feats16
        if self._features is None or not self._writable:
            return
        try:
            for z, feats16 in items:
                self._features[z] = feats16
            crcs = self._crc_cache.copy()
            for z, feats16 in items:
                crcs[z] = zlib.crc32(feats16.tobytes())
            self._crc[:] = crcs  # the index is written after the chunks
            self._crc_cache = crcs
            for z, _ in items:
                self._mem.pop(z, None)
        except OSError as e:
            warnings.warn(f"writing the embedding cache {self.path} failed ({e.strerror or e}); the remaining "
                          "embeddings are kept in memory", EmbeddingCacheWarning, stacklevel=4)
            self._writable = False  # slices already on disk stay readable

    def _load_slice(self, z: int) -> np.ndarray | None:
        if z in self._mem:
            return self._mem[z]
        if z in self._read:
            self._read.move_to_end(z)
            return self._read[z]
        if self._features is None or self._crc_cache[z] < 0:
            return None
        try:
            feats16 = np.ascontiguousarray(self._features[z], dtype=np.float16)
        except Exception:
            feats16 = None
        if feats16 is None or zlib.crc32(feats16.tobytes()) != int(self._crc_cache[z]):
            warnings.warn(f"cached embedding of slice {z} in {self.path} is damaged; recomputing it",
                          EmbeddingCacheWarning, stacklevel=3)
            self._crc_cache[z] = -1
            return None
        self._read[z] = feats16
        while len(self._read) * feats16.nbytes > self._read_budget:
            self._read.popitem(last=False)
        return feats16

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.n_slices

    def is_computed(self, z: int) -> bool:
        return z in self._mem or (self._crc_cache is not None and self._crc_cache[z] >= 0)

    def missing(self) -> list[int]:
        """Slices without an embedding yet."""
        return [z for z in range(self.n_slices) if not self.is_computed(z)]

    def _check_z(self, z: int) -> int:
        if isinstance(z, (bool, np.bool_)) or not isinstance(z, (int, np.integer)):
            raise TypeError(f"slice index must be an int, got {z!r}")
        if not 0 <= z < self.n_slices:
            raise IndexError(f"slice {z} is outside the stack (0 .. {self.n_slices - 1})")
        return int(z)

    def digest(self, z: int) -> bytes:
        """:func:`plane_digest` of slice z when the stack was opened (the content its embedding is of)."""
        return self._digests[self._check_z(z)]

    def _read_checked(self, z: int) -> np.ndarray:
        """A copy of slice z, checked against its digest: :class:`StackChanged` if it was edited since."""
        plane = np.array(self.volume[z])
        if plane_digest(plane) != self._digests[z]:
            raise StackChanged(f"slice {z} of the stack changed after it was opened (edited in place); open the "
                               "stack again")
        return plane

    def check_slice(self, z: int) -> None:
        """Raise :class:`StackChanged` if slice z no longer holds the data it had when the stack was opened (an
        in-place edit): its stored embedding would be of other pixels. Costs one slice's hash."""
        self._read_checked(self._check_z(z))

    def __getitem__(self, z: int) -> ImageEmbedding:
        z = self._check_z(z)
        feats16 = self._load_slice(z)
        if feats16 is None:
            feats16 = self._encode([z])[0]
            self._store_slices([(z, feats16)])
        t = torch.from_numpy(feats16.astype(np.float32))[None]
        return ImageEmbedding(t, self.original_size, self.input_size)

    def features(self, z: int) -> np.ndarray:
        """float16 (C, G, G) features of slice z (computed if needed)."""
        return self[z].features[0].numpy().astype(np.float16)

    @torch.inference_mode()
    def _encode(self, zs: Sequence[int]) -> list[np.ndarray]:
        """float16 (C, G, G) features of slices ``zs``, one encoder call each (results never depend on batching).
        Raises :class:`StackChanged` for a slice edited since the stack was opened (nothing is stored)."""
        out = []
        for z in zs:
            x, _ = encoder_input(self.model, self._slice(z, self._read_checked(z)), self.max_upscale)
            out.append(self.model.image_encoder(x)[0].cpu().numpy().astype(np.float16))
        return out

    def compute(self, slices: Sequence[int] | None = None, batch_size: int = 4,
                cancel: Callable[[], bool] | None = None) -> Iterator[tuple[int, int]]:
        """Generator: embed the missing slices (all, or ``slices``), yielding (done, total) after each batch.
        Stops early (keeping what is done) when ``cancel()`` returns True."""
        todo = [z for z in (range(self.n_slices) if slices is None else map(self._check_z, slices))
                if self._load_slice(z) is None]
        total = len(todo)
        yield 0, total
        for i in range(0, total, batch_size):
            if cancel is not None and cancel():
                return
            batch = todo[i: i + batch_size]
            self._store_slices(list(zip(batch, self._encode(batch))))
            yield min(i + batch_size, total), total
        if self.path is not None and self._features is not None:
            try:
                (self.path / _LAST_USED).touch()
            except OSError:
                pass

    def compute_all(self, **kw) -> "StackEmbeddings":
        """Embed every slice now (no progress); returns self."""
        for _ in self.compute(**kw):
            pass
        return self
