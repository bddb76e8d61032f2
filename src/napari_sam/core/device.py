"""Device selection: CUDA > MPS > CPU unless the caller names one."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or "auto" picks CUDA, then Apple MPS, then CPU; anything else is validated and returned."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available; use device='cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r} was requested but MPS is not available; use device='cpu'")
    return dev


def available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.insert(0, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.insert(0, "mps")
    return out
