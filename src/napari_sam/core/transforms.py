"""Resizing images and prompts to the model's input frame, and logits back to the image.

All coordinates here are SAM (x, y) in pixels; the (row, col) -> (x, y) swap happens in prompts.rc_to_xy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size (h', w') with max(h', w') == long_side and the aspect ratio kept (reference rounding)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class ResizeLongestSide:
    """Resize so that the longest side is ``target_length``; the same rule for images, points and boxes."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h', w', 3) uint8, PIL bilinear (antialiased), as the reference does."""
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        if (h, w) == image.shape[:2]:
            return image
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) in original pixels -> (..., 2) (x, y) in model-input pixels."""
        oh, ow = original_size
        nh, nw = preprocess_shape(oh, ow, self.target_length)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] = coords[..., 0] * (nw / ow)
        coords[..., 1] = coords[..., 1] * (nh / oh)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(B, 4) (x0, y0, x1, y1) -> the same in model-input pixels."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)


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
    a, b = _upsample_operators(low_res.shape[-1], img_size, tuple(input_size), tuple(original_size))
    a, b = a.to(low_res.device), b.to(low_res.device)
    n = low_res.shape[0]
    h, w = original_size
    out = np.zeros((n, h, w), dtype=bool)
    fg = low_res > threshold
    rows_any = fg.any(dim=2)  # (N, L)
    cols_any = fg.any(dim=1)  # (N, L)
    a_nz = a != 0
    b_nz = b != 0
    for i in range(n):
        r = torch.nonzero(rows_any[i]).flatten()
        if r.numel() == 0:
            continue
        c = torch.nonzero(cols_any[i]).flatten()
        out_rows = torch.nonzero(a_nz[:, r[0] : r[-1] + 1].any(dim=1)).flatten()
        out_cols = torch.nonzero(b_nz[:, c[0] : c[-1] + 1].any(dim=1)).flatten()
        r0, r1 = int(out_rows[0]), int(out_rows[-1]) + 1
        c0, c1 = int(out_cols[0]), int(out_cols[-1]) + 1
        win = a[r0:r1] @ low_res[i].float() @ b[c0:c1].T
        out[i, r0:r1, c0:c1] = (win > threshold).cpu().numpy()
    return out
