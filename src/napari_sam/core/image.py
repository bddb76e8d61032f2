"""Turning whatever a microscope gives us into the uint8 RGB image SAM expects."""

from __future__ import annotations

import numpy as np

#: the largest accepted denoising sigma (pixels); beyond it nuclei-sized objects blur away
MAX_DENOISE = 20.0


def check_denoise(sigma) -> float:
    """Validate a denoising sigma (Gaussian, in image pixels; 0 = off) and return it as a float."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"denoise={sigma!r} must be a number: the Gaussian sigma in image pixels (0 = off)") from None
    if not np.isfinite(value) or value < 0 or value > MAX_DENOISE:
        raise ValueError(f"denoise={sigma!r} must be between 0 (off) and {MAX_DENOISE} pixels; "
                         "about 1-3 suits noisy confocal or low-light images")
    return value


def denoise_of(model) -> float:
    """The denoising sigma a model's preprocessing applies (``model.denoise``; 0 for models without one)."""
    return float(getattr(model, "denoise", 0.0) or 0.0)


def check_max_upscale(value) -> float | None:
    """Validate a ``max_upscale`` setting (how many times at most an image is enlarged for the encoder; None or
    0 = no limit) and return it as a float or None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_upscale={value!r} must be a number >= 1, or None for no limit") from None
    if v == 0:
        return None
    if not np.isfinite(v) or v < 1:
        raise ValueError(f"max_upscale={value!r} must be >= 1 (how many times at most an image is enlarged), "
                         "or None / 0 for no limit")
    return v


def max_upscale_of(model) -> float | None:
    """The model's ``max_upscale`` setting (None: images are always resized to the full input, the reference)."""
    return getattr(model, "max_upscale", None) or None


def denoise_plane(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of one 2D plane, (H, W) or (H, W, C) (each channel alone, never across channels).

    sigma in image pixels; 0 returns ``plane`` unchanged. The result is float32, except that uint8 input is
    rounded back to uint8 (same range, so it is still passed to the model as it is).
    """
    sigma = check_denoise(sigma)
    if sigma == 0:
        return plane
    from scipy.ndimage import gaussian_filter

    arr = np.asarray(plane)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    out = gaussian_filter(arr.astype(np.float32), (sigma, sigma) + (0,) * (arr.ndim - 2), mode="reflect")
    if arr.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def to_rgb_uint8(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5, denoise: float = 0.0) -> np.ndarray:
    """Validate a 2D image and return it as (H, W, 3) uint8 RGB.

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped), of any integer,
    float or bool dtype. uint8 data is kept as it is (bit-exact with the reference); other dtypes are
    normalised robustly to 0..255 between the ``low_pct`` and ``high_pct`` percentiles of all channels.
    A constant image becomes all zeros. ``denoise`` > 0 first smooths the image with :func:`denoise_plane`
    (Gaussian sigma in image pixels) for noisy data such as confocal stacks.

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
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or inf pixels; replace them, e.g. np.nan_to_num(image)")
    arr = denoise_plane(arr, denoise)
    if arr.dtype != np.uint8:
        arr = _normalise(arr, low_pct, high_pct)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr)


#: elements scaled at a time by :func:`_normalise` (float64 chunks of 32 MB instead of whole-image copies)
NORMALISE_CHUNK = 1 << 22


def _normalise(arr: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """``arr`` (any real dtype) -> uint8 between its ``low_pct`` and ``high_pct`` percentiles, computed in float64
    chunk by chunk: an 8192-px uint16 plane no longer makes several float64 copies of itself (2 GB). Integer
    percentiles are taken on the data as it is (the same values as on a float64 copy)."""
    sample = arr if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.float64 else arr.astype(np.float64)
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    del sample
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    flat = np.ascontiguousarray(arr).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint8)
    scale = 255.0 / (hi - lo)
    for i in range(0, flat.size, NORMALISE_CHUNK):
        part = flat[i:i + NORMALISE_CHUNK].astype(np.float64)
        part -= lo
        part *= scale
        out[i:i + NORMALISE_CHUNK] = np.clip(np.rint(part, out=part), 0, 255, out=part)
    return out.reshape(arr.shape)
