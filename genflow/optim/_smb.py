"""SMB: stochastic gradient descent bolstered by model building.

Implementation of "Bolstering Stochastic Gradient Descent with Model Building"
(S. Ilker Birbil, Ozgur Martin, Gonenc Onay & Figen Oztoprak, TOP 2024,
https://arxiv.org/abs/2111.07058; authors' code: https://github.com/sibirbil/SMB).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from genflow.optim._base import ScalarOrSchedule, check, decay_mask, resolve

Array = jax.Array


class SMBState(NamedTuple):
    """State of :func:`smb`."""

    count: Array  # int32 [], updates applied so far
    model_steps: Array  # int32 [], how many of them were model steps (Armijo test failed)


def holds_smb(tx) -> bool:
    """Whether the transform ``tx`` keeps an :class:`SMBState` (it is :func:`smb`, under any
    registered name or ``functools.partial``, or chains it). Read from the shapes of
    ``tx.init({})``; a transform whose ``init`` refuses empty parameters counts as not SMB (e.g.
    ``optax.masked(smb(...), mask)`` with a mask tree: not detected)."""
    try:
        state = jax.eval_shape(tx.init, {})
    except Exception:  # (an init that needs real parameters: not smb's, which ignores them)
        return False
    return state_holds_smb(state)


def state_holds_smb(state) -> bool:
    """Whether an optimizer state (any pytree) contains an :class:`SMBState`."""
    return any(isinstance(x, SMBState) for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SMBState)))


def _is_masked_node(x) -> bool:
    return type(x).__name__ == "MaskedNode"


def _vdot(a: Array, b: Array) -> Array:
    return jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32)) if a.dtype != jnp.float64 else jnp.vdot(a, b)


def model_step(s: Array, g: Array, g_trial: Array, eta: float) -> Array:
    """SMB's model-based step for one parameter tensor (one "parameter group").

    Given the trial step ``s = -lr g`` and the gradient ``g_t`` at ``theta + s`` (same batch),
    with ``y = g_t - g``, the new step minimizes a model of the loss built from the two
    gradients, regularized by ``sigma``; it lies in span{s, g, y}::

        sigma = (|s| (|y| + |g| / eta) - s.y) / 2
        theta = (s.y + 2 sigma)^2 - |s|^2 |y|^2
        c_g = -|s|^2 / (2 sigma)
        c_s = c_g / theta * (-(s.y + 2 sigma) y.g + |y|^2 s.g)
        c_y = c_g / theta * (-(s.y + 2 sigma) s.g + |s|^2 y.g)
        s_new = c_s s + c_g g + c_y y

    A tensor whose gradient is exactly zero keeps ``s_new = s = 0`` (the formulas are 0/0
    there). Inner products are accumulated in float32 (float64 for float64 tensors) and the
    coefficients computed from normalized ones (the result is the same; see the code).

    Args:
      s, g, g_trial: ``[...]`` arrays of one tensor's shape.
      eta: the model-building parameter in (0, 1).
    Returns:
      ``s_new``, same shape and dtype as ``s``.
    """
    y = g_trial - g
    ss, yy, gg = _vdot(s, s), _vdot(y, y), _vdot(g, g)
    sy, sg, yg = _vdot(s, y), _vdot(s, g), _vdot(y, g)
    ok = (ss > 0) & (gg > 0)
    # The coefficients are homogeneous: with s scaled to unit norm and g, y by 1/|g|, c_s is
    # unchanged and c_g, c_y scale by |g| / |s|. Computing them on the normalized inner products
    # keeps every intermediate O(1) (near a minimum the raw products underflow in float32).
    ns, ng = jnp.sqrt(jnp.where(ok, ss, 1.0)), jnp.sqrt(jnp.where(ok, gg, 1.0))
    yy_, sy_, sg_, yg_ = yy / (ng * ng), sy / (ns * ng), sg / (ns * ng), yg / (ng * ng)
    r = 1.0 / eta  # |g| / eta, normalized
    a = jnp.sqrt(yy_) + r  # s.y + 2 sigma
    sigma = 0.5 * (a - sy_)
    # theta = a^2 - |s|^2 |y|^2 in closed form, free of cancellation when y is parallel to s
    theta = r * (2.0 * jnp.sqrt(yy_) + r)
    c_g = -1.0 / (2.0 * sigma)
    c_s = c_g / theta * (-a * yg_ + yy_ * sg_)
    c_y = c_g / theta * (-a * sg_ + yg_)
    dt = ss.dtype
    scale = ns / ng
    new = c_s * s.astype(dt) + (c_g * scale) * g.astype(dt) + (c_y * scale) * y.astype(dt)
    return jnp.where(ok, new, s.astype(dt)).astype(s.dtype)


def smb(
    learning_rate: ScalarOrSchedule = 1.0,
    c: float = 0.1,
    eta: float = 0.99,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SMB (Birbil et al. 2024): SGD with a model-building correction of the step.

    Each update first tries the SGD step ``s = -lr g`` (``g`` the incoming gradient at
    ``theta``, loss ``f = value``). If the trial point satisfies the Armijo condition on the
    same batch,

        value_fn(theta + s) <= f - c lr |g|^2,

    it is taken. Otherwise SMB evaluates the gradient ``g_t = grad value_fn(theta + s)`` and,
    for every parameter tensor separately, replaces ``s`` by the minimizer of a model of the
    loss built from ``(s, g, g_t)`` (see :func:`model_step`), which changes both the length
    and the direction of the step. A step with ``|g| < 1e-8`` is always the trial step. A trial
    point where the loss is not finite (outside its domain, e.g. ``log`` of a negative weight)
    fails the Armijo test, as in the authors' code, so the model step is built from the gradient
    there: if that gradient is finite the step is taken, and a loss that is undefined at the new
    point stops :func:`genflow.train.fit` one step later (with the last good state). Lower the
    learning rate, or keep the parameters in the domain by construction (e.g. ``softplus``).

    Cost per update: one extra loss evaluation, plus one gradient evaluation when the
    Armijo test fails (``lax.cond``: under ``vmap`` both branches run).

    Interface: a ``GradientTransformationExtraArgs`` whose ``update`` needs
    ``value_fn=`` (``value_fn(params) -> scalar loss`` on the same batch and PRNG key as the
    gradient) and takes ``value=`` (the loss at ``params``; computed with ``value_fn`` when
    missing). :func:`genflow.train.make_train_step` passes both. ``g`` is the incoming
    update, so place SMB first in an ``optax.chain`` (after e.g. clipping, ``g`` and ``g_t``
    would be inconsistent).

    Masks: SMB re-evaluates the loss at full parameter trees, so it cannot run inside
    ``optax.masked`` (which hides the masked-out leaves); use ``mask=`` instead. Leaves
    where the mask is False are held fixed in the trial and model steps and their incoming
    updates are passed through unchanged, exactly as ``optax.masked`` does.

    Args:
      learning_rate: the SGD trial step size (float or optax schedule). The paper's default
        is 1.
      c: Armijo constant in (0, 1).
      eta: model-building parameter in (0, 1) (the authors' default 0.99).
      mask: a tree of booleans (or a callable on the params) selecting the leaves SMB
        updates.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import genflow as gf
      >>> def f(x): return 0.5 * jnp.sum(jnp.array([1.0, 10.0, 100.0]) * x ** 2)
      >>> opt = gf.optim.smb(learning_rate=0.05)  # too large for SGD on this problem (2/L = 0.02)
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     value, grad = jax.value_and_grad(f)(params)
      ...     updates, state = opt.update(grad, state, params, value=value, value_fn=f)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(20):
      ...     params, state = step(params, state)
      >>> print(f"loss {f(params):.3f}, model steps {int(state.model_steps)}")
      loss 0.171, model steps 20

    References:
      Birbil, Martin, Onay & Oztoprak, `Bolstering Stochastic Gradient Descent with Model
      Building <https://arxiv.org/abs/2111.07058>`_, TOP 2024.
    """
    check("learning_rate", learning_rate, lo=0.0, schedule=True)
    check("c", c, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check("eta", eta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)

    def init_fn(params):
        del params
        return SMBState(count=jnp.zeros([], jnp.int32), model_steps=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, value=None, value_fn: Callable | None = None, **extra_args):
        del extra_args
        if value_fn is None:
            raise ValueError(
                "smb needs value_fn=, a function params -> loss on the same batch (and PRNG key) as the "
                "gradient: call update(grads, state, params, value=loss, value_fn=f); genflow.train.make_train_step "
                "passes it")
        if params is None:
            raise ValueError("smb needs params: call update(grads, state, params, value_fn=...)")
        if any(_is_masked_node(x) for x in jax.tree.leaves(params, is_leaf=_is_masked_node)):
            raise ValueError("smb cannot run inside optax.masked (it re-evaluates the loss on the full parameter "
                             "tree); use gf.optim.smb(..., mask=...) instead")
        on = decay_mask(mask, params)  # (a prefix tree covers its sub-tree, as optax.masked allows)
        lr = resolve(learning_rate, state.count)
        if value is None:
            value = value_fn(params)

        zero = lambda g: jnp.zeros_like(g)  # noqa: E731
        g = jax.tree.map(lambda u, m: u if m else zero(u), updates, on)
        s = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), g)
        trial = jax.tree.map(lambda p, d: p + d.astype(p.dtype), params, s)
        g_sq = sum((_vdot(x, x) for x in jax.tree.leaves(g)), jnp.zeros([], jnp.float32))
        f_trial, vjp = jax.vjp(value_fn, trial)
        if jnp.ndim(f_trial) != 0 or jnp.ndim(value) != 0:  # (shape (1,) failed as "Pred must be a scalar")
            raise ValueError(f"smb needs a scalar loss: value_fn returned shape {jnp.shape(f_trial)} and value has "
                             f"shape {jnp.shape(value)}")
        armijo = f_trial <= value - c * lr * g_sq
        take_trial = armijo | (jnp.sqrt(g_sq) < 1e-8)

        def model():
            (g_trial,) = vjp(jnp.ones_like(f_trial))
            return jax.tree.map(lambda si, gi, gti, m: model_step(si, gi, gti, eta) if m else si, s, g, g_trial, on)

        step = jax.lax.cond(take_trial, lambda: s, model)
        out = jax.tree.map(lambda st, u, m: st if m else u, step, updates, on)
        new_state = SMBState(count=optax.safe_increment(state.count),
                             model_steps=state.model_steps + (~take_trial).astype(jnp.int32))
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
