"""The table of solvers: one line per solver name.

A solver is a function ``run(model, ts, x, key, **options) -> (x, nfe, trajectory, stats)``
that integrates from ``ts[0]`` down to ``ts[-1]`` (``ts``: the decreasing time grid). Adding a
solver is one function (a Diffrax solver, or a :class:`~genflow.sampling._driver.Stepper`
driven by one ``lax.scan``) plus one entry here -- or, from user code, :func:`register` (with
:func:`diffrax_solver` for a Diffrax ODE solver); it then works with every path, prediction kind
and time discretization through :func:`genflow.sample`.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from typing import Callable

import diffrax
import numpy as np

from genflow._checks import check_bool, check_registration, check_removal, is_int, registry_owner
from genflow.sampling import _diffrax, _driver, _multistep, _singlestep, _stochastic
from genflow.sampling._driver import Stepper


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """What :func:`solvers` reports about a solver, and how to run it.

    Attributes:
      name: the ``solver=`` string.
      order: convergence order: of the global error against the exact probability-flow map
        (deterministic solvers), strong order against the reverse-SDE solution (SDE solvers), or
        of the deterministic part (solvers that only converge in distribution). For the
        multistep solvers (``dpm++3m``, ``deis``) it holds from pure noise (``t_start = 1``); from
        a finite start (SDEdit, img2img, a start at ``sigma_max``) their lower-order warm-up
        steps cap it at 2 (measured 2.0-2.1 on the Gaussian oracle; ``unipc``'s corrector lifts its
        warm-up, and it keeps 3).
      stochastic: whether it needs ``key=`` with its default options (``ddim`` is deterministic
        by default and needs a key with ``eta > 0``; ``edm_heun`` likewise with ``churn > 0``).
      nfe_per_step: network evaluations per step (``None`` for adaptive step counts). EDM Heun and
        Restart spend one fewer on a last step into ``sigma = 0``; Restart adds
        ``restart_times * 2 * restart_steps`` once, if the grid has a level (after the start)
        with ``0 < sigma / alpha < restart_interval[1]`` and starts above ``restart_interval[0]``
        (a coarse uniform grid may have none: 3 steps on ``linear`` run plain EDM Heun);
        ``info.nfe`` always counts what ran.
      adaptive: whether the step count is chosen by an error controller (``steps`` ignored).
      run: the solver function.
      description: one line.
      target: ``"flow_map"`` (converges to the probability-flow ODE map), ``"sde"`` (pathwise to
        the reverse SDE driven by the same Brownian path) or ``"distribution"`` (in law only).
      stepper: the scan step of genflow's own solvers (used by :func:`optimize_schedule`; a solver
        registered with its own ``run`` is not optimized).
      options: the solver options :func:`genflow.sample` accepts as keyword arguments.
      traced_options: those of ``options`` passed to ``run`` as traced 0-d float arrays (a new
        value reuses the compiled sampler, as a guidance scale does; ``run`` must then not branch
        on them in Python). The others are static: Python values, hashed, one compilation per
        value. (genflow's own solvers have their own rules, by option name; a registered solver
        gets only what it declares.)
      evaluates_at_end: whether ``run`` evaluates the model at the end of a step (a Heun corrector,
        an FSAL stage): :func:`genflow.sample` then refuses an ``x0`` model on a grid that ends at
        ``sigma = 0``, where its velocity is 0/0 (NaN samples otherwise), as it does for ``heun``.
        Read from the tableau for :func:`diffrax_solver` specs.
    """

    name: str
    order: float
    stochastic: bool
    nfe_per_step: int | None
    adaptive: bool
    # (run and stepper take part in == and hash -- by identity for functions and partials: the
    # compiled sampler is keyed by the spec, and a replacement that differs only in what it runs
    # must not reuse the old program)
    run: Callable = dataclasses.field(repr=False)
    description: str = ""
    target: str = "flow_map"
    stepper: Stepper | None = dataclasses.field(default=None, repr=False)
    options: tuple[str, ...] = ()
    traced_options: tuple[str, ...] = ()
    evaluates_at_end: bool = False


def _tableau_evaluates_at_end(solver: diffrax.AbstractSolver) -> bool:
    """Whether a Diffrax Runge-Kutta solver evaluates the model at the end of each step: a stage at
    ``c = 1`` (Heun's corrector) or an FSAL last stage (Bosh3, Tsit5, Dopri5/8); ``False`` for a
    solver without a tableau (Euler)."""
    tableau = getattr(solver, "tableau", None)
    return tableau is not None and (bool(tableau.fsal) or bool(np.any(np.asarray(tableau.c) == 1.0)))


def _ode_spec(name, order, solver, nfe_per_step, description, nfe_init=0, adaptive=False, evaluates_at_end=False):
    """The :class:`SolverSpec` of a Diffrax ODE solver instance on the probability-flow ODE in t
    (the built-ins' and :func:`diffrax_solver`'s); ``evaluates_at_end`` read from its tableau, or
    declared for a solver without one."""
    run = functools.partial(_diffrax.ode_solve, solver=solver, adaptive=adaptive, nfe_per_step=nfe_per_step,
                            nfe_init=nfe_init)
    return SolverSpec(name, order, False, None if adaptive else nfe_per_step, adaptive, run, description,
                      evaluates_at_end=_tableau_evaluates_at_end(solver) or evaluates_at_end)


def _sde(solver_cls, nfe_per_step, **kw):
    return functools.partial(_diffrax.sde_solve, solver=solver_cls(), nfe_per_step=nfe_per_step, **kw)


def _scan(name, order, stochastic, nfe, stepper, description, target="flow_map", options=(), **defaults):
    run = functools.partial(_driver.run, stepper=stepper, **defaults)
    return SolverSpec(name, order, stochastic, nfe, False, run, description, target, stepper, tuple(options))


_EDM = ("churn", "s_tmin", "s_tmax", "s_noise")


_TABLE: tuple[SolverSpec, ...] = (
    _ode_spec("euler", 1, diffrax.Euler(), 1, "explicit Euler on the probability-flow ODE in t (Diffrax)"),
    _ode_spec("heun", 2, diffrax.Heun(), 2, "Heun's 2nd-order method on the probability-flow ODE in t (Diffrax)"),
    _ode_spec("midpoint", 2, diffrax.Midpoint(), 2,
              "explicit midpoint method on the probability-flow ODE in t (Diffrax)"),
    _ode_spec("tsit5", 5, diffrax.Tsit5(), 6, "Tsitouras 5(4) with a PID step-size controller (rtol/atol)",
              nfe_init=1, adaptive=True),
    _ode_spec("dopri5", 5, diffrax.Dopri5(), 6, "Dormand-Prince 5(4) with a PID step-size controller (rtol/atol)",
              nfe_init=1, adaptive=True),
    _ode_spec("dopri8", 8, diffrax.Dopri8(), 13,
              "Dormand-Prince 8(7) with a PID step-size controller, for reference solutions", nfe_init=1,
              adaptive=True),
    _scan("ddim", 1, False, 1, _multistep.ddim,
          "DDIM (Song et al. 2021); eta > 0 adds DDPM-like noise and needs key", options=("eta",)),
    _scan("ddpm", 1, True, 1, _multistep.ddim,
          "ancestral sampling: DDIM with eta = 1, posterior variance (Ho et al. 2020); weak order 1 "
          "(unit-variance Gaussian data on vp_linear: variance ~6-9/steps too small over 25-200 steps)",
          "distribution", options=("eta",), eta=1.0),
    _scan("dpm++2m", 2, False, 1, _multistep.dpm_multistep(2), "DPM-Solver++(2M), data prediction (Lu et al. 2022b)"),
    _scan("dpm++3m", 3, False, 1, _multistep.dpm_multistep(3),
          "DPM-Solver++(3M), data prediction (Lu et al. 2022b), with the exact third-order weight of D''; "
          "order 2 from a finite start (its DDIM / 2M warm-up steps)",
          options=("d2_weight",)),
    _scan("dpm++3m_ref", 2, False, 1, _multistep.dpm_multistep(3),
          "DPM-Solver++(3M) as in the reference code / k-diffusion / diffusers (half the D'' weight: 2nd order; "
          "warm-up step DPM-Solver++(2M)'s, as diffusers, where k-diffusion's 3M uses phi_2)",
          options=("d2_weight",), d2_weight=1.0),
    _scan("dpm++2s", 2, False, 2, _singlestep.dpm_singlestep(2),
          "DPM-Solver++(2S), single-step midpoint in log-SNR (Lu et al. 2022, 2022b)"),
    _scan("dpm++3s", 3, False, 3, _singlestep.dpm_singlestep(3),
          "DPM-Solver++(3S), single-step third order (Lu et al. 2022, 2022b)"),
    _scan("deis", 3, False, 1, _multistep.deis(3, "eps"),
          "DEIS tAB3: eps extrapolated in t, exponential-integrator weights (Zhang & Chen 2023); "
          "order=1..3 (3 by default, 2 from a finite start: its warm-up steps; 4 and up converge at their order "
          "but are unstable at ~10 steps), "
          "form='eps'|'x0'; its polynomial in t amplifies float32 rounding where the first times are packed "
          "tight in t (karras grid on vp_cosine, 12 steps: a sample moves by 1.1e-2 between batch sizes 1 and 16 "
          "at order 3, 1.4e-3 on the logsnr grid, 4e-6 at order 2), and is unstable in float32 where many first "
          "times crowd next to t = 1 (vp_cosine(logsnr_min=-20), 10 karras steps: 29 from the exact flow map against "
          "0.24 in float64; order=2 or form='x0' stay accurate there)", options=("order", "form")),
    _scan("unipc", 3, False, 1, _multistep.unipc(2, "bh2"),
          "UniPC: UniP-2 predictor + UniC corrector, B(h) = e^h - 1 (Zhao et al. 2023); order=1..3 is the "
          "predictor's (2 by default; the corrector adds one: measured 2.0 / 3.0 / 3.7; order=3 was the more "
          "accurate at 20-50 NFE on experiments/benchmarks/samplers.py's 64-D mixture: at NFE 50 with an "
          "optimized grid, 4.7e-5 against 1.7e-4 relative rms over 12 batches of 512), variant='bh1'|'bh2'",
          options=("order", "variant")),
    _scan("dpm++2m_hb", 1, False, 1, _multistep.hb,
          "DPM-Solver++(2M) with heavy-ball momentum beta=0.8 (Wizadwongsa et al. 2023)", options=("beta",)),
    _scan("edm_heun", 2, False, 2, _singlestep.edm_heun, "EDM's Heun sampler in sigma/alpha (Karras et al. 2022, Alg. 1)",
          options=_EDM),
    _scan("edm_heun_churn", 2, True, 2, _singlestep.edm_heun,
          "EDM's stochastic sampler with churn (Karras et al. 2022, Alg. 2; ImageNet-64 settings)", "distribution",
          options=_EDM, churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
    _scan("restart", 2, True, 2, _singlestep.restart,
          "Restart sampling on EDM Heun steps (Xu et al. 2023)", "distribution",
          options=("restart_interval", "restart_times", "restart_steps", "rho")),
    SolverSpec("euler_maruyama", 1.0, True, 1, False, _sde(diffrax.Euler, 1),
               "Euler-Maruyama on the reverse-time SDE (Diffrax; strong order 1 for its additive noise); at ~10 "
               "steps keep the uniform grid (linear path, 2-D mixture: sliced W2 0.08-0.12 uniform, 9.4 log-SNR)",
               "sde",
               options=("brownian_tol",)),
    SolverSpec("shark", 1.5, True, 2, False, _sde(diffrax.ShARK, 2, levy_area=diffrax.SpaceTimeLevyArea),
               "ShARK on the reverse-time SDE (Diffrax; strong order 1.5 for additive noise, Foster et al. 2023); at "
               "~10 steps give it schedule='logsnr': its first uniform step overshoots the stiff drift near t = 1 "
               "(linear path, 2-D mixture: sliced W2 1.2 uniform, 0.12-0.15 log-SNR)", "sde",
               options=("brownian_tol",)),
    _scan("pc", 0.5, True, 2, _stochastic.pc,
          "predictor-corrector: reverse-SDE Euler-Maruyama + Langevin corrector, snr=0.16 (Song et al. 2021); "
          "the corrector's fixed snr keeps an O(snr^2) bias in the variance that more steps do not remove "
          "(2-D Gaussians, vp_linear: +1.3-3.1% at 400 steps, +1.9-2.5% at 1,600; snr=0.04: within 1.2%); "
          "at ~10 steps keep the uniform grid (linear path, 2-D mixture: sliced W2 0.08-0.12 uniform, 9.3 log-SNR); "
          "the corrector's step size uses batch means (as score_sde's), so a sample depends on the rest of its "
          "batch (and shard)",
          "distribution", options=("snr", "corrector_steps")),
)

SOLVERS: dict[str, SolverSpec] = {s.name: s for s in _TABLE}
_BUILTIN = frozenset(SOLVERS)


def get(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solvers() -> dict[str, SolverSpec]:
    """Every solver name with its order, stochasticity, NFE per step, adaptivity and target."""
    return dict(SOLVERS)


def register(spec: SolverSpec, *, overwrite: bool = False) -> SolverSpec:
    """Add a solver to the table, from outside the library: ``gf.sample(..., solver=spec.name)``
    then runs it with every path, prediction kind and time grid, and :func:`solvers` lists it.

    ``spec.run(model, ts, x, key, *, rtol, atol, max_steps, save_trajectory, **options)`` integrates
    from ``ts[0]`` down to ``ts[-1]`` and returns ``(x, nfe, trajectory, stats)``:

    - ``model``: a :class:`genflow.sampling.Model` (``model.velocity(x, t)``,
      ``model.x0_eps(x, t)``, ``model.predict(x, t, kind)``, whatever kind the user's network
      returns); ``ts: [N + 1]`` the decreasing grid; ``x: [B, ...]`` (at least float32); ``key``:
      a PRNG key or None.
    - ``rtol``, ``atol``, ``max_steps`` (adaptive solvers) and ``save_trajectory`` are always
      passed: a fixed-step ``run`` takes them and ignores the first three (``**_``). For an
      adaptive solver ``rtol`` / ``atol`` are 0-d arrays in the state's dtype, traced (a new
      tolerance reuses the compiled sampler): no ``float(rtol)`` or Python branching on them;
      ``options``: the keyword arguments named in ``spec.options`` that the caller gave, as
      given (static: one compilation per value) or, for those in ``spec.traced_options``, as
      traced 0-d float arrays (no Python branching on them).
    - a ``run`` that evaluates the model at the end of its steps declares
      ``evaluates_at_end=True`` (an ``x0`` model is then refused on grids ending at ``sigma = 0``).
    - returns the final state ``[B, ...]``, the number of evaluations (int), the states at
      ``ts`` (``[N + 1, B, ...]``) if ``save_trajectory`` else None, and a dict of statistics
      (may be empty).

    :func:`diffrax_solver` builds the spec of a Diffrax ODE solver. Names are unique: an existing
    name is refused, unless it is one of yours and ``overwrite=True`` (re-running a notebook cell;
    the compiled sampler is keyed by the spec, so the new one runs); genflow's own names cannot be
    replaced, and :func:`unregister` removes one of yours. A registered ``run`` gets the
    grid as built; :func:`optimize_schedule` and :func:`select_schedule` take genflow's own
    scan solvers only.

    Example::

        gf.sampling.register(gf.sampling.diffrax_solver("ralston", diffrax.Ralston()))  # order, NFE: its tableau
        x0, info = gf.sample(fn, path, x1, prediction="velocity", solver="ralston", steps=20)
    """
    if not isinstance(spec, SolverSpec):
        raise TypeError(f"spec must be a genflow.sampling.SolverSpec; got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"spec.name must be a non-empty str; got {spec.name!r}")
    check_registration("solver", spec.name, registry_owner(SOLVERS, _BUILTIN, spec.name), overwrite)
    if not callable(spec.run):
        raise TypeError(f"spec.run must be callable; got {type(spec.run).__name__}")
    # (nfe_per_step="one", order=-1 and target="whatever" were accepted, and misreported by solvers())
    if not (isinstance(spec.order, numbers.Real) and not isinstance(spec.order, (bool, np.bool_)) and spec.order > 0):
        raise ValueError(f"spec.order must be a number > 0; got {spec.order!r}")
    if spec.nfe_per_step is None and not spec.adaptive or spec.nfe_per_step is not None and not is_int(spec.nfe_per_step, 1):
        raise ValueError(f"spec.nfe_per_step must be an int >= 1 (None only for an adaptive solver); got "
                         f"{spec.nfe_per_step!r}")
    if spec.target not in ("flow_map", "sde", "distribution"):
        raise ValueError(f"spec.target must be 'flow_map', 'sde' or 'distribution'; got {spec.target!r}")
    for flag in ("stochastic", "adaptive"):  # ("yes" / None were stored and misreported)
        check_bool(f"spec.{flag}", getattr(spec, flag))
    if not isinstance(spec.options, (tuple, list)) or not all(isinstance(o, str) for o in spec.options):
        # (a bare string "scale" was read as the options 's', 'c', 'a', 'l', 'e')
        raise TypeError(f"spec.options must be a tuple of option names (str); got {spec.options!r}")
    if not isinstance(spec.traced_options, (tuple, list)) or not set(spec.traced_options) <= set(spec.options):
        raise ValueError(f"spec.traced_options must be a tuple of names from spec.options {tuple(spec.options)}; got "
                         f"{spec.traced_options!r}")
    check_bool("spec.evaluates_at_end", spec.evaluates_at_end)
    SOLVERS[spec.name] = spec
    return spec


def unregister(name: str) -> SolverSpec:
    """Remove solver ``name`` added by :func:`register`; returns its spec. genflow's own solvers and
    unknown names are refused (``ValueError``)."""
    check_removal("solver", name, registry_owner(SOLVERS, _BUILTIN, name), set(SOLVERS) - _BUILTIN)
    return SOLVERS.pop(name)


def _rk_counts(solver: diffrax.AbstractSolver) -> tuple[int, int] | None:
    """``(nfe_per_step, nfe_init)`` of an explicit Runge-Kutta Diffrax solver, read from its
    tableau (an FSAL method evaluates its first stage once, before the first step); ``None`` for
    other solvers (implicit ones evaluate inside a root find)."""
    if isinstance(solver, diffrax.AbstractWrappedSolver):  # (HalfSolver(Euler()) is an Euler: 3 evaluations a step, not 1)
        return None
    if type(solver) is diffrax.Euler:
        return 1, 0
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or tableau is None:
        return None
    stages = len(tableau.c) + 1
    return (stages - 1, 1) if tableau.fsal else (stages, 0)


def diffrax_solver(name: str, solver: diffrax.AbstractSolver, *, order: float | None = None,
                   nfe_per_step: int | None = None, adaptive: bool = False, nfe_init: int | None = None,
                   description: str = "", evaluates_at_end: bool | None = None) -> SolverSpec:
    """The :class:`SolverSpec` of a Diffrax ODE solver on the probability-flow ODE in t (for
    :func:`register`): fixed steps on the time grid, or, with ``adaptive``, a PID controller
    (``rtol`` / ``atol`` of :func:`genflow.sample`).

    Args:
      name: the ``solver=`` string.
      solver: a Diffrax solver instance (e.g. ``diffrax.Ralston()``).
      order: its convergence order (reported by :func:`solvers`); default ``solver.order``.
      nfe_per_step: model evaluations per step (stages; FSAL methods count one less). Read from
        the tableau of an explicit Runge-Kutta solver (a value given must agree with it: it is
        what ``info.nfe`` reports); needed for other solvers.
      adaptive: step sizes from an error controller (``steps`` ignored).
      nfe_init: evaluations before the first step (1 for FSAL methods, as tsit5); read from the
        tableau as ``nfe_per_step``, else 0.
      description: one line for :func:`solvers`.
      evaluates_at_end: whether a step evaluates the model at its end (:class:`SolverSpec`); read
        from the tableau of a Runge-Kutta solver (a stage at ``c = 1`` or FSAL), needed for
        others that do (``diffrax.ReversibleHeun()``: an ``x0`` model on a grid ending at
        ``sigma = 0`` gave -inf samples).
    """
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"solver must be a diffrax.AbstractSolver instance; got {solver!r}")
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        # (fixed steps: optimistix's "Type of 'other' not understood" from the root finder's
        # unset tolerances; either way its Newton iterations make info.nfe a guess)
        raise ValueError(f"{type(solver).__name__} is an implicit solver: its evaluations per step depend on its "
                         f"root finder's iterations, so info.nfe could not be exact; the probability-flow ODE is "
                         f"not stiff at sampling step sizes: use an explicit solver")
    check_bool("adaptive", adaptive)
    if evaluates_at_end is not None:
        check_bool("evaluates_at_end", evaluates_at_end)
    structure = getattr(solver, "term_structure", None)
    structure = typing.get_origin(structure) or structure  # (AbstractTerm[Any, Any] is one term too)
    if not (isinstance(structure, type) and issubclass(structure, diffrax.AbstractTerm)
            and not issubclass(structure, diffrax.MultiTerm)):
        # (ShARK / SPaRK / ALIGN were accepted and failed at the first sample inside Diffrax)
        raise ValueError(f"{type(solver).__name__} needs more than one term (an SDE or partitioned solver): "
                         f"diffrax_solver wraps ODE solvers of the probability-flow ODE, one ODETerm; genflow's "
                         f"reverse-SDE solvers are 'euler_maruyama' and 'shark'")
    if adaptive and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        # (accepted, then failed at the first gf.sample: "Cannot use adaptive step sizes with a
        # solver that does not provide error estimates")
        raise ValueError(f"{type(solver).__name__} gives no error estimate, which adaptive=True steps by; use an "
                         f"embedded pair (diffrax.Heun(), Bosh3(), Tsit5(), ...) or adaptive=False")
    counts = _rk_counts(solver)
    # (the counts were trusted: a Bosh3 registered with nfe_per_step=2 reported 2 of its 3
    # evaluations per step in info.nfe, and NFE-matched comparisons were off by that much)
    if counts is None and nfe_per_step is None:
        raise ValueError(f"nfe_per_step is needed for {type(solver).__name__} (not an explicit Runge-Kutta "
                         f"solver, whose tableau gives it), and nfe_init for one that evaluates before its first "
                         f"step (a wrapped FSAL solver: HalfSolver(Tsit5()) takes 18 and 2)")
    for arg, given, derived in (("nfe_per_step", nfe_per_step, None if counts is None else counts[0]),
                                ("nfe_init", nfe_init, None if counts is None else counts[1])):
        if given is not None and not is_int(given, 0):
            raise ValueError(f"{arg} must be an int >= 0; got {given!r}")
        if given is not None and derived is not None and given != derived:
            raise ValueError(f"{arg}={given!r} does not match {type(solver).__name__}'s tableau, which gives "
                             f"{derived} (nfe_per_step, nfe_init = {counts}); omit it")
    nfe_per_step, nfe_init = counts if counts is not None else (nfe_per_step, nfe_init or 0)
    if order is None:
        try:
            order = solver.order(None)
        except Exception:  # (solvers whose order depends on the terms)
            raise ValueError(f"order is needed for {type(solver).__name__} (solver.order(None) failed)") from None
    return _ode_spec(name, order, solver, nfe_per_step,
                     description or f"{type(solver).__name__} on the probability-flow ODE in t (Diffrax)",
                     nfe_init, adaptive, bool(evaluates_at_end))
