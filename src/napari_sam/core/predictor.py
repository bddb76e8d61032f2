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
from .zoom import (
    Window, ZoomSource, check_windows, choose_window, fits, prompt_extents, resample_logits, zoom_window_of,
)


class Prediction(NamedTuple):
    """masks: bool (K, H, W) [or (B, K, H, W)]; iou: float32 (K,) [(B, K)];
    low_res_logits: float32 (K, L, L) [(B, K, L, L)], L = 256 for official models (the mask_input size).
    windows: None when the image has no zoom windows (see ``predict``); else int64 (4,) [(B, 4)] the image region
    (min_row, min_col, max_row, max_col), max exclusive, whose frame each object's ``low_res_logits`` are in
    ((0, 0, H, W): the whole image). Pass it back as ``mask_windows`` with the logits (see ``predict``)."""

    masks: np.ndarray
    iou: np.ndarray
    low_res_logits: np.ndarray
    windows: np.ndarray | None = None


class ImageEmbedding(NamedTuple):
    """A cached image embedding: features (1, C, G, G) float, original (H, W), resized input (h, w), and for zoomed
    decoding (:mod:`napari_sam.core.zoom`) the preprocessed image and its window embeddings (None: no zoom)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    source: ZoomSource | None = None


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


#: window embeddings kept per image (least recently used dropped first); 64 are 32 MB for the built-in model
ZOOM_CACHE_WINDOWS = 64
#: a zoomed mask whose predicted IoU is below this is checked against the whole image (is the object larger?)
ZOOM_CHECK_IOU = 0.75


def _reaches_inner_edge(mask: np.ndarray, win: Window, shape: tuple[int, int], threshold: float | None,
                        origin: tuple[int, int] = (0, 0)) -> bool:
    """Whether ``mask`` (bool, or logits above ``threshold``) has a pixel on an edge of window ``win`` that
    is not an edge of the image (H, W) ``shape``. ``mask`` is the image region starting at ``origin`` (row, col):
    (H, W) for (0, 0), or the window itself."""
    r0, c0, r1, c1 = win
    o_r, o_c = origin
    edges = []
    if r0 > 0:
        edges.append(mask[r0 - o_r, c0 - o_c:c1 - o_c])
    if r1 < shape[0]:
        edges.append(mask[r1 - 1 - o_r, c0 - o_c:c1 - o_c])
    if c0 > 0:
        edges.append(mask[r0 - o_r:r1 - o_r, c0 - o_c])
    if c1 < shape[1]:
        edges.append(mask[r0 - o_r:r1 - o_r, c1 - 1 - o_c])
    return any((e > threshold).any() if threshold is not None else e.any() for e in edges)


class ImageNotSetError(ValueError, RuntimeError):
    """predict() was called before set_image()/set_embedding() (a ValueError and, for old callers, a RuntimeError)."""


class SamPredictor:
    """Wraps a :class:`Sam` model; ``set_image`` once, ``predict`` many times."""

    def __init__(self, model: Sam | str | os.PathLike | None = None, device: str | torch.device | None = None):
        if model is None or isinstance(model, (str, os.PathLike)):
            model = load_model(model, device=device)
        elif not isinstance(model, torch.nn.Module) or not hasattr(model, "prompt_encoder"):
            raise ValueError(f"SamPredictor needs a SAM model, a model name or a checkpoint path, not "
                             f"{type(model).__name__}; e.g. SamPredictor(napari_sam.load_model())")
        elif device is not None:
            model = model.to(resolve_device(device))
        self.model = model.eval()
        #: decode with the per-image cache and rearranged attention (same results up to float rounding);
        #: False runs the plain MaskDecoder module.
        self.fast_decoder = True
        #: zoomed decoding where the embedding allows it (the model's ``zoom_window``); False: the whole image
        self.zoom = True
        self._ctx: dict[tuple, tuple[ImageEmbedding, DecoderContext]] = {}
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
        self._ctx = {}
        self._last_windows: tuple[ImageEmbedding, np.ndarray] | None = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def compute_embedding(self, image: np.ndarray) -> ImageEmbedding:
        """Run the image encoder on a 2D image ((H, W), (H, W, 3) or (H, W, 4), any dtype); no state change.
        The model's ``denoise`` sigma (if any) smooths the image first. With the model's ``zoom_window`` set and
        the image larger than it, the embedding keeps the preprocessed image for zoomed decoding."""
        rgb = to_rgb_uint8(image, denoise=denoise_of(self.model))
        emb = self._embed_rgb(rgb)
        side = zoom_window_of(self.model)
        if side and max(rgb.shape[:2]) > side:
            emb = emb._replace(source=ZoomSource(rgb, side))
        return emb

    def _embed_rgb(self, rgb: np.ndarray) -> ImageEmbedding:
        x, input_size = encoder_input(self.model, rgb, max_upscale_of(self.model))
        with torch.inference_mode():
            features = self.model.image_encoder(x)
        return ImageEmbedding(features, (rgb.shape[0], rgb.shape[1]), input_size)

    def _window_embedding(self, emb: ImageEmbedding, win: Window) -> ImageEmbedding:
        """The embedding of image region ``win`` (cached in ``emb.source``)."""
        cache = emb.source.cache
        if win in cache:
            cache[win] = cache.pop(win)  # most recently used last
        else:
            while len(cache) >= ZOOM_CACHE_WINDOWS:
                cache.pop(next(iter(cache)))
            r0, c0, r1, c1 = win
            cache[win] = self._embed_rgb(np.ascontiguousarray(emb.source.rgb[r0:r1, c0:c1]))
        return cache[win]

    def set_image(self, image: np.ndarray) -> ImageEmbedding:
        """Embed ``image`` and keep the embedding for the following ``predict`` calls. If it fails (bad image,
        cancelled), no image is set: ``predict`` never answers for the image set before."""
        self.reset_image()
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
                                         tuple(embedding.input_size), getattr(embedding, "source", None))

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
            raise ImageNotSetError("no image is set: call predictor.set_image(image) (or set_embedding) before "
                                   "predict()")
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
        mask_windows: np.ndarray | None = None,
        in_window: bool = False,
    ) -> Prediction:
        """Masks for one object, or for B objects at once.

        points: (N, 2) float (row, col) in image pixels, or (B, N, 2) for B objects; point_labels: (N,) or
        (B, N), 1 positive / 0 negative (default all positive). Points outside the image are clipped.
        box: (4,) (min_row, min_col, max_row, max_col), max inclusive, or (B, 4). mask_input: low-res logits (L, L),
        (1, L, L) or (B, 1, L, L) from a previous prediction. multimask: 3 candidates (ambiguity) or 1.
        return_logits: masks are float32 logits at image size instead of bool (-1e4 outside a zoom window).
        mask_windows: the previous prediction's ``windows``, (4,) or (B, 4), when ``mask_input`` came from a
        zoomed one; an object keeps its window while its prompts fit in it, else its mask input is resampled.
        Without it, the windows of this predictor's previous prediction are used when it had as many objects
        (the usual predict -> refine loop), else the mask input is taken to be in the frame this prompt gets.

        Zoom: when the image was embedded with a ``zoom_window`` (:mod:`napari_sam.core.zoom`; the built-in
        model's is 256 px), an object whose points and box span at most half a window is decoded from the window
        around them, encoded on demand at the scale the model was trained on; larger ones from the whole image.
        ``in_window`` (one object only): the masks are only those of the object's window, (K, h, w) [(1, K, h, w)]
        for the region ``windows`` (the same pixels; nothing lies outside it), instead of (K, H, W): a small
        object of a large image costs little memory. Without zoom windows (``windows`` None) they are (K, H, W).

        Returns :class:`Prediction`; the leading B axis is present only if the prompts had one.
        """
        emb = self._require()
        batched = (points is not None and np.ndim(points) == 3) or (box is not None and np.ndim(box) == 2)
        pts = lab = bx = None
        nb = 1
        if points is not None:
            pts, lab = validate_points(points, point_labels, emb.original_size)
            nb = pts.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels were given without points")
        if box is not None:
            bx = validate_boxes(box, emb.original_size)
            if pts is not None and bx.shape[0] != nb:
                if nb == 1:
                    pts, lab = np.repeat(pts, bx.shape[0], 0), np.repeat(lab, bx.shape[0], 0)
                elif bx.shape[0] != 1:
                    raise ValueError(f"{nb} point sets and {bx.shape[0]} boxes: give one box per object")
                else:
                    bx = np.repeat(bx, nb, 0)
            nb = max(nb, bx.shape[0])
        mask_t = None
        if mask_input is not None:
            mask_t = self._mask_tensor(mask_input, nb)
            nb = mask_t.shape[0] if pts is None and bx is None else nb
        elif pts is None and bx is None:
            raise ValueError("no prompt: give points (row, col), a box (min_row, min_col, max_row, max_col) or a "
                             "mask_input")
        if mask_windows is not None:
            mask_windows = check_windows(mask_windows, emb.original_size)
        if in_window and nb != 1:
            raise ValueError(f"in_window is for one object; these prompts describe {nb}")
        if emb.source is None or not self.zoom or (pts is None and bx is None):
            if emb.source is not None and mask_windows is not None and mask_t is not None:  # zoomed logits
                wins = mask_windows
                wins = np.repeat(wins, mask_t.shape[0], 0) if len(wins) == 1 else wins
                mask_t = self._reframe_each(emb, mask_t, wins, (0, 0) + tuple(emb.original_size))
            masks, ious, low = self._predict_frame(emb, pts, lab, bx, mask_t, multimask, return_logits)
            windows = None if emb.source is None else np.tile(np.array((0, 0) + tuple(emb.original_size)),
                                                              (masks.shape[0], 1))
        else:
            last = self._last_windows
            if mask_windows is None and mask_t is not None and last is not None and last[0] is emb \
                    and len(last[1]) == nb:
                mask_windows = last[1]
            masks, ious, low, windows = self._predict_zoomed(emb, pts, lab, bx, mask_t, mask_windows, nb,
                                                             multimask, return_logits, in_window)
        self._last_windows = None if windows is None else (emb, windows)
        if not batched:
            masks, ious, low = masks[0], ious[0], low[0]
            windows = None if windows is None else windows[0]
        return Prediction(masks, ious, low, windows)

    def _decode_low(self, emb: ImageEmbedding, pts, lab, bx, mask_t, multimask: bool,
                    origin: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in image (row, col) pixels, decoded from ``emb`` of the image region starting at ``origin``
        -> low-res logits (B, K, L, L) and IoU (B, K) tensors."""
        coords = boxes = None
        off = np.array(origin, np.float64)
        if pts is not None:
            coords = scale_coords(rc_to_xy(pts - off), emb.original_size, emb.input_size)
        if bx is not None:
            boxes = scale_boxes(boxes_rc_to_xy(bx - np.tile(off, 2)), emb.original_size, emb.input_size)
        return self._run(
            emb,
            None if coords is None else torch.as_tensor(coords, dtype=torch.float32, device=self.device),
            None if lab is None else torch.as_tensor(lab, dtype=torch.int64, device=self.device),
            None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=self.device),
            mask_t,
            multimask,
        )

    def _predict_frame(self, emb: ImageEmbedding, pts, lab, bx, mask_t, multimask: bool, return_logits: bool,
                       origin: tuple[int, int] = (0, 0)):
        """Decode prompts given in image (row, col) pixels from one frame: ``emb`` of the image region starting at
        ``origin``. Returns masks (B, K, h, w) of that region, IoU (B, K) and low-res logits (B, K, L, L)."""
        low_res, iou = self._decode_low(emb, pts, lab, bx, mask_t, multimask, origin)
        b, k, L, _ = low_res.shape
        if return_logits:
            masks = upsample_logits(low_res, self.model.img_size, emb.input_size, emb.original_size).cpu().numpy()
        else:
            masks = upsample_masks(low_res.reshape(b * k, L, L), self.model.img_size, emb.input_size,
                                   emb.original_size, self.model.mask_threshold)
            masks = masks.reshape(b, k, *emb.original_size)
        return masks, iou.cpu().numpy(), low_res.cpu().numpy()

    def _predict_zoomed(self, emb: ImageEmbedding, pts, lab, bx, mask_t, mask_windows, nb: int, multimask: bool,
                        return_logits: bool, in_window: bool = False):
        """:meth:`predict` for an embedding with a zoom source: objects grouped by window, masks pasted back
        (``in_window``, one object: masks of its window only)."""
        (h, w), side = emb.original_size, emb.source.window
        whole = (0, 0, h, w)
        ext = prompt_extents(pts, bx, nb)
        prev = None
        if mask_windows is not None and mask_t is not None:
            prev = mask_windows
            if prev.shape[0] == 1 and nb > 1:
                prev = np.repeat(prev, nb, 0)
            if prev.shape[0] != nb:
                raise ValueError(f"mask_windows has {prev.shape[0]} windows for {nb} objects")
        wins: list[Window] = []
        fresh = []  # objects that get a new window (not kept with their mask input)
        for i in range(nb):
            old = None if prev is None else tuple(int(v) for v in prev[i])
            if old is not None and (old == whole or fits(ext[i], old, (h, w), side)):
                wins.append(old)
            else:
                wins.append(choose_window(ext[i], (h, w), side) or whole)
                if wins[i] != whole:
                    fresh.append(i)
        out: list = []

        def decode(idx: np.ndarray, win: Window) -> None:
            sub = emb if win == whole else self._window_embedding(emb, win)
            m_t = None
            if mask_t is not None:
                m_t = mask_t[torch.as_tensor(idx, device=mask_t.device)]
                if prev is not None:
                    m_t = self._reframe_each(emb, m_t, prev[idx], win)
            m, io, lo = self._predict_frame(sub, None if pts is None else pts[idx], None if lab is None else lab[idx],
                                            None if bx is None else bx[idx], m_t, multimask, return_logits,
                                            origin=(win[0], win[1]))
            if in_window:  # one object: its window's masks as they are
                out[:] = [m, io, lo]
                return
            if not out:
                k = m.shape[1]
                out.extend([np.full((nb, k, h, w), -1e4, np.float32) if return_logits
                            else np.zeros((nb, k, h, w), bool), np.zeros((nb, k), io.dtype),
                            np.zeros((nb,) + lo.shape[1:], lo.dtype)])
            out[0][idx] = -1e4 if return_logits else False
            out[0][idx, :, win[0]:win[2], win[1]:win[3]] = m
            out[1][idx], out[2][idx] = io, lo

        for win in dict.fromkeys(wins):
            decode(np.array([i for i in range(nb) if wins[i] == win]), win)
        # an object larger than its window goes back to the whole image: its zoomed mask reaches the window's
        # edge inside the image, or (a window that sees only its inside) the zoomed mask is unsure and the whole
        # image shows it larger than half a window
        thr = self.model.mask_threshold if return_logits else None
        top = {i: int(np.argmax(out[1][i])) for i in range(nb) if wins[i] != whole}
        large = [i for i in top if _reaches_inner_edge(out[0][i, top[i]], wins[i], (h, w), thr,
                                                       (wins[i][0], wins[i][1]) if in_window else (0, 0))]
        unsure = [i for i in fresh if i not in large and out[1][i, top[i]] < ZOOM_CHECK_IOU]
        if unsure:
            spans = self._whole_spans(emb, pts, lab, bx, unsure, multimask)
            large += [i for i, span in zip(unsure, spans) if span > side / 2]
        if large:
            for i in large:
                wins[i] = whole
            decode(np.array(sorted(large)), whole)
        masks, ious, low = out
        return masks, ious, low, np.array(wins, np.int64)

    def _whole_spans(self, emb: ImageEmbedding, pts, lab, bx, idx: list[int], multimask: bool) -> np.ndarray:
        """The largest side, in image pixels, of the top-ranked whole-image mask of objects ``idx`` for their points
        and box (no mask input), measured on the low-res logits (no upsampling)."""
        i = np.array(idx)
        low, iou = self._decode_low(emb, None if pts is None else pts[i], None if lab is None else lab[i],
                                    None if bx is None else bx[i], None, multimask)
        top = low[torch.arange(len(i)), iou.argmax(1)] > self.model.mask_threshold  # (n, L, L)
        cell = self.model.img_size / top.shape[-1]  # input pixels per low-res cell
        fr, fc = emb.original_size[0] / emb.input_size[0], emb.original_size[1] / emb.input_size[1]
        spans = np.zeros(len(i))
        for j, t in enumerate(top.cpu().numpy()):
            rows, cols = np.flatnonzero(t.any(1)), np.flatnonzero(t.any(0))
            if rows.size:
                spans[j] = max((rows[-1] - rows[0] + 1) * cell * fr, (cols[-1] - cols[0] + 1) * cell * fc)
        return spans

    def _reframe_each(self, emb: ImageEmbedding, low: torch.Tensor, srcs: np.ndarray, dst: Window) -> torch.Tensor:
        """Low-res logits (n, 1, L, L), object j's decoded in window ``srcs[j]`` ((n, 4) int) -> the frame of
        ``dst``."""
        return torch.cat([self._reframe(emb, low[j:j + 1], tuple(int(v) for v in srcs[j]), dst)
                          for j in range(low.shape[0])])

    def _reframe(self, emb: ImageEmbedding, low: torch.Tensor, src: Window, dst: Window) -> torch.Tensor:
        """Low-res logits (1, 1, L, L) decoded in window ``src`` -> the frame of window ``dst``."""
        if src == dst:
            return low

        def frame(win: Window) -> tuple:
            r0, c0, r1, c1 = win
            if (r0, c0, r1, c1) == (0, 0) + tuple(emb.original_size):
                return (0, 0, r1, c1) + tuple(emb.input_size)
            return (r0, c0, r1 - r0, c1 - c0) + tuple(self.transform.input_size(r1 - r0, c1 - c0))

        return resample_logits(low, frame(src), frame(dst), self.model.img_size)

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
        if not bool(torch.isfinite(m).all()):
            raise ValueError("mask_input contains NaN or inf; pass the low_res_logits of a previous prediction")
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
        return self._run(self._require(), point_coords, point_labels, boxes, mask_input, multimask_output, iou_floor)

    @torch.inference_mode()
    def _run(self, emb: ImageEmbedding, point_coords, point_labels, boxes, mask_input, multimask_output: bool,
             iou_floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_torch` on the embedding ``emb`` (the current image's, or a zoom window's)."""
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if self.fast_decoder:
            dec, ctx = self.model.mask_decoder, self._decoder_context(emb)
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

    def _decoder_context(self, emb: ImageEmbedding | None = None) -> DecoderContext:
        """Prompt-independent decoder tensors of ``emb`` (default: the current image), rebuilt if the embedding or
        the weights they depend on change (in-place updates such as fine-tuning bump the tensors' version
        counters)."""
        emb = self._require() if emb is None else emb
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
        if key is None:
            return prepare_context(emb.features, pe, dec)
        hit = self._ctx.pop(key, None)
        if hit is None or hit[0] is not emb:  # the entry holds its embedding, so ids are not reused meanwhile
            hit = (emb, prepare_context(emb.features, pe, dec))
        self._ctx[key] = hit  # most recently used last; the image's and a few zoom windows' are kept
        while len(self._ctx) > 4:
            self._ctx.pop(next(iter(self._ctx)))
        return hit[1]
