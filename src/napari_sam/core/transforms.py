"""Resizing images and prompts to the model's input frame, and logits back to the image.

All coordinates here are SAM (x, y) in pixels; the (row, col) -> (x, y) swap happens in prompts.rc_to_xy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size (h', w') with max(h', w') == long_side and the aspect ratio kept (reference rounding; a side the
    reference would round to 0, on a very elongated image, is 1)."""
    scale = long_side * 1.0 / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def input_shape(h: int, w: int, img_size: int, max_upscale: float | None = None) -> tuple[int, int]:
    """Size (h', w') of an (h, w) image in the model's input frame: the longest side becomes ``img_size``,
    unless that would enlarge the image more than ``max_upscale`` times (then it becomes
    round(max_upscale * max(h, w)) and the rest of the canvas is filled by mirroring, see
    :func:`napari_sam.core.predictor.encoder_input`). None: no limit (the reference)."""
    long_side = img_size
    if max_upscale:
        long_side = min(img_size, max(1, int(max_upscale * max(h, w) + 0.5)))
    return preprocess_shape(h, w, long_side)


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(..., 2) (x, y) in original pixels -> (..., 2) (x, y) in input pixels of an image resized to input_size."""
    (oh, ow), (nh, nw) = original_size, input_size
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] = coords[..., 0] * (nw / ow)
    coords[..., 1] = coords[..., 1] * (nh / oh)
    return coords


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(B, 4) (x0, y0, x1, y1) in original pixels -> the same in input pixels (see :func:`scale_coords`)."""
    return scale_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, input_size).reshape(-1, 4)


class ResizeLongestSide:
    """Resize so that the longest side is ``target_length`` (at most ``max_upscale`` times the image's own;
    None: always ``target_length``, the reference); the same rule for images, points and boxes."""

    def __init__(self, target_length: int, max_upscale: float | None = None) -> None:
        self.target_length = target_length
        self.max_upscale = max_upscale

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return input_shape(h, w, self.target_length, self.max_upscale)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h', w', 3) uint8, PIL bilinear (antialiased), as the reference does."""
        h, w = self.input_size(image.shape[0], image.shape[1])
        if (h, w) == image.shape[:2]:
            return image
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) in original pixels -> (..., 2) (x, y) in model-input pixels."""
        return scale_coords(coords, original_size, self.input_size(*original_size))

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(B, 4) (x0, y0, x1, y1) -> the same in model-input pixels."""
        return scale_boxes(boxes, original_size, self.input_size(*original_size))


@lru_cache(maxsize=64)
def _interp_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of F.interpolate(mode="bilinear", align_corners=False) along one axis."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = src - i0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - l1)
    np.add.at(m, (rows, i1), l1)
    return m


@lru_cache(maxsize=32)
def _upsample_operators(low_res: int, img_size: int, input_size: tuple[int, int],
                        original_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column operators (H, low_res), (W, low_res) equal to the reference postprocess_masks.

    The reference upsamples to img_size x img_size, crops to input_size, then resizes to original_size;
    each step is linear and separable, so the composite is one small matrix per axis.
    """
    ops = []
    for axis in range(2):
        first = _interp_matrix(low_res, img_size)[: input_size[axis]]
        second = _interp_matrix(input_size[axis], original_size[axis])
        ops.append(torch.from_numpy((second @ first).astype(np.float32)))
    return ops[0], ops[1]


@lru_cache(maxsize=32)
def _operator_support(low_res: int, img_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """For each axis and low-res index i: the first and one-past-last output index whose weight on i is
    non-zero (the operators are banded and monotone), as int arrays of length low_res."""
    out = []
    for op in _upsample_operators(low_res, img_size, input_size, original_size):
        nz = (op != 0).numpy()  # (out, low_res)
        has = nz.any(0)
        first = np.where(has, nz.argmax(0), op.shape[0])
        last = np.where(has, op.shape[0] - nz[::-1].argmax(0), 0)
        # a low-res index outside the cropped input has no support: keep windows well-formed
        out += [np.minimum.accumulate(first[::-1])[::-1], np.maximum.accumulate(last)]
    return tuple(out)


def upsample_logits(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits (..., L, L) -> logits at the original size (..., H, W), float32."""
    a, b = _upsample_operators(low_res.shape[-1], img_size, tuple(input_size), tuple(original_size))
    a, b = a.to(low_res.device), b.to(low_res.device)
    return a @ low_res.float() @ b.T


def upsample_masks(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                   original_size: tuple[int, int], threshold: float = 0.0) -> np.ndarray:
    """Low-res logits (N, L, L) -> bool masks (N, H, W) at the original size, ``logits > threshold``.

    Only the window that can hold foreground is computed: bilinear weights are convex, so an output pixel
    whose low-res neighbourhood holds no logit above the threshold is background. The result equals
    thresholding :func:`upsample_logits` (up to float rounding), at a fraction of the cost for small objects.
    """
    key = (low_res.shape[-1], img_size, tuple(input_size), tuple(original_size))
    a, b = _upsample_operators(*key)
    a, b = a.to(low_res.device), b.to(low_res.device)
    r_first, r_last, c_first, c_last = _operator_support(*key)
    n, L = low_res.shape[0], low_res.shape[-1]
    h, w = original_size
    out = np.zeros((n, h, w), dtype=bool)
    fg = low_res > threshold
    rows_any = fg.any(dim=2).cpu().numpy()  # (N, L)
    cols_any = fg.any(dim=1).cpu().numpy()
    has = rows_any.any(1)
    r_lo, r_hi = rows_any.argmax(1), L - 1 - rows_any[:, ::-1].argmax(1)
    c_lo, c_hi = cols_any.argmax(1), L - 1 - cols_any[:, ::-1].argmax(1)
    low = low_res.float()
    for i in np.flatnonzero(has):
        r0, r1 = int(r_first[r_lo[i]]), int(r_last[r_hi[i]])
        c0, c1 = int(c_first[c_lo[i]]), int(c_last[c_hi[i]])
        if r1 <= r0 or c1 <= c0:
            continue
        win = a[r0:r1] @ low[i] @ b[c0:c1].T
        out[i, r0:r1, c0:c1] = (win > threshold).cpu().numpy()
    return out
