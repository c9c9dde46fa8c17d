"""Conversions between prediction kinds, given a Gaussian path.

With ``x = alpha x0 + sigma eps`` (``alpha, sigma, alpha', sigma'`` at time t) the kinds are

=============  ==================================================  ======================
kind           definition                                          from (x0, eps)
=============  ==================================================  ======================
``"x0"``       the denoiser ``E[x0 | x_t]``                         ``x0``
``"eps"``      the noise predictor ``E[eps | x_t]``                 ``eps``
``"v"``        ``alpha eps - sigma x0`` (Salimans & Ho 2022)        ``alpha eps - sigma x0``
``"score"``    ``grad log p_t(x) = -E[eps | x_t] / sigma`` (Tweedie) ``-eps / sigma``
``"velocity"`` ``E[dx_t/dt | x_t] = alpha' x0 + sigma' eps``          ``alpha' x0 + sigma' eps``
=============  ==================================================  ======================

Because every kind is an affine function of ``(x0_hat, eps_hat)`` given ``x``, and
``x = alpha x0_hat + sigma eps_hat`` ties the two together, any kind determines every other
(the Tweedie and flow-Tweedie identities). The inverse maps used here are

* ``eps``:      ``x0 = (x - sigma eps) / alpha``
* ``x0``:       ``eps = (x - alpha x0) / sigma``
* ``v``:        ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``, ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``
* ``score``:    ``eps = -sigma score``
* ``velocity``: ``x0 = (sigma' x - sigma u) / D``, ``eps = (alpha u - alpha' x) / D``, ``D = alpha sigma' - sigma alpha'``

A conversion that needs the missing half is undefined where ``sigma = 0`` (``t = 0`` on
``vp_*``, ``linear``, ``edm(sigma_min=0)``: eps / v / score from x0, v or velocity, and score
from eps) or ``alpha = 0`` (``t = 1`` on ``linear``: x0 / v / velocity from eps or score), and
returns NaN there (0 / 0), without an error. The samplers never evaluate these (they step to or
from such an end in closed form; :func:`singular_velocity` names the velocity cases).
"""

from __future__ import annotations

import copy
import dataclasses
import dis
import functools
import math
import sys
import types
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import concrete_real
from genflow.paths import Path, _as_float, broadcast_t, check_path, check_t

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

KINDS = ("eps", "x0", "v", "score", "velocity")

__all__ = ["KINDS", "check_kind", "to_x0_eps", "from_x0_eps", "convert", "convert_fn", "ConvertedFn", "eps_scale",
           "check_model_output", "from_sigma_denoiser", "SigmaDenoiser", "as_pytree_fn", "ClosureFn", "BoundFn"]


def check_kind(kind: str, argname: str = "prediction") -> str:
    """Return ``kind`` if it is a known prediction kind, else raise a ``ValueError``."""
    if kind not in KINDS:
        raise ValueError(f"unknown {argname} {kind!r}; expected one of {list(KINDS)}")
    return kind


def singular_t_min_advice(path: Path, t, arg: str) -> str:
    """What to do about a path singular at ``t`` (:func:`singular_velocity`), for the samplers' and
    likelihoods' errors: pass ``arg=path.t_min``, unless ``t`` is already ``path.t_min`` (the
    path's own ``t_min`` is then singular, and that advice was circular)."""
    try:
        own = float(t) == float(path.t_min)
    except (TypeError, jax.errors.ConcretizationTypeError):  # (a traced end: the general advice)
        own = False
    if not own:
        return f"pass {arg}=path.t_min ({path.t_min})"
    return (f"path {path.name!r} is singular at its own t_min={path.t_min}: give the Path a t_min > 0 (as vp_linear "
            f"does, 1e-3, with a denoising step at the end) and/or a closed-form diffusion_sq_fn")


def singular_velocity(path: Path, t, kind: str) -> str | None:
    """Why a ``kind`` model's velocity ``alpha' x0 + sigma' eps`` is undefined at a concrete time
    ``t`` (an infinite ``alpha'`` or ``sigma'``, e.g. ``vp_linear`` at t = 0: inf * 0 = NaN), or
    ``None`` (a velocity model, finite rates, or a traced ``t``)."""
    if kind == "velocity":
        return None
    tj = jnp.asarray(t)
    ds, da = concrete_real(path.d_sigma(tj)), concrete_real(path.d_alpha(tj))
    if ds is None or da is None or (math.isfinite(ds) and math.isfinite(da)):
        return None
    return (f"sigma'={ds}, alpha'={da} on path {path.name!r}: the velocity alpha' x0 + sigma' eps of the {kind} "
            f"model is inf * 0 there")


def check_model_output(out, x: Array):
    """Raise ``ValueError`` unless a model's output ``out`` has the shape of its input ``x``, and
    ``TypeError`` unless it is floating-point (checked while tracing: no cost at run time); returns
    ``out``."""
    if getattr(out, "shape", None) != x.shape:
        raise ValueError(
            f"the model fn(x, t) returned shape {getattr(out, 'shape', type(out).__name__)} for x of shape "
            f"{x.shape}; it must return the shape of x (a model with per-sample labels bound for one "
            f"batch size cannot be called on another)"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):  # (an int32 prediction was used as it was, silently)
        raise TypeError(f"the model fn(x, t) returned dtype {out.dtype}; it must return a floating-point "
                        f"prediction")
    return out


def _coefs(path: Path, t, x):
    t = broadcast_t(t, x)
    return path.alpha(t), path.sigma(t), t


def _same_shape(x: Array, **arrays) -> None:
    """Raise ``ValueError`` naming the argument whose shape differs from ``x``'s (broadcasting a
    ``[B, 1]`` state against a ``[B, D]`` prediction gave silently wrong shapes)."""
    for name, a in arrays.items():
        if jnp.shape(a) != jnp.shape(x):
            raise ValueError(f"{name} must have the shape of x {jnp.shape(x)}; got {name}.shape={jnp.shape(a)}")


def _widened(t, *arrays):
    """``(out_dtype, t, *arrays)`` with ``t`` and the arrays in at least float32: the dtype JAX's
    promotion gives the result (``jnp.result_type`` of the arrays and ``t``; a Python-float ``t``
    is weak) and the operands to compute it in. bfloat16 / float16 predictions and states are
    converted in float32 and the result rounded once (computed in bfloat16, with bfloat16
    coefficients, the error was 2.5-4.4x that rounding)."""
    t = _as_float(t)
    out = jnp.result_type(*arrays, t)
    wide = jnp.promote_types(out, jnp.float32)
    return (out, t.astype(wide)) + tuple(jnp.asarray(a).astype(wide) for a in arrays)


def to_x0_eps(pred: Array, x: Array, t, path: Path, kind: str) -> tuple[Array, Array]:
    """Recover ``(x0_hat, eps_hat)`` from a prediction of the given kind.

    Args:
      pred: ``[B, ...]`` model output of kind ``kind``.
      x: ``[B, ...]`` the noisy input ``x_t``.
      t: ``[B]`` or scalar time.
      path: the Gaussian path.
      kind: one of :data:`KINDS`.
    Returns:
      ``x0_hat, eps_hat``, each ``[B, ...]``, in the promoted dtype of ``pred``, ``x`` and ``t``
      (computed in at least float32).
    """
    check_kind(kind)
    check_path(path)  # (a path name failed as "'str' object has no attribute 'alpha'")
    check_t(t)  # (as convert: a t outside [0, 1] extrapolated the path silently; a no-op under jit)
    _same_shape(x, pred=pred)
    out, t, pred, x = _widened(t, pred, x)
    x0, eps = _to_x0_eps(pred, x, t, path, kind)
    return x0.astype(out), eps.astype(out)


def _to_x0_eps(pred: Array, x: Array, t, path: Path, kind: str) -> tuple[Array, Array]:
    a, s, tb = _coefs(path, t, x)
    if kind == "x0":
        return pred, (x - a * pred) / s
    if kind == "eps":
        return (x - s * pred) / a, pred
    if kind == "v":
        n = a * a + s * s
        return (a * x - s * pred) / n, (s * x + a * pred) / n
    if kind == "score":
        eps = -s * pred
        return (x - s * eps) / a, eps
    # velocity
    da, ds = path.d_alpha(tb), path.d_sigma(tb)
    det = a * ds - s * da
    # where sigma = 0, x is the data itself: x0 = x / alpha (sigma' may be inf there, vp_linear at
    # t = 0, and the general formula inf / inf); safe operands keep NaN out of gradients too
    clean = s == 0
    ds_, det_ = jnp.where(clean, 0.0, ds), jnp.where(clean, 1.0, det)
    x0 = jnp.where(clean, x / jnp.where(clean, a, 1.0), (ds_ * x - s * pred) / det_)
    return x0, (a * pred - da * x) / det


def from_x0_eps(x0: Array, eps: Array, x: Array, t, path: Path, kind: str) -> Array:
    """The prediction of kind ``kind`` implied by ``(x0, eps)`` at ``(x, t)``; ``[B, ...]`` in the
    promoted dtype of ``x0``, ``eps``, ``x`` and ``t`` (computed in at least float32)."""
    check_kind(kind)
    check_path(path)
    check_t(t)
    _same_shape(x, x0=x0, eps=eps)
    out, t, x0, eps, x = _widened(t, x0, eps, x)
    return _from_x0_eps(x0, eps, x, t, path, kind).astype(out)


def _from_x0_eps(x0: Array, eps: Array, x: Array, t, path: Path, kind: str) -> Array:
    a, s, tb = _coefs(path, t, x)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        return -eps / s
    return path.d_alpha(tb) * x0 + path.d_sigma(tb) * eps


def convert(pred: Array, x: Array, t, path: Path, src: str, dst: str) -> Array:
    """Convert a prediction of kind ``src`` into kind ``dst``.

    Args:
      pred: ``[B, ...]`` prediction of kind ``src`` at ``(x, t)``.
      x: ``[B, ...]`` noisy state.
      t: ``[B]`` or scalar.
      path: the Gaussian path the model was trained with.
    Returns:
      ``[B, ...]`` prediction of kind ``dst``, in the promoted dtype of ``pred``, ``x`` and ``t``
      (computed in at least float32). Identity when ``src == dst``.
    """
    check_kind(src, "src")
    check_kind(dst, "dst")
    check_path(path)
    check_t(t)  # (a no-op under jit)
    _same_shape(x, pred=pred)
    if src == dst:
        return pred
    out, t, pred, x = _widened(t, pred, x)
    a, s, tb = _coefs(path, t, x)
    # Direct forms that avoid needless divisions (and their 0/0 at the ends of the path).
    if src == "eps" and dst == "score":
        return (-pred / s).astype(out)
    if src == "score" and dst == "eps":
        return (-s * pred).astype(out)
    x0, eps = _to_x0_eps(pred, x, t, path, src)
    return _from_x0_eps(x0, eps, x, t, path, dst).astype(out)


def as_pytree_fn(fn: Callable, _depth: int = 0) -> Callable:
    """``fn`` as a pytree whose array leaves are the arrays it uses, so that jit traces them
    instead of hashing the function: calling a sampler with new parameters then reuses the
    compiled program, and a compiled program neither bakes them in as constants nor keeps them
    alive after the caller drops them.

    A ``functools.partial`` becomes a :class:`jax.tree_util.Partial` (a :class:`BoundFn` when its
    function is lifted in turn, as below): new bound arrays share one compiled program. A plain
    Python function (a lambda, a nested ``def``) that uses arrays (JAX ones, or NumPy floating
    arrays: parameters after ``jax.device_get`` or ``np.load``) through its closure cells, default
    arguments or module globals -- ``lambda x, t: net.apply(params, x, t)`` -- becomes a
    :class:`ClosureFn` that reads them at call time; its program is keyed by the function object,
    as ``jax.jit`` keys one (a new lambda compiles anew), and holds no copy of the arrays. These
    arrays are traced, as ``jax.jit`` traces its arguments (a NumPy call on one inside the function
    fails). NumPy scalars and integer or bool NumPy arrays (a shape, slice ends, a ``train`` flag)
    stay constants, as Python values do, read when the function is traced. Other callables
    (pytrees, modules, jitted functions) are returned as they are."""
    if isinstance(fn, functools.partial):
        inner = as_pytree_fn(fn.func, _depth + 1)
        if inner is not fn.func:  # (a function lifted in turn: a Partial would hide its arrays in its static func)
            return BoundFn(inner, fn.args, fn.keywords)
        return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn.func, *fn.args, **fn.keywords)
    if isinstance(fn, types.FunctionType) and _depth < 4:
        lifted = ClosureFn.lift(fn, _depth)
        if lifted is not None:
            return lifted
    return fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BoundFn:
    """``functools.partial(func, *args, **keywords)`` as a pytree whose ``func`` is a pytree too (a
    :class:`ClosureFn`), unlike :class:`jax.tree_util.Partial`, whose function is static."""

    func: Callable
    args: tuple
    keywords: dict

    def __call__(self, *args, **kwargs):
        return self.func(*self.args, *args, **{**self.keywords, **kwargs})


class _Skeleton:
    """What :meth:`ClosureFn.function` needs of the original function but the lifted values: its
    code, globals, names, and the cells and defaults not lifted (lifted ones are None: they hold
    the arrays). One per function and lifting pattern, kept while the function lives (and while a
    ClosureFn holds it); a compiled program is keyed by its identity."""

    __slots__ = ("code", "globals", "name", "qualname", "module", "cells", "defaults", "kwdefaults", "owner",
                 "__weakref__")

    def __init__(self, fn, pattern):
        self.owner = weakref.ref(fn)
        self.code, self.globals, self.name = fn.__code__, fn.__globals__, fn.__name__
        self.qualname, self.module = fn.__qualname__, fn.__module__
        self.cells, self.defaults, self.kwdefaults = _unlifted(fn, pattern)

    def describes(self, fn, pattern) -> bool:
        """Whether this skeleton is still ``fn``'s (the same object, code, globals, name, and the same
        objects as its cells and defaults that are not lifted)."""
        cells, defaults, kwdefaults = _unlifted(fn, pattern)
        same = lambda a, b: len(a) == len(b) and all(x is y for x, y in zip(a, b))  # noqa: E731
        return (self.owner() is fn and self.code is fn.__code__ and self.globals is fn.__globals__
                and self.name == fn.__name__ and self.qualname == fn.__qualname__
                and same(self.cells, cells) and same(self.defaults, defaults)
                and self.kwdefaults.keys() == kwdefaults.keys()
                and all(self.kwdefaults[k] is kwdefaults[k] for k in kwdefaults))


def _unlifted(fn, pattern) -> tuple:
    """``(cells, defaults, kwdefaults)`` of ``fn`` with the lifted ones left out (None; the lifted
    keyword defaults dropped): what a :class:`_Skeleton` keeps of it."""
    cells, defaults, kwdefaults = pattern[:3]
    return (tuple(None if lifted else c for lifted, c in zip(cells, fn.__closure__ or ())),
            tuple(None if lifted else v for lifted, v in zip(defaults, fn.__defaults__ or ())),
            {k: v for k, v in (fn.__kwdefaults__ or {}).items() if k not in kwdefaults})


_SKELETONS = "__genflow_skeletons__"  # (a function's own attribute: {(id(fn), pattern): _Skeleton})


def _skeleton_for(fn, pattern: tuple) -> _Skeleton:
    """The :class:`_Skeleton` of ``fn`` for its lifting ``pattern``, made once while it still
    describes ``fn`` (the same function object is the same static part, hence one compiled
    program; new code or defaults assigned to it make a new one). Kept in ``fn``'s own
    ``__dict__``, not in a global table: a skeleton whose cells lead back to ``fn`` (a lambda
    stored on the object it closes over) then makes a cycle the garbage collector frees, where a
    global weak-keyed table kept ``fn`` and its arrays alive for good."""
    table = fn.__dict__.get(_SKELETONS)
    if not isinstance(table, dict):
        table = fn.__dict__[_SKELETONS] = {}
    key = (id(fn), pattern)  # (functools.wraps copies __dict__: a wrapper shares the table)
    skel = table.get(key)
    if skel is None or not skel.describes(fn, pattern):
        skel = table[key] = _Skeleton(fn, pattern)
    return skel


def _closure_fn_from(fn, children):
    """A pickled :class:`ClosureFn`: ``fn`` lifted again, with the pickled leaves (not the ones
    ``fn`` holds now: a fine-tuned copy keeps its parameters)."""
    lifted = as_pytree_fn(fn)
    if not isinstance(lifted, ClosureFn) or jax.tree_util.tree_structure(lifted.children) != \
            jax.tree_util.tree_structure(tuple(children)):
        raise ValueError(f"cannot restore a ClosureFn of {getattr(fn, '__qualname__', fn)!r}: the arrays it uses "
                         f"no longer have the structure it was saved with")
    return ClosureFn(lifted.spec, children, lifted.skeleton)


class _WeakSame:
    """The static part of a :class:`ClosureFn`: its function's :class:`_Skeleton`, held weakly (a
    compile cache that keys a program by it keeps neither it nor the function alive) and equal only
    to itself while it lives (as long as the function or a ClosureFn of it does)."""

    __slots__ = ("ref", "hash", "__weakref__")

    def __init__(self, skeleton):
        self.ref, self.hash = weakref.ref(skeleton), id(skeleton)

    def __eq__(self, other):
        if type(other) is not _WeakSame:
            return False
        skeleton = self.ref()
        return skeleton is not None and skeleton is other.ref()

    def __hash__(self):
        return self.hash


_LEAF_KINDS: dict = {}  # type -> "jax" (a JAX array), "tracer", "np" (a NumPy array or scalar) or "other"


def _leaf_kind(t: type) -> str:
    kind = _LEAF_KINDS.get(t)
    if kind is None:
        # (a tracer's type is no jax.Array subclass: isinstance decides by its value, per leaf)
        kind = _LEAF_KINDS[t] = ("tracer" if issubclass(t, jax.core.Tracer) else "jax" if issubclass(t, jax.Array)
                                 else "np" if issubclass(t, (np.ndarray, np.generic)) else "other")
    return kind


def _liftable(value) -> bool:
    """Whether ``value`` is a JAX array or a NumPy floating array of at least one dimension, or a
    pytree holding one, with hashable other leaves (they become static parts of the pytree: an
    unhashable one, e.g. a plain dataclass, is left in the function, as before). One pass over the leaves, by type (it
    runs on every sampler call: two ``isinstance`` passes were ~0.3 ms for a 1,000-leaf parameter
    pytree)."""
    has_array, others = False, []
    for leaf in jax.tree_util.tree_leaves(value):
        kind = _LEAF_KINDS.get(type(leaf)) or _leaf_kind(type(leaf))
        if kind == "tracer":
            kind = "jax" if isinstance(leaf, jax.Array) else "other"
        if kind == "jax":
            has_array = True
        elif kind == "np":
            # (a closure over NumPy parameters only -- jax.device_get, np.load, a pickle -- was left
            # in the function: its values were constants of the cached program, and new ones unseen.
            # Floating arrays only: NumPy scalars, integer and bool arrays are read as Python values
            # -- a shape np.prod(...), a slice end, a flag train=np.bool_(False) -- and stay constants)
            if leaf.dtype.kind in "fc" and isinstance(leaf, np.ndarray) and leaf.ndim:
                has_array = True
            elif leaf.dtype.kind not in "biufc":
                others.append(leaf)
        elif kind == "other":
            others.append(leaf)
    if not has_array:
        return False
    try:
        hash(tuple(others))
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple:
    """The global names that ``code`` loads (``co_names`` also holds attribute names), its nested
    comprehensions and inner functions included (separate code objects in Python 3.11)."""
    names = [i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return tuple(dict.fromkeys(names))


@jax.tree_util.register_pytree_node_class
class ClosureFn:
    """A Python function with the arrays it uses as pytree leaves (:func:`as_pytree_fn`).

    Its closure cells, default arguments and the module globals it loads that hold JAX or NumPy
    floating arrays (arrays, or pytrees of them: parameter dicts, a train state, an equinox
    module) are the children, traced by jit and read when the function is rebuilt at call time; cells and defaults
    that are plain functions or partials using arrays are lifted in turn (to depth 4). The static
    part stands for the original function, held weakly and compared by identity, as ``jax.jit``
    keys a function: the same function object reuses its compiled program (whose arrays are now
    its arguments: new values are seen, e.g. parameters rebound after training), a new one is
    compiled anew (pass :func:`genflow.nets.model_fn` / a partial to share one program between
    parameter sets). A program compiled for a function neither holds its arrays as constants nor
    keeps them alive once the caller drops the function (as a static argument of genflow's
    long-lived compiled samplers, a lambda and the arrays it closed over, plus a constant copy
    of them, stayed alive for the rest of the session).

    Writes to the function's ``nonlocal`` cells or to its lifted globals are not seen outside (the
    rebuilt function has its own); a model function has none."""

    __slots__ = ("spec", "children", "skeleton")

    def __init__(self, spec, children, skeleton=None):
        # (the spec, the part a compile cache keys by, holds the skeleton weakly; the instance
        # holds it: the rebuilt function's code, globals and the cells and defaults not lifted,
        # so that neither keeps the function or its arrays alive)
        self.spec, self.children = spec, tuple(children)
        self.skeleton = spec[0].ref() if skeleton is None else skeleton

    @classmethod
    def lift(cls, fn: types.FunctionType, depth: int = 0):
        """``ClosureFn`` of ``fn``, or None if ``fn`` uses no array through its closure,
        defaults or globals (directly or through the functions and partials these hold)."""
        children = []

        def part(value) -> bool:
            if _liftable(value):
                children.append(value)
                return True
            if isinstance(value, (types.FunctionType, functools.partial)):
                inner = as_pytree_fn(value, depth + 1)
                if isinstance(inner, (ClosureFn, BoundFn)) or inner is not value and _liftable(inner):
                    children.append(inner)
                    return True
            return False

        cells = []
        for c in fn.__closure__ or ():
            try:
                content = c.cell_contents
            except ValueError:  # (an empty cell)
                cells.append(False)
            else:
                cells.append(part(content))
        defaults = tuple(part(v) for v in fn.__defaults__ or ())
        kwdefaults = tuple(k for k, v in sorted((fn.__kwdefaults__ or {}).items()) if part(v))
        g = fn.__globals__
        names = tuple(n for n in _global_names(fn.__code__) if n in g and g[n] is not fn and part(g[n]))
        if not children:
            return None
        pattern = (tuple(cells), defaults, kwdefaults, names)
        skeleton = _skeleton_for(fn, pattern)
        return cls((_WeakSame(skeleton),) + pattern, children, skeleton)

    def tree_flatten(self):
        return self.children, self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(spec, children)

    def __reduce__(self):  # (the spec's weak reference cannot be pickled: the function and the leaves are)
        sk = self.skeleton
        fn = self.function()
        if sk is not None:  # (pickled by reference: its module's own function object, if it is one)
            obj = sys.modules.get(sk.module)
            for part in sk.qualname.split("."):
                obj = getattr(obj, part, None)
            if getattr(obj, "__code__", None) is sk.code:
                fn = obj
        return _closure_fn_from, (fn, self.children)

    def __copy__(self):
        return ClosureFn(self.spec, self.children, self.skeleton)

    def __deepcopy__(self, memo):
        return ClosureFn(self.spec, copy.deepcopy(self.children, memo), self.skeleton)

    def function(self) -> types.FunctionType:
        """The function rebuilt with the current children (the original's other cells, defaults
        and globals as they are)."""
        sk = self.skeleton
        if sk is None:  # (unflattened from a tree structure that outlived every ClosureFn of its function)
            raise ReferenceError("the function of this ClosureFn no longer exists (its tree structure outlived it)")
        code, glb, name, qualname, module = sk.code, sk.globals, sk.name, sk.qualname, sk.module
        cells, defaults, kwdefaults = sk.cells, sk.defaults, sk.kwdefaults
        _, lifted_cells, lifted_defaults, lifted_kw, names = self.spec
        it = iter(self.children)
        closure = tuple(types.CellType(next(it)) if lifted else c for lifted, c in zip(lifted_cells, cells))
        new_defaults = tuple(next(it) if lifted else v for lifted, v in zip(lifted_defaults, defaults))
        kw = dict(kwdefaults)
        kw.update({k: next(it) for k in lifted_kw})
        if names:
            glb = dict(glb)
            glb.update({n: next(it) for n in names})
        out = types.FunctionType(code, glb, name, new_defaults or None, closure or None)
        out.__kwdefaults__, out.__qualname__, out.__module__ = kw or None, qualname, module
        return out

    def __call__(self, *args, **kwargs):
        return self.function()(*args, **kwargs)

    def __repr__(self):
        name = "<dead>" if self.skeleton is None else self.skeleton.qualname
        return f"ClosureFn({name}, {len(jax.tree_util.tree_leaves(self.children))} traced leaves)"


def convert_fn(fn: ModelFn, path: Path, src: str, dst: str) -> ModelFn:
    """Wrap ``fn(x, t) -> prediction of kind src`` into ``fn(x, t) -> kind dst``."""
    check_kind(src, "src")
    check_kind(dst, "dst")
    check_path(path)  # (a path name was accepted here and failed only when the function was called)
    if src == dst:
        return fn
    # (a functools.partial inside the wrapper was a static leaf: its parameters compiled in, and
    # every call with new ones compiled again)
    return ConvertedFn(as_pytree_fn(fn), path, src, dst)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConvertedFn:
    """``fn`` with its output converted from kind ``src`` to ``dst`` (a pytree: the wrapped
    function's arrays and the path's parameters stay traced; the kinds are static)."""

    fn: ModelFn
    path: Path
    src: str = dataclasses.field(metadata=dict(static=True))
    dst: str = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x: Array, t: Array) -> Array:
        return convert(self.fn(x, t), x, t, self.path, self.src, self.dst)


def from_sigma_denoiser(denoiser: Callable[[Array, Array], Array], path: Path) -> ModelFn:
    """An ``x0`` model ``fn(x, t)`` on ``path`` from a denoiser conditioned on the noise level.

    ``denoiser(z: [B, ...], sigma: [B]) -> E[x0 | z]`` for ``z = x0 + sigma eps`` is the
    convention of k-diffusion and EDM (Karras et al. 2022), whose pretrained models take the noise
    level, not a time. On a Gaussian path ``x_t = alpha x0 + sigma eps`` gives
    ``x_t / alpha = x0 + (sigma / alpha) eps``, so ``x0_hat = denoiser(x_t / alpha, sigma / alpha)``
    exactly, on any path: sample with ``prediction="x0"`` and any solver or schedule of genflow.
    Where ``alpha = 0`` (``t = 1`` on ``linear``) the noise level is infinite; ``alpha`` is
    floored at 1e-6 there, so the denoiser sees the level ``sigma * 1e6`` (an exact denoiser
    returns the data mean; a network is outside its training range, as at any level above its
    ``sigma_max``: start at the ``t_start`` where ``sigma / alpha`` is the model's ``sigma_max``).
    ``denoiser`` may be a :func:`functools.partial` of a network's apply and its parameters.
    Returns a pytree callable (the denoiser's arrays and the path's parameters stay traced, as
    with :func:`convert_fn`)."""
    check_path(path)
    if not callable(denoiser):
        raise TypeError(f"denoiser must be a callable denoiser(z, sigma); got {type(denoiser).__name__}")
    return SigmaDenoiser(as_pytree_fn(denoiser), path)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SigmaDenoiser:
    """``fn(x, t) = denoiser(x / alpha(t), sigma(t) / alpha(t))``: see :func:`from_sigma_denoiser`."""

    denoiser: Callable[[Array, Array], Array]
    path: Path

    def __call__(self, x: Array, t: Array) -> Array:
        check_t(t)
        t = jnp.broadcast_to(broadcast_t(t, x).reshape(-1), (x.shape[0],))  # ([B]: the denoiser's sigma)
        a = self.path.alpha(t)
        a, s = jnp.where(a > 0, a, 1e-6), self.path.sigma(t)  # (alpha = 0: an infinite level, floored)
        z = x / a.reshape((-1,) + (1,) * (x.ndim - 1))
        out = self.denoiser(z, s / a)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(f"denoiser(z, sigma) returned shape {getattr(out, 'shape', type(out).__name__)} for z of "
                             f"shape {x.shape} and sigma of shape {s.shape}; it must return the shape of z")
        return out.astype(jnp.result_type(x, out))


def eps_scale(path: Path, t, kind: str) -> Array:
    """The factor ``c(t)`` with ``pred - target = c(t) (eps_hat - eps)`` at fixed ``x_t``.

    Used to express a weighting of the eps-MSE in any prediction kind: the squared error of
    kind ``kind`` equals ``c(t)^2`` times the eps squared error. ``t: [B]``, returns ``[B]``.
    """
    check_kind(kind)
    check_path(path)
    check_t(t)
    a, s = path.alpha(t), path.sigma(t)
    if kind == "eps":
        return jnp.ones_like(a)
    if kind == "x0":
        return -s / a
    if kind == "v":
        return (a * a + s * s) / a
    if kind == "score":
        return -1.0 / s
    return path.d_sigma(t) - path.d_alpha(t) * s / a
