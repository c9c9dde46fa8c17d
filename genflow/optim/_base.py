"""Helpers shared by genflow's optax transforms: hyper-parameter checks and schedules."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ScalarOrSchedule = float | Array | Callable[[Array], Array]


def resolve(h: ScalarOrSchedule, count: Array):
    """The value of a hyper-parameter at step ``count`` (0-based): ``h(count)`` for a schedule."""
    return h(count) if callable(h) else h


def _concrete(x) -> float | None:
    """``x`` as a Python float when it is a concrete number (not a tracer / schedule)."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0:
        return float(x)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.ndim == 0:
        return float(x)  # a concrete JAX scalar, e.g. jnp.float32(1e-3)
    return None


def check_dtype(name: str, value):
    """``value`` as a ``jnp.dtype`` (``None`` stays ``None``); a ``TypeError`` naming ``name`` otherwise."""
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except TypeError:
        raise TypeError(f"{name} must be a dtype (e.g. jnp.float32 or 'bfloat16') or None; got {value!r}") from None


def moment_update(m: Array, x: Array, decay) -> Array:
    """The moving average ``decay * m + (1 - decay) * x``, computed in the wider dtype of the two: a
    moment stored in float32 (``mu_dtype``) is also averaged in float32 for bfloat16 gradients
    (averaging in bfloat16 stalls ~2% low)."""
    dt = jnp.promote_types(m.dtype, x.dtype)
    return (1 - decay) * x.astype(dt) + decay * m.astype(dt)


def adam_moments(g: Array, m: Array, v: Array, b1, b2, c1, c2, eps) -> tuple[Array, Array, Array, Array]:
    """One leaf's Adam moments: ``(m^, sqrt(v^) + eps, m_t, v_t)`` with the bias corrections
    ``m^ = m_t c1``, ``sqrt(v^) = sqrt(v_t) c2``. The first two are in the wider dtype of the
    moments (float32 or wider: the second moment is stored so); ``m_t, v_t`` are cast back to
    their stored dtypes (injected float32 hyper-parameters promoted bfloat16 moments, and the
    state changed dtype)."""
    m_new = moment_update(m, g, b1)
    v_new = moment_update(v, jnp.square(g.astype(v.dtype)), b2)
    dt = jnp.promote_types(m_new.dtype, v_new.dtype)
    m_hat = m_new.astype(dt) * c1.astype(dt)
    den = jnp.sqrt(v_new).astype(dt) * c2.astype(dt) + eps
    return m_hat, den, m_new.astype(m.dtype), v_new.astype(v.dtype)


def wide_zeros_like(params):
    """Zeros like ``params`` in float32 or wider (second moments: in bfloat16, ``b2 = 0.999``
    rounds to 1 and the moment never decays; in float16, ``eps = 1e-8`` rounds to 0)."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)), params)


def check(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False, schedule: bool = False) -> None:
    """Validate a hyper-parameter at construction time.

    Python and numpy numbers and concrete scalar arrays are range-checked; arrays of other
    shapes are refused; traced values (e.g. a learning rate under ``vmap``) are accepted
    unchecked; callables are accepted only when ``schedule`` is true.
    """
    if callable(value):
        if schedule:
            return
        raise TypeError(f"{name} must be a number; got a callable {value!r} (schedules are not supported for {name})")
    if isinstance(value, bool) or not (isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))):
        kind = "a float or an optax schedule" if schedule else "a float"
        raise TypeError(f"{name} must be {kind}; got {type(value).__name__} {value!r}")
    if not isinstance(value, jax.core.Tracer) and np.ndim(value) != 0:
        # (a concrete array escaped the range check and broadcast against the parameters)
        raise TypeError(f"{name} must be a scalar; got an array of shape {np.shape(value)}")
    v = _concrete(value)
    if v is None:
        return
    bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi)))
    if bad or not np.isfinite(v):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open or hi is None else "]"
        rng = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
        hint = ""
        dt = getattr(value, "dtype", None)
        if dt is not None and jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32:
            # optax.inject_hyperparams casts hyper-parameters to the parameters' dtype by default
            hint = (f" (a {jnp.dtype(dt).name} value: b2 = 0.999 rounds to 1 and eps = 1e-8 to 0 in 16 bits; "
                    f"with optax.inject_hyperparams on low-precision parameters pass hyperparam_dtype=jnp.float32)")
        raise ValueError(f"{name} must lie in {rng}; got {v}{hint}")


def check_beta(name: str, value) -> None:
    check(name, value, lo=0.0, hi=1.0, hi_open=True)


def with_decay_and_lr(direction: optax.GradientTransformation, learning_rate: ScalarOrSchedule,
                      weight_decay: ScalarOrSchedule, mask: Any) -> optax.GradientTransformation:
    """``direction``, then decoupled weight decay (as ``optax.adamw``), then ``-learning_rate``.

    The public form of an Adam-like ``scale_by_*`` direction; checks both coefficients.
    """
    check("learning_rate", learning_rate, lo=0.0, schedule=True)
    check("weight_decay", weight_decay, lo=0.0, schedule=True)
    return optax.chain(direction, optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def decay_mask(mask, params):
    """The boolean weight-decay mask tree (``None``: decay every leaf)."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    m = mask(params) if callable(mask) else mask
    # a prefix tree (one flag for a whole sub-tree, as optax's masks allow) covers its sub-tree
    return jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), m, params)


def rms(x: Array) -> Array:
    """Root mean square of one array, accumulated in float32 or wider (a scalar), computed on
    ``x / max|x|`` so that squares neither overflow nor underflow (in float32, ``x ~ 1e20`` gave
    inf and ``x ~ 1e-20`` gave 0: FAdam's weight decay and its scale invariance dropped out)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.size == 0:
        return jnp.zeros([], x.dtype)
    # (no gradient through the scale: its -x / a^2 term overflowed; the value's gradient stays x / (n rms))
    a = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
    ok = jnp.isfinite(a) & (a > 0)
    safe_a = jnp.where(ok, a, 1.0)
    # (an inf or NaN entry keeps the plain formula's inf / NaN; all zeros give 0)
    return safe_a * jnp.sqrt(jnp.mean(jnp.square(x / safe_a)))


def unzip(tree_of_tuples, like, n: int) -> tuple:
    """Split a tree whose leaves (at the positions of ``like``'s leaves) are n-tuples into n trees."""
    treedef = jax.tree.structure(like)
    leaves = treedef.flatten_up_to(tree_of_tuples)
    return tuple(treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n))
