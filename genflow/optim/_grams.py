"""Grams: gradient descent with adaptive momentum scaling.

Implementation of "Grams: Gradient Descent with Adaptive Momentum Scaling"
(Yang Cao, Xiaoyu Li, Zhao Song, 2024, https://arxiv.org/abs/2412.17107).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from genflow.optim._base import (ScalarOrSchedule, adam_moments, check, check_beta, check_dtype, resolve, unzip,
                                 wide_zeros_like, with_decay_and_lr)

Array = jax.Array


class ScaleByGramsState(NamedTuple):
    """State of :func:`scale_by_grams`."""

    count: Array  # int32 [], updates applied so far
    mu: optax.Updates  # first moment m_t
    nu: optax.Updates  # second moment v_t


def scale_by_grams(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Adam's magnitude with the sign of the current gradient (the Grams direction).

    With ``t`` counted from 1::

        m_t = b1 m_{t-1} + (1 - b1) g_t           v_t = b2 v_{t-1} + (1 - b2) g_t^2
        m^_t = m_t / (1 - b1^t)                    v^_t = v_t / (1 - b2^t)
        u_t = sign(g_t) * |m^_t / (sqrt(v^_t) + eps)|

    Args:
      b1, b2: decay rates of the first and second moments, in [0, 1).
      eps: added to ``sqrt(v^_t)``; a float or a schedule of the step count.
      mu_dtype: dtype of the first moment (default: that of the parameters). The second moment
        is kept in float32 or wider (in bfloat16, ``b2 = 0.999`` rounds to 1 and it never decays).
    Returns:
      An ``optax.GradientTransformation`` producing ``u_t`` (no learning rate, no sign flip).
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check("eps", eps, lo=0.0, lo_open=True, schedule=True)
    mu_dtype = check_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        nu = wide_zeros_like(params)
        return ScaleByGramsState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        count_inc = optax.safe_increment(state.count)
        # scalar bias corrections: m^ = m c1, sqrt(v^) = sqrt(v) c2
        c1 = 1 / (1 - b1 ** count_inc.astype(float))
        c2 = jax.lax.rsqrt(1 - b2 ** count_inc.astype(float))
        e = resolve(eps, state.count)

        def leaf(g, m, v):
            m_hat, den, m, v = adam_moments(g, m, v, b1, b2, c1, c2, e)
            return (jnp.sign(g) * jnp.abs(m_hat / den)).astype(g.dtype), m, v

        u, mu, nu = unzip(jax.tree.map(leaf, updates, state.mu, state.nu), updates, 3)
        return u, ScaleByGramsState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def grams(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Grams (Cao, Li & Song 2024): Adam-style magnitude, sign of the current gradient.

    Grams decouples the direction of the update from its size: the size is that of the
    bias-corrected Adam step, the direction the sign of the *current* gradient (not of the
    momentum), so the update always points downhill for the current batch::

        u_t = sign(g_t) * |m^_t / (sqrt(v^_t) + eps)|           (see scale_by_grams)
        theta_t = theta_{t-1} - lr_t * (u_t + weight_decay * theta_{t-1})

    with decoupled weight decay as in AdamW (Algorithm 1 of the paper).

    Args:
      learning_rate: a float or an optax schedule of the step count.
      b1, b2: moment decay rates.
      eps: added to the root of the second moment (float or schedule).
      weight_decay: decoupled weight-decay coefficient.
      mask: weight-decay mask (a tree of booleans or a callable on the params), as in
        ``optax.adamw``.
      mu_dtype: dtype of the first moment.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import genflow as gf
      >>> def f(x): return jnp.sum(x ** 2)
      >>> opt = gf.optim.grams(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     updates, state = opt.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print([round(float(x), 3) for x in params])
      [0.702, -1.701, 2.7]

    References:
      Cao, Li & Song, `Grams: Gradient Descent with Adaptive Momentum Scaling
      <https://arxiv.org/abs/2412.17107>`_, 2024.
    """
    return with_decay_and_lr(scale_by_grams(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype), learning_rate,
                             weight_decay, mask)
