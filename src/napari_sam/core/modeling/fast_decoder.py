"""Inference-only mask decoder: the same maths as :class:`MaskDecoder`, rearranged for prompt->mask latency.

Equal to ``MaskDecoder.forward`` up to float rounding (tested against Meta's reference to 1e-4):

* Work that does not depend on the prompt is done once per image (:func:`prepare_context`): the dense
  positional encoding, the flattened image keys + ``no_mask_embed``, and the first layer's key/value
  projections of the image (token->image) and query projection (image->token).
* Attention between the few prompt tokens (T ~ 5-7) and the 4096 image positions never projects the image
  side to the head dimension: per head, ``softmax(q W_k x^T) (x W_v^T)`` is computed as
  ``softmax((q W_k) x^T) x W_v^T`` and the output projection is folded into the values
  (``attn (v W_o^T)``), which needs about T/d of the multiply-adds (d = head dim 16).
  The key bias drops out of the softmax; the value bias passes through because attention rows sum to one.
* The two stride-2 transposed convolutions of the upscaler are matrix products on channels-last data
  followed by a pixel shuffle, and only the requested masks' hypernetworks run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import act_
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import Attention, TwoWayAttentionBlock


class DecoderContext(NamedTuple):
    """Prompt-independent tensors of one image (batch 1)."""

    features: torch.Tensor  # (1, N, C) image embedding, flattened
    keys0: torch.Tensor  # (1, N, C) image embedding + no_mask_embed, flattened
    key_pe: torch.Tensor  # (1, N, C)
    k0: torch.Tensor  # (1, heads, N, d) layer-0 token->image keys
    v0: torch.Tensor  # (1, heads, N, d) layer-0 token->image values
    q0t: torch.Tensor  # (1, heads, d, N) layer-0 image->token queries, pre-scaled, transposed
    grid: tuple[int, int]


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, L, n*d) -> (B, n, L, d)
    b, length, c = x.shape
    return x.reshape(b, length, n, c // n).transpose(1, 2)


def prepare_context(features: torch.Tensor, prompt_encoder: PromptEncoder, decoder: MaskDecoder) -> DecoderContext:
    """features: (1, C, H, W) image embedding."""
    _, c, h, w = features.shape
    pe = prompt_encoder.get_dense_pe()
    key_pe = pe.flatten(2).transpose(1, 2)
    keys0 = (features + prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
    layer0: TwoWayAttentionBlock = decoder.transformer.layers[0]
    t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
    kp = keys0 + key_pe
    k0 = _heads(t2i.k_proj(kp), t2i.num_heads)
    v0 = _heads(t2i.v_proj(keys0), t2i.num_heads)
    q0 = _heads(i2t.q_proj(kp), i2t.num_heads) * (i2t.internal_dim // i2t.num_heads) ** -0.5
    feats = features.flatten(2).transpose(1, 2).contiguous()
    return DecoderContext(feats, keys0.contiguous(), key_pe.contiguous(), k0, v0,
                          q0.transpose(-1, -2).contiguous(), (h, w))


def _tokens_to_image(attn: Attention, q_in: torch.Tensor, kp: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """attn(q_in, kp, keys) for few queries (B, T, C) and many keys (B or 1, N, C), without projecting keys."""
    nh = attn.num_heads
    d = attn.internal_dim // nh
    b, t, c = q_in.shape
    q = _heads(attn.q_proj(q_in), nh) * d**-0.5  # (B, h, T, d)
    wk = attn.k_proj.weight.reshape(nh, d, c)  # (h, d, C)
    qk = q @ wk  # (B, h, T, C); the key bias is constant along keys: it cancels in the softmax
    scores = qk.reshape(b, nh * t, c) @ kp.transpose(1, 2)  # (B, h*T, N)
    p = scores.softmax(-1)
    pv = p @ keys  # (B, h*T, C)
    wv = attn.v_proj.weight.reshape(nh, d, c)
    out = pv.reshape(b, nh, t, c) @ wv.transpose(1, 2) + attn.v_proj.bias.reshape(nh, 1, d)  # (B, h, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, nh * d))


def _image_to_tokens_residual(attn: Attention, keys: torch.Tensor, kp: torch.Tensor | None,
                              q0t: torch.Tensor | None, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """``keys + attn(kp, k_in, v_in)``: many image queries (B or 1, N, C), or their pre-projected transposed
    heads ``q0t`` (1, h, d, N); few tokens k_in, v_in (B, T, C). Returns (B, N, C).

    Scores are laid out (B, h, T, N) so that the softmax over the T tokens runs along a long contiguous axis,
    and the output projection, its bias (attention weights of each head sum to one, so bias/h is added to
    each head's values) and the residual are one batched matrix product.
    """
    nh = attn.num_heads
    d = attn.internal_dim // nh
    b, t, c = k_in.shape
    k = _heads(attn.k_proj(k_in), nh)  # (B, h, T, d)
    v = _heads(attn.v_proj(v_in), nh)  # (B, h, T, d)
    if q0t is not None:
        scores = k @ q0t  # (B, h, T, N); q0t carries the 1/sqrt(d) scale
        n = q0t.shape[-1]
    else:
        k = k * d**-0.5
        wq = attn.q_proj.weight.reshape(nh, d, c)
        a = (k @ wq).reshape(b, nh * t, c)  # scores = a kp^T + (k . q-bias)
        bias = (k @ attn.q_proj.bias.reshape(nh, d, 1)).reshape(b, nh * t, 1)
        n = kp.shape[1]
        scores = torch.baddbmm(bias, a, kp.transpose(1, 2).expand(b, -1, -1)).reshape(b, nh, t, n)
    p = scores.softmax(2).reshape(b, nh * t, n)
    wo = attn.out_proj.weight.reshape(c, nh, d).transpose(0, 1)  # (h, C, d)
    vo = v @ wo.transpose(1, 2) + attn.out_proj.bias / nh  # (B, h, T, C)
    return torch.baddbmm(keys.expand(b, -1, -1), p.transpose(1, 2), vo.reshape(b, nh * t, c))


def _block(layer: TwoWayAttentionBlock, queries, tokens, keys, key_pe, ctx: DecoderContext | None):
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(queries, queries, queries)
    else:
        q = queries + tokens
        queries = queries + layer.self_attn(q, q, queries)
    queries = layer.norm1(queries)
    q = queries + tokens
    if ctx is not None:  # first layer, no mask prompt: image-side projections come from the cache
        t2i = layer.cross_attn_token_to_image
        qh = _heads(t2i.q_proj(q), t2i.num_heads)
        b = qh.shape[0]
        # all B*T queries attend to the same keys: one attention call with the batch folded into the queries
        qh = qh.transpose(0, 1).reshape(1, t2i.num_heads, -1, qh.shape[-1])
        o = F.scaled_dot_product_attention(qh, ctx.k0, ctx.v0)  # (1, h, B*T, d)
        o = o.reshape(t2i.num_heads, b, -1, o.shape[-1]).permute(1, 2, 0, 3).reshape(b, -1, t2i.internal_dim)
        attn_out = t2i.out_proj(o)
        kp = None
    else:
        kp = keys + key_pe
        attn_out = _tokens_to_image(layer.cross_attn_token_to_image, q, kp, keys)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + tokens
    keys = layer.norm4(_image_to_tokens_residual(layer.cross_attn_image_to_token, keys, kp,
                                                 None if ctx is None else ctx.q0t, q, queries))
    return queries, keys


def _conv_t2x2(x: torch.Tensor, conv: torch.nn.ConvTranspose2d) -> torch.Tensor:
    """ConvTranspose2d(k=2, s=2) on channels-last x (B, H, W, Cin) -> (B, H, W, 2, 2, Cout) (dy, dx, c)."""
    cin, cout = conv.weight.shape[:2]
    w = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # (Cin, dy*dx*Cout)
    y = torch.addmm(conv.bias.repeat(4), x.reshape(-1, cin), w)
    return y.reshape(*x.shape[:3], 2, 2, cout)


class DecodedTokens(NamedTuple):
    """The two-way transformer's outputs for B prompts, before the mask upscaling (see :func:`decode_tokens`)."""

    queries: torch.Tensor  # (B, T, C) output tokens
    keys: torch.Tensor  # (B, N, C) image side
    iou: torch.Tensor  # (B, K) predicted IoU of the requested masks
    multimask: bool


def decode_tokens(
    decoder: MaskDecoder,
    ctx: DecoderContext,
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    multimask_output: bool,
) -> DecodedTokens:
    """The transformer and the IoU head: predicted IoUs without the (costlier) mask upscaling.

    sparse (B, T, C) prompt tokens; dense (B or 1, C, H, W) mask-prompt embedding or None (no mask prompt).
    """
    b = sparse.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    tf = decoder.transformer
    if dense is None:
        keys = ctx.keys0
        layer_ctx = ctx
    else:
        keys = ctx.features + dense.flatten(2).transpose(1, 2)  # (B or 1, N, C)
        layer_ctx = None
    queries = tokens
    for i, layer in enumerate(tf.layers):
        queries, keys = _block(layer, queries, tokens, keys, ctx.key_pe, layer_ctx if i == 0 else None)
    if keys.shape[0] != b:
        keys = keys.expand(b, -1, -1)
    kp = keys + ctx.key_pe
    queries = tf.norm_final_attn(queries + _tokens_to_image(tf.final_attn_token_to_image, queries + tokens, kp, keys))
    iou = decoder.iou_prediction_head(queries[:, 0, :])
    iou = iou[:, 1:] if multimask_output else iou[:, :1]
    return DecodedTokens(queries, keys, iou, multimask_output)


def decode_masks(decoder: MaskDecoder, ctx: DecoderContext, out: DecodedTokens,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mask logits (B', K, 4H, 4W) of the prompts ``rows`` (indices into the batch; None: all) of ``out``."""
    queries, keys = out.queries, out.keys
    if rows is not None:
        queries, keys = queries[rows], keys[rows]
    b = queries.shape[0]
    h, w = ctx.grid
    sel = range(1, decoder.num_mask_tokens) if out.multimask else range(0, 1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in sel], dim=1)  # (B,K,c)

    conv1, ln, act1, conv2, act2 = decoder.output_upscaling
    x = keys.reshape(b, h, w, -1)
    y = _conv_t2x2(x, conv1)  # (B, H, W, 2, 2, C1)
    c1 = y.shape[-1]
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c1)  # channels-last (B, 2H, 2W, C1)
    y = act_(act1, F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
    z = act_(act2, _conv_t2x2(y, conv2))  # (B, 2H, 2W, 2, 2, C2)
    c2 = z.shape[-1]
    m = z.reshape(b, -1, c2) @ hyper.transpose(1, 2)  # (B, 2H*2W*4, K)
    k = hyper.shape[1]
    return m.reshape(b, 2 * h, 2 * w, 2, 2, k).permute(0, 5, 1, 3, 2, 4).reshape(b, k, 4 * h, 4 * w)

