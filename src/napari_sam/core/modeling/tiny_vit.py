"""TinyViT image encoder (MobileSAM's ``vit_t``), without timm and without the classification head.

Parameter names follow MobileSAM's checkpoint (``mobile_sam.pt``). Its unused ImageNet head
(``head.*``, ``norm_head.*``) is not built here; the loader drops those keys. The output grid size is
computed from the input instead of being hard-coded, so smaller configs (our built-in model) work too.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, act_


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in any memory format -> tokens (B, H*W, C); a view when x is channels-last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens (B, H*W, C) -> (B, C, H, W), a channels-last view when x is contiguous."""
    return x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


class Conv2d_BN(nn.Sequential):
    """Conv (no bias) + BatchNorm (keys c.*, bn.*).

    ``per_image_norm`` (set by :class:`TinyViT`): normalise with each image's own channel statistics in
    training and inference alike (instance norm with the BatchNorm's affine parameters; the running statistics
    are not used). A model trained from scratch on mixed modalities (dark fluorescence next to bright
    brightfield) one image per step learns exactly this; averaged running statistics fit no modality.
    """

    per_image_norm = False

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)
        self._bn_affine: tuple | None = None

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (alpha, beta) of the eval-mode BatchNorm, ``bn(y) = y * alpha + beta``, shaped (C, 1, 1);
        cached until any of the tensors changes (version counters)."""
        bn = self.bn
        deps = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        try:
            key = tuple((t.data_ptr(), t._version) for t in deps)
        except RuntimeError:  # inference tensors have no version counter: do not cache
            key = None
        if key is None or self._bn_affine is None or self._bn_affine[0] != key:
            alpha = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            beta = bn.bias - bn.running_mean * alpha
            self._bn_affine = (key, alpha[:, None, None], beta[:, None, None])
        return self._bn_affine[1], self._bn_affine[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image_norm:
            bn = self.bn
            y = self.c(x)
            if torch.is_grad_enabled() or y.is_contiguous():
                return F.instance_norm(y, weight=bn.weight, bias=bn.bias, eps=bn.eps)
            # inference on channels-last data: the same per-image statistics, applied in place (no layout copy)
            # (two passes over the (B, H*W, C) view: torch.var_mean is several times slower on the CPU)
            t = y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])
            mean = t.mean(1, keepdim=True)  # (B, 1, C)
            var = (t - mean).square_().mean(1, keepdim=True)
            scale = bn.weight * torch.rsqrt(var + bn.eps)  # (B, 1, C)
            shift = bn.bias - mean * scale
            b, c = y.shape[:2]
            return y.mul_(scale.view(b, c, 1, 1)).add_(shift.view(b, c, 1, 1))
        if self.training or torch.is_grad_enabled():
            return self.bn(self.c(x))
        # inference: the BatchNorm is applied in place on the conv output (no second tensor). It is not folded
        # into the conv weights: that rounds differently, and deep random-weight networks amplify it past 1e-4
        alpha, beta = self._affine()
        return self.c(x).mul_(alpha).add_(beta)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convs: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1), activation(), Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, act, conv2 = self.seq
        return conv2(act_(act, conv1(x)))


class MBConv(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, activation: type[nn.Module]) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = Conv2d_BN(in_chans, hidden, ks=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2d_BN(hidden, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = act_(self.act2, self.conv2(act_(self.act1, self.conv1(x))))
        y = self.conv3(y)
        y = y + x if torch.is_grad_enabled() else y.add_(x)
        return act_(self.act3, y)


class PatchMerging(nn.Module):
    """(B, C, H, W) or tokens (B, H*W, C) -> tokens (B, H'*W', out_dim), H' = ceil(H / stride)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int, stride: int,
                 activation: type[nn.Module]) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = _grid(x, *self.input_resolution)
        x = self.conv3(act_(self.act, self.conv2(act_(self.act, self.conv1(x)))))
        return _tokens(x)


class ConvLayer(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, activation: type[nn.Module],
                 downsample: nn.Module | None, conv_expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, dim, conv_expand_ratio, activation) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(act_(self.act, self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Window attention with a learned bias per head and relative offset (keys norm, qkv, proj, attention_biases)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 resolution: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.LongTensor(idxs).view(n, n), persistent=False)
        self._bias: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, _ = x.shape
        x = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = x.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        if torch.is_grad_enabled():
            bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        else:  # inference: gather once, again only if the biases change (version counter)
            try:
                key = (self.attention_biases.data_ptr(), self.attention_biases._version)
            except RuntimeError:
                key = None
            if key is None or self._bias is None or self._bias[0] != key:
                self._bias = (key, self.attention_biases[:, self.attention_bias_idxs])
            bias = self._bias[1]
        # windows are small (N = 49 or 196 for vit_t): plain attention on the strided heads, with the bias added
        # in place (broadcast over windows), beats SDPA with a float mask and batched copies on the CPU
        attn = (q * self.scale) @ k.transpose(-1, -2)  # (B, heads, N, N)
        attn = attn.add_(bias.to(q.dtype))
        out = attn.softmax(-1) @ v  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 mlp_ratio: float, local_conv_size: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation)
        pad = local_conv_size // 2
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=pad, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H*W, C)
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        res = x
        if h == ws and w == ws:
            x = self.attn(x)
        else:
            x = x.view(b, h, w, c)
            pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x)
            x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            if pad_b or pad_r:
                x = x[:, :h, :w].contiguous()
            x = x.view(b, n, c)
        x = res + x
        if torch.is_grad_enabled():
            x = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.local_conv(x).view(b, c, n).transpose(1, 2)
            return x + self.mlp(x)
        # inference: the depthwise conv runs on a channels-last view of the tokens (no layout copies)
        x = _tokens(self.local_conv(_grid(x, h, w)))
        return x.add_(self.mlp(x))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, local_conv_size: int, activation: type[nn.Module],
                 downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size, activation)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


def _default_merge_stride(out_dim: int) -> int:
    # MobileSAM keeps the resolution in the last merge (to 320 channels) so the output is 64x64.
    return 1 if out_dim in (320, 448, 576) else 2


class TinyViT(nn.Module):
    """(B, 3, img_size, img_size) normalised image -> (B, out_chans, img_size/s, img_size/s).

    ``merge_strides`` gives the stride of each stage's PatchMerging (len(depths) - 1 entries);
    by default MobileSAM's rule, which gives s = 16 for vit_t.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        merge_strides: tuple[int, ...] | None = None,
        neck_kernel: int = 3,
        norm: str = "batch",
    ) -> None:
        """``norm``: "batch" (MobileSAM's BatchNorm) or "image" (per-image statistics, see :class:`Conv2d_BN`)."""
        super().__init__()
        if norm not in ("batch", "image"):
            raise ValueError(f"unknown TinyViT norm {norm!r}; use 'batch' or 'image'")
        self.img_size = img_size
        act = nn.GELU
        n = len(depths)
        if merge_strides is None:
            merge_strides = tuple(_default_merge_stride(embed_dims[i + 1]) for i in range(n - 1))
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], act)
        res = img_size // 4
        self.layers = nn.ModuleList()
        for i in range(n):
            down = None
            if i < n - 1:
                down = PatchMerging((res, res), embed_dims[i], embed_dims[i + 1], merge_strides[i], act)
            if i == 0:
                layer = ConvLayer(embed_dims[0], (res, res), depths[0], act, down, mbconv_expand_ratio)
            else:
                layer = BasicLayer(embed_dims[i], (res, res), depths[i], num_heads[i], window_sizes[i],
                                   mlp_ratio, local_conv_size, act, down)
            self.layers.append(layer)
            if i < n - 1:
                res = (res - 1) // merge_strides[i] + 1
        self.out_res = res
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=neck_kernel, padding=neck_kernel // 2, bias=False),
            LayerNorm2d(out_chans),
        )
        if norm == "image":
            for mod in self.modules():
                if isinstance(mod, Conv2d_BN):
                    mod.per_image_norm = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if not torch.is_grad_enabled():
            # inference: the conv stages are 2-3x faster on channels-last data on the CPU. The patch embedding
            # stays NCHW, as in the reference: in channels-last its convolutions round differently enough to
            # move vit_t embeddings by ~1e-4, the parity tolerance (the later stages add a third of that)
            x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.layers:
            x = layer(x)
        x = _grid(x, self.out_res, self.out_res)
        return self.neck(x).contiguous()
