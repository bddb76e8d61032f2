"""ViT image encoder of SAM (ViT-B/L/H), with windowed and global attention.

Parameter names are those of the official checkpoints. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` with the decomposed relative
position bias passed as an additive mask, which is mathematically the reference's
``softmax(q k^T * scale + rel_pos) v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock

MAX_BIAS_ELEMENTS = 1 << 25  # at most 128 MB of float32 attention bias at a time


class ImageEncoderViT(nn.Module):
    """Maps a (B, 3, img_size, img_size) normalised image to (B, out_chans, img_size/patch, img_size/patch)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    use_rel_pos=use_rel_pos,
                    window_size=0 if i in global_attn_indexes else window_size,
                    input_size=(grid, grid),
                )
            )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, H, W)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns channels-last (B, H, W, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block with optional window attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        use_rel_pos: bool,
        window_size: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        if torch.is_grad_enabled():
            x = shortcut + x
            return x + self.mlp(self.norm2(x))
        x = x.add_(shortcut)  # inference: residuals in place (x is a temporary of this block)
        return x.add_(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position bias (keys qkv, proj, rel_pos_h, rel_pos_w)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        use_rel_pos: bool,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, _ = x.shape
        n = h * w
        # (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # the bias is (B, heads, N, N): 800 MB for one global-attention layer of ViT-B at N = 4096.
            # Build and use it a few heads at a time (same result) to bound peak memory.
            step = max(1, MAX_BIAS_ELEMENTS // (b * n * n))
            outs = []
            buf = None  # inference: one bias buffer for all chunks (a fresh 128 MB tensor per chunk costs page
            # faults); with autograd rel_pos_bias builds a new tensor anyway
            for i in range(0, self.num_heads, step):
                sl = slice(i, i + step)
                qs = q[:, sl]
                if not torch.is_grad_enabled() and (buf is None or buf.shape[1] != qs.shape[1]):
                    buf = torch.empty((b, qs.shape[1], n, n), dtype=q.dtype, device=q.device)
                bias = rel_pos_bias(qs, self.rel_pos_h, self.rel_pos_w, (h, w), out=buf)  # (B, step, N, N)
                outs.append(F.scaled_dot_product_attention(qs, k[:, sl], v[:, sl], attn_mask=bias,
                                                           scale=self.scale))
                del bias
            del buf
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)  # (B, H, W, C)
        return self.proj(out)


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, ws, ws, C), zero-padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, ws: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWin, ws, ws, C) -> (B, H, W, C)."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // ws) * (wp // ws))
    x = windows.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair: (q_size, k_size, C)."""
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.long()]


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decomposed relative position bias (MViTv2), as an additive attention mask.

    q: (B, heads, H*W, C) unscaled queries. Returns (B, heads, H*W, H*W), written into ``out`` (contiguous,
    that shape) when given.
    """
    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h)  # (H, H, C)
    rw = get_rel_pos(w, w, rel_pos_w)  # (W, W, C)
    b, nh, _, c = q.shape
    r_q = q.reshape(b, nh, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # (B, heads, H, W, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # (B, heads, H, W, W)
    # einsum may return permuted strides, which make the broadcast sum several times slower and non-contiguous:
    # add contiguous terms into a contiguous (B, heads, H, W, H, W) bias, so that the reshape below is a view
    rel_h, rel_w = rel_h.contiguous().unsqueeze(-1), rel_w.contiguous().unsqueeze(-2)
    if torch.is_grad_enabled():  # out= does not take part in autograd
        return (rel_h + rel_w).reshape(b, nh, h * w, h * w)
    if out is None:
        out = torch.empty((b, nh, h * w, h * w), dtype=rel_h.dtype, device=rel_h.device)
    torch.add(rel_h, rel_w, out=out.view(b, nh, h, w, h, w))
    return out
