"""Samplers: ``genflow.sample`` and the solver table.

A sampler is (model function, path, prediction kind) x (solver) x (time discretization), each
axis swappable alone. ``solvers()`` lists every solver with its order, whether it is
stochastic, and its network evaluations per step.
"""

from genflow.sampling._core import SampleInfo, as_pytree_fn, sample
from genflow.sampling._grid import SCHEDULES, karras_family, time_grid
from genflow.sampling._model import Model
from genflow.sampling._optimize import (
    calibration_batch, global_error, optimize_schedule, propagation_weights, reference_end_states,
    reference_trajectories, schedule_bound, select_schedule,
)
from genflow.sampling._registry import SolverSpec, diffrax_solver, register, solvers, unregister
from genflow.sampling._stochastic import langevin_correct

__all__ = ["sample", "SampleInfo", "solvers", "SolverSpec", "register", "unregister", "diffrax_solver", "time_grid", "karras_family",
           "SCHEDULES", "Model", "as_pytree_fn", "optimize_schedule", "select_schedule", "calibration_batch", "schedule_bound", "global_error",
           "reference_trajectories", "reference_end_states", "propagation_weights", "langevin_correct"]
