"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set
before jax is imported, so this cannot run inside the main pytest process).

Trains a tiny model a few steps on one device and on (data, fsdp) meshes, and saves a checkpoint
from a 4-device mesh that is then restored onto 8 devices and 1 device. Prints one JSON line of
measured differences; the test module asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharding_checks.py OUT_DIR
"""

import contextlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genflow as gf

out_dir = sys.argv[1]
assert jax.device_count() == 8, jax.devices()

D, B, STEPS = 16, 32, 3
MIN = 64  # shard every array with >= 64 elements (real runs use 2**14)
model = gf.nets.MLP(hidden=(64, 64), time_dim=16)
path = gf.paths.linear()
params = model.init(jax.random.key(0), jnp.zeros((1, D)), jnp.zeros((1,)))
# adam's first steps move each coordinate by ~lr * g/|g|: float noise in a near-zero gradient
# coordinate (summation order differs across devices) would be amplified to O(lr); eps bounds that.
opt = optax.adam(1e-2, eps=1e-3)
rng = np.random.default_rng(0)
batches = [rng.normal(size=(B, D)).astype(np.float32) for _ in range(STEPS)]
mu = jnp.arange(D, dtype=jnp.float32) / D


def fresh():
    return gf.train.init_state(jax.tree.map(jnp.array, params), opt, jax.random.key(1), ema_decays=(0.9,))


def train(mesh, on_device=False, grad_accum=1):
    loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")
    step = gf.train.make_train_step(loss_fn, opt, grad_accum=grad_accum)
    data = (lambda k: mu + jax.random.normal(k, (B, D))) if on_device else iter(batches)
    state, hist = gf.train.fit(fresh(), step, data, STEPS, chunk_size=STEPS, progress=False, mesh=mesh,
                               min_shard_size=MIN)
    return state, hist


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare(ref, got):
    (s0, h0), (s1, h1) = ref, got
    return {"loss": float(np.max(np.abs(h0["loss"] - h1["loss"]))),
            "loss_scale": float(np.max(np.abs(h0["loss"]))),
            "grad_norm": float(np.max(np.abs(h0["grad_norm"] - h1["grad_norm"]) / h0["grad_norm"])),
            "params": max_diff(s0.params, s1.params),
            "opt_state": max_diff(s0.opt_state, s1.opt_state),
            "ema": max_diff(s0.ema, s1.ema),
            "param_change": max_diff(s0.params, params),
            "rng_equal": bool(np.array_equal(jax.random.key_data(s0.rng), jax.random.key_data(s1.rng))),
            "step": int(s1.step)}


report = {"devices": jax.device_count()}
single = train(None)
single_dev = train(None, on_device=True)
single_acc = train(None, grad_accum=2)
for name, shape in {"data": (8, 1), "fsdp": (1, 8), "both": (2, 4)}.items():
    mesh = gf.train.make_mesh(*shape)
    got = train(mesh)
    report[name] = compare(single, got)
    if name == "both":
        report[name + "_on_device"] = compare(single_dev, train(mesh, on_device=True))
        report[name + "_grad_accum"] = compare(single_acc, train(mesh, grad_accum=2))
    state = got[0]
    kernel = state.params["params"]["Dense_0"]["kernel"]
    report[name]["kernel_spec"] = str(kernel.sharding.spec)
    report[name]["kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
    report[name]["adam_mu_spec"] = str(state.opt_state[0].mu["params"]["Dense_0"]["kernel"].sharding.spec)
    report[name]["bias_spec"] = str(state.params["params"]["Dense_2"]["bias"].sharding.spec)

# An on-device batch of 12 rows on 8 devices: host batches are refused, and so must batch_fn's
# be (XLA padded it or split it over "data" only)
refused = []
for data in (iter([np.zeros((12, D), np.float32)] * 2), lambda k: jax.random.normal(k, (12, D))):
    try:
        gf.train.fit(fresh(), gf.train.make_train_step(gf.train.diffusion_objective(model.apply, path), opt), data, 2,
                     chunk_size=2, progress=False, mesh=gf.train.make_mesh(4, 2))
        refused.append("accepted")
    except ValueError as e:
        refused.append("divisible by the mesh size (8 devices)" in str(e))
report["indivisible_batch_refused"] = refused

# A checkpoint written from a 4-device (2 x 2) mesh, restored onto 8 devices and onto 1 device.
mesh4 = gf.train.make_mesh(2, 2, devices=jax.devices()[:4])
ckpt_dir = os.path.join(out_dir, "ckpt")
ckpt = gf.train.Checkpointer(ckpt_dir, save_every=STEPS, keep=1)
loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")
state4, _ = gf.train.fit(fresh(), gf.train.make_train_step(loss_fn, opt), iter(batches), STEPS, progress=False,
                         mesh=mesh4, min_shard_size=MIN, checkpointer=ckpt)
report["saved_step"] = ckpt.latest_step()
report["saved_kernel_spec"] = str(state4.params["params"]["Dense_0"]["kernel"].sharding.spec)
np.savez(os.path.join(out_dir, "saved.npz"), *[np.asarray(x) for x in jax.tree.leaves(state4.params)])
for name, mesh in {"restore8": gf.train.make_mesh(1, 8), "restore1": gf.train.make_mesh(1, 1, jax.devices()[:1])}.items():
    target = gf.train.shard_state(fresh(), mesh, MIN)
    restored, _ = ckpt.restore(target, shardings=gf.train.tree_shardings(target, mesh, MIN))
    k = restored.params["params"]["Dense_0"]["kernel"]
    report[name] = {"params": max_diff(restored.params, state4.params), "opt_state": max_diff(restored.opt_state,
                                                                                              state4.opt_state),
                    "ema": max_diff(restored.ema, state4.ema), "step": int(restored.step),
                    "rng_equal": bool(np.array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state4.rng))),
                    "devices": len(k.sharding.device_set), "kernel_spec": str(k.sharding.spec)}
ckpt.close()

# Samplers with a history buffer (ddim, dpm++, unipc, deis) inside shard_map and on a batch with
# Explicit sharding: their zero-initialised buffers had neither the batch's sharding nor its
# varying axes, and the scan refused the carry (interoperability audit). Against one device.
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

g = gf.oracles.Gaussian.diagonal(jnp.arange(4.0) / 4, jnp.linspace(0.2, 1.0, 4))
eps_fn = g.model(path, "eps")
x1 = jax.random.normal(jax.random.key(3), (16, 4))
smesh = Mesh(np.array(jax.devices()), ("d",))
emesh = jax.make_mesh((8,), ("d",))  # (Explicit axes: this jax's default)
samplers = {}
# A network of many arrays: the single-step solvers, Heun and pc evaluate its stages in a scan over
# stage buffers (a small one stage by stage)
large_fn = jax.tree_util.Partial(lambda ws, x, t: eps_fn(x, t), [jnp.zeros(()) for _ in range(40)])
single = ("dpm++2s", "dpm++3s", "edm_heun", "restart", "pc")
# (" (denoise)": on vp_linear, whose final denoising step these solvers run as their loop's last iteration)
denoised = ("dpm++2m (denoise)", "unipc (denoise)", "edm_heun (scan) (denoise)", "restart (denoise)")
for solver in ("ddim", "dpm++2m", "dpm++3m", "unipc", "deis") + single + tuple(s + " (scan)" for s in single) + denoised:
    # (Restart / pc with a key, each device drawing its shard's noise)
    def run(x, solver=solver):
        name, on = solver.removesuffix(" (denoise)"), gf.paths.vp_linear() if solver.endswith(" (denoise)") else path
        name, fn = (name[:-7], large_fn) if name.endswith(" (scan)") else (name, eps_fn)
        kw = {"key": jax.random.key(6)} if name in ("restart", "pc") else {}
        return gf.sample(fn, on, x, prediction="eps", solver=name, steps=6, t_start=0.999, **kw)[0]
    one = run(x1)
    # (inside shard_map each device runs the sampler on its shard alone: Restart's and pc's noise is
    # drawn per shard, and pc's step rule takes the shard's mean norms, so their reference is the
    # one-device run shard by shard)
    stochastic = solver.split()[0] in ("restart", "pc")
    per_shard = jnp.concatenate([run(x) for x in jnp.split(x1, 8)]) if stochastic else one
    row = {}
    try:
        row["shard_map"] = max_diff(jax.jit(jax.shard_map(run, mesh=smesh, in_specs=P("d"), out_specs=P("d")))(x1),
                                    per_shard)
    except Exception as e:  # noqa: BLE001 (reported, asserted on by the test)
        row["shard_map"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        row["explicit"] = max_diff(run(jax.device_put(x1, NamedSharding(emesh, P("d")))), one)
    except Exception as e:  # noqa: BLE001
        row["explicit"] = f"{type(e).__name__}: {str(e)[:200]}"
    samplers[solver] = row
report["samplers_sharded"] = samplers

# The Diffrax solvers on a batch sharded over Explicit and over Auto axes: heun, tsit5, dopri5 and
# shark failed under Explicit axes (Diffrax's stage buffers and saved outputs are scatters that
# Explicit sharding refuses), and under Auto axes tsit5, dopri5, euler_maruyama and shark gave
# their samples back gathered and replicated on every device (Diffrax's failure check, a host
# callback on the whole solution). Against one device; the samples' partition spec.
amesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def _sample(solver):
    kw = {"key": jax.random.key(5)} if solver in ("euler_maruyama", "shark") else {}
    return lambda x: gf.sample(eps_fn, path, x, prediction="eps", solver=solver, steps=6, t_start=0.999, **kw)[0]


# gf.log_prob (adaptive and fixed-step, exact trace and Hutchinson) and the mixture oracle's
# reference flow map likewise: adaptive log_prob and the flow map failed under Explicit axes, and
# adaptive log_prob came back replicated under Auto axes.
gm = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.stack([jnp.ones(4), -jnp.ones(4)]), jnp.full((2, 4), 0.3))
v_fn = g.model(path, "velocity")
calls = {solver: _sample(solver) for solver in ("euler", "heun", "midpoint", "tsit5", "dopri5", "euler_maruyama",
                                                "shark")}
# (" (denoise)": on vp_linear, whose final denoising step tsit5 takes from its last evaluation)
vp = gf.paths.vp_linear()
calls["tsit5 (denoise)"] = lambda x: gf.sample(g.model(vp, "eps"), vp, x, prediction="eps", solver="tsit5")[0]
calls.update({
    "log_prob tsit5": lambda x: gf.log_prob(v_fn, path, x, prediction="velocity")[0],
    "log_prob heun": lambda x: gf.log_prob(v_fn, path, x, prediction="velocity", solver="heun", steps=6)[0],
    "log_prob hutchinson": lambda x: gf.log_prob(v_fn, path, x, prediction="velocity", trace="hutchinson",
                                                 key=jax.random.key(6))[0],
    "mixture flow_map": lambda x: gm.flow_map(x, 0.999, 0.0, path),
})
diffrax_sharded = {}
for name, call in calls.items():
    one = call(x1)
    row = {}
    for how, m in (("explicit", emesh), ("auto", amesh)):
        try:
            out = call(jax.device_put(x1, NamedSharding(m, P("d"))))
            row[how] = {"diff": max_diff(out, one), "spec": str(tuple(out.sharding.spec)[:1])}
        except Exception as e:  # noqa: BLE001 (reported, asserted on by the test)
            row[how] = f"{type(e).__name__}: {str(e)[:200]}"
    diffrax_sharded[name] = row
# A ("d", "m") mesh of Explicit axes with the batch on "d" only and the model's arrays placed on
# the mesh (replicated): only the batch's axes were switched to Auto (an unused "m" failed to
# lower), and arrays closed over kept their Explicit type and clashed with the Auto context (review).
mesh2 = jax.make_mesh((4, 2), ("d", "m"))
g2 = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh2, P())), g)
calls2 = {"heun": lambda x: gf.sample(g2.model(path, "eps"), path, x, prediction="eps", solver="heun", steps=6,
                                      t_start=0.999)[0],
          "tsit5": lambda x: gf.sample(g2.model(path, "eps"), path, x, prediction="eps", solver="tsit5",
                                       t_start=0.999)[0],
          "log_prob tsit5": lambda x: gf.log_prob(g2.model(path, "velocity"), path, x, prediction="velocity")[0]}
for name, call in calls2.items():
    try:
        out = call(jax.device_put(x1, NamedSharding(mesh2, P("d"))))
        diffrax_sharded[name]["explicit (d, m), model on the mesh"] = {
            "diff": max_diff(out, calls[name](x1)), "spec": str(tuple(out.sharding.spec)[:1])}
    except Exception as e:  # noqa: BLE001 (reported, asserted on by the test)
        diffrax_sharded[name]["explicit (d, m), model on the mesh"] = f"{type(e).__name__}: {str(e)[:200]}"
report["diffrax_sharded"] = diffrax_sharded

# The schedule searches on a calibration batch on Explicit axes, with the model's arrays on the mesh:
# their reference solves failed ("Resource axis: d ... not found in mesh", "Mesh for all inputs
# should be equal"). Against one device.
gm_on_mesh = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(emesh, P())), gm)
grids = [gf.sampling.time_grid(path, 4, "uniform", 0.999), gf.sampling.time_grid(path, 4, "logsnr", 0.999)]
searches = {
    "optimize_schedule": lambda m, x: gf.sampling.optimize_schedule(m, path, x, prediction="eps", steps=4,
                                                                    solver="dpm++2m", iters=3, t_start=0.999),
    "select_schedule": lambda m, x: gf.sampling.select_schedule(m, path, x, grids, prediction="eps", solver="dpm++2m"),
    "calibration_batch": lambda m, x: gf.sampling.calibration_batch(m, path, x, prediction="eps", steps=4, size=8,
                                                                    solver="dpm++2m", t_start=0.999),
}
schedules = {}
for name, call in searches.items():
    for how in ("", " under set_mesh"):
        try:
            xe = jax.device_put(x1, NamedSharding(emesh, P("d")))
            with jax.set_mesh(emesh) if how else contextlib.nullcontext():
                got = call(gm_on_mesh.model(path, "eps"), xe)
            mesh_of = getattr(got.sharding, "mesh", None)
            schedules[name + how] = {"diff": max_diff(got, call(gm.model(path, "eps"), x1)),
                                     "axis_types": str(getattr(mesh_of, "axis_types", None))}
        except Exception as e:  # noqa: BLE001 (reported, asserted on by the test)
            schedules[name + how] = f"{type(e).__name__}: {str(e)[:200]}"
report["schedules_explicit"] = schedules
# single process: a mesh smaller than the device count takes the first data * fsdp devices
small = gf.train.make_mesh(1, 2)
report["small_mesh"] = [dict(small.shape), sorted(d.id for d in small.devices.flat)]
print("REPORT " + json.dumps(report))
