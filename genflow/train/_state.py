"""Train state: parameters, optimizer state, step counter, PRNG key and EMA parameters."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genflow._checks import check_key, concrete_real
from genflow.optim._registry import check_transform

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a resumed run needs (a pytree: checkpointable, shardable, donatable).

    Attributes:
      step: int32 scalar, number of applied updates.
      params: model parameters.
      opt_state: optimizer state.
      rng: PRNG key; every random draw of the loop (batches of on-device data, loss noise)
        derives from it, so a run restored from a checkpoint continues bit-identically.
      ema: ``{"0.999": params, ...}`` exponential moving averages of the parameters.
    """

    step: Array
    params: dict
    opt_state: optax.OptState
    rng: Array
    ema: dict = dataclasses.field(default_factory=dict)

    def replace(self, **kw) -> "TrainState":
        return dataclasses.replace(self, **kw)


def is_typed_key(x) -> bool:
    """A typed PRNG key array (``TrainState.rng``), or its ``ShapeDtypeStruct`` (an abstract
    restore target: its rng came back as raw ``uint32`` data)."""
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def ema_key(decay: float) -> str:
    """The key of an EMA decay in ``TrainState.ema``: the shortest string that reads back as the
    same float (``"0.99"``, ``"0.9999995"``), so nearby decays never share a key. The key is that
    of the decay's exact value: a NumPy / JAX float32 ``0.999`` is ``0.99900001287...``, keyed
    ``"0.9990000128746033"``; look it up with ``ema_key`` of the same value you passed to
    :func:`init_state` (``ema_key(0.999)`` is ``"0.999"``), or pass Python floats."""
    return repr(float(decay))


def _ema_copy(x):
    """An EMA copy of a parameter: floats in float32 or wider (a bfloat16 EMA at decay 0.9999
    rounds every update away), others as they are."""
    x = jnp.asarray(x)
    return jnp.array(x, jnp.promote_types(x.dtype, jnp.float32)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(x)


def _check_param_leaves(params) -> None:
    """Every leaf of ``params`` must be an array or a number: an equinox Module passed whole holds
    its activation functions as leaves and failed in ``jnp.array`` as "Value '<custom_jvp ...>'
    with dtype object is not a valid JAX array type", naming neither ``params`` nor the leaf."""
    for where, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)):
            raise TypeError(
                f"params must be a pytree of arrays; the leaf at {jax.tree_util.keystr(where) or 'the root'} is a "
                f"{type(leaf).__name__} ({leaf!r:.80}). A model object that also holds functions or other "
                f"non-array fields (an equinox Module, a flax.nnx Module) is split first: "
                f"params, static = eqx.partition(model, eqx.is_array) (model = eqx.combine(params, static) "
                f"in the loss), or graphdef, params = nnx.split(model)")


def init_state(params, optimizer: optax.GradientTransformation, key: Array,
               ema_decays: tuple[float, ...] = ()) -> TrainState:
    """A fresh :class:`TrainState` (EMA copies start equal to ``params``, floats in float32 or
    wider).

    The state holds copies of ``params`` and ``key``: :func:`fit` donates the state's buffers,
    and the caller's arrays must stay usable afterwards."""
    if isinstance(ema_decays, (str, bytes)) or not isinstance(ema_decays, Iterable):
        raise TypeError(f"ema_decays must be a tuple of floats in (0, 1); got {ema_decays!r}")
    for d in ema_decays:
        v = concrete_real(d)
        if v is None or not 0.0 < v < 1.0:
            raise ValueError(f"ema_decays must lie in (0, 1); got {d!r}")
    check_transform(optimizer, "init_state's optimizer")
    check_key(key)  # (an int or a split key array failed inside fit, far from here)
    _check_param_leaves(params)
    params = jax.tree.map(jnp.array, params)
    ema = {ema_key(d): jax.tree.map(_ema_copy, params) for d in ema_decays}
    # (copied too: an optimizer state may hold the parameters themselves -- prodigy's params0,
    # dog's init_params -- or one array in several leaves, and fit donates every buffer once)
    opt_state = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, optimizer.init(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.tree.map(jnp.copy, key), ema=ema)  # (fit donates the state: not the caller's key)
