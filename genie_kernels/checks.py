"""Argument checks shared by the library's entry points (one wording for one mistake)."""

from __future__ import annotations

import functools

import math
import numbers

import torch
from torch import Tensor


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Refuse anything but a Python ``int`` (a ``bool`` is not one here) of at least ``low``
    (and at most ``high``, where given).

    Settings checked here end up in JSON configs and checkpoints, so a numpy integer is
    refused too: it would not serialise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")


def check_device(value, name: str = "device") -> torch.device:
    """The torch device ``value`` names; ValueError when it is not one, or is CUDA where
    CUDA is not available (torch's own errors there are an AssertionError or a list of
    every device type)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} {value!r} is not a torch device ({str(err).splitlines()[0][:80]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r}: CUDA is not available here")
    return device


def check_seed(name: str, value) -> None:
    """A seed ``torch.Generator.manual_seed`` takes: an int in [0, 2^64)."""
    check_int(name, value, 0, 2 ** 64 - 1)


def check_bool(name: str, value) -> None:
    """Refuse anything but ``True`` or ``False`` (``afs="False"`` would otherwise be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_number(name: str, value, *, above: float | None = None, at_most: float | None = None) -> float:
    """A finite real number (not a bool, not a string) ``> above`` and ``<= at_most`` where
    given; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (above is not None and value <= above) or (at_most is not None and value > at_most):
        bounds = " and ".join(b for b in ((f"> {above:g}" if above is not None else ""),
                                         (f"<= {at_most:g}" if at_most is not None else "")) if b)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return value


MAX_PARAMETERS = 10 ** 9  # 4 GB in float32: a bound on what a config may ask for before it is built


def check_parameter_count(what: str, count: int) -> None:
    """Refuse a module whose config asks for more than :data:`MAX_PARAMETERS` parameters
    (counted before anything is allocated: a crafted checkpoint must not exhaust memory)."""
    if count > MAX_PARAMETERS:
        raise ValueError(f"the {what} config asks for {count:.3g} parameters ({4 * count / 2 ** 30:.3g} GiB in "
                         f"float32); at most {MAX_PARAMETERS:.0e} are allowed")


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """The floating torch dtype called ``name`` (``"float32"`` or ``"torch.float32"``), from an
    allow-list (not ``getattr(torch, name)``, which would hand out any attribute)."""
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


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


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocator's failure: CUDA's ``torch.OutOfMemoryError`` or the CPU
    allocator's RuntimeError ("can't allocate memory")."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def names_out_of_memory(sampler):
    """Decorate a sampling entry point ``sampler(model, noise, ...)`` so that an allocator
    failure inside it says which batch did not fit and what to do, as a
    ``torch.OutOfMemoryError`` (a RuntimeError, so existing handlers still catch it)."""
    @functools.wraps(sampler)
    def wrapper(model, noise, *args, **kwargs):
        try:
            return sampler(model, noise, *args, **kwargs)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else "?"
            where = noise.device if isinstance(noise, torch.Tensor) else "its device"
            raise torch.OutOfMemoryError(
                f"{sampler.__name__}: out of memory on {where} while sampling a batch of noise shaped {shape}; "
                f"sample it in smaller batches (noise.split(n)) or on a device with more memory "
                f"(allocator: {str(err).splitlines()[0][:160]})") from err
    return wrapper
