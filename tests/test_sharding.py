"""Sharded training on 8 fake CPU devices (in a subprocess: the device count is fixed when jax is
imported) against the single-device run, and checkpoints restored across mesh shapes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import genflow as gf
from _sharding_run import run_on_8_devices, run_once


@pytest.fixture(scope="module")
def report():
    """The 8-device checks (one run per test session, shared by the xdist workers)."""
    return run_once()


@pytest.mark.parametrize("case", ["data", "fsdp", "both", "both_on_device", "both_grad_accum"])
def test_sharded_steps_match_single_device(report, case):
    r = report[0][case]
    assert r["step"] == 3 and r["rng_equal"]
    assert r["param_change"] > 1e-2  # the runs really trained
    # same losses, gradients, updated parameters, optimizer states and EMA to float32 tolerance
    assert r["loss"] <= 1e-6 * r["loss_scale"] + 1e-6, r
    assert r["grad_norm"] < 1e-5, r
    assert r["params"] < 1e-5 and r["opt_state"] < 1e-6 and r["ema"] < 1e-5, r


def test_history_buffer_samplers_run_in_shard_map_and_on_explicitly_sharded_batches(report):
    """ddim / dpm++ / unipc / deis inside shard_map and on a batch with Explicit sharding (8 CPU
    devices) equal the one-device samples to float32 rounding (the programs differ: 2e-5 seen under
    the suite's XLA flags, 0 under the default ones); their buffers failed the scan's carry check
    before. Likewise the single-step solvers, EDM's Heun, Restart and pc, stage by stage and, for a
    network of many arrays, with stage buffers in a scan (inside shard_map Restart and pc against the
    one-device run shard by shard); and dpm++2m / unipc / EDM Heun / Restart on vp_linear, whose
    final denoising step is their loop's last iteration."""
    rows = report[0]["samplers_sharded"]
    assert {"dpm++2m (denoise)", "unipc (denoise)", "edm_heun (scan) (denoise)", "restart (denoise)"} <= set(rows)
    for solver, row in rows.items():
        for how, diff in row.items():
            assert isinstance(diff, float) and diff < 1e-4, (solver, how, diff)


def test_diffrax_solves_keep_a_sharded_batch_sharded(report):
    """euler / heun / midpoint / tsit5 / dopri5 / euler_maruyama / shark, gf.log_prob (tsit5, heun,
    Hutchinson) and the mixture oracle's flow map on a batch sharded over Explicit axes
    (jax.make_mesh's default) and over Auto axes: the one-device results, sharded as the batch.
    heun (gf.sample's default), tsit5, dopri5, shark, adaptive log_prob and the flow map failed
    under Explicit axes (a ShardingTypeError inside Diffrax); under Auto axes tsit5, dopri5,
    euler_maruyama, shark and adaptive log_prob came back gathered and replicated on every device.
    Also on a ("d", "m") mesh with the batch on "d" and the model's arrays placed on the mesh (the
    first version of the fix failed there: review), and tsit5 denoising from its last evaluation."""
    assert "tsit5 (denoise)" in report[0]["diffrax_sharded"]
    for solver, row in report[0]["diffrax_sharded"].items():
        for how, r in row.items():
            assert isinstance(r, dict), (solver, how, r)
            assert r["diff"] < 1e-4 and r["spec"] == "('d',)", (solver, how, r)


def test_fit_refuses_a_mesh_of_explicit_axes_by_name():
    """jax.make_mesh's default Explicit axes failed deep inside fit (with_sharding_constraint)."""
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    step = gf.train.make_train_step(lambda p, b, k: (jnp.sum((p["w"] - b) ** 2), {}), opt)
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match="fit's mesh must have Auto 'data' and 'fsdp' axes"):
        gf.train.fit(state, step, lambda k: jnp.ones((2, 2)), 2, progress=False, mesh=mesh)
    # another axis of the mesh (model parallelism) may be Explicit: fit shards over data and fsdp only
    auto, explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "model"), axis_types=(auto, auto, explicit))
    _, hist = gf.train.fit(state, step, lambda k: jnp.ones((2, 2)), 2, progress=False, mesh=mesh)
    assert hist["loss"].shape == (2,)


def test_indivisible_batches_are_refused(report):
    # host batches (shard_batch) and on-device batch_fn batches (silently padded before)
    assert report[0]["indivisible_batch_refused"] == [True, True]


def test_fsdp_rules_shard_the_largest_divisible_axis(report):
    r = report[0]
    # Dense_0 kernel [32, 64]: replicated for pure data parallelism, split along its 64 axis otherwise
    assert r["data"]["kernel_spec"] == "P()" and r["data"]["kernel_shard_shape"] == [32, 64]
    assert r["fsdp"]["kernel_spec"] == "P(None, 'fsdp')" and r["fsdp"]["kernel_shard_shape"] == [32, 8]
    assert r["both"]["kernel_shard_shape"] == [32, 16]
    assert r["fsdp"]["adam_mu_spec"] == "P(None, 'fsdp')"  # optimizer state follows its parameter
    assert r["fsdp"]["bias_spec"] == "P()"  # small arrays stay replicated


def test_checkpoint_from_4_devices_restores_on_8_and_1(report):
    r, out = report
    assert r["saved_step"] == 3 and r["saved_kernel_spec"] == "P(None, 'fsdp')"
    for name, devices in (("restore8", 8), ("restore1", 1)):
        got = r[name]
        assert got["devices"] == devices and got["step"] == 3 and got["rng_equal"]
        assert got["params"] == 0.0 and got["opt_state"] == 0.0 and got["ema"] == 0.0, got
    # and in this single-device process
    model = gf.nets.MLP(hidden=(64, 64), time_dim=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16)), jnp.zeros((1,)))
    opt = optax.adam(1e-2, eps=1e-3)
    target = gf.train.init_state(params, opt, jax.random.key(1), ema_decays=(0.9,))
    ckpt = gf.train.Checkpointer(str(out / "ckpt"), save_every=3)
    restored, _ = ckpt.restore(target)
    ckpt.close()
    saved = np.load(out / "saved.npz")
    for i, leaf in enumerate(jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])
    assert int(restored.step) == 3


def test_a_mesh_smaller_than_the_devices_takes_the_first_ones_in_one_process(report):
    """make_mesh's documented rule: in a single process, data * fsdp below the device count uses the
    first data * fsdp devices (the refusal is for several processes only; audit round 8's mutant
    refused it in one process, and no test built such a mesh)."""
    assert report[0]["small_mesh"] == [{"data": 1, "fsdp": 2}, [0, 1]]


def test_shard_state_keeps_a_non_default_prng_key_impl():
    """place() re-wraps a typed key from its raw data: it keeps the key's implementation (an rbg
    key's 4 words re-wrapped as threefry failed, 'expected key_data.shape to end with (2,)')."""
    key = jax.random.key(0, impl="rbg")
    out = gf.train.shard_state({"rng": key, "w": jnp.ones(3)}, gf.train.make_mesh(1, 1, jax.devices()[:1]))
    assert str(jax.random.key_impl(out["rng"])) == str(jax.random.key_impl(key))
    np.testing.assert_array_equal(jax.random.normal(out["rng"], (3,)), jax.random.normal(key, (3,)))


def test_fsdp_spec_rules():
    assert gf.train.fsdp_spec((64, 256), 4, min_size=1) == P(None, "fsdp")
    assert gf.train.fsdp_spec((256, 256), 4, min_size=1) == P("fsdp", None)  # ties: the first axis
    assert gf.train.fsdp_spec((3, 3, 6, 16), 8, min_size=1) == P(None, None, None, "fsdp")
    assert gf.train.fsdp_spec((3, 5), 4, min_size=1) == P()  # nothing divisible: replicated
    assert gf.train.fsdp_spec((64, 128), 4) == P()  # below the default 2**14 elements
    assert gf.train.fsdp_spec((128, 128), 4) == P("fsdp", None)
    assert gf.train.fsdp_spec((64, 256), 1, min_size=1) == P()  # no fsdp axis: data parallel
    assert gf.train.fsdp_spec((), 4, min_size=0) == P()
    # an axis of exactly fsdp_size elements is divisible (one row per device); a 0-length one is not
    assert gf.train.fsdp_spec((8, 3), 8, min_size=1) == P("fsdp", None)
    assert gf.train.fsdp_spec((4, 4, 3), 4, min_size=1) == P("fsdp", None, None)
    assert gf.train.fsdp_spec((0, 3), 4, min_size=0) == P()


def test_single_device_mesh_and_bad_mesh():
    mesh = gf.train.make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="data \\* fsdp <= 1 devices"):
        gf.train.make_mesh(2, 1)
    with pytest.raises(ValueError, match="fsdp must be a positive int"):
        gf.train.make_mesh(fsdp=0)
    x = gf.train.shard_batch(np.ones((4, 3), np.float32), mesh)
    assert x.shape == (4, 3) and x.sharding.spec == P(("data", "fsdp"))


def test_maybe_initialize_distributed_from_environment():
    """Without JAX_COORDINATOR_ADDRESS it does nothing; with it (a one-process 'cluster' on
    localhost) it calls jax.distributed.initialize with the process count and id from the env."""
    code = "import genflow as gf, jax; print(gf.train.maybe_initialize_distributed(), jax.process_count())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["False", "1"], r.stderr[-2000:]
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["True", "1"], r.stderr[-2000:]


def test_batch_sharding_and_replicated_specs():
    """batch_sharding splits the leading (batch) axis over ("data", "fsdp"), or the second axis of
    a stacked [steps, B, ...] chunk; replicated puts the whole array on every device."""
    mesh = gf.train.make_mesh(1, 1)
    bs, st, rep = gf.train.batch_sharding(mesh), gf.train.batch_sharding(mesh, stacked=True), gf.train.replicated(mesh)
    assert bs.spec == P(("data", "fsdp")) and bs.mesh == mesh
    assert st.spec == P(None, ("data", "fsdp"))
    assert rep.spec == P() and rep.is_fully_replicated
    x = jnp.arange(24.0).reshape(4, 3, 2)
    for s in (bs, st, rep):
        y = jax.device_put(x, s)
        assert y.sharding.is_equivalent_to(s, x.ndim)
        np.testing.assert_array_equal(y, x)
    # shard_batch places a host batch with batch_sharding
    got = gf.train.shard_batch({"x": np.asarray(x)}, mesh)["x"]
    assert got.sharding.is_equivalent_to(bs, x.ndim)


def test_shard_batch_refuses_a_leaf_without_a_batch_axis():
    """A scalar leaf in host batches (stacked to [steps]) raised an IndexError from shard_batch."""
    mesh = gf.train.make_mesh(1, 1, jax.devices()[:1])
    with pytest.raises(ValueError, match="batch axis"):
        gf.train.shard_batch({"x": np.zeros((2, 4, 3), np.float32), "w": np.zeros((2,), np.float32)}, mesh,
                             stacked=True)
    with pytest.raises(ValueError, match="batch axis"):
        gf.train.shard_batch({"x": np.zeros((4, 3), np.float32), "w": np.float32(0.5)}, mesh)


def test_a_mesh_without_the_data_fsdp_axes_is_refused_by_name():
    """A plain Mesh(devices, ("data",)) failed with a bare KeyError: 'fsdp' (fit, tree_shardings)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    params = {"w": jnp.ones((4,))}
    opt = optax.sgd(0.1)
    state = gf.train.init_state(params, opt, jax.random.key(0))
    step = gf.train.make_train_step(lambda p, b, k: (jnp.mean((b - p["w"]) ** 2), {}), opt)
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with the axes \('data', 'fsdp'\).*"
                                         r"got axes \('data',\)"):
        gf.train.fit(state, step, lambda k: jax.random.normal(k, (8, 4)), 2, progress=False, mesh=mesh)
    with pytest.raises(ValueError, match="mesh must be"):
        gf.train.tree_shardings(params, mesh)
    with pytest.raises(ValueError, match="mesh must be"):
        gf.train.shard_batch(np.ones((4, 4), np.float32), mesh)
    with pytest.raises(ValueError, match="got int"):
        gf.train.batch_sharding(8)


def test_two_process_fit_matches_one_process():
    """fit(..., mesh=...) across two processes (2 CPU devices each, gloo collectives): every
    multi-process run failed on state.rng (JAX refuses to device_put a typed key array onto
    devices of other processes). Each process feeds its half of each batch; the losses equal a
    one-process run on the whole batches. A mesh on half the devices is refused by name (the
    other process had no device and failed far from the cause)."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    worker = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COORDINATOR_ADDRESS"}
    procs = [subprocess.Popen([sys.executable, worker, str(i), port], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    results = []
    try:
        for p in procs:  # (both waited for before any assertion: one's failure shows as the other's timeout)
            try:
                results.append(p.communicate(timeout=240))
            except subprocess.TimeoutExpired:
                p.kill()
                results.append(p.communicate())
    finally:
        for p in procs:  # (nothing left running on the CI machine)
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        pytest.fail("\n".join(f"process {i} (exit {p.returncode}):\n{err[-2000:]}"
                               for i, (p, (_, err)) in enumerate(zip(procs, results))))
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert [o["devices"] for o in outs] == [4, 4] and [o["processes"] for o in outs] == [2, 2]
    assert outs[0]["loss"] == outs[1]["loss"]
    assert "with 2 processes the mesh must use all 4 devices" in outs[0]["half_mesh_error"]

    model = gf.nets.MLP(hidden=(32,), time_dim=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1,)))
    opt = optax.adam(1e-2)
    step = gf.train.make_train_step(gf.train.diffusion_objective(model.apply, gf.paths.linear(),
                                                                 prediction="velocity"), opt)
    batches = [np.random.default_rng(i).normal(size=(8, 4)).astype(np.float32) for i in range(3)]
    _, hist = gf.train.fit(gf.train.init_state(params, opt, jax.random.key(1)), step, iter(batches), 3,
                           progress=False)
    np.testing.assert_allclose(outs[0]["loss"], hist["loss"], rtol=1e-5)


def test_mesh_and_batch_errors_name_their_cause():
    """make_mesh(devices=[]) said "data must be a positive int; got 0" and duplicated devices were
    accepted; a scalar leaf of an on-device batch under a mesh was reported as an indivisible batch."""
    with pytest.raises(ValueError, match="devices is empty"):
        gf.train.make_mesh(devices=[])
    d0 = jax.devices()[0]
    with pytest.raises(ValueError, match="devices holds a device more than once"):
        gf.train.make_mesh(devices=[d0, d0])
    with pytest.raises(TypeError, match="devices must be a flat sequence of jax.Device"):
        gf.train.make_mesh(devices=np.array([[d0]], dtype=object))
    opt = optax.sgd(0.1)
    step = gf.train.make_train_step(lambda p, b, k: (jnp.mean((p["w"] - b["x"]) ** 2 * b["w"]), {}), opt)
    state = gf.train.init_state({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    with pytest.raises(ValueError, match=r"every batch leaf needs a batch axis .* leaf of shape \(\)"):
        gf.train.fit(state, step, lambda k: {"x": jax.random.normal(k, (4, 2)), "w": jnp.float32(1.0)}, 2,
                     progress=False, mesh=gf.train.make_mesh())


def test_schedule_searches_run_on_a_calibration_batch_on_explicit_axes(report):
    """optimize_schedule / select_schedule / calibration_batch with the batch on a mesh's Explicit
    axes and the model's arrays on the mesh equal the one-device search (the reference solves
    failed: "Resource axis: d ... not found in mesh", then "Mesh for all inputs should be equal"),
    also inside ``jax.set_mesh``, and what they return is on the caller's Explicit mesh (a batch
    came back on Auto axes and failed in the next Explicit computation: review)."""
    for name, r in report[0]["schedules_explicit"].items():
        assert isinstance(r, dict), (name, r)
        assert r["diff"] < 1e-4 and r["axis_types"] in ("None", "(Explicit,)"), (name, r)


def test_a_check_that_fires_on_a_sharded_batch_raises_its_error_instead_of_aborting_the_process():
    """Diffrax's max_steps (gf.sample, gf.log_prob) and classifier guidance's label range, fired on a
    batch sharded over 8 CPU devices (Auto and Explicit axes, and under the caller's jit on Explicit
    axes): equinox's error with its message, and JAX's effects barrier passes afterwards. Before,
    the check ran on one device, the others waited in a collective, and XLA aborted the process
    after 40 s (SIGABRT, "Termination timeout for all reduce"). Also under eager jax.grad and
    jax.vmap on Auto axes, and with the model on the mesh and the batch on one device."""
    report = run_on_8_devices("_sharding_failures.py")
    steps, labels = "maximum number of solver steps", "labels y must lie in [0, 10)"
    for kind in ("auto", "explicit"):
        cases = [(f"sample_{kind}", steps), (f"log_prob_{kind}", steps), (f"classifier_{kind}", labels)]
        if kind == "auto":  # (under eager jax.grad and jax.vmap: a review found these still aborting)
            cases += [("log_prob_grad_auto", steps), ("sample_vmap_auto", steps), ("sample_model_on_mesh_auto", steps)]
        for case, message in cases:
            got = report[case]
            assert got["raised"] == "EquinoxRuntimeError" and message in got["message"], (case, got)
            assert got["barrier"] == "ok", (case, got)
        ok = report[f"sample_ok_{kind}"]
        assert ok["raised"] is None and ok["spec"] in ("P('d',)", "P('d', None)"), ok
    under_jit = report["sample_explicit_under_jit"]  # (the caller's own program: JAX's error type)
    assert under_jit["raised"] == "JaxRuntimeError" and steps in under_jit["message"], under_jit
