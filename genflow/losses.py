"""Training objectives for Gaussian paths: denoising (eps / x0 / v / score) and flow matching.

Every objective here is one regression, written in the model's own prediction kind::

    t ~ p(t) on [t_min, 1],  (x0, x1) ~ coupling(data, N(0, I)),  x_t = alpha x0 + sigma x1
    L = E[ w(t) / c(t)^2 * || fn(x_t, t) - target_kind(x0, x1, t) ||^2 ]

where ``c(t)`` is :func:`genflow.param.eps_scale` (``pred - target = c (eps_hat - eps)``), so
``w(t)`` is always a weighting of the *eps*-MSE (the convention of Kingma & Gao 2023,
"Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation"), whatever
kind the network predicts. The built-in weightings:

=================  ====================================================================
``"uniform"``      plain MSE of the predicted kind (``w = c^2``): the usual eps, v, x0 or
                   flow-matching loss
``"eps"``          eps-MSE (``w = 1``)
``"x0"``           x0-MSE (``w = 1/SNR``)
``"v"``            v-MSE (``w = (alpha^2 + sigma^2)^2 / alpha^2``, i.e. 1 + 1/SNR on VP paths)
``"score"``        ``sigma^2``-weighted score matching (DSM of Song et al.): ``w = 1``
``"snr"``          x0-MSE weighted by SNR (Hang et al. 2023's notation), i.e. ``w = 1``
``"min_snr"``      Min-SNR-gamma (Hang et al. 2023): x0-MSE weighted ``min(SNR, gamma)``,
                   i.e. ``w = min(SNR, gamma) / SNR``
``"truncated_snr"`` x0-MSE weighted ``max(SNR, 1)`` (Salimans & Ho 2022), ``w = max(1, 1/SNR)``
``"elbo"``         ``w = -d lambda/dt / 2``: the continuous-time ELBO's diffusion term, up to
                   the factor ``t_max - t_min`` (eps prediction: ``(t_max - t_min) x`` this
                   loss ``=`` :func:`genflow.likelihood.likelihood_loss`)
``"sigmoid"``      ``w = -d lambda/dt * sigmoid(b - lambda) / 2`` (Kingma & Gao, with t uniform)
=================  ====================================================================

A weighting may also be any callable ``w(path, t) -> [B]``.

Couplings pair the data batch with the noise batch. ``"independent"`` keeps the draw;
``"ot"`` (exact minibatch optimal transport, Tong et al. 2023 / Pooladian et al. 2023) permutes
the *noise* so that the pairing minimises the total squared distance; labels stay aligned
with the data. A coupling is any ``f(key, x0, x1) -> x1_permuted``.
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow import param
from genflow._checks import check_data_batch, check_int, check_null_label, flat_batch
from genflow.paths import Path, check_t

Array = jax.Array
Weighting = Callable[[Path, Array], Array]
Coupling = Callable[[Array, Array, Array], Array]

__all__ = [
    "WEIGHTINGS",
    "COUPLINGS",
    "get_weighting",
    "diffusion_loss",
    "flow_matching_loss",
    "dsm_loss",
    "independent_coupling",
    "ot_coupling",
    "exact_assignment",
    "paired_coupling",
    "drop_labels",
    "sample_t",
]


# -- weightings of the eps-MSE -----------------------------------------------------------------
def _w_uniform(kind):
    def w(path, t):
        c = param.eps_scale(path, t, kind)
        return c * c

    w.uniform_kind = kind  # diffusion_loss uses lambda = 1 exactly when the model predicts `kind`
    return w


def _w_min_snr(gamma: float):
    def w(path, t):  # min(SNR, gamma) / SNR, in log form: finite limits at SNR = 0 and inf
        return jnp.exp(jnp.minimum(0.0, jnp.log(gamma) - path.log_snr(t)))

    # the weight of the x0-MSE, as Hang et al. define it: an x0 model's loss weight min(SNR, gamma)
    # (w / c^2 was 0 / 0 where SNR^-1 underflows, e.g. edm(sigma_min=0) at t < 1e-3)
    w.x0_weight = lambda path, t: jnp.exp(jnp.minimum(path.log_snr(t), jnp.log(gamma)))
    return w


def _w_truncated_snr(path, t):  # max(1, 1 / SNR), in log form (finite at SNR = inf)
    return jnp.exp(jnp.maximum(0.0, -path.log_snr(t)))


_w_truncated_snr.x0_weight = lambda path, t: jnp.exp(jnp.maximum(path.log_snr(t), 0.0))  # max(SNR, 1)


def _w_elbo(path, t):
    return -0.5 * path.d_log_snr(t)


def _w_sigmoid(bias: float):
    def w(path, t):
        return -0.5 * path.d_log_snr(t) * jax.nn.sigmoid(bias - path.log_snr(t))

    return w


WEIGHTINGS = ("uniform", "eps", "x0", "v", "score", "snr", "min_snr", "truncated_snr", "elbo", "sigmoid")


def get_weighting(name: str | Weighting, prediction: str, *, gamma: float = 5.0, bias: float = 2.0) -> Weighting:
    """The eps-MSE weighting ``w(path, t) -> [B]`` for a name (see the module docstring)."""
    if callable(name):
        return name
    if name == "uniform":
        return _w_uniform(prediction)
    if name in ("eps", "score", "snr"):
        return _w_uniform("eps")
    if name == "x0":
        return _w_uniform("x0")
    if name == "truncated_snr":
        return _w_truncated_snr
    if name == "v":
        return _w_uniform("v")
    if name == "min_snr":
        if not isinstance(gamma, jax.core.Tracer) and not float(gamma) > 0:
            raise ValueError(f"gamma (of weighting 'min_snr') must be > 0; got {gamma!r}")
        return _w_min_snr(gamma)
    if name == "elbo":
        return _w_elbo
    if name == "sigmoid":
        if not isinstance(bias, jax.core.Tracer) and not np.isfinite(float(bias)):
            raise ValueError(f"bias (of weighting 'sigmoid') must be a finite real; got {bias!r}")
        return _w_sigmoid(bias)
    raise ValueError(f"unknown weighting {name!r}; expected one of {list(WEIGHTINGS)} or a callable w(path, t)")


# -- couplings -----------------------------------------------------------------------------------
def independent_coupling(key: Array, x0: Array, x1: Array) -> Array:
    """The independent coupling: returns ``x1`` unchanged."""
    del key, x0
    return x1


def exact_assignment(cost: Array) -> Array:
    """Exact linear assignment ``perm`` minimising ``sum_i cost[i, perm[i]]``.

    ``cost: [..., B, B]``; returns ``[..., B]`` int32. Solved on the host in float64 by
    :func:`genflow.ot.assignment` (SciPy's Jonker-Volgenant solver on dual-preconditioned
    costs, which has the same optimal assignments) through ``jax.pure_callback``: it works
    under ``jit``, ``vmap`` (one host call for the whole batch of problems) and ``lax.scan``.
    """
    from genflow import ot

    return ot.assignment(cost)


def ot_coupling(key: Array, x0: Array, x1: Array) -> Array:
    """Exact minibatch OT coupling: the permutation of ``x1`` minimising ``sum ||x0_i - x1_p(i)||^2``.

    ``x0, x1: [B, ...]``. Returns ``x1[perm]`` (Tong et al. 2023; Pooladian et al. 2023). The
    squared distances are computed in float64 on the host and the assignment is exact
    (:func:`genflow.ot.ot_permutation`); the key is unused (the coupling is deterministic; ties,
    which have probability zero for continuous draws, are broken by the solver).
    To train fast, prepare the couplings of a whole chunk of steps ahead of time with
    :class:`genflow.ot.CoupledBatches` and :func:`paired_coupling` instead.
    """
    del key
    from genflow import ot

    return x1[ot.ot_permutation(x0, x1)]


def paired_coupling(x1_paired: Array) -> Coupling:
    """A coupling that replaces the drawn noise by pre-coupled noise ``x1_paired: [B, ...]``.

    For noise paired with the data batch outside the loss, e.g. by
    :class:`genflow.ot.CoupledBatches` (exact OT couplings computed a chunk at a time in a
    background thread)::

        loss, aux = gf.losses.flow_matching_loss(fn, path, batch["x"], key,
                                                 coupling=gf.losses.paired_coupling(batch["x1"]))
    """

    def coupling(key: Array, x0: Array, x1: Array) -> Array:
        del key
        if x1_paired.shape != x1.shape:
            raise ValueError(f"paired noise has shape {x1_paired.shape}; the data batch needs {x1.shape}")
        return x1_paired.astype(x1.dtype)

    return coupling


COUPLINGS: dict[str, Coupling] = {"independent": independent_coupling, "ot": ot_coupling}


def _coupling(c: str | Coupling) -> Coupling:
    if callable(c):
        return c
    if c not in COUPLINGS:
        raise ValueError(f"unknown coupling {c!r}; expected one of {sorted(COUPLINGS)} or a callable f(key, x0, x1)")
    return COUPLINGS[c]


# -- time sampling and label dropout ---------------------------------------------------------------
def sample_t(key: Array, n: int, t_min: float = 0.0, t_max: float = 1.0, stratified: bool = False,
             dtype=None) -> Array:
    """``[n]`` times uniform on ``[t_min, t_max)`` in ``dtype`` (default: JAX's default float),
    never exactly ``t = 0`` nor ``t_max``; ``stratified`` uses one draw per n-th of the interval
    (low-discrepancy, as in VDM), which lowers the variance of the loss estimate.

    ``t = 0`` is never drawn: a float32 uniform is exactly 0 with probability 2^-23 per
    draw (about once per 33,000 steps at batch 256), and at ``t = 0`` the linear and cosine paths
    have ``sigma = 0``, where x0/score targets and SNR-based weights are 0/0 -- a NaN loss that
    stopped training. Such a draw becomes ``eps / 2`` of the interval instead (every other draw
    is unchanged; for ``t_min > 0`` that may round back to ``t_min``, where sigma is > 0).
    ``t_max`` is never drawn either (unless ``t_min == t_max``): ``t_min + (t_max - t_min) u``
    rounds up to ``t_max`` for u near 1 (in float32 whenever ``t_min >= 0.75``), and at ``t = 1``
    the linear path's velocity/v losses with SNR-based weights are inf/inf. Such a draw becomes
    the float just below ``t_max`` (or ``t_min`` if that is larger)."""
    n = check_int("n", n, 0)
    check_t(t_min, "t_min")  # (diffusion_loss relies on these: t_min=0.8, t_max=0.2 gave all 0.8, t_min=-1 negative times)
    check_t(t_max, "t_max")
    if not isinstance(t_min, jax.core.Tracer) and not isinstance(t_max, jax.core.Tracer) and t_min > t_max:
        raise ValueError(f"t_min must be <= t_max; got t_min={t_min}, t_max={t_max}")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float_ if dtype is None else dtype)
    if stratified:
        u = (jnp.arange(n, dtype=dtype) + jax.random.uniform(key, (), dtype)) / n
        u = jnp.mod(u, 1.0)
    else:
        u = jax.random.uniform(key, (n,), dtype)
    u = jnp.maximum(u, 0.5 * jnp.finfo(dtype).eps)
    t = (t_min + (t_max - t_min) * u).astype(dtype)
    hi, lo = jnp.asarray(t_max, dtype), jnp.asarray(t_min, dtype)
    below = jnp.maximum(jnp.nextafter(hi, jnp.asarray(-jnp.inf, dtype)), lo)
    return jnp.where(t < hi, t, below)


def drop_labels(key: Array, y: Array, p: float, null_label: int) -> Array:
    """Classifier-free guidance dropout: replace each sample's label by ``null_label`` with
    probability ``p`` (scalar or ``[B]``).

    ``y: [B]`` int labels, or ``[B, ...]`` per-sample conditions (token ids, one-hot or embedding
    vectors), of which a dropped sample's whole condition becomes ``null_label``; returns ``y``'s shape.
    """
    # (NumPy, not jnp: under jit jnp would trace even a Python float)
    if not isinstance(p, jax.core.Tracer) and not np.all((np.asarray(p) >= 0) & (np.asarray(p) <= 1)):
        raise ValueError(f"p must be a probability in [0, 1]; got {p!r}")
    y = jnp.asarray(y)
    if y.ndim < 1:
        raise ValueError(f"y must be a batch of labels [B] or conditions [B, ...]; got shape {y.shape}")
    check_null_label("null_label", null_label, y)
    if jnp.ndim(p) and jnp.shape(p) not in (y.shape[:1], (1,)):  # (JAX's bernoulli error named no argument)
        raise ValueError(f"p must be a scalar or have shape [1] or [B] = [{y.shape[0]}]; got shape {jnp.shape(p)}")
    drop = jax.random.bernoulli(key, p, y.shape[:1])  # one draw per sample, not per entry
    drop = drop.reshape(drop.shape + (1,) * (y.ndim - 1))
    return jnp.where(drop, jnp.asarray(null_label, y.dtype), y)


# -- the objective -------------------------------------------------------------------------------------
def diffusion_loss(
    fn: Callable[[Array, Array], Array],
    path: Path,
    x0: Array,
    key: Array,
    *,
    prediction: str = "eps",
    weighting: str | Weighting = "uniform",
    coupling: str | Coupling = "independent",
    t_min: float | None = None,
    t_max: float = 1.0,
    stratified: bool = False,
    gamma: float = 5.0,
    bias: float = 2.0,
) -> tuple[Array, dict]:
    """Monte-Carlo estimate of the weighted regression loss (see the module docstring).

    Args:
      fn: model ``fn(x_t: [B, ...], t: [B]) -> [B, ...]`` predicting kind ``prediction``.
      path: the Gaussian path.
      x0: ``[B, ...]`` data batch.
      key: PRNG key (time, noise, coupling).
      prediction: ``"eps" | "x0" | "v" | "score" | "velocity"``.
      weighting: a weighting name (module docstring) or ``w(path, t) -> [B]``.
      coupling: ``"independent"``, ``"ot"`` or ``f(key, x0, x1) -> x1``.
      t_min, t_max: time range (``t_min`` defaults to ``path.t_min``).
      stratified: low-discrepancy times.
      gamma, bias: parameters of ``"min_snr"`` and ``"sigmoid"``.
    Returns:
      ``(loss, aux)``: scalar mean loss and ``{"t": [B], "per_example": [B]}``.
    """
    param.check_kind(prediction)
    check_data_batch("x0", jnp.asarray(x0))  # (an empty batch's mean loss is NaN)
    t_min = path.t_min if t_min is None else t_min
    w_fn = get_weighting(weighting, prediction, gamma=gamma, bias=bias)
    kt, kn, kc = jax.random.split(key, 3)
    b = x0.shape[0]
    # Times, schedule and weights in float32 or wider whatever the data's dtype: in bfloat16 a
    # t near 1 rounds to 1.0 (infinite velocity scale on linear()), in float16 c^2 overflows.
    # The model sees x_t in the data's dtype and t in float32 or wider, as gf.sample gives it (in
    # bfloat16, t in [0.5, 1) would take 128 values in training: a 1000 t time embedding would be
    # trained on a coarse lattice and sampled between its points).
    wide = jnp.promote_types(x0.dtype, jnp.float32)
    t = sample_t(kt, b, t_min, t_max, stratified, dtype=wide)
    x1 = jax.random.normal(kn, x0.shape, x0.dtype)
    coupled = _coupling(coupling)(kc, x0, x1)
    if getattr(coupled, "shape", None) != x1.shape:  # ("mul got incompatible shapes (8, 1), (4, 2)")
        raise ValueError(f"coupling must return the noise x1 re-paired with x0, of x0's shape {x1.shape}; "
                         f"got {getattr(coupled, 'shape', type(coupled).__name__)}")
    x1 = coupled
    xt = path.add_noise(x0, x1, t)
    target = param.from_x0_eps(x0, x1, xt, t, path, prediction)
    pred = fn(xt.astype(x0.dtype), t)
    if pred.shape != x0.shape:
        raise ValueError(f"model output shape {pred.shape} does not match the data shape {x0.shape}")
    r = flat_batch((pred - target).astype(wide))
    if getattr(w_fn, "uniform_kind", None) == prediction:
        per_example = jnp.mean(jnp.square(r), axis=-1)  # plain MSE of the predicted kind (also where c is 0 or inf)
    elif prediction == "x0" and hasattr(w_fn, "x0_weight"):
        lam = jnp.broadcast_to(w_fn.x0_weight(path, t), (b,)).astype(wide)  # (no 0 / 0 where SNR underflows)
        per_example = lam * jnp.mean(jnp.square(r), axis=-1)
    else:
        c = param.eps_scale(path, t, prediction)
        w = w_fn(path, t)
        if not (isinstance(w, (jax.Array, np.ndarray, np.generic, numbers.Real)) or hasattr(w, "__jax_array__")):
            # (None gave an anonymous TypeError)
            raise ValueError(f"weighting {weighting!r} must return an array (a scalar or shape [B] = [{b}]); got "
                             f"{type(w).__name__}")
        if jnp.shape(w) not in ((), (b,)):  # a [B, 1] weight would broadcast the loss to [B, B]
            raise ValueError(f"weighting {weighting!r} must return a scalar or shape [B] = [{b}]; got shape "
                             f"{jnp.shape(w)}")
        # w times the eps-space error (r / c)^2, not (w / c^2) r^2: a score model on edm(sigma_min=0) at
        # sigma ~ 1e-20 has c^2 and r^2 overflowing float32, and w / c^2 * r^2 was 0 * inf = NaN (the true
        # loss O(1)); r / c is O(1) there, and the weight stays linear (no sqrt: finite gradients at w = 0)
        c = jnp.broadcast_to(c, (b,)).astype(wide)
        per_example = jnp.broadcast_to(w, (b,)).astype(wide) * jnp.mean(jnp.square(r / c[:, None]), axis=-1)
    return jnp.mean(per_example), {"t": t, "per_example": per_example}


def flow_matching_loss(fn, path: Path, x0: Array, key: Array, *, coupling: str | Coupling = "independent", **kw):
    """Conditional flow matching (Lipman et al. 2023; Liu et al. 2023): velocity MSE
    ``|| fn(x_t, t) - (alpha' x0 + sigma' x1) ||^2``; on :func:`genflow.paths.linear` the target is
    ``x1 - x0``. Same arguments as :func:`diffusion_loss`, except ``prediction`` and
    ``weighting`` (fixed: ``"velocity"``, ``"uniform"``)."""
    fixed = sorted({"prediction", "weighting"} & set(kw))
    if fixed:
        raise TypeError(f"flow_matching_loss fixes prediction='velocity' and weighting='uniform'; "
                        f"got {', '.join(fixed)} (use diffusion_loss for other kinds and weightings)")
    return diffusion_loss(fn, path, x0, key, prediction="velocity", weighting="uniform", coupling=coupling, **kw)


def dsm_loss(fn, path: Path, x0: Array, key: Array, **kw):
    """Denoising score matching (Vincent 2011; Song et al. 2021) with ``lambda(t) = sigma^2``:
    ``|| sigma fn(x_t, t) + eps ||^2`` for a score model ``fn``."""
    fixed = sorted({"prediction", "weighting"} & set(kw))
    if fixed:
        raise TypeError(f"dsm_loss fixes prediction='score' and weighting='score'; got {', '.join(fixed)} (use "
                        f"diffusion_loss for other kinds and weightings)")
    return diffusion_loss(fn, path, x0, key, prediction="score", weighting="score", **kw)
