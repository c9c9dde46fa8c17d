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
# * Maximum-likelihood training of a diffusion model: `gf.likelihood.likelihood_objective` (the ELBO's
#   diffusion term) against the plain eps loss.
# * `gf.flows`: invertible layers, a RealNVP/Glow flow trained by maximum likelihood, and EBFlow's
#   energy view `log p = -E - log Z`; EBFlow's score-matching objectives (`ssm` / `dsm`) against
#   maximum likelihood; a multiscale `gf.flows.glow` on the 8x8 digits (bits/dim, samples,
#   invertibility); FFJORD continuous normalizing flows (`ffjord_objective`, `cnf_log_prob`, `cnf_sample`).
#
# The ODE, Hutchinson, dequantization and ELBO sections are checked against the Gaussian oracle, whose
# log-density is closed form on every path; the normalizing-flow section checks its own identity
# `log p = -E - log Z`; likelihood training, score matching and FFJORD are checked against oracle
# densities (a bound above the true NLL, the entropy of Gaussian data, the exact CNF of a Gaussian);
# Glow against autodiff (round trip and the Jacobian's log-determinant).
#
# Training steps are set in the cell tagged `parameters` (the tests run fewer).

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import genflow as gf

jax.config.update("jax_enable_x64", True)

# %% tags=["parameters"]
DIFFUSION_STEPS = 1000  # likelihood vs plain diffusion training (2-D MLPs)
FLOW_STEPS = 800  # RealNVP trainings: maximum likelihood, SSM, DSM
GLOW_STEPS = 2000  # Glow on the digits
FFJORD_STEPS = 300  # FFJORD on the moons

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
# ## Maximum-likelihood training of a diffusion model
# Of the ELBO's three terms only the diffusion term, `1/2 int (-lambda'(t)) E||eps - eps_hat(z_t, t)||^2 dt`,
# depends on the network: `gf.likelihood.likelihood_objective` minimises it (per dimension), with time
# drawn uniformly in log-SNR so that the weight is a constant (Song et al. 2021, Zheng et al. 2023). The
# plain eps loss (`gf.train.diffusion_objective`, uniform weighting) weighs every time equally instead,
# which is not a bound. Two equal MLPs on a 2-D Gaussian mixture, one per objective; the table gives the
# test `-ELBO` (its Monte-Carlo standard error in brackets), its gap to the true NLL from the mixture's
# closed-form density (paired per example), and the difference to the likelihood-trained model (paired:
# same test points and draws). In expectation `-ELBO >= NLL(model) >= NLL(data)`: the gaps must be positive.
# With the full 1000 steps the likelihood-trained bound is the tighter one, by 0.067 nats (SE 0.016):
# 2.480 against 2.548, for a true NLL of 2.231.

# %%
jax.config.update("jax_enable_x64", False)
gm = gf.oracles.GaussianMixture(jnp.zeros(3), jnp.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
                                jnp.array([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2]]))
path = gf.paths.vp_linear()
x_test = gm.sample(jax.random.key(30), 2000)
true_lp = gm.log_prob(x_test, 0.0, path)
net = gf.nets.MLP(hidden=(64, 64, 64))
p0 = net.init(jax.random.key(31), x_test[:2], jnp.zeros((2,)))
neg_elbo = {}
for name, loss in (("likelihood", gf.likelihood.likelihood_objective(net.apply, path, prediction="eps")),
                   ("plain eps", gf.train.diffusion_objective(net.apply, path, prediction="eps"))):
    opt = optax.adam(2e-3)
    st = gf.train.init_state(p0, opt, jax.random.key(32))
    st, _ = gf.train.fit(st, gf.train.make_train_step(loss, opt), lambda k: gm.sample(k, 256), DIFFUSION_STEPS,
                         chunk_size=min(DIFFUSION_STEPS, 500), progress=False)
    elbo, _ = gf.likelihood.vdm_elbo(gf.nets.model_fn(net, st.params), path, x_test, jax.random.key(33),
                                     prediction="eps", num_t=32)
    neg_elbo[name] = -np.asarray(elbo)
se = lambda v: float(np.std(v) / math.sqrt(len(v)))  # noqa: E731
print(f"true NLL of the test points: {-float(true_lp.mean()):.3f} nats\n")
print(f"{'objective':11s} {'-ELBO':>15s} {'-ELBO - NLL':>15s} {'vs likelihood':>15s}")
for name, v in neg_elbo.items():
    gap, diff = v + np.asarray(true_lp), v - neg_elbo["likelihood"]
    print(f"{name:11s} {v.mean():7.3f} ({se(v):.3f}) {gap.mean():7.3f} ({se(gap):.3f}) "
          f"{diff.mean():+7.3f} ({se(diff):.3f})")
    assert gap.mean() > -3 * se(gap), (name, gap.mean())  # a bound cannot beat the data's own density
    assert gap.mean() < 1.5, (name, gap.mean())  # and training brought it close (untrained: -ELBO ~ 13)

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
state, hist = gf.train.fit(state, step, lambda k: sampler(k, 256), FLOW_STEPS, chunk_size=min(FLOW_STEPS, 400),
                           progress=False)
test = sampler(jax.random.key(11), 2000)
lp = flow.log_prob(state.params, test)
ebm = -flow.energy(state.params, test) - flow.log_normalizer(state.params)
print(f"test NLL {-float(lp.mean()):.3f} nats; max |log p - (-E - log Z)| = {float(jnp.max(jnp.abs(lp - ebm))):.1e}")
fig = gf.viz.density(lambda z: flow.log_prob(state.params, jnp.asarray(z)), lims=((-3, 3), (-2.5, 2.5)), n=120,
                     title="RealNVP density on moons")

# %% [markdown]
# ## EBFlow: score matching against maximum likelihood
# The same flow trained with each of `gf.flows.OBJECTIVES` through `gf.flows.flow_objective`: `"ml"`
# (`nll_loss`), sliced score matching `"ssm"` (`ssm_loss`, one Hessian-vector product per slice) and
# denoising score matching `"dsm"` (`dsm_loss`, sigma = 0.05). The score-matching losses only see
# `grad_x log p = -grad_x E`: the linear layers' log-determinants (here dense `lu=False` layers, whose
# `slogdet` costs O(D^3) and its gradient an inverse) never enter the loss, and `log Z` is computed
# only to evaluate the NLL below. On Gaussian data (oracle entropy) all three should reach the true NLL;
# on the moons (the maximum-likelihood run above) the score, a local quantity, does not fix how much mass
# each separated region gets. In the full run (800 steps) all three are within 0.02 nats of the Gaussian's
# 1.886, while on the moons SSM and DSM end at 3.89 and 3.80 nats against 1.85 for maximum likelihood.
# Per step the score-matching objectives cost more here (SSM about 4-5.5x, DSM about 1.7-2x in the recorded run, the `ms/step` column; timings vary between runs): in 2-D the
# `slogdet` they skip is of 2 x 2 matrices, while they differentiate a gradient (and SSM adds a
# Hessian-vector product); the saving is an O(D^3) term, for wide dense layers.

# %%
g2 = gf.oracles.Gaussian.full(jnp.array([0.5, -0.3]), jnp.array([[0.6, 0.3], [0.3, 0.4]]))
draws = {"gaussian": lambda k, n: g2.sample(k, n), "moons": sampler}
entropy = -float(g2.log_prob(g2.sample(jax.random.key(11), 2000), 0.0, gf.paths.linear()).mean())
runs = {("moons", "ml"): (-float(lp.mean()), hist)}  # (the maximum-likelihood flow of the section above)
opt = optax.adam(3e-3)
for method in gf.flows.OBJECTIVES:
    step = gf.train.make_train_step(gf.flows.flow_objective(flow, method), opt)  # (one compilation per objective:
    for data_name, draw in draws.items():  # the batches are pre-drawn host arrays, the same for every dataset)
        if (data_name, method) in runs:
            continue
        batches = iter(np.asarray(draw(jax.random.key(12), FLOW_STEPS * 256)).reshape(FLOW_STEPS, 256, 2))
        st = gf.train.init_state(flow.init(jax.random.key(8), draw(jax.random.key(9), 512)), opt, jax.random.key(10))
        st, h = gf.train.fit(st, step, batches, FLOW_STEPS, chunk_size=min(FLOW_STEPS, 400), progress=False)
        runs[data_name, method] = (-float(flow.log_prob(st.params, draw(jax.random.key(11), 2000)).mean()), h)
print(f"gaussian data: true NLL (entropy) {entropy:.3f} nats\n")
print(f"{'data':9s} {'objective':9s} {'test NLL':>9s} {'ms/step':>8s} {'compile s':>10s}")
for (data_name, method), (nll, h) in sorted(runs.items()):
    print(f"{data_name:9s} {method:9s} {nll:9.3f} {1e3 * h['wall_time'] / FLOW_STEPS:8.2f} {h['compile_time']:10.1f}")
for method in gf.flows.OBJECTIVES:  # every objective finds the Gaussian
    assert abs(runs["gaussian", method][0] - entropy) < 0.1, (method, runs["gaussian", method][0], entropy)

# %% [markdown]
# ## Glow on the 8x8 digits
# `gf.flows.glow` is multiscale: each level squeezes (`Squeeze`, 2x2 pixels to channels), runs
# `ActNorm` -> `Invertible1x1Conv` -> `AffineCoupling` steps, and factors half of the channels out
# (`FactorOut`) to the base. Trained by maximum likelihood on uniformly dequantized digits (17 grey
# levels in [-1, 1], bins 2/16 wide), so bits/dim is a bound on the discrete data's. Invertibility is
# checked against autodiff: `x -> z -> x` returns x, and the log-determinant the layers add up equals
# `log|det dz/dx|` of the 64 x 64 Jacobian. The full run (2000 steps) goes from 4.44 to 2.71 test bits/dim.

# %%
xtr, _ = gf.data.load_digits("train")
xte, _ = gf.data.load_digits("test")
xtr, bin_w = jnp.asarray(xtr), 2 / 16
glow = gf.flows.glow((8, 8, 1), levels=2, steps_per_level=2, hidden=32)
g_params = glow.init(jax.random.key(12), gf.likelihood.uniform_dequantize(jax.random.key(13), xtr[:512], bin_w)[0])
y_test, _ = gf.likelihood.uniform_dequantize(jax.random.key(15), jnp.asarray(xte), bin_w)
bpd0 = float(gf.likelihood.bits_per_dim(glow.log_prob(g_params, y_test), 64, bin_w).mean())
opt = optax.adam(1e-3)
st = gf.train.init_state(g_params, opt, jax.random.key(14))
step = gf.train.make_train_step(gf.flows.flow_objective(glow, "ml", dequantize=bin_w), opt)
# one step per compiled call, no loop: conv gradients in a loop body are slow on XLA:CPU (see gf.train.fit)
st, h = gf.train.fit(st, step, lambda k: xtr[jax.random.randint(k, (64,), 0, xtr.shape[0])], GLOW_STEPS,
                     chunk_size=1, progress=False)
bpd = float(gf.likelihood.bits_per_dim(glow.log_prob(st.params, y_test), 64, bin_w).mean())
print(f"test bits/dim: {bpd0:.3f} at init -> {bpd:.3f} after {GLOW_STEPS} steps "
      f"({1e3 * h['wall_time'] / GLOW_STEPS:.0f} ms/step)")
assert bpd < bpd0 - 0.1, (bpd0, bpd)  # training helped

fwd = jax.jit(lambda p, x: glow.bijector.forward(p, x))
inv = jax.jit(lambda p, z: glow.bijector.inverse(p, z)[0])
z, logdet = fwd(st.params, y_test[:8])
jac = jax.jit(jax.vmap(jax.jacfwd(lambda v: glow.bijector.forward(st.params, v.reshape(1, 8, 8, 1))[0].reshape(64))))(
    y_test[:4].reshape(4, 64))  # [4, 64, 64]
round_trip = float(jnp.max(jnp.abs(inv(st.params, z) - y_test[:8])))
logdet_err = float(jnp.max(jnp.abs(logdet[:4] - jnp.linalg.slogdet(jac)[1])))
print(f"max |x - g^-1(g(x))| = {round_trip:.1e}; max |logdet - log|det J|| = {logdet_err:.1e} "
      f"(logdet ~ {float(logdet[0]):.1f})")
assert round_trip < 1e-4 and logdet_err < 1e-2
temps = (1.0, 0.7)
z_s = jax.random.normal(jax.random.key(16), (8, 8, 8, 1))
rows = [jnp.asarray(xte[:8])] + [inv(st.params, tau * z_s) for tau in temps]
fig = gf.viz.image_grid(jnp.clip(jnp.concatenate(rows), -1, 1), nrow=8,
                        row_labels=["test data"] + [f"T = {tau}" for tau in temps],
                        title=f"Glow samples, z ~ N(0, T^2 I), after {GLOW_STEPS} steps")

# %% [markdown]
# ## FFJORD: continuous normalizing flows
# A network `f(x, t)` is the flow: `dx/dt = f` carries the data at t = 0 to `N(0, I)` at t = 1, and
# `log p(x) = log N(x_1) + int_0^1 tr(df/dx) dt`. First the oracle: the exact velocity of Gaussian data
# on the linear path is such a CNF (its marginal at t = 1 is exactly `N(0, I)`), so `cnf_log_prob` must
# return the Gaussian's closed-form log-density and `cnf_sample` its exact flow map from noise.

# %%
lin = gf.paths.linear()
oracle_f = lambda params, x, t: g2.model(lin, "velocity")(x, t)  # noqa: E731  (apply_fn(params, x, t))
x_g = g2.sample(jax.random.key(20), 256)
lp_cnf, info = gf.flows.cnf_log_prob(oracle_f, None, x_g)
z_g = jax.random.normal(jax.random.key(21), (256, 2))
err_lp = float(jnp.max(jnp.abs(lp_cnf - g2.log_prob(x_g, 0.0, lin))))
err_x = float(jnp.max(jnp.abs(gf.flows.cnf_sample(oracle_f, None, z_g) - g2.flow_map(z_g, 1.0, 0.0, lin))))
print(f"max |cnf_log_prob - exact| = {err_lp:.1e} nats ({int(info.nfe)} evaluations); "
      f"max |cnf_sample - exact flow map| = {err_x:.1e}")
assert err_lp < 1e-3 and err_x < 1e-3

# %% [markdown]
# Training: `ffjord_objective` is `-log p / D` with Hutchinson's trace (one Rademacher probe per solve)
# on a fixed grid of Heun steps, differentiated through the solver; evaluation uses the exact trace with an
# adaptive solver (`cnf_log_prob`'s defaults) for the density on a grid, and `cnf_sample` integrates
# noise back to t = 0. After 300 steps its test NLL, 1.84 nats, matches the RealNVP's 1.85 after 800.

# %%
cnf = gf.nets.MLP(hidden=(32, 32, 32), time_embedding="identity")  # (t as a plain input: smooth in t)
c_params = cnf.init(jax.random.key(22), jnp.zeros((1, 2)), jnp.zeros((1,)))
opt = optax.adam(1e-2)
st = gf.train.init_state(c_params, opt, jax.random.key(23))
step = gf.train.make_train_step(gf.flows.ffjord_objective(cnf.apply, solver="heun", steps=8), opt)
st, h = gf.train.fit(st, step, lambda k: sampler(k, 128), FFJORD_STEPS, chunk_size=min(FFJORD_STEPS, 100),
                     progress=False)
n = 60
xs, ys = np.linspace(-3, 3, n), np.linspace(-2.5, 2.5, n)
grid = jnp.asarray(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), jnp.float32)
lp_all, info = gf.flows.cnf_log_prob(cnf.apply, st.params, jnp.concatenate([test, grid]))  # (one solve)
lp_init, _ = gf.flows.cnf_log_prob(cnf.apply, c_params, jnp.concatenate([test, grid]))
nll_init, nll_cnf = -float(lp_init[:len(test)].mean()), -float(lp_all[:len(test)].mean())
x_cnf = np.asarray(gf.flows.cnf_sample(cnf.apply, st.params, jax.random.normal(jax.random.key(24), (2000, 2))))
print(f"FFJORD test NLL {nll_init:.3f} nats at init -> {nll_cnf:.3f} after {FFJORD_STEPS} steps "
      f"({1e3 * h['wall_time'] / FFJORD_STEPS:.0f} ms/step; exact-trace evaluation: {int(info.nfe)} evaluations)")
assert nll_cnf < nll_init - 0.1, (nll_init, nll_cnf)  # training helped
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
axes[0].imshow(np.exp(np.asarray(lp_all[len(test):])).reshape(n, n), origin="lower", extent=(-3, 3, -2.5, 2.5),
               cmap="magma")
axes[0].set_title("cnf_log_prob: density")
axes[1].scatter(x_cnf[:, 0], x_cnf[:, 1], s=1, alpha=0.4)
axes[1].set_xlim(-3, 3); axes[1].set_ylim(-2.5, 2.5); axes[1].set_aspect("equal"); axes[1].set_title("cnf_sample")
for ax in axes:
    ax.set_xlabel("x1"); ax.set_ylabel("x2")
fig.suptitle(f"FFJORD on the moons, {FFJORD_STEPS} steps"); fig.tight_layout()
