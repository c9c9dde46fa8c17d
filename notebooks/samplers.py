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
# # Samplers, time discretizations and guidance
#
# A sampler in genflow is (model, path, prediction kind) x (solver) x (time grid), all through
# one call:
#
#     x0, info = gf.sample(fn, path, x1, prediction=..., solver=..., steps=..., schedule=...)
#
# This notebook lists the solvers (`gf.sampling.solvers()`), then
#
# 1. measures **error vs NFE** on a Gaussian-mixture oracle, whose closed-form denoiser is a
#    perfect model and whose exact flow map comes from an adaptive float64 solve -- so the error
#    is the solver's alone -- and compares the time discretizations, bfloat16 models and the
#    stochastic samplers (and the Langevin corrector on its own),
# 2. **optimizes a time grid** for a solver and an NFE budget (in the spirit of Align Your Steps),
#    and checks the error estimate it minimizes (a bound to first order) against the measured error,
# 3. trains a small 2-D flow-matching model and draws **samples with each of the 22 solvers**,
# 4. applies **guidance** as a function transformer: classifier-free guidance (with one batched
#    network call, on an interval of t, adaptive, with CADS condition annealing) and classifier
#    guidance,
# 5. **registers solvers of one's own** -- a hand-written one and one from Diffrax -- and checks
#    their convergence orders on the Gaussian oracle,
# 6. samples a **denoiser conditioned on the noise level** (k-diffusion / EDM models) with
#    genflow's solvers and grids, through `gf.param.from_sigma_denoiser`.
#
# Time runs from data (t = 0) to noise (t = 1); `x_t = alpha(t) x0 + sigma(t) eps`.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import genflow as gf

# %% tags=["parameters"]
TRAIN_STEPS = 2000  # training steps of the 2-D model in section 3 (the test suite runs this notebook with fewer)
HARD_TEST = 8192  # fresh samples of section 2's hard-cases check (the test suite uses fewer)
SEARCH_ITERS = 100  # Adam steps of section 2's grid searches (the test suite takes fewer)

# %%
rows = [(name, s.order, s.stochastic, s.nfe_per_step, s.target) for name, s in gf.sampling.solvers().items()]
print(f"{'solver':16s} order stochastic nfe/step target")
for r in rows:
    print(f"{r[0]:16s} {r[1]:5} {str(r[2]):10s} {str(r[3]):8s} {r[4]}")

# %% [markdown]
# ## 1. Error vs NFE on a Gaussian-mixture oracle
# A 16-dimensional mixture of 6 diagonal Gaussians on the linear path, started at noise level
# `sigma / alpha = 80` (EDM's `sigma_max`). Every solver uses the Karras schedule here; the
# reference flow map is a Dormand-Prince 8(7) solve at tolerance 1e-10 in float64. The rms error
# counts samples sent to the wrong component ("flips"); the median per-sample error is the
# typical accuracy.

# %%
path = gf.paths.linear()
t0 = 80.0 / 81.0  # noise level sigma/alpha = 80
gm = gf.oracles.GaussianMixture.random(jax.random.key(0), 6, 16)
eps = np.asarray(jax.random.normal(jax.random.key(1), (256, 16)))
x1 = jnp.asarray((1 - t0) * 80.0 * eps)
with jax.enable_x64(True):
    g64 = gf.oracles.GaussianMixture(*(jnp.asarray(np.asarray(a), jnp.float64) for a in (gm.logits, gm.means, gm.vars)))
    ref = np.asarray(g64.flow_map(jnp.asarray(np.asarray(x1), jnp.float64), t0, 0.0, path))
scale = np.sqrt(np.mean((ref - np.asarray(gm.mean)) ** 2))


def errors(x):
    e = np.sqrt(np.mean((np.asarray(x) - ref) ** 2, axis=1)) / scale
    return np.sqrt(np.mean(e**2)), np.median(e)


fn = gm.model(path, "x0")
nfes = [5, 10, 20, 40]
curves = {}
for solver in ["ddim", "dpm++2m", "dpm++3m_ref", "unipc", "deis", "edm_heun"]:
    spec = gf.sampling.solvers()[solver]
    meds, used = [], []
    for nfe in nfes:
        steps = (nfe + 1) // 2 if solver == "edm_heun" else nfe // spec.nfe_per_step
        x, info = gf.sample(fn, path, x1, prediction="x0", solver=solver, steps=steps, schedule="karras", t_start=t0)
        meds.append(errors(x)[1])
        used.append(int(info.nfe))  # (edm_heun's last step into sigma = 0 costs one evaluation: 9, 19, 39)
    curves[solver] = (np.array(used), np.array(meds))
gf.viz.curves(curves, xlabel="NFE", ylabel="median relative error", logx=True, logy=True,
              title="16-d mixture oracle, Karras schedule");

# %% [markdown]
# **Time discretizations.** One argument, any solver: uniform in t, uniform in `sqrt(t)`
# ("quadratic"), uniform in log-SNR, EDM's Karras grid -- or an explicit array of times
# (section 2). DPM-Solver++ 2M on the same oracle:

# %%
for nfe in (10, 20):
    row = []
    for sched in ("uniform", "quadratic", "logsnr", "karras"):
        x, _ = gf.sample(fn, path, x1, prediction="x0", solver="dpm++2m", steps=nfe, schedule=sched, t_start=t0)
        row.append(f"{sched} {errors(x)[1]:.1e}")
    print(f"dpm++2m NFE {nfe}, median relative error: " + ", ".join(row))

# %% [markdown]
# **Low-precision models.** A bfloat16 network (here the oracle with its inputs and output rounded
# to bfloat16) goes through the same call: the sampler keeps its state, times and coefficients in
# float32, so the error grows by about one bfloat16 rounding of the model output (2^-9 relative)
# instead of compounding over the steps. Given bfloat16 noise, the samples come back in bfloat16.

# %%
def fn_bf16(x, t):  # a bfloat16 model: bfloat16 inputs and output
    return fn(x.astype(jnp.bfloat16).astype(jnp.float32), t.astype(jnp.bfloat16).astype(jnp.float32)).astype(
        jnp.bfloat16)


for solver in ["dpm++2m", "unipc", "deis", "edm_heun"]:
    row = []
    for name, f, xs in [("float32", fn, x1), ("bfloat16 model", fn_bf16, x1),
                        ("bfloat16 model and noise", fn_bf16, x1.astype(jnp.bfloat16))]:
        x, _ = gf.sample(f, path, xs, prediction="x0", solver=solver, steps=20, schedule="karras", t_start=t0)
        row.append(f"{name} {errors(np.asarray(x, np.float32))[1]:.1e} ({x.dtype})")
    print(f"{solver:9s} NFE 20, median relative error: " + ", ".join(row))

# %% [markdown]
# **Stochastic samplers** do not follow the flow map from their noise, so they are checked in
# law: the mean log-density of their samples under the mixture, against that of exact samples
# (the negative entropy; its standard error at 1,024 samples is about 0.1). DDIM's `eta`
# interpolates between the deterministic flow map (`eta = 0`) and DDPM's ancestral sampler
# (`eta = 1`, solver "ddpm"); "euler_maruyama" and "shark" (Diffrax's SDE solvers) integrate the
# reverse SDE, and "pc" adds a Langevin corrector to each Euler-Maruyama predictor step. Too few
# steps show as samples too concentrated (a log-density above the exact one) or too spread out.

# %%
exact_samples = gm.sample(jax.random.key(12), 4096)


def mean_log_p(x):
    return float(jnp.mean(gm.log_prob(x, 0.0, path)))


print(f"exact samples   mean log p {mean_log_p(exact_samples):.2f}")
z_sde = (1 - t0) * 80.0 * jax.random.normal(jax.random.key(14), (1024, 16))
for steps_sde in (20, 50):
    for name, solver, kw in [("ddim eta=0", "ddim", {}), ("ddim eta=0.5", "ddim", {"eta": 0.5}),
                             ("ddpm (eta=1)", "ddpm", {}), ("euler_maruyama", "euler_maruyama", {}),
                             ("shark", "shark", {}), ("pc", "pc", {})]:
        x, info = gf.sample(fn, path, z_sde, prediction="x0", solver=solver, steps=steps_sde, schedule="karras",
                            t_start=t0, key=jax.random.key(15), **kw)
        print(f"{name:15s} NFE {int(info.nfe):3d}: mean log p {mean_log_p(x):.2f}")

# %% [markdown]
# **The Langevin corrector on its own.** "pc"'s corrector is public:
# `gf.sampling.langevin_correct(model, x, t, key, snr=0.16, steps=...)` takes Langevin steps on the
# noisy marginal `p_t` with the signal-to-noise step rule, for a sampler of one's own (section 5).
# Its `model` is a `gf.sampling.Model`, the network with its path and prediction kind, as every
# solver sees it. At `t = 0.5` (noise level 1) on the mixture, judged by the mean log-density
# under the exact `p_t`: samples of `p_t` keep theirs (-15.27), and samples noised 1.5x too much or
# 0.5x too little (-23.46, -10.34) are pulled to it by 100 corrector steps (-15.34, -15.38):

# %%
model_gm = gf.sampling.Model(fn, path, "x0")  # (model.predict(x, t, kind) for every kind, model.velocity, ...)
t_c = 0.5
x0_c = gm.sample(jax.random.key(30), 1024)
z_c = jax.random.normal(jax.random.key(31), x0_c.shape)
log_p_c = {}
for i, (name, factor) in enumerate([("samples of p_t", 1.0), ("1.5x too noisy", 1.5), ("0.5x too clean", 0.5)]):
    x_c = path.alpha(t_c) * x0_c + factor * path.sigma(t_c) * z_c
    key_c = jax.random.key(32 + i)  # (with one key for all three, the chains would coalesce: the same noise)
    log_p_c[name] = [float(jnp.mean(gm.log_prob(x, t_c, path))) for x in
                     [x_c] + [gf.sampling.langevin_correct(model_gm, x_c, t_c, key_c, steps=k) for k in (10, 100)]]
    print(f"{name:15s} mean log p_t: " + ", ".join(f"{k} corrector steps {v:.2f}"
                                                   for k, v in zip((0, 10, 100), log_p_c[name])))
for name in ("1.5x too noisy", "0.5x too clean"):
    assert abs(log_p_c[name][0] - log_p_c["samples of p_t"][0]) > 4.0
    assert abs(log_p_c[name][2] - log_p_c["samples of p_t"][0]) < 0.6

# %% [markdown]
# ## 2. An optimized time grid
# `gf.sampling.optimize_schedule` places the steps of a given solver for a given model, path and
# NFE budget. With `objective="bound"` it minimizes a bound on the global error: the local
# errors of the steps (measured exactly, with the solver's history taken on the exact
# trajectory) weighted by a logarithmic-norm bound on their growth; with `objective="global"` it
# minimizes the calibration batch's error itself. The result is an array of times, reusable for
# any batch -- here it is checked on fresh noise. `gf.sampling.select_schedule` instead picks,
# from a few candidate grids (here Karras grids over `rho` and `sigma_min`), the one with the
# lowest calibration error: two parameters cannot fit which calibration samples sit near a
# boundary between components, so what it gains carries over to fresh noise.

# %%
steps = 10
cal = jnp.asarray((1 - t0) * 80.0 * np.asarray(jax.random.normal(jax.random.key(2), (128, 16))))
t_start = time.perf_counter()
ts_opt = gf.sampling.optimize_schedule(fn, path, cal, prediction="x0", steps=steps, solver="unipc", t_start=t0,
                                       init="karras", iters=SEARCH_ITERS, objective="global")
print(f"optimized in {time.perf_counter() - t_start:.1f}s")
family, _ = gf.sampling.karras_family(path, steps, t_start=t0, rhos=(7, 14, 30), sigma_mins=(0.002, 0.05, 0.2))
ts_sel = gf.sampling.select_schedule(fn, path, cal, family, prediction="x0", solver="unipc")
for name, ts in [("karras", gf.sampling.time_grid(path, steps, "karras", t_start=t0)), ("optimized", ts_opt),
                 ("selected", ts_sel)]:
    x, _ = gf.sample(fn, path, x1, prediction="x0", solver="unipc", schedule=ts)
    rms, med = errors(x)
    print(f"{name:9s} unipc NFE {steps}: rms {rms:.2e}  median {med:.2e}")
    print("   noise levels:", np.array2string(np.asarray(path.sigma(ts) / path.alpha(ts)), precision=3))

# %% [markdown]
# **The bound against the error itself.** The pieces of `objective="bound"` are public, for
# checking a grid without optimizing it: `reference_trajectories` (the exact trajectories of a
# batch, dense in t, from one adaptive solve per sample; `reference_end_states` gives the end
# states alone, without the dense output), `propagation_weights` (how much an error made at time t
# can grow by the end), `schedule_bound` (the steps' local errors, each weighted by that growth,
# summed: the bound B) and `global_error` (the solver's measured mean per-sample error against
# given end states). Below, UniPC at NFE 10 on 64 fresh noise samples, with the reference solve
# checked against section 1's float64 reference solve (`ref`, Dormand-Prince 8(7) at tolerance
# 1e-10), and the error measured against the latter. Here B stays above the measured error on every
# grid (1.6x on the uniform grid to 5.7x on the optimized one; a first-order estimate, it need not),
# but it ranks them differently: it puts the uniform grid second (0.383), the worst one measured
# (0.242), and the grid optimized for the measured error (0.070, the best) third. This is the
# caveat of the module docstring -- a first-order estimate, linearized along the exact
# trajectories, misses the samples sent to the wrong component -- and the reason section 2's
# search minimizes `objective="global"`.

# %%
xb, ref_b = x1[:64], jnp.asarray(ref[:64], jnp.float32)
x_at = gf.sampling.reference_trajectories(model_gm, xb, t0, path.t_min)  # x_at(ts): [len(ts), 64, 16]
ref_err = float(jnp.max(jnp.abs(x_at(jnp.array([path.t_min]))[0] - ref_b)))
print(f"reference solve vs the exact flow map: max |error| {ref_err:.1e}")
assert ref_err < 5e-3
weights = gf.sampling.propagation_weights(model_gm, x_at, t0, path.t_min)  # w(ts): [len(ts), 64]
bounds = {}
for name, ts in [(s, gf.sampling.time_grid(path, steps, s, t_start=t0)) for s in ("uniform", "logsnr", "karras")] + [
        ("optimized", ts_opt), ("selected", ts_sel)]:
    bounds[name] = (float(gf.sampling.schedule_bound(model_gm, ts, x_at, solver="unipc", weights=weights)),
                    float(gf.sampling.global_error(model_gm, ts, xb, ref_b, solver="unipc")))
    print(f"{name:9s} bound B {bounds[name][0]:.3f}, global error {bounds[name][1]:.3f}")
    assert bounds[name][1] < bounds[name][0]
fig, ax = plt.subplots(figsize=(6.5, 3.2))
for k, label in enumerate(["bound B", "global error (measured)"]):
    ax.bar(np.arange(len(bounds)) + 0.4 * (k - 0.5), [v[k] for v in bounds.values()], 0.4, label=label)
ax.set_xticks(range(len(bounds)), list(bounds))
ax.set_xlabel("time grid"); ax.set_ylabel("mean per-sample rms error")
ax.set_title(f"UniPC, NFE {steps}, 64 fresh samples of the 16-d mixture"); ax.legend(fontsize=8);

# %% [markdown]
# **Hard cases in the calibration batch.** A grid fitted on the mean error of a random batch
# hardly sees the rare samples near a boundary between components, whose trajectories amplify
# every step's error and end in the wrong component ("flips"); once typical samples are accurate,
# they are what is left of the rms error. `gf.sampling.calibration_batch` draws a batch from a
# larger pool with a quarter of its hardest cases (the samples the solver errs most on with the
# starting grid). Below: 20 UniPC steps, checked on 8,192 fresh samples. On this small mixture
# the gain is modest and in the tail (the 99.9th percentile), at the same median; on the 64-D
# mixture of `experiments/benchmarks/samplers.py` it lowered the rms error at 50 NFE from
# 1.74e-4 to 9.95e-5 on seeds 101-112 and from 8.3e-5 to 7.7e-5 on seeds 1-12
# (`experiments/benchmarks/results/samplers_selected*.md`).

# %%
steps_h = 20
pool = (1 - t0) * 80.0 * jax.random.normal(jax.random.key(3), (1024, 16))
eps_test = np.asarray(jax.random.normal(jax.random.key(4), (HARD_TEST, 16)))
with jax.enable_x64(True):
    ref_test = np.asarray(g64.flow_map(jnp.asarray((1 - t0) * 80.0 * eps_test, jnp.float64), t0, 0.0, path))
x_test = jnp.asarray((1 - t0) * 80.0 * eps_test, jnp.float32)
for hard in (0.0, 0.25):
    cal_h = gf.sampling.calibration_batch(fn, path, pool, prediction="x0", steps=steps_h, solver="unipc", t_start=t0,
                                          size=128, hard=hard)
    ts_h = gf.sampling.optimize_schedule(fn, path, cal_h, prediction="x0", steps=steps_h, solver="unipc",
                                         t_start=t0, init="karras", iters=SEARCH_ITERS, objective="global")
    x, _ = gf.sample(fn, path, x_test, prediction="x0", solver="unipc", schedule=ts_h)
    e = np.sqrt(np.mean((np.asarray(x) - ref_test) ** 2, axis=1)) / scale
    flips = int(np.sum(np.asarray(gm.nearest_component(x)) != np.asarray(gm.nearest_component(jnp.asarray(ref_test)))))
    print(f"hard fraction {hard:.2f}: rms {np.sqrt(np.mean(e**2)):.2e}  median {np.median(e):.2e}  "
          f"99.9th percentile {np.quantile(e, 0.999):.2e}  flips {flips}")

# %% [markdown]
# **From pure noise** (`t_start = 1`, where flow-matching models start) the Karras grid first
# jumps from infinite noise to `sigma_max` (EDM's 80, set for data of standard deviation 0.5).
# At few steps that choice decides the accuracy: too low and the jump's error stays at any NFE,
# too high and the other steps are spread thin. `gf.sampling.karras_family` builds candidates over
# `rho` x `sigma_min` x `sigma_max` for `select_schedule`; the reference is the exact flow map
# from the same noise at infinite noise level.

# %%
with jax.enable_x64(True):
    ref_pure = np.asarray(g64.flow_map(jnp.asarray(eps, jnp.float64), 1.0, 0.0, path))
scale_pure = np.sqrt(np.mean((ref_pure - np.asarray(gm.mean)) ** 2))
cal_pure = jax.random.normal(jax.random.key(2), (128, 16))
grids, params = gf.sampling.karras_family(path, steps)
ts_pure, errs = gf.sampling.select_schedule(fn, path, cal_pure, grids, prediction="x0", solver="unipc",
                                            return_errors=True)
print("selected:", params[int(np.argmin(np.asarray(errs)))])
for name, ts in [("karras", gf.sampling.time_grid(path, steps, "karras")), ("selected", ts_pure)]:
    x, _ = gf.sample(fn, path, jnp.asarray(eps, jnp.float32), prediction="x0", solver="unipc", schedule=ts)
    e = np.sqrt(np.mean((np.asarray(x) - ref_pure) ** 2, axis=1)) / scale_pure
    print(f"{name:9s} unipc NFE {steps} from pure noise: rms {np.sqrt(np.mean(e**2)):.2e}  median {np.median(e):.2e}")

# %% [markdown]
# ## 3. A trained 2-D model, sampled by every solver
# Flow matching on the eight-Gaussians toy data with the scan-chunked training loop (a few
# seconds), then 10 steps of each solver from the same noise, on the grid uniform in t (the next
# cell shows why not EDM's Karras grid here); the titles give the NFE each used (singlestep and
# Heun-type solvers spend 2-3 per step). Stochastic samplers use their own noise and land on the
# data distribution rather than on the deterministic flow map; the reverse-SDE ones start at
# t = 0.999 (their drift is singular where alpha = 0). Which grid keeps 10 steps of them stable
# differs: the drift `alpha'/alpha = -1/(1 - t)` is stiff near t = 1, and ShARK, an explicit
# stochastic Runge-Kutta method, overshoots on the first step of the uniform grid, so its panel
# uses the grid uniform in log-SNR; Euler-Maruyama and pc are stable on the uniform grid and blow
# up on the log-SNR one. On an 8-component 2-D mixture oracle (eight Gaussians of std 0.2 at
# radius 2, 1,024 samples from t = 0.999), sliced W2 to the data at 10 steps, uniform / log-SNR
# grid: Euler-Maruyama 0.077 / 9.4, pc 0.12 / 9.3, ShARK 1.17 / 0.12; at 20 steps all are stable
# on both (0.09-0.17). With the trained network of the figure below (its titles give sliced W2 to the
# data), the 10-step SDE samplers land further from the data than the ODE solvers (0.26-0.30 for pc and Euler-Maruyama, 0.15 for ShARK,
# against 0.10-0.11): their 10 steps of noise are not averaged out, while the ODE solvers follow
# the network's flow.

# %%
model = gf.nets.MLP(hidden=(128, 128, 128), time_embedding="identity")
params = model.init(jax.random.key(3), jnp.zeros((1, 2)), jnp.zeros((1,)))
opt = optax.adam(2e-3)
loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")
state = gf.train.init_state(params, opt, jax.random.key(4), ema_decays=(0.99,))
step = gf.train.make_train_step(loss_fn, opt)
state, history = gf.train.fit(state, step, lambda k: gf.data.eight_gaussians(k, 256), TRAIN_STEPS, chunk_size=500,
                              progress=False)
print(f"trained {TRAIN_STEPS} steps, compile {history['compile_time']:.1f}s, "
      f"final loss {float(history['loss'][-1]):.3f}")
net = gf.nets.model_fn(model, state.ema["0.99"])

# %%
noise = path.prior_sample(jax.random.key(5), (1024, 2))
data = gf.data.eight_gaussians(jax.random.key(6), 1024)
fig, axes = plt.subplots(4, 6, figsize=(16, 11))
for ax, (solver, spec) in zip(axes.ravel(), gf.sampling.solvers().items()):
    # the reverse-SDE drift is singular at alpha = 0; the adaptive solvers choose their own steps
    sde = spec.target == "sde" or solver == "pc"
    kw = dict(rtol=1e-3, atol=1e-3) if spec.adaptive else dict(steps=10, schedule="logsnr" if solver == "shark" else
                                                                "uniform")
    x, info = gf.sample(net, path, noise, prediction="velocity", solver=solver, key=jax.random.key(7),
                        t_start=0.999 if sde else 1.0, **kw)
    w2 = gf.metrics.sliced_w2(x, data, jax.random.key(8))
    ax.scatter(*np.asarray(data).T, s=1, c="0.8")
    ax.scatter(*np.asarray(x).T, s=1)
    ax.set_title(f"{solver}{' (log-SNR grid)' if solver == 'shark' else ''}: NFE {int(info.nfe)}, SW2 {float(w2):.3f}", fontsize=9)
    ax.set_xlim(-3.5, 3.5); ax.set_ylim(-3.5, 3.5); ax.set_aspect("equal"); ax.set_xticks([]); ax.set_yticks([])
for ax in axes.ravel()[len(gf.sampling.solvers()):]:
    ax.axis("off")
fig.suptitle("eight Gaussians, 10 steps per solver (Diffrax's adaptive ones: rtol = atol = 1e-3)")
fig.tight_layout()

# %% [markdown]
# How far are 10 steps from the trained model's own flow map? The reference is an adaptive
# Dopri5 solve of the network (rtol = atol = 1e-6). EDM's default Karras grid (first finite noise
# level 80, then spread down to 0.002) suits this unit-scale data poorly: with it the figure above
# would have sliced W2 0.32 for UniPC and DPM-Solver++ 2M, against 0.10 on its uniform grid.
# `select_schedule` picks, on separate calibration noise, among `karras_family`'s grids and the
# uniform grid.

# %%
x_ref, _ = gf.sample(net, path, noise, prediction="velocity", solver="dopri5", rtol=1e-6, atol=1e-6)
cal_net = path.prior_sample(jax.random.key(10), (256, 2))
grids, params = gf.sampling.karras_family(path, 10)
grids, params = grids + [gf.sampling.time_grid(path, 10, "uniform")], params + ["uniform"]
for solver in ("unipc", "deis", "dpm++2m"):
    ts, errs = gf.sampling.select_schedule(net, path, cal_net, grids, prediction="velocity", solver=solver,
                                           return_errors=True)
    rms = {}
    for name, g in (("karras", gf.sampling.time_grid(path, 10, "karras")), ("uniform", grids[-1]), ("selected", ts)):
        x, _ = gf.sample(net, path, noise, prediction="velocity", solver=solver, schedule=g)
        rms[name] = float(jnp.sqrt(jnp.mean((x - x_ref) ** 2)))
    print(f"{solver:8s} NFE 10, rms to the exact flow map: " + ", ".join(f"{k} {v:.2e}" for k, v in rms.items())
          + f"  (selected: {params[int(np.argmin(np.asarray(errs)))]})")

# %% [markdown]
# `gf.sample` builds the time grid and the solver's grid coefficients on the host once and keeps
# them for repeat calls with the same arguments, so a loop over batches pays for them once. It can
# also be called inside your own `jax.jit` (with the path closed over, the parameters as an
# argument): the whole sampler is then one dispatch, and new parameters reuse the compiled program.

# %%
sample_jit = jax.jit(lambda p, x: gf.sample(gf.nets.model_fn(model, p), path, x, prediction="velocity", solver="unipc",
                                            steps=10, schedule="uniform")[0])
x_call, _ = gf.sample(net, path, noise, prediction="velocity", solver="unipc", steps=10, schedule="uniform")
x_jit = sample_jit(state.ema["0.99"], noise)
print(f"max |jit - call| = {float(jnp.max(jnp.abs(x_jit - x_call))):.1e}")


def ms_per_call(f, n=50):
    f().block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        out = f()
    out.block_until_ready()
    return (time.perf_counter() - t0) / n * 1e3


t_call = ms_per_call(lambda: gf.sample(net, path, noise, prediction="velocity", solver="unipc", steps=10,
                                       schedule="uniform")[0])
t_jit = ms_per_call(lambda: sample_jit(state.ema["0.99"], noise))
print(f"unipc, 10 steps, batch {noise.shape[0]}: gf.sample {t_call:.2f} ms per call, inside jax.jit {t_jit:.2f} ms")

# %% [markdown]
# Samples are differentiable in the noise and in the parameters: under `jax.grad` (or `jax.jit`,
# `jax.vmap`) `gf.sample` runs its steps in a `lax.scan` that reverse mode can differentiate. Below,
# D-Flow style, the noise itself is optimized through a 10-step sampler so that the samples land
# on one of the eight modes, with a penalty that keeps the noise plausible under the N(0, I) prior.

# %%
right = (data[:, 0] > 1.7) & (jnp.abs(data[:, 1]) < 0.7)
target = jnp.sum(data * right[:, None], axis=0) / jnp.sum(right)  # the centre of the rightmost mode
z0 = noise[:256]


def steer_loss(z):
    x, _ = gf.sample(net, path, z, prediction="velocity", solver="unipc", steps=10, schedule="uniform")
    return jnp.mean(jnp.sum((x - target) ** 2, axis=1)) + 0.1 * jnp.mean(jnp.sum(z ** 2, axis=1))


opt_z = optax.adam(0.05)


@jax.jit
def steer_step(z, s):
    loss, g = jax.value_and_grad(steer_loss)(z)
    u, s = opt_z.update(g, s)
    return optax.apply_updates(z, u), s, loss


z, s = z0, opt_z.init(z0)
for i in range(60):
    z, s, loss = steer_step(z, s)
before, _ = gf.sample(net, path, z0, prediction="velocity", solver="unipc", steps=10, schedule="uniform")
after, _ = gf.sample(net, path, z, prediction="velocity", solver="unipc", steps=10, schedule="uniform")
near = lambda x: float(jnp.mean(jnp.linalg.norm(x - target, axis=1) < 0.5))
print(f"samples within 0.5 of {np.asarray(target).round(2)}: {near(before):.2f} -> {near(after):.2f}; "
      f"final loss {float(loss):.3f}; noise norm {float(jnp.mean(jnp.linalg.norm(z0, axis=1))):.2f} -> "
      f"{float(jnp.mean(jnp.linalg.norm(z, axis=1))):.2f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
for ax, x, title in ((axes[0], before, "samples of the initial noise"), (axes[1], after, "after 60 steps on the noise")):
    ax.scatter(*data.T, s=2, c="0.8")
    ax.scatter(*x.T, s=4)
    ax.scatter(*target, marker="x", c="k", s=60)
    ax.set_title(title)
plt.show()

# %% [markdown]
# The same holds in the model's parameters (training through the sampler, or fitting a model to
# its samples' statistics). A check with a known answer: the "model" is the exact velocity of
# `N(mu, diag(s^2))` with the mean `mu` as its parameter. On the linear path its flow map is
# `x0 = mu + s * z`, so the gradient of `mean ||x0 - goal||^2` in `mu` is
# `2 (mu + s mean(z) - goal)`. `jax.grad` through an 8-step Heun sample gives it to Heun's
# discretization error.

# %%
p_lin, s_std, goal = gf.paths.linear(), jnp.array([0.5, 1.5]), jnp.array([1.0, -2.0])
z_g = jax.random.normal(jax.random.key(40), (512, 2))


def sample_loss(mu):  # mu: the parameter of the model fn_mu
    fn_mu = gf.oracles.Gaussian.diagonal(mu, s_std ** 2).model(p_lin, "velocity")
    x, _ = gf.sample(fn_mu, p_lin, z_g, prediction="velocity", solver="heun", steps=8)
    return jnp.mean(jnp.sum((x - goal) ** 2, axis=1))


mu0 = jnp.array([0.3, 0.4])
g_sample, g_exact = jax.grad(sample_loss)(mu0), 2 * (mu0 + s_std * jnp.mean(z_g, axis=0) - goal)
print(f"d loss / d mu: through gf.sample {np.asarray(g_sample).round(4)}, exact {np.asarray(g_exact).round(4)}, "
      f"max |difference| {float(jnp.max(jnp.abs(g_sample - g_exact))):.1e}")
assert float(jnp.max(jnp.abs(g_sample - g_exact))) < 1e-2 * float(jnp.max(jnp.abs(g_exact)))

# %% [markdown]
# ## 4. Guidance
# Guidance transformers take model functions and return one. With two Gaussian "classes" of
# equal covariance, classifier-free guidance at scale `w` is exactly the Gaussian with mean
# `mu_u + w (mu_c - mu_u)`. The scale is a traced leaf: the sweep below compiles the sampler once.

# %%
cov = jnp.array([[0.3, 0.1], [0.1, 0.2]])
cond = gf.oracles.Gaussian.full(jnp.array([1.5, 0.5]), cov)
uncond = gf.oracles.Gaussian.full(jnp.array([-0.5, 0.0]), cov)
z = jax.random.normal(jax.random.key(9), (512, 2))
fig, ax = plt.subplots(figsize=(5, 4))
for w in [0.0, 1.0, 2.0, 3.0]:
    guided = gf.guidance.interval(gf.guidance.cfg(cond.model(path, "eps"), uncond.model(path, "eps"), w), 0.0, 1.0)
    x, _ = gf.sample(guided, path, z, prediction="eps", solver="dpm++3m", steps=20, schedule="logsnr",
                     t_start=0.999)
    ax.scatter(*np.asarray(x).T, s=2, label=f"w = {w}: mean {np.round(np.asarray(x.mean(0)), 2)}")
ax.legend(fontsize=7); ax.set_title("classifier-free guidance scale sweep");

# %% [markdown]
# **Where and when to guide.** `interval(g, t_lo, t_hi)` guides only for `t_lo < t <= t_hi` and
# evaluates the conditional model alone elsewhere (Kynkaanniemi et al. 2024). `adaptive(g,
# threshold)` stops guiding a sample once its conditional and unconditional predictions agree
# (cosine similarity above the threshold; Castillo et al. 2023). Both shift the guided mean less
# than guidance at all times, at scale 3:

# %%
g3 = gf.guidance.cfg(cond.model(path, "eps"), uncond.model(path, "eps"), 3.0)
for name, f in [("no guidance (w = 1)", cond.model(path, "eps")), ("w = 3 at all t", g3),
                ("w = 3 on (0.2, 0.7]", gf.guidance.interval(g3, 0.2, 0.7)),
                ("w = 3, adaptive 0.99", gf.guidance.adaptive(g3, 0.99))]:
    x, _ = gf.sample(f, path, z, prediction="eps", solver="dpm++3m", steps=20, schedule="logsnr", t_start=0.999)
    print(f"{name:22s} mean {np.round(np.asarray(x.mean(0)), 2)}  std {np.round(np.asarray(x.std(0)), 2)}")

# %% [markdown]
# **One network call for both branches.** A network trained with condition dropout is one
# function `fn(x, t, c)`; `gf.guidance.cfg_batched(fn, y, null, scale)` calls it once on the
# doubled batch `[x; x]` with conditions `[y; null]`, where `cfg` makes two calls. Below, the two
# Gaussians as one labelled network (label 1: conditional, label 0: the null label), which records
# the batch size of each call -- when it runs, and when `gf.sample` traces it to compile. A sweep of
# the scale traces it only on the first call (the scale is a traced leaf: the compiled sampler is
# reused), each scale lands on the exact guided mean `mu_u + w (mu_c - mu_u)`, and the batched and
# the two-call guidance give the same samples (to 1e-5).

# %%
calls = []


def labelled_net(x, t, c):  # label 1: the conditional model, label 0: the unconditional one
    calls.append(x.shape[0])
    return jnp.where((c == 1)[:, None], cond.model(path, "eps")(x, t), uncond.model(path, "eps")(x, t))


kw_g = dict(prediction="eps", solver="dpm++3m", steps=20, schedule="logsnr", t_start=0.999)
for w in (0.5, 1.5, 3.0, 4.5):
    calls.clear()
    x, _ = gf.sample(gf.guidance.cfg_batched(labelled_net, 1, 0, w), path, z, **kw_g)
    print(f"scale {w}: {len(calls)} network traces, mean {np.round(np.asarray(x.mean(0)), 2)}")
    assert (len(calls) > 0) == (w == 0.5)  # traced (compiled) on the first scale only
    assert np.allclose(x.mean(0), uncond.mean + w * (cond.mean - uncond.mean), atol=0.1)
two_calls = gf.guidance.cfg(lambda x, t: labelled_net(x, t, jnp.ones(x.shape[:1], jnp.int32)),
                            lambda x, t: labelled_net(x, t, jnp.zeros(x.shape[:1], jnp.int32)), w)
for name, f in [("cfg", two_calls), ("cfg_batched", gf.guidance.cfg_batched(labelled_net, 1, 0, w))]:
    calls.clear()
    f(z, jnp.full(z.shape[:1], 0.5))
    print(f"{name:11s}: network calls per evaluation, batch sizes {calls}")
diff = float(jnp.max(jnp.abs(gf.sample(two_calls, path, z, **kw_g)[0] - x)))
print(f"max |cfg - cfg_batched| over the samples at scale {w}: {diff:.1e}")
assert diff < 1e-4

# %% [markdown]
# **Classifier guidance** adds `scale * grad log p(y | x_t)` to the score of an unconditional
# model, in whatever prediction kind the model has. Here the data are a two-component mixture
# (weights 0.7 / 0.3) and the classifier is the exact `p(component | x_t)`, from each component's
# closed-form noisy marginal: at scale 1 the guided velocity model is exactly component 1's, so
# the samples land there (mean `(1.5, 0.5)`, standard deviations `(0.55, 0.45)`); a larger scale
# sharpens them further. The samplers start from pure noise (`t = 1`, where `alpha = 0`), where
# the guidance term is evaluated as its limit.

# %%
mix2 = gf.oracles.GaussianMixture(jnp.log(jnp.array([0.7, 0.3])), jnp.array([[-1.5, 0.0], [1.5, 0.5]]),
                                  jnp.array([[0.2, 0.3], [0.3, 0.2]]))
components = [gf.oracles.Gaussian.diagonal(mix2.means[k], mix2.vars[k]) for k in range(2)]


def component_logits(x, t):  # log p(k) + log p_t(x | k): logits of the exact noisy classifier
    return jnp.stack([mix2.logits[k] + components[k].log_prob(x, t, path) for k in range(2)], -1)


x1_pure = path.prior_sample(jax.random.key(20), (1024, 2))
fig, ax = plt.subplots(figsize=(5, 4))
for cg_scale in (0.0, 1.0, 3.0):
    f = gf.guidance.classifier(mix2.model(path, "velocity"), path, "velocity", component_logits, 1, cg_scale)
    x, info = gf.sample(f, path, x1_pure, prediction="velocity", solver="heun", steps=20)
    share = float(jnp.mean(mix2.nearest_component(x) == 1))
    print(f"classifier scale {cg_scale}: {share:.1%} in component 1, mean {np.round(np.asarray(x.mean(0)), 2)}, "
          f"std {np.round(np.asarray(x.std(0)), 2)}")
    ax.scatter(*np.asarray(x).T, s=2, label=f"scale {cg_scale}: {share:.0%} in component 1")
ax.set_xlabel("x[0]"); ax.set_ylabel("x[1]"); ax.legend(fontsize=7)
ax.set_title("classifier guidance towards component 1 (exact classifier)");

# %% [markdown]
# **CADS** (Sadat et al. 2024) anneals the condition: at high noise the conditional branch sees
# the condition mixed with noise, restored towards the data end, to trade a little alignment for
# diversity at high guidance scales. The conditional model below is exact for data `N(y, 0.05 I)`
# given a continuous condition `y` (the unconditional one is `y = 0`); at scale 4:

# %%
def cond_net(x, t, y, var=0.05):  # the exact eps of data N(y, var I) on the linear path
    a, s = (1 - t)[:, None], t[:, None]
    x0 = y + a * var / (a * a * var + s * s) * (x - a * y)
    return (x - a * x0) / s


y_cond = jnp.broadcast_to(jnp.array([1.0, 1.0]), (512, 2))
uncond_net = lambda x, t: cond_net(x, t, jnp.zeros_like(x))  # noqa: E731
for name, c in [("cfg w = 4", lambda x, t: cond_net(x, t, y_cond)),
                ("cfg w = 4 + CADS", gf.guidance.cads(cond_net, y_cond, jax.random.key(21), noise_scale=0.5,
                                                      rescale=False))]:
    x, _ = gf.sample(gf.guidance.cfg(c, uncond_net, 4.0), path, z, prediction="eps", solver="dpm++2m", steps=20,
                     schedule="logsnr", t_start=0.999)
    print(f"{name:17s} mean {np.round(np.asarray(x.mean(0)), 2)}  std {np.round(np.asarray(x.std(0)), 3)}")

# %% [markdown]
# ## 5. A solver of one's own
# A solver is one entry of `gf.sampling.solvers()`: a `gf.sampling.SolverSpec` with its name,
# order, stochasticity, NFE per step and a `run(model, ts, x, key, **kw) -> (x, nfe, trajectory,
# stats)` that integrates from `ts[0]` down to `ts[-1]`, where `model` is a `gf.sampling.Model`
# (`model.velocity(x, t)`, `model.x0_eps(x, t)`, `model.predict(x, t, kind)`). `gf.sampling.register`
# adds one from user code; `gf.sample(..., solver=name)` then runs it with every path, prediction
# kind and time grid, and `gf.sampling.unregister` removes it. Below, classical Runge-Kutta 4
# written by hand (one `lax.scan` over the grid), and any Diffrax ODE solver through
# `gf.sampling.diffrax_solver` -- here Bogacki-Shampine 3(2), order and NFE read from its tableau.
# Their orders are fitted on the Gaussian oracle of the quickstart (eps model, `vp_cosine` path,
# from pure noise), in float64 (in float32, RK4 reaches the rounding floor from about 16 steps):
# 4.22 and 3.05 on 8-32 steps.

# %%
import diffrax


def rk4(model, ts, x, key, *, save_trajectory, **_):  # (**_: rtol, atol, max_steps, for adaptive solvers)
    def step(x, t_pair):
        t, s = t_pair
        h = s - t  # < 0: from noise towards data
        k1 = model.velocity(x, t)
        k2 = model.velocity(x + h / 2 * k1, t + h / 2)
        k3 = model.velocity(x + h / 2 * k2, t + h / 2)
        k4 = model.velocity(x + h * k3, s)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x, x

    x_last, xs = jax.lax.scan(step, x, (ts[:-1], ts[1:]))
    return x_last, 4 * (ts.shape[0] - 1), jnp.concatenate([x[None], xs]) if save_trajectory else None, {}


# (overwrite=True: re-running the cell replaces this notebook's own solvers; built-in names are never replaced)
# (evaluates_at_end: k4 is taken at the step's end, so an x0 model on a grid ending at sigma = 0 is
# refused with a clear error instead of giving NaN; options / traced_options declare keyword options)
gf.sampling.register(gf.sampling.SolverSpec("rk4", order=4, stochastic=False, nfe_per_step=4, adaptive=False,
                                            run=rk4, description="classical Runge-Kutta 4 in t (hand-written)",
                                            evaluates_at_end=True),
                     overwrite=True)
gf.sampling.register(gf.sampling.diffrax_solver("bosh3", diffrax.Bosh3()), overwrite=True)
for name in ("rk4", "bosh3"):
    s = gf.sampling.solvers()[name]
    print(f"solvers()[{name!r}]: order {s.order}, nfe/step {s.nfe_per_step}, {s.description}")

p_cos, step_counts = gf.paths.vp_cosine(), [8, 16, 32]
with jax.enable_x64(True):
    g2 = gf.oracles.Gaussian.full(jnp.array([1.0, -1.0]), jnp.array([[0.5, 0.2], [0.2, 0.3]]))  # float64 here
    x1_g = g2.prior_sample(jax.random.key(0), 256, p_cos, 1.0)
    exact_g = g2.flow_map(x1_g, 1.0, 0.0, p_cos)
    for name in ("rk4", "bosh3"):
        errs, nfe = [], []
        for n in step_counts:
            x, info = gf.sample(g2.model(p_cos, "eps"), p_cos, x1_g, prediction="eps", solver=name, steps=n)
            errs.append(float(jnp.sqrt(jnp.mean((x - exact_g) ** 2))))
            nfe.append(int(info.nfe))
        order = -np.polyfit(np.log(step_counts), np.log(errs), 1)[0]
        print(f"{name:5s} ({x.dtype}) steps {step_counts}, NFE {nfe}: rms error "
              f"{np.array2string(np.array(errs), precision=2)}, fitted order {order:.2f}")
        assert abs(order - gf.sampling.solvers()[name].order) < 0.4
for name in ("rk4", "bosh3"):
    gf.sampling.unregister(name)
assert not {"rk4", "bosh3"} & set(gf.sampling.solvers())

# %% [markdown]
# ## 6. Models from k-diffusion or EDM: a denoiser conditioned on the noise level
# Pretrained k-diffusion and EDM models are denoisers `D(z, sigma) = E[x0 | z]` for
# `z = x0 + sigma eps`: they take the noise level, not a time. On any Gaussian path,
# `x_t / alpha = x0 + (sigma / alpha) eps`, so `x0_hat = D(x_t / alpha, sigma / alpha)` exactly;
# `gf.param.from_sigma_denoiser(D, path)` is that `x0` model, and every solver and grid of genflow
# applies. Here `D` is the closed-form denoiser of a diagonal Gaussian (as an EDM network would be
# after training): on every path it equals the oracle's `x0` model, and sampled with DPM++(2M) it
# gives the oracle's samples.

# %%
mean_d, var_d = jnp.array([1.0, -0.5, 0.3]), jnp.array([0.2, 1.0, 0.5])
g_d = gf.oracles.Gaussian.diagonal(mean_d, var_d)


def edm_denoiser(z, sigma):  # D(z, sigma): z = x0 + sigma * eps, sigma: [B]
    return mean_d + var_d / (var_d + sigma[:, None] ** 2) * (z - mean_d)


x_d, t_d = jax.random.normal(jax.random.key(0), (5, 3)), jnp.linspace(0.05, 0.95, 5)
for name in gf.paths.names():
    p_d = gf.paths.get(name)
    gap = jnp.abs(gf.param.from_sigma_denoiser(edm_denoiser, p_d)(x_d, t_d) - g_d.x0(x_d, t_d, p_d)).max()
    print(f"{name:9s} max |D(x / alpha, sigma / alpha) - oracle x0| = {float(gap):.1e}")
    assert gap < 1e-5
x1_d = p_cos.prior_sample(jax.random.key(1), (256, 3))
kw = dict(prediction="x0", solver="dpm++2m", steps=10, schedule="karras")
samp_edm, _ = gf.sample(gf.param.from_sigma_denoiser(edm_denoiser, p_cos), p_cos, x1_d, **kw)
samp_oracle, _ = gf.sample(g_d.model(p_cos, "x0"), p_cos, x1_d, **kw)
print(f"DPM++(2M), 10 steps on vp_cosine: max |denoiser samples - oracle samples| = "
      f"{float(jnp.abs(samp_edm - samp_oracle).max()):.1e}")
assert jnp.abs(samp_edm - samp_oracle).max() < 1e-4

# %% [markdown]
# ## 7. Passing a model: partials, lambdas and what is compiled
# A sampler is compiled once per model *structure*. The arrays a model function uses -- bound by
# `gf.nets.model_fn` or `functools.partial`, or read by a plain function from its closure,
# defaults or module globals -- are traced arguments of that program, not constants in it: the
# program keeps no copy of them, and nothing keeps them alive once you drop the function. A
# partial (`model_fn`) shares one program across parameter sets. A plain function is keyed by
# identity, as `jax.jit` keys one: the same function object reuses its program and reads the
# current values of the arrays it uses (below: a global rebound from the raw to the EMA
# parameters), while a new lambda per call compiles anew.

# %%
import time as _time  # noqa: E402

kw = dict(prediction="velocity", solver="dpm++2m", steps=10)


def timed(label, fn):
    t0 = _time.perf_counter()
    out, _ = gf.sample(fn, path, noise, **kw)
    out.block_until_ready()
    print(f"{label:34s} {1e3 * (_time.perf_counter() - t0):7.1f} ms, sliced W2 to the data "
          f"{float(gf.metrics.sliced_w2(out, data, jax.random.key(0))):.3f}")


current = state.params
uses_global = lambda x, t: model.apply(current, x, t)  # noqa: E731
timed("global lambda, raw params", uses_global)
current = state.ema["0.99"]
timed("same lambda, global rebound to EMA", uses_global)
timed("model_fn(raw params)", gf.nets.model_fn(model, state.params))
timed("model_fn(EMA params): same program", gf.nets.model_fn(model, state.ema["0.99"]))
timed("a new lambda: compiled anew", lambda x, t: model.apply(state.params, x, t))
