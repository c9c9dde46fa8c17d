"""Probability-flow ODE and reverse-SDE solvers built on Diffrax.

The ODE ``dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat`` is integrated from ``t_start`` down
to ``t_end`` (in forward time ``s = -t``). Fixed-step solvers step exactly through the time grid with the
solver's own ``step`` (in a loop of traced length when the grid is padded, so that a new step count
does not recompile; else in a ``lax.scan``, differentiable in both modes); adaptive ones use
``diffeqsolve`` with a PID controller.
The reverse SDE ``dx = [f x - g^2 score] dt + g dW`` (dt < 0) uses Diffrax's SDE solvers with a
fixed-step Brownian path.
"""

from __future__ import annotations

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx

from genflow import _checks, param
from genflow.sampling._driver import step_loop
from genflow.sampling._model import Model

Array = jax.Array


def per_sample_norm(y) -> Array:
    """The adaptive step-size controller's error norm: the largest per-sample RMS (over the leading
    batch axis of every leaf) of the scaled error, so that ``rtol`` / ``atol`` hold for each sample
    of a batch. Diffrax's default, the RMS over the whole batch, let one sample's error be diluted
    by ~1/sqrt(B): in a batch of 1,024 the worst sample of a tsit5 solve at rtol = atol = 1e-6 was
    1.8e-4 off the exact flow map, against 1.8e-5 for that sample solved alone (4.2e-6 in the
    batch with this norm). A state with a leaf without a batch axis, or whose leaves differ in
    their leading size (a backsolve adjoint's, which holds the parameters' cotangents), gets the
    plain RMS over everything."""
    leaves = jax.tree.leaves(y)
    if not leaves or any(jnp.ndim(v) == 0 or v.shape[0] != leaves[0].shape[0] for v in leaves):
        return optx.rms_norm(y)
    # (optimistix's RMS: a safe derivative at 0; initial=0: an empty batch's norm is 0, not an error)
    return jnp.max(jax.vmap(optx.rms_norm)(y), initial=0.0)


def _saveat(ts: Array, save_trajectory: bool, solver_state: bool = False) -> diffrax.SaveAt:
    """The states on the grid ``ts`` or the end state alone, and with ``solver_state`` the solver's
    final state too."""
    return diffrax.SaveAt(**({"ts": ts} if save_trajectory else {"t1": True}), solver_state=solver_state)


def explicit_axes_as_auto(run, x: Array, out_specs=None, args=()):
    """``run(x, *args)`` with the mesh's Explicit axes switched to Auto inside
    (:func:`jax.sharding.auto_axes`) where they shard ``x``; ``out_specs(spec)`` gives the partition
    specs of its outputs from ``x``'s ``spec`` (default: one output sharded as ``x``). Diffrax
    writes its Runge-Kutta stages and saved outputs with scatters that Explicit sharding refuses
    ("Use .at[...].set(out_sharding=)"): heun, tsit5, dopri5 and shark in ``gf.sample``, adaptive
    ``gf.log_prob`` and the mixture oracle's flow map failed on a batch placed with
    ``jax.make_mesh``'s default (Explicit) axes. Every Explicit axis of the mesh is switched (an
    unused ``"model"`` axis beside the batch's ``"data"`` failed to lower), and the arrays of
    ``args`` (the model's parameters, the grid, ...) enter as arguments: closed over, arrays
    placed on the same mesh kept their Explicit type and clashed with the Auto context. Auto axes
    and unsharded arrays run ``run`` as is."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    axes = tuple(getattr(mesh, "explicit_axes", ()))
    if not set(axes) & set(jax.tree.leaves(tuple(getattr(sharding, "spec", ())))):
        return run(x, *args)
    specs = sharding.spec if out_specs is None else out_specs(sharding.spec)
    shardings = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs,
                             is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec))
    dynamic, static = eqx.partition(args, eqx.is_array)
    return jax.sharding.auto_axes(lambda x, dynamic: run(x, *eqx.combine(dynamic, static)), axes=axes,
                                  out_sharding=shardings)(x, dynamic)


def _auto_twin(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """``mesh`` with every axis Auto."""
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def _explicit_mesh(x):
    """The mesh of concrete ``x`` where it has Explicit axes, else ``None``."""
    mesh = getattr(getattr(x, "sharding", None), "mesh", None)
    return None if isinstance(x, jax.core.Tracer) or not getattr(mesh, "explicit_axes", ()) else mesh


def explicit_as_auto_placement(x):
    """Concrete ``x`` placed on the same devices, its mesh's Explicit axes made Auto (no copy):
    for the entry points whose many internal solves (per-sample, dense, sized) are run on Auto
    axes rather than each wrapped (:func:`explicit_axes_as_auto`)."""
    mesh = _explicit_mesh(x)
    return x if mesh is None else jax.device_put(x, jax.sharding.NamedSharding(_auto_twin(mesh), x.sharding.spec))


def on_auto_axes(fun, argnum: int, name: str):
    """``fun`` run, when its argument ``argnum`` (or keyword ``name``) lies on a mesh's Explicit
    axes, inside ``jax.set_mesh`` of that mesh's Auto twin -- also where the caller is inside
    ``jax.set_mesh`` of the Explicit mesh, where every Auto-placed array failed ("context mesh ...
    should match the aval mesh") -- with the arrays it returns on that twin put back on the
    caller's mesh, their specs kept (a batch returned on Auto axes failed in the caller's next
    Explicit computation). The body places its inputs with :func:`explicit_as_auto_placement`."""

    @functools.wraps(fun)
    def run(*args, **kwargs):
        mesh = _explicit_mesh(args[argnum] if len(args) > argnum else kwargs.get(name))
        if mesh is None:
            return fun(*args, **kwargs)
        auto = _auto_twin(mesh)
        with jax.set_mesh(auto):
            out = fun(*args, **kwargs)

        def back(a):
            s = getattr(a, "sharding", None)
            if isinstance(a, jax.Array) and getattr(s, "mesh", None) == auto:
                return jax.device_put(a, jax.sharding.NamedSharding(mesh, s.spec))
            return a

        return jax.tree.map(back, out)

    return run


def _on_any_mesh(solve):
    """``solve(model, ts, x, key, **options) -> (x, nfe, trajectory, stats)`` on an Explicit-sharded
    batch too (:func:`explicit_axes_as_auto`): the samples sharded as the batch, the trajectory
    ``[N + 1, B, ...]`` along its batch axis."""

    def run(model: Model, ts: Array, x: Array, key, **options):
        none = jax.sharding.PartitionSpec()
        traj = options["save_trajectory"]
        return explicit_axes_as_auto(
            lambda x, model, ts, key, options: solve(model, ts, x, key, **options), x,
            lambda spec: (spec, none, jax.sharding.PartitionSpec(None, *spec) if traj else None, none),
            (model, ts, key, options))

    return run


def solve_checked(terms, solver, with_solver_state: bool = False, **kwargs):
    """``diffrax.diffeqsolve(terms, solver, **kwargs)`` with Diffrax's failure check (max_steps
    reached, ...) raised from a scalar: Diffrax raises it from the whole solution, and the
    check's host callback gives its output a one-device sharding -- a sharded batch came back
    gathered and replicated on every device (tsit5, dopri5, euler_maruyama, shark, ``gf.log_prob``),
    with a warning of "involuntary full rematerialization" under Explicit axes. Returns
    ``(ys, num_steps, stats)``, all tied to the check (it runs whenever they
    are used); with ``with_solver_state``, ``(ys, num_steps, stats, solver_state)`` (``sol.solver_state``,
    saved where ``saveat`` asks). A :class:`diffrax.BacksolveAdjoint`'s backward solve keeps Diffrax's own check. On
    a multi-device mesh the check runs on every device (:func:`genflow._checks.error_if`)."""
    adjoint = kwargs.get("adjoint")
    if isinstance(adjoint, diffrax.BacksolveAdjoint) and "throw" not in adjoint.kwargs:
        # (Diffrax hands throw=False on to the adjoint's backward solve: its failure went unchecked,
        # a wrong gradient without an error)
        kwargs["adjoint"] = diffrax.BacksolveAdjoint(**{"throw": True, **adjoint.kwargs})
    sol = diffrax.diffeqsolve(terms, solver, throw=False, **kwargs)
    n = _checks.error_if(sol.stats["num_steps"], jnp.invert(diffrax.is_okay(sol.result)), result=sol.result)
    # the results depend on the checked count, so the check runs whenever they are used (an
    # optimization barrier did not: under the caller's jit, with info discarded, XLA dropped it and
    # a solve cut off at max_steps returned unfinished samples without an error)
    tied = (sol.ys, sol.stats) + ((sol.solver_state,) if with_solver_state else ())
    tied = jax.tree.map(lambda y: jnp.where(n >= 0, y, jnp.zeros_like(y)), tied)
    return (tied[0], n, *tied[1:])


def reuses_last_evaluation(solver) -> bool:
    """Whether an adaptive solve with ``solver`` ends holding the velocity at its end point: a
    first-same-as-last Runge-Kutta method (tsit5, dopri5, dopri8), whose last stage of a step
    is evaluated at the step's end ``(t_1, y_1)`` and kept in the solver state for the next step."""
    return bool(getattr(getattr(solver, "tableau", None), "fsal", False))


def _ode_solve(model: Model, ts: Array, x: Array, key, *, solver: diffrax.AbstractSolver, adaptive: bool,
               nfe_per_step: int, nfe_init: int, rtol: float, atol: float, max_steps: int,
               save_trajectory: bool, num_steps=None, denoise: bool = False):
    """Integrate the probability-flow ODE over ``ts`` (decreasing). Returns ``(x, nfe, traj, stats)``.

    Integrated in forward time ``s = -t``. Adaptive solvers are first-same-as-last Runge-Kutta
    methods: Diffrax re-evaluates the first stage on every attempt of the first step (and keeps
    ``num_steps`` blind to it), so the first stage is evaluated here, once, and handed over as the
    solver state; the count ``1 + (stages - 1) * num_steps`` is then exact.

    ``denoise`` (an adaptive first-same-as-last solver only: :func:`reuses_last_evaluation`):
    return the denoised ``x0_hat(x(t_end), t_end)`` instead of ``x(t_end)``, converted from the
    velocity that the last step's last stage evaluated there (Diffrax's final solver state). No
    network evaluation is added (``nfe`` is the solve's), and the compiled program holds no copy of
    the network beyond the solve's: a call after the solve was one more, which XLA compiled again.
    The conversion ``velocity -> x0`` at ``(x, t_end)``, ``x0 = (sigma' x - sigma v) / D`` with
    ``D = alpha sigma' - sigma alpha'``, is exact up to rounding where ``D`` does not cancel (the
    caller's condition: :func:`genflow.sampling._grid.velocity_determines_x0`).

    ``num_steps``: a traced step count for a fixed-step solve over a grid padded past its end
    (no trajectory): the first ``num_steps`` intervals are stepped by the Diffrax solver's own
    ``step`` in a ``fori_loop``, so one compiled program serves every step count of a bucket."""
    del key
    term = diffrax.ODETerm(lambda s, y, args: -model.velocity(y, -s))
    # (under x64 the grid is float64: y + dt f would turn a float32 state float64 and break
    # Diffrax's loop carries, so the times are taken in the state's dtype)
    ss = -ts.astype(x.dtype)
    if num_steps is not None and (adaptive or save_trajectory):
        raise ValueError("num_steps is for fixed-step solves without a saved trajectory")
    if not adaptive:
        return _fixed_steps(term, solver, ss, x, nfe_per_step, nfe_init, save_trajectory, num_steps)
    if denoise and not reuses_last_evaluation(solver):
        raise ValueError(f"denoise=True needs an adaptive first-same-as-last Runge-Kutta solver; got "
                         f"{type(solver).__name__}")
    solver_state = None
    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=per_sample_norm)
    dt0 = (ss[-1] - ss[0]) / 16.0
    if reuses_last_evaluation(solver):  # (first_step, f0) of FSAL RK
        solver_state = (jnp.array(False), term.vf(ss[0], x, None))
    # (a non-FSAL solver, e.g. diffrax.Heun() from diffrax_solver(adaptive=True), keeps its own
    # state: the FSAL pair failed inside Diffrax with a pytree structure error)
    ys, n, sol_stats, final_state = solve_checked(term, solver, t0=ss[0], t1=ss[-1], dt0=dt0, y0=x,
                                                  stepsize_controller=controller,
                                                  saveat=_saveat(ss, save_trajectory, denoise), max_steps=max_steps,
                                                  solver_state=solver_state, with_solver_state=True)
    x_end, traj = ys[-1], ys if save_trajectory else None
    if denoise:  # (the state's f0 = term.vf(ss[-1], x_end) = -velocity(x_end, t_end))
        t_end = model._t(x_end, -ss[-1])
        x_end = param.convert(-final_state[1], x_end, t_end, model.path, "velocity", "x0").astype(x_end.dtype)
    nfe = nfe_init + nfe_per_step * n
    stats = {"num_steps": n, "num_accepted_steps": sol_stats["num_accepted_steps"],
             "num_rejected_steps": sol_stats["num_rejected_steps"]}
    return x_end, nfe, traj, stats


def _differentiable_stages(solver):
    """``solver`` with its Runge-Kutta stage loop of kind ``"bounded"``, which both forward and
    reverse mode differentiate (as Diffrax does under DirectAdjoint): its default checkpointed
    stage loop is a ``custom_vjp`` (no ``jax.jvp``), and ``"lax"`` a while loop (no ``jax.grad``).
    It cost ~2 us a step more when measured (jitted Heun, 32 steps, 2-D batch of 512: 0.36 vs 0.30 ms;
    a standalone re-measurement at stop 45 found no difference, 1.00-1.03x)."""
    if isinstance(solver, diffrax.AbstractRungeKutta) and solver.scan_kind is None:
        return eqx.tree_at(lambda s: s.scan_kind, solver, "bounded", is_leaf=lambda v: v is None)
    return solver


def _fixed_steps(term, solver, ss, x, nfe_per_step, nfe_init, save_trajectory, num_steps):
    """Step the Diffrax ``solver`` exactly through the grid ``ss`` (increasing), with its own
    ``step``: in a ``fori_loop`` of traced length ``num_steps`` (a padded grid, eager calls only:
    one compiled program per padding bucket) or else in a ``lax.scan`` over every interval, which
    both forward and reverse mode differentiate (``diffeqsolve``'s default adjoint is a
    ``custom_vjp``: no ``jax.jvp``)."""
    if num_steps is None:
        solver = _differentiable_stages(solver)
    state = solver.init(term, ss[0], ss[1], x, None)

    def step(carry, inp):
        (y, state), (i, _) = carry, inp
        y, _, _, state, _ = solver.step(term, ss[i], ss[i + 1], y, None, state, False)
        return y, state

    (x_end, _), ys, n = step_loop(step, (x, state), ss.shape[0] - 1, num_steps,
                                  (lambda carry: carry[0]) if save_trajectory else None)
    traj = jnp.concatenate([x[None], ys]) if save_trajectory else None
    stats = {"num_steps": n, "num_accepted_steps": n, "num_rejected_steps": jnp.zeros_like(n)}
    return x_end, nfe_init + nfe_per_step * n, traj, stats


def _sde_solve(model: Model, ts: Array, x: Array, key, *, solver: diffrax.AbstractSolver, nfe_per_step: int,
               max_steps: int, save_trajectory: bool, levy_area=diffrax.BrownianIncrement,
               brownian_tol: float | None = None, **_):
    """Integrate the reverse-time SDE over the fixed grid ``ts`` (decreasing).

    The noise ``g(t) dW`` is additive (it does not depend on x), so Euler-Maruyama has strong
    order 1 and ShARK (Foster et al. 2023) strong order 1.5 here. ``brownian_tol``: sample the
    Brownian motion from a :class:`diffrax.VirtualBrownianTree` of that tolerance, so that runs
    with different grids and the same key see the same Brownian path (strong-convergence checks);
    it must not exceed the grid's smallest step (``gf.sample`` refuses it: a coarser tree
    interpolates the path inside its leaves and the samples lose variance); by default the cheaper
    ``UnsafeBrownianPath`` (exact on a fixed grid). Reverse-mode differentiation (``jax.grad``
    through the samples) needs ``brownian_tol``: Diffrax refuses it through ``UnsafeBrownianPath``.
    Forward mode (``jax.jvp``) works without it; with it, for Euler-Maruyama only (ShARK then
    meets a ``custom_vjp`` that forward mode cannot enter).

    Stiffness at pure noise: on ``vp_cosine`` the drift ``f = d log alpha / dt`` is about -2.8e3
    at t = 1 (alpha(1) = 5.5e-4), so a first step of size h multiplies x by ~(1 + f h) per stage:
    ShARK from t = 1 on a uniform grid of 10 / 25 / 50 steps gave a variance of 4392 / 49 / 2.55
    for standard-normal data (1.05 at 100 steps), and Euler-Maruyama and ``pc`` on 10-step Karras
    or log-SNR grids 78-2359. Start these solvers slightly below t = 1 there (``t_start=0.99``) or
    use more steps."""
    path = model.path
    # Integrated in forward time s = -t (dx = -b(x, -s) ds + g(-s) dB_s): Diffrax's own time
    # reversal is fine for Euler-Maruyama but breaks stochastic Runge-Kutta methods that use the
    # space-time Levy area (ShARK diverges), so the solvers only ever see increasing time.
    drift = diffrax.ODETerm(lambda s, y, args: -model.reverse_drift(y, -s))

    def diffusion(s, y, args):
        t = jnp.asarray(-s, jnp.promote_types(y.dtype, jnp.float32))
        g = jnp.sqrt(jnp.maximum(path.diffusion_sq(t), 0.0)).astype(y.dtype)
        return lx.DiagonalLinearOperator(jnp.broadcast_to(g, y.shape))

    ss = -ts.astype(x.dtype)  # (float64 times under x64 promoted a float32 state to float64, as in ode_solve)
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if brownian_tol is None:  # fixed steps only, so the cheap UnsafeBrownianPath is exact
        bm = diffrax.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy_area)
    else:
        # always with the space-time Levy area, so that every SDE solver sees the same path for a key
        bm = diffrax.VirtualBrownianTree(ss[0], ss[-1], tol=brownian_tol, shape=shape, key=key,
                                         levy_area=diffrax.SpaceTimeLevyArea)
    terms = diffrax.MultiTerm(drift, diffrax.ControlTerm(diffusion, bm))
    ys, n, _ = solve_checked(
        terms, solver, t0=ss[0], t1=ss[-1], dt0=None, y0=x, stepsize_controller=diffrax.StepTo(ss),
        saveat=_saveat(ss, save_trajectory), max_steps=max_steps,
        # (Diffrax refuses reverse mode through UnsafeBrownianPath. With the tree, DirectAdjoint allows
        # reverse mode, and forward mode for Euler-Maruyama; RecursiveCheckpointAdjoint would refuse
        # forward mode for both. Same samples; forward pass within 3% of ForwardMode's, 100 steps.)
        adjoint=diffrax.ForwardMode() if brownian_tol is None else diffrax.DirectAdjoint(),
    )
    return ys[-1], nfe_per_step * n, ys if save_trajectory else None, {"num_steps": n}


# the solvers' runs: _ode_solve / _sde_solve on any batch, sharded or not
ode_solve = _on_any_mesh(_ode_solve)
sde_solve = _on_any_mesh(_sde_solve)
