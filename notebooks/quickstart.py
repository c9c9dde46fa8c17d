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
#    closed-form probability-flow map),
# 2. **flow matching** on the two-moons toy data with the scan-chunked training loop,
# 3. **sampling** the trained model with several solvers, counting network evaluations (NFE),
# 4. **exact minibatch optimal-transport coupling**: straighter paths, fewer NFE.
#
# Conventions: time runs from data at `t = 0` to noise at `t = 1`,
# `x_t = alpha(t) x0 + sigma(t) eps`, and every model is a pure function `fn(x, t)`.

# %%
import jax
import jax.numpy as jnp
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
gf.viz.curves(rows, xlabel="steps", ylabel="rms error vs exact flow map", logx=True, logy=True);

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
gf.viz.curves({"loss": history["loss"]}, ylabel="flow-matching loss", smooth=50);

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
    print(f"{solver:6s} NFE={int(info.nfe):4d}  W2 to data = {gf.metrics.w2_exact(x0, data):.3f}")

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
