"""What a network predicts, turned into the ε every solver integrates.

diffusers names three parametrisations (``prediction_type``).  With
``x = α x₀ + σ ε`` (``α = √ᾱ``, ``σ = √(1 − ᾱ)``, ``α² + σ² = 1``):

==================  ==========================  ===========================
``"epsilon"``       the noise ε                  ``ε = output``
``"v_prediction"``  ``v = α ε − σ x₀``           ``ε = α v + σ x``
``"sample"``        the clean sample x₀          ``ε = (x − α x₀) / σ``
==================  ==========================  ===========================

(the second: ``α v + σ x = α² ε − ασ x₀ + σα x₀ + σ² ε = ε``).  The conversions are
written with differentiable torch operations of ``x`` and of α, σ as functions of t,
so ``torch.func.jvp`` through a converted model is the derivative of its ε.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import VPSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type) -> str:
    """``prediction_type`` if it is one of :data:`PREDICTION_TYPES`, else a ValueError naming it."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: the package converts {PREDICTION_TYPES} "
                         "to the ε it integrates")
    return prediction_type


def eps_from_prediction(prediction_type: str, output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε from a network's ``output`` at ``x`` (see the module docstring); ``alpha`` and
    ``sigma`` broadcast against ``x`` (one value, or shape (B, 1, …)).  In ``output``'s dtype."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return (alpha * output + sigma * x).to(output.dtype)
    if prediction_type == "sample":
        return ((x - alpha * output) / sigma).to(output.dtype)
    check_prediction_type(prediction_type)
    raise AssertionError("unreachable")


def eps_at_t(prediction_type: str, output: Tensor, x: Tensor, t: Tensor, schedule: VPSchedule) -> Tensor:
    """:func:`eps_from_prediction` with α and σ of ``schedule`` at ``t`` (shape (B,) or ()):
    computed in t's precision or float32 if wider, differentiable in t."""
    if prediction_type == "epsilon":
        return output
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    shape = (-1,) + (1,) * (x.dim() - 1)
    alpha, sigma = schedule.alpha(t).reshape(shape), schedule.sigma(t).reshape(shape)
    return eps_from_prediction(prediction_type, output, x, alpha, sigma)
