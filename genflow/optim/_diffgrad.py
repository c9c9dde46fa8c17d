"""diffGrad: Adam with a friction coefficient from the change of the gradient.

Implementation of "diffGrad: An Optimization Method for Convolutional Neural Networks"
(Dubey, Chakraborty, Roy, Mukherjee, Singh & Chaudhuri, IEEE TNNLS 2020,
https://arxiv.org/abs/1909.11015).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from genflow.optim._base import (ScalarOrSchedule, adam_moments, check, check_beta, check_dtype, resolve, unzip,
                                 wide_zeros_like, with_decay_and_lr)

Array = jax.Array


class ScaleByDiffGradState(NamedTuple):
    """State of :func:`scale_by_diffgrad`."""

    count: Array  # int32 [], updates applied so far
    mu: optax.Updates  # first moment m_t
    nu: optax.Updates  # second moment v_t
    prev_grad: optax.Updates  # g_{t-1} (zeros before the first update)


def scale_by_diffgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """The diffGrad direction (no learning rate, no sign flip).

    With ``t`` counted from 1 and ``g_0 = 0``::

        m_t = b1 m_{t-1} + (1 - b1) g_t           v_t = b2 v_{t-1} + (1 - b2) g_t^2
        m^_t = m_t / (1 - b1^t)                    v^_t = v_t / (1 - b2^t)
        xi_t = sigmoid(|g_{t-1} - g_t|)             friction coefficient, in [1/2, 1)
        u_t = xi_t m^_t / (sqrt(v^_t) + eps)

    ``eps`` is added to the bias-corrected ``sqrt(v^_t)`` as in the paper (and in
    ``optax.adam``). The authors' code and ``pytorch_optimizer.DiffGrad`` add it to the
    uncorrected ``sqrt(v_t)`` and fold the corrections into the step size, i.e. they use
    ``eps / sqrt(1 - b2^t)`` in this formula; pass that as a schedule
    (``eps=lambda n: e / jnp.sqrt(1 - b2 ** (n + 1))``) to reproduce them exactly.

    Args:
      b1, b2: moment decay rates, in [0, 1).
      eps: added to ``sqrt(v^_t)``; a float or a schedule of the step count.
      mu_dtype: dtype of the first moment (default: that of the parameters). The second moment
        is kept in float32 or wider (in bfloat16, ``b2 = 0.999`` rounds to 1 and it never decays).
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check("eps", eps, lo=0.0, lo_open=True, schedule=True)
    mu_dtype = check_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        return ScaleByDiffGradState(count=jnp.zeros([], jnp.int32),
                                    mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                                    nu=wide_zeros_like(params),
                                    prev_grad=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        count_inc = optax.safe_increment(state.count)
        # scalar bias corrections: m^ = m c1, sqrt(v^) = sqrt(v) c2
        c1 = 1 / (1 - b1 ** count_inc.astype(float))
        c2 = jax.lax.rsqrt(1 - b2 ** count_inc.astype(float))
        e = resolve(eps, state.count)

        def leaf(g, m, v, g_prev):
            m_hat, den, m, v = adam_moments(g, m, v, b1, b2, c1, c2, e)
            # xi_t / D = sigmoid(|dg|) / D = 1 / ((1 + exp(-|dg|)) D): one division, not two
            friction = 1 + jnp.exp(-jnp.abs(g_prev.astype(den.dtype) - g.astype(den.dtype)))
            return (m_hat / (friction * den)).astype(g.dtype), m, v

        u, mu, nu = unzip(jax.tree.map(leaf, updates, state.mu, state.nu, state.prev_grad), updates, 3)
        prev = optax.tree.cast_like(updates, state.prev_grad)
        return u, ScaleByDiffGradState(count=count_inc, mu=mu, nu=nu, prev_grad=prev)

    return optax.GradientTransformation(init_fn, update_fn)


def diffgrad(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""diffGrad (Dubey et al. 2020): Adam damped where the gradient barely changes.

    The Adam step of each coordinate is multiplied by the friction coefficient
    ``xi_t = sigmoid(|g_{t-1} - g_t|)``: close to 1/2 where consecutive gradients agree (flat
    or converged regions, where Adam tends to overshoot), close to 1 where they change fast::

        theta_t = theta_{t-1} - lr_t * (xi_t m^_t / (sqrt(v^_t) + eps) + weight_decay theta_{t-1})

    (see :func:`scale_by_diffgrad`); ``weight_decay`` is decoupled as in AdamW (the paper has
    none; ``pytorch_optimizer.DiffGrad`` applies it the same way).

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, mu_dtype: see :func:`scale_by_diffgrad`.
      weight_decay: decoupled weight-decay coefficient.
      mask: weight-decay mask, as in ``optax.adamw``.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import genflow as gf
      >>> def f(x): return jnp.sum(x ** 2)
      >>> opt = gf.optim.diffgrad(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     updates, state = opt.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print([round(float(x), 3) for x in params])
      [0.805, -1.794, 2.793]

    References:
      Dubey et al., `diffGrad: An Optimization Method for Convolutional Neural Networks
      <https://arxiv.org/abs/1909.11015>`_, IEEE TNNLS 2020.
    """
    return with_decay_and_lr(scale_by_diffgrad(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype), learning_rate,
                             weight_decay, mask)
