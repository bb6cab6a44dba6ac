"""pytest-benchmark timings on the CPU: the C++ update op and the sampler backends that run here.

    pytest bench/test_cpu_speed.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Compare medians within a group (one run, side by side); absolute CPU times on a shared
2-core machine mean little.  glibc returns freed multi-megabyte outputs to the OS, so each
call may fault its outputs' pages in again, which makes the medians swing between runs;
``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment
keeps that memory in the process and times the arithmetic.  The C++ op is JIT-built on
first use (about a minute) and the group is skipped where it cannot be built.
"""

import pytest
import torch

import genie_kernels as gk
from genie_kernels.fast import ext
from genie_kernels.fast.update import taylor_update_reference

GAMMAS = torch.tensor([152.2, 40.0, 3.0, 0.5, 0.01], dtype=torch.float64)


@pytest.fixture(scope="module")
def update_args():
    shape = (64, 4, 64, 64)  # ε: 1 Mi float32 values = 4 MB
    gen = torch.Generator().manual_seed(0)
    xbar, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k = torch.randn(shape[0], 3 * shape[1], *shape[2:], generator=gen)
    return xbar, eps, GAMMAS, 2, "genie", k


def cpp_update(*args):
    try:
        ext.load()
    except ext.ExtensionUnavailable as err:
        pytest.skip(str(err))
    return ext.taylor_update_cpp(*args)


UPDATES = {"C++ op": cpp_update, "eager": taylor_update_reference,
           "compiled": torch.compile(taylor_update_reference, dynamic=False)}


@pytest.mark.parametrize("way", UPDATES)
def test_update(benchmark, update_args, way):
    benchmark.group = "taylor update, genie, 4 MB float32 eps (CPU)"
    UPDATES[way](*update_args)  # build / compile outside the timing
    benchmark(UPDATES[way], *update_args)


@pytest.fixture(scope="module")
def mnist():
    model, head, _ = gk.load_pretrained("mnist")
    return model, head


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sample_mnist(benchmark, mnist, backend):
    benchmark.group = "10-step GENIE, bundled MNIST model, batch 16 (CPU)"
    model, head = mnist
    noise = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    if backend == "cpp":
        cpp_update(noise, noise, GAMMAS, 0, "ddim")  # skips where the op cannot be built
    run = lambda: gk.sample(model, noise, 10, solver="genie", head=head, striding="uniform", backend=backend)  # noqa: E731
    run()
    benchmark.pedantic(run, rounds=5, iterations=1)
