"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices: runtime checks that fire
on a sharded batch (Diffrax's max_steps, classifier guidance's label range). Each must raise its
error; before, the check ran on one device, the other seven waited in a collective, and XLA
aborted the process after 40 s ("Termination timeout for all reduce"). Prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharding_failures.py
"""

import json

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import genflow as gf

assert jax.device_count() == 8, jax.devices()
path = gf.paths.vp_cosine()
eps = lambda x, t: 0.9 * x  # noqa: E731 - an eps model; its flow map is smooth
kw = dict(prediction="eps", max_steps=2, rtol=1e-6, atol=1e-6)
report = {}


def outcome(run):
    """What ``run()`` did: the error's type and first line, and whether JAX's effects barrier
    passes afterwards (a failed program's tokens raised its error again there)."""
    try:
        out = jax.block_until_ready(run())
        got = {"raised": None, "spec": str(out.sharding.spec)}
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
        got = {"raised": type(e).__name__, "message": str(e)}
    try:
        jax.effects_barrier()
        got["barrier"] = "ok"
    except Exception as e:  # noqa: BLE001
        got["barrier"] = type(e).__name__
    return got


for kind in ("auto", "explicit"):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto if kind == "auto" else AxisType.Explicit,))
    x1 = jax.device_put(jax.random.normal(jax.random.key(0), (16, 4)), NamedSharding(mesh, P("d")))
    report[f"sample_{kind}"] = outcome(lambda: gf.sample(eps, path, x1, solver="tsit5", **kw)[0])
    report[f"log_prob_{kind}"] = outcome(lambda: gf.log_prob(eps, path, x1, **kw)[0])
    y = jax.device_put(jnp.arange(16) % 12, NamedSharding(mesh, P("d")))  # labels 10 and 11 of 10 classes
    guided = gf.guidance.classifier(eps, path, "eps", lambda x, t: jnp.tile(x, (1, 3))[:, :10], y, scale=1.0)
    report[f"classifier_{kind}"] = outcome(
        lambda: gf.sample(guided, path, x1, prediction="eps", solver="ddim", steps=4)[0])
    if kind == "auto":  # (eager jax.grad / jax.vmap hand tracers in: the mesh is found beneath them)
        # a model on the mesh, sampled from one-device noise (review: only the batch was looked at)
        w = jax.device_put(jnp.asarray(0.9), NamedSharding(mesh, P()))
        report["sample_model_on_mesh_auto"] = outcome(
            lambda: gf.sample(lambda x, t: w * x, path, jax.random.normal(jax.random.key(0), (16, 4)),
                              solver="tsit5", **kw)[0])
        report["log_prob_grad_auto"] = outcome(lambda: jax.grad(lambda z: gf.log_prob(eps, path, z, **kw)[0].sum())(x1))
        report["sample_vmap_auto"] = outcome(lambda: jax.vmap(lambda z: gf.sample(eps, path, z, solver="tsit5", **kw)[0])(
            jax.device_put(x1.reshape(8, 2, 4), NamedSharding(mesh, P("d")))))
    # the same programs on a batch that passes its checks still run, sharded as the batch
    report[f"sample_ok_{kind}"] = outcome(lambda: gf.sample(eps, path, x1, prediction="eps", solver="tsit5")[0])

# under the caller's jit, on Explicit axes (the mesh is in the types); last: the caller's program
# keeps its failed tokens, as JAX does, and a later effects barrier raises its error again
explicit = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
x1 = jax.device_put(jax.random.normal(jax.random.key(0), (16, 4)), NamedSharding(explicit, P("d")))
report["sample_explicit_under_jit"] = outcome(
    lambda: jax.jit(lambda x: gf.sample(eps, path, x, solver="tsit5", **kw)[0])(x1))
print("REPORT " + json.dumps(report))
