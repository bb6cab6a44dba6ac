"""The model protocol: what a solver asks of an ε-network.

Two shapes of model are accepted everywhere:

* a plain **ε-function** ``eps_fn(x, t) -> ε`` where ``x`` has shape ``(B, *data)`` and
  ``t`` is a float tensor of shape ``(B,)`` in continuous time ``(0, 1]``;
* an **adapter** (subclass of :class:`EpsModel`) whose ``forward_features(x, t)`` returns
  :class:`ModelOutput` ``(eps, features, temb)`` in one forward pass: ε, the network's
  last feature map before its output layer and its time embedding.  The curvature head
  reads the latter two.  ``features`` and ``temb`` may be ``None``.

:func:`as_model` turns either into an adapter, so solvers only deal with one type.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

EpsFn = Callable[[Tensor, Tensor], Tensor]


class ModelOutput(NamedTuple):
    eps: Tensor
    features: Optional[Tensor] = None
    temb: Optional[Tensor] = None


class EpsModel(nn.Module):
    """Adapter base class: ``forward(x, t)`` gives ε, ``forward_features`` gives all three."""

    #: Whether the adapter prepares its network for ``torch.func.jvp`` itself, as
    #: :class:`~genie_kernels.models.adapters.HookedModel` does; the exact derivative's error
    #: then does not advise wrapping the model in one.
    prepares_jvp: bool = False

    def forward_features(self, x: Tensor, t: Tensor) -> ModelOutput:
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.forward_features(x, t).eps


class EpsFnModel(EpsModel):
    """Adapter around a plain ε-function: no features, no time embedding."""

    def __init__(self, eps_fn: EpsFn):
        super().__init__()
        self.eps_fn = eps_fn

    def forward_features(self, x: Tensor, t: Tensor) -> ModelOutput:
        return ModelOutput(self.eps_fn(x, t))


def check_takes_x_and_t(network, role: str = "model") -> None:
    """Refuse a ``network`` whose signature says it cannot be called as ``network(x, t)``
    (a forward that takes only ``x`` would fail later, deep in a solver, with Python's own
    message).  Callables without a readable signature pass; their first call will tell."""
    target = network.forward if isinstance(network, nn.Module) else network
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(target, "__qualname__", type(network).__name__)
        raise TypeError(f"the {role} is called as {role}(x, t), with t of shape (B,), but {name}{signature} "
                        "cannot take two; a network without a time input must still accept one "
                        "(forward(self, x, t=None))") from None


def as_model(model) -> EpsModel:
    """Return ``model`` as an :class:`EpsModel` adapter (a callable must take ``(x, t)``)."""
    if isinstance(model, EpsModel):
        return model
    if callable(model):
        check_takes_x_and_t(model)
        return EpsFnModel(model)
    raise TypeError(f"model must be an EpsModel or a callable eps_fn(x, t), got {type(model).__name__}")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of a solver's state x̄ and of what is added to it (dε/dγ): ``dtype``, or
    float32 if that is wider, so half-precision networks round only their own input."""
    return torch.promote_types(dtype, torch.float32)


def _dtype_mismatch(model, x: Tensor) -> str | None:
    """Why the model cannot take ``x``, when ``x`` has none of the dtypes of its floating weights."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} if isinstance(model, nn.Module) else set()
    if not dtypes or x.dtype in dtypes:
        return None
    weights = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    return (f"the model failed on input of dtype {str(x.dtype).replace('torch.', '')} while its weights are {weights}; "
            "give the noise the model's dtype (noise.to(...)) or the model the noise's (model.to(...))")


def checked_call(model: EpsModel, x: Tensor, t: Tensor) -> ModelOutput:
    """Call the model and check that ε is shaped and typed like its input (no host sync).

    A model that fails on an input whose dtype none of its weights have (float16 noise for
    a float32 network) raises TypeError saying so, not the first layer's error."""
    try:
        out = model.forward_features(x, t)
    except RuntimeError as err:
        mismatch = _dtype_mismatch(model, x)
        if mismatch is not None:
            raise TypeError(mismatch) from err
        raise
    if not isinstance(out, ModelOutput):
        raise TypeError(f"forward_features must return a ModelOutput, got {type(out).__name__}")
    eps = out.eps
    if not isinstance(eps, Tensor):
        hint = "; wrap a diffusers UNet2DModel in gk.UNet2DAdapter(unet)" if hasattr(eps, "sample") else ""
        raise TypeError(f"the model must return a tensor, got {type(eps).__name__}{hint}")
    if eps.shape != x.shape:
        raise ValueError(f"the model returned eps of shape {tuple(eps.shape)} for input of shape {tuple(x.shape)}")
    if eps.dtype != x.dtype:
        raise TypeError(f"the model returned eps of dtype {eps.dtype} for input of dtype {x.dtype}")
    return out
