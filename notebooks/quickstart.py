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
# # genflow quickstart
#
# Four things in a few minutes on a laptop CPU:
#
# 1. a **sampler checked against an analytic oracle** (no training: Gaussian data has a
#    closed-form probability-flow map), on every built-in path and on a path of one's own, and
#    the exact conversions between prediction kinds,
# 2. **flow matching** on the two-moons toy data with the scan-chunked training loop (and the
#    other toy data sets, objectives and loss weightings),
# 3. **sampling** the trained model with several solvers, counting network evaluations (NFE),
# 4. **exact minibatch optimal-transport coupling**: straighter paths, fewer NFE.
#
# Conventions: time runs from data at `t = 0` to noise at `t = 1`,
# `x_t = alpha(t) x0 + sigma(t) eps`, and every model is a pure function `fn(x, t)`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import genflow as gf

# %% tags=["parameters"]
TRAIN_STEPS = 2000  # training steps of each flow below (the test suite runs this notebook with fewer)

# %% [markdown]
# ## 1. A sampler against the Gaussian oracle
# For data `N(mu, C)` the noisy marginals stay Gaussian, so the exact model (any prediction
# kind) and the exact probability-flow map are known. Error vs steps shows each solver's order.

# %%
oracle = gf.oracles.Gaussian.full(jnp.array([1.0, -1.0]), jnp.array([[0.5, 0.2], [0.2, 0.3]]))
path = gf.paths.vp_cosine()
x1 = oracle.prior_sample(jax.random.key(0), 512, path, 1.0)
exact = oracle.flow_map(x1, 1.0, 0.0, path)

rows = {}
for solver in ["euler", "heun", "midpoint"]:
    errs = []
    for steps in [8, 16, 32, 64]:
        x, info = gf.sample(oracle.model(path, "eps"), path, x1, prediction="eps", solver=solver, steps=steps)
        errs.append(float(jnp.sqrt(jnp.mean((x - exact) ** 2))))
    order = -np.polyfit(np.log([8, 16, 32, 64]), np.log(errs), 1)[0]
    rows[f"{solver} (order {order:.2f})"] = (np.array([8, 16, 32, 64]), np.array(errs))
gf.viz.curves(rows, xlabel="steps", ylabel="rms error vs exact flow map", logx=True, logy=True,
              title="Gaussian oracle, vp_cosine path: error vs steps");

# %% [markdown]
# **Every path, and one of your own.** A new path is one small function: `alpha(t)` and
# `sigma(t)` (derivatives and log-SNR by autodiff), registered by name. Below, the trigonometric
# interpolant `alpha = cos(pi t / 2)`, `sigma = sin(pi t / 2)` joins the built-in paths (alpha
# written as `sin(pi (1 - t) / 2)`: `jnp.cos` leaves -4.4e-8 at `t = 1`, not the exact 0 of pure
# noise). The fitted orders are about 1 (Euler) and 2 (Heun, midpoint; midpoint fits 2.9 on
# `linear`, above its order); on `ve` and `edm` (noise levels from 50 down to 0.01 and from 80 down to 0.002) the errors
# reach their asymptotic rate only from about 64 steps, so their orders are fitted on 64-512 steps. Models are eps predictions, or velocity ones on the paths
# where `alpha(1) = 0` (eps -> x0 is singular there).

# %%
def trig_alpha(t):
    return jnp.sin(0.5 * jnp.pi * (1 - t))  # (jnp.cos(pi / 2) is -4.4e-8, not 0)


def trig_sigma(t):
    return jnp.sin(0.5 * jnp.pi * t)


def trig():
    # alpha and sigma defined once, outside the factory: two calls then give equal paths, which
    # share gf.sample's compiled programs (lambdas made inside would recompile at every get("trig"))
    return gf.paths.Path(alpha_fn=trig_alpha, sigma_fn=trig_sigma, name="trig")


gf.paths.register("trig", trig, overwrite=True)  # (overwrite: re-running the cell replaces it)
for name in ["vp_linear", "vp_cosine", "ve", "edm", "linear", "trig"]:
    p = gf.paths.get(name)
    kind = "velocity" if name in ("linear", "trig") else "eps"
    step_counts = [64, 128, 256, 512] if name in ("ve", "edm") else [8, 16, 32, 64]
    x1_p = oracle.prior_sample(jax.random.key(0), 512, p, 1.0)
    exact_p = oracle.flow_map(x1_p, 1.0, 0.0, p)
    orders = []
    for solver in ["euler", "heun", "midpoint"]:
        errs = [float(jnp.sqrt(jnp.mean((gf.sample(oracle.model(p, kind), p, x1_p, prediction=kind, solver=solver,
                                                   steps=n)[0] - exact_p) ** 2))) for n in step_counts]
        orders.append(f"{solver} {-np.polyfit(np.log(step_counts), np.log(errs), 1)[0]:.2f}")
    print(f"{name:10s} ({kind:8s}, {step_counts[0]}-{step_counts[-1]} steps): fitted order " + ", ".join(orders))

# %% [markdown]
# **Prediction kinds** (`eps`, `x0`, `v`, `score`, `velocity`) are exact conversions of one
# another given the path (`gf.param.convert`): converting the oracle's model of one kind gives
# its model of any other.

# %%
p, t_mid = gf.paths.vp_cosine(), jnp.full((8,), 0.4)
x_mid = oracle.prior_sample(jax.random.key(1), 8, p, 0.4)
kinds = ["eps", "x0", "v", "score", "velocity"]
worst = max(float(jnp.max(jnp.abs(gf.param.convert(oracle.model(p, a)(x_mid, t_mid), x_mid, t_mid, p, a, b)
                                  - oracle.model(p, b)(x_mid, t_mid)))) for a in kinds for b in kinds)
print(f"largest |convert(model of kind a, a -> b) - model of kind b| over the 25 pairs: {worst:.1e}")

# %% [markdown]
# ## 2. Flow matching on two moons
# A 3x256 SiLU MLP trained with conditional flow matching on the linear path
# (`alpha = 1 - t`, `sigma = t`). `gf.train.fit` runs 500 updates per compiled `lax.scan`
# call, sampling the toy data on device.

# %%
path = gf.paths.linear()
model = gf.nets.MLP(hidden=(256, 256, 256), time_embedding="identity")
params = model.init(jax.random.key(1), jnp.zeros((1, 2)), jnp.zeros((1,)))
optimizer = optax.adam(1e-3)
loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")  # flow matching
state = gf.train.init_state(params, optimizer, jax.random.key(2), ema_decays=(0.99,))
step = gf.train.make_train_step(loss_fn, optimizer)
state, history = gf.train.fit(state, step, lambda k: gf.data.moons(k, 256), TRAIN_STEPS, chunk_size=500, progress=False)
print(f"{TRAIN_STEPS / history['wall_time']:.0f} steps/s, compile {history['compile_time']:.1f}s")
gf.viz.curves({"loss": history["loss"]}, ylabel="flow-matching loss", smooth=50,
              title="flow matching on two moons (50-step moving average)");

# %% [markdown]
# **Other data.** `gf.data` has seven toy distributions, each a jittable `f(key, n) -> [n, 2]`
# (as `gf.data.moons` above), also by name: `gf.data.toy(name, key, n)` with the names of
# `gf.data.TOY`. On common axes, with the circle of radius 2 (two standard deviations) of the
# `N(0, I)` noise they are paired with:

# %%
fig, axes = plt.subplots(1, len(gf.data.TOY), figsize=(2.2 * len(gf.data.TOY), 2.9), sharex=True, sharey=True,
                         layout="constrained")
for ax, name in zip(axes, sorted(gf.data.TOY)):
    xs = gf.data.toy(name, jax.random.key(2), 2000)
    assert xs.shape == (2000, 2) and bool(jnp.all(jnp.isfinite(xs)))
    ax.scatter(*np.asarray(xs).T, s=0.5)
    ax.add_patch(plt.Circle((0, 0), 2.0, fill=False, ls="--", lw=0.8, color="0.5"))
    ax.set_title(f"{name!r}\ngf.data.{gf.data.TOY[name].__name__}", fontsize=8)
    ax.set_xlim(-4, 4); ax.set_ylim(-4, 4); ax.set_aspect("equal"); ax.set_xticks([]); ax.set_yticks([])
fig.suptitle("gf.data's toy distributions (dashed: radius 2, two standard deviations of the noise)", fontsize=10);

# %% [markdown]
# **Objectives and weightings.** Every objective is one regression in the model's own prediction
# kind, with a weighting `w(t)` of the eps-MSE (Kingma & Gao 2023's convention; `gf.losses`'
# docstring lists them), e.g. `gf.train.diffusion_objective(model.apply, path, prediction="eps",
# weighting="min_snr")`. Below, the weightings against log-SNR on `vp_cosine`.

# %%
p, t_grid = gf.paths.vp_cosine(), jnp.linspace(0.02, 0.98, 200)
fig, ax = plt.subplots(figsize=(5, 3.5))
for name in ["eps", "x0", "v", "min_snr", "truncated_snr", "elbo", "sigmoid"]:
    w = jnp.broadcast_to(gf.losses.get_weighting(name, "eps")(p, t_grid), t_grid.shape)
    ax.plot(p.log_snr(t_grid), w, label=name)
ax.set_yscale("log"); ax.set_xlabel("log-SNR lambda(t)"); ax.set_ylabel("w(t), weight of the eps-MSE")
ax.set_title("loss weightings on vp_cosine"); ax.legend(fontsize=7);

# %% [markdown]
# ## 3. Sampling with several solvers
# `gf.sample` compiles one program per solver (and per padding bucket of step counts: 64, 128, ...);
# new parameters and new step counts reuse it.

# %%
fn = gf.nets.model_fn(model, state.ema["0.99"])
x1 = path.prior_sample(jax.random.key(3), (2048, 2))
data = np.asarray(gf.data.moons(jax.random.key(4), 2048))
for solver, steps in [("euler", 20), ("heun", 10), ("tsit5", None)]:
    x0, info = gf.sample(fn, path, x1, prediction="velocity", solver=solver, steps=steps or 1, rtol=1e-4, atol=1e-4)
    print(f"{solver:6s} NFE={int(info.nfe):4d}  W2 to data = {gf.metrics.w2_exact(x0, data):.3f}, "
          f"MMD^2 = {float(gf.metrics.mmd(x0, data)):.1e}")
# the entropic (Sinkhorn, debiased) W2: pure JAX (jittable, differentiable), close to the exact one
print(f"tsit5 samples, first 512 points: exact W2 {gf.metrics.w2_exact(x0[:512], data[:512]):.3f}, "
      f"entropic W2 {float(gf.metrics.w2_sinkhorn(x0[:512], data[:512])):.3f}")

x0, info = gf.sample(fn, path, x1, prediction="velocity", solver="heun", steps=20, save_trajectory=True)
gf.viz.scatter(x0, data, title=f"heun, NFE={int(info.nfe)}");
gf.viz.trajectories(info.trajectory, title="probability-flow trajectories");

# %% [markdown]
# ## 4. Exact minibatch OT coupling
# Pairing each data batch with its noise batch by the exact optimal assignment (Tong et al.
# 2023; Pooladian et al. 2023) makes the learned flow straighter, so an adaptive solver needs
# fewer steps. `gf.ot.CoupledBatches` solves the assignments of the next chunk of minibatches
# in a background thread while the current chunk trains; the objective uses the paired noise
# `batch["x1"]`.

# %%
stream = gf.ot.CoupledBatches(gf.data.moons, 256, jax.random.key(5), chunk=500, num_batches=TRAIN_STEPS)
state_ot = gf.train.init_state(params, optimizer, jax.random.key(2), ema_decays=(0.99,))
state_ot, history_ot = gf.train.fit(state_ot, step, stream, TRAIN_STEPS, chunk_size=500, progress=False)
stream.close()
print(f"OT-coupled training: {TRAIN_STEPS / history_ot['wall_time']:.0f} steps/s")
fn_ot = gf.nets.model_fn(model, state_ot.ema["0.99"])
for name, f in [("independent", fn), ("exact OT", fn_ot)]:
    x0, info = gf.sample(f, path, x1, prediction="velocity", solver="tsit5", rtol=1e-4, atol=1e-4,
                         save_trajectory=True)
    print(f"{name:12s} tsit5 NFE={int(info.nfe):3d}  W2 to data = {gf.metrics.w2_exact(x0, data):.3f}")
_, info_ot = gf.sample(fn_ot, path, x1, prediction="velocity", solver="heun", steps=20, save_trajectory=True)
gf.viz.trajectories(info_ot.trajectory, title="OT-coupled flow: nearly straight trajectories");

# %% [markdown]
# The same coupling can sit inside the loss instead: `diffusion_objective(..., coupling="ot")`
# pairs each step's drawn noise with its data batch by `gf.losses.ot_coupling`, an exact
# assignment solved on the host from inside the jitted step. There is no stream to manage, but the
# solve then runs inside the step rather than beside it. Below, the coupling is checked against
# brute force over all 5,040 pairings of 7 points, then used for a short training run.

# %%
import itertools

a7, b7 = gf.data.moons(jax.random.key(6), 7), jax.random.normal(jax.random.key(7), (7, 2))
paired = gf.losses.ot_coupling(None, a7, b7)
a7n, b7n = np.asarray(a7, np.float64), np.asarray(b7, np.float64)
cost = lambda b: float(np.sum((a7n - b) ** 2))  # noqa: E731
best = min(cost(b7n[list(perm)]) for perm in itertools.permutations(range(7)))
print(f"ot_coupling's cost {cost(np.asarray(paired, np.float64)):.4f}, brute-force optimum {best:.4f}, "
      f"independent {cost(b7n):.4f}")
assert abs(cost(np.asarray(paired, np.float64)) - best) < 1e-4
step_in_loss = gf.train.make_train_step(
    gf.train.diffusion_objective(model.apply, path, prediction="velocity", coupling="ot"), optimizer)
state_il = gf.train.init_state(params, optimizer, jax.random.key(2))
state_il, history_il = gf.train.fit(state_il, step_in_loss, lambda k: gf.data.moons(k, 256), 200, chunk_size=100,
                                    progress=False)
print(f"in-loss OT coupling: {200 / history_il['wall_time']:.0f} steps/s, loss "
      f"{history_il['loss'][:20].mean():.3f} -> {history_il['loss'][-20:].mean():.3f}")
