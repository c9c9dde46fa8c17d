"""The samplers' memo of host-side preparations (time grids and what they determine), shared by
``gf.sample`` and ``gf.inverse``'s samplers, the kept 0-d arrays of Python float
hyper-parameters handed to their compiled programs, the identity-keyed tables of compiled
programs, and what keys a compiled program by JAX's settings (:func:`config_key`,
:func:`checked_twin`).

Building a grid runs ~20 small eager JAX operations and several host reads (0.6 ms a call on a
CPU, several ms on a GPU, where each read waits for the device), which a loop sampling batch after
batch repeated. :func:`memoised` keeps the result under a key of everything it depends on.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import threading
import types
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Prepared grids of recent sampler calls (gf.sample's and gf.inverse's, told apart by a tag in the key)
PREPARED: collections.OrderedDict = collections.OrderedDict()
PREPARED_SIZE = 64
PREPARED_LOCK = threading.Lock()


def value_key(value):
    """A hashable key of a scalar or concrete array's value and type, or None (a traced value, an
    object array, an unhashable value). Arrays are keyed by their dtype object (``dtype.str`` is
    ``'<V1'`` for most ml_dtypes), shape and bytes; a concrete JAX array keeps its host copy after
    the first read. Scalars by type and value (``12 == 12.0 == True`` must not share a key: the
    checks that refuse ``12.0`` and ``True`` run only when preparing)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        try:
            a = np.asarray(value)
        except (TypeError, ValueError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None
        return None if a.dtype == object else ("array", a.dtype, a.shape, a.tobytes())
    if isinstance(value, (list, tuple)):
        keys = tuple(value_key(v) for v in value)
        return None if any(k is None for k in keys) else (type(value), keys)
    try:
        hash(value)
    except TypeError:
        return None
    return type(value), value


_JITTED = type(jax.jit(lambda: 0))


def holds_state(fn, depth: int = 0) -> bool:
    """Whether a path function carries data of its own (a closure's cells, default arguments, a
    partial's arguments; any callable that is not a plain function -- a callable object, a bound
    method -- counts, a jitted plain function as that function): a memo key holding it would keep
    that data alive (e.g. a learned schedule's network parameters) and go stale when it changed,
    so such paths are not memoised."""
    if fn is None:
        return False
    if isinstance(fn, _JITTED):  # (a jitted plain function holds what the function holds; review)
        wrapped = getattr(fn, "__wrapped__", None)
        return wrapped is None or holds_state(wrapped, depth + 1)
    if not isinstance(fn, types.FunctionType):
        # (a callable object or a bound method may hold -- and change -- data of its own: keyed by
        # identity, a memo went stale when it changed (log_prob's checks passed a path reversed in
        # place; review) and kept its data alive)
        return True
    if getattr(fn, "__defaults__", None) or getattr(fn, "__kwdefaults__", None):
        return True
    # a closure over plain functions that hold nothing themselves (the built-in ve / edm paths'
    # log_snr wraps their sigma function) holds no data: those paths were prepared afresh on every
    # call, ~1 ms of Python per gf.sample call
    return any(not isinstance(v, types.FunctionType) or depth >= 3 or holds_state(v, depth + 1)
               for v in (c.cell_contents for c in (getattr(fn, "__closure__", None) or ())))


def path_key(path):
    """A hashable key of ``path``'s value (its functions and parameters), or None when a parameter
    is traced or unhashable or a function carries data of its own."""
    values = []
    for name, value in sorted(path.params.items()):
        k = value_key(value)
        if k is None:
            return None
        values.append((name, k))
    static = tuple(getattr(path, f.name) for f in dataclasses.fields(path) if f.name != "params")
    if any(callable(v) and holds_state(v) for v in static):
        return None
    return type(path), static, tuple(values)


def schedule_key(schedule):
    """A hashable key of a named schedule or of an explicit grid's values (an optimized schedule
    passed batch after batch); None for a callable or a traced grid."""
    if isinstance(schedule, str):
        return schedule
    if isinstance(schedule, jax.core.Tracer) or callable(schedule) and not hasattr(schedule, "shape"):
        return None
    if not hasattr(schedule, "shape"):  # (a list of times)
        try:
            schedule = np.asarray(schedule)
        except (TypeError, ValueError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None
    return value_key(schedule)


def _deleted(out) -> bool:
    return any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree_util.tree_leaves(out))


def staged():
    """A context in which a traced function stages its constant subexpressions into its program.

    :func:`memoised` builds under ``jax.ensure_compile_time_eval``, and JAX carries that setting into
    every function traced inside: each operation on constants there (``jnp.arange(64) - 1`` in a
    solver's coefficients, a path's hyper-parameters) was evaluated at once, one compiled XLA program
    per primitive (~25 ms each with its lowering; 34 programs for a first ``gf.sample`` with
    dpm++3m, now 2). The setting stays on outside the traced bodies, so the pieces compiled at top
    level and under a caller's jit share one cache entry (JAX keys its cache by it). A no-op context
    on a JAX without the setting."""
    try:
        from jax._src import config as _jax_config

        return _jax_config.eager_constant_folding(False)
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        return contextlib.nullcontext()


def staged_jit(fun: Callable | None = None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` whose body is traced under :func:`staged` (for the compiled
    pieces that :func:`memoised` builds call). Usable as ``@staged_jit`` or ``@staged_jit(static_argnames=...)``."""
    if fun is None:
        return functools.partial(staged_jit, **jit_kwargs)

    @functools.wraps(fun)
    def body(*args, **kwargs):
        with staged():
            return fun(*args, **kwargs)

    return jax.jit(body, **jit_kwargs)


def memoised(tag: str, parts: Sequence, extra: tuple, build: Callable[[], Any]):
    """``build()``, kept in :data:`PREPARED` (least recently used out past :data:`PREPARED_SIZE`).

    The key is ``tag`` (whose memo), ``parts`` (keys of the arguments ``build`` depends on, from
    :func:`path_key` / :func:`schedule_key` / :func:`value_key`: one that is None, a traced or
    unkeyable argument, means built afresh and not kept), ``extra`` (hashable values that need no
    keying) and the default float dtype and device of the moment. Every argument that a check in
    ``build`` depends on must be in the key: a hit skips the checks. ``build`` runs under
    ``jax.ensure_compile_time_eval`` (concrete arguments are evaluated now even under a user's jit,
    which then gets the result as constants; the compiled pieces it calls must trace under
    :func:`staged`, see there); a result holding a tracer is never kept, and a kept
    one whose arrays were deleted (e.g. a donated ``info.ts``) is built again."""
    key = None
    if all(p is not None for p in parts):
        key = (tag, *parts, *extra, np.dtype(jnp.result_type(float)).str, str(jax.config.jax_default_device))
        try:
            hash(key)
        except TypeError:
            key = None
    if key is not None:
        with PREPARED_LOCK:
            out = lru_get(PREPARED, key)
            if out is not None and not _deleted(out):
                return out
    with jax.ensure_compile_time_eval():
        out = build()
    if key is not None and not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(out)):
        with PREPARED_LOCK:
            lru_put(PREPARED, key, out, PREPARED_SIZE)
    return out


# 0-d arrays of recent float hyper-parameters, for the paths and options handed to the compiled
# samplers: equinox flattens a path three times per gf.sample call, and each flatten made a new
# array per float (~0.04 ms each, ~0.13 ms of a ~0.25 ms call's Python). Only the samplers' own
# calls see them (never a user's path or a returned model: shared arrays there could not be donated
# twice in one call), and the compiled samplers do not donate them.
_LEAVES: dict = {}
_LEAVES_SIZE = 256


def kept_scalar(value: float):
    """``jnp.asarray(float(value))`` (weakly typed, in the x64 mode of the moment, on the default
    device), kept for the next call with the same value (keyed by the exact bits of ``float(value)``:
    ``0.0 == -0.0`` must not share a leaf). Made under a trace, it is a tracer: never kept."""
    key = (float(value).hex(), bool(jax.config.jax_enable_x64), str(jax.config.jax_default_device))
    leaf = _LEAVES.get(key)
    if leaf is None or leaf.is_deleted():
        leaf = jnp.asarray(float(value))
        if isinstance(leaf, jax.core.Tracer):
            return leaf
        if len(_LEAVES) >= _LEAVES_SIZE:
            _LEAVES.clear()
        _LEAVES[key] = leaf
    return leaf


_CONFIG_NAMES = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_device", "jax_numpy_rank_promotion",
                 "jax_numpy_dtype_promotion", "jax_default_prng_impl", "jax_debug_nans", "jax_debug_infs")


def config_key() -> tuple:
    """The JAX settings that a compiled program depends on, as ``jax.jit`` keys its cache by them
    (x64, default matmul precision -- also set by ``with jax.default_matmul_precision(...)`` --,
    default device, promotion rules, PRNG implementation, debug_nans / debug_infs, ...): a cache of
    ``lower(...).compile()`` executables keyed without them ran a program made under other
    settings (float32 training after ``jax_enable_x64`` was switched on, default precision inside
    a ``"highest"`` block). JAX's own key where it has one; else the public settings."""
    try:
        from jax._src import config as _jax_config

        return ("jax",) + tuple(_jax_config.trace_context())
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - a JAX without it
        return tuple(str(getattr(jax.config, name, None)) for name in _CONFIG_NAMES)


_UNSET = object()
_CALL_MESH: contextvars.ContextVar = contextvars.ContextVar("genflow_call_mesh", default=None)


def call_mesh():
    """The mesh of a multi-device computation being traced: the context's abstract mesh (Explicit
    axes, :func:`jax.sharding.auto_axes`, ``jax.set_mesh``) or, for arrays on a mesh with Auto
    axes, the mesh that :func:`checked_twin` found on the call's arguments; ``None`` for a
    one-device computation, or under a caller's ``jax.jit`` that sees Auto-sharded tracers only.
    Read by the runtime checks (:func:`genflow._checks.error_if`)."""
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty and abstract.size > 1:
        return abstract
    return _CALL_MESH.get()


def concrete_of(leaf):
    """The array an eager ``jax.grad`` / ``jax.vmap`` tracer carries (``leaf`` itself if it is no
    tracer); ``None`` for a jit's tracer, which carries no array."""
    if not isinstance(leaf, jax.core.Tracer):
        return leaf
    while isinstance(leaf, jax.core.Tracer):  # (a jit's tracer has a .val too: a jaxpr variable)
        leaf = getattr(leaf, "primal", getattr(leaf, "val", None))
    return leaf if isinstance(leaf, jax.Array) else None


def spanning_mesh(leaves):
    """The :class:`jax.sharding.Mesh` of the first concrete array among ``leaves`` placed with a
    ``NamedSharding`` over more than one device, else ``None``. Looks through the tracers of an
    eager ``jax.grad`` / ``jax.vmap`` to the array they carry (a check under them aborted too)."""
    for leaf in leaves:
        sharding = getattr(concrete_of(leaf), "sharding", None)
        if (type(sharding) is jax.sharding.NamedSharding and isinstance(sharding.mesh, jax.sharding.Mesh)
                and sharding.mesh.size > 1):
            return sharding.mesh
    return None


def drop_failed_runtime_tokens() -> None:
    """Forget the per-device runtime tokens of a multi-device program whose check fired (its error
    already raised): JAX keeps them, and every later ``jax.effects_barrier()`` -- and the one at
    interpreter exit ("Exception ignored in atexit callback") -- raised that error again.
    (JAX's private token set; nothing is done where it is not found.)"""
    try:
        from jax._src import dispatch

        tokens = dispatch.runtime_tokens.output_runtime_tokens
    except (ImportError, AttributeError):  # pragma: no cover - another JAX
        return
    for device, token in list(tokens.items()):
        try:
            token.block_until_ready()
        except Exception:  # noqa: BLE001 - the failed program's token, whatever its error type
            tokens.pop(device, None)


def _on_mesh(fun: Callable, mesh) -> Callable:
    """``fun`` traced with :func:`call_mesh` giving ``mesh``."""

    @functools.wraps(fun)
    def run(*args, **kwargs):
        token = _CALL_MESH.set(mesh)
        try:
            return fun(*args, **kwargs)
        finally:
            _CALL_MESH.reset(token)

    return run


def checked_twin(fun: Callable, jit: Callable, arrays: Callable | None = None) -> Callable:
    """``jit(fun)``, dispatched to a second ``jit`` of ``fun`` while ``jax_debug_nans`` or
    ``jax_debug_infs`` is on. JAX's C++ dispatch cache is keyed by the Python function and the
    static arguments, not by these flags: a program that had run once with them off kept running
    unchecked after the user turned one on (NaN samples / log-densities, no error). The twin wraps
    the raw ``fun``, so its entries are all made with the checks on, and the de-optimized re-run
    that names the culprit op runs ``fun`` itself.

    Arguments placed on a multi-device mesh run a third ``jit`` per mesh, traced with
    :func:`call_mesh` giving that mesh: a runtime check there runs on every device
    (:func:`genflow._checks.error_if`). Run on one device, as JAX runs a callback under automatic
    sharding, a check that fired (Diffrax's max_steps) left the other devices waiting in a
    collective, and XLA aborted the process after 40 s instead of raising. (The mesh is not in
    JAX's trace key for Auto axes, hence a program per mesh.) ``arrays(args, kwargs)`` gives the
    leaves looked at for a mesh (default all; each costs ~0.2 us a call, none on a one-device
    machine); or the caller finds the mesh and passes it as ``mesh=``, a keyword the compiled
    function does not see."""
    fast = jit(fun)

    @functools.wraps(fun)
    def twin(*args, **kwargs):
        return fun(*args, **kwargs)

    checked = jit(twin)
    on_mesh: dict = {}
    lock = threading.Lock()

    @functools.wraps(fun)
    def call(*args, mesh=_UNSET, **kwargs):
        debug = bool(jax.config.jax_debug_nans or jax.config.jax_debug_infs)
        if mesh is _UNSET:
            mesh = None if jax.device_count() == 1 else spanning_mesh(
                arrays(args, kwargs) if arrays is not None else jax.tree_util.tree_leaves((args, kwargs)))
        if mesh is not None:
            with lock:
                if (mesh, debug) not in on_mesh:
                    on_mesh[mesh, debug] = jit(_on_mesh(fun, mesh))
                run = on_mesh[mesh, debug]
            try:
                return run(*args, **kwargs)
            except Exception:
                drop_failed_runtime_tokens()
                raise
        if debug:
            return checked(*args, **kwargs)
        return fast(*args, **kwargs)

    return call


def filter_jit(fun: Callable) -> Callable:
    """``equinox.filter_jit(fun)`` that honours ``jax_debug_nans`` / ``jax_debug_infs`` switched on
    after a first call (:func:`checked_twin`)."""
    import equinox as eqx

    return checked_twin(fun, eqx.filter_jit)


class IdentityTables:
    """Tables of compiled functions per owner object (a step function, a sampler), keyed by the
    owner's identity and dropped when it dies. Keyed by identity, not equality: two equal objects
    (a frozen dataclass with a ``compare=False`` field holding data) must not share programs
    compiled from one of them. Raises ``TypeError`` for an owner that cannot be weakly referenced."""

    def __init__(self):
        self._tables: dict = {}
        self._lock = threading.RLock()  # (reentrant: a collection inside table() runs _drop)

    def table(self, owner) -> collections.OrderedDict:
        key = id(owner)
        with self._lock:
            entry = self._tables.get(key)
            if entry is not None and entry[0]() is owner:
                return entry[1]
            ref = weakref.ref(owner, functools.partial(self._drop, key))
            table = collections.OrderedDict()
            self._tables[key] = (ref, table)
            return table

    def _drop(self, key, ref) -> None:
        with self._lock:
            entry = self._tables.get(key)
            if entry is not None and entry[0] is ref:
                del self._tables[key]

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)


def lru_get(table: collections.OrderedDict, key):
    """``table.get(key)``, marked most recently used if present."""
    value = table.get(key)
    if value is not None:
        table.move_to_end(key)
    return value


def lru_put(table: collections.OrderedDict, key, value, size: int) -> None:
    """``table[key] = value``, least recently used entries out past ``size``."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > size:
        table.popitem(last=False)


def cache_owner(fn):
    """``(owner, func)``: the object whose lifetime the cache entries of ``fn`` follow, and the part of
    ``fn`` that goes into their key besides it: a bound method is made anew at every attribute
    access (two accesses of ``ds.sample`` are distinct objects), so its object owns them, keyed by
    its function; any other callable owns its own (``func`` None)."""
    self, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if self is not None and func is not None:
        return self, func
    return fn, None


def without_owner(value, owner):
    """``value`` for a cache key in ``owner``'s table: a bound method of ``owner`` itself (a trainer's
    ``self.batch`` as the data function) as its function, since holding it would keep ``owner``,
    and with it the table, alive for good."""
    if getattr(value, "__self__", None) is owner and getattr(value, "__func__", None) is not None:
        return ("method of the owner", value.__func__)
    return value
