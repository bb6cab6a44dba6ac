"""pytest-benchmark timings of each fused path against eager PyTorch and torch.compile (CUDA only).

    pytest bench/test_kernel_speed.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group times one piece of work three or four ways side by side in one run; compare the
medians within a group, not across machines.  Every timed call ends with a device
synchronisation, so a median is the latency of the whole call (use ``bench/gpu_check.py``
for CUDA-event timings and the bandwidth figures).  Shapes follow the targets in the
issues: ε of 64 MB for the update, batch 256 at 32×32 with nf 128 for the head.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the kernel benchmarks need a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from cases import head_case, unet_and_head  # noqa: E402

import genie_kernels as gk  # noqa: E402
from genie_kernels.fast.channels_last_cat import channels_last_cat, channels_last_cat_reference  # noqa: E402
from genie_kernels.fast.group_norm import group_norm_silu, group_norm_silu_reference  # noqa: E402
from genie_kernels.fast.head_blocks import fused_head_k  # noqa: E402
from genie_kernels.fast.update import taylor_update, taylor_update_reference  # noqa: E402


def timed(benchmark, fn):
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    benchmark(lambda: (fn(), torch.cuda.synchronize()))


@pytest.fixture(scope="module")
def update_args():
    shape = (256, 4, 128, 128)  # ε: 32 Mi fp16 values = 64 MB
    gammas = torch.tensor([152.2, 40.0, 3.0, 0.5, 0.01], dtype=torch.float64, device="cuda")
    k = torch.randn(shape[0], 3 * shape[1], *shape[2:], device="cuda", dtype=torch.float16)
    return (torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda", dtype=torch.float16), gammas, 2,
            "genie", k)


UPDATES = {"fused": taylor_update, "eager": taylor_update_reference, "compiled": torch.compile(taylor_update_reference)}


@pytest.mark.parametrize("way", UPDATES)
def test_update(benchmark, update_args, way):
    benchmark.group = "taylor update, genie, 64 MB eps"
    timed(benchmark, lambda: UPDATES[way](*update_args))


@pytest.fixture(scope="module")
def norm_args():
    h = torch.randn(256, 128, 32, 32, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w, s = torch.randn(128, device="cuda", dtype=torch.float16), torch.randn(128, device="cuda", dtype=torch.float16)
    return h, w, s, 32, 1e-5, torch.randn(256, 128, device="cuda", dtype=torch.float16)


NORMS = {"fused": group_norm_silu, "eager": group_norm_silu_reference,
         "compiled": torch.compile(group_norm_silu_reference)}


@pytest.mark.parametrize("way", NORMS)
def test_group_norm_silu(benchmark, norm_args, way):
    benchmark.group = "GroupNorm + bias + SiLU, b256 128x32x32 fp16 channels-last"
    h, w, s, groups, eps, bias = norm_args
    timed(benchmark, lambda: NORMS[way](h, w, s, groups, eps, bias=bias))


CATS = {"fused": channels_last_cat, "eager": channels_last_cat_reference,
        "compiled": torch.compile(channels_last_cat_reference)}


@pytest.mark.parametrize("way", CATS)
def test_channels_last_cat(benchmark, head_args, way):
    benchmark.group = "the head's NHWC input: cat of 3 + 3 + 128 channels padded to 136, b256 32x32 fp16"
    _, x, out, _ = head_args
    timed(benchmark, lambda: CATS[way]([x, out.eps, out.features], 8))


@pytest.fixture(scope="module")
def head_args():
    return head_case(256)


@pytest.mark.parametrize("way", ["fused NHWC", "fused NCHW", "eager", "compiled"])
def test_head(benchmark, head_args, way):
    benchmark.group = "conv head k, b256 32x32 nf128 fp16"
    head, x, out, gamma = head_args
    fn = {"fused NHWC": lambda: fused_head_k(head, x, out, gamma, channels_last=True),
          "fused NCHW": lambda: fused_head_k(head, x, out, gamma, channels_last=False),
          "eager": lambda: head.predict_k(x, out, gamma)}.get(way)
    if fn is None:
        compiled = torch.compile(head.predict_k)
        fn = lambda: compiled(x, out, gamma)  # noqa: E731
    with torch.no_grad():
        timed(benchmark, fn)


@pytest.fixture(scope="module")
def sampler_model():
    return unet_and_head()


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda_graph"])
def test_sample_genie(benchmark, sampler_model, batch, backend):
    benchmark.group = f"10-step GENIE sample, b{batch} 3x32x32 fp16"
    model, head = sampler_model
    noise = torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16)
    timed(benchmark, lambda: gk.sample(model, noise, 10, solver="genie", head=head, backend=backend))
