"""genflow.optim against golden trajectories recorded from reference implementations.

``tests/fixtures/optim/golden.npz`` holds 50-step trajectories on a least-squares problem and
a small MLP regression, recorded in float64 by ``tests/fixtures/optim/make_golden.py`` from
pytorch_optimizer (Grams, FAdam, DiffGrad) and the authors' smb-optimizer package (SMB); the
data, the initial parameters and the exact hyper-parameters are in the same file.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import genflow as gf

GOLDEN = dict(np.load(pathlib.Path(__file__).parent / "fixtures" / "optim" / "golden.npz"))
CONFIGS = json.loads(str(GOLDEN["configs"]))
LEAVES = {"lsq": ["w", "b"], "mlp": ["W1", "b1", "W2", "b2"]}
STEPS = 50
RTOL = 1e-5  # the bar: genflow matches the reference to <= 1e-5 relative


def reference_eps(eps: float, b2: float):
    """The eps that the reference diffGrad effectively adds to the bias-corrected sqrt(v^_t)."""
    return lambda n: eps / jnp.sqrt(1 - b2 ** (n + 1))


def genflow_optimizer(kind: str, kw: dict, *, diffgrad_as_reference: bool = True):
    """The genflow transform with the reference's hyper-parameters (translated names only)."""
    b1, b2 = kw.get("betas", (0.9, 0.999))
    if kind == "Grams":
        assert kw["weight_decouple"]
        return gf.optim.grams(kw["lr"], b1=b1, b2=b2, eps=kw["eps"], weight_decay=kw["weight_decay"])
    if kind == "FAdam":
        return gf.optim.fadam(kw["lr"], b1=b1, b2=b2, eps=kw["eps"], eps2=kw["eps_2"], clip=kw["clip"], p=kw["p"],
                              weight_decay=kw["weight_decay"])
    if kind == "DiffGrad":
        eps = reference_eps(kw["eps"], b2) if diffgrad_as_reference else kw["eps"]
        return gf.optim.diffgrad(kw["lr"], b1=b1, b2=b2, eps=eps, weight_decay=kw["weight_decay"])
    assert kind == "SMB" and not kw["independent_batch"] and not kw["autoschedule"]
    return gf.optim.smb(kw["lr"], c=kw["c"], eta=kw["eta"])


def loss_fn(problem: str, dtype=jnp.float64):
    X = jnp.asarray(GOLDEN[f"{problem}/X"], dtype)
    y = jnp.asarray(GOLDEN[f"{problem}/y"], dtype)
    if problem == "lsq":
        return lambda p: jnp.mean((X @ p["w"] + p["b"] - y) ** 2)
    return lambda p: jnp.mean((jnp.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"] - y) ** 2)


def init(problem: str, dtype=jnp.float64):
    return {k: jnp.asarray(GOLDEN[f"{problem}/init/{k}"], dtype) for k in LEAVES[problem]}


def run(opt, f, p0, steps: int = STEPS):
    """``steps`` full-batch updates in one ``lax.scan``, passing value= and value_fn= as the
    train step does. Returns (params [steps+1, ...] per leaf, losses [steps], model_steps [steps]:
    for SMB 1 where the step was a model step, else -1)."""
    tx = optax.with_extra_args_support(opt)

    def body(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(f)(p)
        u, new = tx.update(g, s, p, value=loss, value_fn=f)
        model_step = new.model_steps - s.model_steps if isinstance(s, gf.optim.SMBState) else jnp.int32(-1)
        return (optax.apply_updates(p, u), new), (p, loss, model_step)

    (p, s), (traj, losses, model_steps) = jax.lax.scan(body, (p0, tx.init(p0)), None, length=steps)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), traj, p), losses, model_steps


def flat(traj: dict, problem: str) -> np.ndarray:
    return np.concatenate([np.asarray(traj[k], np.float64).reshape(STEPS + 1, -1) for k in LEAVES[problem]], 1)


def reference(problem: str, config: str) -> tuple[np.ndarray, np.ndarray]:
    params = np.concatenate([GOLDEN[f"{problem}/{config}/{k}"].reshape(STEPS + 1, -1) for k in LEAVES[problem]], 1)
    return params, GOLDEN[f"{problem}/{config}/loss"]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max over steps of |got_t - ref_t| / |ref_t| (Euclidean norms over all parameters)."""
    got, ref = np.atleast_2d(got), np.atleast_2d(ref)
    return float(np.max(np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)))


def run_config(problem, config, dtype=jnp.float64, **kw):
    kind, hp = CONFIGS[config]
    opt = genflow_optimizer(kind, hp, **kw)
    traj, losses, model_steps = jax.jit(lambda p0: run(opt, loss_fn(problem, dtype), p0))(init(problem, dtype))
    return flat(traj, problem), np.asarray(losses, np.float64), np.asarray(model_steps)


CASES = [(p, c) for p in LEAVES for c in CONFIGS]


@pytest.mark.parametrize("problem,config", CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_matches_golden_trajectory_float64(problem, config):
    with jax.enable_x64(True):
        params, losses, model_steps = run_config(problem, config)
    ref_params, ref_losses = reference(problem, config)
    assert rel_err(params, ref_params) <= RTOL
    assert rel_err(losses[:, None], ref_losses[:, None]) <= RTOL
    if config == "smb":  # the Armijo test failed at the same steps as in the authors' code
        np.testing.assert_array_equal(model_steps, GOLDEN[f"{problem}/smb/model_step"])
        assert 0 < model_steps.sum() < STEPS
    # the trajectory actually moves (a frozen optimizer would not match anything else either)
    assert np.linalg.norm(params[-1] - params[0]) > 0.1 * np.linalg.norm(params[0])


def armijo_margins(problem: str) -> np.ndarray:
    """[50] |f(trial) - (f - c lr |g|^2)| / f along the golden SMB trajectory (float64): how far
    each step's Armijo test was from its threshold."""
    hp = CONFIGS["smb"][1]
    with jax.enable_x64(True):
        f = loss_fn(problem)

        def margin(p):
            loss, g = jax.value_and_grad(f)(p)
            trial = jax.tree.map(lambda a, b: a - hp["lr"] * b, p, g)
            g2 = sum(jnp.vdot(x, x) for x in jax.tree.leaves(g))
            return jnp.abs(f(trial) - (loss - hp["c"] * hp["lr"] * g2)) / loss

        ps = {k: jnp.asarray(GOLDEN[f"{problem}/smb/{k}"][:STEPS]) for k in LEAVES[problem]}
        return np.asarray(jax.vmap(margin)(ps))


# float32 against the float64 references: measured worst case 6.5e-6 (diffgrad, lsq).
@pytest.mark.parametrize("problem", list(LEAVES))
def test_matches_golden_trajectory_float32(problem):
    for config in ("grams", "fadam", "diffgrad", "smb"):
        params, _, _ = run_config(problem, config, jnp.float32)
        ref = reference(problem, config)[0]
        n = STEPS + 1
        if config == "smb":
            # Once the loss is at its floor, the Armijo test is decided by float32 rounding
            # (f(trial) and f - c lr |g|^2 agree to < 1e-5 relative), so float32 and float64 take
            # different branches; compare up to the first such step (lsq: 20, mlp: all 50).
            unresolved = np.flatnonzero(armijo_margins(problem) < 1e-5)
            n = int(unresolved[0]) + 1 if unresolved.size else n
            assert n > 15
        assert rel_err(params[:n], ref[:n]) <= 2e-5, config


def test_smb_through_the_train_step_matches_golden():
    """make_train_step passes value= and value_fn= (same batch and key): SMB driven by gf.train.fit
    reproduces the authors' trajectory."""
    with jax.enable_x64(True):
        f = loss_fn("lsq")
        kind, hp = CONFIGS["smb"]
        opt = genflow_optimizer(kind, hp)
        state = gf.train.init_state(init("lsq"), opt, jax.random.key(0))
        step = gf.train.make_train_step(lambda p, batch, key: (f(p), {}), opt)
        state, hist = gf.train.fit(state, step, lambda key: jnp.zeros(()), STEPS, chunk_size=STEPS, progress=False)
        ref_params, ref_losses = reference("lsq", "smb")
        final = np.concatenate([np.asarray(state.params[k]).ravel() for k in LEAVES["lsq"]])
        assert rel_err(final, ref_params[-1]) <= RTOL
        assert rel_err(hist["loss"][None], ref_losses[None]) <= RTOL
        assert int(state.opt_state.model_steps) == int(GOLDEN["lsq/smb/model_step"].sum())


def _diffgrad_paper_numpy(problem: str, hp: dict) -> np.ndarray:
    """diffGrad exactly as written in the paper (eps added to the bias-corrected sqrt(v^_t)),
    plus the reference's decoupled weight decay; numpy float64, gradients from jax."""
    b1, b2 = hp["betas"]
    lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
    f = loss_fn(problem)
    p = {k: np.asarray(v) for k, v in init(problem).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    g_prev = {k: np.zeros_like(x) for k, x in p.items()}
    out = [np.concatenate([p[k].ravel() for k in LEAVES[problem]])]
    grad = jax.jit(jax.grad(f))
    for t in range(1, STEPS + 1):
        g = {k: np.asarray(x) for k, x in grad({k: jnp.asarray(x) for k, x in p.items()}).items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            xi = 1.0 / (1.0 + np.exp(-np.abs(g_prev[k] - g[k])))
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            p[k] = p[k] - lr * (xi * m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
        g_prev = g
        out.append(np.concatenate([p[k].ravel() for k in LEAVES[problem]]))
    return np.stack(out)


@pytest.mark.parametrize("problem", list(LEAVES))
def test_diffgrad_follows_the_paper_where_the_reference_differs(problem):
    """The reference adds eps to the *uncorrected* sqrt(v_t) (eps / sqrt(1 - b2^t) in the paper's
    formula). genflow follows the paper: with eps = 0.1 it matches a numpy transcription of the
    paper's update, while the reference trajectory differs, and differs only by that term
    (test_matches_golden_trajectory_float64 reproduces it with eps / sqrt(1 - b2^t))."""
    with jax.enable_x64(True):
        hp = CONFIGS["diffgrad_eps01_wd"][1]
        paper, _, _ = run_config(problem, "diffgrad_eps01_wd", diffgrad_as_reference=False)
        assert rel_err(paper, _diffgrad_paper_numpy(problem, hp)) <= 1e-12
    ref_params, _ = reference(problem, "diffgrad_eps01_wd")
    assert rel_err(paper, ref_params) > 0.05  # measured 0.47 (lsq), 0.10 (mlp): the term matters


def test_fadam_keeps_weight_decay_and_scale_invariance_at_extreme_gradient_scales():
    """rms squared in float32: |theta / D| ~ 1e18 overflowed (rms inf, the weight-decay term 0) and a
    gradient of 1e-20 underflowed (rms 0: the eps fallback lost the natural gradient). Reference: the
    same formula in float64 (the optim audit's NumPy version), [0.14530, 0.00643, 0.03986] for both."""
    tx = gf.optim.scale_by_fadam(weight_decay=0.1)
    ref = [0.14530, 0.00643, 0.03986]
    p = {"w": jnp.array([10.0, -20.0, 30.0])}
    u, _ = tx.update({"w": 1e-18 * jnp.array([1.0, 1.0, -1.0])}, tx.init(p), p)
    np.testing.assert_allclose(u["w"], ref, atol=1e-5)  # was [0.099, 0.099, -0.099]: no decay
    p = {"w": jnp.array([1.0, -2.0, 3.0])}
    u, _ = tx.update({"w": 1e-20 * jnp.array([1.0, 1.0, -1.0])}, tx.init(p), p)
    # (g^2 still underflows in the float32 Fisher: 1e-3 off, against 0.1 before: the g = 0 update
    # [0.046, -0.093, 0.139])
    np.testing.assert_allclose(u["w"], ref, atol=1.5e-3)
    # the scale carries no gradient: d rms / dx = x / (n rms) at every magnitude (the max's -x / a^2
    # term overflowed at 1e20 in a first version)
    from genflow.optim._base import rms

    for s in (1e20, 1.0, 1e-25):
        np.testing.assert_allclose(jax.grad(rms)(s * jnp.array([3.0, 4.0])), [0.6 / 2 ** 0.5, 0.8 / 2 ** 0.5],
                                   rtol=1e-5)


def test_smb_names_a_loss_that_is_not_a_scalar():
    p = {"w": jnp.ones(3)}
    tx = gf.optim.smb(0.5)
    with pytest.raises(ValueError, match=r"smb needs a scalar loss: value_fn returned shape \(1,\)"):
        tx.update(p, tx.init(p), p, value_fn=lambda q: jnp.sum(q["w"] ** 2, keepdims=True))


def test_zero_dimensional_numpy_hyper_parameters_are_range_checked_and_a_zero_decay_needs_no_params():
    """check()'s docstring: Python and numpy numbers are range-checked alike (0-d numpy arrays too,
    e.g. np.asarray of a config value); fadam with such a weight_decay of 0 is 'no decay' (update
    without params), as with the float 0.0."""
    for bad in (np.asarray(-1e-3), np.asarray(-1e-3, np.float32), np.float32(-1e-3)):
        with pytest.raises(ValueError, match="learning_rate must lie in"):
            gf.optim.grams(bad)
    with pytest.raises(ValueError, match="b1 must lie in"):
        gf.optim.diffgrad(0.1, b1=np.asarray(1.0))
    with pytest.raises(ValueError, match="eta must lie in"):
        gf.optim.smb(1.0, eta=np.asarray(1.5))
    opt = gf.optim.fadam(0.1, weight_decay=np.asarray(0.0, np.float32))
    g = {"w": jnp.array([1.0, -2.0])}
    u, _ = opt.update(g, opt.init(g))  # no params needed: no weight decay
    assert np.all(np.isfinite(np.asarray(u["w"])))


@pytest.mark.parametrize("name", ["grams", "diffgrad", "fadam"])
def test_first_step_of_tiny_float16_gradients_has_unit_size(name):
    """At t = 1, m^ = g and sqrt(v^) = |g| (FAdam: D_1 = |g| + eps), so the direction is ~ sign(g)
    for |g| >> eps, times the friction sigmoid(|g|) for diffGrad and (1 - b1) for FAdam's momentum.
    The second moment / Fisher is float32 (documented), so g^2 must be formed in float32: in float16
    g = 1e-4 squares to 0 and that coordinate's step was 1e4 (FAdam: clipped against the others)."""
    p = jnp.zeros(2, jnp.float16)
    g = jnp.array([1e-4, -0.1], jnp.float16)
    tx = {"grams": gf.optim.scale_by_grams(), "diffgrad": gf.optim.scale_by_diffgrad(),
          "fadam": gf.optim.scale_by_fadam(weight_decay=0.0)}[name]
    u, _ = tx.update(g, tx.init(p), p)
    g64 = np.asarray(g, np.float64)
    want = {"grams": np.sign(g64), "diffgrad": np.sign(g64) / (1.0 + np.exp(-np.abs(g64))),
            "fadam": 0.1 * np.sign(g64)}[name]
    np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=3e-3)


def test_callable_masks_are_applied_by_fadam_and_smb():
    """fadam's and smb's mask= may be a callable on the params (documented), as a tree may."""
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    mask_fn = lambda p: {"a": True, "b": False}  # noqa: E731
    opt = gf.optim.fadam(1e-2, weight_decay=0.1, mask=mask_fn)
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = opt.update(zero, opt.init(params), params)
    assert float(jnp.abs(u["b"]).max()) == 0.0 and float(jnp.abs(u["a"]).max()) > 0.0
    f = lambda q: 0.5 * (jnp.sum(q["a"] ** 2) + jnp.sum(q["b"] ** 2))  # noqa: E731
    opt = gf.optim.smb(0.5, mask=mask_fn)
    value, g = jax.value_and_grad(f)(params)
    u, _ = opt.update(g, opt.init(params), params, value=value, value_fn=f)
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(g["b"]))  # passed through unchanged
    np.testing.assert_allclose(np.asarray(u["a"]), -0.5 * np.asarray(g["a"]), rtol=1e-6)  # Armijo holds


def test_rms_of_an_infinite_entry_is_inf():
    """rms's docstring: an inf entry keeps the plain formula's inf (not NaN)."""
    from genflow.optim._base import rms

    assert float(rms(jnp.array([jnp.inf, 1.0, -2.0]))) == np.inf
    assert float(rms(jnp.array([-jnp.inf, 0.0]))) == np.inf
    assert np.isnan(float(rms(jnp.array([jnp.nan, 1.0]))))


@pytest.mark.parametrize("name", ["grams", "diffgrad", "fadam"])
def test_scale_by_defaults_are_the_public_optimizers_defaults(name):
    """The public optimizer is its scale_by_* direction, (decoupled decay,) then -learning_rate
    (documented): with defaults on both sides, lr = 1 and no decay, the updates are the negated
    directions, step after step (the second moment's decay matters from step 2)."""
    public = getattr(gf.optim, name)(1.0, weight_decay=0.0)
    direction = getattr(gf.optim, f"scale_by_{name}")(weight_decay=0.0) if name == "fadam" else \
        getattr(gf.optim, f"scale_by_{name}")()
    p = jnp.array([1.0, -2.0, 3.0])
    s1, s2 = public.init(p), direction.init(p)
    for k in range(6):
        g = jnp.array([1.0, -0.5, 0.25]) * (1.0 + 3.0 * (k % 2)) + 0.1 * k
        u1, s1 = public.update(g, s1, p)
        u2, s2 = direction.update(g, s2, p)
        np.testing.assert_allclose(np.asarray(u1), -np.asarray(u2), rtol=1e-6, atol=1e-7)


def test_smb_uses_the_given_value_and_evaluates_the_loss_once_per_update():
    """Documented cost: one extra loss evaluation per update (at the trial point) when value= is
    given; value_fn(params) is evaluated only when value= is missing."""
    calls = []

    def f(q):
        calls.append(1)
        return 0.5 * jnp.sum(q["w"] ** 2)

    p = {"w": jnp.array([1.0, -2.0])}
    opt = gf.optim.smb(0.5)
    value, g = jax.value_and_grad(lambda q: 0.5 * jnp.sum(q["w"] ** 2))(p)
    calls.clear()
    opt.update(g, opt.init(p), p, value=value, value_fn=f)
    assert len(calls) == 1
    calls.clear()
    opt.update(g, opt.init(p), p, value_fn=f)
    assert len(calls) == 2


def test_diffgrad_friction_is_one_half_for_a_constant_gradient_with_a_low_precision_first_moment():
    """xi_t = sigmoid(|g_{t-1} - g_t|) = 1/2 when consecutive gradients agree; mu_dtype sets only the
    first moment's dtype, g_{t-1} is kept exactly (in bfloat16, 1000.5 rounded to 1000 and xi = 0.62)."""
    tx = gf.optim.scale_by_diffgrad(mu_dtype=jnp.bfloat16)
    p = jnp.zeros(1)
    g = jnp.full((1,), 1000.5)
    s = tx.init(p)
    for _ in range(3):
        u, s = tx.update(g, s, p)
    # m^ / sqrt(v^) = 1 up to the bfloat16 first moment (~0.4%), times xi = 1/2
    np.testing.assert_allclose(np.asarray(u), 0.5, rtol=1e-2)


def test_diffgrad_bfloat16_update_with_float32_moments_is_the_float32_update_rounded():
    """With float32 moments (mu_dtype; the second moment is float32 anyway), the bfloat16 update is
    computed in float32 (friction included) and only rounded at the end: it equals the float32
    update on the same (bfloat16-valued) gradients, cast to bfloat16. (The friction's g_{t-1} - g_t
    formed in bfloat16 moved ~2% of the entries by one bfloat16 ulp.)"""
    keys = jax.random.split(jax.random.key(0), 3)
    gs = [(3.0 * jax.random.normal(k, (2048,))).astype(jnp.bfloat16) for k in keys]
    out = {}
    for dt in (jnp.bfloat16, jnp.float32):
        tx = gf.optim.scale_by_diffgrad(mu_dtype=jnp.float32)
        s = tx.init(jnp.zeros(2048, dt))
        for g in gs:
            u, s = tx.update(g.astype(dt), s)
        out[dt] = u
    assert out[jnp.bfloat16].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[jnp.bfloat16], np.float32),
                                  np.asarray(out[jnp.float32].astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("make,match", [
    (lambda: gf.optim.grams(0.1, weight_decay=-0.01), "weight_decay must lie in"),
    (lambda: gf.optim.diffgrad(0.1, weight_decay=-0.01), "weight_decay must lie in"),
    (lambda: gf.optim.fadam(0.1, weight_decay=-0.1), "weight_decay must lie in"),
    (lambda: gf.optim.scale_by_fadam(weight_decay=-0.1), "weight_decay must lie in"),
    (lambda: gf.optim.smb(-0.5), "learning_rate must lie in"),
    (lambda: gf.optim.smb(1.0, c=0.0), "c must lie in"),
])
def test_negative_decay_and_step_and_a_zero_armijo_constant_are_refused(make, match):
    """Documented ranges: a weight-decay coefficient >= 0 (a negative one grows the weights),
    SMB's learning rate >= 0 (a negative trial step ascends) and c in (0, 1)."""
    with pytest.raises(ValueError, match=match):
        make()
