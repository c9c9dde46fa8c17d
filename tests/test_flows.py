"""Flow layers (exact inverses and log-determinants), Glow / RealNVP, EBFlow objectives against
closed forms, and FFJORD on a linear field with a known solution."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from conftest import count_compiles
from genflow import flows as F


from test_likelihood import float64  # noqa: E402,F401  (module-scoped autouse: float64 in this module only)


def _perturb(params, key, scale=0.3):
    """Move every trained parameter away from its (often identity) init; LU constants stay."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (kp, a), k in zip(leaves, keys):
        const = any(getattr(q, "key", None) in ("perm", "sign") for q in kp)
        out.append(a if const else a + scale * jax.random.normal(k, a.shape, a.dtype))
    return jax.tree_util.tree_unflatten(tree, [a for a in out])


def _check_layer(layer, x, key=jax.random.key(1)):
    n = math.prod(x.shape[1:])

    @jax.jit  # one compilation (op-by-op dispatch of the init and Jacobian is far slower)
    def run(x):
        params = _perturb(layer.init(key, x), jax.random.fold_in(key, 1))
        y, ld = layer.forward(params, x)
        x_back, ld_inv = layer.inverse(params, y)
        jac = jax.vmap(jax.jacfwd(lambda xi: layer.forward(params, xi[None])[0][0]))(x).reshape(x.shape[0], n, n)
        sign, logabs = jnp.linalg.slogdet(jac)
        _, nl, li = layer.forward_split(params, x)
        return params, (x_back, ld, ld_inv, sign, logabs, nl + li)

    params, (x_back, ld, ld_inv, sign, logabs, split) = run(x)
    np.testing.assert_allclose(x_back, x, atol=1e-10)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-10)
    assert np.all(np.asarray(sign) != 0)
    np.testing.assert_allclose(ld, logabs, atol=1e-9)
    np.testing.assert_allclose(split, ld, atol=1e-10)
    return params


VEC = jax.random.normal(jax.random.key(0), (3, 6))
IMG = jax.random.normal(jax.random.key(2), (2, 4, 4, 2))

LAYERS = {
    "actnorm": F.ActNorm(),
    "conv1x1_lu": F.Invertible1x1Conv(lu=True),
    "conv1x1_dense": F.Invertible1x1Conv(lu=False),
    "affine_half": F.AffineCoupling(mask="half", parity=0, hidden=16),
    "affine_checker": F.AffineCoupling(mask="checkerboard", parity=1, hidden=16),
    "additive": F.AdditiveCoupling(mask="half", parity=1, hidden=16),
}


CASES = [(name, "vector") for name in sorted(LAYERS)] + [("actnorm", "image"), ("conv1x1_lu", "image"),
                                                          ("affine_checker", "image")]


@pytest.mark.parametrize("name,data", CASES)
def test_layer_inverse_and_logdet(name, data):
    x = (VEC if data == "vector" else IMG).astype(jnp.float64)
    _check_layer(LAYERS[name], x)


def test_squeeze_factor_out_and_glow():
    x = IMG.astype(jnp.float64)
    _check_layer(F.Squeeze(), x)
    _check_layer(F.Unsqueeze(), F.Squeeze().forward({}, x)[0])
    inner = F.Chain((F.Squeeze(), F.ActNorm(), F.Invertible1x1Conv(), F.Unsqueeze()))
    _check_layer(F.FactorOut(inner), jnp.concatenate([x, x[..., :1]], -1))  # odd channel count
    # squeeze is space-to-depth: y[:, i, j] holds the pixels of the 2x2 block x[:, 2i:2i+2, 2j:2j+2]
    # (a permutation that gathered far-apart pixels passed a plain permutation check; a mutation audit)
    y = np.asarray(F.Squeeze().forward({}, x)[0])
    assert y.shape == (2, 2, 2, 8)
    xn = np.asarray(x)
    for i in range(2):
        for j in range(2):
            block = xn[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(2, -1)
            np.testing.assert_array_equal(np.sort(y[:, i, j, :], -1), np.sort(block, -1))
    # a two-level Glow: exact inverse, log p = -E - log Z
    flow = F.glow((4, 4, 1), levels=2, steps_per_level=1, hidden=4)
    xi = jax.random.normal(jax.random.key(3), (2, 4, 4, 1), jnp.float64)

    @jax.jit
    def run(x):
        p = _perturb(flow.bijector.init(jax.random.key(0), x), jax.random.key(1))
        z, _ = flow.bijector.forward(p, x)
        return z, flow.bijector.inverse(p, z)[0], flow.log_prob(p, x), -flow.energy(p, x) - flow.log_normalizer(p)

    z, x_back, lp, ebm = run(xi)
    assert z.shape == xi.shape
    np.testing.assert_allclose(x_back, xi, atol=1e-10)
    np.testing.assert_allclose(ebm, lp, atol=1e-10)
    with pytest.raises(ValueError, match="divisible"):
        F.glow((6, 6, 1), levels=2)
    with pytest.raises(ValueError, match="even height"):
        F.Squeeze().forward({}, jnp.zeros((1, 3, 4, 1)))


@pytest.fixture(scope="module")
def flow2():
    flow = F.realnvp(3, num_steps=2, hidden=16, lu=False)
    x = jax.random.normal(jax.random.key(4), (64, 3), jnp.float64) * jnp.array([1.0, 2.0, 0.5]) + 1.0
    params = jax.jit(lambda x: _perturb(flow.bijector.init(jax.random.key(5), x), jax.random.key(6), 0.2))(x)
    return flow, params, x


def test_flow_log_prob_sample_and_energy(flow2):
    flow, params, x = flow2

    @jax.jit
    def run(params, x):
        lp = flow.log_prob(params, x)
        z, ld = flow.bijector.forward(params, x)
        ebm = -flow.energy(params, x) - flow.log_normalizer(params)
        s = flow.sample(params, jax.random.key(7), 5, jnp.float64)
        s_back = flow.bijector.inverse(params, flow.bijector.forward(params, s)[0])[0]
        score = flow.score(params, x)
        ref = jax.vmap(jax.grad(lambda xi: flow.log_prob(params, xi[None])[0]))(x)
        # brute force: log N(g(x)) + log|det| of the whole bijector's Jacobian, per sample
        jac = jax.vmap(jax.jacfwd(lambda xi: flow.bijector.forward(params, xi[None])[0][0]))(x)
        brute = gf.likelihood.gaussian_log_prob(z, 1.0) + jnp.linalg.slogdet(jac)[1]
        return lp, brute, ebm, s, s_back, score, ref

    lp, lp_ref, ebm, s, s_back, score, score_ref = run(params, x)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-12)
    np.testing.assert_allclose(ebm, lp, atol=1e-10)  # EBFlow: log p = -E - log Z, log Z independent of x
    assert s.shape == (5, 3) and np.all(np.isfinite(np.asarray(s)))
    np.testing.assert_allclose(s_back, s, atol=1e-10)
    np.testing.assert_allclose(score, score_ref, atol=1e-10)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3\]"):
        flow.log_prob(params, jnp.zeros((2, 4)))


def test_ebflow_training_skips_linear_logdets():
    """The point of EBFlow: the score-matching gradients contain no LU / determinant of the dense
    linear layers, the maximum-likelihood gradient does."""
    flow = F.realnvp(4, num_steps=2, hidden=8, lu=False)
    x = jax.random.normal(jax.random.key(0), (8, 4))
    params = flow.init(jax.random.key(1), x)

    def has_lu(method):
        loss = F.flow_objective(flow, method)
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p, x, jax.random.key(2))[0]))(params)
        return re.search(r"= lu ", str(jaxpr)) is not None  # the LU primitive behind slogdet

    assert has_lu("ml")
    assert not has_lu("ssm") and not has_lu("dsm")


def _gaussian_flow(d=3):
    """ActNorm + dense linear: a Gaussian model N(m, S) with known score."""
    flow = F.Flow(F.Chain((F.ActNorm(), F.Invertible1x1Conv(lu=False))), (d,))
    x = jax.random.normal(jax.random.key(8), (16, d), jnp.float64)
    params = jax.jit(lambda x: _perturb(flow.bijector.init(jax.random.key(9), x), jax.random.key(10), 0.3))(x)
    (an, lin) = params
    w = lin["w"] * jnp.exp(an["log_scale"])[None, :]  # z = W (x + b) diag-scaled
    prec = w.T @ w  # S^-1
    mean = -an["bias"]
    return flow, params, x, prec, mean


def test_ssm_loss_matches_closed_form():
    """SSM for N(m, S): E_v[v^T ds/dx v] + |s|^2/2 = -tr(S^-1) + |S^-1 (x - m)|^2 / 2 (per dim)."""
    flow, params, x, prec, mean = _gaussian_flow()
    ref = (-jnp.trace(prec) + 0.5 * jnp.mean(jnp.sum(((x - mean) @ prec) ** 2, -1))) / 3
    # Rademacher slices are exact for the quadratic-form trace only in expectation: average many
    vals = jax.jit(jax.vmap(lambda k: F.ssm_loss(flow, params, x, k, num_slices=32)))(
        jax.random.split(jax.random.key(1), 32))
    se = float(vals.std() / math.sqrt(32))
    assert abs(float(vals.mean()) - float(ref)) < 3 * se + 1e-12, (float(vals.mean()), float(ref), se)


def test_dsm_loss_matches_closed_form():
    """DSM for N(m, S): E_n |sigma s(x + sigma n) + n|^2 / 2
    = (sigma^2 |S^-1 (x - m)|^2 + ||I - sigma^2 S^-1||_F^2) / 2 (per dim)."""
    flow, params, x, prec, mean = _gaussian_flow()
    sigma = 0.3
    eye = jnp.eye(3)
    ref = 0.5 * (sigma**2 * jnp.mean(jnp.sum(((x - mean) @ prec) ** 2, -1))
                 + jnp.sum((eye - sigma**2 * prec) ** 2)) / 3
    vals = jax.jit(jax.vmap(lambda k: F.dsm_loss(flow, params, x, k, sigma)))(jax.random.split(jax.random.key(2), 2000))
    se = float(vals.std() / math.sqrt(vals.shape[0]))
    assert abs(float(vals.mean()) - float(ref)) < 3 * se, (float(vals.mean()), float(ref), se)


def test_flow_objective_errors():
    flow = F.realnvp(2, num_steps=1)
    with pytest.raises(ValueError, match="unknown flow objective"):
        F.flow_objective(flow, "kl")
    with pytest.raises(ValueError, match="coupling must be"):
        F.realnvp(2, coupling="spline")
    with pytest.raises(ValueError, match="unknown coupling mask"):
        F.coupling_mask((4,), "stripes")
    x = jax.random.normal(jax.random.key(0), (8, 2))
    params = flow.init(jax.random.key(1), x)
    with pytest.raises(TypeError, match="key must be one PRNG key"):  # (called directly: "invalid PRNG key data")
        F.flow_objective(flow, "ml")(params, x, 0)


# -- FFJORD ----------------------------------------------------------------------------------------------
A = jnp.array([[0.3, 0.6], [-0.4, -0.2]])


def _linear_field(params, x, t):
    return x @ params["a"].T


def test_cnf_log_prob_and_sample_on_linear_field():
    """dx/dt = A x: z = expm(A) x, log p(x) = log N(z) + tr(A); sampling inverts the map."""
    params = {"a": A.astype(jnp.float64)}
    x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
    lp, info = F.cnf_log_prob(_linear_field, params, x, rtol=1e-10, atol=1e-10)
    z = x @ jax.scipy.linalg.expm(params["a"]).T
    np.testing.assert_allclose(lp, gf.likelihood.gaussian_log_prob(z, 1.0) + jnp.trace(params["a"]), atol=1e-8)
    x_back = F.cnf_sample(_linear_field, params, z, solver="tsit5", rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x_back, x, atol=1e-7)


def test_ffjord_loss_unbiased_and_gradient():
    """Hutchinson loss: unbiased for the exact NLL; its gradient in A matches the exact one."""
    params = {"a": A.astype(jnp.float64)}
    x = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)

    def exact_nll(p):
        z = x @ jax.scipy.linalg.expm(p["a"]).T
        return -jnp.mean(gf.likelihood.gaussian_log_prob(z, 1.0) + jnp.trace(p["a"])) / 2

    loss = lambda p, k: F.ffjord_loss(_linear_field, p, x, k, solver="tsit5", steps=6)  # noqa: E731
    keys = jax.random.split(jax.random.key(2), 16)
    vals, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)))(params, keys)
    n = keys.shape[0]
    assert abs(float(vals.mean()) - float(exact_nll(params))) < 4 * float(vals.std() / math.sqrt(n)) + 1e-6
    g, g_ref = grads["a"], jax.grad(exact_nll)(params)["a"]
    assert float(jnp.max(g.std(0))) > 1e-3  # the estimate is random (rotation-like A: non-diagonal J)
    assert np.all(np.abs(np.asarray(g.mean(0) - g_ref)) < 4 * np.asarray(g.std(0)) / math.sqrt(n) + 1e-6)


def test_affine_coupling_with_a_saturated_scale_stays_finite():
    # sigmoid(h + 2) underflowed to 0 for h < ~-104 (float32): 0 * log 0 = NaN log-dets and
    # inverses from unused conditioning outputs, a -inf log-det with NaN gradients elsewhere
    layer = F.AffineCoupling(mask="half", hidden=4)
    x = jnp.array([[0.5, -1.0]], jnp.float32)
    p = layer.init(jax.random.key(0), x)
    last = sorted(k for k in p["params"] if k.startswith("Dense"))[-1]
    bias = p["params"][last]["bias"]  # [shift_0, shift_1, raw_0, raw_1]; position 0 conditions

    def with_bias(b):
        return {"params": {**p["params"], last: {**p["params"][last], "bias": b}}}

    p1 = with_bias(bias.at[2].set(-200.0))  # the conditioning position's (unused) raw scale
    y, ld = layer.forward(p1, x)
    x_back, ld_inv = layer.inverse(p1, y)
    assert np.all(np.isfinite(np.asarray(ld))) and np.allclose(x_back, x, atol=1e-6)
    p2 = with_bias(bias.at[3].set(-150.0))  # a saturated scale of the transformed position
    np.testing.assert_allclose(layer.forward(p2, x)[1], jax.nn.log_sigmoid(jnp.float32(-148.0)), rtol=1e-6)
    g = jax.grad(lambda b: layer.forward(with_bias(b), x)[1][0])(bias.at[3].set(-150.0))
    assert np.all(np.isfinite(np.asarray(g)))


def test_lu_conv_log_det_survives_weight_decay():
    # adamw shrank the stored permutation and signs (gradients stopped, decay not): W = P L U
    # changed while the log-det stayed sum(log_s)
    layer = F.Invertible1x1Conv(lu=True)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    p = layer.init(jax.random.key(1), x)
    p = {**p, "perm": 0.9 * p["perm"], "sign": 0.9 * p["sign"]}
    jac = jax.jacfwd(lambda v: layer.forward(p, v[None])[0][0])(x[0])
    np.testing.assert_allclose(layer.forward(p, x[:1])[1][0], jnp.linalg.slogdet(jac)[1], atol=1e-8)


def test_low_precision_data_with_float32_parameters():
    # bfloat16 batches: the 1x1 conv's init (QR / LU) had no bfloat16 kernel, and ActNorm / 1x1
    # conv log-dets were rounded to bfloat16 (~1.4 nats off on a 16x16x3 glow) while y was float32
    x32 = (0.3 * jax.random.normal(jax.random.key(0), (8, 3))).astype(jnp.float32)
    flow = F.realnvp(3, num_steps=1, hidden=8)
    assert np.all(np.isfinite(np.asarray(flow.log_prob(flow.init(jax.random.key(1), x32.astype(jnp.bfloat16)),
                                                       x32.astype(jnp.bfloat16)), np.float32)))
    glow = F.glow((8, 8, 3), levels=1, steps_per_level=1, hidden=8)
    x = (0.3 * jax.random.normal(jax.random.key(0), (4, 8, 8, 3))).astype(jnp.float32)
    p = jax.tree.map(lambda a: a.astype(jnp.float32), glow.init(jax.random.key(1), x))
    xb = x.astype(jnp.bfloat16)
    lp_b, lp_f = glow.log_prob(p, xb), glow.log_prob(p, xb.astype(jnp.float32))
    assert lp_b.dtype == jnp.float32
    np.testing.assert_allclose(lp_b, lp_f, rtol=1e-5)


def test_coupling_on_sequence_events_keeps_samples_independent():
    # a (3, 3) conv on [B, L, C] convolved over the batch axis: a sample's output and log-det
    # depended on its neighbours in the batch
    layer = F.AffineCoupling(hidden=8)
    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    p = _perturb(layer.init(jax.random.key(1), x), jax.random.key(2))
    y, ld = layer.forward(p, x)
    y1, ld1 = layer.forward(p, x[:1])
    np.testing.assert_allclose(y[:1], y1, atol=1e-10)
    np.testing.assert_allclose(ld[:1], ld1, atol=1e-10)
    jac = jax.jacfwd(lambda v: layer.forward(p, v[None])[0][0])(x[0]).reshape(20, 20)
    np.testing.assert_allclose(ld[0], jnp.linalg.slogdet(jac)[1], atol=1e-9)
    m = F.coupling_mask((5, 4), "checkerboard")
    assert m.shape == (5, 1) and np.asarray(m)[:, 0].tolist() == [1, 0, 1, 0, 1]


def test_flow_options_are_checked():
    for kw, name in ((dict(levels=0), "levels"), (dict(levels=-1), "levels"), (dict(steps_per_level=0),
                                                                                "steps_per_level")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            F.glow((4, 4, 1), **kw)
    with pytest.raises(ValueError, match=r"event_shape must be \(H, W, C\)"):
        F.glow((4, 4))
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        F.realnvp(2, num_steps=0)
    flow = F.realnvp(2, num_steps=1, hidden=4)
    with pytest.raises(ValueError, match="sigma must be a real > 0"):
        F.flow_objective(flow, "dsm", sigma=0.0)
    with pytest.raises(ValueError, match="num_slices must be a positive int"):
        F.flow_objective(flow, "ssm", num_slices=0)
    with pytest.raises(ValueError, match="dequantize must be a real > 0"):
        F.flow_objective(flow, "ml", dequantize=-1.0)
    with pytest.raises(ValueError, match=r"Squeeze needs images \[B, H, W, C\]"):
        F.Squeeze().forward({}, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="C divisible by 4"):
        F.Unsqueeze().forward({}, jnp.zeros((1, 2, 2, 2)))


def test_flow_init_compiles_once_per_bijector():
    # jax.jit(self.bijector.init) was a new function on every call: every init compiled again
    from genflow.flows import _flow

    flow = F.realnvp(3, num_steps=1, hidden=4)
    x = jax.random.normal(jax.random.key(0), (8, 3))
    before = _flow._init._cache_size()
    flow.init(jax.random.key(1), x)
    flow.init(jax.random.key(2), x)
    F.realnvp(3, num_steps=1, hidden=4).init(jax.random.key(3), x)  # an equal flow: the same compilation
    assert _flow._init._cache_size() - before == 1



def test_flow_methods_are_compiled_once_per_bijector():
    """log_prob / sample / energy / score / log_normalizer ran op by op (a RealNVP's log_prob
    36 ms against 0.7 ms compiled; perf review helper's finding): they are compiled once per
    bijector and shapes, and new data, keys and parameters reuse the programs."""
    flow = F.realnvp(2, num_steps=2, hidden=7)  # (a size no other test uses: the caches start empty)
    x = jax.random.normal(jax.random.key(0), (16, 2))
    params = flow.init(jax.random.key(1), x)

    def run(y, key, p):
        return [jax.block_until_ready(v) for v in (flow.log_prob(p, y), flow.sample(p, key, 16), flow.energy(p, y),
                                                   flow.score(p, y), flow.log_normalizer(p))]

    from genflow.flows import _flow

    cores = (_flow._log_prob, _flow._sample, _flow._energy, _flow._score, _flow._log_normalizer)
    before = [c._cache_size() for c in cores]
    first = run(x, jax.random.key(2), params)
    assert [c._cache_size() - b for c, b in zip(cores, before)] == [1, 1, 1, 1, 1]  # each call is one program
    y, key, p2 = x + 1.0, jax.random.key(3), jax.tree.map(lambda v: v * 1.01, params)
    assert count_compiles(lambda: run(y, key, p2)) == 0
    assert count_compiles(lambda: F.realnvp(2, num_steps=2, hidden=7).log_prob(params, x).block_until_ready()) == 0
    np.testing.assert_allclose(first[0], -first[2] - first[4], rtol=1e-5, atol=1e-5)  # log p = -E - log Z


def test_flow_builders_refuse_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        gf.flows.realnvp(2.5)  # built a Flow with event_shape (2.5,)
    with pytest.raises(ValueError, match="dequantize"):
        gf.flows.ffjord_objective(lambda p, x, t: x, dequantize=-1.0)  # flow_objective refused it, this did not
    # these failed only at the first training step, inside the jit
    with pytest.raises(ValueError, match="num_probes must be a positive int; got 0"):
        gf.flows.ffjord_objective(lambda p, x, t: x, num_probes=0)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        gf.flows.ffjord_objective(lambda p, x, t: x, solver="rk4")
    with pytest.raises(TypeError, match="ffjord_objective: .*num_probe"):
        gf.flows.ffjord_objective(lambda p, x, t: x, num_probe=2)


def test_nll_loss_matches_the_gaussian_closed_form():
    """nll_loss for the Gaussian N(m, S) that ActNorm + a dense linear layer define:
    -mean_x log N(x; m, S) / D, with log N = -(x-m)^T S^-1 (x-m)/2 + log det(S^-1)/2 - D log(2 pi)/2;
    and it is what flow_objective(flow, "ml") returns."""
    flow, params, x, prec, mean = _gaussian_flow()
    d = 3
    r = x - mean
    logp = -0.5 * jnp.sum((r @ prec) * r, -1) + 0.5 * jnp.linalg.slogdet(prec)[1] - 0.5 * d * math.log(2 * math.pi)
    ref = -float(jnp.mean(logp)) / d
    nll, (loss, _) = jax.jit(lambda p, x: (F.nll_loss(flow, p, x), F.flow_objective(flow, "ml")(p, x, jax.random.key(0))))(
        params, x)
    np.testing.assert_allclose(float(nll), ref, rtol=1e-10)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-10)
    # the maximum-likelihood fit lowers it: the sample's own Gaussian has a smaller NLL
    s_hat = jnp.cov(x.T, bias=True)
    best = 0.5 * (d * math.log(2 * math.pi) + jnp.linalg.slogdet(s_hat)[1] + d) / d
    assert ref > float(best)


def test_invertible_1x1_conv_with_bfloat16_parameters():
    # a params tree cast to bfloat16: jnp.linalg.inv / slogdet have no bfloat16 kernel, so sample
    # (both lu) and log_prob (lu=False) failed with NotImplementedError('Unsupported dtype bfloat16')
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float32)
    for lu in (True, False):
        flow = F.realnvp(3, num_steps=1, hidden=4, lu=lu)
        p = flow.init(jax.random.key(1), x)
        pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
        s = flow.sample(pb, jax.random.key(2), 4, jnp.bfloat16)
        assert s.shape == (4, 3) and np.all(np.isfinite(np.asarray(s, np.float32)))
        lp = np.asarray(flow.log_prob(pb, x.astype(jnp.bfloat16)), np.float32)
        ref = np.asarray(flow.log_prob(jax.tree.map(lambda a: a.astype(jnp.float32), pb), x), np.float32)
        np.testing.assert_allclose(lp, ref, rtol=0.05, atol=0.1)
        np.testing.assert_allclose(np.asarray(flow.log_normalizer(pb), np.float32),
                                   np.asarray(flow.log_normalizer(p), np.float32), rtol=0.05, atol=0.05)


def test_cnf_sample_refuses_steps_it_would_ignore():
    # steps=1 and steps=1000 gave bit-identical samples with the default (adaptive) tsit5, while
    # cnf_log_prob / ffjord_loss read steps as a fixed grid for the same solver
    params = {"a": A.astype(jnp.float64)}
    z = jnp.ones((2, 2), jnp.float64)
    with pytest.raises(ValueError, match="steps=8 has no effect on the adaptive solver 'tsit5'"):
        F.cnf_sample(_linear_field, params, z, steps=8)
    with pytest.raises(ValueError, match="a CNF is sampled by its ODE"):
        F.cnf_sample(_linear_field, params, z, solver="ddpm", steps=4)
    x = F.cnf_sample(_linear_field, params, z, rtol=1e-10, atol=1e-10)  # adaptive, no steps: as before
    np.testing.assert_allclose(x, z @ jax.scipy.linalg.expm(-params["a"]).T, atol=1e-8)
    e10, e40 = (float(jnp.max(jnp.abs(F.cnf_sample(_linear_field, params, z, solver="heun", steps=n)
                                      - z @ jax.scipy.linalg.expm(-params["a"]).T))) for n in (10, 40))
    assert e40 < e10 / 8  # a fixed-step solver does take the steps it is given (2nd order)


def test_flow_sample_and_builders_name_bad_arguments():
    flow = F.realnvp(3, num_steps=1, hidden=4)
    p = flow.init(jax.random.key(0), jax.random.normal(jax.random.key(1), (8, 3)))
    for n in (0, -1, 2.0):  # ZeroDivisionError / MLIRError / an unnamed shape TypeError
        with pytest.raises(ValueError, match="n must be a positive int"):
            flow.sample(p, jax.random.key(2), n)
    for kw, name in ((dict(hidden=0), "hidden"), (dict(hidden=-3), "hidden"), (dict(hidden=2.5), "hidden"),
                     (dict(depth=-1), "depth")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            F.realnvp(3, num_steps=1, **kw)
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            F.glow((4, 4, 1), levels=1, **kw)
    for shape in ((4, 4, 0), (-4, 4, 1), (0, 0, 1)):
        with pytest.raises(ValueError, match="event_shape must be"):
            F.glow(shape, levels=1)


def test_coupling_activation_and_mask_parity_are_named():
    """AffineCoupling(activation="foo") raised a bare KeyError('foo'); coupling_mask read parity=0.5
    as odd and failed on a string parity with a format error."""
    layer = F.AffineCoupling(hidden=4, depth=1, activation="foo")
    with pytest.raises(ValueError, match="unknown activation 'foo'"):
        layer.init(jax.random.key(0), jnp.ones((4, 4)))
    for bad in (0.5, "1", -1):
        with pytest.raises(ValueError, match="parity must be an int >= 0"):
            F.coupling_mask((4,), "half", bad)
    np.testing.assert_array_equal(F.coupling_mask((4,), "half", 1), [0, 0, 1, 1])


def test_actnorm_data_dependent_init_normalizes_every_actnorm_of_a_chain():
    """ActNorm's init sets b = -mean, s = -log std of *its own input*, so the output of the init batch has
    zero mean and unit variance per channel; in a Chain each layer is initialised on the output of the
    layers before it (the second ActNorm below sees the rotated, normalized data, not the raw x)."""
    x = jax.random.normal(jax.random.key(0), (256, 3)) * jnp.array([3.0, 0.5, 2.0]) + jnp.array([5.0, -1.0, 2.0])
    a = F.ActNorm()
    y, _ = a.forward(a.init(jax.random.key(1), x), x)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-4)
    # images: statistics over batch and spatial positions, per channel
    img = jax.random.normal(jax.random.key(2), (4, 4, 4, 2)) * 2.0 + 1.0
    yi, _ = a.forward(a.init(jax.random.key(1), img), img)
    np.testing.assert_allclose(yi.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(yi.std((0, 1, 2)), 1.0, rtol=1e-4)
    # a chain: each ActNorm is initialised on the output of the layers before it (the second one on
    # the rotated, normalized data, not on the raw x)
    chain = F.Chain((F.ActNorm(), F.Invertible1x1Conv(lu=False), F.ActNorm()))
    z0, _ = chain.forward(chain.init(jax.random.key(3), x), x)
    np.testing.assert_allclose(z0.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z0.std(0), 1.0, rtol=1e-4)


def test_dequantize_option_adds_noise_centred_on_the_bin():
    """flow_objective / ffjord_objective(dequantize=w): x + (u - 1/2) w, centred on the data (the bin
    centres), uniform of width w. With an identity flow (an empty Chain; a zero CNF field) the
    loss is 0.5 mean ||x_deq||^2 / D + 0.5 log(2 pi): at x = +-c with one key,
    loss(c) - loss(-c) = 2 c mean(noise): ~0 for centred noise (c w for the uncentred u w)."""
    b, d, w, c = 4096, 2, 0.5, 3.0
    flow = F.Flow(F.Chain(()), (d,))
    zero_field = lambda params, x, t: jnp.zeros_like(x)  # noqa: E731
    objectives = {
        "flow": F.flow_objective(flow, "ml", dequantize=w),
        "ffjord": F.ffjord_objective(zero_field, dequantize=w, solver="euler", steps=1),
    }
    key = jax.random.key(0)
    for name, loss_fn in objectives.items():
        plus = float(loss_fn((), jnp.full((b, d), c), key)[0])
        minus = float(loss_fn((), jnp.full((b, d), -c), key)[0])
        zero = float(loss_fn((), jnp.zeros((b, d)), key)[0])
        # loss(+-c) = 0.5 mean((+-c + delta)^2) + const: the difference is 2 c mean(delta)
        mean_delta = (plus - minus) / (2 * c)
        assert abs(mean_delta) < 4 * w / math.sqrt(12 * b * d), (name, mean_delta)
        # the spread: 0.5 mean(delta^2) = 0.5 w^2 / 12
        np.testing.assert_allclose(zero - 0.5 * math.log(2 * math.pi), 0.5 * w * w / 12, rtol=0.1, err_msg=name)


def test_actnorm_initialised_on_bfloat16_data_keeps_a_float32_log_det():
    """Flow.init on bfloat16 data (as the flow will see it) gave bfloat16 ActNorm parameters and a
    bfloat16 log-det: 888 for an exact 887.0, and a 16x16x3 glow's log p off by 1-4 nats."""
    x = (jax.random.normal(jax.random.key(0), (8, 16, 16, 3)) * jnp.array([0.3, 2.0, 0.05]) + 0.5).astype(jnp.bfloat16)
    layer = F.ActNorm()
    p = layer.init(None, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(p))
    y, ld = layer.forward(p, x)
    exact = 256 * np.sum(np.asarray(p["log_scale"], np.float64))
    np.testing.assert_allclose(np.asarray(ld, np.float64), exact, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.inverse(p, y)[1], np.float64), -exact, rtol=1e-6)
    glow = F.glow((16, 16, 3), levels=2, steps_per_level=1, hidden=8)
    pg = glow.init(jax.random.key(1), x)
    lp_b = glow.log_prob(pg, x)
    lp_f = glow.log_prob(jax.tree.map(lambda a: a.astype(jnp.float64), pg), x.astype(jnp.float64))
    np.testing.assert_allclose(np.asarray(lp_b, np.float64), lp_f, atol=0.05 * 16 * 16 * 3 * 2 ** -8 + 0.1)


def test_flow_sample_is_the_inverse_map_of_base_draws(flow2):
    """sample(key, n) = g^-1(z) for z ~ N(0, I) drawn from that key: g(sample) gives back z (an
    inverse-then-forward round trip alone holds for any sample)."""
    flow, params, _ = flow2
    s = flow.sample(params, jax.random.key(7), 5, jnp.float64)
    z = jax.random.normal(jax.random.key(7), (5, 3), jnp.float64)
    np.testing.assert_allclose(flow.bijector.forward(params, s)[0], z, atol=1e-10)


def test_checkerboard_mask_pattern():
    m = np.asarray(F.coupling_mask((4, 4, 2), "checkerboard"))
    expect = (np.add.outer(np.arange(4), np.arange(4)) % 2 == 0).astype(np.float32)
    assert m.shape[:2] == (4, 4)
    np.testing.assert_array_equal(np.broadcast_to(m, (4, 4, 2)), np.stack([expect, expect], -1))
    np.testing.assert_array_equal(np.asarray(F.coupling_mask((4, 4, 2), "checkerboard", parity=1))[..., 0], 1 - expect)
    # a perturbed coupling changes exactly the unmasked entries
    layer = F.AffineCoupling(mask="checkerboard", hidden=8)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2), jnp.float64)
    p = _perturb(layer.init(jax.random.key(1), x), jax.random.key(2))
    y = np.asarray(layer.forward(p, x)[0])
    changed = np.abs(y - np.asarray(x)) > 1e-12
    kept = np.broadcast_to(m.astype(bool), y.shape)
    assert not changed[kept].any() and changed[~kept].all()


def _affine_field(params, x, t):
    return x @ params["a"].T + t[:, None] * params["c"]


def test_cnf_direction_of_time_on_a_time_dependent_linear_field():
    """dx/dt = A x + t c (t = 0 data, t = 1 noise): the flow map to t = 1 is the top rows of
    expm(M) on the augmented state [x, t, 1] (M: A, c in the t-column, dt/dt = 1), and
    log p(x) = log N(z) + tr(A). The time-reversed field is 0.33 nats off here."""
    a = A.astype(jnp.float64)
    c = jnp.array([0.8, -0.5], jnp.float64)
    params = {"a": a, "c": c}
    m = jnp.zeros((4, 4), jnp.float64).at[:2, :2].set(a).at[:2, 2].set(c).at[2, 3].set(1.0)
    x = jax.random.normal(jax.random.key(0), (32, 2), jnp.float64)
    aug = jnp.concatenate([x, jnp.zeros((32, 1)), jnp.ones((32, 1))], axis=1)
    z = (aug @ jax.scipy.linalg.expm(m).T)[:, :2]
    lp, _ = F.cnf_log_prob(_affine_field, params, x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lp, gf.likelihood.gaussian_log_prob(z, 1.0) + jnp.trace(a), atol=1e-8)
    np.testing.assert_allclose(F.cnf_sample(_affine_field, params, z, rtol=1e-10, atol=1e-10), x, atol=1e-7)
    lp_g, _ = F.cnf_log_prob(_affine_field, params, x, trace="hutchinson", probe="gaussian", key=jax.random.key(1),
                             num_probes=64, rtol=1e-8, atol=1e-8)
    # unbiased: the signed mean error over the batch (measured -0.026..+0.024 over 4 keys; the
    # former bound, mean |error| < 0.5, could not see a dropped divergence: tr A = 0.1 nats)
    assert np.all(np.isfinite(np.asarray(lp_g))) and abs(float(jnp.mean(lp_g - lp))) < 0.06


def test_flows_name_more_bad_arguments():
    flow = F.realnvp(3, num_steps=1, hidden=8)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    params = flow.init(jax.random.key(1), x)
    for kw in ({"sigma": float("inf"), "method": "dsm"}, {"dequantize": float("inf")}):
        name = next(k for k in kw if k != "method")
        with pytest.raises(ValueError, match=f"{name} must be a real > 0"):
            F.flow_objective(flow, **kw)
    with pytest.raises(TypeError, match="lu must be a bool"):
        F.realnvp(3, lu="no")
    with pytest.raises(TypeError, match="lu must be a bool"):
        F.glow((4, 4, 1), levels=1, lu=1)
    with pytest.raises(ValueError, match="hidden must be"):
        F.AffineCoupling(hidden=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x has non-finite entries .* rows \[2\]"):
        flow.init(jax.random.key(1), x.at[2, 0].set(jnp.nan))
    with pytest.raises(TypeError, match="x must be an array"):
        flow.log_prob(params, [[0.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match="key"):
        flow.sample(params, 0, 3)
    with pytest.raises(ValueError, match="z must be an array"):
        F.cnf_sample(_linear_field, {"a": A}, jnp.ones((2,)))
    bad = jnp.ones((3, 2)).at[1, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"x has non-finite entries .* rows \[1\]"):
        F.cnf_log_prob(_linear_field, {"a": A}, bad)
    with pytest.raises(ValueError, match=r"z has non-finite entries .* rows \[1\]"):
        F.cnf_sample(_linear_field, {"a": A}, bad)  # (named x1, gf.sample's argument, before)
    with pytest.raises(TypeError, match="z must be a floating-point array"):
        F.cnf_sample(_linear_field, {"a": A}, jnp.ones((3, 2), jnp.int32))
    x = F.cnf_sample(_linear_field, {"a": A}, bad, solver="heun", steps=4)  # fixed steps: the NaN stays in its row
    assert np.isnan(np.asarray(x)[1]).any() and np.all(np.isfinite(np.asarray(x)[[0, 2]]))
    # (a fixed-step solve keeps the NaN in its own row, as before)
    lp, _ = F.cnf_log_prob(_linear_field, {"a": A}, bad, solver="heun", steps=4)
    lp = np.asarray(lp)
    assert np.isnan(lp[1]) and np.all(np.isfinite(lp[[0, 2]]))


def test_dequantize_promotes_integer_and_bfloat16_batches():
    """Dequantization is meant for integer and low-precision data: an int32 batch failed
    ("dtype argument to uniform must be a float dtype") and bfloat16 noise rounded onto the bin's
    open upper edge."""
    flow = F.Flow(F.Chain(()), (2,))
    zero_field = lambda params, x, t: jnp.zeros_like(x)  # noqa: E731
    w = 0.125
    for loss_fn in (F.flow_objective(flow, "ml", dequantize=w),
                    F.ffjord_objective(zero_field, dequantize=w, solver="euler", steps=1)):
        for batch in (jnp.full((512, 2), 3, jnp.int32), jnp.full((512, 2), 0.875, jnp.bfloat16)):
            loss = float(loss_fn((), batch, jax.random.key(0))[0])
            c = float(batch[0, 0])
            # identity map: loss = 0.5 mean(x_deq^2) + 0.5 log(2 pi), x_deq in (c - w/2, c + w/2)
            assert 0.5 * (c - w / 2) ** 2 < loss - 0.5 * math.log(2 * math.pi) < 0.5 * (c + w / 2) ** 2, (batch.dtype, loss)


def test_ffjord_loss_is_per_dimension_for_multi_axis_data():
    """-mean log p(x) / D with D the number of features of x: [B, ...], all axes after the batch (a
    [5, 2, 3] batch has D = 6; the tests above use [B, D] data, where the last axis alone agrees).
    With a zero field the flow is the identity and log p is the standard normal's."""
    x = jax.random.normal(jax.random.key(0), (5, 2, 3), jnp.float64)
    loss = F.ffjord_loss(lambda p, x, t: jnp.zeros_like(x), {}, x, jax.random.key(1), solver="heun", steps=4)
    want = -np.mean(gf.likelihood.gaussian_log_prob(x.reshape(5, -1), 1.0)) / 6
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


# -- from the eighth mutation audit (flows; each test fails on its mutant) --
def test_lu_conv_is_initialised_at_a_rotation():
    """Invertible1x1Conv docstring: 'Initialised at a random rotation', W = P L (U + diag(sign exp(log_s))).
    The LU parametrization must reproduce an orthogonal W at init (dropping `sign` gives P L |U|)."""
    x = jnp.zeros((2, 5))
    for k in range(4):
        layer = F.Invertible1x1Conv(lu=True)
        w, logdet = layer.weight(layer.init(jax.random.key(k), x))
        np.testing.assert_allclose(np.asarray(w @ w.T), np.eye(5), atol=1e-5)
        np.testing.assert_allclose(float(logdet), 0.0, atol=1e-5)


def test_half_mask_conditions_on_the_first_floor_half_of_an_odd_channel_count():
    """coupling_mask docstring: 'half': the first C // 2 channels (last axis); FactorOut: the last
    C - C//2 channels leave the flow and the first C//2 continue through inner."""
    np.testing.assert_array_equal(np.asarray(F.coupling_mask((5,), "half")).ravel(), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(F.coupling_mask((2, 2, 3), "half")).ravel(), [1, 0, 0])
    # FactorOut with a 3-channel input: exactly channels [1:] are untouched, channel 0 goes through inner
    inner = F.ActNorm()
    fo = F.FactorOut(inner)
    x = jax.random.normal(jax.random.key(0), (8, 3)) * 3.0 + 2.0
    p = fo.init(jax.random.key(1), x)
    y, _ = fo.forward(p, x)
    np.testing.assert_array_equal(np.asarray(y[:, 1:]), np.asarray(x[:, 1:]))
    assert np.all(np.abs(np.asarray(y[:, 0] - x[:, 0])) > 1e-3)


def test_realnvp_couplings_alternate_halves():
    """realnvp docstring: 'coupling on alternating halves'. Same-parity couplings would leave the
    conditioning half untouched by every coupling."""
    flow = F.realnvp(4, num_steps=4, hidden=4)
    couplings = [l for l in flow.bijector.layers if isinstance(l, F.AffineCoupling)]
    masks = [np.asarray(F.coupling_mask((4,), l.mask, l.parity)) for l in couplings]
    for a, b in zip(masks, masks[1:]):
        np.testing.assert_array_equal(a + b, np.ones(4))  # consecutive masks are complements


def test_flow_objective_passes_sigma_and_num_slices_through():
    """flow_objective docstring: 'sigma: noise of "dsm"', 'num_slices: projections of "ssm"'.
    dsm on the identity flow (score -x): E = (sigma^2 mean|x|^2 + D (1 - sigma^2)^2) / (2 D).
    ssm on a linear flow z = M x: more slices lower the variance over keys (~1/sqrt(num_slices))."""
    d = 2
    ident = F.Flow(F.Chain(()), (d,))
    x = jax.random.normal(jax.random.key(0), (4096, d))
    sigma = 0.7
    want = (sigma**2 * float(jnp.mean(jnp.sum(x * x, -1))) + d * (1 - sigma**2) ** 2) / (2 * d)
    got = float(F.flow_objective(ident, "dsm", sigma=sigma)((), x, jax.random.key(1))[0])
    assert abs(got - want) < 0.02, (got, want)  # the default sigma = 0.05 gives ~0.50, want ~0.30

    lin = F.Flow(F.Chain((F.Invertible1x1Conv(lu=False),)), (3,))
    m = jnp.array([[1.0, 0.8, 0.0], [0.0, 1.0, -0.7], [0.5, 0.0, 1.0]])
    p = ({"w": m},)
    xs = jax.random.normal(jax.random.key(2), (4, 3))
    keys = jax.random.split(jax.random.key(3), 64)

    def spread(n):
        loss = F.flow_objective(lin, "ssm", num_slices=n)
        return float(jnp.std(jax.vmap(lambda k: loss(p, xs, k)[0])(keys)))

    assert spread(64) < spread(1) / 3


def test_ffjord_objective_passes_its_options_to_ffjord_loss():
    """ffjord_objective(**kwargs) is 'loss_fn of ffjord_loss' with those options. dx/dt = A x with a
    skew off-diagonal part (Rademacher Hutchinson trace exact: v^T A v = tr A); one Euler step gives
    z = (I + A) x and the loss -mean(log N(z) + tr A) / D exactly; the default solve gives expm(A) x."""
    a = jnp.array([[0.3, 0.9], [-0.9, -0.2]])
    field = lambda params, x, t: x @ params["a"].T  # noqa: E731
    x = 2.0 * jax.random.normal(jax.random.key(0), (32, 2))
    got = float(F.ffjord_objective(field, solver="euler", steps=1)({"a": a}, x, jax.random.key(1))[0])
    z = x @ (jnp.eye(2) + a).T
    want = float(-jnp.mean(gf.likelihood.gaussian_log_prob(z, 1.0) + jnp.trace(a)) / 2)
    z_exact = x @ jax.scipy.linalg.expm(a).T
    other = float(-jnp.mean(gf.likelihood.gaussian_log_prob(z_exact, 1.0) + jnp.trace(a)) / 2)
    assert abs(want - other) > 0.1  # the check can tell the two solves apart
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ssm_loss_uses_the_requested_probe():
    """ssm_loss(probe=...): with a diagonal Jacobian ds/dx (an ActNorm-only flow) Rademacher slices give
    v^T J v = tr J exactly (no spread over keys), Gaussian slices do not."""
    flow = F.Flow(F.Chain((F.ActNorm(),)), (3,))
    p = ({"bias": jnp.array([0.1, -0.2, 0.3]), "log_scale": jnp.array([0.5, -0.3, 0.2])},)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    keys = jax.random.split(jax.random.key(1), 32)
    spread = {pr: float(jnp.std(jax.vmap(lambda k: F.ssm_loss(flow, p, x, k, probe=pr))(keys)))
              for pr in ("rademacher", "gaussian")}
    assert spread["rademacher"] < 1e-6 < 1e-2 < spread["gaussian"], spread


def test_conv1x1_log_det_of_bfloat16_parameters_is_float32():
    """The 1x1 convolution's log-det in float32 or wider, as ActNorm's (review of the seventh
    mutation audit): bfloat16 parameters gave a bfloat16 log-det, 616.0 where float32 gives 615.31
    on [2, 16, 16, 8] (bfloat16 resolves 4 at that size)."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8), jnp.float32)
    for lu in (True, False):
        layer = F.Invertible1x1Conv(lu=lu)
        p = layer.init(jax.random.key(1), x)
        if lu:
            p = {**p, "log_s": p["log_s"] + jnp.linspace(0.13, 0.71, 8)}
        else:
            p = {"w": p["w"] * jnp.linspace(1.1, 1.6, 8)[:, None]}
        pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
        want = float(jnp.linalg.slogdet(layer.weight(jax.tree.map(lambda a: a.astype(jnp.float32), pb))[0])[1]) * 256
        y, ld = layer.forward(pb, x.astype(jnp.bfloat16))
        _, ldi = layer.inverse(pb, y)
        assert ld.dtype == ldi.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ld), want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ldi), -want, rtol=1e-5)


def test_checkerboard_masks_alternate_over_every_spatial_axis_and_chains_take_lists():
    """coupling_mask('checkerboard') used only the first two axes: a [D, H, W, C] input got a
    [D, H, 1] mask (a broadcasting error in AffineCoupling, or a wrong mask where sizes lined
    up); Chain([...]) failed later as a non-hashable static argument."""
    from genflow.flows._layers import coupling_mask
    m = np.asarray(coupling_mask((2, 3, 4, 2), "checkerboard"))
    assert m.shape == (2, 3, 4, 1)
    i, j, k = np.meshgrid(np.arange(2), np.arange(3), np.arange(4), indexing="ij")
    assert np.array_equal(m[..., 0], ((i + j + k) % 2 == 0).astype(m.dtype))
    m2 = np.asarray(coupling_mask((4, 4, 2), "checkerboard"))  # the image case is unchanged
    assert np.array_equal(m2[..., 0], ((np.arange(4)[:, None] + np.arange(4)[None]) % 2 == 0).astype(m2.dtype))
    x = jax.random.normal(jax.random.key(0), (2, 2, 3, 4, 2))
    layer = F.AffineCoupling(mask="checkerboard", hidden=4)
    p = layer.init(jax.random.key(1), x)
    y, ld = layer.forward(p, x)
    xr, ldi = layer.inverse(p, y)
    assert np.allclose(xr, x, atol=1e-10) and np.allclose(ld, -ldi, atol=1e-10)
    chain = F.Chain([F.ActNorm(), F.ActNorm()])
    assert isinstance(chain.layers, tuple)
    flow = F.Flow(chain, (3,))
    params = flow.init(jax.random.key(2), jax.random.normal(jax.random.key(3), (5, 3)))
    assert flow.log_prob(params, jnp.zeros((2, 3))).shape == (2,)


def test_flow_objectives_name_empty_integer_and_misshapen_batches():
    """An empty batch gave a NaN loss (diffusion_loss refused it); integer data was fitted as a
    continuous density by "ml" and failed inside JAX for "ssm" / "dsm" (FFJORD refused it); a
    tuple or a dict without "x" failed as an AttributeError / KeyError."""
    flow = F.realnvp(3, num_steps=1, hidden=8)
    x = jax.random.normal(jax.random.key(0), (8, 3))
    params = flow.init(jax.random.key(0), x)
    key = jax.random.key(1)
    zero_field = lambda p, x, t: x * p["a"]  # noqa: E731
    objectives = [(F.flow_objective(flow, m), params) for m in F.OBJECTIVES]
    objectives.append((F.ffjord_objective(zero_field, solver="euler", steps=2), {"a": jnp.zeros(())}))
    for loss_fn, p in objectives:
        with pytest.raises(ValueError, match=r"x must be a floating-point array \[B, ...\] with B >= 1; got dtype "
                                             r"float\d+, shape \(0, 3\)"):
            loss_fn(p, jnp.zeros((0, 3)), key)
        with pytest.raises(ValueError, match=r"got dtype int32, shape \(8, 3\) \(integer data: dequantize"):
            loss_fn(p, jnp.round(3 * x).astype(jnp.int32), key)
        with pytest.raises(TypeError, match="batch must be an array x"):
            loss_fn(p, (x, x[:, 0]), key)
        with pytest.raises(ValueError, match="a dict batch needs an 'x' entry"):
            loss_fn(p, {"y": x}, key)
        assert np.isfinite(float(loss_fn(p, {"x": x}, key)[0]))
    for loss in (lambda b: F.nll_loss(flow, params, b), lambda b: F.ssm_loss(flow, params, b, key),
                 lambda b: F.dsm_loss(flow, params, b, key),
                 lambda b: F.ffjord_loss(zero_field, {"a": jnp.zeros(())}, b, key, solver="euler", steps=2)):
        with pytest.raises(ValueError, match="with B >= 1"):
            loss(jnp.zeros((0, 3)))
    # dequantized integer batches train, as documented
    deq = F.flow_objective(flow, "ml", dequantize=1.0)(params, jnp.round(3 * x).astype(jnp.int32), key)[0]
    assert np.isfinite(float(deq))


def test_chain_refuses_params_of_another_flow_and_event_shape_is_normalised():
    """A params tuple of another length was cut by zip: log_prob used the first parameter sets,
    sample the last ones (sample was then not the inverse of log_prob: 6.2 off), and too few skipped
    layers silently -- e.g. a checkpoint of a flow with more steps."""
    x = jax.random.normal(jax.random.key(1), (4, 3))
    small = F.realnvp(3, num_steps=2, hidden=8)
    big = F.realnvp(3, num_steps=3, hidden=8).init(jax.random.key(0), x)
    for p in (big, big[:3]):
        with pytest.raises(ValueError, match=r"Chain has 6 layers but params has (9|3) entries"):
            small.log_prob(p, x)
        with pytest.raises(ValueError, match="Chain has 6 layers"):
            small.sample(p, jax.random.key(2), 4)
    p = small.init(jax.random.key(0), x)
    assert small.log_prob(list(p), x).shape == (4,)  # (a list, as a restored checkpoint may hold, is fine)
    # an int event_shape is read as (D,) (it failed at the first log_prob); bad ones are named
    flow = F.Flow(small.bijector, 3)
    assert flow.event_shape == (3,)
    np.testing.assert_allclose(flow.log_prob(p, x), small.log_prob(p, x))
    for bad in ((3, 0), "3", (2.0,), None):
        with pytest.raises(ValueError, match="event_shape must be a tuple of positive ints"):
            F.Flow(small.bijector, bad)
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        small.sample(p, jax.random.key(2), 2, jnp.complex64)  # (complex "samples" before)


def test_cnf_log_prob_passes_chunk_size_and_max_steps_through():
    params = {"a": A.astype(jnp.float64)}
    x = jax.random.normal(jax.random.key(0), (4, 2), jnp.float64)
    lp, _ = F.cnf_log_prob(_linear_field, params, x, rtol=1e-10, atol=1e-10)
    lp_chunked, _ = F.cnf_log_prob(_linear_field, params, x, rtol=1e-10, atol=1e-10, chunk_size=1)
    np.testing.assert_allclose(lp_chunked, lp, rtol=1e-12)
    with pytest.raises(Exception, match="max_steps|maximum number of solver steps"):
        F.cnf_log_prob(_linear_field, params, x, rtol=1e-12, atol=1e-12, max_steps=2)


def test_a_layer_of_ones_own_with_a_misshapen_logdet_or_unhashable_is_named():
    """A layer returning logdet [B, 1] made log_prob [B, B] by broadcasting, silently; [B, D] failed
    as "Incompatible shapes for broadcasting"; an unfrozen dataclass layer as JAX's "Non-hashable
    static arguments" (extension audit). The contract is in gf.flows.Layer's docstring."""
    import dataclasses

    x = jax.random.normal(jax.random.key(0), (8, 2))

    @dataclasses.dataclass(frozen=True)
    class ScaleKeep(gf.flows.Layer):
        keepdims: bool = True

        def forward(self, p, x):
            ld = jnp.sum(jnp.full(x.shape, jnp.log(2.0)), -1, keepdims=self.keepdims)
            return 2 * x, ld

        def inverse(self, p, y):
            return y / 2, -jnp.sum(jnp.full(y.shape, jnp.log(2.0)), -1, keepdims=self.keepdims)

    @dataclasses.dataclass(frozen=True)
    class ScalePerDim(ScaleKeep):
        def forward(self, p, x):
            return 2 * x, jnp.full(x.shape, jnp.log(2.0))

    for bij in (ScaleKeep(), gf.flows.Chain([ScaleKeep()]), ScalePerDim()):
        flow = gf.flows.Flow(bij, (2,))
        with pytest.raises(ValueError, match=r"Scale(Keep|PerDim).forward must return \(y, logdet\) with logdet of "
                                             r"shape \[B\] = \(8,\)"):
            flow.log_prob(flow.init(jax.random.key(1), x), x)
    flow = gf.flows.Flow(gf.flows.Chain([ScaleKeep(keepdims=False)]), (2,))
    params = flow.init(jax.random.key(1), x)
    logp = flow.log_prob(params, x)
    ref = jax.scipy.stats.norm.logpdf(2 * x).sum(-1) + 2 * jnp.log(2.0)
    np.testing.assert_allclose(logp, ref, rtol=1e-6)
    with pytest.raises(ValueError, match=r"ScaleKeep.inverse must return"):
        gf.flows.Chain([ScaleKeep()]).inverse(((),), x)

    @dataclasses.dataclass
    class Unfrozen(gf.flows.Layer):
        scale: float = 2.0

        def forward(self, p, x):
            return self.scale * x, jnp.full(x.shape[:1], x.shape[1] * jnp.log(self.scale))

    with pytest.raises(TypeError, match="bijector must be hashable, each layer a frozen dataclass .* Unfrozen is not"):
        gf.flows.Flow(gf.flows.Chain([ScaleKeep(), Unfrozen()]), (2,))


def test_a_flow_initialised_on_float64_data_has_float64_parameters_throughout():
    """Under x64, realnvp / glow initialised on float64 data: every parameter float64 -- the coupling
    conditioners' Dense / Conv layers stayed float32 (flax's default) beside float64 ActNorm and 1x1
    convolutions, rounding them at every update (composability audit) -- and float32 data still
    gives float32 parameters."""
    for flow, shape in ((gf.flows.realnvp(2, num_steps=2, hidden=8, depth=1), (6, 2)),
                        (gf.flows.glow((4, 4, 2), levels=1, steps_per_level=1, hidden=8), (2, 4, 4, 2))):
        for dtype in (jnp.float64, jnp.float32):
            x = jax.random.normal(jax.random.key(1), shape, dtype)
            leaves = jax.tree_util.tree_leaves(flow.init(jax.random.key(0), x))
            assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(dtype)}


def _layers(layer):
    """Every layer of a bijector, depth first (through Chains and FactorOut's inner flow)."""
    out = [layer]
    for sub in getattr(layer, "layers", ()):
        out += _layers(sub)
    inner = getattr(layer, "inner", None) or getattr(layer, "flow", None) or getattr(layer, "bijector", None)
    if inner is not None:
        out += _layers(inner)
    return out


def test_glow_and_realnvp_steps_are_actnorm_then_linear_then_coupling_and_glow_has_its_levels():
    """Docstrings: each step is (ActNorm, invertible linear, coupling), in this order; Glow has one
    squeeze per level and a factor-out after every level but the last (counted, as the layer
    order; the channels a factor-out keeps are tested with test_squeeze_factor_out_and_glow)."""
    flow = F.realnvp(4, num_steps=3, hidden=4)
    kinds = [type(l) for l in flow.bijector.layers]
    assert kinds == [F.ActNorm, F.Invertible1x1Conv, F.AffineCoupling] * 3
    for levels in (1, 2, 3):
        g = F.glow((8, 8, 1), levels=levels, steps_per_level=2, hidden=4)
        layers = _layers(g.bijector)
        assert sum(isinstance(l, F.Squeeze) for l in layers) == levels
        assert sum(isinstance(l, F.FactorOut) for l in layers) == levels - 1
        core = [l for l in layers if isinstance(l, (F.ActNorm, F.Invertible1x1Conv, F.AffineCoupling))]
        assert [type(l) for l in core] == [F.ActNorm, F.Invertible1x1Conv, F.AffineCoupling] * (2 * levels)


def test_flow_objective_draws_the_loss_noise_independently_of_the_dequantization_noise(monkeypatch):
    """flow_objective(..., dequantize=w) with "dsm": the dequantization noise and the DSM noise come
    from different keys (one key for both made the two noises a deterministic function of each other)."""
    from genflow.flows import _flow

    keys = {}
    real_deq, real_dsm = _flow.uniform_dequantize, _flow.dsm_loss

    def dequantize(k, *a, **kw):
        keys["deq"] = k
        return real_deq(k, *a, **kw)

    def dsm(f, p, x, k, *a, **kw):
        keys["dsm"] = k
        return real_dsm(f, p, x, k, *a, **kw)

    monkeypatch.setattr(_flow, "uniform_dequantize", dequantize)
    monkeypatch.setattr(_flow, "dsm_loss", dsm)
    flow = F.realnvp(2, num_steps=1, hidden=4)
    x = jnp.round(jax.random.normal(jax.random.key(0), (8, 2)) * 3)
    params = flow.init(jax.random.key(1), x)
    F.flow_objective(flow, "dsm", dequantize=1.0)(params, x, jax.random.key(2))
    assert not np.array_equal(jax.random.key_data(keys["deq"]), jax.random.key_data(keys["dsm"]))


def test_layer_log_dets_are_float32_for_bfloat16_inputs():
    """Log-determinants are float32 or wider (as ActNorm's and the 1x1 conv's), also the zero ones of
    volume-preserving layers and of an empty Chain, for bfloat16 data."""
    F = gf.flows
    x = jnp.ones((2, 4, 4, 2), jnp.bfloat16)
    assert F.Squeeze().forward({}, x)[1].dtype == jnp.float32
    assert F.Unsqueeze().inverse({}, x)[1].dtype == jnp.float32
    assert F.Chain(()).forward((), x)[1].dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in F.Chain(()).forward_split((), x)[1:])
    add = F.AdditiveCoupling(hidden=4)
    assert add.forward(add.init(jax.random.key(0), x), x)[1].dtype == jnp.float32


def test_chain_init_draws_each_layer_with_its_own_key():
    """Chain.init splits its key per layer: two 1x1 convolutions of a chain start at different random
    rotations (one key for all gave every Glow step the same rotation and conditioner weights)."""
    F = gf.flows
    x = jax.random.normal(jax.random.key(0), (4, 3))
    p = F.Chain((F.Invertible1x1Conv(lu=False), F.Invertible1x1Conv(lu=False))).init(jax.random.key(1), x)
    assert float(jnp.abs(p[0]["w"] - p[1]["w"]).max()) > 1e-3


def test_cnf_and_ffjord_documented_default_steps_and_tolerance():
    """cnf_sample: fixed-step solvers take 20 uniform steps by default (its docstring); ffjord_loss's
    default is tsit5 on a fixed grid of steps=8 (cnf_log_prob's docstring); cnf_log_prob's default
    rtol = atol = 1e-5 reaches the closed form log N(expm(A) x) + tr A of dx/dt = A x to ~1e-5
    (measured 2.3e-5 in float64 with 3 A; rtol=1e-4 gives 4.9e-4, rtol=1e-3 8.7e-4)."""
    p = {"a": A}
    z = jax.random.normal(jax.random.key(0), (4, 2))
    np.testing.assert_array_equal(gf.flows.cnf_sample(_linear_field, p, z, solver="heun"),
                                  gf.flows.cnf_sample(_linear_field, p, z, solver="heun", steps=20))
    with jax.enable_x64(True):
        a = 3 * A.astype(jnp.float64)
        x, k = jax.random.normal(jax.random.key(1), (16, 2), jnp.float64), jax.random.key(2)
        assert float(gf.flows.ffjord_loss(_linear_field, {"a": a}, x, k)) == float(
            gf.flows.ffjord_loss(_linear_field, {"a": a}, x, k, steps=8))
        lp, _ = gf.flows.cnf_log_prob(_linear_field, {"a": a}, x)
        exact = gf.likelihood.gaussian_log_prob(x @ jax.scipy.linalg.expm(a).T, 1.0) + jnp.trace(a)
        assert float(jnp.abs(lp - exact).max()) < 1e-4


def test_dsm_loss_default_sigma_is_flow_objectives():
    """dsm_loss and flow_objective(..., "dsm") share the default sigma = 0.05: the objective's loss
    is dsm_loss(flow, params, x, split(key)[1]) with dsm_loss's own default."""
    flow = gf.flows.realnvp(2, num_steps=1, hidden=4)
    x = jax.random.normal(jax.random.key(5), (64, 2))
    p = flow.init(jax.random.key(6), x)
    key = jax.random.key(2)
    got = float(gf.flows.flow_objective(flow, "dsm")(p, x, key)[0])
    np.testing.assert_allclose(got, float(gf.flows.dsm_loss(flow, p, x, jax.random.split(key)[1])), rtol=1e-6)


def test_score_matching_losses_name_a_bad_key():
    """ssm_loss / dsm_loss with key=0 failed as JAX's "invalid PRNG key data" (Flow.sample names it)."""
    flow = F.realnvp(2, num_steps=1, hidden=4)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    params = flow.init(jax.random.key(1), x)
    for loss in (F.ssm_loss, F.dsm_loss):
        for bad in (0, jax.random.split(jax.random.key(0), 2)):
            with pytest.raises(TypeError, match=r"key must be one PRNG key \(jax.random.key"):
                loss(flow, params, x, bad)
        assert np.isfinite(float(loss(flow, params, x, jax.random.key(2))))
        assert np.isfinite(float(jax.jit(lambda k, loss=loss: loss(flow, params, x, k))(jax.random.key(2))))


def test_flow_density_methods_refuse_non_floating_data_as_nll_loss_does():
    """Flow.log_prob / energy / score scored integer (and bool) data as a continuous density, silently,
    where nll_loss refused it; float data (bfloat16 too) still runs."""
    flow = F.realnvp(2, num_steps=1, hidden=4)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    params = flow.init(jax.random.key(1), x)
    for method in (flow.log_prob, flow.energy, flow.score):
        for bad in (jnp.round(3 * x).astype(jnp.int32), np.zeros((8, 2), np.uint8), x > 0):
            with pytest.raises(ValueError, match=rf"x must be a floating-point array \[B, 2\]; got dtype "
                                                 rf"{bad.dtype} \(integer data: dequantize it first"):
                method(params, bad)
        with pytest.raises(ValueError, match=r"got dtype complex64$"):
            method(params, x.astype(jnp.complex64))
        assert np.all(np.isfinite(np.asarray(method(params, x.astype(jnp.bfloat16)), np.float32)))
    with pytest.raises(ValueError, match=r"got dtype int32, shape \(8, 2\) \(integer data: dequantize it first"):
        F.nll_loss(flow, params, jnp.round(3 * x).astype(jnp.int32))
