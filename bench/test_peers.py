"""The diffusers peers are aligned with our ODE: with many steps they converge to our ground truth."""

import pytest
import torch

import genie_kernels as gk

pytest.importorskip("diffusers")

from peers import PEERS, SPACINGS, make_scheduler, peer_sample  # noqa: E402


@pytest.fixture(scope="module")
def mixture_case():
    schedule = gk.LinearVPSchedule()
    model = gk.image_mixture((3, 8, 8), components=4, seed=0, schedule=schedule)
    noise = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, noise, gk.ground_truth(model, noise, schedule), schedule


def test_peers_converge_to_the_same_end_point(mixture_case):
    """An error floor would show a misaligned start or end (stopping at x̂0 instead of
    x(t_end) alone differs by γ_end·|ε| ≈ 1e-2)."""
    model, noise, truth, schedule = mixture_case
    scheduler = make_scheduler("UniPCMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}, schedule)
    coarse = gk.rmse(peer_sample(model, noise, 25, scheduler), truth)
    fine = gk.rmse(peer_sample(model, noise, 100, scheduler), truth)
    assert fine < 3e-4 and fine < coarse / 4


def test_every_peer_runs_with_every_spacing(mixture_case):
    model, noise, truth, schedule = mixture_case
    for name, (class_name, options) in PEERS.items():
        for spacing in SPACINGS[class_name]:
            x = peer_sample(model, noise, 8, make_scheduler(class_name, options | spacing, schedule))
            assert x.shape == noise.shape and gk.rmse(x, truth) < 0.5, (name, spacing)
