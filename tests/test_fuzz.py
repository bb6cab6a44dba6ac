"""Fuzzing the public entry points (issue 22): random shapes, dtypes, devices, strides and
values at ``sample``, the solvers, the heads, the Triton ops and the C++ op.  Each call
either raises a ValueError or TypeError whose message names the argument at fault, or
returns what the reference returns.  Bounded: few examples each, no deadline; the whole
module takes well under a minute on a 2-core CPU (Triton runs in its interpreter)."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import genie_kernels as gk  # noqa: E402
from genie_kernels.fast import triton_status  # noqa: E402
from genie_kernels.fast.group_norm import group_norm_silu_reference  # noqa: E402
from genie_kernels.fast.update import taylor_update_reference  # noqa: E402
from genie_kernels.ode.solvers import SOLVERS  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool,
          torch.complex64]
TRITON, _ = triton_status("cpu")


def clear(err: BaseException, names) -> bool:
    """The message names one of ``names`` (the arguments that can be at fault)."""
    return isinstance(err, (ValueError, TypeError)) and any(name in str(err) for name in names)


def tensor(shape, dtype, values, transposed=False):
    t = torch.tensor(values[: math.prod(shape)] + [0.5] * max(0, math.prod(shape) - len(values)),
                     dtype=torch.float64).reshape(shape)
    t = t.to(dtype)
    return t.transpose(-1, -2) if transposed and t.dim() >= 2 else t


finite = st.floats(-4, 4, allow_nan=False)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)


@st.composite
def update_args(draw):
    shape = draw(shapes)
    mode = draw(st.sampled_from(["ddim", "genie", "ab2", "euler"]))
    xbar = tensor(shape, draw(st.sampled_from(DTYPES)), draw(st.lists(finite, max_size=8)),
                  draw(st.booleans()))
    eps_shape = shape if draw(st.integers(0, 4)) else draw(shapes)
    eps = tensor(eps_shape, draw(st.sampled_from(DTYPES)), draw(st.lists(finite, max_size=8)))
    aux = None
    if mode in ("genie", "ab2") and draw(st.integers(0, 4)):
        aux_shape = (shape[0], 3 * shape[1], *shape[2:]) if mode == "genie" and len(shape) >= 2 else shape
        aux = tensor(aux_shape, eps.dtype if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES)), [0.1])
    gammas = tensor((draw(st.integers(0, 5)),), draw(st.sampled_from([torch.float64, torch.float32, torch.int64])),
                    [80.0, 20.0, 3.0, 0.5, 0.01])
    step = draw(st.one_of(st.integers(-2, 5), st.just(1.0), st.just(True)))
    return xbar, eps, aux, gammas, step, mode


UPDATE_NAMES = ("x̄", "eps", "aux", "gammas", "step", "mode", "head output", "γ grid", "previous", "contiguous",
                "device")


def reference_or_error(args):
    try:
        xbar, eps, aux, gammas, step, mode = args
        return taylor_update_reference(xbar, eps, gammas, step, mode, aux), None
    except (ValueError, TypeError) as err:
        assert clear(err, UPDATE_NAMES), repr(err)
        return None, err


@pytest.mark.skipif(not TRITON, reason="triton is not usable here")
@FUZZ
@given(update_args())
def test_the_triton_update_names_its_argument_or_equals_the_reference(args):
    from genie_kernels.fast.update import taylor_update

    want, _ = reference_or_error(args)
    xbar, eps, aux, gammas, step, mode = args
    try:
        got = taylor_update(xbar, eps, gammas, step, mode, aux)
    except (ValueError, TypeError) as err:
        assert clear(err, UPDATE_NAMES), repr(err)
        return
    assert want is not None, "the kernel ran where the reference refused"
    tol = 1e-12 if xbar.dtype == torch.float64 and eps.dtype == torch.float64 else 1e-2
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True)


@FUZZ
@given(update_args())
def test_the_cpp_op_names_its_argument_or_equals_the_reference(cpp_extension, args):
    want, _ = reference_or_error(args)
    xbar, eps, aux, gammas, step, mode = args
    if isinstance(step, (float, bool)):
        return  # the op's schema refuses a float before any kernel, and reads a bool as an int
    try:
        got = torch.ops.genie_cpp.taylor_update(xbar, eps, aux, gammas, step, mode)
    except RuntimeError as err:  # TORCH_CHECK's RuntimeError, naming the argument
        assert any(name in str(err) for name in UPDATE_NAMES + ("float32", "float64")), repr(err)
        return
    assert want is not None, f"the C++ op ran where the reference refused: {args}"
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = 0 if eps.dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True)


@st.composite
def group_norm_args(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple))
    h = tensor(shape, draw(st.sampled_from(DTYPES)), draw(st.lists(finite, max_size=16)), draw(st.booleans()))
    channels = shape[1] if len(shape) >= 2 else 2
    weight = tensor((channels if draw(st.integers(0, 4)) else channels + 1,), draw(st.sampled_from(DTYPES[:4])), [1.0])
    groups = draw(st.one_of(st.integers(-2, 5), st.just(2.0)))
    return h, weight, groups


GROUP_NORM_NAMES = ("groups", "h ", "weight", "shift", "input", "channels", "contiguous", "layout", "device")


@pytest.mark.skipif(not TRITON, reason="triton is not usable here")
@FUZZ
@given(group_norm_args())
def test_group_norm_silu_names_its_argument_or_equals_the_reference(args):
    from genie_kernels.fast.group_norm import group_norm_silu

    h, weight, groups = args
    try:
        want = group_norm_silu_reference(h, weight, weight, groups)[0]
    except (ValueError, TypeError) as err:
        assert clear(err, GROUP_NORM_NAMES), repr(err)
        want = None
    try:
        got = group_norm_silu(h, weight, weight, groups)[0]
    except (ValueError, TypeError) as err:
        assert clear(err, GROUP_NORM_NAMES), repr(err)
        return
    assert want is not None, "the kernel ran where the reference refused"
    torch.testing.assert_close(got.double(), want.double(), atol=2e-2, rtol=2e-2, equal_nan=True)


SAMPLE_NAMES = ("noise", "steps", "solver", "head", "afs", "denoise", "striding", "t_end", "backend", "return_nfe",
                "check_finite", "ε", "model", "x of shape")


@st.composite
def sample_args(draw):
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple))
    noise = tensor(shape, draw(st.sampled_from(DTYPES)), draw(st.lists(finite, max_size=8)), draw(st.booleans()))
    options = dict(
        solver=draw(st.sampled_from(["ddim", "genie_exact", "ab2", "ab3", "genie", "euler"])),
        steps=draw(st.one_of(st.integers(-1, 4), st.just(2.0), st.just(True), st.just(10 ** 9))),
        afs=draw(st.sampled_from([False, True, "False", 0])),
        denoise=draw(st.sampled_from([False, True, "no"])),
        striding=draw(st.sampled_from(["quadratic", "uniform", "logsnr", "cubic"])),
        t_end=draw(st.sampled_from([1e-3, 0.5, 0.0, 1.5, math.nan, "x"])),
    )
    return noise, options


@FUZZ
@given(sample_args())
def test_sample_names_its_argument_or_equals_the_reference_solver(schedule, args):
    noise, options = args
    width = max(1, noise.shape[-1]) if noise.dim() >= 2 else 2
    mix = gk.GaussianMixture([1.0, 2.0], [[0.0] * width, [1.0] * width], [0.5, 1.0], schedule=schedule)
    try:
        got = gk.sample(mix, noise, **options)
    except (ValueError, TypeError) as err:
        assert clear(err, SAMPLE_NAMES), repr(err)
        return
    from genie_kernels.ode.schedules import time_grid

    ts = time_grid(schedule, options["steps"], options["t_end"], options["striding"])
    want = SOLVERS[options["solver"]](mix, noise, ts, schedule, afs=options["afs"],
                                         denoise=options["denoise"]).sample
    assert torch.equal(got, want)
