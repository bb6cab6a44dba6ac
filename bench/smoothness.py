"""Smoothness of a model's ε in t along its own ODE solutions (secants vs pointwise JVPs).

    python bench/smoothness.py [--model mnist|DIR|UNET.safetensors|CHECKPOINT] [--samples 4]
                               [--grid-steps 10] [--striding uniform] [--markdown out.md]

Runs :func:`genie_kernels.smoothness.smoothness_report` in float64: relative differences
between the JVP ``∂ε/∂t`` (and the total ``dε/dγ``) and central secants over Δt ∈
{1e-3, 3e-3, 1e-2} at t ∈ {0.9, 0.5, 0.2, 0.1, 0.02}; the error of one DDIM and one exact
TTM2 step from the true state at each step of a solver grid; and the gap between ε(x, 1)
and σ₁x (what the analytic first step assumes).  A model fit for GENIE has secant
differences well below 1 at Δt = 1e-2 and TTM2 errors below DDIM's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import genie_kernels as gk
from genie_kernels.ode.schedules import STRIDINGS
from genie_kernels.ode.smoothness import smoothness_report


def load_model(name: str):
    """A bundled model by name or folder, or a UNet file / train-base checkpoint."""
    path = Path(name)
    if path.is_file():
        return gk.load_unet(path)
    model, _, _ = gk.load_pretrained(name, with_head=False)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnist", help="bundled model name or folder, UNet file or training checkpoint")
    p.add_argument("--samples", type=int, default=4, help="noises (trajectories) to average over (default 4)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grid-steps", type=int, default=10, help="steps of the solver grid for one-step errors")
    p.add_argument("--striding", default="uniform", choices=STRIDINGS)
    p.add_argument("--steps-per-unit", type=float, default=50.0, help="RK4 steps per unit of log γ (default 50)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model).double()
    noise = torch.randn(args.samples, model.in_channels, model.image_size, model.image_size,
                        generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    start = time.perf_counter()
    report = smoothness_report(model, noise, grid_steps=args.grid_steps, striding=args.striding,
                               steps_per_unit=args.steps_per_unit)
    text = (f"Smoothness of {args.model} ({args.samples} trajectories, {args.grid_steps}-step {args.striding} grid, "
            f"{time.perf_counter() - start:.0f} s)\n\n{report.markdown()}\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
