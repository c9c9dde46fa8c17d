"""The model seen by every solver: ``fn(x, t)`` of some prediction kind, on a path."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from genflow import param
from genflow.paths import Path, broadcast_t

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
    """A model function with its path and prediction kind, exposing every kind.

    All methods take ``x: [B, ...]`` and a scalar (or ``[B]``) time ``t``; the network is
    called once per method call with ``t`` broadcast to ``[B]`` (float32, or float64 for float64 states). Outputs are cast
    to ``x.dtype`` so solver states keep the dtype of the starting noise.
    """

    fn: Callable[[Array, Array], Array]
    path: Path
    prediction: str = dataclasses.field(metadata=dict(static=True))

    def _t(self, x: Array, t) -> Array:
        return jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x.dtype, jnp.float32)), (x.shape[0],))

    def _call(self, x: Array, tb: Array) -> Array:
        return param.check_model_output(self.fn(x, tb), x)

    def raw(self, x: Array, t) -> Array:
        """The network's own output (kind ``self.prediction``)."""
        return self._call(x, self._t(x, t))

    def predict(self, x: Array, t, kind: str) -> Array:
        """One network evaluation, converted to ``kind``."""
        tb = self._t(x, t)
        return self._convert(self._call(x, tb), x, tb, kind)

    def _convert(self, out: Array, x: Array, tb: Array, kind: str) -> Array:
        return param.convert(out, x, tb, self.path, self.prediction, kind).astype(x.dtype)

    def x0_eps(self, x: Array, t) -> tuple[Array, Array]:
        """One network evaluation, returned as ``(x0_hat, eps_hat)``."""
        tb = self._t(x, t)
        x0, eps = param.to_x0_eps(self._call(x, tb), x, tb, self.path, self.prediction)
        return x0.astype(x.dtype), eps.astype(x.dtype)

    def velocity(self, x: Array, t) -> Array:
        """Probability-flow ODE velocity ``dx/dt = alpha' x0_hat + sigma' eps_hat``."""
        return self.predict(x, t, "velocity")

    def reverse_drift(self, x: Array, t) -> Array:
        """Drift of the reverse-time SDE, ``f(t) x - g(t)^2 score(x, t)`` (with dt < 0)."""
        return self._drift(x, t, self.predict(x, t, "eps"))

    def score_and_reverse_drift(self, x: Array, t) -> tuple[Array, Array]:
        """``(score, reverse_drift(x, t))`` from one network evaluation, each ``[B, ...]`` like ``x``
        (the predictor-corrector sampler's Langevin and reverse-SDE steps share one traced call)."""
        tb = self._t(x, t)
        out = self._call(x, tb)
        return self._convert(out, x, tb, "score"), self._drift(x, t, self._convert(out, x, tb, "eps"))

    def _drift(self, x: Array, t, eps: Array) -> Array:
        tt = broadcast_t(jnp.asarray(t, jnp.promote_types(x.dtype, jnp.float32)), x)
        p = self.path
        return (p.drift_coef(tt) * x + p.diffusion_sq(tt) * eps / p.sigma(tt)).astype(x.dtype)
