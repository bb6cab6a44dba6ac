"""The optional C++/CUDA extension: ``torch.ops.genie_cpp.taylor_update``.

The same fused Taylor update as :func:`genie_kernels.fast.update.taylor_update` (and
arithmetic identical to ``taylor_update_reference``), written as a torch custom op in
``csrc/``: a CPU kernel (``at::parallel_for``) and, in CUDA builds, a CUDA kernel that
reads γ on the device (no host sync, so it can be captured in a CUDA graph).

:func:`load` finds the extension in this order:

1. the prebuilt module ``genie_kernels._C`` (``pip install --no-build-isolation -e .`` with
   torch importable builds it; see setup.py);
2. a JIT build with :func:`torch.utils.cpp_extension.load` (about a minute on 2 cores,
   cached under ``~/.cache/torch_extensions`` and reused by later processes), unless
   ``GENIE_KERNELS_NO_JIT`` is set.

Op schema::

    genie_cpp::taylor_update(Tensor xbar, Tensor eps, Tensor? aux, Tensor gammas, int step, str mode)
        -> (Tensor, Tensor)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ExtensionUnavailable", "load", "status", "taylor_update_cpp"]

# The C++ sources sit at the repository root, next to the package: that is where an
# editable install (or running from a checkout) finds them.  A regular wheel does not ship
# csrc/, so there only a prebuilt genie_kernels._C can be used.
CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPP_SOURCE = CSRC / "taylor_update.cpp"
CUDA_SOURCE = CSRC / "taylor_update_cuda.cu"

JIT_NAME = "genie_kernels_cpp"
NO_JIT = "no prebuilt genie_kernels._C and JIT builds are off (GENIE_KERNELS_NO_JIT)"
# No fast math anywhere, and no FMA contraction: the kernels must match
# taylor_update_reference operation for operation.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LD_FLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3", "--fmad=false"]
BUILD_NOTICE_AFTER_S = 2.0  # a JIT load slower than this is a build: say so (a logged warning)
LOGGER = logging.getLogger(__name__)


class ExtensionUnavailable(RuntimeError):
    """The C++ extension can neither be imported nor built; ``str(exc)`` says why."""


_lock = threading.Lock()
_loaded: dict = {}  # "ns" -> torch.ops.genie_cpp, "origin" -> "prebuilt" | "jit"
_build_failure: list[str] = []  # the reason of a failed JIT build (not retried in this process)
_fake_registered = False


def _cuda_build() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and CUDA_HOME is not None


def _first_error_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line
    return lines[0] if lines else type(exc).__name__


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    from .update import _check_for_kernel

    @torch.library.register_fake("genie_cpp::taylor_update")
    def _(xbar: Tensor, eps: Tensor, aux: Tensor | None, gammas: Tensor, step: int, mode: str):
        # The dispatcher comes here whenever one tensor is on "meta" (or fake), so the C++
        # op's checks never run: make the same ones (a meta eps beside a CPU x̄ is refused).
        _check_for_kernel(xbar, eps, aux, gammas, step, mode)
        # Same allocation as the kernels (at::empty_like), so strides agree.
        return torch.empty_like(xbar), torch.empty_like(eps)

    def no_backward(ctx, *grads):
        raise RuntimeError("Trying to backward through genie_cpp::taylor_update but no autograd formula was "
                           "registered: the fused update is for sampling (use taylor_update_reference to "
                           "differentiate)")

    # Without it backward runs and the gradient is silently None (PyTorch's fallback only warns).
    torch.library.register_autograd("genie_cpp::taylor_update", no_backward)
    _fake_registered = True


def _import_prebuilt() -> bool:
    try:
        importlib.import_module("genie_kernels._C")
    except ImportError:
        return False
    return hasattr(torch.ops.genie_cpp, "taylor_update")


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = [str(CPP_SOURCE)] + ([str(CUDA_SOURCE)] if _cuda_build() else [])
    # An up-to-date earlier build loads in well under a second: the notice shows only when ninja compiles.
    message = "genie_kernels: building the C++ extension (once, about a minute; cached afterwards)…"
    notice = threading.Timer(BUILD_NOTICE_AFTER_S, LOGGER.warning, [message])  # warning: shown unconfigured
    notice.daemon = True
    notice.start()
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=sources,
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            extra_cuda_cflags=CUDA_FLAGS,
            is_python_module=False,
            verbose=False,
        )
    finally:
        notice.cancel()


def load(build: bool = True):
    """The extension's op namespace ``torch.ops.genie_cpp``; JIT-builds it if needed and allowed.

    Raises :class:`ExtensionUnavailable` with the reason when it can be neither imported nor
    built.  Loading (and a failed build) is remembered for the rest of the process.
    """
    with _lock:
        if "ns" in _loaded:
            return _loaded["ns"]
        if _build_failure:
            raise ExtensionUnavailable(_build_failure[0])
        if _import_prebuilt():
            origin = "prebuilt"
        else:
            if not build:
                raise ExtensionUnavailable("no prebuilt genie_kernels._C and load(build=False) was asked")
            if os.environ.get("GENIE_KERNELS_NO_JIT"):
                raise ExtensionUnavailable(NO_JIT)
            available, reason = _jit_prerequisites()
            if not available:
                _build_failure.append(reason)
                raise ExtensionUnavailable(reason)
            try:
                _jit_build()
            except Exception as exc:  # compiler errors, missing headers, ninja failures...
                _build_failure.append(f"build failed: {_first_error_line(exc)}")
                raise ExtensionUnavailable(_build_failure[0]) from exc
            origin = "jit"
        _register_fake()
        _loaded.update(ns=torch.ops.genie_cpp, origin=origin)
        return _loaded["ns"]


def _jit_prerequisites() -> tuple[bool, str]:
    from torch.utils import cpp_extension

    if not CPP_SOURCE.is_file():
        return False, f"no prebuilt genie_kernels._C and the C++ sources are not shipped with this install ({CSRC})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler ({compiler!r} not found)"
    if not cpp_extension.is_ninja_available():
        return False, "no ninja (pip install ninja)"
    cached = _cached_build()
    if cached is not None:
        return True, f"JIT-built and cached in {cached.parent} (loads in about a second; rebuilt if the sources changed)"
    return True, "can be JIT-built (compiler found)"


def _cached_build():
    """The shared library of an earlier JIT build in torch's extension cache, or None."""
    from torch.utils import cpp_extension

    try:
        library = Path(cpp_extension._get_build_directory(JIT_NAME, verbose=False)) / f"{JIT_NAME}.so"
    except (OSError, RuntimeError, AttributeError):  # a private helper of torch: may change
        return None
    return library if library.is_file() else None


def status() -> tuple[bool, str]:
    """``(available, reason)`` without building anything.

    reason is "loaded", "prebuilt", "JIT-built and cached in …", "can be JIT-built
    (compiler found)", or why not.
    """
    if "ns" in _loaded:
        return True, "loaded"
    if _build_failure:
        return False, _build_failure[0]
    if importlib.util.find_spec("genie_kernels._C") is not None:
        return True, "prebuilt"
    if os.environ.get("GENIE_KERNELS_NO_JIT"):
        return False, NO_JIT
    return _jit_prerequisites()


def taylor_update_cpp(
    xbar: Tensor, eps: Tensor, gammas: Tensor, step: int, mode: str = "genie", aux: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`genie_kernels.fast.update.taylor_update` on the C++/CUDA op; returns ``(x̄_{n+1}, x_{n+1})``.

    Runs on the CPU and (in CUDA builds) on CUDA devices.  ``aux`` is the head output k (3C
    channels) for ``"genie"`` and ε_{n−1} for ``"ab2"``, in eps's dtype.  Bad input raises
    ``RuntimeError``; a missing extension raises :class:`ExtensionUnavailable`.
    """
    ns = _loaded.get("ns") or load()  # no lock once loaded: this runs once per solver step
    return ns.taylor_update(xbar, eps, aux, gammas, step, mode)
