"""Sample with a GENIE-family solver and write the result as a PNG.

Until a trained model ships with the package, this samples the 2-D toy Gaussian
mixture (25 narrow modes) and draws the samples of the chosen solver beside DDIM's
with the same noise and steps, so the difference a second-order step makes is visible.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import sample
from .mixture import toy_2d
from .plotting import scatter_panels
from .solvers import SOLVERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=25, help="solver steps (default 25)")
    p.add_argument("--solver", default="genie_exact", choices=[s for s in SOLVERS if s != "genie"],
                   help="solver to compare against DDIM (default genie_exact)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    p.add_argument("--batch", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--out", default="samples.png", help="output PNG path (default samples.png)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--backend", default="auto", help="sampling backend (default auto)")


def run(args) -> int:
    device = torch.device(args.device)
    model = toy_2d().to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    noise = torch.randn(args.batch, 2, generator=gen, dtype=torch.float64).to(device)
    panels = []
    for solver in ("ddim", args.solver):
        start = time.perf_counter()
        x, nfe = sample(model, noise, args.steps, solver=solver, backend=args.backend, return_nfe=True)
        seconds = time.perf_counter() - start
        low = model.off_mode_fraction(x.cpu())
        print(f"{solver:12s} steps={args.steps} NFE={nfe:g} time={seconds:.2f}s  off-mode fraction={low:.3f}")
        panels.append((f"{solver}, NFE {nfe:g}: {100 * low:.1f}% off-mode", x.cpu()))
    scatter_panels(panels, args.out)
    print(f"wrote {args.out}")
    return 0
