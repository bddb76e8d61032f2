"""Training data: image + instance-label pairs, validated and cached at the model's input size.

Images are any 2D array that :func:`napari_sam.core.image.to_rgb_uint8` accepts; labels are (H, W) integer
instance labels (0 = background). Pairs come from folders (``*_image.*`` + ``*_label.tif``, or
``images/<id>.png`` + ``labels/<id>.tif`` with a split CSV) or from in-memory arrays (napari Labels layers).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..image import to_rgb_uint8
from ..transforms import ResizeLongestSide

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class DataError(ValueError):
    """Bad training or evaluation data (shape mismatch, empty labels, missing files)."""


@dataclass
class Sample:
    """One image resized so its longest side is ``img_size``: image (h, w, 3) uint8, labels (h, w) int32.

    ``original_size`` is the (H, W) before resizing; ``ids`` the instance ids present (sorted, no 0).
    """

    image: np.ndarray
    labels: np.ndarray
    original_size: tuple[int, int]
    name: str = ""
    group: str = ""
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def read_array(path: str | Path) -> np.ndarray:
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio

    return iio.imread(path)


def check_pair(image: np.ndarray, labels: np.ndarray, name: str = "image",
               denoise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Validate one pair -> (RGB uint8 (H, W, 3), int32 labels (H, W)); raises :class:`DataError`.

    ``labels``: (H, W) non-negative integer (or bool) instance ids, 0 = background. Ids beyond int32 (>= 2**31)
    are renumbered 1..n in the order of their values (objects are independent per image), never wrapped.
    ``denoise``: the model's Gaussian sigma in image pixels (see :func:`napari_sam.core.image.to_rgb_uint8`)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"{name}: labels must be a 2D instance-label image (H, W), also for an RGB image, got shape "
                        f"{labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"{name}: labels must be integers (instance ids), got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise DataError(f"{name}: labels contain negative ids (min {labels.min()}); instance ids must be >= 0 "
                        "(0 = background): renumber the objects 1..n")
    rgb = to_rgb_uint8(image, denoise=denoise)
    if rgb.shape[:2] != labels.shape:
        raise DataError(
            f"{name}: labels shape {labels.shape} does not match the image's {rgb.shape[:2]}; "
            "each label image must have the image's height and width"
        )
    if not labels.any():
        raise DataError(f"{name}: the label image is empty (no object); annotate at least one object or drop it")
    if labels.dtype != bool and labels.max() > np.iinfo(np.int32).max:  # renumber: astype(int32) would wrap
        ids, inv = np.unique(labels, return_inverse=True)
        return rgb, (inv.reshape(labels.shape) + int(ids[0] != 0)).astype(np.int32)
    return rgb, labels.astype(np.int32)


def resize_pair(image: np.ndarray, labels: np.ndarray, img_size: int, name: str = "", group: str = "",
                denoise: float = 0.0, max_upscale: float | None = None) -> Sample:
    """Resize a validated pair so the longest side is ``img_size`` (image bilinear, labels nearest), or less when
    that would enlarge it more than ``max_upscale`` times; ``denoise`` smooths the image first. Both as the
    model's preprocessing does at inference."""
    rgb, lab = check_pair(image, labels, name or "image", denoise)
    small = ResizeLongestSide(img_size, max_upscale).apply_image(rgb)
    h, w = small.shape[:2]
    if (h, w) != lab.shape:
        lab = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST)).astype(np.int32)
    ids = np.unique(lab)
    ids = ids[ids != 0]
    if ids.size == 0:
        raise DataError(f"{name}: all objects vanished when resizing to {img_size} px (objects too small)")
    return Sample(small, lab, tuple(rgb.shape[:2]), name, group, ids)


def pairs_from_folder(images: str | Path, labels: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Pair image files with label files.

    Layout 1 (one folder): ``<name>_image.<ext>`` with ``<name>_label.tif``.
    Layout 2: ``images/<id>.<ext>`` with ``labels/<id>.tif`` (``labels`` given).
    Raises :class:`DataError` naming the images that have no label file.
    """
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist")
    labels = Path(labels) if labels is not None else images
    if not labels.is_dir():
        raise DataError(f"label folder {labels} does not exist")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    tagged = [p for p in files if p.stem.endswith("_image")]
    pairs, missing = [], []
    if tagged:
        for p in tagged:
            stem = p.stem[: -len("_image")]
            cands = [labels / f"{stem}_label{e}" for e in (".tif", ".tiff", ".png")]
            hit = next((c for c in cands if c.is_file()), None)
            (pairs.append((p, hit)) if hit else missing.append(p.name))
    else:
        for p in files:
            if p.stem.endswith("_label"):
                continue
            cands = [labels / f"{p.stem}{e}" for e in (".tif", ".tiff", ".png")]
            hit = next((c for c in cands if c.is_file() and c != p), None)
            (pairs.append((p, hit)) if hit else missing.append(p.name))
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {images} have no label file in {labels}, e.g. {missing[:3]}; "
            "expected <name>_label.tif beside <name>_image.<ext>, or labels/<id>.tif for images/<id>.<ext>"
        )
    if not pairs:
        raise DataError(f"no image files found in {images}")
    return pairs


def read_split(csv_path: str | Path, split: str | None = None) -> list[dict[str, str]]:
    """Rows of a split CSV (``id,split,modality,...``), optionally only one split."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = {"id"} | ({"split"} if split is not None else set())
    missing -= set(reader.fieldnames or ())
    if missing:
        raise DataError(f"{csv_path} has no {' / '.join(sorted(missing))} column (its header: "
                        f"{','.join(reader.fieldnames or [])}); a split CSV starts with id,split,modality")
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise DataError(f"split {split!r} has no rows in {csv_path}")
    return rows


def load_split_folder(root: str | Path, split: str | None, img_size: int, limit: int | None = None,
                      csv_path: str | Path | None = None, denoise: float = 0.0,
                      max_upscale: float | None = None) -> list[Sample]:
    """dsb2018_full layout: ``root/images/<id>.png``, ``root/labels/<id>.tif``, ``root/split.csv``.

    ``group`` is the CSV's ``modality``. ``limit`` keeps n rows taken round-robin over the modalities (each
    sorted by id), so a small validation subset still covers every modality; deterministic.
    """
    root = Path(root)
    rows = sorted(read_split(csv_path or root / "split.csv", split), key=lambda r: r["id"])
    if limit is not None and limit < len(rows):
        by: dict[str, list] = {}
        for r in rows:
            by.setdefault(r.get("modality", ""), []).append(r)
        queues, rows = [list(v) for _, v in sorted(by.items())], []
        while len(rows) < limit:
            for q in queues:
                if q and len(rows) < limit:
                    rows.append(q.pop(0))
    out = []
    for r in rows:
        img_p, lab_p = root / "images" / f"{r['id']}.png", root / "labels" / f"{r['id']}.tif"
        if not lab_p.is_file():
            raise DataError(f"label file {lab_p} is missing for image {img_p.name}")
        out.append(resize_pair(read_array(img_p), read_array(lab_p), img_size, r["id"], r.get("modality", ""),
                               denoise, max_upscale))
    return out


def load_folder(images: str | Path, labels: str | Path | None, img_size: int, denoise: float = 0.0,
                max_upscale: float | None = None) -> list[Sample]:
    """Folder of pairs (see :func:`pairs_from_folder`) -> resized samples (group = "")."""
    pairs = pairs_from_folder(images, labels)
    return [resize_pair(read_array(i), read_array(lab), img_size, i.stem, "", denoise, max_upscale)
            for i, lab in pairs]


def from_arrays(images: list[np.ndarray] | np.ndarray, labels: list[np.ndarray] | np.ndarray,
                img_size: int, denoise: float = 0.0, max_upscale: float | None = None) -> list[Sample]:
    """In-memory pairs (e.g. a napari Image layer and its Labels layer): 2D each, or stacks of 2D slices.
    ``denoise``, ``max_upscale``: the model's preprocessing (see :func:`resize_pair`).

    Each pair: an (H, W), (H, W, 3) RGB or (H, W, 4) RGBA image with (H, W) labels, or a (Z, H, W[, 3|4]) stack
    with (Z, H, W) labels; 3D labels beside a 2D image (e.g. (H, W, 3) or (H, W, 1)) raise :class:`DataError`.
    Slices whose labels are empty are skipped; raises if none has an object.
    """
    imgs = list(images) if isinstance(images, (list, tuple)) else [images]
    labs = list(labels) if isinstance(labels, (list, tuple)) else [labels]
    if len(imgs) != len(labs):
        raise DataError(f"{len(imgs)} image(s) but {len(labs)} label image(s)")
    out = []
    for k, (im, lab) in enumerate(zip(imgs, labs)):
        im, lab = np.asarray(im), np.asarray(lab)
        if lab.ndim == 3 and (im.ndim == 2 or (im.ndim == 3 and im.shape[-1] in (3, 4))):  # one 2D image
            raise DataError(f"{k}: labels of shape {lab.shape} beside a 2D image of shape {im.shape}; labels must be "
                            "(H, W) for an (H, W) or (H, W, 3) image, or (Z, H, W) for a (Z, H, W) stack (for "
                            "(H, W, 1) labels pass labels[..., 0]; colour-coded labels must become integer ids)")
        if lab.ndim == 3:  # stack of slices
            if im.shape[: 1] != lab.shape[:1]:
                raise DataError(f"image stack {im.shape} and label stack {lab.shape} differ in length")
            out += [resize_pair(i2, l2, img_size, f"{k}:{z}", "", denoise, max_upscale)
                    for z, (i2, l2) in enumerate(zip(im, lab)) if l2.any()]
        else:
            out.append(resize_pair(im, lab, img_size, str(k), "", denoise, max_upscale))
    if not out:
        raise DataError("no labelled object found: commit at least one object to the Labels layer first")
    return out
