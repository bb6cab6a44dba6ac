import os

import torch

# Triton kernels run in the interpreter on machines without CUDA; it must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import genie_kernels as gk  # noqa: E402


@pytest.fixture(scope="session")
def schedule():
    return gk.LinearVPSchedule()


@pytest.fixture(scope="session")
def image_mix(schedule):
    """An image-shaped (3×8×8) four-component mixture with closed-form ε."""
    return gk.image_mixture((3, 8, 8), components=4, seed=0, schedule=schedule)


@pytest.fixture(scope="session")
def image_noise():
    return torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def image_truth(image_mix, image_noise, schedule):
    """Float64 RK4 ground truth at t_end = 1e-3 from ``image_noise``."""
    return gk.ground_truth(image_mix, image_noise, schedule, t_end=1e-3)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
