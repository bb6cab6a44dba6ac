"""Calibrated grids (issue 19): a valid grid, never worse on its calibration batch than the
standard stridings it was compared with, local errors more even than the quadratic grid's,
and clear errors for what it cannot calibrate."""

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.ground_truth import ode_solution
from genie_kernels.ode.schedules import STRIDINGS, time_grid
from genie_kernels.ode.calibration import calibrated_grid, equidistribute

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixture():
    return gk.image_mixture((1, 4, 4), components=3, seed=3)


@pytest.fixture(scope="module")
def calibration_noise():
    return torch.randn(16, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("afs", [False, True])
def test_the_grid_is_valid_and_no_worse_than_the_standard_stridings_on_its_batch(mixture, calibration_noise, afs):
    steps = 5
    grid = calibrated_grid(mixture, calibration_noise, steps, solver="ddim", afs=afs, resolution=60, iterations=3,
                           steps_per_unit=20.0)
    ts = grid.ts
    assert ts.dtype == torch.float64 and ts.numel() == steps + 1
    assert float(ts[0]) == 1.0 and abs(float(ts[-1]) - 1e-3) < 1e-12 and bool((ts[1:] < ts[:-1]).all())
    standard = [v for k, v in grid.candidates.items() if not k.startswith("equidistributed")]
    assert len(standard) == len(STRIDINGS)
    assert grid.rmse == min(grid.candidates.values()) and grid.rmse <= min(standard)
    # the grid it returns is the grid sample() then runs: same error on the calibration batch
    reference = gk.ground_truth(mixture, calibration_noise, mixture.schedule, steps_per_unit=20.0)
    again = gk.sample(mixture, calibration_noise, solver="ddim", timesteps=ts, afs=afs)
    assert abs(gk.rmse(again, reference) - grid.rmse) < 1e-6


def test_equal_local_errors_are_a_fixed_point_and_a_large_one_shrinks_its_step():
    gammas = torch.linspace(10.0, 0.0, 101, dtype=torch.float64)  # uniform in γ: ρ = e^{1/q} / Δγ
    idx = [0, 25, 50, 75, 100]
    assert equidistribute(idx, [1.0, 1.0, 1.0, 1.0], gammas, 2.0) == idx
    # the second step's error 16x the others': its density ρ = e^{1/2}/Δγ is 4x, the error
    # integral 1 + 4 + 1 + 1 = 7, and each new step takes 7/4 of it: the new points sit where
    # the integral reaches 1.75, 3.5 and 5.25, at candidates 25 + 0.75/0.16 = 29.7,
    # 25 + 2.5/0.16 = 40.6 and 50 + 0.25/0.04 = 56.25
    moved = equidistribute(idx, [1.0, 16.0, 1.0, 1.0], gammas, 2.0)
    widths = [j - i for i, j in zip(moved[:-1], moved[1:])]
    assert moved[0] == 0 and moved[-1] == 100
    assert all(abs(w - expected) <= 1 for w, expected in zip(widths, [29.7, 10.9, 15.6, 43.75])), widths
    # never two points on one candidate, even when all the error sits in one step
    crowded = equidistribute(idx, [0.0, 1e6, 0.0, 0.0], gammas, 2.0)
    assert crowded == sorted(set(crowded)) and len(crowded) == 5


def test_equidistribution_evens_out_ddims_local_errors(mixture, calibration_noise):
    """DDIM's local errors (e ≈ C h², so q = 2) on the quadratic grid span a wide range; one
    equidistribution pass makes their spread (max / mean) smaller."""
    fine = time_grid(mixture.schedule, 120, 1e-3, "quadratic")
    gammas = mixture.schedule.gamma(fine)
    states = ode_solution(mixture, calibration_noise, fine, mixture.schedule, steps_per_unit=20.0)

    def local_errors(idx):
        return [gk.rmse(gk.ddim(mixture, states[i], fine[[i, j]], mixture.schedule).sample, states[j])
                for i, j in zip(idx[:-1], idx[1:])]

    def spread(errors):
        return max(errors) / (sum(errors) / len(errors))

    idx = [20 * n for n in range(7)]
    before = local_errors(idx)
    after = local_errors(equidistribute(idx, before, gammas, 2.0))
    assert spread(after) < 0.9 * spread(before)


def test_what_it_cannot_calibrate_is_named(mixture, calibration_noise):
    with pytest.raises(ValueError, match="one-step solvers"):
        calibrated_grid(mixture, calibration_noise, 4, solver="ab2")
    with pytest.raises(ValueError, match="needs head"):
        calibrated_grid(mixture, calibration_noise, 4, solver="genie")
    with pytest.raises(ValueError, match="resolution"):
        calibrated_grid(mixture, calibration_noise, 4, solver="ddim", resolution=3)
