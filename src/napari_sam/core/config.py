"""Model configurations: one frozen dataclass per architecture and a registry of named configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build a SAM-architecture model (weights come from a checkpoint).

    ``encoder`` selects ``ImageEncoderViT`` ("vit") or ``TinyViT`` ("tiny_vit"); the ``vit_*`` or ``tv_*``
    fields configure it. Prompt encoder and mask decoder are the paper's, with ``prompt_embed_dim`` channels.
    The image embedding is (prompt_embed_dim, embed_grid, embed_grid); low-res masks are 4 * embed_grid.
    """

    name: str
    encoder: Literal["vit", "tiny_vit"] = "vit"
    img_size: int = 1024
    # ViT encoder
    vit_embed_dim: int = 768
    vit_depth: int = 12
    vit_num_heads: int = 12
    vit_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    vit_patch_size: int = 16
    vit_window_size: int = 14
    # TinyViT encoder
    tv_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tv_depths: tuple[int, ...] = (2, 2, 6, 2)
    tv_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tv_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    tv_merge_strides: tuple[int, ...] | None = None
    tv_mlp_ratio: float = 4.0
    tv_mbconv_expand_ratio: float = 4.0
    tv_neck_kernel: int = 3  # 3 in MobileSAM; 1 makes small encoders much cheaper
    tv_norm: str = "batch"  # "batch" (MobileSAM) or "image": per-image statistics in the conv stages
    # prompt encoder and mask decoder
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    description: str = field(default="", compare=False)

    @property
    def embed_grid(self) -> int:
        """Side of the image-embedding grid (64 for every official model)."""
        if self.encoder == "vit":
            return self.img_size // self.vit_patch_size
        res = self.img_size // 4
        strides = self.tv_merge_strides
        if strides is None:
            strides = tuple(1 if d in (320, 448, 576) else 2 for d in self.tv_embed_dims[1:])
        for s in strides:
            res = (res - 1) // s + 1
        return res

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-res mask logits (256 for every official model)."""
        return 4 * self.embed_grid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamConfig":
        d = dict(d)
        for k, v in d.items():
            if isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d)


VIT_B = SamConfig("vit_b", "vit", vit_embed_dim=768, vit_depth=12, vit_num_heads=12,
                  vit_global_attn_indexes=(2, 5, 8, 11), description="SAM ViT-B (91M encoder)")
VIT_L = SamConfig("vit_l", "vit", vit_embed_dim=1024, vit_depth=24, vit_num_heads=16,
                  vit_global_attn_indexes=(5, 11, 17, 23), description="SAM ViT-L (308M encoder)")
VIT_H = SamConfig("vit_h", "vit", vit_embed_dim=1280, vit_depth=32, vit_num_heads=16,
                  vit_global_attn_indexes=(7, 15, 23, 31), description="SAM ViT-H (632M encoder)")
VIT_T = SamConfig("vit_t", "tiny_vit", description="MobileSAM TinyViT (5.7M encoder)")

MODEL_CONFIGS: dict[str, SamConfig] = {c.name: c for c in (VIT_B, VIT_L, VIT_H, VIT_T)}


def register_config(config: SamConfig, overwrite: bool = False) -> SamConfig:
    """Add a named config to :data:`MODEL_CONFIGS` (our own small models register here)."""
    if config.name in MODEL_CONFIGS and not overwrite and MODEL_CONFIGS[config.name] != config:
        raise ValueError(f"a different config named {config.name!r} is already registered")
    MODEL_CONFIGS[config.name] = config
    return config


def get_config(name: str) -> SamConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)} or pass a checkpoint file path"
        ) from None


# Our built-in microscopy model (trained by napari_sam.core.training on dsb2018_full/train):
# a TinyViT-style conv/attention hybrid at 512 px with a stride-16 (32x32) embedding grid and a
# 128-channel prompt encoder / mask decoder of the paper's design, sized for 2 CPU cores.
NSAM_T = register_config(SamConfig(
    "nsam_t", "tiny_vit", img_size=512,
    tv_embed_dims=(32, 64, 128), tv_depths=(1, 2, 2), tv_num_heads=(1, 2, 4), tv_window_sizes=(7, 8, 8),
    tv_merge_strides=(2, 2), tv_neck_kernel=3, tv_norm="image",
    prompt_embed_dim=128, decoder_mlp_dim=1024, decoder_num_heads=8, iou_head_hidden_dim=128,
    description="napari-sam built-in nuclei model (TinyViT-style, 512 px, 32x32 grid)",
))
