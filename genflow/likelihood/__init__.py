"""Likelihoods: the probability-flow ODE log-density, trace estimators, dequantization, bits/dim
and the continuous-time VDM ELBO.

    logp, info = gf.log_prob(fn, path, x, prediction="velocity")                       # exact trace
    logp, info = gf.log_prob(fn, path, x, prediction="eps", trace="hutchinson", key=key, num_probes=4)
    bound, _ = gf.likelihood.dequantized_log_prob(fn, path, x, key, prediction="eps", bin_width=2 / 255)
    bpd = gf.likelihood.bits_per_dim(bound, num_dims=x[0].size)
    elbo, parts = gf.likelihood.vdm_elbo(fn, path, x, key, prediction="eps", levels=jnp.linspace(-1, 1, 256))
    # (vdm_elbo needs sigma(t_min) > 0 and alpha(t_max) > 0: vp_linear; t_min > 0 on vp_cosine;
    #  t_min > 0 and t_max < 1 on linear)
"""

from genflow.likelihood._discrete import (DEQUANTIZATIONS, bits_per_dim, dequantized_log_prob,
                                          truncated_normal_dequantize, truncated_normal_time, uniform_dequantize)
from genflow.likelihood._elbo import (TIME_SAMPLINGS, diffusion_term, likelihood_loss, likelihood_objective,
                                      prior_term, reconstruction_term, sample_time, vdm_elbo)
from genflow.likelihood._ode import (SOLVERS, GaussianPrior, LogProbInfo, PathVelocity, gaussian_log_prob,
                                     log_prob, ode_log_prob)
from genflow.likelihood._trace import PROBES, exact_divergence, hutchinson_divergence, sample_probes

__all__ = [
    "log_prob", "ode_log_prob", "LogProbInfo", "GaussianPrior", "PathVelocity", "SOLVERS", "gaussian_log_prob",
    "exact_divergence", "hutchinson_divergence", "sample_probes", "PROBES",
    "bits_per_dim", "uniform_dequantize", "truncated_normal_dequantize", "truncated_normal_time",
    "dequantized_log_prob", "DEQUANTIZATIONS",
    "vdm_elbo", "diffusion_term", "reconstruction_term", "prior_term", "sample_time", "likelihood_loss",
    "likelihood_objective", "TIME_SAMPLINGS",
]
