"""Normalizing flows ``x -> z = g(x)`` with a standard normal base, and their training objectives.

``log p(x) = log N(g(x); 0, I) + log|det dg/dx|`` (change of variables; Dinh et al. 2017,
Kingma & Dhariwal 2018). Training by maximum likelihood needs every layer's log-determinant.

**EBFlow** (Chao et al. 2023, "Training Energy-Based Normalizing Flow with Score-Matching
Objectives") writes the same density as an energy-based model::

    log p(x) = -E(x) - log Z,   E(x) = -log N(g(x)) - sum_{nonlinear l} log|det J_l(x)|,
    log Z = -sum_{linear l} log|det W_l|

where the linear layers' Jacobians do not depend on ``x``. Score-matching objectives only need
``grad_x log p = -grad_x E``, so training never computes the linear layers' log-determinants
(for dense ``D x D`` layers, an O(D^3) ``slogdet`` and its gradient ``W^-T``); ``log Z`` is
computed only to evaluate the likelihood. Objectives: sliced score matching (Song et al. 2019,
variance-reduced form) and denoising score matching (Vincent 2011).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import (check_data_batch, check_finite_rows, check_int, check_key, check_positive_real, flat_batch,
                             is_int, split_batch)
from genflow.flows._layers import (ActNorm, AdditiveCoupling, AffineCoupling, Chain, FactorOut, Invertible1x1Conv,
                                   Layer, Squeeze, Unsqueeze, check_logdet)
from genflow.likelihood._discrete import uniform_dequantize
from genflow.likelihood._ode import gaussian_log_prob

Array = jax.Array

__all__ = ["Flow", "OBJECTIVES", "nll_loss", "ssm_loss", "dsm_loss", "flow_objective", "glow", "realnvp"]

OBJECTIVES = ("ml", "ssm", "dsm")


@functools.partial(jax.jit, static_argnums=0)
def _init(bijector: Layer, key: Array, x: Array):
    return bijector.init(key, x)


# The flow's computations, compiled once per bijector (layers are hashable) and shapes: eagerly
# they ran op by op (a RealNVP's log_prob took 36 ms against 0.7 ms compiled).
@functools.partial(jax.jit, static_argnums=0)
def _log_prob(bijector: Layer, params, x: Array) -> Array:
    z, ld = bijector.forward(params, x)
    return gaussian_log_prob(z, 1.0) + check_logdet(bijector, ld, x, "forward")


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _sample(bijector: Layer, event_shape: tuple, params, key: Array, n: int, dtype) -> Array:
    z = jax.random.normal(key, (n,) + event_shape, dtype)
    return bijector.inverse(params, z)[0]


def _energy_fn(bijector: Layer, params, x: Array) -> Array:
    z, ld_nonlinear, _ = bijector.forward_split(params, x, linear_logdet=False)
    return -(gaussian_log_prob(z, 1.0) + ld_nonlinear)


_energy = jax.jit(_energy_fn, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _score(bijector: Layer, params, x: Array) -> Array:
    return -jax.grad(lambda y: jnp.sum(_energy_fn(bijector, params, y)))(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _log_normalizer(bijector: Layer, event_shape: tuple, params) -> Array:
    leaves = [v for v in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32  # float64 parameters give a float64 log Z
    _, _, ld_linear = bijector.forward_split(params, jnp.zeros((1,) + event_shape, dtype))
    return -ld_linear[0]


@dataclasses.dataclass(frozen=True)
class Flow:
    """A flow ``bijector`` (data -> latent) over events of shape ``event_shape``, base ``N(0, I)``."""

    bijector: Layer
    event_shape: tuple

    def __post_init__(self):
        # (an int failed at the first log_prob as "'int' object is not iterable"; a list was accepted)
        shape = (self.event_shape,) if isinstance(self.event_shape, (int, np.integer)) else self.event_shape
        try:
            shape = tuple(shape)
            ok = all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"event_shape must be a tuple of positive ints (e.g. (2,) or (8, 8, 1)); got "
                             f"{self.event_shape!r}")
        object.__setattr__(self, "event_shape", tuple(int(d) for d in shape))
        try:  # (a plain, unfrozen dataclass layer failed at the first call with JAX's "Non-hashable static arguments")
            hash(self.bijector)
        except TypeError:
            culprit = self.bijector
            for layer in getattr(culprit, "layers", ()):  # (the layer of a Chain that is not)
                try:
                    hash(layer)
                except TypeError:
                    culprit = layer
                    break
            raise TypeError(f"bijector must be hashable, each layer a frozen dataclass (@dataclasses.dataclass("
                            f"frozen=True); see gf.flows.Layer); {type(culprit).__name__} is not") from None

    def init(self, key: Array, x: Array):
        """Parameters, with data-dependent initialisation on the example batch ``x: [B, *event_shape]``.

        ActNorm sets ``log_scale = -log(std + 1e-6)`` from this batch, so give it data as the flow
        will see it in training: for discrete data trained with ``flow_objective(...,
        dequantize=bin_width)``, a dequantized batch (``x + (u - 0.5) * bin_width``). Raw discrete
        data often has constant dimensions (e.g. the border pixels of ``gf.data.load_digits``),
        whose scale would start at ~1e6: a RealNVP on the digits then starts at ~1e8 nats/dim
        and does not recover.
        """
        self._check(x)
        check_finite_rows("x", x)  # (one NaN row made every ActNorm's statistics, so every log-density, NaN)
        # one compilation instead of op-by-op dispatch, cached per bijector (layers are hashable):
        # jax.jit(self.bijector.init) was a new function, compiled again, on every call
        return _init(self.bijector, key, x)

    def _check(self, x):
        if not hasattr(x, "shape"):  # (a list failed as "'list' object has no attribute 'shape'")
            raise TypeError(f"x must be an array [B, {', '.join(map(str, self.event_shape))}]; got "
                            f"{type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.event_shape))}]; got {x.shape}")
        # (integer data was scored as a continuous density, silently, where nll_loss refused it)
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            integer = dtype is not None and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_))
            raise ValueError(f"x must be a floating-point array [B, {', '.join(map(str, self.event_shape))}]; got "
                             f"dtype {dtype}{_DEQUANTIZE_HINT if integer else ''}")

    def log_prob(self, params, x: Array) -> Array:
        """``log p(x) = log N(g(x)) + log|det dg/dx|``; ``x: [B, ...]`` -> ``[B]`` (nats)."""
        self._check(x)
        return _log_prob(self.bijector, params, x)

    def sample(self, params, key: Array, n: int, dtype=jnp.float32) -> Array:
        """``[n, *event_shape]`` samples ``g^-1(z)``, ``z ~ N(0, I)`` drawn in ``dtype``; the samples
        come back in its promotion with the parameters' dtype (float32 parameters give float32
        samples for a bfloat16 ``dtype``)."""
        n = check_int("n", n)  # (n=0 failed as a ZeroDivisionError, n=-1 as an MLIRError, n=2.0 unnamed)
        check_key(key)  # (key=0 failed as "invalid PRNG key data")
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):  # (complex64 gave complex "samples")
            raise TypeError(f"dtype must be a real floating dtype; got {jnp.dtype(dtype)}")
        return _sample(self.bijector, tuple(self.event_shape), params, key, n, jnp.dtype(dtype))

    def energy(self, params, x: Array) -> Array:
        """EBFlow's energy ``E(x) = -log N(g(x)) - sum_nonlinear log|det J_l(x)|``; ``[B]``.

        Linear layers are applied without computing their log-determinants."""
        self._check(x)
        return _energy(self.bijector, params, x)

    def log_normalizer(self, params) -> Array:
        """``log Z = -sum_linear log|det W_l|`` (independent of x), so that ``log p = -E - log Z``."""
        return _log_normalizer(self.bijector, tuple(self.event_shape), params)

    def score(self, params, x: Array) -> Array:
        """``grad_x log p(x) = -grad_x E(x)``; ``[B, ...]`` (samples are independent)."""
        self._check(x)
        return _score(self.bijector, params, x)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)


_DEQUANTIZE_HINT = (" (integer data: dequantize it first, e.g. flow_objective(..., dequantize=bin width) or "
                    "genflow.likelihood.uniform_dequantize)")


def _check_data(x):
    """The training batch of a flow's loss (an empty one gave a NaN loss; integers were fitted as
    a continuous density by "ml" and failed inside JAX for "ssm" / "dsm")."""
    check_data_batch("x", x, _DEQUANTIZE_HINT)


def objective_batch(batch):
    """The data ``x`` of a flow objective's batch (an array, or a dict with ``"x"``; other keys, e.g.
    labels, are not read), named on a wrong structure as in :func:`genflow.train.diffusion_objective`."""
    if isinstance(batch, dict) and "x" in batch:  # (flows take no labels: other keys are ignored)
        return batch["x"]
    return split_batch(batch)[0]


def nll_loss(flow: Flow, params, x: Array) -> Array:
    """Maximum likelihood: ``-mean log p(x) / D`` (nats per dimension); ``x: [B, ...]``, floating."""
    _check_data(x)
    return -jnp.mean(flow.log_prob(params, x)) / flow.dim


def ssm_loss(flow: Flow, params, x: Array, key: Array, num_slices: int = 1, probe: str = "rademacher") -> Array:
    """Sliced score matching (Song et al. 2019, SSM-VR) on the flow's score, per dimension.

    ``E_v[ v^T (d s / dx) v + ||s||^2 / 2 ]`` with ``s = -grad_x E``; one Hessian-vector product
    (forward over reverse mode) per slice. Needs no log-determinant of the linear layers.
    """
    from genflow.likelihood._trace import sample_probes

    _check_data(x)
    check_key(key)  # (key=0 failed as JAX's "invalid PRNG key data")
    num_slices = check_int("num_slices", num_slices)
    v = sample_probes(key, (num_slices,) + x.shape, x.dtype, probe)
    score_fn = lambda y: flow.score(params, y)  # noqa: E731
    s, s_lin = jax.linearize(score_fn, x)
    jv = jax.vmap(s_lin)(v)
    axes = tuple(range(2, v.ndim))
    trace = jnp.mean(jnp.sum(v * jv, axis=axes), axis=0)
    norm = 0.5 * jnp.sum(flat_batch(jnp.square(s)), axis=-1)
    return jnp.mean(trace + norm) / flow.dim


def dsm_loss(flow: Flow, params, x: Array, key: Array, sigma: float = 0.05) -> Array:
    """Denoising score matching (Vincent 2011): ``E || sigma s(x + sigma n) + n ||^2 / 2`` per dimension.

    Fits the score of the data convolved with ``N(0, sigma^2)``; no log-determinant of the
    linear layers is needed.
    """
    check_positive_real("sigma", sigma)
    _check_data(x)
    check_key(key)  # (key=0 failed as JAX's "invalid PRNG key data")
    n = jax.random.normal(key, x.shape, x.dtype)
    s = flow.score(params, x + sigma * n)
    return 0.5 * jnp.mean(jnp.sum(flat_batch(jnp.square(sigma * s + n)), axis=-1)) / flow.dim


def flow_objective(flow: Flow, method: str = "ml", *, sigma: float = 0.05, num_slices: int = 1,
                   dequantize: float | None = None) -> Callable:
    """``loss_fn(params, batch, key)`` for :func:`genflow.train.make_train_step`.

    Args:
      flow: the :class:`Flow` whose parameters are trained.
      method: ``"ml"`` (maximum likelihood), ``"ssm"`` or ``"dsm"`` (EBFlow score matching).
        Score matching sees only the score, which is blind to how mass splits between separated
        modes: on multimodal data it reaches a far worse likelihood than ``"ml"`` (2-D moons:
        3.8-3.9 nats against 1.85, likelihood notebook; digits: experiments/density.py). It pays
        where the log-determinant is the cost (wide dense linear layers), not in 2-D.
      sigma: noise of ``"dsm"``.
      num_slices: projections of ``"ssm"``.
      dequantize: if set, the batch is uniformly dequantized with this bin width every step
        (``x + (u - 0.5) * dequantize``, data at the bin centres); initialise the flow
        (:meth:`Flow.init`) on a batch dequantized the same way.
    """
    if method not in OBJECTIVES:
        raise ValueError(f"unknown flow objective {method!r}; expected one of {list(OBJECTIVES)}")
    check_int("num_slices", num_slices)  # (checked here too: before any tracing)
    check_positive_real("sigma", sigma)
    if dequantize is not None:
        check_positive_real("dequantize", dequantize)

    def loss_fn(params, batch, key):
        x = objective_batch(batch)
        check_key(key)  # (key=0, called directly, failed as JAX's "invalid PRNG key data", unnamed)
        k_deq, k_loss = jax.random.split(key)
        if dequantize is not None:  # (widened to float32 there: integer batches failed, bfloat16 ones left the bin)
            x = uniform_dequantize(k_deq, x, dequantize)[0]
        if method == "ml":
            return nll_loss(flow, params, x), {}
        if method == "ssm":
            return ssm_loss(flow, params, x, k_loss, num_slices), {}
        return dsm_loss(flow, params, x, k_loss, sigma), {}

    return loss_fn


def _step(parity: int, hidden: int, depth: int, lu: bool, coupling: str, mask: str) -> list[Layer]:
    cls = AffineCoupling if coupling == "affine" else AdditiveCoupling
    return [ActNorm(), Invertible1x1Conv(lu=lu), cls(mask=mask, parity=parity, hidden=hidden, depth=depth)]


def _check_coupling(coupling: str, hidden: int, depth: int):
    if coupling not in ("affine", "additive"):
        raise ValueError(f"coupling must be 'affine' or 'additive'; got {coupling!r}")
    # (hidden=0 failed at init as a ZeroDivisionError, hidden=-3 as an unnamed TypeError; depth=-1
    # silently built a conditioner without hidden layers)
    check_int("hidden", hidden)
    check_int("depth", depth)


def _check_lu(lu) -> None:
    if not isinstance(lu, (bool, np.bool_)):  # (lu="no" built LU layers)
        raise TypeError(f"lu must be a bool; got {lu!r}")


def realnvp(dim: int, *, num_steps: int = 8, hidden: int = 64, depth: int = 2, lu: bool = True,
            coupling: str = "affine") -> Flow:
    """A flow on vectors ``[B, dim]``: ``num_steps`` Glow steps (ActNorm, invertible linear,
    coupling on alternating halves). ``lu=False`` gives dense linear layers (EBFlow's setting)."""
    _check_coupling(coupling, hidden, depth)
    _check_lu(lu)
    num_steps = check_int("num_steps", num_steps)
    if not is_int(dim, 2):  # (a float dim gave a Flow with event_shape (2.5,))
        raise ValueError(f"dim must be an int >= 2 for a coupling flow; got {dim!r}")
    layers = [layer for i in range(num_steps) for layer in _step(i, hidden, depth, lu, coupling, "half")]
    return Flow(Chain(tuple(layers)), (dim,))


def glow(event_shape: tuple[int, int, int], *, levels: int = 2, steps_per_level: int = 4, hidden: int = 64,
         depth: int = 2, lu: bool = True, coupling: str = "affine") -> Flow:
    """Multi-scale Glow (Kingma & Dhariwal 2018) on images ``[B, H, W, C]``.

    Each level: squeeze, ``steps_per_level`` x (ActNorm, 1x1 conv, coupling on channel halves),
    then half of the channels are factored out (:class:`FactorOut`) and the rest continue to the
    next level. ``H`` and ``W`` must be divisible by ``2**levels``.
    """
    _check_coupling(coupling, hidden, depth)
    _check_lu(lu)
    if len(tuple(event_shape)) != 3 or not all(is_int(n) for n in event_shape):
        # ((4, 4, 0) failed at init as "argmax of an empty sequence"; (-4, 4, 1) was accepted)
        raise ValueError(f"event_shape must be (H, W, C) of positive ints; got {event_shape!r}")
    levels, steps_per_level = check_int("levels", levels), check_int("steps_per_level", steps_per_level)
    h, w, c = event_shape
    if h % (2 ** levels) or w % (2 ** levels):
        raise ValueError(f"event_shape {event_shape}: H and W must be divisible by 2**levels = {2 ** levels}")

    def level(k: int) -> list[Layer]:
        body: list[Layer] = [Squeeze()]
        for i in range(steps_per_level):
            body += _step(i, hidden, depth, lu, coupling, "half")
        if k + 1 < levels:
            body.append(FactorOut(Chain(tuple(level(k + 1) + [Unsqueeze()]))))
        return body

    outer = level(0)
    return Flow(Chain(tuple(outer + [Unsqueeze()])), tuple(event_shape))
