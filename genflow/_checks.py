"""Argument checks shared across genflow (one notion of an integer argument, one wording), and the
batch flattening every module uses."""

from __future__ import annotations

import functools
import math
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo


def flat_batch(x):
    """``[B, ...] -> [B, D]`` (NumPy or JAX); unlike ``reshape(B, -1)``, also for an empty batch."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def concrete_real(value) -> float | None:
    """``float(value)`` for a concrete real scalar (Python, NumPy or a 0-d array; not a bool of
    any kind); ``None`` for a traced value (which no check can see) or anything else. (``float``
    reads ``np.True_`` and ``jnp.asarray(True)`` as 1.0: a check that refuses ``None`` ran them as 1.)"""
    if isinstance(value, (str, bytes, jax.core.Tracer)) or _is_bool(value):  # float("0.5") would pass
        return None
    try:
        return float(value)
    except (TypeError, ValueError):  # (ConcretizationTypeError is a TypeError)
        return None


def real_or_traced(name: str, value, expected: str) -> float | None:
    """:func:`concrete_real` for the range checks that pass a traced value (``None``) unchecked,
    with a ``ValueError`` naming ``name`` and ``expected`` for a bool (Python, NumPy or a bool
    array) or a string: ``concrete_real`` reads those as unknown too, and such a check let them
    through (``std=False`` gave NaN log-densities, ``sigma_min=True`` ran as 1)."""
    if _is_bool(value) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return concrete_real(value)


def _is_bool(value) -> bool:
    """Whether ``value`` is a Python or NumPy bool or a bool array (NumPy or JAX, traced too):
    ``float`` reads ``np.True_`` and ``jnp.asarray(True)`` as 1.0, so a real-number check must ask."""
    return isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_


def is_int(value, low: int = 1, high: int | None = None) -> bool:
    """Whether ``value`` is an integer (Python or NumPy, not a ``bool``) in ``[low, high]``."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def int_range(low: int = 1, high: int | None = None) -> str:
    """The wording of :func:`is_int`'s range in error messages."""
    if high is not None:
        return f"an int in {low}..{high}"
    return "a positive int" if low == 1 else f"an int >= {low}"


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``int(value)`` if :func:`is_int`, else a ``ValueError`` naming ``name`` and the range. A
    concrete 0-d JAX integer array counts as its value (``jnp.int32(8)`` or a ``.shape``-derived
    count computed with jnp; the result is a Python int, so it can size arrays); a traced one is
    refused with the same message."""
    if (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.shape == ()
            and np.issubdtype(value.dtype, np.integer)):
        value = value.item()
    if not is_int(value, low, high):
        raise ValueError(f"{name} must be {int_range(low, high)}; got {value!r}")
    return int(value)


def check_data_batch(name: str, x, hint: str = "") -> None:
    """A ``ValueError`` naming ``name`` unless ``x`` is a floating-point array ``[B, ...]`` with
    ``B >= 1`` (a training loss's mean over an empty batch is NaN; integer data would be fitted as
    continuous or fail inside JAX). ``hint`` ends the message for integer or bool data (e.g. how
    to dequantize)."""
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating) or len(shape) < 1 or shape[0] == 0:
        what = f"dtype {dtype}, shape {tuple(shape)}" if shape is not None else type(x).__name__
        integer = dtype is not None and (jax.numpy.issubdtype(dtype, jax.numpy.integer)
                                         or jax.numpy.issubdtype(dtype, jax.numpy.bool_))  # (NumPy: key dtypes raise)
        raise ValueError(f"{name} must be a floating-point array [B, ...] with B >= 1; got {what}"
                         f"{hint if integer else ''}")


def check_positive_real(name: str, value) -> None:
    """A ``ValueError`` naming ``name`` unless a concrete ``value`` is a real > 0; a traced value
    passes (no check can see it); a bool never does (``np.True_`` ran as 1.0)."""
    v, unseen = _range_checked(value)
    if not unseen and (v is None or not (v > 0.0 and math.isfinite(v))):
        raise ValueError(f"{name} must be a real > 0 (and finite); got {value!r}")


def _range_checked(value) -> tuple[float | None, bool]:
    """``(float or None, unseen)`` for a range check: ``unseen`` for a traced real (it passes),
    ``None`` for anything that is not a real number, bools included (traced ones too)."""
    return concrete_real(value), isinstance(value, jax.core.Tracer) and not _is_bool(value)


def check_finite_rows(name: str, x) -> None:
    """A ``ValueError`` naming ``name`` and the first rows of a concrete ``x: [B, ...]`` with a
    non-finite entry; a traced ``x`` passes. For the callers that would otherwise fail far from
    the cause (an adaptive solve spends its ``max_steps`` on a NaN row, then says so)."""
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape") or x.ndim < 1 or x.shape[0] == 0:
        return
    import jax.numpy as jnp

    with jax.ensure_compile_time_eval():  # (a concrete x closed over by a user's jit: jnp ops would trace)
        ok = np.asarray(jnp.all(jnp.isfinite(jnp.reshape(x, (x.shape[0], -1))), axis=1))
    if not ok.all():
        rows = np.flatnonzero(~ok)
        raise ValueError(f"{name} has non-finite entries (NaN or inf) in {rows.size} row(s), e.g. rows "
                         f"{rows[:5].tolist()}")


def check_real_in(name: str, value, low: float, high: float) -> None:
    """A ``ValueError`` naming ``name`` unless a concrete ``value`` is a real in ``[low, high]``
    (NaN, strings and bools refused: ``np.True_`` ran as 1.0); a traced value passes (no check can
    see it)."""
    v, unseen = _range_checked(value)
    if not unseen and (v is None or not low <= v <= high):
        raise ValueError(f"{name} must be a float in [{low:g}, {high:g}]; got {value!r}")


def real_leaf(value):
    """A real hyper-parameter as a JAX array (a pytree leaf or traced argument: one compiled program
    for all its values) at the caller's precision: a Python number weakly typed (it then promotes
    neither float32 nor bfloat16 arrays, and is float64 under ``jax_enable_x64``), an array in its
    own floating dtype, an integer array in float32. (Casting to float32 capped float64 checks
    against oracles at ~1e-7.)"""
    import jax.numpy as jnp

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return jnp.asarray(float(value))
    a = jnp.asarray(value)
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.float32)


def check_null_label(name: str, null, labels) -> None:
    """A "no condition" value ``null`` for ``labels`` of an integer dtype: integer-valued and within
    the dtype's range (cast as it was, 10.7 became the real class 10 and 256 with uint8 labels the
    class 0). Traced values and non-integer labels pass."""
    dtype = jax.numpy.result_type(labels)
    if not jax.numpy.issubdtype(dtype, jax.numpy.integer) or isinstance(null, jax.core.Tracer):
        return
    nl = np.asarray(null)
    if not (np.issubdtype(nl.dtype, np.integer) or (
            np.issubdtype(nl.dtype, np.floating) and np.all(np.isfinite(nl) & (nl == np.round(nl))))):
        raise ValueError(f"{name} must be an integer for integer labels y; got {null!r}")
    info = np.iinfo(dtype)  # (np.int64(300) with uint8 labels wrapped onto the real class 44)
    if np.any((nl < info.min) | (nl > info.max)):
        raise ValueError(f"{name}={null!r} is out of range for labels y of dtype {dtype} ({info.min}..{info.max})")


def check_model_fn(fn, name: str = "fn"):
    """``fn`` if it is callable, else a ``TypeError`` naming ``name`` (``gf.sample(3, ...)`` failed
    as a bare "'int' object is not callable" deep inside the sampler)."""
    if not callable(fn):
        raise TypeError(f"{name} must be a model function {name}(x: [B, ...], t: [B]) -> [B, ...]; got "
                        f"{type(fn).__name__}")
    return fn


def check_key(key) -> None:
    """A ``TypeError`` unless ``key`` is one PRNG key: a typed key of shape ``()`` or a raw
    ``uint32`` key of shape ``[k]`` (traced ones too). ``key=0`` failed as "JAX encountered invalid
    PRNG key data", a split of keys as a fold_in / split / Brownian-path error: neither named key."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
            return
        if dtype == np.uint32 and tuple(shape) == _raw_key_shape(jax.config.jax_default_prng_impl):
            return
    raise TypeError(f"key must be one PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)); got "
                    f"{type(key).__name__} of shape {shape} and dtype {dtype}")


@functools.lru_cache(maxsize=None)
def _raw_key_shape(impl: str) -> tuple:
    """The shape of a raw ``uint32`` key of the default PRNG implementation ``impl`` (``(2,)`` for
    threefry; a raw key of another length failed later, as JAX's "invalid PRNG key data")."""
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming ``name`` (a string such as ``"False"``
    was truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def check_denoise(denoise) -> None:
    """A ``TypeError`` unless ``denoise`` is ``None`` or a bool (a string such as ``"False"`` was
    truthy)."""
    if denoise is not None and not isinstance(denoise, (bool, np.bool_)):
        raise TypeError(f"denoise must be None, True or False; got {denoise!r}")


def registry_owner(table, builtin, name) -> str | None:
    """Who registered ``name`` in a registry ``table`` (a dict) whose built-in names are
    ``builtin``: None if it is not there, ``"genflow"`` for a built-in, ``"you"`` for one added by
    ``register`` (the ``owner`` of :func:`check_registration` / :func:`check_removal`)."""
    if not isinstance(name, str) or name not in table:
        return None
    return "genflow" if name in builtin else "you"


def check_registration(kind: str, name: str, owner: str | None, overwrite) -> None:
    """Whether ``register(name, ..., overwrite=overwrite)`` may add or replace ``name`` in a
    registry of ``kind`` (``"path"``, ``"solver"``, ``"optimizer"``): ``owner`` is None for a new
    name, ``"you"`` for one added by ``register``, else the library that provides it (never
    replaced)."""
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"overwrite must be a bool; got {type(overwrite).__name__}")
    if owner is not None and (owner != "you" or not overwrite):
        hint = "pass overwrite=True to replace it" if owner == "you" else "pick another name"
        raise ValueError(f"{kind} {name!r} is already registered by {owner}; {hint}")


def check_removal(kind: str, name: str, owner: str | None, yours) -> None:
    """Whether ``unregister(name)`` may remove ``name`` (``owner`` as for :func:`check_registration`;
    ``yours``: the names added by ``register``, listed when ``name`` is unknown)."""
    if owner is None:
        raise ValueError(f"{kind} {name!r} is not registered; registered by you: {sorted(yours)}")
    if owner != "you":
        raise ValueError(f"{kind} {name!r} comes from {owner}; only names added by register() can be removed")


def split_batch(batch):
    """``(x, y, x1)`` of a training batch: an array ``x: [B, ...]`` or a dict with ``"x"`` and optionally
    ``"y"`` (labels) and ``"x1"`` (paired noise); anything else is refused by name."""
    if isinstance(batch, dict):
        if "x" not in batch:
            raise ValueError(f"a dict batch needs an 'x' entry (and optionally 'y', 'x1'); got keys {sorted(batch)}")
        extra = sorted(set(batch) - {"x", "y", "x1"})
        if extra:  # ({"x", "labels"} trained a conditional network on its null label, silently)
            raise ValueError(f"a dict batch holds 'x' and optionally 'y' (labels) and 'x1' (paired noise); got the "
                             f"unknown key(s) {extra}")
        return batch["x"], batch.get("y"), batch.get("x1")
    if isinstance(batch, (tuple, list)):  # (jnp.asarray would stack (x, x1) into one [2, B, ...] array)
        raise TypeError(f"batch must be an array x: [B, ...] or a dict {{'x': ..., 'y': ..., 'x1': ...}}; got a "
                        f"{type(batch).__name__} of {len(batch)} entries (pass (x, y) as {{'x': x, 'y': y}})")
    return batch, None, None


def error_if(x, pred, msg: str | None = None, *, result=None):
    """``equinox.error_if(x, pred, msg)``, or with ``result`` (a Diffrax ``RESULTS`` value) Diffrax's
    ``result.error_if(x, pred)``, that fails cleanly in a multi-device computation too.

    JAX runs a callback once, on one device, under automatic sharding; when the check fired there,
    the other devices waited in the collective that hands its output on, and XLA aborted the whole
    process after 40 s ("Termination timeout for all reduce"). Where :func:`genflow._memo.call_mesh`
    knows the mesh, the check runs under :func:`jax.shard_map` on every device instead, and a fired
    check raises the usual error. ``x`` (a scalar here) passes through replicated; ``pred`` may have
    any shape (any of it true fires)."""
    def check(x, pred, result):
        return eqx.error_if(x, pred, msg) if result is None else result.error_if(x, pred)

    mesh = _memo.call_mesh()
    if mesh is None:
        return check(x, pred, result)
    none = jax.sharding.PartitionSpec()
    return jax.shard_map(check, mesh=mesh, in_specs=none, out_specs=none, check_vma=False)(x, jnp.any(pred), result)
