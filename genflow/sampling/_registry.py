"""The table of solvers: one line per solver name.

A solver is a function ``run(model, ts, x, key, **options) -> (x, nfe, trajectory, stats)``
that integrates from ``ts[0]`` down to ``ts[-1]`` (``ts``: the decreasing time grid). Adding a
solver is one function plus one entry here; it then works with every path, prediction kind
and time discretization through :func:`genflow.sample`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import diffrax

from genflow.sampling import _diffrax


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """What :func:`solvers` reports about a solver, and how to run it.

    Attributes:
      name: the ``solver=`` string.
      order: convergence order of the deterministic error (strong order for SDE solvers).
      stochastic: whether it needs ``key=``.
      nfe_per_step: network evaluations per step (``None`` for adaptive step counts).
      adaptive: whether the step count is chosen by an error controller (``steps`` ignored).
      run: the solver function.
      description: one line.
    """

    name: str
    order: float
    stochastic: bool
    nfe_per_step: int | None
    adaptive: bool
    run: Callable = dataclasses.field(repr=False, compare=False)
    description: str = ""


def _ode(solver_cls, nfe_per_step, nfe_init=0, adaptive=False):
    return functools.partial(_diffrax.ode_solve, solver=solver_cls(), adaptive=adaptive,
                             nfe_per_step=nfe_per_step, nfe_init=nfe_init)


def _sde(solver_cls, nfe_per_step):
    return functools.partial(_diffrax.sde_solve, solver=solver_cls(), nfe_per_step=nfe_per_step)


_TABLE: tuple[SolverSpec, ...] = (
    SolverSpec("euler", 1, False, 1, False, _ode(diffrax.Euler, 1),
               "explicit Euler on the probability-flow ODE (Diffrax)"),
    SolverSpec("heun", 2, False, 2, False, _ode(diffrax.Heun, 2),
               "Heun's 2nd-order method on the probability-flow ODE (Diffrax)"),
    SolverSpec("midpoint", 2, False, 2, False, _ode(diffrax.Midpoint, 2),
               "explicit midpoint method on the probability-flow ODE (Diffrax)"),
    SolverSpec("tsit5", 5, False, None, True, _ode(diffrax.Tsit5, 6, 1, adaptive=True),
               "Tsitouras 5(4) with a PID step-size controller (rtol/atol)"),
    SolverSpec("dopri5", 5, False, None, True, _ode(diffrax.Dopri5, 6, 1, adaptive=True),
               "Dormand-Prince 5(4) with a PID step-size controller (rtol/atol)"),
    SolverSpec("dopri8", 8, False, None, True, _ode(diffrax.Dopri8, 13, 1, adaptive=True),
               "Dormand-Prince 8(7) with a PID step-size controller, for reference solutions"),
    SolverSpec("euler_maruyama", 0.5, True, 1, False, _sde(diffrax.Euler, 1),
               "Euler-Maruyama on the reverse-time SDE (Diffrax)"),
)

SOLVERS: dict[str, SolverSpec] = {s.name: s for s in _TABLE}


def get(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solvers() -> dict[str, SolverSpec]:
    """Every solver name with its order, stochasticity, NFE per step and adaptivity."""
    return dict(SOLVERS)
