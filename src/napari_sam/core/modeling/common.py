"""Small building blocks shared by the SAM modules (upstream parameter names)."""

from __future__ import annotations

import torch
from torch import nn


def act_(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for an activation module; exact GELU runs in place on ``x`` (a temporary of the caller) when
    autograd does not need it. CPU inference is memory bound there: a fresh output tensor of activation size costs
    more (page faults) than the GELU itself."""
    if isinstance(mod, nn.GELU) and mod.approximate == "none" and not (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.aten.gelu_(x)
    return mod(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Transformer feed-forward block: Linear -> act -> Linear (keys lin1, lin2)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(act_(self.act, self.lin1(x)))


class MLP(nn.Module):
    """Plain ReLU MLP with ``num_layers`` linear layers (keys layers.0 ... layers.N-1)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = torch.relu(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x
