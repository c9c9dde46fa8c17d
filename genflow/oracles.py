"""Analytic oracles: data distributions whose noisy marginals are known in closed form.

* :class:`Gaussian` ``N(mean, cov)``: under any Gaussian path the marginal at t is
  ``N(alpha mean, alpha^2 cov + sigma^2 I)``; its denoiser, score, log-density and the
  probability-flow ODE map are closed form. In the eigenbasis ``cov = U diag(v) U^T`` the
  flow map keeps ``z = U^T (x_t - alpha mean) / sqrt(alpha^2 v + sigma^2)`` fixed.
* :class:`GaussianMixture` with diagonal components: the denoiser ``E[x0 | x_t]`` is closed
  form (responsibilities by log-sum-exp), so a sampler can be run with a perfect model.

Both are pytrees (their arrays are traced) and give model functions of any prediction kind
through :meth:`model`, so solvers, likelihoods and conversions are tested without training.
Arrays are ``[B, D]`` (or ``[B, ...]`` flattened to ``D`` features).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo, param
from genflow._checks import check_int, check_key, flat_batch
from genflow._precision import matmul
from genflow.paths import Path, broadcast_t, check_path, check_t

Array = jax.Array

__all__ = ["Gaussian", "GaussianMixture", "OracleModel", "reference_flow_map"]


def _check_x(x, dim: int) -> None:
    """A ``ValueError`` naming ``x`` unless it is ``[B, ...]`` with ``dim`` features (a [B, 1] or an
    unbatched [D] x broadcast against the oracle's [D] arrays: log-densities of other points)."""
    shape = jnp.shape(x)
    if len(shape) < 2 or int(np.prod(shape[1:])) != dim:
        raise ValueError(f"x must be [B, ...] with {dim} features (the oracle's dimension) per sample; "
                         f"got shape {tuple(shape)}")


def _t_col(t, x: Array) -> Array:
    """``t`` (scalar or ``[B]`` in [0, 1], checked against ``x: [B, D]``) as a ``[B, 1]`` column."""
    check_t(t)  # (t = 1.5 extrapolated the path for score / velocity / log_prob; a no-op when traced)
    # in at least float32 (bfloat16 x rounded t itself: 0.995 became 0.996, a 2e-3 error in x0)
    t = jnp.asarray(t, jnp.promote_types(x.dtype, jnp.float32))
    broadcast_t(t, x)  # (names a t of the wrong length)
    return jnp.broadcast_to(t, (x.shape[0],))[:, None]


def _compiled(method):
    """An oracle's ``method(self, x, ...)`` run as one compiled program.

    Called op by op, an oracle's closed form compiled a program per primitive on first use per
    shape (~25 ms each with its lowering; measured 18 for a mixture's velocity model, 41 for its x0
    of a new batch size): most of a first call's time. Under a caller's transformation
    ``jax.jit(..., inline=True)`` traces it into the caller's program as before. Its arguments
    ``path`` (type) and ``s`` / ``t`` (range, on their concrete values) are checked here, before
    the jit."""
    jitted = jax.jit(method, inline=True)
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(*args, **kwargs):
        named = signature.bind(*args, **kwargs).arguments
        if "path" in named:
            check_path(named["path"])  # (jax.jit would refuse a path name without naming path)
        for name in ("s", "t"):
            if name in named:
                check_t(named[name], name)
        return jitted(*args, **kwargs)

    return call


def _float_array(a) -> Array:
    """``a`` as a JAX array, integer or boolean values promoted to the default float dtype."""
    a = jnp.asarray(a)
    return a if jnp.issubdtype(a.dtype, jnp.inexact) else a.astype(jnp.result_type(float))


def _check_nonnegative(name: str, value) -> None:
    """A ``ValueError`` naming ``name`` if a concrete ``value`` has a negative or NaN entry."""
    if not isinstance(value, jax.core.Tracer):
        v = np.asarray(value)
        if not np.all(v >= 0):
            raise ValueError(f"{name} must be >= 0 (variances); got min {float(np.nanmin(v)) if v.size else v!r}"
                             + (" and NaN" if np.isnan(v).any() else ""))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Gaussian data ``N(mean, U diag(var) U^T)``; ``mean, var: [D]``, ``basis U: [D, D]``."""

    mean: Array
    var: Array
    basis: Array

    @classmethod
    def diagonal(cls, mean, var) -> "Gaussian":
        mean = _float_array(mean)
        if mean.ndim != 1:
            raise ValueError(f"mean must be a [D] vector; got shape {mean.shape}")
        if jnp.ndim(var) not in (0, 1) or jnp.size(var) not in (1, mean.shape[0]):
            raise ValueError(f"var must be a scalar or [D] = [{mean.shape[0]}] (mean's size); got shape {jnp.shape(var)}")
        var = jnp.broadcast_to(jnp.asarray(var, mean.dtype), mean.shape)
        _check_nonnegative("var", var)
        return cls(mean, var, jnp.eye(mean.shape[0], dtype=mean.dtype))

    @classmethod
    def full(cls, mean, cov) -> "Gaussian":
        mean = _float_array(mean)
        cov = jnp.asarray(cov, jnp.promote_types(mean.dtype, jnp.asarray(cov).dtype))
        mean = mean.astype(cov.dtype)
        if mean.ndim != 1 or cov.shape != mean.shape * 2:
            raise ValueError(f"full needs mean: [D] and cov: [D, D]; got shapes {mean.shape} and {cov.shape}")
        if not isinstance(cov, jax.core.Tracer):
            c = np.asarray(cov, np.float64)
            if not np.all(np.isfinite(c)):
                raise ValueError("cov must be finite; got NaN or inf entries")
            asym = float(np.max(np.abs(c - c.T), initial=0.0))
            if asym > 1e-6 * max(float(np.max(np.abs(c), initial=0.0)), 1e-30):
                # (the symmetric part was used silently: a Cholesky factor passed by mistake went unnoticed)
                raise ValueError(f"cov must be symmetric; got max |cov - cov.T| = {asym:.3g}")
        var, basis = jnp.linalg.eigh(0.5 * (cov + cov.T))
        if not isinstance(var, jax.core.Tracer):
            v = np.asarray(var)
            ulp = np.finfo(v.dtype).eps * max(abs(v).max(initial=0.0), 1e-30)  # (eps of the largest eigenvalue)
            if v.size and v.min() < -1e3 * ulp:
                raise ValueError(f"cov must be positive semi-definite; got an eigenvalue {v.min():.3g}")
            # eigh resolves an eigenvalue only to about D * eps * max|eigenvalue|: below that, the
            # zero eigenvalues of a singular cov come out as rounding of either sign (-4.8e-7 and
            # +7.2e-8 for a rank-1 float32 cov of norm 9.4), and a positive one put sqrt(7.2e-8)-sized
            # noise off the covariance's range in sample(); they are zero
            var = jnp.where(var > v.size * ulp, var, 0.0)
        return cls(mean, var, basis)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def cov(self) -> Array:
        return matmul(self.basis * self.var[None], self.basis.T)

    def sample(self, key: Array, n: int) -> Array:
        """``[n, D]`` samples of the data distribution."""
        check_key(key)
        z = jax.random.normal(key, (check_int("n", n, low=0), self.dim), self.mean.dtype)
        return self.mean[None] + matmul(z * jnp.sqrt(self.var)[None], self.basis.T)

    def _coords(self, x, t, path):
        """Eigen-coordinates of ``x - alpha mean`` and the marginal variances ``[B, D]``."""
        check_path(path)
        _check_x(x, self.dim)
        tc = _t_col(t, x)
        a, s = path.alpha(tc), path.sigma(tc)
        # ([B, 1] times [None]-expanded [D] arrays: explicit broadcasts, which also run under
        # jax_numpy_rank_promotion='raise', where the implicit [B, 1] * [D] was refused)
        r = matmul(flat_batch(x) - a * self.mean[None], self.basis)  # (full precision: see genflow._precision)
        return r, a * a * self.var[None] + s * s, a, s

    @_compiled
    def x0(self, x: Array, t, path: Path) -> Array:
        """Denoiser ``E[x0 | x_t] = mean + alpha C (alpha^2 C + sigma^2)^-1 (x - alpha mean)``."""
        r, m, a, _ = self._coords(x, t, path)
        # m = 0 only where var = 0 and sigma = 0 (a singular covariance at t = 0): the data sit at
        # the mean along that direction (the gain's limit is 0), where a * var / m is 0/0 = NaN
        pos = m > 0
        gain = jnp.where(pos, a * self.var[None] / jnp.where(pos, m, 1.0), 0.0)
        out = self.mean[None] + matmul(gain * r, self.basis.T)
        return out.reshape(x.shape)

    @_compiled
    def score(self, x: Array, t, path: Path) -> Array:
        """``grad log p_t(x) = -(alpha^2 C + sigma^2)^-1 (x - alpha mean)``."""
        r, m, _, _ = self._coords(x, t, path)
        return matmul(-(r / m), self.basis.T).reshape(x.shape)

    @_compiled
    def log_prob(self, x: Array, t, path: Path) -> Array:
        """``log p_t(x)`` for ``x: [B, ...]``; returns ``[B]``."""
        r, m, _, _ = self._coords(x, t, path)
        return -0.5 * jnp.sum(r * r / m + jnp.log(2 * jnp.pi * m), axis=-1)

    @_compiled
    def flow_map(self, x: Array, s, t, path: Path) -> Array:
        """Exact probability-flow ODE map from time ``s`` to time ``t``; ``x: [B, ...]``."""
        r, m_s, _, _ = self._coords(x, s, path)
        tc = _t_col(t, x)
        a_t, sg_t = path.alpha(tc), path.sigma(tc)
        m_t = a_t * a_t * self.var[None] + sg_t * sg_t
        out = a_t * self.mean[None] + matmul(r * jnp.sqrt(m_t / m_s), self.basis.T)
        return out.reshape(x.shape)

    def prior_sample(self, key: Array, n: int, path: Path, t=1.0) -> Array:
        """``[n, D]`` exact samples of the marginal at time ``t``."""
        check_key(key)
        check_path(path)
        check_t(t)
        z = jax.random.normal(key, (check_int("n", n, low=0), self.dim), self.mean.dtype)
        a, s = path.alpha(jnp.asarray(t, z.dtype)), path.sigma(jnp.asarray(t, z.dtype))
        return a * self.mean[None] + matmul(z * jnp.sqrt(a * a * self.var + s * s)[None], self.basis.T)

    def model(self, path: Path, kind: str = "x0") -> "OracleModel":
        """The exact model ``fn(x, t)`` of prediction kind ``kind`` (a pytree callable)."""
        check_path(path)
        return OracleModel(self, path, param.check_kind(kind))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Mixture of diagonal Gaussians: ``logits: [K]``, ``means, vars: [K, D]``."""

    logits: Array
    means: Array
    vars: Array

    def __post_init__(self):
        # (also runs whenever JAX unflattens the pytree -- with tracers, batched (vmap / stacked)
        # arrays, shapes, None or other leaves: only lists are converted, and only an unbatched
        # mixture of concrete arrays, logits [K], is checked)
        names = ("logits", "means", "vars")
        for name in names:
            if isinstance(getattr(self, name), list):
                # (a list of variances skipped the check below and failed as "list indices must be integers")
                object.__setattr__(self, name, _float_array(getattr(self, name)))
        lg, mu, var = (getattr(self, n) for n in names)
        concrete = all(isinstance(v, (np.ndarray, jax.Array)) and not isinstance(v, jax.core.Tracer)
                       for v in (lg, mu, var))
        if concrete and lg.ndim == 1:
            k = lg.shape[0]
            if mu.ndim != 2 or mu.shape[0] != k or var.ndim != 2 or var.shape[0] != k \
                    or var.shape[1] not in (1, mu.shape[1]):
                # (logits [1] with means [2, D] normalised over one component and sampled only it;
                # vars [K] was read per dimension)
                raise ValueError(f"GaussianMixture needs logits: [K], means: [K, D] and vars: [K, D] (or [K, 1]); "
                                 f"got shapes {lg.shape}, {mu.shape} and {var.shape}")
        if isinstance(var, (np.ndarray, jax.Array)):
            _check_nonnegative("vars", var)

    @classmethod
    def random(cls, key: Array, k: int = 10, dim: int = 64, scale: float = 3.0,
               var_range: tuple[float, float] = (0.05, 0.5), dtype=jnp.float32) -> "GaussianMixture":
        """The benchmark mixture: equal weights, ``N(0, scale^2)`` means, variances in a range."""
        k1, k2 = jax.random.split(key)
        means = scale * jax.random.normal(k1, (k, dim), dtype)
        vars_ = jax.random.uniform(k2, (k, dim), dtype, *var_range)
        return cls(jnp.zeros((k,), dtype), means, vars_)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Array:
        w = jax.nn.softmax(self.logits)
        return matmul(w, self.means)

    def sample(self, key: Array, n: int) -> Array:
        """``[n, D]`` samples of the data distribution."""
        check_key(key)
        n = check_int("n", n, low=0)
        k1, k2 = jax.random.split(key)
        comp = jax.random.categorical(k1, self.logits, shape=(n,))
        z = jax.random.normal(k2, (n, self.dim), self.means.dtype)
        return self.means[comp] + jnp.sqrt(self.vars[comp]) * z

    def _resp(self, x, t, path, safe: bool = False):
        check_path(path)
        _check_x(x, self.dim)
        tc = _t_col(t, x)
        a, s = path.alpha(tc)[:, :, None], path.sigma(tc)[:, :, None]  # [B, 1, 1]
        m = a * a * self.vars[None] + s * s  # [B, K, D]
        if safe:  # m = 0 (var = 0 at sigma = 0) replaced by 1: finite, for callers that override sigma = 0
            m = jnp.where(m > 0, m, 1.0)
        r = flat_batch(x)[:, None, :] - a * self.means[None]  # [B, K, D]
        # ([None]: explicit broadcasts of the [K] and [D] arrays, as in Gaussian, for
        # jax_numpy_rank_promotion='raise')
        logp = -0.5 * jnp.sum(r * r / m + jnp.log(2 * jnp.pi * m), axis=-1) + jax.nn.log_softmax(self.logits)[None]
        return logp, r, m, a, s

    @_compiled
    def log_prob(self, x: Array, t, path: Path) -> Array:
        """``log p_t(x)``; returns ``[B]``."""
        logp, *_ = self._resp(x, t, path)
        return jax.nn.logsumexp(logp, axis=-1)

    @_compiled
    def x0(self, x: Array, t, path: Path) -> Array:
        """``E[x0 | x_t] = sum_k w_k(x_t) (mu_k + alpha v_k (x_t - alpha mu_k) / (alpha^2 v_k + sigma^2))``.

        Where ``sigma^2 = 0`` (also where it underflows) it is ``x_t / alpha``, the data themselves: the
        formula's value there for ``x_t`` in the support, where with a zero variance it is 0/0. Its
        Jacobian there is the identity by this convention (for ``t > 0`` it is 0 along a
        zero-variance direction)."""
        logp, r, m, a, s = self._resp(x, t, path, safe=True)
        w = jax.nn.softmax(logp, axis=-1)[..., None]
        post = self.means[None] + a * self.vars[None] * r / m
        out = jnp.sum(w * post, axis=1)
        a, s = a[:, :, 0], s[:, :, 0]  # [B, 1]
        at_data = s * s == 0  # (where _resp replaced a zero a^2 v + sigma^2)
        exact = flat_batch(x) / jnp.where(at_data, a, 1.0)
        return jnp.where(at_data, exact, out).reshape(x.shape)

    @_compiled
    def score(self, x: Array, t, path: Path) -> Array:
        logp, r, m, *_ = self._resp(x, t, path)
        w = jax.nn.softmax(logp, axis=-1)[..., None]
        return jnp.sum(-w * r / m, axis=1).reshape(x.shape)

    def flow_map(self, x: Array, s, t, path: Path, rtol: float | None = None, atol: float | None = None,
                 max_steps: int = 4096) -> Array:
        """Probability-flow ODE map from time ``s`` to ``t`` by a high-accuracy adaptive solve
        (:func:`reference_flow_map`; run it under ``jax.enable_x64(True)`` with float64 ``x``)."""
        return reference_flow_map(self, x, s, t, path, rtol=rtol, atol=atol, max_steps=max_steps)

    def nearest_component(self, x: Array) -> Array:
        """Index of the most responsible component for clean data ``x: [B, D]``; ``[B]``."""
        _check_x(x, self.dim)
        r = flat_batch(x)[:, None, :] - self.means[None]
        logp = -0.5 * jnp.sum(r * r / self.vars[None] + jnp.log(self.vars[None]), -1)
        logp = logp + jax.nn.log_softmax(self.logits)[None]
        return jnp.argmax(logp, axis=-1)

    def model(self, path: Path, kind: str = "x0") -> "OracleModel":
        check_path(path)
        return OracleModel(self, path, param.check_kind(kind))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OracleModel:
    """``fn(x, t)``: the exact prediction of kind ``kind`` for an oracle distribution."""

    oracle: Gaussian | GaussianMixture
    path: Path
    kind: str = dataclasses.field(metadata=dict(static=True))

    @_compiled
    def __call__(self, x: Array, t: Array) -> Array:
        score = self.oracle.score(x, t, self.path)
        if self.kind == "score":
            return score
        # eps = -sigma * score stays finite at sigma = 0, where (x - alpha x0) / sigma is 0/0 (for data
        # of positive variance: a zero-variance dimension has an infinite score there, and eps /
        # v / velocity are NaN at t = 0, the flow itself being undefined; only x0 is finite).
        tb = broadcast_t(t, x)
        eps = -self.path.sigma(tb) * score
        x0 = self.oracle.x0(x, t, self.path)
        if self.kind != "velocity":
            return param.from_x0_eps(x0, eps, x, t, self.path, self.kind)
        # alpha' x0 + sigma' eps is inf * 0 where sigma' is singular (vp_linear at t = 0); the
        # probability-flow form f x - g^2 score / 2 is finite there (and inf * 0 where alpha = 0,
        # e.g. t = 1 on the linear path). Each branch is evaluated at a harmless t where it is not
        # selected, so that no inf enters the gradients through the unselected branch (a vjp
        # multiplies its zero cotangent by sigma' = inf: NaN)
        bad = ~(jnp.isfinite(self.path.d_sigma(tb)) & jnp.isfinite(self.path.d_alpha(tb)))
        half = jnp.asarray(0.5, tb.dtype)
        ts, tp = jnp.where(bad, half, tb), jnp.where(bad, tb, half)
        out = self.path.d_alpha(ts) * x0 + self.path.d_sigma(ts) * eps
        pf = self.path.drift_coef(tp) * x - 0.5 * self.path.diffusion_sq(tp) * score
        return jnp.where(bad, pf, out)


def _linear_velocity(oracle, x: Array, tau: Array) -> Array:
    """Probability-flow velocity ``eps_hat - x0_hat`` of the linear path (``alpha = 1 - tau``,
    ``sigma = tau``) for one sample ``x: [D]``, with ``eps_hat = -tau score`` (finite at tau = 0)."""
    from genflow.paths import linear

    lin = linear()
    xb, tb = x[None], jnp.reshape(tau, (1,))
    return (-tau * oracle.score(xb, tb, lin) - oracle.x0(xb, tb, lin))[0]


def reference_flow_map(oracle, x: Array, s, t, path: Path, rtol: float | None = None, atol: float | None = None,
                       max_steps: int = 4096, solver=None) -> Array:
    """Probability-flow ODE map of ``oracle`` from time ``s`` to ``t`` on ``path`` by an adaptive
    solve per sample (Diffrax; Dormand-Prince 8(7) by default), for reference solutions.

    Every Gaussian path is the linear path ``x_lin = x / (alpha + sigma)`` at time
    ``tau = sigma / (alpha + sigma)`` (the probability-flow ODE only depends on the noise level
    ``sigma / alpha``), so the solve runs in these coordinates, where the velocity
    ``eps_hat - x0_hat`` is smooth at both ends (``alpha = 0`` and ``sigma = 0`` included). Each
    sample gets its own step sizes (``vmap`` over the batch), so the tolerance holds per sample.
    For float64 accuracy call it under ``jax.enable_x64(True)`` with float64 ``x``.

    Args:
      oracle: anything with ``x0(x, t, path)`` and ``score(x, t, path)`` (a :class:`Gaussian`,
        :class:`GaussianMixture`).
      x: ``[B, D]`` states at time ``s``; ``s, t``: scalar times.
      rtol, atol: the PID step-size controller's tolerances (per sample); default 1e-10 for
        float64 ``x`` and ``100 eps`` of ``x``'s float width otherwise (1.2e-5 for float32: 1e-10
        is below float32's resolution, and the solve spent its ``max_steps``, then failed).
      max_steps: Diffrax's step limit per sample.
      solver: a Diffrax solver instance (default ``diffrax.Dopri8()``).
    Returns:
      ``[B, D]`` states at time ``t``.
    """
    check_path(path)
    check_t(s, "s")  # (s = 1.5 extrapolated the path silently; a no-op when traced)
    check_t(t, "t")
    dtype = x.dtype
    floor = max(1e-10, 100 * float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps))
    rtol, atol = (floor if v is None else v for v in (rtol, atol))
    return _reference_flow_map(oracle, x, jnp.asarray(s, dtype), jnp.asarray(t, dtype), path, float(rtol),
                               float(atol), int(max_steps), solver)


@_memo.filter_jit
def _reference_flow_map(oracle, x, s, t, path, rtol, atol, max_steps, solver):
    """The solve of :func:`reference_flow_map`, compiled once per oracle type, shapes and
    tolerances (oracles, paths and times are traced: a new one does not recompile)."""
    import diffrax

    from genflow.sampling._diffrax import explicit_axes_as_auto  # (a batch over Explicit mesh axes)

    def run(x, oracle, s, t, path, rtol, atol):
        a_s, sg_s = path.alpha(s), path.sigma(s)
        a_t, sg_t = path.alpha(t), path.sigma(t)
        tau_s, tau_t = sg_s / (a_s + sg_s), sg_t / (a_t + sg_t)
        term = diffrax.ODETerm(lambda tau, y, args: _linear_velocity(oracle, y, tau))
        controller = diffrax.PIDController(rtol=rtol, atol=atol)

        def one(y0):
            sol = diffrax.diffeqsolve(term, solver or diffrax.Dopri8(), t0=tau_s, t1=tau_t, dt0=None, y0=y0,
                                      stepsize_controller=controller, max_steps=max_steps)
            return sol.ys[-1]

        x_lin = flat_batch(x) / (a_s + sg_s)
        return (jax.vmap(one)(x_lin) * (a_t + sg_t)).reshape(x.shape).astype(x.dtype)

    return explicit_axes_as_auto(run, x, args=(oracle, s, t, path, rtol, atol))
