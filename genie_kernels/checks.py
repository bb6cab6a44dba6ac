"""Argument checks shared by the library's entry points (one wording for one mistake)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_int(name: str, value, low: int) -> None:
    """Refuse anything but a Python ``int`` (a ``bool`` is not one here) of at least ``low``.

    Settings checked here end up in JSON configs and checkpoints, so a numpy integer is
    refused too: it would not serialise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_noise(noise, finite: bool = True) -> None:
    """A floating ``(batch, ...)`` tensor with batch >= 1; ``finite``: also free of NaN and inf
    (one host sync)."""
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must have a floating dtype, got {noise.dtype}")
    if noise.dim() < 2 or noise.shape[0] == 0:
        raise ValueError(f"noise must be shaped (batch, ...) with batch >= 1, got shape {tuple(noise.shape)}")
    if finite and not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf")
