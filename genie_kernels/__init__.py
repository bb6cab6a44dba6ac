"""genie_kernels: few-step diffusion sampling with GENIE (second-order Taylor + distilled head)."""

from .derivative import exact_deps_dgamma
from .ground_truth import ground_truth, ode_solution, rmse
from .mixture import GaussianMixture, image_mixture, toy_2d
from .models import EpsModel, ModelOutput, as_model
from .sampling import sample
from .schedules import DiscreteVPSchedule, LinearVPSchedule, VPSchedule, time_grid
from .solvers import SolverOutput, ab2, ab3, ddim, genie, genie_exact

__version__ = "0.1.0"

__all__ = [
    "sample", "ddim", "genie", "genie_exact", "ab2", "ab3", "SolverOutput",
    "LinearVPSchedule", "DiscreteVPSchedule", "VPSchedule", "time_grid",
    "EpsModel", "ModelOutput", "as_model", "exact_deps_dgamma",
    "GaussianMixture", "image_mixture", "toy_2d", "ground_truth", "ode_solution", "rmse",
]
