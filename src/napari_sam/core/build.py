"""Building SAM models from configs and loading checkpoints strictly, on the CPU first."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoints import CHECKPOINTS, CheckpointError, get_checkpoint
from .config import MODEL_CONFIGS, SamConfig, get_config
from .messages import first_line
from .device import resolve_device
from .image import check_denoise, check_max_upscale
from .zoom import check_zoom_window
from .modeling.image_encoder import ImageEncoderViT
from .modeling.mask_decoder import MaskDecoder
from .modeling.prompt_encoder import PromptEncoder
from .modeling.sam import Sam
from .modeling.tiny_vit import TinyViT
from .modeling.transformer import TwoWayTransformer

# TinyViT's unused ImageNet head is in MobileSAM's checkpoint; we do not build it.
_DROPPED_PREFIXES = ("image_encoder.head.", "image_encoder.norm_head.")
BUILTIN_MODEL = "builtin"
BUILTIN_FILE = "builtin_nuclei.pt"


def build_sam(config: SamConfig | str) -> Sam:
    """A randomly initialised model for ``config`` (a SamConfig or a registered name)."""
    cfg = get_config(config) if isinstance(config, str) else config
    if cfg.encoder == "vit":
        encoder: nn.Module = ImageEncoderViT(
            img_size=cfg.img_size,
            patch_size=cfg.vit_patch_size,
            embed_dim=cfg.vit_embed_dim,
            depth=cfg.vit_depth,
            num_heads=cfg.vit_num_heads,
            out_chans=cfg.prompt_embed_dim,
            window_size=cfg.vit_window_size,
            global_attn_indexes=cfg.vit_global_attn_indexes,
        )
    elif cfg.encoder == "tiny_vit":
        encoder = TinyViT(
            img_size=cfg.img_size,
            embed_dims=cfg.tv_embed_dims,
            depths=cfg.tv_depths,
            num_heads=cfg.tv_num_heads,
            window_sizes=cfg.tv_window_sizes,
            mlp_ratio=cfg.tv_mlp_ratio,
            mbconv_expand_ratio=cfg.tv_mbconv_expand_ratio,
            out_chans=cfg.prompt_embed_dim,
            merge_strides=cfg.tv_merge_strides,
            neck_kernel=cfg.tv_neck_kernel,
            norm=cfg.tv_norm,
        )
    else:
        raise ValueError(f"unknown encoder {cfg.encoder!r}")
    g = cfg.embed_grid
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(g, g),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                num_heads=cfg.decoder_num_heads,
                mlp_dim=cfg.decoder_mlp_dim,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )
    sam.config = cfg
    return sam


def infer_config(state_dict: dict[str, torch.Tensor]) -> SamConfig:
    """Which official architecture a plain state dict belongs to, from its keys and shapes."""
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return MODEL_CONFIGS["vit_t"]
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None:
        raise CheckpointError("the file is not a SAM checkpoint: it has no image_encoder weights")
    dim = pos.shape[-1]
    for name in ("vit_b", "vit_l", "vit_h"):
        if MODEL_CONFIGS[name].vit_embed_dim == dim:
            return MODEL_CONFIGS[name]
    raise CheckpointError(f"unknown ViT width {dim} in checkpoint; expected 768 (vit_b), 1024 (vit_l) or 1280 (vit_h)")


def load_state_dict_strict(model: Sam, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load with exact key and shape checks; MobileSAM's unused classifier head is dropped first."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_DROPPED_PREFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        name = model.config.name if model.config is not None else "this model"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}: {tuple(sd[wrong[0]].shape)} "
                         f"vs {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(
            f"{source} does not fit {name}: " + "; ".join(parts) + ". It is probably a checkpoint of another "
            "model type: pass the matching model name, or pass only the file path to infer the type"
        )
    model.load_state_dict(sd, strict=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[SamConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official state dict or a napari-sam checkpoint ({"config", "model", ...}).

    Returns (config, float32 state dict, extra metadata).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the path of the .pt / .pth file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of another kind ...
        first = first_line(e, 160, "")
        if "weights_only" in first:  # torch's advice on unpickling other objects does not apply to a bad file
            first = ""
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}{': ' + first if first else ''}); "
            "the file may be truncated or not a checkpoint: download or save it again"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    meta: dict[str, Any] = {}
    if "model" in obj and "config" in obj:
        cfg = SamConfig.from_dict(obj["config"])
        sd = obj["model"]
        meta = {k: v for k, v in obj.items() if k not in ("model", "config")}
    else:
        sd = obj
        cfg = infer_config(sd)
    sd = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in sd.items()}
    return cfg, sd, meta


def builtin_checkpoint_path() -> Path:
    return Path(str(resources.files("napari_sam") / "models" / BUILTIN_FILE))


def checkpoint_meta(model: Sam | None = None) -> dict[str, Any]:
    """The metadata a model's checkpoint file carried beside its weights (tuned thresholds, calibration, ...):
    ``model.checkpoint_meta`` for a loaded model ({} for one built in memory), the built-in file's for None ({}
    when that file is absent)."""
    if model is not None:
        return getattr(model, "checkpoint_meta", None) or {}
    path = builtin_checkpoint_path()
    return read_checkpoint(path)[2] if path.is_file() else {}


def load_model(
    model: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    denoise: float | None = None,
    max_upscale: float | None | str = "checkpoint",
    zoom_window: int | None | str = "checkpoint",
    refine_logits: bool | str = "checkpoint",
    mask_threshold: float | str = "checkpoint",
) -> Sam:
    """Load a ready-to-use model in eval mode.

    model: None or "builtin" (our small microscopy model shipped in the package), a registered name
    ("vit_b", "vit_l", "vit_h", "vit_t": the official checkpoint is downloaded once and verified), or the
    path of a checkpoint file (type inferred from its keys). checkpoint: an explicit file for ``model``.
    device: "cuda", "mps", "cpu" or None for the best available. denoise: Gaussian sigma in image pixels that
    smooths every image before the encoder (:func:`set_denoise`); None keeps the checkpoint's (0 if it has none).
    max_upscale: the most an image is enlarged for the encoder (:func:`set_max_upscale`); "checkpoint" keeps the
    checkpoint's (the built-in model's is 2, official checkpoints have none), None or 0 lifts the limit.
    zoom_window: small objects of larger images are decoded from a window of this many image pixels
    (:func:`set_zoom_window`); "checkpoint" keeps the checkpoint's (the built-in model's is 256, official
    checkpoints have none), None or 0 turns it off.
    refine_logits: whether a corrective click is decoded with the previous mask's logits as mask input
    (:func:`set_refine_logits`); "checkpoint" keeps the checkpoint's (the built-in model's is False, official
    checkpoints refine, as the paper does).
    mask_threshold: the logit above which a pixel is in a mask (:func:`set_mask_threshold`); "checkpoint" keeps the
    checkpoint's (the built-in model's is chosen on ``val``, official checkpoints use the paper's 0).
    """
    dev = resolve_device(device)
    if model is None and checkpoint is None:
        model = BUILTIN_MODEL
    if model is not None and (isinstance(model, os.PathLike) or (isinstance(model, str) and (
            os.sep in model or model.endswith((".pt", ".pth")) or Path(model).is_file()))):
        checkpoint, model = model, None
    if checkpoint is None and model == BUILTIN_MODEL:
        path = builtin_checkpoint_path()
        if not path.is_file():
            raise CheckpointError(
                f"the built-in model file {path} is missing from this installation; reinstall napari-sam, "
                "or pass model='vit_b' (downloads the official checkpoint) or a checkpoint file path"
            )
        checkpoint = path
    if checkpoint is None:
        if model not in CHECKPOINTS:
            if model not in MODEL_CONFIGS:
                raise ValueError(f"unknown model {model!r}; choose one of {available_models()} or pass a "
                                 "checkpoint file path")
            raise CheckpointError(f"model {model!r} has no downloadable checkpoint; pass checkpoint=PATH")
        checkpoint = get_checkpoint(str(model), progress=progress)
    cfg, sd, meta = read_checkpoint(checkpoint)
    if model is not None and model != BUILTIN_MODEL and model in MODEL_CONFIGS and MODEL_CONFIGS[model] != cfg:
        if cfg.name != model:
            raise CheckpointError(
                f"{checkpoint} is a {cfg.name} checkpoint, not {model}; pass model={cfg.name!r} or only the path"
            )
    sam = build_sam(cfg)
    load_state_dict_strict(sam, sd, source=str(checkpoint))
    sam.checkpoint_meta = meta
    sam.checkpoint_path = str(checkpoint)
    set_denoise(sam, meta.get("denoise", 0.0) if denoise is None else denoise)
    set_max_upscale(sam, meta.get("max_upscale") if max_upscale == "checkpoint" else max_upscale)
    set_zoom_window(sam, meta.get("zoom_window") if zoom_window == "checkpoint" else zoom_window)
    set_refine_logits(sam, meta.get("refine_logits", True) if refine_logits == "checkpoint" else refine_logits)
    set_mask_threshold(sam, meta.get("mask_threshold", 0.0) if mask_threshold == "checkpoint" else mask_threshold)
    return sam.to(dev).eval()


def set_denoise(model: Sam, sigma: float) -> Sam:
    """Make ``model`` smooth every image (or stack slice) with a Gaussian of ``sigma`` image pixels before its
    encoder; 0 turns it off. For noisy data (confocal stacks, low light) that the model was not trained on:
    on GoNuclear's noisy confocal slices sigma 2 doubles the built-in model's one-click mIoU. Embeddings computed
    before the change are stale (embedding caches key on it). Returns ``model``."""
    model.denoise = check_denoise(sigma)
    return model


def set_max_upscale(model: Sam, factor: float | None) -> Sam:
    """Enlarge images at most ``factor`` times to fill the model's input (None or 0: always fill it, as the
    reference does). A small image (e.g. a 100x100 crop, which a 512-px model would otherwise enlarge 5x) is then
    shown at the scale the model was trained on, its canvas filled by mirroring the image. The built-in model ships
    with 2 (its training images were enlarged at most 2x); on GoNuclear's 100x100 slices this raises one-click
    mIoU by about a third. Returns ``model``."""
    model.max_upscale = check_max_upscale(factor)
    return model


def set_zoom_window(model: Sam, window: int | None) -> Sam:
    """Decode prompts on small objects of images larger than ``window`` image pixels from the ``window``-px region
    around them, encoded on demand (None or 0: always from the whole image, as the reference does). A model trained
    on 256-px images enlarged 2x sees the nuclei of a 1024-px image at a quarter of that scale when the whole image
    is shrunk to its input; the built-in model ships with 256 (``img_size / max_upscale``). See
    :mod:`napari_sam.core.zoom`. Returns ``model``."""
    model.zoom_window = check_zoom_window(window)
    return model


def save_checkpoint(model: Sam, path: str | os.PathLike, half: bool = False, **meta: Any) -> Path:
    """Save ``model`` with its config (and ``meta``) so :func:`load_model` can rebuild it from the file alone."""
    if model.config is None:
        raise ValueError("model has no config; build it with build_sam")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model, "denoise", 0.0) and "denoise" not in meta:
        meta["denoise"] = float(model.denoise)  # preprocessing travels with the weights
    if getattr(model, "max_upscale", None) and "max_upscale" not in meta:
        meta["max_upscale"] = float(model.max_upscale)
    if getattr(model, "zoom_window", None) and "zoom_window" not in meta:
        meta["zoom_window"] = int(model.zoom_window)
    if not refine_logits_of(model) and "refine_logits" not in meta:
        meta["refine_logits"] = False
    if model.mask_threshold != 0.0 and "mask_threshold" not in meta:
        meta["mask_threshold"] = float(model.mask_threshold)
    return write_checkpoint_file({"config": model.config.to_dict(), "model": sd, **meta}, path)


def write_checkpoint_file(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint's dict (``config``, ``model`` and its settings) to ``path`` atomically: a temporary file
    beside it, then a rename, so an interrupted write never leaves a broken checkpoint. Returns the path."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file is left beside the target
        raise
    return path


def set_refine_logits(model: Sam, on: bool) -> Sam:
    """Whether corrective clicks on ``model`` are decoded with the previous mask's low-res logits as mask input
    (the paper's interactive protocol, and the default of official checkpoints) or from the clicks alone. The
    built-in model ships with False, chosen on ``val`` by scripts/choose_refine.py: its clicks refine better without
    its own logits (5 clicks on 491 nuclei: 0.826 mIoU against 0.823 for the model alone, 0.806 against 0.779 with
    negative points enforced, as the annotator serves them).
    :func:`refine_logits_of` reads it; the annotator's *refine with the previous mask* and ``napari-sam
    evaluate`` start from it. Returns ``model``."""
    if not isinstance(on, bool):
        raise ValueError(f"refine_logits must be True or False, not {on!r}")
    model.refine_logits = bool(on)
    return model


def set_mask_threshold(model: Sam, threshold: float) -> Sam:
    """Make ``model``'s masks the pixels whose logit is above ``threshold`` (the paper: 0), everywhere: prompts,
    segment everything (its stability score is taken around it) and propagation. A model whose masks come out a
    little too large (the built-in one: its loss weights object pixels up, so its masks run about 6 % over the
    true area on ``val``) is corrected by a higher threshold; scripts/choose_threshold.py picks it on ``val`` and
    stores it in the checkpoint, which :func:`load_model` reads. Returns ``model``."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"mask_threshold={threshold!r} must be a number (a logit; the paper uses 0)") from None
    if isinstance(threshold, bool) or not np.isfinite(t):
        raise ValueError(f"mask_threshold={threshold!r} must be a finite number (a logit; the paper uses 0)")
    model.mask_threshold = t
    return model


def refine_logits_of(model) -> bool:
    """Whether ``model`` refines corrective clicks with its previous logits (:func:`set_refine_logits`; True for
    models that were not loaded with :func:`load_model`, as in the reference)."""
    return bool(getattr(model, "refine_logits", True))


def available_models() -> list[str]:
    """Names accepted by :func:`load_model`: "builtin" and every registered config with a checkpoint source."""
    return [BUILTIN_MODEL] + [n for n in MODEL_CONFIGS if n in CHECKPOINTS]


