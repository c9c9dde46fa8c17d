"""The train step: one optimizer update, guarded against non-finite losses."""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genflow._checks import check_int
from genflow.optim._registry import check_extra_args, check_transform
from genflow.optim._smb import state_holds_smb
from genflow.train._state import TrainState

Array = jax.Array
LossFn = Callable[[Any, Any, Array], tuple[Array, dict]]


def _wide_float_leaves(tree) -> list[Array]:
    """The floating-point (and complex) leaves of ``tree``, each promoted to at least float32."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    return [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]


def _all_finite(tree) -> Array:
    """True when every floating-point element of ``tree`` is finite, tested through the sum of all
    elements, accumulated in at least float32 (non-finite if any element is inf or nan). The sum
    can also overflow, when it passes ~3.4e38 (e.g. ~2.5e33 per same-signed element for 133k
    parameters): such a tree counts as non-finite too, which is what a training guard wants.
    One float reduction per leaf: on XLA:CPU ``all(isfinite(x))`` per leaf cost 2.2x as much when
    measured (60 vs 28 us for the 133k parameters of a 3x256 MLP; a 2-D training step takes ~1 ms;
    standalone, dispatch included, a re-measurement at stop 45 found 0.9-1.1x)."""
    sums = [jnp.sum(x) for x in _wide_float_leaves(tree)]
    return jnp.isfinite(sum(sums)) if sums else jnp.array(True)


def _norm(tree) -> Array:
    """Global L2 norm (``optax.tree.norm``) with every leaf in at least float32: a float16
    gradient's own sum of squares overflows at a norm of ~256."""
    return optax.tree.norm(_wide_float_leaves(tree))


def _accum_dtype(dtype):
    """Accumulator dtype of a microbatch sum: floating types promoted to at least float32, bools and
    integers to at least int32 (``+`` on bools is a logical or)."""
    return jnp.promote_types(dtype, jnp.float32 if jnp.issubdtype(dtype, jnp.inexact) else jnp.int32)


def _mean_dtype(dtype):
    """Dtype of a microbatch mean: a float stays in its dtype; the mean of integer or bool metrics
    is a float32 fraction (``astype(int)`` would truncate 0.75 to 0)."""
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32


def _microbatches(batch, k: int):
    """Split the leading axis ``B`` into ``k`` strided microbatches ``[k, B/k, ...]`` (microbatch i
    holds rows i, i+k, ...; with a batch sharded over devices every microbatch stays spread over all
    of them)."""
    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(f"grad_accum={k} must divide the batch size; got a batch leaf of shape {x.shape}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _extra_args_view(tx):
    """``tx`` as a ``GradientTransformationExtraArgs`` whose ``update`` receives the step's extra
    arguments (``value=`` / ``grad=`` / ``value_fn=``) as far as it takes them; its signature is
    read once.

    * ``update(..., **kwargs)``: given all of them. optax's ``with_extra_args_support`` would drop
      them for anything that is not an ``ExtraArgs`` transform, including ``optax.MultiSteps`` (and
      its ``.gradient_transformation()``), which forwards them to the transform it wraps: a
      loss-aware optimizer inside it (momo_adam) failed with "missing argument 'value'". Such an
      optimizer sees the loss of the last microbatch beside the accumulated gradient (mild for
      MoMo; prefer ``grad_accum=``, which averages both); SMB, which re-evaluates the loss there,
      is refused. (Inside ``optax.chain`` a MultiSteps' ``.gradient_transformation()`` still loses
      them: chain drops extra arguments for its plain parts.)
    * an ``ExtraArgs`` transform that names its own only (``optax.contrib.sam``: ``grad_fn=``):
      given those it names (the others failed with "unexpected keyword argument 'value'").
    * a plain transform without ``**kwargs``: given none (``with_extra_args_support``).
    """
    extra = isinstance(tx, optax.GradientTransformationExtraArgs)
    try:
        sig = inspect.signature(tx.update).parameters
    except (AttributeError, TypeError, ValueError):  # (builtins without signatures)
        return tx if extra else optax.with_extra_args_support(tx)
    update = tx.update
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        if extra:
            return tx

        def forward_all(updates, state, params=None, **extra_args):
            if isinstance(state, optax.MultiStepsState) and state_holds_smb(state.inner_opt_state):
                raise ValueError("smb cannot run inside optax.MultiSteps (it would combine the accumulated gradient "
                                 "with the loss of the last microbatch only); use make_train_step(..., grad_accum=k), "
                                 "which averages both over the microbatches")
            return update(updates, state, params, **extra_args)

        return optax.GradientTransformationExtraArgs(tx.init, forward_all)
    if not extra:
        return optax.with_extra_args_support(tx)
    names = {n for n, p in sig.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}

    def forward_named(updates, state, params=None, **extra_args):
        return update(updates, state, params, **{k: v for k, v in extra_args.items() if k in names})

    return optax.GradientTransformationExtraArgs(tx.init, forward_named)


def batch_key(rng: Array) -> Array:
    """The key from which the batch of a step with state ``rng`` may be drawn on device
    (``fit``'s ``batch_fn(batch_key(state.rng))``): ``split(rng, 3)[2]``, never a key the train
    step itself uses (it splits ``rng`` into the next ``rng`` and the loss key, ``[0]`` and
    ``[1]``). ``fold_in(rng, 1)`` would not do: under JAX's default partitionable threefry it
    equals ``split(rng)[1]``, and the data would be drawn from the loss's own noise key."""
    return jax.random.split(rng, 3)[2]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Build ``step(state, batch) -> (state, metrics)`` (pure; jit it or use :func:`fit`).

    ``loss_fn(params, batch, key) -> (loss, aux)`` with ``aux`` a dict of scalars (arrays of
    other shapes are dropped from the metrics). The optimizer receives the loss as
    ``value=loss``, the gradient as ``grad=`` and a closure ``value_fn(params) -> loss`` on the
    same batch and key as extra arguments (optax's ``GradientTransformationExtraArgs``
    convention), so MoMo-style transforms that need the loss, and the line searches of
    ``optax.lbfgs`` / ``scale_by_zoom_linesearch`` that re-evaluate it, work unchanged; plain
    transforms ignore them.

    ``grad_accum=k`` splits the batch into ``k`` microbatches (strided: rows ``i, i+k, ...``),
    accumulates their gradients in a ``lax.scan`` (float32, one microbatch in memory at a time)
    and applies one update with the mean gradient, loss and metrics; microbatch ``i`` draws its
    noise from ``fold_in(key, i)``. ``value_fn`` then averages the loss over the microbatches.

    Mixed precision: a network built with ``dtype=jnp.bfloat16`` computes in bfloat16 while its
    parameters, gradients, optimizer state and EMA copies stay float32 (master weights).

    A step whose loss, gradients, updated parameters or float16 optimizer state are not finite (or
    whose gradient norm, accumulated in float32 or wider, overflows: ~1.8e19 in float32) leaves the state untouched and
    reports ``metrics["finite"] = False``; :func:`genflow.train.fit` then stops with the last good
    state. ``step(state, batch, skip=b)`` with a traced bool ``b`` does the same when ``b`` is true
    (``fit`` passes it after a non-finite step of a chunk to this function itself, recognised by
    ``step.takes_skip is step``; a wrapper of it gets fit's own guard).
    """
    grad_accum = check_int("grad_accum", grad_accum)
    what = "make_train_step's optimizer"
    tx = _extra_args_view(check_extra_args(check_transform(optimizer, what), what))
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(params, batch, key) -> (loss, aux); got "
                        f"{type(loss_fn).__name__}")

    def checked_loss(params, batch, key):  # (a bare loss failed in value_and_grad, naming no argument)
        out = loss_fn(params, batch, key)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            got = (f"an array of shape {tuple(out.shape)}" if hasattr(out, "shape") else
                   f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else
                   type(out).__name__)
            raise TypeError(f"loss_fn must return a pair (loss, aux), aux a dict of scalar metrics (may be empty); "
                            f"got {got}")
        return tuple(out)

    grad_fn = jax.value_and_grad(checked_loss, has_aux=True)

    def loss_and_grad(params, batch, key):
        if grad_accum == 1:
            return grad_fn(params, batch, key)
        micro = _microbatches(batch, grad_accum)

        def body(acc, i):
            mb = jax.tree.map(lambda x: x[i], micro)
            out = grad_fn(params, mb, jax.random.fold_in(key, i))
            return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, out), None

        shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, _accum_dtype(x.dtype)), shapes)  # float32 or wider
        total, _ = jax.lax.scan(body, zero, jnp.arange(grad_accum))
        return jax.tree.map(lambda x, like: (x / grad_accum).astype(_mean_dtype(like.dtype)), total, shapes)

    def mean_loss(params, batch, key):
        if grad_accum == 1:
            return checked_loss(params, batch, key)[0]
        micro = _microbatches(batch, grad_accum)
        losses = jax.lax.map(lambda i: checked_loss(params, jax.tree.map(lambda x: x[i], micro),
                                               jax.random.fold_in(key, i))[0], jnp.arange(grad_accum))
        return jnp.mean(losses)

    def step(state: TrainState, batch, *, skip=None) -> tuple[TrainState, dict]:
        rng, key, _ = jax.random.split(state.rng, 3)  # [2] is batch_key's (fit's on-device batches)
        (loss, aux), grads = loss_and_grad(state.params, batch, key)

        def value_fn(p):
            return mean_loss(p, batch, key)

        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss, grad=grads,
                                       value_fn=value_fn)
        params = optax.apply_updates(state.params, updates)
        # (EMA copies are float32 or wider: a bfloat16 EMA rounds (1 - d)(p - e) away and stops moving)
        ema = {k: jax.tree.map(lambda e, p, d=float(k): (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype), v,
                               params)
               for k, v in state.ema.items()}
        grad_norm = _norm(grads)
        # The gradient norm (a metric anyway) is non-finite iff some gradient is, or the norm
        # overflows float32 (~1.8e19): both stop training. Reusing it saves a pass over the gradients.
        # (and the float16 leaves of the optimizer state: adam's second moment of float16 parameters
        # overflows at |g| > 256 while the float32 gradient norm is finite, and an inf there freezes the
        # parameter for good; wider states overflow only past the gradient norm's own range, and the
        # check would cost a pass over them: ~1.5% of a small MLP's step)
        narrow = [x for x in jax.tree.leaves(opt_state) if getattr(x, "dtype", None) == jnp.float16]
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params) & _all_finite(narrow)
        if skip is not None:  # (fit, after a non-finite step in the chunk: see _chunk_fn)
            finite = finite & ~jnp.asarray(skip, bool)  # (~True is -2 for a Python bool)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, ema=ema)
        # Keep the previous state on a non-finite step (the loop stops there).
        new = jax.lax.cond(finite, lambda: new, lambda: state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        clash = sorted(set(aux) & set(metrics))
        if clash:  # (an aux "finite" would hide a NaN loss from fit; an aux "loss" would replace the loss)
            raise ValueError(f"loss_fn's aux must not reuse the step metric names {sorted(metrics)}; got aux keys {clash}")
        # (only scalar arrays and numbers: a nested dict -- batch statistics -- has ndim 0 too, and
        # failed in fit's metric log)
        metrics.update({k: v for k, v in aux.items()
                        if isinstance(v, (jax.Array, np.ndarray, np.generic, numbers.Number)) and jnp.ndim(v) == 0})
        return new, metrics

    step.takes_skip = step  # (the function itself: functools.wraps copies the attribute onto wrappers,
    # which may reject more steps than they report to this one; fit guards those itself)
    return step
