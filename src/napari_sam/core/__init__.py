"""napari_sam.core: Segment Anything in pure torch + numpy. Never imports napari or Qt."""

from .build import (available_models, build_sam, load_model, save_checkpoint, set_denoise, set_mask_threshold,
                    set_max_upscale, set_refine_logits, set_zoom_window)
from .checkpoints import CHECKPOINTS, CheckpointError, cache_dir, get_checkpoint
from .config import MODEL_CONFIGS, SamConfig, get_config, register_config
from .predictor import ImageEmbedding, Prediction, SamPredictor

__all__ = [
    "CHECKPOINTS", "CheckpointError", "ImageEmbedding", "MODEL_CONFIGS", "Prediction", "SamConfig",
    "SamPredictor", "available_models", "build_sam", "cache_dir", "get_checkpoint", "get_config",
    "load_model", "register_config", "save_checkpoint", "set_denoise", "set_mask_threshold", "set_max_upscale",
    "set_refine_logits", "set_zoom_window",
]
