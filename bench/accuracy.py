"""Accuracy of the reference solvers on the image-shaped Gaussian mixture.

RMSE of the final sample to the float64 ground-truth ODE solution from the same noise,
against the number of network calls (NFE).  One-call-per-step solvers (ddim, ab2, ab3)
use ``steps = NFE``.  An exact GENIE step makes a forward call and a forward-mode pass
that costs about three forward passes by FLOPs (``jvp_cost``), so at equal cost it takes
``NFE // 4`` steps; its row "(steps = NFE)" is the accuracy a perfectly distilled head
would reach at one call per step.

The peers from diffusers (bench/peers.py) run on the same model, noise and end time,
each with its best timestep spacing.

    python bench/accuracy.py            # prints the markdown tables
"""

from __future__ import annotations

import torch

import genie_kernels as gk

NFES = (4, 5, 6, 8, 10, 15, 20)
EXACT_STEP_COST = 4  # forward passes by FLOPs: one forward + one forward-mode pass (3×; jvp_cost measures it)
SOLVERS = ("ddim", "ab2", "ab3")


def setting(batch: int = 32, seed: int = 0):
    schedule = gk.LinearVPSchedule()
    model = gk.image_mixture((3, 8, 8), components=4, seed=0, schedule=schedule)
    noise = torch.randn(batch, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, noise, gk.ground_truth(model, noise, schedule)


def error(model, noise, truth, steps: int, solver: str, striding: str) -> float:
    if steps < 1:
        return float("nan")
    return gk.rmse(gk.sample(model, noise, steps, solver=solver, striding=striding), truth)


def rmse_table(model, noise, truth, striding: str = "quadratic") -> dict[str, list[float]]:
    table = {s: [error(model, noise, truth, n, s, striding) for n in NFES] for s in SOLVERS}
    per_step = EXACT_STEP_COST
    table["genie_exact"] = [error(model, noise, truth, n // per_step, "genie_exact", striding) for n in NFES]
    table["genie_exact (steps = NFE)"] = [error(model, noise, truth, n, "genie_exact", striding) for n in NFES]
    return table


def markdown(table: dict[str, list[float]], columns=NFES, first="solver \\ NFE") -> str:
    lines = [f"| {first} | " + " | ".join(str(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join("—" if r != r else f"{r:.2e}" for r in row) + " |")
    return "\n".join(lines)


def striding_table(model, noise, truth, nfe: int = 10) -> dict[str, list[float]]:
    strides = ("uniform", "quadratic", "logsnr")
    solvers = SOLVERS + ("genie_exact",)
    return {s: [error(model, noise, truth, nfe, s, st) for st in strides] for s in solvers}


def peer_table(model, noise, truth) -> dict[str, list[float]]:
    """diffusers' samplers on the same model and noise, best spacing each (bench/peers.py)."""
    from peers import best_peer_errors

    return {name: [err for err, _ in row] for name, row in best_peer_errors(model, noise, truth, model.schedule, NFES).items()}


def main() -> None:
    model, noise, truth = setting()
    print("RMSE to the ground truth, image mixture 3×8×8, 32 samples, quadratic striding\n")
    print(markdown(rmse_table(model, noise, truth) | peer_table(model, noise, truth)))
    print("\nRMSE at 10 steps by striding\n")
    print(markdown(striding_table(model, noise, truth), ("uniform", "quadratic", "logsnr"), "solver \\ striding"))


if __name__ == "__main__":
    main()
