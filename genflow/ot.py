"""Exact minibatch optimal transport: linear assignment with dual preconditioning.

The exact minibatch OT coupling (Tong et al. 2023, "Improving and generalizing flow-based
generative models with minibatch optimal transport"; Pooladian et al. 2023, "Multisample flow
matching") pairs a data batch ``x0: [B, D]`` with a noise batch ``x1: [B, D]`` by the
permutation

    perm = argmin_p  sum_i ||x0_i - x1_p(i)||^2,

a linear assignment problem. It is solved here *exactly* by SciPy's shortest-augmenting-path
solver (Crouse 2016, a Jonker-Volgenant variant; exact for real costs, run in float64), made
about 5x faster (1.5-1.7 vs 8.1-8.4 ms for 256 moons vs 256 Gaussian points, potential included,
on an AMD Zen; on an Intel Xeon 2.0 vs 7.4 ms, where float32 subnormals in the potential's kernel
had made it 8.5 ms: see :func:`column_potential`)
by a *dual preconditioner*:

1. ``g = column_potential(cost)``: an approximate column dual potential from a few over-relaxed
   entropic-OT (Sinkhorn) iterations in scaling form at two decreasing ``eps`` (one ``exp`` pass
   per stage and BLAS matrix-vector products), tightened by one pair of hard c-transforms.
2. The solver runs on ``cost - g[None, :]``.

**Why the result is exact.** Subtracting a column potential changes the total cost of *every*
permutation by the same constant ``sum_j g_j`` (each column is used exactly once), so
``argmin_p sum_i (c[i, p(i)] - g[p(i)]) = argmin_p sum_i c[i, p(i)]`` for any finite ``g``:
the preconditioner cannot change which assignment is optimal, only how fast the solver finds
it. It is equivalent to starting the shortest-augmenting-path method from the column duals
``v = g`` instead of ``v = 0``; with near-optimal duals the augmenting paths are short. A
non-finite potential (overflow of the scaling form) falls back to the column minima, which is
again exact. ``tests/test_ot.py`` checks the optimal costs against SciPy on raw costs and
against brute force.

Batched problems (a chunk of minibatches, or a ``vmap``) are solved in one host call spread
over a thread pool (SciPy's solver and NumPy's BLAS release the GIL), and
:class:`CoupledBatches` prepares the couplings of the next chunk in a background thread while
the training loop runs the current one.

A pure-JAX batched solver (shortest augmenting paths vectorised over columns and vmapped over
a chunk of problems) was measured and rejected on CPU: ~8,000-11,000 lockstep iterations per
256-point problem at several us each under XLA:CPU, i.e. tens of ms per problem against ~3 ms
for SciPy (``experiments/benchmarks/cfm_throughput.py`` has the notes and numbers).
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import queue
import threading
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo
from genflow._checks import check_bool, check_int, check_key, concrete_real, is_int

Array = jax.Array

__all__ = [
    "sq_distances",
    "exact_sq_distances",
    "column_potential",
    "solve_assignment",
    "solve_ot_points",
    "assignment",
    "ot_permutation",
    "assignment_cost",
    "CoupledBatches",
]

_POOL: list = [None, 0]  # [the shared ThreadPoolExecutor, its workers], grown to the largest ``threads`` asked for
_POOL_LOCK = threading.Lock()


def _run_threaded(fn, count: int, threads: int) -> list:
    """``[fn(k) for k in range(count)]`` on ``threads`` workers of one shared pool (results do not
    depend on where they run). One pool for every ``threads`` value: a pool per value, never shut
    down, left a sweep over ``threads`` with all their idle threads. The pool grows (replaced by a
    larger one, the old one shut down once its tasks end) under a lock also held while submitting,
    so no call submits to a pool being shut down; each call runs ``min(threads, count)`` tasks that
    take the next problem from a shared counter (load-balanced as ``pool.map`` was)."""
    out: list = [None] * count
    taken = iter(range(count))
    take_lock = threading.Lock()

    def worker():
        while True:
            with take_lock:
                k = next(taken, None)
            if k is None:
                return
            out[k] = fn(k)

    workers = min(threads, count)
    with _POOL_LOCK:
        pool, size = _POOL
        if size < workers:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="genflow-ot")
            _POOL[:] = pool, workers
        futures = [pool.submit(worker) for _ in range(workers)]
    for f in futures:
        f.result()  # (re-raises a worker's exception: the first problem that failed)
    return out


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _check_square(cost, name: str = "cost") -> None:
    if cost.ndim < 2 or cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"{name} must have shape [..., n, n] (square); got {tuple(cost.shape)}")


def _check_points(x0, x1) -> None:
    if x0.shape != x1.shape or x0.ndim < 2:
        raise ValueError(f"x0 and x1 must have the same shape [..., B, F]; got {x0.shape} and {x1.shape}")


def _check_threads(threads) -> None:
    """Checked before the pool (and before a host callback or a stream's background thread)."""
    if threads is not None and not is_int(threads, 1):
        raise ValueError(f"threads must be >= 1 (an int, or None for the default); got {threads!r}")


def sq_distances(x0, x1):
    """Squared Euclidean cost ``C[..., i, j] = ||x0[..., i, :] - x1[..., j, :]||^2``.

    ``x0, x1: [..., B, F]`` (NumPy or JAX); returns ``[..., B, B]`` in their floating dtype
    (float64 for integer inputs from 4 features). With NumPy and ``F < 4`` features (2-D toy data)
    it is a sum of squared differences, one feature at a time: no cancellation, so float64
    inputs give float64-exact costs. With ``F >= 4`` it is the Gram form
    ``|a_i|^2 + |b_j|^2 - 2 a_i.b_j`` of the points centred on their common mean (one BLAS
    matrix product: 0.22 vs 6.9 ms at B = 256, F = 64; 3.9 vs 52 ms at F = 784), clipped at 0.
    Centring makes it translation-invariant; its rounding is ~1e-16 of the squared spread of
    the points (max difference to the exact form 1.7e-13 at F = 64, 6.4e-12 at F = 784 for unit
    Gaussians, whose costs are ~2F), which can only reorder assignments whose total costs tie to
    that precision. JAX inputs use the difference form.
    """
    _check_points(x0, x1)
    if isinstance(x0, jax.Array) or isinstance(x1, jax.Array):
        x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
        if not jnp.issubdtype(jnp.result_type(x0, x1), jnp.inexact):  # integers would wrap around
            x0, x1 = x0.astype(jnp.result_type(float)), x1.astype(jnp.result_type(float))
        d = x0[..., :, None, :] - x1[..., None, :, :]
        return jnp.sum(d * d, axis=-1)
    x0, x1 = np.asarray(x0), np.asarray(x1)
    if x0.shape[-1] < _GRAM_MIN_FEATURES or x0.shape[-2] == 0:
        return exact_sq_distances(x0, x1)
    m = 0.5 * (x0.mean(axis=-2, keepdims=True) + x1.mean(axis=-2, keepdims=True))
    a, b = x0 - m, x1 - m
    out = np.matmul(a, np.swapaxes(b, -1, -2))
    out *= -2.0
    out += np.einsum("...i,...i->...", a, a)[..., :, None]
    out += np.einsum("...i,...i->...", b, b)[..., None, :]
    return np.maximum(out, 0.0, out=out)


def exact_sq_distances(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """:func:`sq_distances` as a sum of squared differences for any ``F`` (NumPy ``[..., B, F]``):
    float64 inputs give float64-exact costs (``gf.metrics.w2_exact`` uses it), at ~``F`` passes
    over ``[..., B, B]``.

    One feature at a time, in place: reducing a ``[..., B, B, F]`` difference over its short
    last axis is ~10x slower for F = 2 (1.9 vs 0.19 ms at B = 256; it was a third of the host
    coupling's time). The values agree with that form up to summation order (F <= 2: identical).
    """
    x0, x1 = np.asarray(x0), np.asarray(x1)
    _check_points(x0, x1)
    if not np.issubdtype(np.result_type(x0, x1), np.inexact):  # integer differences would wrap around
        x0, x1 = x0.astype(np.float64), x1.astype(np.float64)
    out = None
    for f in range(x0.shape[-1]):
        d = x0[..., :, f, None] - x1[..., None, :, f]
        d *= d
        out = d if out is None else np.add(out, d, out=out)
    if out is None:  # no features: every distance is 0
        out = np.zeros(x0.shape[:-1] + (x1.shape[-2],), np.result_type(x0, x1))
    return out


_GRAM_MIN_FEATURES = 4  # sq_distances' NumPy Gram form from this many features (measured: 2x faster at 4)


# log of the smallest Sinkhorn kernel entry kept, per dtype (column_potential)
_KERNEL_FLOOR = {np.float32: -60.0, np.float64: -700.0}


def column_potential(cost: np.ndarray, eps: float | Sequence[float] = (0.1, 0.02),
                     iters: int | Sequence[int] = (10, 10), omega: float = 1.8) -> np.ndarray:
    """Approximate column dual potential of one assignment problem (host, NumPy).

    Entropic OT with uniform marginals (Cuturi 2013) in scaling form, started from the
    column-then-row reductions ``v_j = min_i c_ij``, ``u_i = min_j (c_ij - v_j)`` so that the
    Gibbs kernel ``K = exp(-(c - u - v) / eps)`` has entries in (0, 1] with a 1 in every row,
    with over-relaxed updates (Thibault et al. 2021, "Overrelaxed Sinkhorn-Knopp algorithm for
    regularized optimal transport"; ``omega = 1`` is plain Sinkhorn):

        a <- a^(1 - omega) (K b)^(-omega),   b <- b^(1 - omega) (K^T a)^(-omega),
        g = v + eps * log(b)

    (one ``exp`` pass, then ``iters`` pairs of BLAS matrix-vector products). ``eps`` may be a
    decreasing schedule (epsilon scaling): each stage restarts the scalings from the previous
    stage's ``g`` (``v <- g``) with its own ``iters``. A hard c-transform pair
    ``u_i = min_j (c_ij - g_j)``, ``g_j = min_i (c_ij - u_i)`` then makes ``g`` dual-feasible and
    tight. ``eps`` is absolute (cost units). The iterations run in float32; if the first stage's
    scalings leave float32's range (large costs relative to ``eps``, or ``omega`` too large), it
    is redone in float64 with all stages' iterations at the first ``eps`` and the later,
    sharper stages are skipped; a later stage that leaves float32's range is dropped (the
    previous stage's ``g`` is kept); non-finite entries left fall back to ``v``. ``g`` is then
    shifted by a constant so that ``min_j g_j = 0``. Only speed depends on the result:
    any finite ``g`` leaves the optimal assignment unchanged.

    The default (eps 0.1 then 0.02, 10 iterations each) costs about what one stage of 20
    iterations at eps 0.1 costs, and SciPy's solver then finishes sooner: potential + solve per
    256-point problem 1.17-1.26 vs 1.40-1.45 ms on moons vs Gaussian noise (8 Gaussians 1.14-1.18
    vs 1.42-1.54, checkerboard 1.09-1.31 vs 1.30-1.45; 512 moons points 4.8-6.0 vs 6.6-9.0 ms); on
    16-D Gaussians, where the float64 retry runs, 1.15-1.30 vs 1.09-1.27 (about the same).
    ``experiments/benchmarks/cfm_throughput.py --part solver`` times it.

    Args:
      cost: ``[n, n]``.
      eps: entropic regularisation, > 0: a float (one stage), or a sequence of stages.
      iters: Sinkhorn iterations, >= 0: an int (per stage), or one per stage of ``eps`` (with a
        float ``eps``, the one stage runs their sum).
      omega: over-relaxation, in (0, 2).
    Returns:
      ``[n]`` float64 column potentials, for ``solve_assignment(cost - g[None, :])``.
    """
    cost = np.asarray(cost)
    _check_square(cost)
    if cost.ndim != 2:  # (a batch [k, n, n] failed in a broadcast)
        raise ValueError(f"column_potential takes one [n, n] cost; got shape {cost.shape}")
    if cost.shape[0] == 0:
        return np.zeros(0)
    if np.isnan(cost).any() or np.isneginf(cost).any():  # (NaN potentials came back, unshifted)
        raise ValueError("cost must not contain NaN or -inf (+inf marks a forbidden pair)")
    _check_feasible(cost)
    if not 0.0 < omega < 2.0:
        raise ValueError(f"omega must be in (0, 2); got {omega}")
    stages = _stages(eps, iters)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        c32 = np.asarray(cost, np.float32)  # (costs above float32's range become inf here)
        g = None  # set by the first stage
        for s, (e, n) in enumerate(stages):
            for dtype in ((np.float32, np.float64) if s == 0 else (np.float32,)):
                c = c32 if dtype is np.float32 else np.asarray(cost, dtype)
                base = g.astype(dtype) if s else c.min(axis=0)
                r = c - base[None, :]
                u = r.min(axis=1)
                # Entries below exp(-60) ~ 9e-27 are 0 in float32 (below exp(-700) in the float64
                # retry, whose costs are large relative to eps and need the small entries; a few of
                # its entries just above the floor may stay subnormal), and no float32 entry is
                # subnormal: on an Intel Xeon float32 subnormals (in exp's results, the kernel and
                # the scalings' products with it) took microcode assists -- matrix-vector products
                # ~28x slower, exp ~8x -- and the potential ~7 ms of an 8.5 ms solve instead of
                # ~0.8. (Only speed depends on the kernel: any finite potential keeps the optimal
                # assignment.)
                floor = dtype(_KERNEL_FLOOR[dtype])
                z = (u[:, None] - r) * dtype(1.0 / e)
                np.maximum(z, floor, out=z)
                k = np.exp(z)
                k -= np.exp(floor)  # (the floor's entries exactly 0, without a mask pass)
                # float64 retry of the first stage: all stages' iterations at its eps (the
                # sharper stages would leave float32's range too, and float64 costs more per pass)
                b = _scalings(k, n if dtype is np.float32 else sum(m for _, m in stages), dtype(omega))
                new = base + dtype(e) * np.log(b)
                if np.isfinite(new).all():
                    break
            if s == 0:  # non-finite entries fall back to the column minima of the dtype used
                g = np.where(np.isfinite(new), new, base)
                if new.dtype != np.float32:
                    break  # float32 overflowed at the coarsest eps: the sharper stages would too
            elif np.isfinite(new).all():
                g = new
            else:
                break
        # One pair of hard c-transforms (in float32: only speed depends on g).
        u = (c32 - g.astype(np.float32)[None, :]).min(axis=1)
        tight = (c32 - u[:, None]).min(axis=0)
        g = np.where(np.isfinite(tight), tight, g).astype(np.float64)
    # A constant shift (which changes no assignment's rank) to min(g) = 0: for costs far below
    # eps, g is ~eps * log(n) and cost - g would round the costs away.
    low = g.min()
    return g - low if np.isfinite(low) else g


def _stages(eps, iters) -> list[tuple[float, int]]:
    """``[(eps, iters), ...]`` from scalars or sequences, every element checked: a float ``eps``
    is one stage of all the iterations (their sum), a scalar ``iters`` applies to every stage."""
    eps_l = [eps] if np.ndim(eps) == 0 else list(eps)
    iters_l = [iters] if np.ndim(iters) == 0 else list(iters)
    for e in eps_l:
        v = concrete_real(e)
        if v is None or not v > 0.0:
            raise ValueError(f"eps must be a real > 0 (every stage); got {eps!r}")
    for n in iters_l:
        if not is_int(n, 0):
            raise ValueError(f"iters must be ints >= 0 (every stage); got {iters!r}")
    if np.ndim(eps) == 0:
        iters_l = [sum(iters_l)]
    elif np.ndim(iters) == 0:
        iters_l = iters_l * len(eps_l)
    if not eps_l or len(iters_l) != len(eps_l):
        raise ValueError(f"eps and iters must be scalars or sequences of the same non-zero length; got eps={eps!r}, "
                         f"iters={iters!r}")
    return [(float(e), int(n)) for e, n in zip(eps_l, iters_l)]


def _check_feasible(c: np.ndarray) -> None:
    """A ``ValueError`` naming the first row or column of ``c`` whose pairs are all forbidden
    (+inf): its column potential is +inf, and the preconditioned costs ``c - g`` were then
    ``inf - inf = NaN`` (SciPy: "invalid numeric entries", though the input holds no NaN)."""
    forbidden = np.isposinf(c)
    if c.size and forbidden.any():
        for axis, what in ((1, "row"), (0, "column")):
            blocked = np.flatnonzero(forbidden.all(axis=axis))
            if blocked.size:
                raise ValueError(f"cost matrix is infeasible: {what} {int(blocked[0])} has no allowed pair (all +inf)")


def _scalings(k: np.ndarray, iters: int, omega) -> np.ndarray:
    """The column scaling ``b`` after ``iters`` (over-relaxed) Sinkhorn iterations on ``K``.

    ``a @ k`` is ``K^T a`` without a transposed copy (BLAS reads ``k`` transposed), and the
    over-relaxed update is written ``a (a K b)^(-omega)`` (= ``a^(1-omega) (K b)^(-omega)``):
    one power per half-step."""
    a = np.ones(k.shape[0], k.dtype)
    b = np.ones(k.shape[1], k.dtype)
    if omega == 1:
        for _ in range(iters):
            a = 1.0 / (k @ b)
            b = 1.0 / (a @ k)
        return b
    step = -omega
    for it in range(iters):
        a = a * (a * (k @ b)) ** step
        b = b * (b * (a @ k)) ** step
        if it % 4 == 3 and not np.isfinite(b).all():
            break  # out of range: the caller retries in a wider dtype
    return b


def _solve_one(cost: np.ndarray, precondition: bool, eps, iters, guard: bool = True) -> np.ndarray:
    """``guard``: a cost from the caller (checked for NaN / -inf, and for preconditioning rounding);
    False for squared distances of points that were checked finite."""
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(cost, np.float64)
    if guard and (np.isnan(c).any() or np.isneginf(c).any()):  # (SciPy: "matrix contains invalid numeric entries")
        raise ValueError("cost must not contain NaN or -inf (+inf marks a forbidden pair)")
    if not precondition or c.shape[0] <= 1:
        if guard:
            _check_feasible(c)
        return linear_sum_assignment(c)[1].astype(np.int32)
    r = c - column_potential(c, eps, iters)[None, :]  # (it checks feasibility itself)
    perm = linear_sum_assignment(r)[1]
    # c - g is exact only up to rounding at the scale of |c - g|: with potentials that dwarf the
    # costs the optimum uses (entries spanning ~40 decades), that rounding reorders assignments
    # (a total 6e6 times the optimum). If the bound on it is not negligible against the total
    # found, solve the raw costs too and keep the cheaper assignment.
    if guard:
        rows = np.arange(c.shape[0])
        total = _total(c[rows, perm])
        if c.shape[0] * np.finfo(np.float64).eps * max(r.max(), -r.min()) > _PRECONDITION_RTOL * abs(total):
            raw = linear_sum_assignment(c)[1]
            if _total(c[rows, raw]) < total:
                perm = raw
    return perm.astype(np.int32)


_PRECONDITION_RTOL = 1e-12  # (the bound is ~1e-13 of the total on moons-vs-Gaussian problems)


def _batched(fn, count: int, threads: int | None) -> list:
    _check_threads(threads)
    threads = _default_threads() if threads is None else int(threads)
    if count <= 1 or threads == 1:
        return [fn(k) for k in range(count)]
    return _run_threaded(fn, count, threads)


def _total(v: np.ndarray) -> float:
    """An assignment's exact total (``math.fsum``), or +-inf where it overflows (costs ~1e307)."""
    try:
        return math.fsum(v)
    except OverflowError:
        with np.errstate(over="ignore"):
            return float(np.sum(v))


def solve_assignment(cost: np.ndarray, *, precondition: bool = True, eps=(0.1, 0.02), iters=(10, 10),
                     threads: int | None = None) -> np.ndarray:
    """Exact linear assignment on the host: ``perm`` minimising ``sum_i cost[..., i, perm[i]]``.

    Args:
      cost: ``[..., n, n]`` (solved in float64).
      precondition: shift the columns by :func:`column_potential` before SciPy's solver (same
        optimal assignments; see the module docstring).
      eps, iters: parameters of :func:`column_potential`.
      threads: the problems of a batch are spread over this many threads (default: the number
        of CPUs, at most 4).
    Returns:
      ``[..., n]`` int32 permutations.
    """
    cost = np.asarray(cost)
    _check_square(cost)
    if np.iscomplexobj(cost):  # (the imaginary part was dropped with a ComplexWarning)
        raise TypeError(f"cost must be real; got dtype {cost.dtype}")
    _stages(eps, iters)  # checked here, even when not preconditioning, not in the pool
    precondition = check_bool("precondition", precondition)  # ('False' was truthy)
    lead, n = cost.shape[:-2], cost.shape[-1]
    flat = cost.reshape((math.prod(lead), n, n))  # (-1 is ambiguous for n = 0)
    out = _batched(lambda k: _solve_one(flat[k], precondition, eps, iters), flat.shape[0], threads)
    return np.stack(out).reshape(lead + (n,)) if out else np.zeros(lead + (n,), np.int32)


def solve_ot_points(x0: np.ndarray, x1: np.ndarray, *, precondition: bool = True, eps=(0.1, 0.02),
                    iters=(10, 10), threads: int | None = None) -> np.ndarray:
    """Host: exact OT permutations for point batches ``x0, x1: [..., B, F]``.

    Returns ``[..., B]`` int32 ``perm`` minimising ``sum_i ||x0_i - x1_perm(i)||^2``, with the
    costs computed in float64 from the given points. ``precondition``, ``eps``, ``iters``,
    ``threads``: see :func:`solve_assignment`.
    """
    x0, x1 = np.asarray(x0), np.asarray(x1)
    _check_points(x0, x1)
    lead, b = x0.shape[:-2], x0.shape[-2]
    count = math.prod(lead)  # (-1 is ambiguous for an empty batch)
    f0, f1 = x0.reshape((count,) + x0.shape[-2:]), x1.reshape((count,) + x1.shape[-2:])
    _stages(eps, iters)  # checked once, not per problem in the pool (threads: by _batched)
    precondition = check_bool("precondition", precondition)

    def one(k):
        # Each problem's points are converted to float64 on their own: converting the whole
        # batch up front (two [P, B, F] float64 arrays) made every problem's [B, B] temporaries
        # page-fault afresh in a standalone loop (~400 minor faults and +0.7 ms per 256-point
        # problem: 2.1 vs 1.4 ms), whatever the allocator's reason.
        a, b_ = np.asarray(f0[k], np.float64), np.asarray(f1[k], np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b_).all()):
            raise ValueError("x0 and x1 must be finite (a NaN or inf point has no squared distance to pair)")
        # (no rounding guard: squared distances of finite points do not span tens of decades, and
        # the guard's passes over the cost cost ~3% of the training pipeline's solve)
        return _solve_one(sq_distances(a, b_), precondition, eps, iters, guard=False)

    out = _batched(one, f0.shape[0], threads)
    return np.stack(out).reshape(lead + (b,)) if out else np.zeros(lead + (b,), np.int32)


def assignment(cost: Array, *, precondition: bool = True, eps=(0.1, 0.02), iters=(10, 10),
               threads: int | None = None) -> Array:
    """Exact linear assignment, callable under ``jit`` / ``vmap`` / ``lax.scan``.

    ``cost: [..., n, n]``; returns ``[..., n]`` int32 ``perm`` minimising
    ``sum_i cost[..., i, perm[i]]``. Runs :func:`solve_assignment` on the host through
    ``jax.pure_callback``; batched leading dimensions (and ``vmap``) are solved in one host
    call, spread over ``threads``.
    """
    _check_square(cost)
    stages = tuple(_stages(eps, iters))  # here, not as an error inside the host callback
    _check_threads(threads)
    out = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    solve = _host_solver(solve_assignment, check_bool("precondition", precondition), stages, threads)
    return jax.pure_callback(solve, out, jax.lax.stop_gradient(cost), vmap_method="expand_dims")


def ot_permutation(x0: Array, x1: Array, *, precondition: bool = True, eps=(0.1, 0.02), iters=(10, 10),
                   threads: int | None = None) -> Array:
    """The exact minibatch OT permutation ``argmin_p sum_i ||x0_i - x1_p(i)||^2``, jittable.

    ``x0, x1: [B, ...]`` (features flattened); returns ``[B]`` int32. The costs are computed in
    float64 on the host from the given points (:func:`solve_ot_points`); under ``vmap`` all
    problems are solved in one host call.
    """
    if x0.shape != x1.shape or x0.ndim < 1:
        raise ValueError(f"x0 and x1 must have the same shape [B, ...]; got {x0.shape} and {x1.shape}")
    stages = tuple(_stages(eps, iters))  # here, not as an error inside the host callback
    _check_threads(threads)
    features = math.prod(x0.shape[1:])  # (-1 is ambiguous for B = 0)
    a = jax.lax.stop_gradient(x0.reshape(x0.shape[0], features))
    b = jax.lax.stop_gradient(x1.reshape(x1.shape[0], features))
    out = jax.ShapeDtypeStruct((x0.shape[0],), jnp.int32)
    solve = _host_solver(_solve_broadcast_points, check_bool("precondition", precondition), stages, threads)
    return jax.pure_callback(solve, out, a, b, vmap_method="expand_dims")


def _solve_broadcast_points(a, b, **options):
    # under vmap of one argument only, the other arrives with leading size-1 axes
    return solve_ot_points(*np.broadcast_arrays(a, b), **options)


@functools.lru_cache(maxsize=256)
def _host_solver(solver, precondition, stages: tuple, threads):
    """``solver`` with its options bound, one object per set of options: outside ``jit``,
    ``pure_callback`` compiles a program keyed on the callback's identity, and a callback built
    afresh on every call recompiled it on every call (~50 ms each, against a ~1 ms solve)."""
    return functools.partial(solver, precondition=precondition, eps=tuple(e for e, _ in stages),
                             iters=tuple(n for _, n in stages), threads=threads)


def assignment_cost(cost, perm):
    """``sum_i cost[..., i, perm[..., i]]`` (NumPy or JAX arrays); shape ``cost.shape[:-2]``."""
    xp = jnp if isinstance(cost, jax.Array) else np
    picked = xp.take_along_axis(cost, perm[..., :, None], axis=-1)[..., 0]
    return xp.sum(picked, axis=-1)


def _standard_normal(key: Array, shape, dtype) -> Array:
    return jax.random.normal(key, shape, dtype)


def _make_draw(sampler: Callable, batch_size: int, chunk: int, noise: Callable) -> Callable:
    """Jitted ``draw(key) -> (x0, x1)``, each ``[chunk, B, ...]``."""

    def one(key):
        k0, k1 = jax.random.split(key)
        x0 = sampler(k0, batch_size)
        return x0, noise(k1, x0.shape, x0.dtype)

    return jax.jit(lambda key: jax.vmap(one)(jax.random.split(key, chunk)))


# Compiled draws per sampler, for as long as the sampler lives (keyed by identity: streams built
# with the same sampler reuse the compiled function; equal samplers holding different data must
# not). A global LRU of 32 kept the samplers of closed streams alive, with the datasets they close
# over twice (the closure's and the executable's constant). At most _DRAWS_PER_SAMPLER per sampler.
_DRAWS = _memo.IdentityTables()
_DRAWS_PER_SAMPLER = 8


def _draw_fn(sampler: Callable, batch_size: int, chunk: int, noise: Callable) -> Callable:
    """:func:`_make_draw`, kept while ``sampler`` lives (a bound method: while its object lives,
    keyed by its function too: two accesses of ``ds.sample`` are distinct objects); it reaches
    ``sampler`` through a weak reference (a strong one from the kept function would keep its own
    owner alive), so the stream must hold ``sampler`` itself. Raises ``TypeError`` for a sampler
    that cannot be weakly referenced or a ``noise`` that is unhashable."""
    owner, func = _memo.cache_owner(sampler)
    key = (func, batch_size, chunk, _memo.without_owner(noise, owner))
    hash(key)
    table = _DRAWS.table(owner)
    draw = _memo.lru_get(table, key)
    if draw is None:
        ref = weakref.ref(owner)
        call = (lambda k, n: ref()(k, n)) if func is None else (lambda k, n: func(ref(), k, n))
        draw = _make_draw(call, batch_size, chunk, noise)
        _memo.lru_put(table, key, draw, _DRAWS_PER_SAMPLER)
    return draw


class CoupledBatches:
    """An iterator of exact-OT-coupled training batches ``{"x": x0, "x1": x1}``, a chunk at a time.

    The coupling of a minibatch depends only on the two random draws, not on the model, so the
    couplings of a whole chunk of steps can be computed together and ahead of time: a
    background thread draws ``chunk`` minibatches of data and noise on device (one jitted call),
    solves the ``chunk`` exact assignments on the host thread pool and queues the permuted noise,
    while the training loop consumes the previous chunk. Feed it to :func:`genflow.train.fit` as
    an iterable of host batches, with a loss that uses ``batch["x1"]`` as the noise
    (:func:`genflow.losses.paired_coupling`).

    Args:
      sampler: ``sampler(key, n) -> [n, ...]`` data sampler (jittable), e.g. ``gf.data.moons``.
      batch_size: minibatch size ``B``.
      key: PRNG key of the whole stream (chunk ``k`` uses ``fold_in(key, k)``). On several hosts
        give each its own (``fold_in(key, jax.process_index())``): ``fit`` takes each host's
        batches as its local share of the global batch, and equal keys would repeat it.
      chunk: minibatches prepared per background job.
      prefetch: chunks queued ahead.
      coupling: ``"ot"`` (exact) or ``"independent"`` (the same stream without permutation).
      noise: ``noise(key, shape, dtype) -> array``; standard normal by default.
      precondition, eps, iters, threads: see :func:`assignment`.
    Yields:
      ``{"x": [B, ...], "x1": [B, ...]}`` NumPy arrays, one minibatch at a time, forever (or
      ``num_batches`` of them), to one consumer thread. An exception in the background thread
      (the sampler or the solver) is raised by the next call and by every call after it.
    """

    def __init__(self, sampler: Callable[[Array, int], Array], batch_size: int, key: Array, *, chunk: int = 100,
                 prefetch: int = 2, coupling: str = "ot", noise: Callable | None = None, precondition: bool = True,
                 eps=(0.1, 0.02), iters=(10, 10), threads: int | None = None, num_batches: int | None = None):
        if coupling not in ("ot", "independent"):
            raise ValueError(f"coupling must be 'ot' or 'independent'; got {coupling!r}")
        batch_size, chunk = check_int("batch_size", batch_size), check_int("chunk", chunk)
        prefetch = check_int("prefetch", prefetch)
        if num_batches is not None:
            num_batches = check_int("num_batches", num_batches, 0)
        self.batch_size, self.chunk, self.coupling = batch_size, chunk, coupling
        self.threads, self.num_batches = threads, num_batches
        self.precondition = check_bool("precondition", precondition)
        _stages(eps, iters)  # bad eps / iters / threads fail here, not in the background thread
        _check_threads(threads)
        self.eps, self.iters = eps, iters
        self._sampler = sampler  # (the kept draw function reaches it through a weak reference)
        try:
            self._draw = _draw_fn(sampler, self.batch_size, self.chunk, noise or _standard_normal)
        except TypeError:  # (an unhashable sampler, e.g. a dataclass with __call__: compiled for this stream only)
            self._draw = _make_draw(sampler, self.batch_size, self.chunk, noise or _standard_normal)
        check_key(key)  # (key=0 failed at the first next(), from the background thread, without naming it)
        self._key, self._prefetch = key, int(prefetch)
        self._error: BaseException | None = None
        self._current: tuple | None = None
        self._pos = self._skip = self._served = 0
        self._start(0)

    def _start(self, first: int) -> None:
        """Start the background thread at chunk ``first``. It holds only a weak reference, so an
        unclosed stream that is garbage-collected stops its thread (the finalizer sets the stop
        flag) instead of living on."""
        self._queue: queue.Queue = queue.Queue(maxsize=self._prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_work, args=(weakref.ref(self), self._queue, self._stop, first),
                                        daemon=True, name="genflow-ot-batches")
        old = getattr(self, "_finalizer", None)
        if old is not None:  # (set_state stopped the old thread: its finalizer, kept till the stream died, is moot)
            old.detach()
        self._finalizer = weakref.finalize(self, self._stop.set)
        _LIVE.add((self._stop, self._thread))  # the thread removes itself when it ends
        self._thread.start()

    def get_state(self) -> dict:
        """``{"served": n}``: the position of the stream (JSON-serialisable; ``gf.train.fit`` saves
        it with each checkpoint)."""
        return {"served": self._served}

    def set_state(self, state: dict) -> None:
        """Continue after the first ``state["served"]`` minibatches, exactly as an uninterrupted
        stream would (chunk ``k`` depends only on the key and ``k``): for resuming from a
        checkpoint. The background thread restarts at the chunk holding that position."""
        served = check_int("state['served']", (state or {}).get("served"), 0)
        self._stop.set()  # the old thread stops at its next queue operation
        self._served, self._current, self._error = served, None, None
        self._skip = served % self.chunk
        self._start(served // self.chunk)

    def prepare(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``index``: ``(x0, x1)`` of shape ``[chunk, B, ...]`` with ``x1`` OT-permuted."""
        x0, x1 = jax.device_get(self._draw(jax.random.fold_in(self._key, index)))
        if x0.shape[1] != self.batch_size or x1.shape != x0.shape:  # (a wrong row count was coupled as drawn)
            raise ValueError(f"sampler(key, {self.batch_size}) must return [{self.batch_size}, ...] and noise its shape; "
                             f"got {x0.shape[1:]} and {x1.shape[1:]}")
        if self.coupling == "ot":
            f0, f1 = x0.reshape(x0.shape[:2] + (-1,)), x1.reshape(x1.shape[:2] + (-1,))
            perm = solve_ot_points(f0, f1, precondition=self.precondition, eps=self.eps, iters=self.iters,
                                   threads=self.threads)
            x1 = np.take_along_axis(x1, perm.reshape(perm.shape + (1,) * (x1.ndim - 2)), axis=1)
        return np.asarray(x0), np.asarray(x1)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._error is not None:  # the background thread failed: every later call says so too
            raise self._error
        if self._stop.is_set():  # closed (set_state replaces the flag): a get() would wait forever
            raise StopIteration
        if self.num_batches is not None and self._served >= self.num_batches:
            self.close()
            raise StopIteration
        if self._current is None or self._pos >= self.chunk:
            item = self._next_chunk()
            if isinstance(item, BaseException):
                self._error = item
                self.close()
                raise item
            self._current, self._pos, self._skip = item, self._skip, 0
        x0, x1 = self._current
        out = {"x": x0[self._pos], "x1": x1[self._pos]}
        self._pos += 1
        self._served += 1
        return out

    def _next_chunk(self):
        """The next prepared chunk (or the exception that stopped the thread). Waits while the
        thread runs; a thread that ended without queueing it is an error here rather than a wait
        that never ends (a bug in the chunk count hung the consumer, and the test suite with it)."""
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
            try:  # (it may have queued its last chunk just before it ended)
                return self._queue.get_nowait()
            except queue.Empty:
                raise RuntimeError(f"CoupledBatches: the background thread ended without preparing the chunk "
                                   f"of batch {self._served} (num_batches={self.num_batches}, "
                                   f"chunk={self.chunk})") from None

    def close(self) -> None:
        """Stop the background thread and wait for it (at most the chunk it is preparing): a
        daemon thread still inside JAX or SciPy at interpreter exit crashes the process. Later
        calls of ``next`` raise ``StopIteration`` (until :meth:`set_state` restarts the stream)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self):
        """``with CoupledBatches(...) as stream:`` closes the stream on leaving the block, also when
        its consumer raised (a kept traceback kept the stream, its thread and a prepared chunk
        alive until the exception was dropped)."""
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LIVE: set = set()  # (stop, thread) of every running stream thread: stopped and joined at exit


@atexit.register
def _stop_all() -> None:
    for stop, thread in list(_LIVE):
        stop.set()
    for stop, thread in list(_LIVE):
        thread.join()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _work(ref: "weakref.ref[CoupledBatches]", q: queue.Queue, stop: threading.Event, first: int = 0) -> None:
    try:
        _work_loop(ref, q, stop, first)
    finally:
        _LIVE.discard((stop, threading.current_thread()))


def _work_loop(ref: "weakref.ref[CoupledBatches]", q: queue.Queue, stop: threading.Event, first: int) -> None:
    """The background thread of a :class:`CoupledBatches`: prepares chunks ahead from chunk
    ``first`` and queues them (or the exception that stopped it), until the stream is closed,
    exhausted or collected."""
    stream = ref()
    if stream is None:
        return
    last = None if stream.num_batches is None else -(-stream.num_batches // stream.chunk)  # chunks to prepare
    del stream
    index = first
    while not stop.is_set() and (last is None or index < last):
        stream = ref()
        if stream is None:
            return
        try:
            item = stream.prepare(index)
        except BaseException as e:  # surfaced in the consumer
            del stream
            # the traceback's frames (prepare's ``self``) would keep the stream alive while
            # _put waits on a full queue: it would never be collected, nor this thread stop
            traceback.clear_frames(e.__traceback__)
            _put(q, e, stop)
            return
        del stream
        index += 1
        if not _put(q, item, stop):
            return
