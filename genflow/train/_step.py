"""The train step: one optimizer update, guarded against non-finite losses."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from genflow.train._state import TrainState

Array = jax.Array
LossFn = Callable[[Any, Any, Array], tuple[Array, dict]]


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Build ``step(state, batch) -> (state, metrics)`` (pure; jit it or use :func:`fit`).

    ``loss_fn(params, batch, key) -> (loss, aux)`` with ``aux`` a dict of scalars (arrays of
    other shapes are dropped from the metrics). The optimizer receives the loss as
    ``value=loss`` and a closure ``value_fn(params) -> loss`` on the same batch and key as
    extra arguments (optax's ``GradientTransformationExtraArgs`` convention), so MoMo-style
    transforms that need the loss, and model-building ones that re-evaluate it, work unchanged;
    plain transforms ignore them.

    A step whose loss or gradients are not finite leaves the state untouched and reports
    ``metrics["finite"] = False``; :func:`genflow.train.fit` then stops with the last good state.
    """
    tx = optax.with_extra_args_support(optimizer)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng, key = jax.random.split(state.rng)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)

        def value_fn(p):
            return loss_fn(p, batch, key)[0]

        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss, value_fn=value_fn)
        params = optax.apply_updates(state.params, updates)
        ema = {k: jax.tree.map(lambda e, p, d=float(k): d * e + (1.0 - d) * p, v, params)
               for k, v in state.ema.items()}
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, ema=ema)
        # Keep the previous state on a non-finite step (the loop stops there).
        new = jax.lax.cond(finite, lambda: new, lambda: state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite}
        metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
        return new, metrics
    return step
