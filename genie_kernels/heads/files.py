"""A distilled head on disk: the checkpoint format written by :func:`~.distill.distill`, the
identity of the model a head belongs to, and :func:`load_head`.

A checkpoint's config holds the format tag :data:`FORMAT`, the head's config, the schedule,
the base model's identity (:func:`model_identity`), the training settings and, once a run
has finished, the head's measured cost; its tensors hold the head (``head.``), its EMA copy
(``ema.``) and the training state a resume needs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, load_module_tensors, read_config
from ..checks import check_device, dtype_from_name
from ..cost import RelativeCost
from ..ode.protocol import as_model
from .build import head_from_config


FORMAT = "genie_kernels.head/1"

# The modules this package's models were defined in when heads began to record the identity
# of their model.  Identities keep those names, so that the heads distilled before the
# package was split into layers (the bundled MNIST head among them) still load.
IDENTITY_MODULES = {"genie_kernels.models.unet": "genie_kernels.unet",
                    "genie_kernels.models.adapters": "genie_kernels.adapters",
                    "genie_kernels.models.mixture": "genie_kernels.mixture",
                    "genie_kernels.ode.protocol": "genie_kernels.models"}


def _qualified_name(module: str, qualname: str) -> str:
    return f"{IDENTITY_MODULES.get(module, module)}.{qualname}"


def model_identity(model) -> dict:
    """What a head is tied to: the model's class and a SHA-256 of its weights and buffers.

    A model may define ``identity() -> dict`` to replace this.  Weights are hashed as
    float64 values, so the identity does not depend on the dtype the model runs in.
    """
    custom = getattr(model, "identity", None)
    if callable(custom):
        return dict(custom())
    cls = type(model)
    identity = {"class": _qualified_name(cls.__module__, cls.__qualname__)}
    for attr in ("network", "eps_fn"):  # what an adapter wraps
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            identity[attr] = _qualified_name(type(inner).__module__, type(inner).__qualname__)
        elif callable(inner):
            identity[attr] = _qualified_name(getattr(inner, "__module__", ""),
                                             getattr(inner, "__qualname__", type(inner).__qualname__))
    digest = hashlib.sha256()
    if isinstance(model, nn.Module):
        for name, tensor in sorted(model.state_dict().items()):
            value = tensor.detach().to("cpu", torch.float64).contiguous()
            digest.update(f"{name}:{tuple(value.shape)};".encode())
            digest.update(value.numpy().tobytes())
    identity["sha256"] = digest.hexdigest()
    return identity


def stored_cost(config: dict, path) -> RelativeCost | None:
    """The head's cost recorded in a checkpoint's config (None where the run has not
    finished).  A checkpoint from before FLOPs were counted holds only a time ratio
    (``nfe_overhead``)."""
    cost = config.get("cost")
    if cost is None and "nfe_overhead" in config:
        cost = {"flops": None, "time": config["nfe_overhead"]}
    if cost is None:
        return None
    try:
        return RelativeCost.from_config(cost)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has an invalid head cost: {err}") from err


def load_head(path, model=None, use_ema: bool = True, device=None) -> nn.Module:
    """Load a distilled head from a checkpoint written by :func:`distill`.

    The head is rebuilt from the stored config (and takes the stored weights' dtype).
    With ``model``, the checkpoint's base-model identity must match it
    (:func:`model_identity`).  ``use_ema`` picks the EMA weights when the run kept them.
    Raises :class:`~genie_kernels.checkpoint.CheckpointError` for a missing, corrupt,
    truncated or foreign file, or one made for another model.
    """
    if device is not None:
        device = check_device(device)
    config = read_config(path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a head checkpoint (format {config.get('format')!r}, expected {FORMAT!r})")
    if model is not None:
        identity = model_identity(as_model(model))
        if config.get("base_model") != identity:
            raise CheckpointError(f"the head in {path} was distilled for the model {config.get('base_model')}, "
                                  f"not for the given one {identity}")
    tensors, config = load_checkpoint(path)
    try:
        head = head_from_config(config["head"])
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} has no head config ({err})") from err
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has an unusable head config: {err}") from err
    prefix = "ema." if use_ema and config.get("ema") else "head."
    try:
        dtype = dtype_from_name((config.get("training") or {}).get("dtype", "float32"), "training.dtype")
    except (AttributeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unusable training config: {err}") from err
    head.to(dtype=dtype)
    load_module_tensors(head, tensors, prefix, path)
    head.cost = stored_cost(config, path)
    if device is not None:
        head.to(device)
    return head.eval().requires_grad_(False)
