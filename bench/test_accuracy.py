"""``pytest bench/ -s``: prints the accuracy tables and times one run of each solver."""

import pytest

import genie_kernels as gk

from accuracy import markdown, rmse_table, setting, striding_table


@pytest.fixture(scope="module")
def mixture_setting():
    return setting()


def test_rmse_vs_nfe_table(mixture_setting):
    table = rmse_table(*mixture_setting)
    print("\n" + markdown(table))
    for name in ("ddim", "ab2", "ab3", "genie_exact (steps = NFE)"):
        row = table[name]
        assert all(b < a for a, b in zip(row, row[1:])), f"{name} does not improve with NFE: {row}"
    # second order pays off from 5 steps on (at 4 the first, huge step overshoots)
    assert all(g < d for g, d in zip(table["genie_exact (steps = NFE)"][1:], table["ddim"][1:]))


def test_striding_table(mixture_setting):
    print("\n" + markdown(striding_table(*mixture_setting), ("uniform", "quadratic", "logsnr"), "solver \\ striding"))


@pytest.mark.parametrize("solver", ["ddim", "ab2", "ab3", "genie_exact"])
def test_solver_time_10_steps(benchmark, mixture_setting, solver):
    model, noise, _ = mixture_setting
    benchmark(gk.sample, model, noise, 10, solver=solver)
