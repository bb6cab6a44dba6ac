"""A head on disk: the checkpoint format, the identity of the model a head belongs to, and
the reading and writing that :func:`~.files.load_head`, :meth:`save_pretrained` and
:meth:`from_pretrained` share.

A checkpoint's config holds the format tag :data:`FORMAT`, the head's config, the base
model's identity (:func:`model_identity`) and, where known, the schedule, the training
settings and the head's measured cost; its tensors hold the head (``head.``), its EMA copy
(``ema.``) and, in a training checkpoint, the state a resume needs.  A head *folder*
(:meth:`save_pretrained`) holds one such checkpoint, ``head.safetensors``, and its
readable config ``head.json``, both written atomically.

This module knows no head class: the caller passes how to build one from its config, so
the heads' base class can use it without an import cycle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, load_module_tensors, read_config, save_checkpoint
from ..checks import check_device, dtype_from_name
from ..cost import RelativeCost
from ..ode.protocol import as_model

FORMAT = "genie_kernels.head/1"
FOLDER_FILE = "head.safetensors"  # the checkpoint inside a head folder (its config: head.json)

# The modules this package's models were defined in when heads began to record the identity
# of their model.  Identities keep those names, so that the heads distilled before the
# package was split into layers (the bundled MNIST head among them) still load.
IDENTITY_MODULES = {"genie_kernels.models.unet": "genie_kernels.unet",
                    "genie_kernels.models.adapters": "genie_kernels.adapters",
                    "genie_kernels.models.mixture": "genie_kernels.mixture",
                    "genie_kernels.ode.protocol": "genie_kernels.models"}

# Digests of the weights in their own precision and rounded to each half precision: a
# float16 or bfloat16 copy of a model has exactly the rounded weights of the original.
WEIGHT_DIGESTS = {"sha256": None, "sha256_float16": torch.float16, "sha256_bfloat16": torch.bfloat16}


def _qualified_name(module: str, qualname: str) -> str:
    return f"{IDENTITY_MODULES.get(module, module)}.{qualname}"


def _uncompiled(module):
    """What ``torch.compile`` wrapped (``_orig_mod``), else ``module``: a compiled model is the same model."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def model_identity(model) -> dict:
    """What a head is tied to: the model's class and SHA-256 digests of its weights and buffers.

    ``sha256`` hashes every value as float64 (so a float64 copy of float32 weights has the
    same digest); ``sha256_float16`` and ``sha256_bfloat16`` hash the values first rounded
    to that precision.  A ``.half()`` or ``.to(torch.bfloat16)`` copy of a model has
    exactly the rounded weights, so its digest at that precision equals the original's:
    :func:`identity_matches` accepts a head for it.  A ``torch.compile``\\ d model (its
    ``_orig_mod``) has the identity of the model it compiled.  A model may define
    ``identity() -> dict`` to replace all this.
    """
    custom = getattr(model, "identity", None)
    if callable(custom):
        return dict(custom())
    cls = type(model)
    identity = {"class": _qualified_name(cls.__module__, cls.__qualname__)}
    for attr in ("network", "eps_fn"):  # what an adapter wraps
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            inner = _uncompiled(inner)
            identity[attr] = _qualified_name(type(inner).__module__, type(inner).__qualname__)
        elif callable(inner):
            identity[attr] = _qualified_name(getattr(inner, "__module__", ""),
                                             getattr(inner, "__qualname__", type(inner).__qualname__))
    digests = {key: hashlib.sha256() for key in WEIGHT_DIGESTS}
    if isinstance(model, nn.Module):
        state = {name.replace("_orig_mod.", ""): tensor for name, tensor in model.state_dict().items()}
        for name, tensor in sorted(state.items()):
            value = tensor.detach().to("cpu")
            for key, rounded in WEIGHT_DIGESTS.items():
                exact = value if rounded is None or not value.is_floating_point() else value.to(rounded)
                digests[key].update(f"{name}:{tuple(value.shape)};".encode())
                digests[key].update(exact.to(torch.float64).contiguous().numpy().tobytes())
    identity.update({key: digest.hexdigest() for key, digest in digests.items()})
    return identity


def identity_matches(stored, identity: dict) -> bool:
    """Whether a head recorded for the model ``stored`` may run on the model ``identity``:
    the same classes, and one weight digest (:data:`WEIGHT_DIGESTS`) both record that agrees
    (an identity from before the rounded digests has only ``sha256``)."""
    if not isinstance(stored, dict):
        return False
    names = [key for key in set(stored) | set(identity) if key not in WEIGHT_DIGESTS]
    if any(stored.get(key) != identity.get(key) for key in names):
        return False
    shared = [key for key in WEIGHT_DIGESTS if key in stored and key in identity]
    if not shared:  # a model's own identity() without digests: compared as a whole
        return stored == identity
    return any(stored[key] == identity[key] for key in shared)


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


def checkpoint_path(path) -> Path:
    """A head checkpoint file, or the ``head.safetensors`` inside a head folder."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"a head path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    return path / FOLDER_FILE if path.is_dir() else path


def read_head(path, build: Callable[[dict], nn.Module], model=None, use_ema: bool = True, device=None) -> nn.Module:
    """Load the head of checkpoint (or folder) ``path``, built by ``build(config["head"])``.

    With ``model`` the recorded base model must match it (:func:`identity_matches`).  The
    head takes the stored weights' dtype (``dtype``, or a training run's ``training.dtype``),
    its ``cost`` and ``base_model`` (the recorded identity).
    """
    if device is not None:
        device = check_device(device)
    path = checkpoint_path(path)
    config = read_config(path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a head checkpoint (format {config.get('format')!r}, expected {FORMAT!r})")
    if model is not None:
        identity = model_identity(as_model(model))
        if not identity_matches(config.get("base_model"), identity):
            raise CheckpointError(f"the head in {path} was distilled for the model {config.get('base_model')}, "
                                  f"not for the given one {identity}")
    tensors, config = load_checkpoint(path)
    try:
        head = build(config["head"])
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} has no head config ({err})") from err
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has an unusable head config: {err}") from err
    prefix = "ema." if use_ema and config.get("ema") else "head."
    try:
        if "dtype" in config:
            dtype = dtype_from_name(config["dtype"], "dtype")
        else:
            dtype = dtype_from_name((config.get("training") or {}).get("dtype", "float32"), "training.dtype")
    except (AttributeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unusable training config: {err}") from err
    head.to(dtype=dtype)
    load_module_tensors(head, tensors, prefix, path)
    head.cost = stored_cost(config, path)
    head.base_model = config.get("base_model")
    if device is not None:
        head.to(device)
    return head.eval().requires_grad_(False)


def write_head_folder(head: nn.Module, folder, model=None) -> Path:
    """Save ``head`` as a folder: ``head.safetensors`` (its weights, with the config inside)
    and ``head.json`` (the config), each written atomically.  The recorded base model is
    ``model``'s identity, else the one the head was loaded or distilled with
    (``head.base_model``), else none (the head then loads only without ``model=``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained takes a folder")
    base_model = model_identity(as_model(model)) if model is not None else getattr(head, "base_model", None)
    config = {"format": FORMAT, "head": head.config(), "base_model": base_model, "ema": False,
              "dtype": str(next(head.parameters()).dtype).replace("torch.", "")}
    if getattr(head, "cost", None) is not None:
        config["cost"] = head.cost.config()
    tensors = {f"head.{name}": value for name, value in head.state_dict().items()}
    return save_checkpoint(folder / FOLDER_FILE, tensors, config).parent
