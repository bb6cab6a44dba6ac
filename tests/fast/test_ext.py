"""The C++/CUDA op genie_cpp::taylor_update equals taylor_update_reference.

The extension is loaded by a module fixture: without a prebuilt genie_kernels._C the
first test JIT-builds it (about a minute on 2 cores, cached in ~/.cache/torch_extensions
for later runs).  Where it can be neither imported nor built, every test here is skipped
with the reason.
"""

import pytest
import torch

from genie_kernels.fast import ext
from genie_kernels.fast.update import taylor_update_reference

MODES = ["ddim", "genie", "ab2"]
GAMMAS = [152.2, 40.0, 3.1, 0.7, 0.0105]  # a 4-step γ grid from γ_max of a VP schedule
SHAPES = [(1, 3, 5, 7), (3, 2, 17, 9), (2, 6, 33), (1, 1, 1, 1),
          (3, 5, 71, 67)]  # 71,355 elements: two parallel_for chunks whose boundary falls inside a sample
DTYPES = [  # (x̄, ε and aux)
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float64, torch.float64), (torch.float64, torch.float16), (torch.float32, torch.float64),
]


@pytest.fixture(scope="module", autouse=True)
def ops():
    try:
        return ext.load()  # the JIT build, if any, happens here (first test of the module)
    except ext.ExtensionUnavailable as exc:
        pytest.skip(f"the C++ extension is unavailable: {exc}")


def make_inputs(shape, xbar_dtype, eps_dtype, mode, seed=0, device="cpu", offset=0, gammas_dtype=torch.float64):
    """Random inputs; ``offset`` > 0 puts x̄, ε and aux that many elements into a buffer,
    so they are contiguous but not 16-byte aligned."""
    gen = torch.Generator().manual_seed(seed)
    b, c, *rest = shape

    def rand(*size, scale=1.0, dtype):
        n = torch.Size(size).numel()
        flat = torch.randn(n + offset, generator=gen, dtype=torch.float64) * scale
        return flat.to(device=device, dtype=dtype)[offset:].view(size)

    xbar = rand(*shape, scale=5.0, dtype=xbar_dtype)
    eps = rand(*shape, dtype=eps_dtype)
    aux = {"ddim": None, "genie": rand(b, 3 * c, *rest, dtype=eps_dtype), "ab2": rand(*shape, dtype=eps_dtype)}[mode]
    gammas = torch.tensor(GAMMAS, dtype=gammas_dtype, device=device)
    return xbar, eps, aux, gammas


def run_op(xbar, eps, aux, gammas, step, mode):
    return torch.ops.genie_cpp.taylor_update(xbar, eps, aux, gammas, step, mode)


def assert_within_budget(got, ref):
    """At most one ulp of the output dtype, relative to max(|ref|, 1).

    The kernels evaluate the reference's formula operation for operation, in the same order
    and the same compute dtype (γ differences and the 1/sqrt(1+γ²) scale in float64, then
    cast), and are built without FMA contraction, so the results are expected to be
    bitwise equal (they are, on the CPU).  What could still differ is rounding order alone:
    a compiler contracting a*b+c into an FMA, or a device's float64 rsqrt in the reference
    versus 1/sqrt in the kernel, moves the float32/float64 result by 1-2 ulp of the compute
    dtype, and rounding that to the storage dtype by at most one ulp of it.  One ulp of a
    value v is at most eps(dtype)·|v|; max(|ref|, 1) keeps results near zero (after
    cancellation) from asking for less than the absolute rounding error of the terms.
    A lost term is far outside this: see test_budget_catches_a_dropped_derivative.
    """
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.device == ref.device
    allowance = torch.finfo(ref.dtype).eps * ref.double().abs().clamp_min(1.0)
    error = (got.double() - ref.double()).abs()
    worst = (error / allowance).max().item() if error.numel() else 0.0
    assert (error <= allowance).all(), f"error up to {worst:.3g} × the budget ({ref.dtype})"


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_op_matches_reference(shape, mode, dtypes, step):
    xbar, eps, aux, gammas = make_inputs(shape, *dtypes, mode, seed=step)
    got = run_op(xbar, eps, aux, gammas, step, mode)
    want = taylor_update_reference(xbar, eps, gammas, step, mode, aux)
    for g, w in zip(got, want):
        assert_within_budget(g, w)
    assert got[0].dtype == xbar.dtype and got[1].dtype == eps.dtype


BITWISE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from genie_kernels.fast import ext
from genie_kernels.fast.update import taylor_update_reference
from test_ext import DTYPES, MODES, make_inputs, run_op
ext.load()
differ = []
for mode in MODES:
    for dtypes in DTYPES:
        xbar, eps, aux, gammas = make_inputs((3, 5, 71, 67), *dtypes, mode, seed=4)
        got, want = run_op(xbar, eps, aux, gammas, 2, mode), taylor_update_reference(xbar, eps, gammas, 2, mode, aux)
        if not all(torch.equal(g, w) for g, w in zip(got, want)):
            differ.append((mode, str(dtypes)))
print("differ:", differ)
"""


@pytest.mark.parametrize("loop", ["AVX2 where the CPU has it", "baseline"])
def test_cpu_loops_equal_the_reference_bit_for_bit(loop):
    """The CPU op evaluates the reference's formula operation for operation without FMA, in both
    of its compiled loops (AVX2 where the CPU has it, and the baseline one that
    GENIE_KERNELS_NO_AVX2=1 selects), so its results are the reference's, bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env.pop("GENIE_KERNELS_NO_AVX2", None)
    if loop == "baseline":
        env["GENIE_KERNELS_NO_AVX2"] = "1"
    script = BITWISE_SCRIPT.format(tests=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "differ: []" in run.stdout, run.stdout


@pytest.mark.parametrize("mode", MODES)
def test_cpu_op_takes_a_float32_gamma_grid_and_an_empty_batch(mode):
    xbar, eps, aux, gammas = make_inputs((2, 3, 9, 5), torch.float32, torch.float16, mode, gammas_dtype=torch.float32)
    for g, w in zip(run_op(xbar, eps, aux, gammas, 2, mode), taylor_update_reference(xbar, eps, gammas, 2, mode, aux)):
        assert_within_budget(g, w)
    xbar, eps, aux, gammas = make_inputs((0, 3, 4), torch.float32, torch.float32, mode)
    new_xbar, new_x = run_op(xbar, eps, aux, gammas, 2, mode)
    assert new_xbar.shape == new_x.shape == (0, 3, 4)


@pytest.mark.parametrize("mode", ["genie", "ab2"])
def test_budget_catches_a_dropped_derivative(mode):
    """The tolerance above can fail: the update without its D term (plain DDIM) is far out."""
    for step in (1, 3):
        xbar, eps, aux, gammas = make_inputs((2, 6, 33), torch.float32, torch.float16, mode, seed=step)
        want = taylor_update_reference(xbar, eps, gammas, step, mode, aux)
        without_d = run_op(xbar, eps, None, gammas, step, "ddim")
        for g, w in zip(without_d, want):
            with pytest.raises(AssertionError):
                assert_within_budget(g, w)


def test_wrapper_and_backends():
    import genie_kernels

    xbar, eps, aux, gammas = make_inputs((2, 3, 4, 4), torch.float32, torch.float32, "genie")
    for g, w in zip(ext.taylor_update_cpp(xbar, eps, gammas, 1, "genie", aux), run_op(xbar, eps, aux, gammas, 1, "genie")):
        assert torch.equal(g, w)
    assert ext.status() == (True, "loaded")
    assert genie_kernels.backends()["cpp"] == (True, "loaded")
    assert genie_kernels.backends()["reference"][0]


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    xbar, eps, aux, gammas = make_inputs((2, 3, 4, 5), torch.float32, torch.float32, mode)
    torch.library.opcheck(torch.ops.genie_cpp.taylor_update.default, (xbar, eps, aux, gammas, 2, mode))


def test_bad_input_raises_runtime_error_naming_the_problem():
    xbar, eps, aux, gammas = make_inputs((1, 3, 4, 4), torch.float32, torch.float32, "genie")
    bad = [
        ((xbar, eps, eps, gammas, 1, "genie"), "head output k of shape \\[1, 9, 4, 4\\]"),
        ((xbar, eps, None, gammas, 1, "genie"), "head output k"),
        ((xbar, eps, aux, gammas, 4, "genie"), "step 4 is outside the γ grid of 5 points"),
        ((xbar, eps, aux, gammas, -1, "ddim"), "outside the γ grid"),
        ((xbar, eps, eps, gammas, 0, "ab2"), "previous step"),
        ((xbar, eps, aux, gammas, 1, "ab2"), "previous eps"),
        ((xbar, eps, None, gammas, 1, "euler"), "unknown update mode 'euler'"),
        ((xbar.transpose(2, 3), eps.transpose(2, 3), None, gammas, 1, "ddim"), "contiguous"),
        ((xbar, eps[:, :2], None, gammas, 1, "ddim"), "eps has shape"),
        ((xbar.half(), eps, None, gammas, 1, "ddim"), "x̄ must be float32 or float64"),
        ((xbar, eps, aux.half(), gammas, 1, "genie"), "aux must have eps's dtype"),
        ((xbar, eps, None, gammas.long(), 1, "ddim"), "gammas must be float64 or float32"),
        ((xbar, eps, None, gammas[None], 1, "ddim"), "1-D γ grid"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            run_op(*args)


# --- CUDA -------------------------------------------------------------------------------

@pytest.fixture
def cuda_kernel():
    """Skips a test unless the loaded extension has its CUDA kernel and CUDA is available."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("genie_cpp::taylor_update", "CUDA"):
        pytest.skip("the extension was built without its CUDA kernel (no CUDA toolkit at build time)")


CUDA_SHAPES = [
    (1, 3, 5, 7), (3, 2, 17, 9), (2, 6, 33),
    (1, 1, 1003),       # not a multiple of the vector width: vectors plus a scalar tail
    (3, 2, 4, 67),      # 536 elements per sample: genie takes the vector path across samples
    (2, 16, 300, 301),  # 2.9 M elements: more than one grid-stride pass
]


@pytest.mark.usefixtures("cuda_kernel")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_op_matches_reference(shape, mode, eps_dtype, offset):
    xbar, eps, aux, gammas = make_inputs(shape, torch.float32, eps_dtype, mode, seed=3, device="cuda", offset=offset)
    if offset:
        assert eps.data_ptr() % 16 and xbar.data_ptr() % 16
    for step in (1, 3):
        got = run_op(xbar, eps, aux, gammas, step, mode)
        want = taylor_update_reference(xbar, eps, gammas, step, mode, aux)
        for g, w in zip(got, want):
            assert_within_budget(g, w)


@pytest.mark.usefixtures("cuda_kernel")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_op_float64_equals_cpu_op(mode):
    xbar, eps, aux, gammas = make_inputs((2, 3, 17, 5), torch.float64, torch.float64, mode, seed=4)
    cpu = run_op(xbar, eps, aux, gammas, 2, mode)
    cuda = run_op(*(None if t is None else t.cuda() for t in (xbar, eps, aux, gammas)), 2, mode)
    for g, w in zip(cuda, cpu):
        assert_within_budget(g.cpu(), w)


@pytest.mark.usefixtures("cuda_kernel")
@pytest.mark.parametrize("gammas_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_capture_and_replay(mode, gammas_dtype):
    shape, step = (2, 4, 16, 16), 2
    inputs = make_inputs(shape, torch.float32, torch.float16, mode, seed=5, device="cuda", gammas_dtype=gammas_dtype)
    xbar, eps, aux, gammas = inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        run_op(xbar, eps, aux, gammas, step, mode)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_op(xbar, eps, aux, gammas, step, mode)

    # New values in the captured tensors, γ grid included: the replay must read them all
    # on the device (γ is not baked into the graph).
    fresh = make_inputs(shape, torch.float32, torch.float16, mode, seed=6, device="cuda", gammas_dtype=gammas_dtype)
    fresh[3].mul_(0.5)
    for dst, src in zip(inputs, fresh):
        if dst is not None:
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = run_op(*fresh, step, mode)
    want = taylor_update_reference(fresh[0], fresh[1], fresh[3], step, mode, fresh[2])
    for c, e, w in zip(captured, eager, want):
        assert torch.equal(c, e)
        assert_within_budget(c, w)


# --- the CUDA source compiles (no GPU needed) -------------------------------------------------


@pytest.mark.slow
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """Compile-only check of csrc/taylor_update_cuda.cu where nvcc exists (about a minute).

    A CPU build of torch ships the c10/cuda headers but not the CMake-generated
    ``c10/cuda/impl/cuda_cmake_macros.h``; a stub of it stands in.  The object is not linked.
    """
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    if torch.version.cuda:
        pytest.skip("a CUDA build of torch compiles the .cu for real when it builds the extension")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{tmp_path / 'stub'}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    command = [nvcc, "-c", str(ext.CUDA_SOURCE), "-o", str(tmp_path / "taylor_update_cuda.o"), "-std=c++20",
               "-arch=sm_90", *ext.CUDA_FLAGS, *includes]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 0, "\n".join(errors[:20]) or result.stderr[-3000:]
    assert (tmp_path / "taylor_update_cuda.o").stat().st_size > 0


@pytest.mark.parametrize("load", ["slow", "quick", "failing"])
def test_jit_build_notice_shows_only_while_a_slow_load_runs(load, monkeypatch):
    """The notice is a timer: a slow load (ninja compiling) outlasts it; a quick or failing
    one cancels it.  Events, not sleeps, order the threads."""
    import threading

    from torch.utils import cpp_extension

    printed, timers = threading.Event(), []

    class RecordedTimer(threading.Timer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            timers.append(self)

    def stub_load(**kwargs):
        if load == "slow":
            assert printed.wait(60), "the notice did not show during a slow load"
        elif load == "failing":
            raise RuntimeError("ninja failed")

    monkeypatch.setattr(ext.threading, "Timer", RecordedTimer)
    monkeypatch.setattr(ext.LOGGER, "warning", lambda *args, **kwargs: printed.set())  # the notice is logged
    monkeypatch.setattr(ext, "BUILD_NOTICE_AFTER_S", 0.0 if load == "slow" else 3600.0)
    monkeypatch.setattr(cpp_extension, "load", stub_load)
    if load == "failing":
        with pytest.raises(RuntimeError, match="ninja failed"):
            ext._jit_build()
    else:
        ext._jit_build()
    (timer,) = timers
    timer.join(5)
    assert not timer.is_alive() and printed.is_set() == (load == "slow")


def test_a_meta_tensor_beside_cpu_tensors_is_refused_not_allocated():
    """Issue 22 item 5: the dispatcher sends such a call to the fake kernel, which returned
    an uninitialised CPU tensor without the C++ op's device check."""
    xbar, eps, aux, gammas = make_inputs((1, 3, 4, 4), torch.float32, torch.float32, "genie")
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.genie_cpp.taylor_update(xbar, eps.to("meta"), aux, gammas, 1, "genie")
    new_xbar, new_x = torch.ops.genie_cpp.taylor_update(*(t.to("meta") for t in (xbar, eps, aux, gammas)), 1, "genie")
    assert new_xbar.device.type == "meta" and new_x.shape == eps.shape


def test_a_gradient_through_the_cpp_op_is_refused_as_through_the_triton_ops():
    """Issue 22 item 5: backward ran and left x.grad None."""
    xbar, eps, aux, gammas = make_inputs((1, 3, 4, 4), torch.float32, torch.float32, "genie")
    xbar.requires_grad_(True)
    new_xbar, _ = torch.ops.genie_cpp.taylor_update(xbar, eps, aux, gammas, 1, "genie")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        new_xbar.sum().backward()


def test_status_says_when_a_jit_build_is_cached(monkeypatch, tmp_path):
    """Issue 22 item 12: gk.backends() said "can be JIT-built" after the build was cached."""
    if not ext._jit_prerequisites()[0]:
        pytest.skip("no compiler or ninja here")
    monkeypatch.setattr(ext, "_cached_build", lambda: tmp_path / f"{ext.JIT_NAME}.so")
    assert ext._jit_prerequisites() == (True, f"JIT-built and cached in {tmp_path} (loads in about a second; "
                                              "rebuilt if the sources changed)")
    monkeypatch.setattr(ext, "_cached_build", lambda: None)
    assert ext._jit_prerequisites() == (True, "can be JIT-built (compiler found)")
