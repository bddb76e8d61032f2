"""The inference fast path of the TinyViT encoder (channels-last convolutions, in-place activations and
per-image normalisation, no layout copies) computes the same function as the autograd path that training uses.

Real images from ../shared/data; random weights (plumbing). The reference parity tests in test_parity.py check
vit_t against MobileSAM through the fast path; this test pins both paths to each other for both norms,
including the built-in architecture's per-image norm, which MobileSAM does not have.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.core import build_sam, get_config
from napari_sam.core.image import to_rgb_uint8

from conftest import data_dir, read_image
from test_parity import calibrate_batchnorm_, parity_randomize_


@pytest.mark.parametrize("name,size", [("vit_t", 256), ("nsam_t", 512)])
def test_fast_inference_path_equals_autograd_path(name, size):
    cfg = dataclasses.replace(get_config(name), name=f"{name}_paths", img_size=size)
    model = parity_randomize_(build_sam(cfg), seed=5)
    d = data_dir("dsb2018_stage1_nuclei_2d")
    images = [to_rgb_uint8(read_image(sorted(d.glob(pat))[0])) for pat in ("*_fluo_*_image.png",
                                                                           "*_color_he_*_image.png")]
    x = torch.cat([model.preprocess(torch.from_numpy(np.ascontiguousarray(im[:size, :size])).permute(2, 0, 1)[None]
                                    .float()) for im in images])
    calibrate_batchnorm_(model, images[1])  # else the features do not depend on the input (see the helper)
    with torch.enable_grad():
        slow = model.image_encoder(x)  # the training path: NCHW, out-of-place
    assert slow.requires_grad
    with torch.inference_mode():
        fast = model.image_encoder(x)
    assert fast.is_contiguous() and fast.shape == slow.shape
    scale = float(slow.detach().abs().max())
    assert scale > 0.1, "random-weight features too small for the tolerance to mean anything"
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-4)  # the engine's parity tolerance
    # the two images give different features: the check is not comparing constants
    assert (fast[0] - fast[1]).abs().max() > 0.1 * scale
