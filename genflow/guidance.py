"""Guidance as function transformers: each takes model functions and returns a model function.

Every transformer returns a small pytree (a registered dataclass) whose numbers -- the guidance
scale, interval ends, thresholds -- are traced leaves: changing them reuses the compiled sampler.
The wrapped model functions should be pytrees as well (``jax.tree_util.Partial``,
:func:`genflow.nets.model_fn`, oracle models); plain ``functools.partial`` objects are converted.

All prediction kinds (eps, x0, v, score, velocity) are affine in ``(x0_hat, eps_hat)`` with the
same coefficients for the conditional and the unconditional model at a given ``(x, t)``, so
``uncond + w (cond - uncond)`` means the same guidance whatever kind the models predict.

* :func:`cfg` -- classifier-free guidance (Ho & Salimans 2022), ``u + w (c - u)``;
  :func:`cfg_batched` evaluates a conditional network once on the doubled batch.
* :func:`interval` -- guidance only for ``t`` in ``(t_lo, t_hi]`` (Kynkaanniemi et al. 2024,
  "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality"); outside it
  the unconditional model is not evaluated.
* :func:`cads` -- condition-annealed sampling (Sadat et al. 2024, "CADS: Unleashing the
  Diversity of Diffusion Models through Condition-Annealed Sampling").
* :func:`adaptive` -- adaptive guidance (Castillo et al. 2023, "Adaptive Guidance: Training-free
  Acceleration of Conditional Diffusion Models"): guide while the conditional and unconditional
  predictions disagree, return the conditional one once their cosine similarity exceeds a
  threshold.
* :func:`classifier` -- classifier guidance (Dhariwal & Nichol 2021):
  ``eps_hat - w sigma_t grad_x log p(y | x_t, t)``.

Time convention: ``t`` in [0, 1], data at 0, noise at 1; models are ``fn(x: [B, ...], t: [B])``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _checks, param
from genflow._checks import check_null_label, check_real_in, flat_batch, real_leaf, real_or_traced
from genflow._precision import wide
from genflow.paths import Path, broadcast_t
from genflow.sampling import as_pytree_fn

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

__all__ = ["CFG", "BatchedCFG", "Interval", "CADS", "Adaptive", "ClassifierGuidance", "cfg", "cfg_batched",
           "interval", "cads", "cads_gamma", "adaptive", "classifier"]


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


def _per_sample(w: Array, x: Array, name: str = "scale") -> Array:
    """A scalar or ``[B]`` weight shaped to broadcast against ``x: [B, ...]``."""
    w = jnp.asarray(w, x.dtype)
    if w.ndim == 0:
        return w
    if w.shape != x.shape[:1]:
        raise ValueError(f"guidance {name} must be a scalar or have shape [B] = [{x.shape[0]}]; got shape {w.shape}")
    return w.reshape(w.shape + (1,) * (x.ndim - 1))


def _batch_t(t, x: Array, who: str) -> Array:
    """The model's times ``t`` (a scalar, ``[1]`` or ``[B]``) as ``[B]`` for ``x: [B, ...]``; another shape is
    refused naming ``t`` (a ``[B, 1]`` t failed in JAX's broadcasting, or was reported as a wrongly
    shaped guidance scale)."""
    t = jnp.asarray(t)
    if t.ndim and t.shape not in (x.shape[:1], (1,)):  # ([1]: one time for all, as nets.batch_times takes it)
        raise ValueError(f"{who}: t must be a scalar or have shape [1] or [B] = [{x.shape[0]}]; got shape {t.shape}")
    return jnp.broadcast_to(t, x.shape[:1])


def _scale(scale) -> Array:
    """A guidance scale (scalar or ``[B]``, real, possibly traced) as an array (:func:`real_leaf`:
    a Python number weakly typed, an array in its floating dtype); a string, bytes or bool is
    refused (NumPy would read ``"2"`` as 2.0)."""
    if isinstance(scale, (str, bytes, bool, complex)) or (hasattr(scale, "dtype") and not (
            jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer))):
        raise TypeError(f"scale must be a real number or a [B] array of them; got {scale!r}")
    return real_leaf(scale)


def _guide(c: Array, u: Array, w) -> Array:
    """``u + w (c - u)`` in at least float32, rounded once to the models' dtype; ``w = 1`` gives
    ``c`` and ``w = 0`` gives ``u`` exactly. (In a bfloat16 model's own dtype the scale itself was
    rounded -- 1.1 to 1.1016 -- and ``w c + (1 - w) u`` cancelled: 5.1e-2 rms off the exact value
    at w = 7.5 on unit-scale predictions, where one rounding of the result is ~6e-3; float32 models
    gain ~8x at large scales from the difference form.)"""
    out = jnp.result_type(c, u)
    dt = jnp.promote_types(out, jnp.float32)
    cw, uw = c.astype(dt), u.astype(dt)
    w = _per_sample(w, cw)
    d = cw - uw
    # two difference forms, each exact at its end (c at w = 1, u at w = 0) and both with
    # d / dw = c - u (a select of c at w == 1 made jax.grad in the scale 0 there)
    return jnp.where(w >= 0.5, cw + (w - 1) * d, uw + w * d).astype(out)


def _check_fn(fn, name: str):
    return as_pytree_fn(_checks.check_model_fn(fn, name))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CFG:
    """``uncond + scale (cond - uncond)``; ``scale = 1`` is the conditional model, ``0`` the
    unconditional one. ``scale``: scalar or ``[B]`` (traced).

    A new guidance formula (e.g. rescaled CFG) is a subclass that overrides :meth:`combine`;
    :func:`interval` and :func:`adaptive` then apply it too. Register it as a pytree, as CFG is,
    and give its real fields as arrays (:func:`cfg` converts the scale; built directly, a Python
    float field is a static value of ``gf.sample``'s compiled program: each new value compiles anew)::

        @jax.tree_util.register_dataclass
        @dataclasses.dataclass(frozen=True)
        class RescaledCFG(gf.guidance.CFG):
            phi: float = 0.7

            def combine(self, c, u, w):
                g = super().combine(c, u, w)
                r = g * jnp.std(c, axis=-1, keepdims=True) / jnp.std(g, axis=-1, keepdims=True)
                return self.phi * r + (1 - self.phi) * g

    ``RescaledCFG(cond, uncond, jnp.asarray(2.0), phi=jnp.asarray(0.7))``."""

    cond: ModelFn
    uncond: ModelFn
    scale: Array

    def __post_init__(self):
        # (an unregistered subclass failed in gf.sample with equinox's "Non-hashable static arguments")
        if type(self) is not CFG and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(self)):
            raise TypeError(f"{type(self).__name__} subclasses gf.guidance.CFG but is not a registered pytree: "
                            f"decorate it with @jax.tree_util.register_dataclass and "
                            f"@dataclasses.dataclass(frozen=True), as in CFG's docstring")

    def parts(self, x: Array, t: Array) -> tuple[Array, Array]:
        """``(cond(x, t), uncond(x, t))``."""
        return self.cond(x, t), self.uncond(x, t)

    def cond_only(self, x: Array, t: Array) -> Array:
        return self.cond(x, t)

    def combine(self, c: Array, u: Array, w) -> Array:
        """The guided prediction from the conditional and unconditional ones ``c, u: [B, ...]`` at
        scale ``w`` (scalar or ``[B]``): ``u + w (c - u)``. An override must return ``c`` where
        ``w = 1`` (the conditional model: :func:`interval` and :func:`adaptive` pass ``w = 1``
        for the samples they do not guide)."""
        return _guide(c, u, w)

    def __call__(self, x: Array, t: Array) -> Array:
        c, u = self.parts(x, t)
        return self.combine(c, u, self.scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchedCFG:
    """CFG with one network call on the doubled batch: ``fn(x, t, c)`` with ``c = y`` for the
    first half and ``c = null`` for the second."""

    fn: Callable
    y: Array
    null: Array
    scale: Array

    def _labels(self, b: int) -> tuple[Array, Array]:
        if jnp.ndim(self.y) and jnp.shape(self.y)[0] not in (1, b):
            raise ValueError(f"cfg_batched: y holds {jnp.shape(self.y)[0]} conditions {jnp.shape(self.y)}, but the model "
                             f"is called on a batch of {b}: give one per sample ([B, ...]) or a scalar label")
        y = jnp.broadcast_to(self.y, (b,) + jnp.shape(self.y)[1:]) if jnp.ndim(self.y) else jnp.full((b,), self.y)
        try:
            null = jnp.broadcast_to(self.null, y.shape)
        except (TypeError, ValueError):  # (JAX's broadcasting error named neither null nor y)
            raise ValueError(f"cfg_batched: null of shape {jnp.shape(self.null)} must broadcast to the labels' shape "
                             f"{y.shape}") from None
        return y, null.astype(y.dtype)

    def parts(self, x: Array, t: Array) -> tuple[Array, Array]:
        b = x.shape[0]
        y, n = self._labels(b)
        t = _batch_t(t, x, "cfg_batched")  # (a scalar t, which CFG takes, failed to concatenate)
        out = self.fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, n]))
        return out[:b], out[b:]

    def cond_only(self, x: Array, t: Array) -> Array:
        b = x.shape[0]  # (t broadcast as in parts: interval's branch got a scalar t the network could not index)
        return self.fn(x, _batch_t(t, x, "cfg_batched"), self._labels(b)[0])

    combine = CFG.combine
    __call__ = CFG.__call__


def _check_guided(guided, name: str):
    """``guided`` must offer ``parts``, ``cond_only``, ``combine`` and ``scale`` (a :class:`CFG` /
    :class:`BatchedCFG` or a subclass); a subclass that changes ``__call__`` but not ``combine``
    is refused (``name`` would silently apply the plain formula instead of its own)."""
    if not all(hasattr(guided, a) for a in ("parts", "cond_only", "combine", "scale")):
        raise TypeError(f"{name} expects a CFG from gf.guidance.cfg / cfg_batched (or an object with parts, "
                        f"cond_only, combine and scale); got {type(guided).__name__}")
    cls = type(guided)
    for base in (CFG, BatchedCFG):
        if isinstance(guided, base) and cls.__call__ is not base.__call__ and cls.combine is base.combine:
            raise TypeError(f"{name}: {cls.__name__} overrides __call__ but not combine(c, u, w), which {name} "
                            f"applies; put the guidance formula in combine")


def cfg(cond_fn: ModelFn, uncond_fn: ModelFn, scale) -> CFG:
    """Classifier-free guidance ``uncond + scale (cond - uncond)`` (Ho & Salimans 2022), in the
    prediction kind of the two models (which must share it). Two network calls per evaluation."""
    return CFG(_check_fn(cond_fn, "cond_fn"), _check_fn(uncond_fn, "uncond_fn"), _scale(scale))


def cfg_batched(fn: Callable[[Array, Array, Array], Array], y, null, scale) -> BatchedCFG:
    """Classifier-free guidance with one call of a conditional network ``fn(x, t, c)`` on the
    doubled batch ``[x; x]`` with conditions ``[y; null]`` (the usual implementation for a network
    trained with condition dropout). ``y``: ``[B, ...]`` or a scalar label; ``null``: the "no
    condition" value, broadcast to ``y``'s shape."""
    y = jnp.asarray(y)
    check_null_label("cfg_batched: null", null, y)  # (256 with uint8 labels ran the unconditional half on class 0)
    return BatchedCFG(_check_fn(fn, "fn"), y, jnp.asarray(null), _scale(scale))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Interval:
    """``guided`` for ``t`` in ``(t_lo, t_hi]``, its conditional model elsewhere."""

    guided: CFG | BatchedCFG
    t_lo: Array
    t_hi: Array

    def __call__(self, x: Array, t: Array) -> Array:
        # the bounds in t's own width: float32-rounded ones against float64 times (jax_enable_x64)
        # dropped the closed end, float32(0.7) < 0.7
        if jnp.ndim(t):  # (a [B, 1] t was reported as a guidance scale of the wrong shape)
            _batch_t(t, x, "interval")
        t = jnp.asarray(t)
        inside = (t > jnp.asarray(self.t_lo).astype(t.dtype)) & (t <= jnp.asarray(self.t_hi).astype(t.dtype))
        # the unconditional model only runs when some sample of the batch is inside the interval
        c, u = jax.lax.cond(jnp.any(inside), lambda: self.guided.parts(x, t),
                            lambda: (lambda c: (c, c))(self.guided.cond_only(x, t)))
        _per_sample(self.guided.scale, x)  # (names a scale of the wrong shape)
        w = jnp.where(inside, self.guided.scale, 1.0)  # scalar or [B]
        return self.guided.combine(c, u, w)


def interval(guided: CFG, t_lo, t_hi) -> Interval:
    """Apply ``guided`` only for ``t_lo < t <= t_hi`` and its conditional model elsewhere
    (Kynkaanniemi et al. 2024 guide only at intermediate noise levels; e.g. EDM2's interval
    ``sigma in (0.28, 5.42]`` becomes ``t`` through ``path.t_from_log_snr(-2 log sigma)``). Outside
    the interval the unconditional model is skipped (``lax.cond``), which saves its evaluations.
    The interval is open at ``t_lo``: ``interval(g, 0.0, 1.0)`` is not ``g`` wherever the model
    is evaluated at ``t = 0``, and that evaluation is the conditional model's: with solvers that
    evaluate at ``t_end = 0`` (``heun``, ``tsit5``: Diffrax stages at a step's end, on the
    ``linear`` path, whose ``t_min`` is 0), and with every solver on paths whose sampling ends
    with the Tweedie denoising step at ``t = 0`` (``path.denoise_at_end`` where ``sigma(0) > 0``:
    ``ve``, ``edm``; a max difference of 1e-3 on ``ve`` at 60 steps). To guide down to and
    including ``t = 0``, use ``g`` itself."""
    _check_guided(guided, "interval")
    lo, hi = real_or_traced("t_lo", t_lo, "a float in [0, 1)"), real_or_traced("t_hi", t_hi, "a float in (0, 1]")
    if lo is not None and hi is not None and not 0.0 <= lo < hi <= 1.0:  # else it never (or always) guides
        raise ValueError(f"interval: expected 0 <= t_lo < t_hi <= 1; got t_lo={t_lo}, t_hi={t_hi}")
    # concrete bounds kept in float64 (NumPy: a jitted call converts them to its default float width,
    # and __call__ rounds them to t's), traced ones as they are
    bound = lambda v, c: jnp.asarray(v) if c is None else np.asarray(c, np.float64)  # noqa: E731
    return Interval(guided, bound(t_lo, lo), bound(t_hi, hi))


def cads_gamma(t: Array, tau1, tau2) -> Array:
    """CADS annealing ``gamma(t)``: 1 for ``t <= tau1`` (near the data), 0 for ``t >= tau2``, linear
    in between (Sadat et al. 2024, eq. 5, in this repo's time direction)."""
    return jnp.clip((tau2 - t) / (tau2 - tau1), 0.0, 1.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CADS:
    """``fn(x, t, y_hat(t))`` with the annealed noisy condition of :func:`cads`."""

    fn: Callable
    y: Array
    key: Array
    tau1: Array
    tau2: Array
    noise_scale: Array
    psi: Array
    rescale: bool = _static(True)

    def condition(self, t: Array) -> Array:
        """The condition at times ``t: [B]``: ``sqrt(gamma) y + s sqrt(1 - gamma) n``, with fresh
        noise ``n`` for every distinct time (drawn from ``key`` folded with the bits of ``t``),
        rescaled to the per-sample mean and std of ``y`` and mixed by ``psi`` (eqs. 5-6)."""
        y = self.y if self.y.ndim > 1 else self.y[None]
        if y.shape[0] not in (1, t.shape[0]):
            raise ValueError(f"cads: y holds {y.shape[0]} conditions ({self.y.shape}), but the model is called on a "
                             f"batch of {t.shape[0]}: give one per sample ([B, ...]) or one for all ([F])")
        y = jnp.broadcast_to(y, t.shape + y.shape[1:])
        bits = jax.lax.bitcast_convert_type(t.astype(jnp.float32), jnp.uint32)
        n = jax.vmap(lambda b, i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(self.key, b), i),
                                                    y.shape[1:], y.dtype))(bits, jnp.arange(t.shape[0]))
        g = broadcast_t(cads_gamma(t, self.tau1, self.tau2), y).astype(y.dtype)
        yh = jnp.sqrt(g) * y + self.noise_scale * jnp.sqrt(1.0 - g) * n
        if not self.rescale:
            return yh
        # (statistics in at least float32: in float16 the floor 1e-12 is 0, and a constant condition
        # row -- an all-zero null embedding -- became 0/0 = NaN)
        axes = tuple(range(1, y.ndim))
        y32, yh32 = wide(y), wide(yh)
        mu0, sd0 = y32.mean(axes, keepdims=True), y32.std(axes, keepdims=True)
        mu1, sd1 = yh32.mean(axes, keepdims=True), yh32.std(axes, keepdims=True)
        resc = (yh32 - mu1) / jnp.maximum(sd1, 1e-12) * sd0 + mu0
        return (self.psi * resc + (1.0 - self.psi) * yh32).astype(y.dtype)

    def __call__(self, x: Array, t: Array) -> Array:
        return self.fn(x, t, self.condition(_batch_t(t, x, "cads")))


def cads(fn: Callable[[Array, Array, Array], Array], y, key: Array, tau1: float = 0.6, tau2: float = 0.9,
         noise_scale: float = 0.25, psi: float = 1.0, rescale: bool = True) -> CADS:
    """Condition-annealed sampling (Sadat et al. 2024): the conditional model
    ``fn(x, t, y_hat(t))`` with ``y_hat = sqrt(gamma(t)) y + s sqrt(1 - gamma(t)) n`` -- the
    condition is replaced by noise at high noise levels (``t >= tau2``) and restored towards the
    data (``t <= tau1``), which trades a little alignment for diversity. Use it as the conditional
    branch of :func:`cfg`.

    Args:
      fn: conditional network ``fn(x: [B, ...], t: [B], y: [B, ...]) -> prediction``.
      y: ``[B, F]``, ``[B, L, F]`` (e.g. token embeddings) or ``[F]`` (one for all) condition
        embedding (continuous); the rescaling uses each sample's mean and std over all its entries.
      key: PRNG key of the condition noise. The noise is a fixed function of (``key``, ``t``, row of
        the batch), not of the sampler's key: give every batch its own key (e.g.
        ``jax.random.fold_in(key, batch_index)``), or row ``i`` of every batch sees the same
        condition noise.
      tau1, tau2: annealing interval in t (the paper's defaults 0.6 and 0.9; its t = 1 is noise too).
      noise_scale: ``s``. psi: mixing of the rescaled condition (``psi = 1``: fully rescaled).
      rescale: restore the per-sample mean and std of ``y`` (eq. 6).
    """
    # (traced values pass, as in interval)
    lo, hi = real_or_traced("tau1", tau1, "a float in [0, 1)"), real_or_traced("tau2", tau2, "a float in (0, 1]")
    if lo is not None and hi is not None and not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"cads: expected 0 <= tau1 < tau2 <= 1; got tau1={tau1}, tau2={tau2}")
    y = jnp.asarray(y)
    if y.ndim == 0 or not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(f"cads: y must be a floating condition embedding [B, F] or [F]; got {y.dtype}{y.shape}")
    if rescale and (y.size if y.ndim == 1 else y[0].size) == 1:
        raise ValueError(f"cads: rescale=True restores each sample's mean and std over its entries, and y {y.shape} "
                         f"has one entry per sample: the std is 0 and y_hat would be y exactly; pass rescale=False")
    # (traced values pass; psi = 2 extrapolated past the rescaled y, NaN gave NaN samples)
    check_real_in("cads: noise_scale", noise_scale, 0.0, float("inf"))
    check_real_in("cads: psi", psi, 0.0, 1.0)
    try:  # (a bad key failed inside the sampler, as JAX's "invalid PRNG key data", naming neither cads nor key)
        _checks.check_key(key)
    except TypeError as e:
        raise TypeError(f"cads: {e}") from None
    return CADS(_check_fn(fn, "fn"), y, key, real_leaf(tau1), real_leaf(tau2), real_leaf(noise_scale), real_leaf(psi),
                bool(rescale))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adaptive:
    """``guided`` while ``cos(cond, uncond) <= threshold`` per sample, ``cond`` once above."""

    guided: CFG | BatchedCFG
    threshold: Array

    def similarity(self, c: Array, u: Array) -> Array:
        """Per-sample cosine similarity ``[B]`` of two predictions, computed in at least float32 (in
        bfloat16 a similarity of 0.9985 rounds to 1, and in float16 a squared norm of more than
        65504 -- 65536 unit-variance entries -- overflows to inf: NaN)."""
        dt = jnp.promote_types(jnp.result_type(c, u), jnp.float32)
        c2, u2 = flat_batch(c).astype(dt), flat_batch(u).astype(dt)
        num = jnp.sum(c2 * u2, -1)
        return num / jnp.maximum(jnp.linalg.norm(c2, axis=-1) * jnp.linalg.norm(u2, axis=-1), 1e-12)

    def __call__(self, x: Array, t: Array) -> Array:
        c, u = self.guided.parts(x, t)
        agree = self.similarity(c, u) > self.threshold
        _per_sample(self.guided.scale, x)  # (names a scale of the wrong shape)
        w = jnp.where(agree, 1.0, self.guided.scale)  # [B]
        return self.guided.combine(c, u, w)


def adaptive(guided: CFG, threshold: float = 0.99) -> Adaptive:
    """Adaptive guidance (Castillo et al. 2023): stop guiding once the conditional and
    unconditional predictions agree -- their per-sample cosine similarity exceeds ``threshold``
    (the paper's ``gamma_bar``, measured there on eps predictions) -- and return the conditional
    prediction. The test is made at every evaluation, per sample, on the predictions of the kind
    the models return, and is not the paper's one-way truncation: the similarity need not grow
    as ``t -> 0`` (eps predictions agree exactly where ``alpha = 0``, since
    ``eps_c - eps_u = (alpha / sigma) (x0_u - x0_c)``, so near ``t = 1`` -- the first sampling
    steps -- an eps model is not guided; v predictions of two Gaussians never reach 0.99). As a
    pure function it still evaluates both models; to guide only down to a known switch time
    (and save the unconditional evaluations after it), use :func:`interval`."""
    _check_guided(guided, "adaptive")
    th = real_or_traced("threshold", threshold, "a cosine similarity in [-1, 1)")
    if th is not None and not -1.0 <= th < 1.0:  # a cosine similarity: from 1 on it never stops guiding
        raise ValueError(f"adaptive: threshold is a cosine similarity, expected in [-1, 1); got {threshold}")
    return Adaptive(guided, real_leaf(threshold))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassifierGuidance:
    """``fn`` with ``eps_hat - scale sigma_t grad_x log p(y | x_t, t)``, in the kind of ``fn``."""

    fn: ModelFn
    path: Path
    log_prob: Callable[[Array, Array], Array]
    scale: Array
    prediction: str = _static("eps")

    def _grad(self, x: Array, t: Array) -> Array:
        return jax.grad(lambda z: jnp.sum(self.log_prob(z, t)))(x)

    def __call__(self, x: Array, t: Array) -> Array:
        out = self.fn(x, t)
        grad = self._grad(x, t)
        tb = broadcast_t(t, x)
        a, s = self.path.alpha(tb), self.path.sigma(tb)
        # the score gains scale * grad; every kind is affine in the score at fixed x_t, so the
        # prediction gains (d pred / d score) * scale * grad (eps: -sigma; x0: sigma^2 / alpha, ...),
        # added directly: converting through eps divided by sigma (0/0 at t = 0 for x0 and score)
        k = self.prediction
        # the coefficient is evaluated at a harmless t where it is not used (alpha = 0, or sigma = 0
        # but for the score): its inf there (1 / alpha, vp_linear's sigma' at 0) times the zero
        # cotangent of the unselected branch made every gradient through the guidance NaN
        # Where sigma = 0 (the data end) the term is 0 for eps, x0 and v. For a velocity it is
        # -g^2 / 2 (the probability-flow ODE's score coefficient), which is not 0 there on a path
        # whose sigma' is infinite at 0 (vp_linear: g^2(0) = beta_min; it was dropped, a jump at
        # t = 0 that heun's final evaluation used): read from the path's closed-form g^2 when it
        # has one; without one, 2 sigma sigma' is taken as 0 there (true where sigma' is finite).
        if k == "velocity":
            zero_term = (s == 0) & (self.path.diffusion_sq_fn is None)
        else:
            zero_term = (s == 0) & (k != "score")
        unused = (a == 0) | zero_term
        tc = jnp.where(unused, jnp.asarray(0.5, tb.dtype), tb)
        if k == "score":
            coef = jnp.ones_like(s)
        elif k == "velocity":  # -sigma (sigma' - alpha' sigma / alpha) = -g^2 / 2
            coef = -0.5 * self.path.diffusion_sq(tc)
        else:
            coef = -self.path.sigma(tc) * param.eps_scale(self.path, tc, k)  # eps: -sigma, x0: s^2/a, v: -s(a^2+s^2)/a
        w = _per_sample(self.scale, x)
        guided = out + (w * coef * grad).astype(out.dtype)
        res = jnp.where(zero_term, out, guided)
        # where alpha = 0 (pure noise: t = 1 on the linear path) x_t says nothing about y: grad = 0,
        # and the score / eps terms are 0; the x0 / v / velocity ones are coef * grad = inf * 0, whose
        # limit is finite and not 0 (x0: (sigma^2 / alpha) grad -> E[x0 | y] - E[x0]). With
        # grad / alpha -> (d grad / dt) / alpha' (l'Hopital) the singular part K sigma^2 grad / alpha
        # of coef * grad (K = 1 for x0, -sigma for v, alpha' for velocity) is evaluated there
        at_noise = a == 0
        if k in ("eps", "score"):
            return jnp.where(at_noise, out, res)

        def limit():
            t_ = jnp.asarray(t, tb.dtype)
            one = jnp.ones_like(t_)

            def dgrad_dt(tt):
                return jax.jvp(lambda u: self._grad(x, u), (tt,), (one,))[1]

            da = self.path.d_alpha(tb)
            if k == "velocity":  # K = alpha' cancels the 1 / alpha' of l'Hopital's rule
                term = s * s * dgrad_dt(t_)
            else:
                # grad / alpha -> grad' / alpha', or grad'' / alpha'' where alpha'(1) = 0 (e.g. a
                # power of cos(pi t / 2): grad' / alpha' was 0 / 0 and the sample went unguided)
                flat = jnp.any(at_noise & (da == 0))
                ratio = jax.lax.cond(
                    flat, lambda: jax.jvp(dgrad_dt, (t_,), (one,))[1] / jax.jvp(
                        self.path.d_alpha, (tb,), (jnp.ones_like(tb),))[1],
                    lambda: dgrad_dt(t_) / da)
                term = {"x0": s * s, "v": -s * s * s}[k] * ratio
            lim = out + (w * term).astype(out.dtype)
            return jnp.where(at_noise, jnp.where(jnp.isfinite(lim), lim, out), res)

        # (the forward-over-reverse derivative only runs when some sample is at alpha = 0)
        return jax.lax.cond(jnp.any(at_noise), limit, lambda: res)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LabelLogProb:
    """``log softmax(classifier(x, t))[y]``: ``[B]``."""

    classifier: Callable
    y: Array

    def __call__(self, x: Array, t: Array) -> Array:
        logits = self.classifier(x, t)
        classes = logits.shape[-1]
        # out of range, take_along_axis gave NaN (the unguided model) and -1 the last class
        ok = _checks.error_if(jnp.zeros((), jnp.int32), (self.y < 0) | (self.y >= classes),
                              f"classifier guidance: labels y must lie in [0, {classes}) (the classifier's classes)")
        y = jnp.where(ok == 0, self.y, jnp.zeros_like(self.y))  # (tied to the check, so that it runs)
        if y.shape not in ((), (x.shape[0],)):  # (a broadcast error that did not name y)
            raise ValueError(f"classifier guidance: y must be a scalar label or have shape [B] = [{x.shape[0]}]; "
                             f"got shape {y.shape}")
        y = jnp.broadcast_to(y, (x.shape[0],))
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], -1)[:, 0]


def classifier(fn: ModelFn, path: Path, prediction: str, classifier_fn: Callable[[Array, Array], Array], y,
               scale) -> ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 in score form):
    ``score_w = score + scale grad_x log p(y | x_t, t)``, i.e.
    ``eps_w = eps_hat - scale sigma_t grad_x log p(y | x_t, t)``, returned in the kind of ``fn``.

    Args:
      fn: model ``fn(x, t)`` of kind ``prediction`` (usually unconditional).
      path: the path of the model and classifier.
      classifier_fn: noisy classifier ``(x: [B, ...], t: [B]) -> logits [B, C]``.
      y: ``[B]`` integer labels (or a scalar label).
      scale: guidance scale (traced); ``1`` gives the exact conditional score when the classifier
        is the exact ``p(y | x_t)``.

    Where ``alpha = 0`` (pure noise, ``t = 1`` on the linear path) the x0 / v / velocity guidance
    term ``(sigma^2 / alpha) grad`` is ``inf * 0``; it is evaluated as its limit ``t -> 1``
    (l'Hopital: ``d grad / dt`` over ``alpha'``, one forward-over-reverse derivative of the
    classifier, run only when some sample is there), so the first step of a sampler from pure noise
    is guided. This assumes a classifier whose gradient vanishes at ``alpha = 0`` (the exact one
    does: ``x_1`` says nothing about ``y``); what a trained one returns there beyond that is ignored.
    """
    param.check_kind(prediction)
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"classifier: y must be integer class labels; got dtype {y.dtype}")
    if y.ndim > 1:
        raise ValueError(f"classifier: y must be a scalar label or [B] labels; got shape {y.shape}")
    lp = _LabelLogProb(_check_fn(classifier_fn, "classifier_fn"), y)
    return ClassifierGuidance(_check_fn(fn, "fn"), path, lp, _scale(scale), prediction)
