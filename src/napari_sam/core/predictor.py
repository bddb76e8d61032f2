"""SamPredictor: embed an image once, then turn prompts into masks in milliseconds.

Public coordinates are napari/numpy order: points (row, col), boxes (min_row, min_col, max_row, max_col).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from .build import load_model
from .device import resolve_device
from .image import denoise_of, max_upscale_of, to_rgb_uint8
from .modeling.fast_decoder import DecoderContext, decode_masks, decode_tokens, prepare_context
from .modeling.sam import Sam
from .prompts import boxes_rc_to_xy, rc_to_xy, validate_boxes, validate_points
from .transforms import ResizeLongestSide, scale_boxes, scale_coords, upsample_logits, upsample_masks


class Prediction(NamedTuple):
    """masks: bool (K, H, W) [or (B, K, H, W)]; iou: float32 (K,) [(B, K)];
    low_res_logits: float32 (K, L, L) [(B, K, L, L)], L = 256 for official models (the mask_input size)."""

    masks: np.ndarray
    iou: np.ndarray
    low_res_logits: np.ndarray


class ImageEmbedding(NamedTuple):
    """A cached image embedding: features (1, C, G, G) float, original (H, W), resized input (h, w)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def encoder_input(model: Sam, rgb: np.ndarray, max_upscale: float | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> the encoder's input (1, 3, S, S) float on the model's device, and the resized
    image's (h', w') in that frame.

    The image is resized as :class:`ResizeLongestSide` with ``max_upscale`` (the model's setting) says. When that
    keeps it smaller than the canvas, the canvas is filled by mirroring the resized image (numpy "symmetric")
    instead of the reference's zeros, so the model sees image-like context at the scale it was trained on; masks
    are cut back to the image, as for any non-square image.
    """
    resized = ResizeLongestSide(model.img_size, max_upscale).apply_image(rgb)
    return canvas_input(model, resized, mirror=bool(max_upscale)), resized.shape[:2]


def canvas_input(model: Sam, resized: np.ndarray | torch.Tensor, mirror: bool) -> torch.Tensor:
    """An image already in the input frame, (h', w', 3) uint8 with max(h', w') <= img_size, as a numpy array or a
    tensor on any device -> the encoder's input (1, 3, S, S). ``mirror``: a canvas the image does not fill is
    filled by mirroring it (numpy "symmetric"), else zero-padded after normalisation (the reference)."""
    h, w = resized.shape[:2]
    x = resized if isinstance(resized, torch.Tensor) else torch.tensor(np.ascontiguousarray(resized))  # a copy
    x = x.to(model.device)
    if mirror and max(h, w) < model.img_size:
        s = model.img_size  # numpy "symmetric" padding as an index map, so tensors and arrays pad alike
        rows = torch.from_numpy(np.pad(np.arange(h), (0, s - h), mode="symmetric")).to(x.device)
        cols = torch.from_numpy(np.pad(np.arange(w), (0, s - w), mode="symmetric")).to(x.device)
        x = x[rows][:, cols]
    x = x.permute(2, 0, 1)[None].float()
    return model.preprocess(x)


class ImageNotSetError(ValueError, RuntimeError):
    """predict() was called before set_image()/set_embedding() (a ValueError and, for old callers, a RuntimeError)."""


class SamPredictor:
    """Wraps a :class:`Sam` model; ``set_image`` once, ``predict`` many times."""

    def __init__(self, model: Sam | str | os.PathLike | None = None, device: str | torch.device | None = None):
        if model is None or isinstance(model, (str, os.PathLike)):
            model = load_model(model, device=device)
        elif device is not None:
            model = model.to(resolve_device(device))
        self.model = model.eval()
        #: decode with the per-image cache and rearranged attention (same results up to float rounding);
        #: False runs the plain MaskDecoder module.
        self.fast_decoder = True
        self._ctx: tuple[tuple, DecoderContext] | None = None
        self.reset_image()

    # ------------------------------------------------------------------ image
    @property
    def transform(self) -> ResizeLongestSide:
        """Image -> model input frame, following the model's ``max_upscale`` setting."""
        return ResizeLongestSide(self.model.img_size, max_upscale_of(self.model))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self._embedding: ImageEmbedding | None = None
        self._ctx = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def compute_embedding(self, image: np.ndarray) -> ImageEmbedding:
        """Run the image encoder on a 2D image ((H, W), (H, W, 3) or (H, W, 4), any dtype); no state change.
        The model's ``denoise`` sigma (if any) smooths the image first."""
        rgb = to_rgb_uint8(image, denoise=denoise_of(self.model))
        x, input_size = encoder_input(self.model, rgb, max_upscale_of(self.model))
        with torch.inference_mode():
            features = self.model.image_encoder(x)
        return ImageEmbedding(features, (rgb.shape[0], rgb.shape[1]), input_size)

    def set_image(self, image: np.ndarray) -> ImageEmbedding:
        """Embed ``image`` and keep the embedding for the following ``predict`` calls."""
        self._embedding = self.compute_embedding(image)
        return self._embedding

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Use an embedding computed earlier (e.g. from a cache) instead of running the encoder."""
        feats = embedding.features
        if feats.ndim == 3:
            feats = feats[None]
        g = self.model.prompt_encoder.image_embedding_size
        if tuple(feats.shape[-2:]) != tuple(g) or feats.shape[1] != self.model.prompt_encoder.embed_dim:
            raise ValueError(f"embedding of shape {tuple(feats.shape)} does not fit this model "
                             f"(expects (1, {self.model.prompt_encoder.embed_dim}, {g[0]}, {g[1]}))")
        self._embedding = ImageEmbedding(feats.to(self.device, torch.float32), tuple(embedding.original_size),
                                         tuple(embedding.input_size))

    def get_image_embedding(self) -> torch.Tensor:
        return self._require().features

    @property
    def original_size(self) -> tuple[int, int]:
        return self._require().original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self._require().input_size

    def _require(self) -> ImageEmbedding:
        if self._embedding is None:
            raise ImageNotSetError("no image is set: call predictor.set_image(image) (or set_embedding) before predict()")
        return self._embedding

    # ---------------------------------------------------------------- prompts
    def predict(
        self,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one object, or for B objects at once.

        points: (N, 2) float (row, col) in image pixels, or (B, N, 2) for B objects; point_labels: (N,) or
        (B, N), 1 positive / 0 negative (default all positive). Points outside the image are clipped.
        box: (4,) (min_row, min_col, max_row, max_col), or (B, 4). mask_input: low-res logits (L, L),
        (1, L, L) or (B, 1, L, L) from a previous prediction. multimask: 3 candidates (ambiguity) or 1.
        return_logits: masks are float32 logits at image size instead of bool.

        Returns :class:`Prediction`; the leading B axis is present only if the prompts had one.
        """
        emb = self._require()
        batched = (points is not None and np.ndim(points) == 3) or (box is not None and np.ndim(box) == 2)
        coords = labels = boxes = None
        nb = 1
        if points is not None:
            pts, lab = validate_points(points, point_labels, emb.original_size)
            coords = scale_coords(rc_to_xy(pts), emb.original_size, emb.input_size)
            labels = lab
            nb = pts.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels were given without points")
        if box is not None:
            bx = validate_boxes(box, emb.original_size)
            boxes = scale_boxes(boxes_rc_to_xy(bx), emb.original_size, emb.input_size)
            if coords is not None and boxes.shape[0] != nb:
                if nb == 1:
                    coords = np.repeat(coords, boxes.shape[0], 0)
                    labels = np.repeat(labels, boxes.shape[0], 0)
                elif boxes.shape[0] != 1:
                    raise ValueError(f"{nb} point sets and {boxes.shape[0]} boxes: give one box per object")
                else:
                    boxes = np.repeat(boxes, nb, 0)
            nb = max(nb, boxes.shape[0])
        mask_t = None
        if mask_input is not None:
            mask_t = self._mask_tensor(mask_input, nb)
            nb = mask_t.shape[0] if coords is None and boxes is None else nb
        low_res, iou = self.predict_torch(
            None if coords is None else torch.as_tensor(coords, dtype=torch.float32, device=self.device),
            None if labels is None else torch.as_tensor(labels, dtype=torch.int64, device=self.device),
            None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=self.device),
            mask_t,
            multimask,
        )
        b, k, L, _ = low_res.shape
        if return_logits:
            masks = upsample_logits(low_res, self.model.img_size, emb.input_size, emb.original_size).cpu().numpy()
        else:
            masks = upsample_masks(low_res.reshape(b * k, L, L), self.model.img_size, emb.input_size,
                                   emb.original_size, self.model.mask_threshold)
            masks = masks.reshape(b, k, *emb.original_size)
        low = low_res.cpu().numpy()
        ious = iou.cpu().numpy()
        if not batched:
            masks, ious, low = masks[0], ious[0], low[0]
        return Prediction(masks, ious, low)

    def _mask_tensor(self, mask_input: np.ndarray, nb: int) -> torch.Tensor:
        L = self.model.prompt_encoder.mask_input_size
        m = torch.as_tensor(np.asarray(mask_input, dtype=np.float32), device=self.device)
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None] if m.shape[0] == 1 else m[:, None]
        if m.ndim != 4 or tuple(m.shape[-2:]) != tuple(L) or m.shape[1] != 1:
            raise ValueError(f"mask_input has shape {tuple(np.shape(mask_input))}; expected low-res logits "
                             f"({L[0]}, {L[1]}), (1, {L[0]}, {L[1]}) or (B, 1, {L[0]}, {L[1]}) from a prediction")
        if m.shape[0] == 1 and nb > 1:
            m = m.expand(nb, -1, -1, -1)
        elif m.shape[0] != nb:
            raise ValueError(f"mask_input has {m.shape[0]} masks for {nb} objects")
        return m

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        iou_floor: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-frame API: coords (B, N, 2) (x, y) in resized-input pixels, labels (B, N), boxes (B, 4)
        (x0, y0, x1, y1), mask_input (B, 1, L, L). Returns low-res logits (B, K, L, L) and IoU (B, K).

        ``iou_floor``: for callers that discard every mask whose predicted IoU is <= it (segment everything).
        The mask upscaling then runs only for prompts with a candidate above it; the logits of the others are
        -inf placeholders, never a prediction. Without the fast decoder all masks are computed.
        """
        emb = self._require()
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if self.fast_decoder:
            dec, ctx = self.model.mask_decoder, self._decoder_context()
            out = decode_tokens(dec, ctx, sparse, None if mask_input is None else dense, multimask_output)
            if iou_floor is None:
                return decode_masks(dec, ctx, out), out.iou
            rows = torch.nonzero((out.iou > iou_floor).any(1)).flatten()
            b, k = out.iou.shape
            h, w = ctx.grid
            low = torch.full((b, k, 4 * h, 4 * w), float("-inf"), dtype=out.iou.dtype, device=out.iou.device)
            if len(rows):
                low[rows] = decode_masks(dec, ctx, out, rows)
            return low, out.iou
        return self.model.mask_decoder(
            image_embeddings=emb.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def _decoder_context(self) -> DecoderContext:
        """Prompt-independent decoder tensors of the current image, rebuilt if the image or the weights
        they depend on change (in-place updates such as fine-tuning bump the tensors' version counters)."""
        emb = self._require()
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        l0 = dec.transformer.layers[0]
        deps = [pe.pe_layer.positional_encoding_gaussian_matrix, pe.no_mask_embed.weight]
        for lin in (l0.cross_attn_token_to_image.k_proj, l0.cross_attn_token_to_image.v_proj,
                    l0.cross_attn_image_to_token.q_proj):
            deps += [lin.weight, lin.bias]
        try:
            key = (id(emb), emb.features.data_ptr(), tuple((t.data_ptr(), t._version) for t in deps))
        except RuntimeError:  # weights that are inference tensors have no version counter: do not cache
            key = None
        if key is None or self._ctx is None or self._ctx[0] != key:
            self._ctx = (key, prepare_context(emb.features, pe, dec))
        return self._ctx[1]
