"""One of two processes training with fit(..., mesh=...) over both processes' CPU devices
(tests/test_sharding.py::test_two_process_fit_matches_one_process). Prints a JSON line."""

import json
import os
import sys

# (the suite's compile flags kept, as tests/_sharding_run.py does)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import genflow as gf  # noqa: E402

model = gf.nets.MLP(hidden=(32,), time_dim=8)
params = model.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1,)))
opt = optax.adam(1e-2)
step = gf.train.make_train_step(gf.train.diffusion_objective(model.apply, gf.paths.linear(), prediction="velocity"),
                                opt)
batches = [np.random.default_rng(i).normal(size=(8, 4)).astype(np.float32) for i in range(3)]
out = {"devices": jax.device_count(), "processes": jax.process_count()}
mesh = gf.train.make_mesh(fsdp=2)
state = gf.train.shard_state(gf.train.init_state(params, opt, jax.random.key(1)), mesh, 64)
state, hist = gf.train.fit(state, step, iter([b[pid * 4:(pid + 1) * 4] for b in batches]), 3, progress=False,
                           mesh=mesh, min_shard_size=64)
out["loss"] = [float(v) for v in hist["loss"]]
try:
    gf.train.make_mesh(data=2)  # half the devices: process 1 would have none
except ValueError as e:
    out["half_mesh_error"] = str(e)
print(json.dumps(out), flush=True)
jax.distributed.shutdown()
