"""The model protocol: what a solver asks of an ε-network.

Two shapes of model are accepted everywhere:

* a plain **ε-function** ``eps_fn(x, t) -> ε`` where ``x`` has shape ``(B, *data)`` and
  ``t`` is a float tensor of shape ``(B,)`` in continuous time ``(0, 1]``;
* an **adapter** (subclass of :class:`EpsModel`) whose ``forward_features(x, t)`` returns
  :class:`ModelOutput` ``(eps, features, temb)`` in one forward pass: ε, the network's
  last feature map before its output layer and its time embedding.  The curvature head
  reads the latter two.  ``features`` and ``temb`` may be ``None``.

A **condition** (class labels as a LongTensor, text embeddings as a tensor) is a third
argument: ``forward_features(x, t, cond)`` and ``eps_fn(x, t, cond)``, with ``cond=None``
meaning unconditional.  Models that take none keep their two-argument signature; giving
them a condition is an error (:func:`checked_call`).  A conditional adapter says which
conditions it accepts (:meth:`EpsModel.check_cond`) and what its null condition is
(:meth:`EpsModel.null_cond`), which classifier-free guidance (:mod:`.guidance`) needs.

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

    def forward_features(self, x: Tensor, t: Tensor, cond=None) -> ModelOutput:
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        if cond is None:
            return self.forward_features(x, t).eps
        return self.forward_features(x, t, cond).eps

    @property
    def conditional(self) -> bool:
        """Whether the model takes a condition: by default, whether ``forward_features`` has
        a third parameter (an adapter written before conditions existed has not)."""
        return _takes_three(self.forward_features)

    def check_cond(self, cond, batch: int, device) -> Tensor:
        """``cond`` checked and broadcast to ``batch`` samples (raises ValueError/TypeError).

        The default accepts a tensor whose first dimension is ``batch`` or 1 (a single label
        of shape () too); conditional adapters refine it (label ranges, embedding shapes)."""
        if not self.conditional:
            raise ValueError(f"{type(self).__name__} is unconditional: it takes no condition (cond=None)")
        return broadcast_cond(cond, batch, device)

    def null_cond(self, batch: int, device) -> Tensor:
        """The condition that means "none" (null label, empty prompt), for ``batch`` samples;
        classifier-free guidance uses it when given no ``uncond``."""
        raise ValueError(f"{type(self).__name__} does not say what its null condition is; pass uncond=... "
                         "(the unconditional label or embedding) to sample()")


def broadcast_cond(cond, batch: int, device) -> Tensor:
    """A condition tensor of first dimension ``batch`` or 1 (or a 0-dim label) as ``batch`` rows."""
    if not isinstance(cond, Tensor):
        raise TypeError(f"a condition must be a tensor (labels or embeddings), got {type(cond).__name__}")
    if cond.dim() == 0:
        cond = cond.reshape(1)
    if cond.shape[0] not in (1, batch):
        raise ValueError(f"the condition has batch {cond.shape[0]} but the noise has {batch}; give one condition "
                         "per sample or a single one for all")
    return cond.to(device).expand(batch, *cond.shape[1:])


def _takes_three(function) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(None, None, None)
    except TypeError:
        return False
    return True


class EpsFnModel(EpsModel):
    """Adapter around a plain ε-function: no features, no time embedding.  An ``eps_fn`` that
    takes a third argument, ``eps_fn(x, t, cond)``, is conditional."""

    def __init__(self, eps_fn: EpsFn):
        super().__init__()
        self.eps_fn = eps_fn

    @property
    def conditional(self) -> bool:
        return _takes_three(self.eps_fn.forward if isinstance(self.eps_fn, nn.Module) else self.eps_fn)

    def forward_features(self, x: Tensor, t: Tensor, cond=None) -> ModelOutput:
        if self.conditional:
            return ModelOutput(self.eps_fn(x, t, cond))
        return ModelOutput(self.eps_fn(x, t))


def check_takes_x_and_t(network, role: str = "model", cond_arg: str | None = None) -> None:
    """Refuse a ``network`` whose signature says it cannot be called as ``network(x, t)``
    (a forward that takes only ``x`` would fail later, deep in a solver, with Python's own
    message).  Callables without a readable signature pass; their first call will tell."""
    target = network.forward if isinstance(network, nn.Module) else network
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None, **({} if cond_arg is None else {cond_arg: None}))
    except TypeError:
        name = getattr(target, "__qualname__", type(network).__name__)
        if cond_arg is not None:
            raise TypeError(f"the {role} is called as {role}(x, t, {cond_arg}=cond), but {name}{signature} "
                            "cannot be called so") from None
        raise TypeError(f"the {role} is called as {role}(x, t), with t of shape (B,), but {name}{signature} "
                        "cannot take two; a network without a time input must still accept one "
                        "(forward(self, x, t=None))") from None


def as_model(model) -> EpsModel:
    """Return ``model`` as an :class:`EpsModel` adapter (a callable must take ``(x, t)``, or
    ``(x, t, cond)`` for a conditional one: it is then always called with ``cond``, None
    meaning unconditional)."""
    if isinstance(model, EpsModel):
        return model
    if callable(model):
        if not _takes_three(model.forward if isinstance(model, nn.Module) else model):
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


def checked_call(model: EpsModel, x: Tensor, t: Tensor, cond=None) -> ModelOutput:
    """Call the model and check that ε is shaped and typed like its input (no host sync).

    ``cond`` (None: unconditional) goes to the model as its third argument; a model that
    takes none raises ValueError.  A model that fails on an input whose dtype none of its
    weights have (float16 noise for a float32 network) raises TypeError saying so, not the
    first layer's error."""
    if cond is not None and not model.conditional:
        raise ValueError(f"{type(model).__name__} is unconditional: it takes no condition (cond=None)")
    try:
        out = model.forward_features(x, t) if cond is None else model.forward_features(x, t, cond)
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
