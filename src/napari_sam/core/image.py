"""Turning whatever a microscope gives us into the uint8 RGB image SAM expects."""

from __future__ import annotations

import numpy as np


def to_rgb_uint8(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Validate a 2D image and return it as (H, W, 3) uint8 RGB.

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped), of any integer,
    float or bool dtype. uint8 data is kept as it is (bit-exact with the reference); other dtypes are
    normalised robustly to 0..255 between the ``low_pct`` and ``high_pct`` percentiles of all channels.
    A constant image becomes all zeros.

    Raises ValueError for NaN/inf, empty or single-pixel images, and arrays that are not one 2D image.
    """
    arr = np.asarray(image)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"image has dtype {arr.dtype}; pass a numeric array")
    if np.iscomplexobj(arr):
        raise ValueError("image is complex-valued; pass its magnitude (np.abs(image)) instead")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ValueError(
            f"image has shape {arr.shape}; expected one 2D image: (H, W), (H, W, 3) RGB or (H, W, 4) RGBA. "
            "For a stack or time series pass one plane, e.g. image[z], or use the volume functions"
        )
    h, w = arr.shape[:2]
    if h < 2 or w < 2:
        raise ValueError(f"image of shape {arr.shape} is too small; it needs at least 2x2 pixels")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError("image contains NaN or inf pixels; replace them, e.g. np.nan_to_num(image)")
        arr = _normalise(arr.astype(np.float64, copy=False), low_pct, high_pct)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr)


def _normalise(arr: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    lo, hi = np.percentile(arr, [low_pct, high_pct])
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
