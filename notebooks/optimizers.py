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
# # Optimizers as optax transforms
#
# `gf.optim` re-exports optax's and optax.contrib's optimizers (Adam, AMSGrad, clipping, MoMo,
# MoMo-Adam, AdEMAMix, schedule-free, ...) and adds four from recent papers, each an optax
# `GradientTransformation` in one file:
#
# | name | paper | update |
# |---|---|---|
# | `grams` | Cao et al. 2024 | Adam's magnitude, sign of the current gradient |
# | `fadam` | Hwang 2024 | momentum on the Fisher-preconditioned gradient, RMS clipping, weight decay through the Fisher |
# | `diffgrad` | Dubey et al. 2020 | Adam times `sigmoid(abs(g_prev - g))` |
# | `smb` | Birbil et al. 2024 | SGD step, and where it fails an Armijo test a model-building step from a second gradient |
#
# Each is checked against a reference implementation (pytorch_optimizer, the SMB authors' code)
# on recorded 50-step trajectories to 1e-5 relative (`tests/test_optim.py`).

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import genflow as gf

print(len(gf.optim.names()), "optimizers by name;", "genflow:", gf.optim.names("genflow"))
print("optax.contrib:", gf.optim.names("optax.contrib"))

# %% [markdown]
# ## 1. Any optimizer by name
# `gf.optim.get(name, **hparams)` builds optax, optax.contrib and genflow optimizers alike, for
# experiment configs; a typo gets the list of valid names.

# %%
opt = gf.optim.get("grams", learning_rate=1e-3, weight_decay=1e-4)
try:
    gf.optim.get("adma", learning_rate=1e-3)
except ValueError as e:
    print(str(e)[:160], "...")

# %% [markdown]
# ## 2. The new transforms on a small regression
# A 3-16-1 tanh MLP fit to `sin(x a) + x1 x2/2`, full batch, one `lax.scan` per optimizer. MoMo-Adam
# and SMB need the loss (`value=`) and SMB a way to re-evaluate it (`value_fn=`); the loop below
# passes both, exactly as `gf.train.make_train_step` does.

# %%
kx, ka, kp = jax.random.split(jax.random.key(0), 3)
X = jax.random.uniform(kx, (128, 3), minval=-1.5, maxval=1.5)
Y = (jnp.sin(X @ jax.random.normal(ka, (3,))) + 0.5 * X[:, 0] * X[:, 1])[:, None]
k1, k2 = jax.random.split(kp)
P0 = {"W1": jax.random.normal(k1, (3, 16)) / jnp.sqrt(3.0), "b1": jnp.zeros(16),
      "W2": jax.random.normal(k2, (16, 1)) / 4.0, "b2": jnp.zeros(1)}


def mse(p):
    return jnp.mean((jnp.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"] - Y) ** 2)


def train(opt, steps=300):
    tx = optax.with_extra_args_support(opt)

    def body(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(mse)(p)
        u, s = tx.update(g, s, p, value=loss, value_fn=mse)
        return (optax.apply_updates(p, u), s), loss

    (p, s), losses = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(P0)
    return losses, s


curves = {}
for name, o in {"adam": optax.adam(0.01), "momo_adam": gf.optim.momo_adam(0.01), "grams": gf.optim.grams(0.01),
                "fadam": gf.optim.fadam(0.01, weight_decay=0.0), "diffgrad": gf.optim.diffgrad(0.01),
                "sgd": optax.sgd(0.5), "smb": gf.optim.smb(0.5)}.items():
    curves[name], state = train(o)
print("SMB took", int(state.model_steps), "model steps out of 300")
gf.viz.curves(curves, ylabel="train MSE", logy=True, title="3-16-1 MLP regression, full batch");

# %% [markdown]
# ## 3. Composing: chains, schedules, masks, bfloat16
# The transforms are ordinary optax objects: clip first, warm up and decay the learning rate,
# keep weight decay off the biases, train in bfloat16.

# %%
schedule = optax.warmup_cosine_decay_schedule(0.0, 0.02, warmup_steps=30, decay_steps=300)
no_bias_decay = {"W1": True, "b1": False, "W2": True, "b2": False}
opt = optax.chain(optax.clip_by_global_norm(1.0), gf.optim.grams(schedule, weight_decay=1e-3, mask=no_bias_decay))
losses, _ = train(opt)
print(f"grams + clipping + warmup-cosine + masked decay: final MSE {float(losses[-1]):.4f}")

P0_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), P0)
opt = gf.optim.diffgrad(0.01)
g = jax.grad(lambda p: mse(jax.tree.map(lambda x: x.astype(jnp.float32), p)))(P0_bf16)
u, _ = opt.update(g, opt.init(P0_bf16), P0_bf16)
print("bfloat16 params -> updates of dtype", {k: str(v.dtype) for k, v in u.items()})

# %% [markdown]
# Schedule-free optimizers take their gradients at a point `y` and keep an average `x`, the point
# to evaluate. `TrainState.params` (and the EMA copies) hold `y`; `gf.train.eval_params(state)`
# returns `x`, wherever the schedule-free state sits in the optimizer (here behind clipping).
# The average pays off with noisy (minibatch) gradients; on this full-batch problem the two are
# close, and `y` is a little ahead.

# %%
opt = gf.train.make_optimizer(0.02, name="schedule_free_adamw", warmup_steps=30, clip_norm=1.0)
st = gf.train.init_state(P0, opt, jax.random.key(0))
st, _ = gf.train.fit(st, gf.train.make_train_step(lambda p, b, k: (mse(p), {}), opt), lambda k: jnp.zeros(()), 300,
                     progress=False)
print(f"schedule_free_adamw: MSE at y (state.params) {float(mse(st.params)):.4f}, "
      f"at x (eval_params) {float(mse(gf.train.eval_params(st))):.4f}")

# %% [markdown]
# With noisy gradients, `x` is the point to evaluate. Below, `schedule_free_sgd` takes gradients of
# 8-point minibatches. `gf.optim.schedule_free_eval_params(state, params)` (optax.contrib's, which
# `gf.train.eval_params` calls) recovers `x` from `y` and the SGD iterate `z` kept in the state:
# `z` takes the noisy SGD steps, `x` is their running average (weighted by the learning rate squared,
# so warm-up steps count less), and `y = (1 - b1) z + b1 x`, where the gradients are taken, sits between
# the two. The full-batch loss at `y` and at `x`: over the last 50 steps 0.074 at `y` and 0.057 at
# `x`, which also misses `y`'s spikes.

# %%
def train_sf(opt, batch=8, steps=300):
    """Minibatch training; returns the final (params, state) and the full-batch MSE at y and at x."""
    def body(carry, key):
        p, s = carry
        idx = jax.random.randint(key, (batch,), 0, X.shape[0])
        g = jax.grad(lambda q: jnp.mean((jnp.tanh(X[idx] @ q["W1"] + q["b1"]) @ q["W2"] + q["b2"] - Y[idx]) ** 2))(p)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (mse(p), mse(gf.optim.schedule_free_eval_params(s, p)))

    return jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), jax.random.split(jax.random.key(3), steps)))(P0)


b1 = 0.9
(p_y, sf_state), (loss_y, loss_x) = train_sf(gf.optim.schedule_free_sgd(1.0, warmup_steps=30, b1=b1))
p_x = gf.optim.schedule_free_eval_params(sf_state, p_y)
assert all(jnp.allclose(p_y[k], (1 - b1) * sf_state.z[k] + b1 * p_x[k], atol=1e-5) for k in P0)  # y between z and x
print(f"schedule_free_sgd, 8-point minibatches: full-batch MSE over the last 50 steps {float(loss_y[-50:].mean()):.4f} "
      f"at y, {float(loss_x[-50:].mean()):.4f} at x")
assert loss_x[-50:].mean() < loss_y[-50:].mean()
gf.viz.curves({"at y (state.params)": loss_y, "at x (schedule_free_eval_params)": loss_x}, ylabel="full-batch MSE",
              logy=True, smooth=10, title="schedule_free_sgd on minibatches of 8");

# %% [markdown]
# ## 4. SMB in the train step
# `gf.train.make_train_step` hands the optimizer `value=loss` and `value_fn(params)`, which
# re-evaluates the loss on the *same* batch and PRNG key. SMB calls it at its trial point (one
# forward pass) and, when the Armijo test fails, differentiates it there (one backward pass).
# Below: flow matching on two moons with SMB and with plain SGD at the same step size.

# %%
path = gf.paths.linear()
model = gf.nets.MLP(hidden=(64, 64, 64), time_embedding="identity")
params = model.init(jax.random.key(1), jnp.zeros((1, 2)), jnp.zeros((1,)))
loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")
hist = {}
for name, o in {"sgd 0.5": optax.sgd(0.5), "smb 0.5": gf.optim.smb(0.5)}.items():
    st = gf.train.init_state(jax.tree.map(jnp.array, params), o, jax.random.key(2))
    try:
        st, h = gf.train.fit(st, gf.train.make_train_step(loss_fn, o), lambda k: gf.data.moons(k, 256), 600,
                             chunk_size=300, progress=False)
        hist[name] = h["loss"]
        extra = f", model steps {int(st.opt_state.model_steps)}" if name.startswith("smb") else ""
        print(f"{name}: final loss {np.mean(h['loss'][-100:]):.3f}{extra}")
    except gf.train.NonFiniteLossError as e:
        hist[name] = e.history["loss"]
        print(f"{name}: diverged at step {e.step}")
gf.viz.curves(hist, ylabel="flow-matching loss", logy=True, smooth=20, title="flow matching on moons: SMB vs SGD");

# %% [markdown]
# ## 5. Learning-rate sensitivity, in miniature
# The MoMo paper's claim: MoMo's Polyak-type step makes SGD-M far less sensitive to the learning
# rate. A 64-64-10 MLP on the 8x8 digits, 200 steps, trained at 9 learning rates in one vmapped
# program per optimizer. `experiments/optimizers.py` runs the full version (two tasks, ten
# optimizers, 13 learning rates) and quantifies the flatness. In this miniature the two curves
# coincide up to lr ~ 3 and differ only at lr = 10, where SGD-M diverges (within 0.02 of the best
# at 4 vs 3 of the 9 learning rates): a modest effect here, not a demonstration of the paper's claim.

# %%
import flax.linen as nn  # noqa: E402

xtr, ytr = map(jnp.asarray, gf.data.load_digits("train", channels_last=False))
xte, yte = map(jnp.asarray, gf.data.load_digits("test", channels_last=False))
net = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(10)])
p_digits = net.init(jax.random.key(0), xtr[:1])


def xent(p, batch, key):
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y)), {}


def sweep(factory, lrs, steps=200):
    def one(lr):
        opt = factory(lr)
        step = gf.train.make_train_step(xent, opt)

        def body(st, _):
            idx = jax.random.randint(gf.train.batch_key(st.rng), (128,), 0, xtr.shape[0])
            return step(st, (xtr[idx], ytr[idx]))[0], None

        st = jax.lax.scan(body, gf.train.init_state(p_digits, opt, jax.random.key(1)), None, length=steps)[0]
        return jnp.mean(jnp.argmax(net.apply(st.params, xte), -1) == yte)

    return np.asarray(jax.jit(jax.vmap(one))(lrs))


lrs = jnp.logspace(-3, 1, 9)
# SGD-M in the EMA form MoMo builds on (d = 0.9 d + 0.1 g): MoMo = SGD-M with a Polyak cap on the step
acc = {"SGD-M": sweep(lambda lr: optax.sgd(0.1 * lr, momentum=0.9), lrs),
       "MoMo": sweep(lambda lr: gf.optim.momo(lr, beta=0.9), lrs)}
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, a in acc.items():
    ax.plot(lrs, a, "o-", label=name)
    print(f"{name}: test accuracy >= best - 0.02 at {int(np.sum(a >= a.max() - 0.02))} of {len(lrs)} learning rates")
ax.set_xscale("log"); ax.set_xlabel("learning rate"); ax.set_ylabel("test accuracy"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title("digits MLP, 200 steps: accuracy vs learning rate");

# %% [markdown]
# ## 6. More of optax and optax.contrib, on the regression of section 2
# Four more of the re-exports, each one line: `amsgrad` (Adam with the running maximum of the second
# moment, so no coordinate's step size ever grows), `ademamix` (Adam plus a slow EMA of the gradients,
# `b3 = 0.9999`, mixed in with weight `alpha = 5`; the paper ramps `alpha` and `b3` up over training,
# which both accept as schedules), `simplified_ademamix` (one accumulator `m = b1 m + g`, a sum, not an
# average, so its learning rate is Adam's times `1 - b1`: 1e-4 here) and `clip_by_block_rms`, which
# clips each parameter block's (leaf's) RMS, here the gradient's before SGD. Adam and SGD are section 2's.
# Final MSE after 300 steps: AdEMAMix tracks Adam (0.030 vs 0.031: its slow EMA is not
# bias-corrected, so after 300 of its ~10,000-step horizon it weighs little), AMSGrad is slower
# (0.080), simplified AdEMAMix slower still (0.24: its un-normalised sum `m` takes ~100 steps to
# build up, so its early steps are small), and clipping each block's gradient to RMS 0.02 steadies
# SGD at 0.5 (0.056 against 0.118, without the oscillations).

# %%
g0 = jax.grad(mse)(P0)
clipped, _ = gf.optim.clip_by_block_rms(0.02).update(g0, optax.EmptyState())


def rms(v):
    return float(jnp.sqrt(jnp.mean(v * v)))


# each block clipped to RMS 0.02 (b1's gradient, already below, unchanged)
assert all(rms(clipped[k]) <= 0.02 * (1 + 1e-6) and (rms(g0[k]) > 0.02 or jnp.array_equal(clipped[k], g0[k])) for k in P0)
print("gradient RMS per block:", {k: round(rms(v), 4) for k, v in g0.items()}, "clipped:",
      {k: round(rms(v), 4) for k, v in clipped.items()})
more = {"adam": curves["adam"], "amsgrad": train(gf.optim.amsgrad(0.01))[0], "ademamix": train(gf.optim.ademamix(0.01))[0],
        "simplified_ademamix": train(gf.optim.simplified_ademamix(1e-4))[0], "sgd": curves["sgd"],
        "clip_by_block_rms + sgd": train(optax.chain(gf.optim.clip_by_block_rms(0.02), optax.sgd(0.5)))[0]}
for name, losses in more.items():
    assert losses[-1] < losses[0] / 3, name
print("final MSE:", {k: round(float(v[-1]), 4) for k, v in more.items()})
gf.viz.curves(more, ylabel="train MSE", logy=True, title="3-16-1 MLP regression: more optax / optax.contrib");

# %% [markdown]
# ## 7. An optimizer of one's own
# `gf.optim.register(name, factory)` makes a factory of your own available by name to `gf.optim.get`
# and `gf.train.make_optimizer` (its warm-up, decay and clipping); `names("user")` lists such names,
# `source(name)` says where a name comes from, `unregister` removes one, and a built-in name cannot be
# taken. The example: SGD with momentum whose update is rescaled to unit RMS in each parameter block
# (block-normalized gradient, Yu et al. 2017), an optax `GradientTransformation` written from `init` and
# `update`. `make_optimizer` hands the factory its learning rate as an optax schedule, so the factory
# scales with `optax.scale_by_learning_rate` rather than multiplying by it. The check: the first update
# of each block has RMS equal to the learning rate. Then the name goes through `make_optimizer` and the
# train step, next to AdamW built the same way.
# Both descend; `normalized_sgd` ends lower (0.011 against AdamW's 0.037) on a noisier way: its
# unit-RMS step does not shrink with the gradient, only with the cosine decay.

# %%
def scale_by_block_normalized_momentum(momentum=0.9, eps=1e-12):
    """Momentum, with each parameter block's (leaf's) update rescaled to unit RMS."""
    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, m, params=None):
        m = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, m, grads)
        return jax.tree.map(lambda v: v / (jnp.sqrt(jnp.mean(v * v)) + eps), m), m

    return optax.GradientTransformation(init, update)


def normalized_sgd(learning_rate, momentum=0.9):
    return optax.chain(scale_by_block_normalized_momentum(momentum), optax.scale_by_learning_rate(learning_rate))


gf.optim.register("normalized_sgd", normalized_sgd, overwrite=True)  # (overwrite: re-running this cell)
print("user optimizers:", gf.optim.names("user"), "| source:", gf.optim.source("normalized_sgd"))
try:
    gf.optim.register("adam", normalized_sgd)
except ValueError as e:
    print(e)
tx = gf.optim.get("normalized_sgd", learning_rate=0.1)
u, _ = tx.update(g0, tx.init(P0), P0)
assert all(abs(rms(u[k]) - 0.1) < 1e-6 for k in P0)

own = {}
for name in ("adamw", "normalized_sgd"):
    opt = gf.train.make_optimizer(0.02, name=name, warmup_steps=30, decay_steps=300, clip_norm=1.0)
    st = gf.train.init_state(P0, opt, jax.random.key(0))
    st, h = gf.train.fit(st, gf.train.make_train_step(lambda p, b, k: (mse(p), {}), opt), lambda k: jnp.zeros(()), 300,
                         progress=False)
    own[name] = h["loss"]
    print(f"{name}: MSE {float(mse(P0)):.3f} -> {float(mse(st.params)):.4f}")
assert own["normalized_sgd"][-1] < own["normalized_sgd"][0] / 10
gf.optim.unregister("normalized_sgd")
assert "normalized_sgd" not in gf.optim.names()
gf.viz.curves(own, ylabel="train MSE", logy=True, title="make_optimizer(0.02, name=..., warm-up 30, cosine decay)");
