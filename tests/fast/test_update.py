"""The fused Taylor-update kernel equals its PyTorch twin (and the float64 maths)."""

import pytest
import torch

from genie_kernels.fast import triton_status

usable, reason = triton_status("cuda" if torch.cuda.is_available() else "cpu")
if not usable:
    pytest.skip(reason, allow_module_level=True)

from genie_kernels.fast.update import taylor_update, taylor_update_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 3, 5, 7), (2, 4, 9, 1), (3, 6, 11, 13), (1, 1, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_inputs(shape, dtype, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c, *rest = shape
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    xbar = (rand(*shape) * 5).float()  # the state stays float32 for low-precision models
    if dtype == torch.float64:
        xbar = xbar.double()
    eps = rand(*shape).to(dtype)
    aux = {"ddim": None, "genie": rand(b, 3 * c, *rest).to(dtype), "ab2": rand(*shape).to(dtype)}[mode]
    gammas = torch.tensor([152.2, 40.0, 3.1, 0.7, 0.0105], dtype=torch.float64)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return move(xbar), move(eps), move(aux), move(gammas)


@pytest.mark.parametrize("mode", ["ddim", "genie", "ab2"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1, 3])
def test_update_kernel_matches_reference_within_error_budget(mode, shape, dtype, step):
    xbar, eps, aux, gammas = make_inputs(shape, dtype, mode, seed=step)
    got = taylor_update(xbar, eps, gammas, step, mode, aux)
    same_dtype = taylor_update_reference(xbar, eps, gammas, step, mode, aux)
    exact = taylor_update_reference(xbar.double(), eps.double(), gammas, step, mode, None if aux is None else aux.double())
    for kernel_out, ref_out, exact_out in zip(got, same_dtype, exact):
        assert kernel_out.dtype == ref_out.dtype and kernel_out.shape == ref_out.shape
        allowance = error_budget(exact_out, kernel_out.dtype)
        assert ((ref_out.double() - exact_out).abs() <= allowance).all()  # the budget holds for PyTorch
        assert ((kernel_out.double() - exact_out).abs() <= allowance).all()


def error_budget(exact, dtype):
    """Per element: twice the best rounding error of the output dtype (two half-ulps, which
    also covers the CPU interpreter's truncating float32 → bfloat16 cast), plus the float32
    (float64) arithmetic error on the scale of the step's terms."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.finfo(dtype).eps * exact.abs() + 16 * torch.finfo(compute).eps * exact.abs().max()


def test_update_kernel_rejects_bad_input():
    xbar, eps, aux, gammas = make_inputs((1, 3, 4, 4), torch.float32, "genie")
    with pytest.raises(ValueError, match="head output k"):
        taylor_update(xbar, eps, gammas, 1, "genie", eps)
    with pytest.raises(ValueError, match="outside the γ grid"):
        taylor_update(xbar, eps, gammas, 4, "genie", aux)
    with pytest.raises(ValueError, match="previous step"):
        taylor_update(xbar, eps, gammas, 0, "ab2", eps)
    with pytest.raises(ValueError, match="unknown update mode"):
        taylor_update(xbar, eps, gammas, 1, "euler")
    with pytest.raises(ValueError, match="contiguous"):
        taylor_update(xbar.transpose(2, 3), eps.transpose(2, 3), gammas, 1, "ddim")


def test_update_is_a_registered_custom_op():
    xbar, eps, aux, gammas = make_inputs((2, 3, 4, 4), torch.float32, "genie")
    # The CPU interpreter would run the kernel on fake tensors, so the fake-tensor check needs CUDA.
    checks = ("test_schema", "test_faketensor") if DEVICE == "cuda" else ("test_schema",)
    torch.library.opcheck(torch.ops.genie_kernels.taylor_update.default, (xbar, eps, aux, gammas, 2, "genie"), test_utils=checks)


def test_the_op_called_directly_checks_its_input_too():
    xbar, eps, aux, gammas = make_inputs((2, 3, 4, 4), torch.float32, "genie")
    with pytest.raises(ValueError, match="head output k"):
        torch.ops.genie_kernels.taylor_update(xbar, eps, aux[:, :3], gammas, 2, "genie")
    with pytest.raises(ValueError, match="outside the γ grid"):
        torch.ops.genie_kernels.taylor_update(xbar, eps, aux, gammas, 4, "genie")
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.genie_kernels.taylor_update(xbar.transpose(2, 3), eps.transpose(2, 3), None, gammas, 1, "ddim")


class PassThroughMode(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing, as make_fx or functionalisation would be active."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_plain_eager_calls_launch_directly_and_everything_else_goes_through_the_op(monkeypatch):
    import genie_kernels.fast.update as update

    launchers = []
    original = update._launch
    monkeypatch.setattr(update, "_launch", lambda *args: launchers.append(args[-1]) or original(*args))
    xbar, eps, aux, gammas = make_inputs((2, 3, 4, 4), torch.float32, "genie")
    expected = torch.ops.genie_kernels.taylor_update(xbar, eps, aux, gammas, 2, "genie")  # through the dispatcher

    def launcher_of_one_call():
        launchers.clear()
        result = taylor_update(xbar, eps, gammas, 2, "genie", aux)
        for got, want in zip(result, expected):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        return launchers[0]

    assert launcher_of_one_call() is update.raw_kernel
    with torch.device(DEVICE):  # a torch-function mode
        assert launcher_of_one_call() is torch.library.wrap_triton
    with PassThroughMode():
        assert launcher_of_one_call() is torch.library.wrap_triton
    eps.requires_grad_(True)  # autograd would record the op: it must say it has no backward
    assert launcher_of_one_call() is torch.library.wrap_triton
    with torch.no_grad():
        assert launcher_of_one_call() is update.raw_kernel


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces the op with fake tensors, which the interpreter cannot run")
def test_torch_compile_traces_the_op_in_one_graph():
    from genie_kernels.fast.group_norm import group_norm_silu

    xbar, eps, aux, gammas = make_inputs((2, 8, 4, 4), torch.float16, "genie")
    weight = torch.randn(8, device=DEVICE, dtype=torch.float16)

    def step(xbar, eps, aux):
        new_xbar, x = taylor_update(xbar, eps, gammas, 2, "genie", aux)
        return group_norm_silu(x, weight, weight, 4)[0], new_xbar

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(xbar, eps, aux), step(xbar, eps, aux)):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("mode", ["ddim", "genie", "ab2"])
def test_an_empty_batch_gives_empty_outputs(mode):
    xbar, eps, aux, gammas = make_inputs((0, 3, 4, 4), torch.float32, mode)
    new_xbar, new_x = taylor_update(xbar, eps, gammas, 2, mode, aux)
    assert new_xbar.shape == new_x.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("change, error, message", [
    (dict(xbar=torch.ones(1, 3, 4, 4, dtype=torch.int32)), TypeError, "x̄ must be a real floating tensor, got torch.int32"),
    (dict(xbar=torch.ones(1, 3, 4, 4, dtype=torch.int64)), TypeError, "x̄ must be a real floating tensor"),
    (dict(eps=torch.ones(1, 3, 4, 4, dtype=torch.bool)), TypeError, "eps must be a real floating tensor, got torch.bool"),
    (dict(eps=torch.ones(1, 3, 4, 4, dtype=torch.complex64)), TypeError, "eps must be a real floating tensor"),
    (dict(xbar=torch.ones(1, 3, 4, 4, dtype=torch.float16)), TypeError, "x̄ must be float32, float64, got float16"),
    (dict(step=1.0), TypeError, "step must be an int, got float 1.0"),
    (dict(step=True), TypeError, "step must be an int, got bool"),
    (dict(xbar=torch.ones(()), eps=torch.ones(())), ValueError, r"'genie' needs x̄ shaped \(B, C, ...\) .* got shape \(\)"),
    (dict(xbar=torch.ones(4), eps=torch.ones(4)), ValueError, r"'genie' needs x̄ shaped \(B, C, ...\) .* shape \(4,\)"),
])
def test_the_triton_update_refuses_what_the_cpp_op_refuses(change, error, message):
    """Item 4 of issue 22: integer, bool, complex x̄ or ε, a float step and 0-D/1-D x̄ were
    taken (or failed deep inside); now named, as the C++ op names them."""
    xbar, eps, aux, gammas = make_inputs((1, 3, 4, 4), torch.float32, "genie")
    args = dict(xbar=xbar, eps=eps, gammas=gammas, step=1, mode="genie", aux=aux)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    if "eps" in change and args["eps"].shape == args["xbar"].shape and "xbar" not in change:
        args["aux"] = None
        args["mode"] = "ddim"
    with pytest.raises(error, match=message):
        taylor_update(**args)
    if args["step"] is True:
        return  # the op's schema reads a bool as the int 1
    with pytest.raises((error, RuntimeError), match=f"{message}|for argument 'step'"):  # the schema's own check
        torch.ops.genie_kernels.taylor_update(args["xbar"], args["eps"], args["aux"], args["gammas"], args["step"],
                                              args["mode"])
