"""FFJORD: a continuous normalizing flow trained by maximum likelihood (Grathwohl et al. 2019).

A network ``f(x, t)`` defines ``dx/dt = f``; data sit at ``t = 0`` and the base ``N(0, I)`` at
``t = 1`` (this repo's time convention), so

    log p(x) = log N(x_1; 0, I) + int_0^1 tr(df/dx)(x_t, t) dt

computed by :func:`genflow.likelihood.ode_log_prob` with the Hutchinson trace (fixed probes
along each solve) for training and the exact trace for evaluation. Gradients flow through the
solver with a Diffrax adjoint (``diffrax.BacksolveAdjoint`` is FFJORD's O(1)-memory adjoint;
the default ``RecursiveCheckpointAdjoint`` differentiates the discretised solve).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from genflow._checks import check_finite_rows, check_positive_real
from genflow.flows._flow import _check_data, objective_batch
from genflow.likelihood._discrete import uniform_dequantize
from genflow.likelihood._ode import GaussianPrior, _check_options, ode_log_prob

Array = jax.Array

__all__ = ["cnf_log_prob", "cnf_sample", "ffjord_loss", "ffjord_objective"]


def _velocity(apply_fn: Callable, params) -> Callable:
    return jax.tree_util.Partial(apply_fn, params)


def cnf_log_prob(apply_fn: Callable, params, x: Array, *, trace: str = "exact", key: Array | None = None,
                 num_probes: int = 1, probe: str = "rademacher", solver: str = "tsit5", steps: int | None = None,
                 rtol: float = 1e-5, atol: float = 1e-5, adjoint: diffrax.AbstractAdjoint | None = None,
                 chunk_size: int | None = None, max_steps: int = 16_384) -> tuple[Array, object]:
    """``log p(x)`` of the CNF ``dx/dt = apply_fn(params, x, t)``; ``x: [B, ...]`` -> ``([B], LogProbInfo)``.
    Options as :func:`genflow.likelihood.ode_log_prob` (``probe``: the Hutchinson probes' law).

    Its solvers are the likelihood solvers (``ode_log_prob``'s list, which has ``"ralston"``), and
    ``steps`` with an adaptive solver (as ``ffjord_loss``'s default ``tsit5`` with ``steps=8``) runs
    that solver on a fixed grid of ``steps`` uniform steps; :func:`cnf_sample` uses the sampling
    solvers, where an adaptive solver chooses its own steps (sample such a model with ``"tsit5"``
    at a tolerance, or a fixed-step solver with ``steps``)."""
    return ode_log_prob(_velocity(apply_fn, params), x, log_prior=GaussianPrior(jnp.ones((), x.dtype)), t0=0.0,
                        t1=1.0, trace=trace, key=key, num_probes=num_probes, probe=probe, solver=solver,
                        steps=steps, rtol=rtol, atol=atol, adjoint=adjoint, chunk_size=chunk_size,
                        max_steps=max_steps)


def cnf_sample(apply_fn: Callable, params, z: Array, *, solver: str = "tsit5", steps: int | None = None,
               rtol: float = 1e-5, atol: float = 1e-5) -> Array:
    """Samples ``x_0`` from base draws ``z: [B, ...]`` at t = 1, integrating ``dx/dt = f`` back to t = 0.

    ``solver``: a deterministic solver of :func:`genflow.sampling.solvers`; adaptive ones (the
    default ``"tsit5"``) use ``rtol`` / ``atol`` and refuse ``steps``; fixed-step ones take
    ``steps`` uniform steps (20 by default).
    """
    from genflow.paths import linear
    from genflow.sampling import sample, solvers

    if not hasattr(z, "shape") or z.ndim < 2:  # (a 1-D z came back as a 1-D "sample"; cnf_log_prob refuses it)
        raise ValueError(f"z must be an array [B, ...] with at least one feature axis; got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    if not jnp.issubdtype(z.dtype, jnp.floating):  # (gf.sample's errors named x1, not z)
        raise TypeError(f"z must be a floating-point array; got dtype {z.dtype}")
    spec = solvers().get(solver)  # (an unknown name is refused by name in sample)
    if spec is not None and spec.stochastic:
        # (the error asked for a key=, which cnf_sample does not take: a CNF has no reverse SDE)
        raise ValueError(f"solver {solver!r} is stochastic; a CNF is sampled by its ODE: pass a deterministic "
                         f"solver (e.g. 'tsit5', 'heun')")
    if spec is not None and spec.adaptive and steps is not None:
        # (steps was silently ignored by tsit5 here, while cnf_log_prob / ffjord_loss read it as a fixed grid)
        raise ValueError(f"steps={steps!r} has no effect on the adaptive solver {solver!r} (rtol / atol choose its "
                         f"steps): pass steps=None, or a fixed-step solver such as 'heun' with steps")
    steps = 20 if steps is None else steps
    if spec is not None and spec.adaptive:  # (as gf.sample: a fixed-step solve keeps a NaN row in its row)
        check_finite_rows("z", z)

    x, _ = sample(_velocity(apply_fn, params), linear(), z, prediction="velocity", solver=solver, steps=steps,
                  rtol=rtol, atol=atol, denoise=False, t_end=0.0)
    return x


def ffjord_loss(apply_fn: Callable, params, x: Array, key: Array, *, num_probes: int = 1, probe: str = "rademacher",
                solver: str = "tsit5", steps: int | None = 8, rtol: float = 1e-5, atol: float = 1e-5,
                adjoint: diffrax.AbstractAdjoint | None = None) -> Array:
    """FFJORD's maximum-likelihood loss with the Hutchinson trace: ``-mean log p(x) / D``; ``x: [B, ...]``."""
    _check_data(x)
    logp, _ = ode_log_prob(_velocity(apply_fn, params), x, log_prior=GaussianPrior(jnp.ones((), x.dtype)),
                           t0=0.0, t1=1.0, trace="hutchinson", key=key, num_probes=num_probes, probe=probe,
                           solver=solver, steps=steps, rtol=rtol, atol=atol, adjoint=adjoint)
    return -jnp.mean(logp) / math.prod(x.shape[1:])


def _option(bound: dict, name: str):
    """``ffjord_loss``'s option ``name``: the bound value, else its default."""
    return bound.get(name, inspect.signature(ffjord_loss).parameters[name].default)


def ffjord_objective(apply_fn: Callable, *, dequantize: float | None = None, **kwargs) -> Callable:
    """``loss_fn(params, batch, key)`` of :func:`ffjord_loss` for :func:`genflow.train.make_train_step`
    (``dequantize``: uniform dequantization bin width applied to every batch)."""
    if dequantize is not None:  # (as flow_objective: a negative width was accepted)
        check_positive_real("dequantize", dequantize)
    # (an unknown option or num_probes=0 failed only at the first training step, inside the jit)
    try:
        opts = inspect.signature(ffjord_loss).bind(None, None, None, None, **kwargs).arguments
    except TypeError as e:
        raise TypeError(f"ffjord_objective: {e} (its options are ffjord_loss's keyword arguments)") from None
    get = functools.partial(_option, opts)
    # (a stand-in key: the real one comes per step)
    _check_options("hutchinson", get("solver"), get("steps"), get("probe"), get("num_probes"), key=jax.random.key(0),
                   rtol=get("rtol"), atol=get("atol"))

    def loss_fn(params, batch, key):
        x = objective_batch(batch)
        k_deq, k_loss = jax.random.split(key)
        if dequantize is not None:  # (widened to float32 there: integer batches failed, bfloat16 ones left the bin)
            x = uniform_dequantize(k_deq, x, dequantize)[0]
        return ffjord_loss(apply_fn, params, x, k_loss, **kwargs), {}

    return loss_fn
