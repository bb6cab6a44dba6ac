"""Calibrated grids (``genie_kernels.ode.calibration``) against the standard stridings.

    PYTHONPATH=. python bench/distill_mixture.py --out runs/mixture_head.safetensors   # once, ~5 min
    PYTHONPATH=. python bench/calibrated_grid.py --head runs/mixture_head.safetensors [--nfes 5,10]

On the 64-dimensional image mixture of bench/distill_mixture.py (1×8×8, 4 components,
seed 0): for genie (the distilled head) and ddim, with and without the analytic first
step, a grid is calibrated on 64 noises (seed 7) and evaluated, beside the quadratic grid
and the best standard striding *on the calibration noises*, by the RMSE to the float64
ground truth from 256 other noises (seed 1).  The calibrated grid is never worse than the
standard ones on its calibration noises by construction; the question is whether it is
better on noises it has not seen.
"""

from __future__ import annotations

import argparse
import time

import torch

import genie_kernels as gk
from genie_kernels.heads.files import load_head
from genie_kernels.ode.calibration import calibrated_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", required=True, help="a head distilled by bench/distill_mixture.py --out")
    p.add_argument("--nfes", default="5,10")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    schedule = gk.LinearVPSchedule()
    model = gk.image_mixture((1, 8, 8), components=4, seed=0, schedule=schedule)
    head = load_head(args.head)
    noise = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth = gk.ground_truth(model, noise, schedule)
    calibration = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    print("| solver | NFE | quadratic | best standard on the calibration noises | calibrated (chosen) | seconds |")
    print("|---|---|---|---|---|---|")
    for solver in ("genie", "ddim"):
        extra = {"head": head} if solver == "genie" else {}
        for afs in (False, True):
            for nfe in (int(n) for n in args.nfes.split(",")):
                steps = nfe + 1 if afs else nfe
                start = time.perf_counter()
                grid = calibrated_grid(model, calibration, steps, solver=solver, afs=afs, **extra)
                seconds = time.perf_counter() - start
                chosen = min(grid.candidates, key=grid.candidates.get)
                standard = min((v, k) for k, v in grid.candidates.items() if not k.startswith("equidistributed"))[1]

                def error(**grid_options) -> float:
                    x = gk.sample(model, noise, solver=solver, afs=afs, **grid_options, **extra)
                    return gk.rmse(x, truth)

                quadratic = error(steps=steps, striding="quadratic")
                best_standard = error(steps=steps, striding=standard)
                calibrated = error(timesteps=grid.ts)
                name = f"{solver}{' + AFS' if afs else ''}"
                print(f"| {name} | {nfe} | {quadratic:.2e} | {best_standard:.2e} ({standard}) | {calibrated:.2e} "
                      f"({chosen}) | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
