# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inverse problems: posterior sampling with a diffusion / flow prior
#
# Given a prior model `fn(x, t)` and a measurement `y = A(x0) + noise`, `gf.inverse` samples
# `p(x0 | y)` without retraining: DPS, MCG, FlowDPS, DDNM, PiGDM and TMPD, all in one compiled
# program, on any path and prediction kind.
#
# 1. **Exactness check** on a linear-Gaussian problem, where the posterior is closed form, and
#    the same likelihood sampled by a high-order ODE solver (`posterior_model`).
# 2. **Digits**: inpainting, 2x super-resolution and deblurring with a small flow-matching prior.
# 3. **The operator gallery**: every measurement operator on one digit, its measurements under
#    Gaussian and Poisson noise, its pseudo-inverse and adjoint, each checked against its dense matrix.
# 4. **Poisson (shot) noise**: which samplers take which noise model, and posterior samples of
#    photon-limited inpainting.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import genflow as gf
from genflow import inverse as inv

# %% tags=["parameters"]
TRAIN_STEPS = 2500  # training steps of the digits prior in section 2 (the test suite runs this notebook with fewer)
N_BIG = 20_000  # samples of section 1's covariance-error curves (the test suite uses fewer)

# %% [markdown]
# ## 1. A 2-D Gaussian prior, one noisy linear measurement
# Prior `N(mu, C)`, measurement `y = a . x + 0.2 n`. The exact posterior is Gaussian; each
# sampler runs with the prior's exact model (`oracle.model`), so any gap is the sampler's.

# %%
prior = gf.oracles.Gaussian.full(jnp.array([0.0, 0.0]), jnp.array([[1.0, 0.6], [0.6, 1.0]]))
op = inv.compressed_sensing(jax.random.key(0), (2,), 1)
x_true = jnp.array([[1.5, -0.5]])
y1 = inv.GaussianNoise(0.2).sample(jax.random.key(1), op(x_true))
m_post, c_post = inv.linear_gaussian_posterior(prior.mean, prior.cov, inv.operator_matrix(op, (2,)), np.asarray(y1)[0], 0.2)

n = 2000
y = jnp.broadcast_to(y1, (n, 1))
fig, axes = plt.subplots(2, 3, figsize=(11, 7.2), sharex=True, sharey=True)
for ax, (method, path, kind, hp) in zip(axes.flat, [("dps", gf.paths.vp_cosine(), "eps", dict(scale=0.3)),
                                                    ("mcg", gf.paths.vp_cosine(), "eps", dict(scale=0.3)),
                                                    ("ddnm", gf.paths.vp_linear(), "x0", {}),
                                                    ("flowdps", gf.paths.linear(), "velocity", {}),
                                                    ("pigdm", gf.paths.vp_cosine(), "eps", dict(data_var=1.0)),
                                                    ("tmpd", gf.paths.linear(), "velocity", {})]):
    x1 = path.prior_sample(jax.random.key(2), (n, 2))
    xs, info = inv.posterior_sample(prior.model(path, kind), path, x1, y, op, prediction=kind, method=method,
                                    steps=100, key=jax.random.key(3), noise=inv.GaussianNoise(0.2), **hp)
    xs = np.asarray(xs)
    ax.scatter(*xs.T, s=1, alpha=0.3, label="samples")
    w, v = np.linalg.eigh(c_post)
    th = np.linspace(0, 2 * np.pi, 200)
    ell = m_post[:, None] + 2 * v @ (np.sqrt(w)[:, None] * np.stack([np.cos(th), np.sin(th)]))
    ax.plot(*ell, "r", lw=1.5, label="exact posterior (2 sd)")
    err = np.linalg.norm(xs.mean(0) - m_post)
    cov_err = np.linalg.norm(np.cov(xs.T) - c_post) / np.linalg.norm(c_post)
    ax.set_title(f"{method} ({path.name}, {kind})\nmean error {err:.3f}, cov rel. error {cov_err:.2f}, "
                 f"NFE {int(info.nfe)}", fontsize=9)
axes.flat[0].legend(fontsize=7, loc="lower left")
fig.tight_layout()

# %% [markdown]
# What the picture says: DPS gets the posterior mean right but over-disperses; MCG and DDNM
# project onto the measurement hyperplane `a . x = y` at every step, which is right for
# noiseless measurements and collapses (MCG also biases the mean) when the measurement is
# noisy; FlowDPS's clean-estimate correction stays close. None of those four uses the noise
# level. PiGDM and TMPD do: they add the score of a Gaussian approximation of `p(y | x_t)`,
# `N(A x0_hat, A C_t A^T + sigma_y^2 I)`. TMPD's `C_t` is Tweedie's `Cov[x0 | x_t]`, read off the
# model's Jacobian, which is exact for a Gaussian prior: its samples fill the exact posterior's
# ellipse. PiGDM's `C_t = r_t^2 I` assumes an isotropic prior (`data_var`), an approximation for
# this correlated one. `experiments/benchmarks/inverse_oracle.py` measures these errors on
# 16-dimensional problems.

# %% [markdown]
# ### The same likelihood with a high-order ODE solver
# `inv.posterior_model` returns TMPD's (or PiGDM's) posterior denoiser `E[x0 | x_t, y]` as an
# `x0` model (an `inv.PosteriorModel`: a pytree, so new measurements, noise level or weight reuse
# the compiled solver), so any deterministic solver of `gf.sample` integrates the posterior's
# probability-flow ODE. Below, the covariance error against the number of model evaluations:
# TMPD with the stochastic DDPM base of `posterior_sample`, and DPM-Solver++(2M) on
# `posterior_model` (20,000 samples from the same noise; dotted: the error of the sample
# covariance of 20,000 exact posterior draws, the floor of this measurement).

# %%
path = gf.paths.linear()
n_big = N_BIG
x1 = path.prior_sample(jax.random.key(2), (n_big, 2))
y_big = jnp.broadcast_to(y1, (n_big, 1))
fn_prior = prior.model(path, "velocity")


def cov_rel(xs):
    return np.linalg.norm(np.cov(np.asarray(xs).T) - c_post) / np.linalg.norm(c_post)


ddpm = {s: cov_rel(inv.posterior_sample(fn_prior, path, x1, y_big, op, prediction="velocity", method="tmpd", steps=s,
                                        key=jax.random.key(3), noise=inv.GaussianNoise(0.2))[0])
        for s in (10, 20, 50, 100, 200)}
pm = inv.posterior_model(fn_prior, path, y_big, op, prediction="velocity", noise=inv.GaussianNoise(0.2))
ode = {s: cov_rel(gf.sample(pm, path, x1, prediction="x0", solver="dpm++2m", steps=s, schedule="logsnr",
                            t_start=0.999)[0])
       for s in (5, 10, 20, 50)}
floor = cov_rel(np.random.default_rng(0).multivariate_normal(m_post, c_post, n_big))
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(list(ddpm), list(ddpm.values()), "o-", label="tmpd, DDPM base (posterior_sample)")
ax.loglog(list(ode), list(ode.values()), "s-", label="tmpd, DPM-Solver++(2M) (posterior_model)")
ax.axhline(floor, ls=":", c="k", label="exact draws (Monte-Carlo floor)")
ax.set_xlabel("model evaluations (each with 10 CG iterations)")
ax.set_ylabel("covariance rel. error")
ax.set_title("TMPD on the Gaussian problem: covariance error vs NFE")
ax.legend(fontsize=7)
print("DDPM base:", {k: round(float(v), 3) for k, v in ddpm.items()})
print("ODE:      ", {k: round(float(v), 3) for k, v in ode.items()}, " floor", round(float(floor), 3))

# %% [markdown]
# ## 2. Digits: inpainting, super-resolution and deblurring
# A flow-matching prior over the 64 pixels of scikit-learn's 8x8 digits (2,500 steps of a 3x256 MLP:
# about half a minute on two CPU cores), then three of the posterior samplers (DPS, FlowDPS, TMPD) on held-out digits.
# The blur is a kernel of our own (`inv.kernel_blur`: an L-shaped "camera shake", not point-symmetric;
# any measured point-spread function goes the same way), with `rcond=0.1` for its pseudo-inverse.
# The posterior samplers pay off where `A` loses information (over `A+ y`: 5-6 dB on inpainting, 1-2 dB on super-resolution).
# This mild blur loses little (`A+ y` reaches about 25 dB), and a posterior *sample*, not the posterior mean, is
# then no closer in PSNR than `A+ y` (24-25 dB for DPS / TMPD); DPS's SSIM shows its leftover noise. `experiments/inverse.py` runs the
# full comparison (more tasks, tuned step sizes, PSNR/SSIM tables).

# %%
xtr, _ = gf.data.load_digits("train")
xte, _ = gf.data.load_digits("test")
net = gf.nets.MLP(hidden=(256, 256, 256))


def apply(params, x, t):
    return net.apply(params, x.reshape(x.shape[0], -1), t).reshape(x.shape)


path = gf.paths.linear()
params = net.init(jax.random.key(0), jnp.zeros((1, 64)), jnp.zeros((1,)))
opt = optax.adam(1e-3)
data = jnp.asarray(xtr)
state = gf.train.init_state(params, opt, jax.random.key(1), ema_decays=(0.999,))
step = gf.train.make_train_step(gf.train.diffusion_objective(apply, path, prediction="velocity"), opt)
state, hist = gf.train.fit(state, step, lambda k: data[jax.random.randint(k, (256,), 0, len(data))], TRAIN_STEPS,
                           chunk_size=500, progress=False)
fn = jax.tree_util.Partial(apply, state.ema["0.999"])

# %%
x_test = jnp.asarray(xte[:8])
noise = inv.GaussianNoise(0.05)
rows = {"truth": x_test}
for task, op in {"inpainting (40% kept)": inv.random_inpainting(jax.random.key(5), (8, 8, 1), keep=0.4),
                 "super-resolution x2": inv.super_resolution(2),
                 "blur (own kernel)": inv.kernel_blur((8, 8), [[0, 0, 0], [0, 2, 1], [0, 0, 1]], rcond=0.1)}.items():
    y = noise.sample(jax.random.key(6), op(x_test))
    rows[f"{task}: A+ y"] = jnp.clip(op.pinv(y), -1, 1)
    print(f"{task:24s} {'A+ y':8s} PSNR {float(gf.metrics.psnr(rows[f'{task}: A+ y'], x_test).mean()):.2f} dB  "
          f"SSIM {float(gf.metrics.ssim(rows[f'{task}: A+ y'], x_test).mean()):.3f}")
    for method, hp in [("dps", dict(scale=1.0)), ("flowdps", {}), ("tmpd", {})]:
        x1 = jax.random.normal(jax.random.key(7), x_test.shape)
        x, _ = inv.posterior_sample(fn, path, x1, y, op, prediction="velocity", method=method, steps=100,
                                    key=jax.random.key(8), noise=noise, **hp)
        x = jnp.clip(x, -1, 1)
        rows[f"{task}: {method}"] = x
        print(f"{task:24s} {method:8s} PSNR {float(gf.metrics.psnr(x, x_test).mean()):.2f} dB  "
              f"SSIM {float(gf.metrics.ssim(x, x_test).mean()):.3f}")
gf.viz.image_grid(np.concatenate([np.asarray(v) for v in rows.values()]), nrow=8, row_labels=list(rows));


# %% [markdown]
# ## 3. The operator gallery
# Every measurement operator of `gf.inverse` on one test digit: its measurement `y = A x + noise`
# under `GaussianNoise(0.1)` and under `PoissonNoise(30)` (shot noise: photon counts with mean 30 at
# full brightness, reported back on the [-1, 1] scale), the pseudo-inverse `A+ y` and the adjoint
# `A^T y`. Each operator is also checked against its dense matrix `M = operator_matrix(op, shape)`
# (the operator applied to the standard basis): `op(x) = M x`, `adjoint(y) = M^T y` (so
# `<A x, y> = <x, A^T y>`), `pinv(y)` = NumPy's SVD pseudo-inverse of `M` (for the blurs, truncated
# at `rcond` times the largest singular value, as `Blur` documents) and `norm_sq()` = the largest
# squared singular value, all to float32 rounding. Compressed sensing's `y` (32 numbers) is shown as
# a 4x8 picture; shot noise models image intensities, so it is left out there.

# %%
digit = x_test[:1]  # [1, 8, 8, 1]
ops = {"box_inpainting": inv.box_inpainting((8, 8, 1), top=2, left=2, height=4, width=3),
       "random_inpainting": inv.random_inpainting(jax.random.key(10), (8, 8, 1), keep=0.4),
       "super_resolution": inv.super_resolution(2),
       "gaussian_blur": inv.gaussian_blur((8, 8), sigma=1.0),
       "motion_blur": inv.motion_blur((8, 8), length=5, angle=45.0),
       "kernel_blur": inv.kernel_blur((8, 8), [[0, 0, 0], [0, 2, 1], [0, 0, 1]], rcond=0.1),
       "compressed_sensing": inv.compressed_sensing(jax.random.key(11), (8, 8, 1), 32),
       "denoising": inv.denoising()}
gauss, shot = inv.GaussianNoise(0.1), inv.PoissonNoise(30.0)
labels = ["y (Gaussian 0.1)", "y (Poisson 30)", "A+ y (Gaussian y)", "A+ y (Poisson y)", "A^T y (Gaussian y)"]
fig, axes = plt.subplots(len(labels), len(ops) + 1, figsize=(11, 6.8))
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([]), [sp.set_visible(False) for sp in ax.spines.values()]
axes[0, 0].imshow(digit[0, ..., 0], cmap="gray", vmin=-1, vmax=1)
axes[0, 0].set_title("clean x", fontsize=8)
for r, label in enumerate(labels):
    axes[r, 1].set_ylabel(label, fontsize=8)
rng = np.random.default_rng(0)
print(f"{'operator':19s} {'y shape':>10s} {'rank':>4s} {'||A||^2':>7s}   max rel. error vs the dense matrix: "
      f"A x, A^T y, A+ y, ||A||^2, <Ax,y>-<x,A^T y>")
for c, (name, op) in enumerate(ops.items(), start=1):
    M = inv.operator_matrix(op, (8, 8, 1))  # [m, 64]
    xr = jnp.asarray(rng.standard_normal((1, 8, 8, 1)), jnp.float32)
    yr = jnp.asarray(rng.standard_normal(op(xr).shape), jnp.float32)
    sv = np.linalg.svd(M, compute_uv=False)
    pinv_ref = np.linalg.pinv(M, rcond=getattr(op, "rcond", 1e-6)) @ np.ravel(yr)
    errs = [np.abs(np.ravel(got) - ref).max() / np.abs(ref).max() for got, ref in
            [(op(xr), M @ np.ravel(xr)), (op.adjoint(yr), M.T @ np.ravel(yr)), (op.pinv(yr), pinv_ref),
             (op.norm_sq(), sv[:1] ** 2)]]
    errs.append(abs(float(jnp.vdot(op(xr), yr) - jnp.vdot(xr, op.adjoint(yr))))
                / float(jnp.linalg.norm(op(xr)) * jnp.linalg.norm(yr)))
    assert max(errs) < 1e-5, (name, errs)
    print(f"{name:19s} {str(tuple(op(digit).shape[1:])):>10s} {np.sum(sv > 1e-6 * sv[0]):4d} {sv[0] ** 2:7.3f}   "
          + "  ".join(f"{e:.0e}" for e in errs))
    yg = gauss.sample(jax.random.key(12), op(digit))
    yp = shot.sample(jax.random.key(13), op(digit)) if name != "compressed_sensing" else None
    for r, v in enumerate([yg, yp, op.pinv(yg), None if yp is None else op.pinv(yp), op.adjoint(yg)]):
        if v is None:
            axes[r, c].text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8)
        else:
            axes[r, c].imshow(np.asarray(v).reshape(v.shape[1:3] if v.ndim == 4 else (4, 8)), cmap="gray", vmin=-1, vmax=1)
    axes[0, c].set_title(name.replace("_", "\n", 1), fontsize=8)
for r in range(1, len(labels)):
    axes[r, 0].set_visible(False)
fig.tight_layout()

# %% [markdown]
# Every check holds exactly (masks, identity) or to 3e-7 relative. What the rows show: the masks and
# the identity are orthogonal projections, `A^T = A+ = A`, so their last three rows repeat `y` on
# the kept pixels and drop the noise that the measurement draws on the others (the noise models add
# noise to every entry of `A x`, the masked zeros too: under `PoissonNoise` those read as half
# brightness, about 15 photons at rate 30);
# average pooling's `A+` is nearest-neighbour upsampling and its `A^T` the same divided by 4 (dimmer).
# The blurs keep every frequency of an 8x8 image (rank 64; the L-shaped kernel blocks one, rank 63),
# yet their pseudo-inverse divides by the weak ones and amplifies the noise there: `A+ y` is badly
# noisy for the Gaussian (sigma 1 pixel) and the motion blur at `rcond = 0.05`, more so under shot
# noise, while the adjoint `A^T y` blurs a second time. Compressed sensing's 32 measurements (rank 32
# of 64) give the minimum-norm `A+ y`, far from the digit. Where `A+ y` fails, a prior has to fill in:
# section 2's samplers.

# %% [markdown]
# ## 4. Poisson (shot) noise
# `PoissonNoise(rate)` draws counts `k ~ Poisson(rate (A x + 1) / 2)` and reports `y = 2 k / rate - 1`:
# unbiased, with variance `2 (A x + 1) / rate`, so dark pixels are nearly exact and bright ones noisy.
# Which samplers take which noise model:
#
# | method | `GaussianNoise(sigma)` | `PoissonNoise(rate)` |
# |---|---|---|
# | `dps`, `mcg` | step on `||y - A x0_hat||` (mcg: its square; `sigma` not used) | the same, weighted: `||y - A x0_hat||_Lambda`, `Lambda = 1 / (2 max(y01, 1 / rate))` with `y01 = (y + 1) / 2` on the [0, 1] scale (Chung et al. 2023, eq. 20) |
# | `flowdps` | gradient steps on `||y - A x0||^2 / 2` (`sigma` not used) | the same weighted, step size divided by the largest curvature, `rate / 8` (the largest weight over 4) |
# | `ddnm` | noiseless projection (`sigma` not used) | the same: the noise model is ignored |
# | `pigdm`, `tmpd` | Gaussian likelihood with this `sigma` | refused (`ValueError`) |
#
# Below: the noise model's first two moments checked by simulation (4,000 draws), then section 2's
# 40%-kept inpainting of the 8 test digits under `PoissonNoise(30)`, sampled by DPS and FlowDPS with the
# Poisson weights, by DPS stepping on the unweighted residual (`GaussianNoise`; its level is not used),
# and by the prior alone (`weight=0`), which the measurement must beat.

# %%
draws = np.asarray(shot.sample(jax.random.key(20), jnp.broadcast_to(x_test[:1], (4000, 8, 8, 1))))
var = 2 * (np.asarray(x_test[0]) + 1) / shot.rate
assert np.all(np.abs(draws.mean(0) - x_test[0]) <= 5 * np.sqrt(var / 4000) + 1e-6)
assert abs(draws.var(0).sum() / var.sum() - 1) < 0.05
print(f"PoissonNoise(30) on one digit: mean error {np.abs(draws.mean(0) - x_test[0]).max():.3f} (max), "
      f"variance {draws.var(0).sum():.2f} vs 2 (x + 1) / rate summed {var.sum():.2f}")

op = inv.random_inpainting(jax.random.key(5), (8, 8, 1), keep=0.4)
y = shot.sample(jax.random.key(21), op(x_test))
x1 = jax.random.normal(jax.random.key(7), x_test.shape)


def sample(method, noise, **hp):
    x, _ = inv.posterior_sample(fn, path, x1, y, op, prediction="velocity", method=method, steps=100,
                                key=jax.random.key(8), noise=noise, **hp)
    return jnp.clip(x, -1, 1)


rows = {"truth": x_test, "A+ y": jnp.clip(op.pinv(y), -1, 1), "prior (weight 0)": sample("dps", shot, weight=0.0),
        "dps, Poisson": sample("dps", shot), "flowdps, Poisson": sample("flowdps", shot),
        "dps, unweighted": sample("dps", inv.GaussianNoise(0.1))}
psnr = {k: float(gf.metrics.psnr(v, x_test).mean()) for k, v in rows.items() if k != "truth"}
print("PSNR (dB):", {k: round(v, 2) for k, v in psnr.items()})
assert psnr["dps, Poisson"] > psnr["prior (weight 0)"] + 2 and psnr["flowdps, Poisson"] > psnr["prior (weight 0)"] + 2
try:
    sample("tmpd", shot)
except ValueError as e:
    print("tmpd:", e)
gf.viz.image_grid(np.concatenate([np.asarray(v) for v in rows.values()]), nrow=8, row_labels=list(rows));

# %% [markdown]
# The noise model's moments check out (4,000 draws: largest mean error 0.009, total variance 2.86
# against 2.85). On the inpainting, the measurement lifts the samples well above the prior alone
# (full run: 15.3 dB for DPS and 14.2 dB for FlowDPS with the Poisson weights, 9.2 dB for the prior,
# 10.7 dB for `A+ y`; the test suite's less-trained prior gains less, and the assertion asks for 2 dB
# over the prior). The Poisson weighting buys nothing over DPS on the unweighted residual here
# (15.4 dB), and TMPD / PiGDM refuse shot noise.
