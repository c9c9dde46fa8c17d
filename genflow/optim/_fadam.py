"""FAdam: Adam as a natural-gradient method with the diagonal empirical Fisher.

Implementation of "FAdam: Adam is a natural gradient optimizer using diagonal empirical
Fisher information" (Dongseong Hwang, 2024, https://arxiv.org/abs/2405.12807).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from genflow.optim._base import (ScalarOrSchedule, _concrete, check, check_beta, check_dtype, decay_mask,
                                 moment_update, resolve, rms, unzip, wide_zeros_like)

Array = jax.Array


class ScaleByFAdamState(NamedTuple):
    """State of :func:`scale_by_fadam`."""

    count: Array  # int32 [], updates applied so far
    momentum: optax.Updates  # m_t, momentum of the clipped natural gradient
    fim: optax.Updates  # f_t, diagonal empirical Fisher (EMA of g^2)


def scale_by_fadam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps2: float = 0.01,
    clip: float = 1.0,
    p: float = 0.5,
    weight_decay: ScalarOrSchedule = 0.1,
    mask: Any = None,
    momentum_dtype: Any = None,
) -> optax.GradientTransformation:
    """The FAdam direction ``m_t + weight_decay * w_t`` (no learning rate, no sign flip).

    Per parameter tensor (leaf), with ``t`` counted from 1 and ``RMS(x) = sqrt(mean(x^2))``::

        b2^_t   = b2 (1 - b2^(t-1)) / (1 - b2^t)              bias-corrected EMA rate (b2^_1 = 0)
        f_t     = b2^_t f_{t-1} + (1 - b2^_t) g_t^2             diagonal empirical Fisher
        e_t     = min(eps, eps2 RMS(g_t))  (eps if g_t = 0)     adaptive epsilon
        D_t     = f_t^p + e_t^(2p)                              preconditioner (p = 1/2: Adam's)
        gbar_t  = g_t / D_t / max(1, RMS(g_t / D_t) / clip)     clipped natural gradient
        m_t     = b1 m_{t-1} + (1 - b1) gbar_t                  momentum on the natural gradient
        w_t     = theta / D_t / max(1, RMS(theta / D_t) / clip) weight decay through the Fisher
        u_t     = m_t + weight_decay * w_t

    Args:
      b1: momentum decay of the natural gradient.
      b2: Fisher EMA decay (bias-corrected through ``b2^_t``).
      eps, eps2: the adaptive epsilon ``min(eps, eps2 RMS(g))``; ``eps`` may be a schedule.
      clip: RMS cap of the natural gradient and of the weight-decay term.
      p: exponent of the Fisher in the preconditioner.
      weight_decay: coefficient of the Fisher-preconditioned weight decay (float or schedule).
      mask: weight-decay mask, a tree of booleans or a callable on the params.
      momentum_dtype: dtype of ``m_t`` (default: that of the parameters). The Fisher is kept in
        float32 or wider (in bfloat16, ``b2 = 0.999`` rounds to 1 and it never decays).
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check("eps", eps, lo=0.0, lo_open=True, schedule=True)
    check("eps2", eps2, lo=0.0, lo_open=True)
    check("clip", clip, lo=0.0, lo_open=True)
    check("p", p, lo=0.0, lo_open=True)
    check("weight_decay", weight_decay, lo=0.0, schedule=True)
    momentum_dtype = check_dtype("momentum_dtype", momentum_dtype)
    no_decay = _concrete(weight_decay) == 0.0

    def init_fn(params):
        return ScaleByFAdamState(count=jnp.zeros([], jnp.int32),
                                 momentum=optax.tree.zeros_like(params, dtype=momentum_dtype),
                                 fim=wide_zeros_like(params))

    def update_fn(updates, state, params=None):
        if params is None and not no_decay:
            raise ValueError("fadam with weight_decay != 0 (or given as a schedule or a traced value, e.g. through "
                             "optax.inject_hyperparams) needs params: call update(grads, state, params)")
        count_inc = optax.safe_increment(state.count)
        t = count_inc.astype(float)
        b2_hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
        e = resolve(eps, state.count)
        wd = resolve(weight_decay, state.count)

        def precond(g, f):  # (g in the Fisher's dtype: float32 or wider)
            f = b2_hat.astype(f.dtype) * f + (1 - b2_hat).astype(f.dtype) * jnp.square(g)
            r = rms(g)
            scaled = eps2 * r
            e_pow = jnp.where((r > 0) & (scaled < e), scaled ** (2 * p), jnp.asarray(e, r.dtype) ** (2 * p))
            # sqrt when p is the number 0.5; a traced p (inject_hyperparams under jit) takes f ** p
            fp = jnp.sqrt(f) if isinstance(p, (int, float)) and p == 0.5 else f ** p
            return f, fp + e_pow.astype(fp.dtype)

        def clipped(x):
            return x / jnp.maximum(1.0, rms(x) / clip).astype(x.dtype)

        def leaf(g, m, f, theta, decay):
            # the natural gradient in the Fisher's dtype (float32 or wider), the momentum and
            # Fisher back in their stored dtypes
            g_w = g.astype(f.dtype)
            f_new, den = precond(g_w, f)
            m_new = moment_update(m, clipped(g_w / den), b1)
            u = m_new
            if decay and not no_decay:
                u = m_new + wd * clipped(theta.astype(den.dtype) / den)
            return u.astype(g.dtype), m_new.astype(m.dtype), f_new.astype(f.dtype)

        if params is None:
            params = updates  # unused: weight decay is 0
        decay_tree = decay_mask(mask, params) if not no_decay else jax.tree.map(lambda _: False, params)
        out = jax.tree.map(leaf, updates, state.momentum, state.fim, params, decay_tree)
        u, m, f = unzip(out, updates, 3)
        return u, ScaleByFAdamState(count=count_inc, momentum=m, fim=f)

    return optax.GradientTransformation(init_fn, update_fn)


def fadam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps2: float = 0.01,
    clip: float = 1.0,
    p: float = 0.5,
    weight_decay: ScalarOrSchedule = 0.1,
    mask: Any = None,
    momentum_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""FAdam (Hwang 2024): Adam read as natural gradient with the diagonal empirical Fisher.

    Compared with Adam, FAdam (i) takes momentum on the Fisher-preconditioned gradient
    instead of preconditioning the momentum, (ii) bias-corrects the Fisher EMA through its
    decay rate and drops the first-moment bias correction, (iii) clips the natural gradient
    to RMS <= ``clip`` per tensor, (iv) uses an adaptive epsilon ``min(eps, eps2 RMS(g))``,
    and (v) applies weight decay through the Fisher (also clipped)::

        theta_t = theta_{t-1} - lr_t * (m_t + weight_decay * w_t)    (see scale_by_fadam)

    Defaults follow the widely used ``pytorch_optimizer.FAdam`` (``weight_decay=0.1``). The
    preconditioner ``f^p + e^(2p)`` with the adaptive ``e = min(eps, eps2 RMS(g))`` and the clip
    ``max(1, RMS / clip)`` follow the paper's Algorithm 1, as pytorch_optimizer 4.1 does: the
    updates agree with it to float64 rounding (~4e-16 relative, also at ``eps = 0.5``,
    ``clip = 0.3``; the golden tests compare against it).

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, eps2, clip, p, weight_decay, mask, momentum_dtype: see
        :func:`scale_by_fadam`.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import genflow as gf
      >>> def f(x): return jnp.sum(x ** 2)
      >>> opt = gf.optim.fadam(learning_rate=0.1, weight_decay=0.0)
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     updates, state = opt.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print([round(float(x), 3) for x in params])
      [0.944, -1.944, 2.944]

    References:
      Hwang, `FAdam: Adam is a natural gradient optimizer using diagonal empirical Fisher
      information <https://arxiv.org/abs/2405.12807>`_, 2024.
    """
    check("learning_rate", learning_rate, lo=0.0, schedule=True)
    return optax.chain(
        scale_by_fadam(b1=b1, b2=b2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay, mask=mask,
                       momentum_dtype=momentum_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
