"""Sam: composes image encoder, prompt encoder and mask decoder; owns pixel normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.config = None  # set by build_sam
        #: preprocessing: Gaussian sigma (image pixels) applied to each image or slice before the encoder; 0 = off.
        #: Set it with napari_sam.core.build.set_denoise (validated); saved in checkpoints.
        self.denoise = 0.0
        #: preprocessing: enlarge an image at most this many times to fill the input (None = always fill it, the
        #: reference); smaller results are mirrored out to the canvas. See napari_sam.core.build.set_max_upscale.
        self.max_upscale = None

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) float RGB 0..255 resized so max(h, w) == img_size -> normalised, zero-padded square."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits (B, K, 256, 256) -> logits at the original size (B, K, H, W) (reference path)."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
