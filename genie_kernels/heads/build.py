"""Building heads: from a saved config (:func:`head_from_config`) or sized for what a model
returns (:func:`head_for`)."""

from __future__ import annotations

from torch import Tensor

from ..ode.protocol import ModelOutput
from .base import _HeadBase
from .conv import ConvHead
from .mlp import MLPHead


HEADS = {ConvHead.kind: ConvHead, MLPHead.kind: MLPHead}


def head_from_config(config: dict) -> _HeadBase:
    """Build an untrained head from its ``config()`` dict."""
    if not isinstance(config, dict):
        raise ValueError(f"a head config must be a dict with a 'type', got {type(config).__name__} {config!r:.60}")
    kind = config.get("type")
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; known: {tuple(HEADS)}")
    try:
        return HEADS[kind].from_config(config)
    except TypeError as err:  # unknown or missing keys
        raise ValueError(f"bad {kind} head config {config}: {err}") from err


def head_for(model_output: ModelOutput, x: Tensor, kind: str = "conv", **options) -> _HeadBase:
    """A head sized for what ``model`` returns on ``x`` (channels, features, temb)."""
    f, temb = model_output.features, model_output.temb
    temb_channels = options.pop("temb_channels", temb.shape[-1] if temb is not None else 0)
    if kind == "conv":
        feature_channels = options.pop("feature_channels", f.shape[1] if f is not None else 0)
        return ConvHead(x.shape[1], feature_channels=feature_channels, temb_channels=temb_channels, **options)
    if kind == "mlp":
        feature_dim = options.pop("feature_dim", f[0].numel() if f is not None else 0)
        return MLPHead(x[0].numel(), feature_dim=feature_dim, temb_channels=temb_channels, **options)
    raise ValueError(f"unknown head type {kind!r}; known: {tuple(HEADS)}")
