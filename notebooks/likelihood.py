# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Likelihoods and normalizing flows
#
# * `gf.log_prob`: the log-density of a diffusion / flow model through its probability-flow ODE,
#   `log p_0(x) = log p_1(x_1) + int_0^1 div v(x_t, t) dt`, with the exact trace or Hutchinson's.
# * Bits/dim for discrete data: uniform and truncated-normal dequantization, and the VDM ELBO.
# * `gf.flows`: invertible layers, a RealNVP/Glow flow trained by maximum likelihood, and EBFlow's
#   energy view `log p = -E - log Z`.
#
# The ODE, Hutchinson, dequantization and ELBO sections are checked against the Gaussian oracle, whose
# log-density is closed form on every path; the normalizing-flow section checks its own identity
# `log p = -E - log Z`.

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import genflow as gf

jax.config.update("jax_enable_x64", True)

# %% [markdown]
# ## Exact log-likelihood on every path
# Gaussian data with a dense covariance in 8 dimensions; the model is the exact velocity from the
# oracle. The error splits into the solver's error and the *prior-mismatch* term: the default
# prior is `N(0, sigma(1)^2 I)`, while the true marginal at t = 1 is
# `N(alpha(1) mu, alpha(1)^2 C + sigma(1)^2 I)`; they agree only on the linear path (alpha(1) = 0).

# %%
d = 8
a = jax.random.normal(jax.random.key(0), (d, d)) / math.sqrt(d)
g = gf.oracles.Gaussian.full(jax.random.normal(jax.random.key(1), (d,)), a @ a.T + 0.3 * jnp.eye(d))
x = g.sample(jax.random.key(2), 128)

print(f"{'path':10s} {'|err| nats/dim':>15s} {'solver err':>11s} {'|mismatch|':>11s} {'NFE':>5s}")
for name in gf.paths.names():
    path = gf.paths.get(name)
    logp, info = gf.log_prob(g.model(path, "velocity"), path, x, prediction="velocity", rtol=1e-7, atol=1e-7)
    exact = g.log_prob(x, path.t_min, path)
    mismatch = info.prior_logp - g.log_prob(info.z, 1.0, path)
    print(f"{name:10s} {float(jnp.mean(jnp.abs(logp - exact))) / d:15.2e} "
          f"{float(jnp.mean(jnp.abs(logp - mismatch - exact))) / d:11.2e} "
          f"{float(jnp.mean(jnp.abs(mismatch))) / d:11.2e} {int(info.nfe):5d}")

# %% [markdown]
# ## Hutchinson's estimator
# `trace="hutchinson"` replaces the D Jacobian columns by `z^T J z` with random probes, fixed along
# each solve. With a dense covariance the Jacobian is not diagonal, so the estimate is random; its
# mean is the exact log-density. Gaussian probes have more variance than Rademacher ones, and more
# probes per evaluation divide the variance.

# %%
path = gf.paths.linear()
fn = g.model(path, "velocity")
x0 = x[:1]
reps = jnp.repeat(x0, 500, axis=0)
exact0 = float(g.log_prob(x0, 0.0, path)[0])
fig, ax = plt.subplots(figsize=(6, 3.5))
for probe, k in (("rademacher", 1), ("gaussian", 1), ("rademacher", 4)):
    est, _ = gf.log_prob(fn, path, reps, prediction="velocity", trace="hutchinson", probe=probe, num_probes=k,
                         key=jax.random.key(3), rtol=1e-6, atol=1e-6)
    est = np.asarray(est)
    ax.hist(est, bins=np.linspace(exact0 - 11, exact0 + 11, 89), alpha=0.5, label=f"{probe} x{k}: var {est.var():.2f}")
    print(f"{probe:10s} x{k}: mean - exact = {est.mean() - exact0:+.3f} (SE {est.std() / math.sqrt(len(est)):.3f})")
ax.axvline(exact0, color="k", label="exact")
ax.set_xlabel("log p(x)"); ax.set_ylabel("count (of 500 estimates)")
ax.set_title("Hutchinson estimates of one log-likelihood"); ax.legend(fontsize=8); fig.tight_layout()

# %% [markdown]
# ## Bits per dimension of discrete data
# Data rounded to a grid of width 1/8 has `P(x) = int_bin p(y) dy`. Uniform dequantization gives
# `log P >= E[log p(x + u)] + D log(bin)`; the truncated-normal dequantization of Zheng et al. 2023
# evaluates the ODE from `t_eps` with `z = alpha x + sigma eps`, `eps` truncated to `[-3, 3]`, so
# that z covers exactly the scaled bin. Both are lower bounds; for this smooth density the uniform
# one is tighter (the truncated normal pays `log 6 - H(TN)` per dimension; it is designed for
# models whose density is peaked on the lattice).

# %%
gd = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 0.8]))
xd = jnp.round(gd.sample(jax.random.key(4), 64) * 8) / 8
path = gf.paths.vp_cosine(logsnr_min=-20.0)
from scipy import special  # noqa: E402

sd = np.sqrt(np.asarray(gd.var))
cdf = lambda u: special.ndtr((np.asarray(u) - np.asarray(gd.mean)) / sd)  # noqa: E731
exact_bits = gf.likelihood.bits_per_dim(np.log(cdf(xd + 1 / 16) - cdf(xd - 1 / 16)).sum(-1), 2)
print(f"exact discrete bits/dim: {exact_bits.mean():.4f}")
for deq in ("uniform", "truncated_normal"):
    bound, _ = gf.likelihood.dequantized_log_prob(gd.model(path, "velocity"), path, xd, jax.random.key(5),
                                                 prediction="velocity", bin_width=1 / 8, dequantization=deq,
                                                 num_samples=16, rtol=1e-6, atol=1e-6)
    print(f"{deq:17s} bound: {float(jnp.mean(gf.likelihood.bits_per_dim(bound, 2))):.4f} bits/dim")

# %% [markdown]
# ## The continuous-time ELBO (VDM)
# For Gaussian data and the exact eps-model, the diffusion term equals `KL(q(z_t0|x) || q_t0) -
# KL(q(z_1|x) || q_1)` (de Bruijn), so the ELBO is `log p(x)` minus the decoder's and the prior's
# gaps, both closed form. Importance-sampled time (uniform in log-SNR) estimates the same integral
# with far less variance than uniform time.

# %%
path = gf.paths.vp_linear()
x3 = g.sample(jax.random.key(6), 4)


def kl_to_marginal(x, t):
    """KL(q(z_t | x) || q_t), q_t = N(alpha mu, alpha^2 C + sigma^2 I) the exact noisy marginal; [B]."""
    a, s = float(path.alpha(t)), float(path.sigma(t))
    cov_t = a**2 * np.asarray(g.cov) + s**2 * np.eye(d)
    r = a * (np.asarray(x) - np.asarray(g.mean))
    quad = np.einsum("bi,ij,bj->b", r, np.linalg.inv(cov_t), r)
    return 0.5 * (s**2 * np.trace(np.linalg.inv(cov_t)) + quad - d + np.linalg.slogdet(cov_t)[1] - 2 * d * np.log(s))


# the closed-form gap ELBO - log p(x): the decoder's, E log p(x | z_t0) - KL(q(z_t0|x) || q_t0) - log p(x),
# plus the prior's, KL(q(z_1|x) || q_1) - KL(q(z_1|x) || prior)
t0 = path.t_min
rec = -0.5 * d * (1 + np.log(2 * np.pi * float(path.sigma(t0) / path.alpha(t0)) ** 2))
gap = (rec - kl_to_marginal(x3, t0) - np.asarray(g.log_prob(x3, 0.0, path))
       + kl_to_marginal(x3, 1.0) - np.asarray(gf.likelihood.prior_term(path, x3)))
print("closed-form gap ELBO - log p(x):", " ".join(f"{v:.1e}" for v in gap))
for ts in ("importance", "uniform"):
    est = jax.jit(jax.vmap(lambda k: gf.likelihood.vdm_elbo(g.model(path, "eps"), path, x3, k, prediction="eps",
                                                           num_t=2000, time_sampling=ts)[0]))(
        jax.random.split(jax.random.key(7), 16))
    se = np.asarray(est.std(0)) / 4
    print(f"{ts:10s} ELBO - log p(x) = {np.asarray(est.mean(0) - g.log_prob(x3, 0.0, path)).round(3)} "
          f"+- {se.round(3)} (1 SE)")

# %% [markdown]
# ## Normalizing flows
# A RealNVP / Glow flow on moons (ActNorm, dense invertible linear, affine coupling), trained by
# maximum likelihood. EBFlow views the same model as `log p = -E(x) - log Z` where the energy
# leaves out the linear layers' log-determinants; score matching trains E without ever computing
# them, and `log Z` is needed only to evaluate likelihoods (`experiments/density.py` compares the
# two trainings, FFJORD and flow matching).

# %%
jax.config.update("jax_enable_x64", False)
flow = gf.flows.realnvp(2, num_steps=4, hidden=32, lu=False)
sampler = gf.data.toy_sampler("moons")
params = flow.init(jax.random.key(8), sampler(jax.random.key(9), 512))
opt = optax.adam(3e-3)
state = gf.train.init_state(params, opt, jax.random.key(10))
step = gf.train.make_train_step(gf.flows.flow_objective(flow, "ml"), opt)
state, hist = gf.train.fit(state, step, lambda k: sampler(k, 256), 800, chunk_size=400, progress=False)
test = sampler(jax.random.key(11), 2000)
lp = flow.log_prob(state.params, test)
ebm = -flow.energy(state.params, test) - flow.log_normalizer(state.params)
print(f"test NLL {-float(lp.mean()):.3f} nats; max |log p - (-E - log Z)| = {float(jnp.max(jnp.abs(lp - ebm))):.1e}")
fig = gf.viz.density(lambda z: flow.log_prob(state.params, jnp.asarray(z)), lims=((-3, 3), (-2.5, 2.5)), n=120,
                     title="RealNVP density on moons")
