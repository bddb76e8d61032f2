"""napari-sam: Segment Anything for microscopy, in napari and from Python.

The package import is light: heavy modules load on first attribute access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "napari_sam.core.build",
    "available_models": "napari_sam.core.build",
    "save_checkpoint": "napari_sam.core.build",
    "set_denoise": "napari_sam.core.build",
    "set_max_upscale": "napari_sam.core.build",
    "set_zoom_window": "napari_sam.core.build",
    "set_refine_logits": "napari_sam.core.build",
    "set_mask_threshold": "napari_sam.core.build",
    "SamPredictor": "napari_sam.core.predictor",
    "AutomaticMaskGenerator": "napari_sam.core.amg",
    "segment_everything": "napari_sam.core.amg",
    "propagate_object": "napari_sam.core.propagation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
