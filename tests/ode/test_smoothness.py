"""The smoothness diagnostic: small secant differences and TTM2 < DDIM on a smooth model,
large differences on one that ripples in t."""

import math

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.smoothness import PROBE_TIMES, SECANT_WIDTHS, smoothness_report


def rippled(model, amplitude=0.02, frequency=1000.0):
    """``ε + a sin(ω t) x``: a ripple in t far finer than any sampling step."""
    return lambda x, t: model(x, t) + amplitude * torch.sin(frequency * t).reshape(-1, 1, 1, 1) * x


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_smooth_mixture_passes(noise):
    mix = gk.image_mixture((1, 4, 4))
    report = smoothness_report(mix, noise, grid_steps=6, steps_per_unit=20)
    assert set(report.partial_t) == {(t, dt) for t in PROBE_TIMES for dt in SECANT_WIDTHS}
    # secant truncation error O(Δt²): tiny at Δt = 1e-3, and growing with Δt
    assert max(report.partial_t[t, 1e-3] for t in PROBE_TIMES) < 0.01
    assert max(report.total[t, 1e-3] for t in PROBE_TIMES) < 0.01
    assert report.partial_t[0.5, 1e-2] > report.partial_t[0.5, 1e-3]
    assert len(report.steps) == 6 and report.steps[0][0] == 1.0
    assert sum(ttm2 for *_, ttm2 in report.steps) < sum(ddim for _, _, ddim, _ in report.steps)
    # the mixture's ε at t = 1 is close to σ x (data variance is small next to the noise)
    assert report.afs_gap < 0.05
    assert "| 0.9 |" in report.markdown() and "AFS gap" in report.markdown()


def test_ripple_in_t_is_detected(noise):
    mix = gk.image_mixture((1, 4, 4))
    report = smoothness_report(rippled(mix), noise, mix.schedule, grid_steps=6, steps_per_unit=20)
    assert min(report.partial_t[t, 1e-2] for t in (0.9, 0.5, 0.2)) > 0.5


def test_probe_times_must_fit(noise):
    with pytest.raises(ValueError, match="leaves"):
        smoothness_report(gk.image_mixture((1, 4, 4)), noise, times=(0.995,))
