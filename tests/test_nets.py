import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import genflow as gf
from conftest import count_compiles


def test_mlp_shapes_and_time_dependence():
    for emb in ("sinusoidal", "fourier", "identity"):
        m = gf.nets.MLP(hidden=(32, 32), time_embedding=emb)
        x = jax.random.normal(jax.random.key(0), (5, 3))
        p = m.init(jax.random.key(1), x, jnp.zeros((5,)))
        out0 = m.apply(p, x, jnp.zeros((5,)))
        out1 = m.apply(p, x, jnp.full((5,), 0.7))
        assert out0.shape == (5, 3)
        assert not np.allclose(out0, out1), emb
        # per-example: row i depends only on x_i, t_i
        out_perm = m.apply(p, x[::-1], jnp.zeros((5,)))
        np.testing.assert_allclose(out_perm, out0[::-1], rtol=1e-5, atol=1e-6)


def test_fourier_frequencies_are_constants_that_weight_decay_cannot_touch():
    # held as a parameter with a stopped gradient, the frequencies shrank under AdamW's decay;
    # now they are no parameter at all, but a function of fourier_seed
    m = gf.nets.MLP(hidden=(8,), time_embedding="fourier")
    x = jnp.ones((2, 2)); t = jnp.array([0.1, 0.9])
    p = m.init(jax.random.key(0), x, t)
    assert "TimeEmbedding_0" not in p["params"]
    e = gf.nets.TimeEmbedding(dim=8, kind="fourier", fourier_scale=16.0).apply({}, t)
    args = 2 * jnp.pi * t[:, None] * 16.0 * np.random.default_rng(0).standard_normal(4).astype(np.float32)
    np.testing.assert_allclose(e, jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1), rtol=1e-5, atol=1e-5)
    assert not np.allclose(gf.nets.TimeEmbedding(dim=8, kind="fourier", fourier_seed=1).apply({}, t), e)
    # the same function whatever t's dtype (the frequencies were drawn in t's dtype)
    with jax.enable_x64(True):
        np.testing.assert_allclose(gf.nets.TimeEmbedding(dim=8, kind="fourier").apply({}, t.astype(jnp.float64)), e)


def test_labels_and_null_label():
    m = gf.nets.MLP(hidden=(16,), num_classes=3)
    x = jnp.ones((4, 2)); t = jnp.full((4,), 0.5)
    p = m.init(jax.random.key(0), x, t, jnp.zeros((4,), jnp.int32))
    a = m.apply(p, x, t, jnp.array([0, 1, 2, 3]))
    assert len({tuple(np.round(np.asarray(r), 6)) for r in a}) == 4  # each label (3 = null) differs
    np.testing.assert_allclose(m.apply(p, x, t), m.apply(p, x, t, jnp.full((4,), 3)))  # no label = null label
    fn = gf.nets.model_fn(m, p, y=jnp.array([1, 1, 1, 1]))
    np.testing.assert_allclose(fn(x, t), m.apply(p, x, t, jnp.ones((4,), jnp.int32)))
    assert isinstance(fn, jax.tree_util.Partial)


def test_output_dense_matches_flax_dense_with_the_kernel_transposed():
    h = jax.random.normal(jax.random.key(0), (7, 64))
    head = gf.nets.OutputDense(3)
    p = head.init(jax.random.key(1), h)["params"]
    assert p["kernel_t"].shape == (3, 64) and p["bias"].shape == (3,)
    dense_p = {"params": {"kernel": p["kernel_t"].T, "bias": p["bias"] + 0.5}}
    q = {"params": {"kernel_t": p["kernel_t"], "bias": p["bias"] + 0.5}}
    np.testing.assert_allclose(head.apply(q, h), nn.Dense(3).apply(dense_p, h), rtol=1e-5, atol=1e-6)
    # gradients: the same numbers, in the transposed order
    gh, gk = jax.grad(lambda h, k: jnp.sum(jnp.sin(head.apply({"params": dict(q["params"], kernel_t=k)}, h))),
                      argnums=(0, 1))(h, q["params"]["kernel_t"])
    dh, dk = jax.grad(lambda h, k: jnp.sum(jnp.sin(nn.Dense(3).apply({"params": dict(dense_p["params"], kernel=k)}, h))),
                      argnums=(0, 1))(h, dense_p["params"]["kernel"])
    np.testing.assert_allclose(gh, dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gk, dk.T, rtol=1e-5, atol=1e-6)
    # nn.Dense's initialisation, number for number: LeCun normal over the fan-in, zero bias
    big = gf.nets.OutputDense(256).init(jax.random.key(2), jnp.zeros((1, 400)))["params"]
    ref = nn.Dense(256).init(jax.random.key(2), jnp.zeros((1, 400)))["params"]
    np.testing.assert_array_equal(big["kernel_t"], ref["kernel"].T)
    np.testing.assert_array_equal(big["bias"], ref["bias"])
    assert abs(float(jnp.std(big["kernel_t"])) * np.sqrt(400) - 1.0) < 0.03
    # the MLP's output layer is one, under the usual name, and forward-mode AD goes through it
    m = gf.nets.MLP(hidden=(16, 16))
    mp = m.init(jax.random.key(3), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    assert set(mp["Dense_2"]) == {"kernel_t", "bias"} and mp["Dense_2"]["kernel_t"].shape == (2, 16)
    x = jnp.ones((4, 2)); t = jnp.full((4,), 0.3)
    jac_f = jax.jacfwd(lambda x: m.apply({"params": mp}, x, t).sum(0))(x)
    jac_r = jax.jacrev(lambda x: m.apply({"params": mp}, x, t).sum(0))(x)
    np.testing.assert_allclose(jac_f, jac_r, rtol=1e-5, atol=1e-6)


def test_sinusoidal_embedding_values():
    e = gf.nets.sinusoidal_embedding(jnp.array([0.0, 0.5]), 8, scale=1.0)
    assert e.shape == (2, 8)
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(e[1, 0], np.cos(0.5), rtol=1e-6)
    # every frequency, against the docstring's formula (frequency 0 alone cannot see a wrong w_k)
    t = np.array([0.0, 0.013, 0.5, 1.0])
    w = 10_000.0 ** (-np.arange(4) / 4)
    args = 1000.0 * t[:, None] * w[None]
    np.testing.assert_allclose(gf.nets.sinusoidal_embedding(jnp.asarray(t), 8), np.concatenate([np.cos(args),
                               np.sin(args)], 1), atol=2e-4)


def test_bfloat16_compute():
    m = gf.nets.MLP(hidden=(16,), dtype=jnp.bfloat16)
    x = jnp.ones((2, 2), jnp.bfloat16)
    p = m.init(jax.random.key(0), x, jnp.zeros((2,)))
    assert jax.tree.leaves(p)[0].dtype == jnp.float32
    assert m.apply(p, x, jnp.zeros((2,))).dtype == jnp.bfloat16


def test_bad_inputs():
    m = gf.nets.MLP(hidden=(4,))
    with pytest.raises(ValueError, match=r"MLP expects x of shape \[B, D\]"):
        m.init(jax.random.key(0), jnp.ones((2, 2, 2)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="num_classes=None"):
        m.init(jax.random.key(0), jnp.ones((2, 2)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="unknown activation"):
        gf.nets.MLP(activation="swishy").init(jax.random.key(0), jnp.ones((2, 2)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="unknown time embedding"):
        gf.nets.MLP(time_embedding="learned").init(jax.random.key(0), jnp.ones((2, 2)), jnp.zeros((2,)))


# --- U-Net and DiT -----------------------------------------------------------------------------
# Each network is initialised and compiled once (module fixtures); other checks trace without compiling.

X_IMG = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
T_IMG = jnp.array([0.05, 0.3, 0.6, 0.95])
Y_IMG = jnp.array([0, 1, 2, 3])
UNET = gf.nets.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2, num_classes=4)
DIT = gf.nets.DiT(patch_size=2, hidden=32, depth=2, num_heads=4, num_classes=4)


def _randomize(params, key, scale=0.3):
    """Random parameters everywhere (zero-initialised output layers would hide the conditioning)."""
    leaves, tree = jax.tree.flatten(params)
    sizes = [int(np.prod(a.shape)) for a in leaves]
    flat = scale * jax.random.normal(key, (sum(sizes),))
    parts = jnp.split(flat, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(tree, [p.reshape(a.shape).astype(a.dtype) for p, a in zip(parts, leaves)])


@pytest.fixture(scope="module", params=["unet", "dit"])
def image_net(request):
    net = {"unet": UNET, "dit": DIT}[request.param]
    params = jax.jit(net.init)(jax.random.key(1), X_IMG, T_IMG, Y_IMG)
    rand = _randomize(params, jax.random.key(2))
    return request.param, net, params, rand, jax.jit(net.apply)


def test_image_nets_shape_time_and_label_conditioning(image_net):
    name, net, _, p, apply = image_net
    out = apply(p, X_IMG, T_IMG, Y_IMG)
    assert out.shape == X_IMG.shape and out.dtype == X_IMG.dtype
    assert np.all(np.isfinite(np.asarray(out)))
    # every example reacts to its own time and its own label, and only to them
    out_t = apply(p, X_IMG, T_IMG.at[1].set(0.8), Y_IMG)
    diff_t = np.abs(np.asarray(out_t - out)).reshape(4, -1).max(1)
    assert diff_t[1] > 1e-3 and np.all(diff_t[[0, 2, 3]] < 1e-5), (name, diff_t)
    out_y = apply(p, X_IMG, T_IMG, Y_IMG.at[2].set(0))
    diff_y = np.abs(np.asarray(out_y - out)).reshape(4, -1).max(1)
    assert diff_y[2] > 1e-3 and np.all(diff_y[[0, 1, 3]] < 1e-5), (name, diff_y)
    # the null label (index num_classes, the classifier-free-guidance token) is a label of its own
    out_null = apply(p, X_IMG, T_IMG, jnp.full((4,), 4))
    assert float(jnp.abs(out_null - out).max()) > 1e-3


def test_image_nets_batch_permutation_equivariance(image_net):
    _, _, _, p, apply = image_net
    perm = jnp.array([2, 0, 3, 1])
    out = apply(p, X_IMG, T_IMG, Y_IMG)
    np.testing.assert_allclose(apply(p, X_IMG[perm], T_IMG[perm], Y_IMG[perm]), out[perm], rtol=1e-4, atol=1e-5)


def test_image_nets_zero_initialised_output(image_net):
    name, net, params, _, apply = image_net
    # score_sde's init_scale=0 output conv / DiT's adaLN-Zero: a fresh network outputs exactly zero
    assert float(jnp.abs(apply(params, X_IMG, T_IMG, Y_IMG)).max()) == 0.0, name
    if name == "dit":
        # adaLN-Zero: every block's modulation (hence its gates) is zero, so blocks start as identities
        for i in range(net.depth):
            for leaf in jax.tree.leaves(params["params"][f"block{i}"]["adaLN"]):
                assert float(jnp.abs(leaf).max()) == 0.0
        # and the gradient still reaches the final layer
        g = jax.jit(jax.grad(lambda q: jnp.sum(net.apply(q, X_IMG, T_IMG, Y_IMG) * X_IMG)))(params)
        assert float(jnp.abs(g["params"]["final"]["kernel"]).max()) > 0.0
    else:
        for block in ("ResBlock_0", "ResBlock_3"):
            assert float(jnp.abs(params["params"][block]["Conv_1"]["kernel"]).max()) == 0.0


def test_dit_null_label_and_scalar_time():
    p = _randomize(jax.eval_shape(DIT.init, jax.random.key(1), X_IMG, T_IMG, Y_IMG), jax.random.key(5))
    apply = jax.jit(DIT.apply)
    ref = apply(p, X_IMG, jnp.full((4,), 0.3), jnp.full((4,), 4))
    np.testing.assert_allclose(apply(p, X_IMG, 0.3, None), ref, rtol=1e-5, atol=1e-5)  # y=None is the null label


def test_dit_patch_permutation_equivariance_without_position_embedding():
    """Without position embeddings a DiT is a set function of its patches: rolling the image by
    whole patches rolls the output the same way (patchify/unpatchify are consistent inverses)."""
    p = _randomize(jax.eval_shape(DIT.init, jax.random.key(1), X_IMG, T_IMG, Y_IMG), jax.random.key(3))
    f = jax.jit(lambda pos, x: DIT.clone(pos_embedding=pos).apply(p, x, T_IMG, Y_IMG), static_argnums=0)
    x_rolled = jnp.roll(X_IMG, (2, 4), axis=(1, 2))
    out, rolled = f("none", X_IMG), f("none", x_rolled)
    scale = float(jnp.abs(out).max())
    np.testing.assert_allclose(rolled, jnp.roll(out, (2, 4), axis=(1, 2)), rtol=1e-4, atol=1e-5 * scale)
    # with the sin-cos position embedding the same roll is not an equivariance
    out, rolled = f("sincos", X_IMG), f("sincos", x_rolled)
    assert float(jnp.abs(rolled - jnp.roll(out, (2, 4), axis=(1, 2))).max()) > 1e-2 * scale


def test_sincos_position_embedding_values():
    e = gf.nets.sincos_pos_embedding_2d(8, 3, 2)  # 6 positions, 4 features for rows, 4 for columns
    assert e.shape == (6, 8)
    row, col = 2, 1  # position index 5
    w = 1.0 / 10000 ** (np.arange(2) / 2)
    np.testing.assert_allclose(e[5], np.concatenate([np.sin(row * w), np.cos(row * w), np.sin(col * w),
                                                     np.cos(col * w)]), rtol=1e-6)


def test_dit_presets_and_parameter_count():
    d = gf.nets.dit("S/2", num_classes=1000, out_channels=8)
    assert (d.hidden, d.depth, d.num_heads, d.patch_size) == (384, 12, 6, 2)
    shapes = jax.eval_shape(d.init, jax.random.key(0), jnp.ones((1, 32, 32, 4)), jnp.zeros((1,)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    # the paper's DiT-S/2 (4 latent channels in, 8 out, 1000 classes) has 33.0M parameters
    assert 32.5e6 < n < 33.5e6, n
    with pytest.raises(ValueError, match="DiT name must be"):
        gf.nets.dit("M/2")


def test_unet_dropout_is_active_only_in_training(image_net):
    name, _, _, p, apply = image_net
    if name != "unet":
        return
    net = UNET.clone(dropout=0.5)
    f = jax.jit(lambda k, train: net.apply(p, X_IMG, T_IMG, Y_IMG, train=train, rngs={"dropout": k}),
                static_argnums=1)
    a = apply(p, X_IMG, T_IMG, Y_IMG)  # the same network without dropout
    b, c = f(jax.random.key(0), True), f(jax.random.key(1), True)
    assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(b - c).max()) > 1e-3
    # at eval the dropout network is the dropout-free one, even with a dropout rng supplied (the
    # check above alone passed with dropout always on)
    for k in (0, 1):
        np.testing.assert_allclose(f(jax.random.key(k), False), a, rtol=1e-5, atol=1e-6)


def test_image_nets_bfloat16_compute_keeps_float32_params():
    for net in (UNET.clone(dtype=jnp.bfloat16), DIT.clone(dtype=jnp.bfloat16)):
        p = jax.eval_shape(net.init, jax.random.key(0), X_IMG, T_IMG, Y_IMG)
        assert {a.dtype for a in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
        jaxpr = jax.make_jaxpr(net.apply)(p, X_IMG, T_IMG, Y_IMG)
        heavy = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
        # every matmul/conv takes bfloat16 operands (attention logits may accumulate in float32)
        assert heavy and all(v.aval.dtype == jnp.bfloat16 for e in heavy for v in e.invars)
        out = jaxpr.out_avals[0]
        assert out.dtype == X_IMG.dtype and out.shape == X_IMG.shape
def test_image_nets_bad_inputs():
    with pytest.raises(ValueError, match=r"UNet expects images x of shape \[B, H, W, C\]"):
        UNET.init(jax.random.key(0), jnp.ones((2, 64)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="divisible by 2"):
        UNET.init(jax.random.key(0), jnp.ones((2, 7, 7, 1)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="patch_size=2 needs H and W divisible by 2"):
        DIT.init(jax.random.key(0), jnp.ones((2, 7, 8, 1)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="num_classes=None"):
        UNET.clone(num_classes=None).init(jax.random.key(0), X_IMG, T_IMG, Y_IMG)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
        DIT.init(jax.random.key(0), X_IMG, jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"labels y must be a scalar or have shape \[B\]"):
        DIT.init(jax.random.key(0), X_IMG, T_IMG, jnp.zeros((4, 1), jnp.int32))


def test_label_range_is_checked_for_concrete_labels():
    mlp = gf.nets.MLP(hidden=(16,), num_classes=3)
    x, t = jnp.zeros((2, 2)), jnp.zeros((2,))
    params = mlp.init(jax.random.key(0), x, t, jnp.array([0, 3]))  # 3 = the null label: fine
    for bad in (jnp.array([0, 4]), jnp.array([-1, 0])):
        with pytest.raises(ValueError, match=r"labels y must be ints in \[0, num_classes=3\]"):
            mlp.apply(params, x, t, bad)
    # traced labels are not checked (and work)
    out = jax.jit(lambda y: mlp.apply(params, x, t, y))(jnp.array([1, 2]))
    assert out.shape == (2, 2)


def test_time_embeddings_take_a_scalar_and_refuse_other_shapes():
    # a 0-d t raised IndexError in every kind; a [B, 1] t gave [B, 1, dim] embeddings
    for kind in ("sinusoidal", "fourier", "identity"):
        emb = gf.nets.TimeEmbedding(8, kind)
        out = emb.apply({}, 0.3)
        assert out.shape == ((1, 8) if kind != "identity" else (1, 1)), (kind, out.shape)
        np.testing.assert_allclose(out, emb.apply({}, jnp.array([0.3])))
        with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
            emb.apply({}, jnp.zeros((3, 1)))
    assert gf.nets.sinusoidal_embedding(0.5, 4).shape == (1, 4)


def test_image_net_options_are_checked():
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    for bad in ("S/0", "S/-2"):  # built, then ZeroDivisionError / a reshape TypeError
        with pytest.raises(ValueError, match="DiT name must be"):
            gf.nets.dit(bad)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        gf.nets.DiT(patch_size=0, hidden=24, depth=1, num_heads=2).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="attn_resolutions must be a sequence of ints"):
        gf.nets.UNet(ch=8, ch_mult=(1,), attn_resolutions=16).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="ch must be even"):
        gf.nets.UNet(ch=15, ch_mult=(1,)).init(jax.random.key(0), x, t)
    from genflow.nets._dit import DiTBlock
    with pytest.raises(ValueError, match="must be divisible by num_heads=4"):
        DiTBlock(30, num_heads=4).init(jax.random.key(0), jnp.zeros((1, 4, 30)), jnp.zeros((1, 30)))


def test_model_fn_keeps_static_options_static_and_equal_modules_equal():
    # model_fn bound train=False as a traced leaf (TracerBoolConversionError under the caller's jit),
    # and a rebuilt equal module was a new function to jit (a bound method compares by identity)
    traces = []
    run = jax.jit(lambda fn, x, t: (traces.append(1), fn(x, t))[1])
    m = gf.nets.MLP(hidden=(8,))
    x, t = jnp.ones((2, 2)), jnp.zeros((2,))
    p = m.init(jax.random.key(0), x, t)
    for _ in range(3):
        out = run(gf.nets.model_fn(gf.nets.MLP(hidden=(8,)), p), x, t)
    assert len(traces) == 1
    np.testing.assert_allclose(out, m.apply(p, x, t))
    u = gf.nets.UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.5)
    xi = jnp.ones((2, 4, 4, 1))
    pu = u.init(jax.random.key(0), xi, t)
    np.testing.assert_allclose(run(gf.nets.model_fn(u, pu, train=False), xi, t), u.apply(pu, xi, t), rtol=1e-6)


def test_activations_match_their_formulas_and_build_an_mlp():
    z = np.linspace(-4.0, 4.0, 33)
    ref = {
        "silu": z / (1 + np.exp(-z)),
        "relu": np.maximum(z, 0.0),
        "tanh": np.tanh(z),
        "softplus": np.log1p(np.exp(z)),
        "selu": 1.0507009873554805 * np.where(z > 0, z, 1.6732632423543772 * np.expm1(z)),
        "gelu": 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),  # flax: tanh approximation
    }
    assert set(gf.nets.ACTIVATIONS) == set(ref)
    x, t = jax.random.normal(jax.random.key(0), (3, 2)), jnp.array([0.1, 0.5, 0.9])
    outs = {}
    for name, f in gf.nets.ACTIVATIONS.items():
        np.testing.assert_allclose(f(jnp.asarray(z, jnp.float32)), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
        m = gf.nets.MLP(hidden=(8,), activation=name)
        run = jax.jit(lambda x, t: m.apply(_randomize(m.init(jax.random.key(1), x, t), jax.random.key(2)), x, t))
        outs[name] = np.asarray(run(x, t))
        assert outs[name].shape == (3, 2) and np.all(np.isfinite(outs[name]))
    assert not np.allclose(outs["relu"], outs["tanh"])  # the activation is actually used


def test_dit_presets_are_the_papers_sizes():
    """DIT_PRESETS: (hidden, depth, heads) of DiT (Peebles & Xie 2023, Table 1) plus DeiT-Ti, each
    with a whole head width, and dit('<size>/<p>') builds exactly that configuration."""
    paper = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16), "Ti": (192, 12, 3)}
    assert gf.nets.DIT_PRESETS == paper
    for size, (hidden, depth, heads) in gf.nets.DIT_PRESETS.items():
        assert hidden % heads == 0
        for p in (2, 4, 8):
            d = gf.nets.dit(f"{size}/{p}")
            assert (d.hidden, d.depth, d.num_heads, d.patch_size) == (hidden, depth, heads, p)


class _Labels(nn.Module):
    num_classes: int | None

    @nn.compact
    def __call__(self, y, batch):
        return gf.nets.label_embedding(y, self.num_classes, 5, batch)


def test_label_embedding_null_label_shapes_and_checks():
    """label_embedding: [B] labels in [0, num_classes] -> [B, dim] rows of one table; y=None is the
    null label num_classes for every sample; unconditional networks return None and refuse labels."""
    m = _Labels(3)
    y = jnp.array([0, 2, 3, 2])
    p = m.init(jax.random.key(0), y, 4)
    table = p["params"]["label_embed"]["embedding"]
    assert table.shape == (4, 5)  # num_classes + 1 rows: the last one is "no label"
    out = m.apply(p, y, 4)
    assert out.shape == (4, 5)
    np.testing.assert_array_equal(out, table[y])
    np.testing.assert_array_equal(out[1], out[3])  # same label, same embedding
    np.testing.assert_array_equal(m.apply(p, None, 2), jnp.stack([table[3], table[3]]))
    assert _Labels(None).apply({}, None, 4) is None
    with pytest.raises(ValueError, match="num_classes=None"):
        _Labels(None).apply({}, y, 4)
    with pytest.raises(ValueError, match=r"labels y must be ints in \[0, num_classes=3\]"):
        m.apply(p, jnp.array([0, 4]), 2)
    with pytest.raises(ValueError, match=r"labels y must be a scalar or have shape \[B\]=\(4,\)"):
        m.apply(p, jnp.array([0, 1]), 4)


def test_res_block_starts_as_the_scaled_skip_and_is_conditioned_on_time():
    """ResBlock: its last conv is zero-initialised, so at init out = skip(x) / sqrt(2) (the identity
    skip when the channels match); random parameters make it depend on temb per example."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    temb = jax.random.normal(jax.random.key(1), (2, 16))
    blk = gf.nets.ResBlock(out_ch=8)
    p = jax.jit(blk.init)(jax.random.key(2), x, temb)
    apply = jax.jit(blk.apply)
    np.testing.assert_allclose(apply(p, x, temb), x / math.sqrt(2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(gf.nets.ResBlock(out_ch=8, skip_rescale=False).apply)(p, x, temb), x,
                               atol=1e-6)
    wide = gf.nets.ResBlock(out_ch=16)
    assert jax.eval_shape(lambda: wide.apply(wide.init(jax.random.key(2), x, temb), x, temb)).shape == (2, 4, 4, 16)
    pr = _randomize(p, jax.random.key(3))
    out = apply(pr, x, temb)
    out2 = apply(pr, x, temb.at[1].multiply(-1.0))
    d = np.abs(np.asarray(out2 - out)).reshape(2, -1).max(1)
    assert d[1] > 1e-3 and d[0] < 1e-6, d


def test_attn_block_is_equivariant_to_permuting_positions():
    """AttnBlock is self-attention over the H*W positions with no positional information, so (with
    random, non-zero weights) permuting the pixels permutes its output; at init (zero projection)
    it is x / sqrt(2). Heads must divide the channels."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    blk = gf.nets.AttnBlock(num_heads=2)
    p = jax.jit(blk.init)(jax.random.key(1), x)
    apply = jax.jit(blk.apply)
    np.testing.assert_allclose(apply(p, x), x / math.sqrt(2), rtol=1e-6, atol=1e-6)
    pr = _randomize(p, jax.random.key(2))
    perm = jax.random.permutation(jax.random.key(3), 16)
    shuffle = lambda a: a.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8)  # noqa: E731
    out = apply(pr, x)
    assert float(jnp.abs(out - x / math.sqrt(2)).max()) > 1e-2  # attention does something
    np.testing.assert_allclose(apply(pr, shuffle(x)), shuffle(out), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        gf.nets.AttnBlock(num_heads=3).init(jax.random.key(1), x)


def test_odd_widths_are_refused_by_the_argument_name():
    """MLP(time_dim=7) said 'dim must be even', DiT(hidden=6) 'needs dim divisible by 4'."""
    k = jax.random.key(0)
    for kind in ("sinusoidal", "fourier"):
        with pytest.raises(ValueError, match="time_dim"):
            gf.nets.MLP(hidden=(4,), time_dim=7, time_embedding=kind).init(k, jnp.ones((2, 2)), jnp.zeros(2))
    gf.nets.MLP(hidden=(4,), time_dim=7, time_embedding="identity").init(k, jnp.ones((2, 2)), jnp.zeros(2))
    with pytest.raises(ValueError, match="hidden"):
        gf.nets.DiT(patch_size=2, hidden=6, depth=1, num_heads=1).init(k, jnp.ones((1, 4, 4, 1)), 0.5)
    gf.nets.DiT(patch_size=2, hidden=6, depth=1, num_heads=1, pos_embedding="none").init(k, jnp.ones((1, 4, 4, 1)), 0.5)
    for ratio in (0.0, -1.0, float("nan"), 0.01):  # (0 failed as a bare ZeroDivisionError in the initializer)
        with pytest.raises(ValueError, match=r"DiT's mlp_ratio must be a real > 0 with int\(hidden \* mlp_ratio\)"):
            gf.nets.DiT(patch_size=2, hidden=8, depth=1, num_heads=2, mlp_ratio=ratio).init(k, jnp.ones((1, 4, 4, 1)),
                                                                                            0.5)
    dit = gf.nets.DiT(patch_size=2, hidden=8, depth=1, num_heads=2, mlp_ratio=jnp.float32(2.0))  # (a 0-d array works)
    dit.init(k, jnp.ones((1, 4, 4, 1)), 0.5)


def test_model_fn_keeps_a_numpy_bool_flag_static():
    """train=np.bool_(False) was bound as a traced value: TracerBoolConversionError under jit."""
    net = gf.nets.UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.1)
    x = jnp.ones((1, 4, 4, 1))
    p = net.init(jax.random.key(0), x, jnp.zeros(1))
    fn = gf.nets.model_fn(net, p, train=np.bool_(False))
    out = jax.jit(lambda f, x: f(x, jnp.ones(1)))(fn, x)
    np.testing.assert_array_equal(out, net.apply(p, x, jnp.ones(1), train=False))


def _np_dit_block(p, x, c, heads):
    """DiT's block (Peebles & Xie 2023) in NumPy float64 from flax's parameters: adaLN-Zero
    modulation split as shift1, scale1, gate1, shift2, scale2, gate2; LayerNorm without affine."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    silu = c / (1 + np.exp(-c))
    mod = silu @ p["adaLN"]["kernel"] + p["adaLN"]["bias"]
    sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6, axis=-1)

    def ln(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)

    h = ln(x) * (1 + sc1[:, None]) + sh1[:, None]
    qkv = np.einsum("bnd,dthk->bnthk", h, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    att = np.einsum("bhqs,bshk->bqhk", w / w.sum(-1, keepdims=True), v)
    x = x + g1[:, None] * (np.einsum("bqhk,hkd->bqd", att, p["proj"]["kernel"]) + p["proj"]["bias"])
    h = ln(x) * (1 + sc2[:, None]) + sh2[:, None]
    h = h @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return x + g2[:, None] * (h @ p["fc2"]["kernel"] + p["fc2"]["bias"])


def test_dit_block_and_time_conditioning_match_the_paper_away_from_initialisation():
    """At initialisation adaLN is zero, so the modulation (shift / scale / gate order, the
    x (1 + scale) + shift form) and DiT's time embedding are invisible there: with random adaLN
    weights the block equals a NumPy DiT block, and DiT conditions on sinusoidal_embedding(t, 256)
    at its default scale 1000."""
    from genflow.nets._dit import DiTBlock

    block = DiTBlock(16, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    c = jax.random.normal(jax.random.key(1), (2, 16))
    params = block.init(jax.random.key(2), x, c)["params"]
    params["adaLN"] = {"kernel": 0.3 * jax.random.normal(jax.random.key(3), (16, 96)),
                       "bias": 0.3 * jax.random.normal(jax.random.key(4), (96,))}
    np.testing.assert_allclose(block.apply({"params": params}, x, c), _np_dit_block(params, x, c, 2), atol=2e-5)

    dit = gf.nets.DiT(patch_size=2, hidden=16, depth=1, num_heads=2)
    xi, t = jnp.zeros((2, 4, 4, 1)), jnp.array([0.25, 0.7])
    variables = dit.init(jax.random.key(5), xi, t)
    _, inter = dit.apply(variables, xi, t, capture_intermediates=True)
    e0 = variables["params"]["t_embed0"]
    temb = np.asarray(gf.nets.sinusoidal_embedding(t, 256, scale=1000.0))
    want = temb @ np.asarray(e0["kernel"]) + np.asarray(e0["bias"])
    np.testing.assert_allclose(inter["intermediates"]["t_embed0"]["__call__"][0], want, rtol=1e-4, atol=1e-5)


def test_nets_refuse_bad_rates_and_class_counts_and_take_numpy_ints_and_jax_bool_flags():
    """Found by a behavioural audit: UNet(dropout=1.5) trained a fixed, rng-independent rescaling;
    model_fn(..., train=jnp.array(False)) failed with TracerBoolConversionError inside gf.sample;
    NumPy ints were refused as if not ints (the repository's is_int accepts them); num_classes=-1
    failed as a label error; DiTBlock ignored its hidden width."""
    k = jax.random.key(0)
    x = jnp.ones((2, 8, 8, 1))
    for bad in (-0.5, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"UNet's dropout must be a rate in \[0, 1\)"):
            gf.nets.UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=bad).init(k, x, 0.5)
    u = gf.nets.UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(np.int64(8),))
    p = u.init(k, x, 0.5)
    out = gf.sample(gf.nets.model_fn(u, p, train=jnp.array(False)), gf.paths.linear(), x, prediction="velocity",
                    solver="euler", steps=2)[0]
    ref = gf.sample(gf.nets.model_fn(u, p, train=False), gf.paths.linear(), x, prediction="velocity",
                    solver="euler", steps=2)[0]
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    assert gf.nets.DiT(patch_size=np.int64(2), hidden=8, depth=1, num_heads=2).init(k, x, 0.5)
    with pytest.raises(ValueError, match="num_classes must be None or an int >= 0; got -1"):
        gf.nets.MLP(hidden=(4,), num_classes=-1).init(k, jnp.ones((2, 2)), 0.5)
    with pytest.raises(ValueError, match=r"DiTBlock\(hidden=12\) got tokens of width 10"):
        gf.nets._dit.DiTBlock(12, 2).init(k, jnp.ones((2, 3, 10)), jnp.ones((2, 12)))


@pytest.mark.parametrize("net", ["mlp", "unet", "dit"])
def test_traced_labels_out_of_range_give_nan_not_another_class(net):
    """Under jit (every fit step) nn.Embed wrapped negative labels: -1 read as the null label and
    -2 as class num_classes - 1, so a dataset's -1 "unlabelled" trained silently. Labels outside
    [0, num_classes] now give NaN outputs (as those above num_classes did), and in-range ones are
    unchanged."""
    key = jax.random.key(0)
    if net == "mlp":
        m, x = gf.nets.MLP(hidden=(8,), num_classes=3), jnp.ones((4, 2))
    elif net == "unet":
        m, x = gf.nets.UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=3), \
            jnp.ones((4, 4, 4, 1))
    else:
        m, x = gf.nets.DiT(patch_size=2, hidden=16, depth=1, num_heads=2, num_classes=3), jnp.ones((4, 4, 4, 1))
    t = jnp.full((4,), 0.3)
    p = m.init(key, x, t, jnp.array([0, 1, 2, 3]))
    f = jax.jit(lambda y: m.apply(p, x, t, y))
    good = f(jnp.array([0, 1, 2, 3]))
    assert np.all(np.isfinite(np.asarray(good)))
    bad = np.asarray(f(jnp.array([-1, -2, 1, 4])))
    assert np.all(np.isnan(bad[[0, 1, 3]].reshape(3, -1)), axis=1).all()
    np.testing.assert_allclose(bad[2], np.asarray(good)[1], rtol=1e-5, atol=1e-6)


def test_traced_negative_int8_labels_do_not_wrap_onto_class_zero():
    """With int8 labels and num_classes = 127, the out-of-range index num_classes + 1 wrapped to
    -128 in the labels' dtype, which Embed read as class 0 (review of the fix above)."""
    m = gf.nets.MLP(hidden=(8,), num_classes=127)
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.3)
    p = m.init(jax.random.key(0), x, t, jnp.array([0, 1, 2], jnp.int8))
    out = np.asarray(jax.jit(lambda y: m.apply(p, x, t, y))(jnp.array([-1, 0, 1], jnp.int8)))
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1:]))


def test_one_label_for_the_whole_batch_is_broadcast_like_t():
    """A scalar or [1] label means that class for every sample, as a scalar t means that time:
    model_fn(net, p, y=3) (a Python int, bound statically) and y=jnp.array([3]) give the [B]
    labels' output, also through gf.sample (both failed on the label shape)."""
    mlp = gf.nets.MLP(hidden=(16,), num_classes=4)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    p = mlp.init(jax.random.key(1), x, jnp.zeros((5,)), jnp.zeros((5,), jnp.int32))
    full = gf.nets.model_fn(mlp, p, y=jnp.full((5,), 3))
    path = gf.paths.linear()
    ref, _ = gf.sample(full, path, x, prediction="velocity", solver="heun", steps=4)
    for y in (3, np.int32(3), jnp.array(3), jnp.array([3])):
        fn = gf.nets.model_fn(mlp, p, y=y)
        np.testing.assert_array_equal(fn(x, 0.5), full(x, 0.5))
        out, _ = gf.sample(fn, path, x, prediction="velocity", solver="heun", steps=4)
        np.testing.assert_array_equal(out, ref)
    for bad in (5, -1, 2**40, np.int64(7), jnp.array(7), np.array([7, 7, 7, 7, 7])):
        # (checked in model_fn: traced inside gf.sample, an out-of-range label gave NaN samples)
        with pytest.raises(ValueError, match=r"labels y must be ints in \[0, num_classes=4\]"):
            gf.nets.model_fn(mlp, p, y=bad)
    with pytest.raises(ValueError, match=r"labels y must be ints"):  # a float label: refused as before
        gf.sample(gf.nets.model_fn(mlp, p, y=3.0), path, x, prediction="velocity", solver="heun", steps=4)
    # a Python int label is traced, as an array one: sampling class after class compiles once
    # (it was static: a new compilation per class; recompilation audit)
    assert count_compiles(lambda: gf.sample(gf.nets.model_fn(mlp, p, y=2), path, x, prediction="velocity",
                                            solver="heun", steps=4)) == 0


class _StaticY(nn.Module):
    @nn.compact
    def __call__(self, x, t, y):  # y used as a Python number (a width), not a class label
        return x * nn.Dense(1)(jnp.ones((x.shape[0], y)))


class _OneHotCond(nn.Module):
    num_classes: int = 3  # the width of a one-hot condition, not a label range

    @nn.compact
    def __call__(self, x, t, y):
        return nn.Dense(x.shape[-1])(jnp.concatenate([x, jnp.broadcast_to(t, x.shape[:1])[:, None], y], -1))


def test_a_custom_module_keeps_its_own_y():
    """Only genflow's class-conditional nets get their y traced and range-checked as class labels
    (reviews): a module of one's own that reads y as a Python number, or that has a num_classes of
    another meaning (a one-hot condition's width), kept working."""
    m = _StaticY()
    x = jnp.ones((2, 3))
    p = m.init(jax.random.key(0), x, jnp.zeros(2), 4)
    out, _ = gf.sample(gf.nets.model_fn(m, p, y=4), gf.paths.linear(), x, prediction="velocity", solver="euler",
                       steps=2)
    assert out.shape == x.shape
    m = _OneHotCond()
    y = jax.nn.one_hot(jnp.array([0, 2]), 3)
    p = m.init(jax.random.key(0), x[:, :2], jnp.zeros(2), y)
    np.testing.assert_array_equal(gf.nets.model_fn(m, p, y=y)(x[:, :2], 0.5), m.apply(p, x[:, :2], jnp.full(2, 0.5), y))


# --- NumPy references of the U-Net's blocks (float64, from flax's parameters) ---------------------

def _np_silu(a):
    return a / (1 + np.exp(-a))


def _np_group_norm(x, p, groups, eps=1e-6):
    """GroupNorm over (H, W, C / groups) per example and group, then the per-channel affine map."""
    b, hh, ww, c = x.shape
    g = x.reshape(b, hh, ww, groups, c // groups)
    mean, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _np_conv3x3(x, p):
    """A 3x3 'SAME' cross-correlation (flax's nn.Conv): kernel [3, 3, in, out], zero padding."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    hh, ww = x.shape[1:3]
    return sum(np.einsum("bhwi,io->bhwo", xp[:, i:i + hh, j:j + ww], p["kernel"][i, j])
               for i in range(3) for j in range(3)) + p["bias"]


def test_res_block_matches_a_numpy_reference_with_random_parameters():
    """ResBlock = (skip(x) + conv(silu(GN(conv(silu(GN(x))) + Dense(silu(temb))))) / sqrt(2), with
    score_sde's min(32, C / 4) groups, a 1x1 conv skip when the width changes, and the time
    embedding added per example and channel after the first conv (only permutation / locality
    properties were checked: a time embedding without its silu passed)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    temb = 2.0 * jax.random.normal(jax.random.key(1), (2, 16))  # (negative entries: silu is not linear)
    for out_ch, skip_rescale in ((16, True), (8, False)):
        blk = gf.nets.ResBlock(out_ch=out_ch, skip_rescale=skip_rescale)
        p = _randomize(blk.init(jax.random.key(2), x, temb), jax.random.key(3))
        q = jax.tree.map(lambda a: np.asarray(a, np.float64), p["params"])
        xs, ts = np.asarray(x, np.float64), np.asarray(temb, np.float64)
        h = _np_conv3x3(_np_silu(_np_group_norm(xs, q["GroupNorm_0"], 2)), q["Conv_0"])
        h = h + (_np_silu(ts) @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"])[:, None, None, :]
        h = _np_conv3x3(_np_silu(_np_group_norm(h, q["GroupNorm_1"], out_ch // 4)), q["Conv_1"])
        skip = xs if out_ch == 8 else xs @ q["skip"]["kernel"][0, 0] + q["skip"]["bias"]
        want = (skip + h) / (math.sqrt(2.0) if skip_rescale else 1.0)
        np.testing.assert_allclose(blk.apply(p, x, temb), want, rtol=1e-4, atol=1e-4)


def test_attn_block_matches_a_numpy_reference_with_random_parameters():
    """AttnBlock = (x + proj(softmax(q k^T / sqrt(d_head)) v)) / sqrt(2) over the H*W positions
    of GN(x), per head: every output pixel mixes all the others (permutation equivariance alone
    passed without any attention, v in place of the attended values)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    blk = gf.nets.AttnBlock(num_heads=2)
    p = _randomize(blk.init(jax.random.key(1), x), jax.random.key(2), scale=0.5)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), p["params"])
    xs = np.asarray(x, np.float64)
    h = _np_group_norm(xs, q["GroupNorm_0"], 2).reshape(2, 16, 8)
    qkv = np.einsum("bnc,cthk->bnthk", h, q["qkv"]["kernel"]) + q["qkv"]["bias"]
    qq, kk, vv = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhk,bshk->bhqs", qq, kk) / np.sqrt(4)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    att = np.einsum("bhqs,bshk->bqhk", w / w.sum(-1, keepdims=True), vv)
    h = np.einsum("bqhk,hkc->bqc", att, q["proj"]["kernel"]) + q["proj"]["bias"]
    want = (xs + h.reshape(xs.shape)) / math.sqrt(2.0)
    out = blk.apply(p, x)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    # and one pixel changed changes the output at every other position
    d = np.abs(np.asarray(blk.apply(p, x.at[0, 1, 2].add(1.0)) - out))[0].max(-1)
    assert np.all(np.delete(d.reshape(-1), 1 * 4 + 2) > 1e-5), d


def test_unet_without_resampling_convs_average_pools_and_repeats_pixels():
    """resample_with_conv=False: the way down is 2x2 average pooling, the way up nearest-neighbour
    upsampling (read off at the inputs of the residual blocks around them, with random
    parameters; max pooling passed every other test)."""
    net = gf.nets.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resample_with_conv=False)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([0.2, 0.7])
    p = _randomize(net.init(jax.random.key(1), x, t), jax.random.key(2))
    assert sorted(k for k in p["params"] if k.startswith("Conv")) == ["Conv_0"]  # (no resampling convs)
    calls = []  # (input, output) of each ResBlock, in call order

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, gf.nets.ResBlock) and context.method_name == "__call__":
            calls.append((np.asarray(args[0]), np.asarray(out)))
        return out

    with nn.intercept_methods(record):
        net.apply(p, x, t)
    # down: RB0 (8x8), pool, RB1 (4x4); middle: RB2, RB3; up: RB4, RB5 (4x4), upsample, RB6, RB7 (8x8)
    assert [c[0].shape[1] for c in calls] == [8, 4, 4, 4, 4, 4, 8, 8]
    rb0_out, (rb1_in, _) = calls[0][1], calls[1]
    pooled = rb0_out.reshape(2, 4, 2, 4, 2, 8).mean((2, 4))
    np.testing.assert_allclose(rb1_in, pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(calls[5][0][..., -8:], pooled, rtol=1e-5, atol=1e-6)  # the pooled skip
    rb5_out, rb6_in = calls[5][1], calls[6][0]
    np.testing.assert_allclose(rb6_in[..., :rb5_out.shape[-1]], np.repeat(np.repeat(rb5_out, 2, 1), 2, 2),
                               rtol=1e-6, atol=1e-6)


def test_output_widths_and_class_dim_are_refused_by_the_argument_name():
    """MLP(out_dim=0) returned [B, D] (``out_dim or D``), UNet / DiT(out_channels=0) C channels;
    MLP(num_classes=4, class_dim=0) raised a bare ZeroDivisionError and class_dim=-3 an MLIRError."""
    k = jax.random.key(0)
    xv, xi, t = jnp.ones((2, 2)), jnp.ones((2, 4, 4, 1)), jnp.zeros(2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"MLP's out_dim must be a positive int; got {bad}"):
            gf.nets.MLP(hidden=(4,), out_dim=bad).init(k, xv, t)
        with pytest.raises(ValueError, match=rf"UNet's out_channels must be a positive int; got {bad}"):
            gf.nets.UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), out_channels=bad).init(k, xi, t)
        with pytest.raises(ValueError, match=rf"DiT's out_channels must be a positive int; got {bad}"):
            gf.nets.DiT(patch_size=2, hidden=8, depth=1, num_heads=2, out_channels=bad).init(k, xi, t)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"MLP's class_dim must be a positive int; got {bad}"):
            gf.nets.MLP(hidden=(4,), num_classes=4, class_dim=bad).init(k, xv, t)
    # the valid widths still hold (None: the input's), and an unused class_dim is not checked
    shape = lambda m, x: jax.eval_shape(lambda: m.apply(m.init(k, x, t), x, t)).shape  # noqa: E731
    assert shape(gf.nets.MLP(hidden=(4,), out_dim=3), xv) == (2, 3)
    assert shape(gf.nets.MLP(hidden=(4,), class_dim=0), xv) == (2, 2)
    assert shape(gf.nets.MLP(hidden=(4,), num_classes=4, class_dim=np.int64(3)), xv) == (2, 2)
    assert shape(gf.nets.UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), out_channels=3), xi) \
        == (2, 4, 4, 3)
    assert shape(gf.nets.DiT(patch_size=2, hidden=8, depth=1, num_heads=2, out_channels=2), xi) == (2, 4, 4, 2)
    assert shape(gf.nets.DiT(patch_size=2, hidden=8, depth=1, num_heads=2), xi) == (2, 4, 4, 1)


def test_dit_patch_embedding_is_the_stride_p_convolution():
    """DiT's patch embedding is documented as "the same map as DiT's stride-p convolution": its
    Dense kernel [p*p*C, d], read as a conv kernel [p, p, C, d] (row, column, channel order),
    gives the same tokens as lax.conv with stride p. (A mutation audit: patches flattened column-major passed every other test.)"""
    net = gf.nets.DiT(patch_size=2, hidden=16, depth=1, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3), jnp.float32)
    t = jnp.full((2,), 0.5)
    params = net.init(jax.random.key(1), x, t)
    _, state = net.apply(params, x, t, capture_intermediates=True)
    tok = state["intermediates"]["patch_embed"]["__call__"][0]
    pe = params["params"]["patch_embed"]
    k = pe["kernel"].reshape(2, 2, 3, 16)
    conv = jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(tok, conv.reshape(2, 6, 16) + pe["bias"], rtol=1e-5, atol=1e-5)


def test_mlp_is_dense_then_activation_per_hidden_layer_then_the_output_layer():
    """MLP's docstring: h = concat(x, emb(t)), then len(hidden) Dense+activation layers, then the
    output layer y = h @ kernel_t.T + bias; checked with random parameters against NumPy."""
    m = gf.nets.MLP(hidden=(8, 6), activation="tanh", time_dim=4)
    x, t = jax.random.normal(jax.random.key(0), (5, 3)), jnp.linspace(0.1, 0.9, 5)
    p = m.init(jax.random.key(1), x, t)
    leaves, tdef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    p = jax.tree.unflatten(tdef, [jax.random.normal(k, l.shape) * 0.7 for k, l in zip(keys, leaves)])
    q = jax.tree.map(np.asarray, p["params"])
    h = np.concatenate([np.asarray(x), np.asarray(gf.nets.sinusoidal_embedding(t, 4))], -1)
    for i in range(2):
        h = np.tanh(h @ q[f"Dense_{i}"]["kernel"] + q[f"Dense_{i}"]["bias"])
    ref = h @ q["Dense_2"]["kernel_t"].T + q["Dense_2"]["bias"]
    np.testing.assert_allclose(m.apply(p, x, t), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn_resolutions,expected", [((), 1), ((8,), 4), ((4,), 4), ((8, 4), 7)])
def test_unet_has_attention_after_every_residual_block_at_the_chosen_resolutions(attn_resolutions, expected):
    """UNet's docstring: attention after each residual block whose feature map is one of
    attn_resolutions, on the way down (num_res_blocks per level) and up (num_res_blocks + 1), plus
    always one in the middle. For 8x8 inputs, ch_mult=(1, 2), num_res_blocks=1: level 0 (8x8) and
    level 1 (4x4) each have 1 + 2 blocks."""
    net = gf.nets.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=attn_resolutions)
    p = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
    assert sum(k.startswith("AttnBlock_") for k in p["params"]) == expected


def test_unet_time_embedding_mlp_has_a_silu_between_its_dense_layers():
    """DDPM's time embedding (Ho et al. 2020, score_sde's ddpm.py): temb =
    Dense(silu(Dense(sinusoidal(t)))); checked through the captured outputs of the UNet's first two
    Dense layers (the outer one is built first: Dense_0 is the second layer), random parameters."""
    net = gf.nets.UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    x, t = jnp.zeros((2, 4, 4, 1)), jnp.array([0.2, 0.7])
    p = net.init(jax.random.key(0), x, t)
    leaves, tdef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    p = jax.tree.unflatten(tdef, [jax.random.normal(k, l.shape) * 0.5 for k, l in zip(keys, leaves)])
    _, st = net.apply(p, x, t, capture_intermediates=True)
    q = jax.tree.map(np.asarray, p["params"])
    first = np.asarray(st["intermediates"]["Dense_1"]["__call__"][0])  # (Dense_1: the inner, first layer)
    second = np.asarray(st["intermediates"]["Dense_0"]["__call__"][0])
    emb = np.asarray(gf.nets.sinusoidal_embedding(t, 8))
    np.testing.assert_allclose(first, emb @ q["Dense_1"]["kernel"] + q["Dense_1"]["bias"], rtol=1e-4, atol=1e-5)
    silu = first / (1 + np.exp(-first))
    np.testing.assert_allclose(second, silu @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"], rtol=1e-4, atol=1e-5)


def test_res_block_group_norm_uses_at_most_32_groups():
    """_groups: min(32, C // 4) groups (score_sde): on 256 channels, 32 groups of 8 channels, each
    normalised to zero mean and unit variance (at init: GroupNorm's scale 1, bias 0)."""
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 256)) * jnp.linspace(0.5, 3.0, 256) + jnp.linspace(-2, 2, 256)
    temb = jnp.zeros((2, 8))
    blk = gf.nets.ResBlock(out_ch=256)
    p = blk.init(jax.random.key(1), x, temb)
    _, st = blk.apply(p, x, temb, capture_intermediates=True)
    g = np.asarray(st["intermediates"]["GroupNorm_0"]["__call__"][0], np.float64).reshape(2, 4, 32, 8)
    np.testing.assert_allclose(g.mean((1, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(g.var((1, 3)), 1.0, rtol=1e-3)


def test_unet_output_conv_reads_silu_of_the_last_group_norm():
    """UNet: out = Conv(silu(GN(h))) (DDPM++): every input of the output conv is >= min silu = -0.2785,
    and equals silu of the last GroupNorm's output."""
    net = gf.nets.UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    x, t = jax.random.normal(jax.random.key(0), (2, 4, 4, 1)), jnp.array([0.2, 0.7])
    p = net.init(jax.random.key(1), x, t)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.module.name == "out":
            seen["in"] = np.asarray(args[0])
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.GroupNorm) and context.module.parent is not None \
                and isinstance(context.module.parent, gf.nets.UNet):
            seen["gn"] = np.asarray(out)  # the last top-level GroupNorm call wins
        return out

    with nn.intercept_methods(record):
        net.apply(p, x, t)
    gn = seen["gn"]
    assert gn.min() < -0.5  # (standardised: plenty below silu's minimum)
    np.testing.assert_allclose(seen["in"], gn / (1 + np.exp(-gn)), rtol=1e-5, atol=1e-6)


def test_unet_resampling_convs_are_3x3():
    """resample_with_conv=True: a 3x3 conv after the nearest upsampling and a 3x3 stride-2 conv
    down (the UNet's own Conv layers: the input conv, one down, one up, and the 3x3 output conv)."""
    net = gf.nets.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    p = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
    convs = {k: v["kernel"].shape for k, v in p.items() if k.startswith("Conv") or k == "out"}
    assert sorted(convs) == ["Conv_0", "Conv_1", "Conv_2", "out"], convs
    assert all(s[:2] == (3, 3) for s in convs.values()), convs


def test_unet_attention_resolutions_are_read_off_the_feature_map_height():
    """attn_resolutions are H of the feature map (UNet's docstring): on 8x16 inputs with
    ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), the 4x8 level has attention after
    its 1 + 2 residual blocks, plus the middle one: 4 (reading W instead gave 3)."""
    net = gf.nets.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    p = net.init(jax.random.key(0), jnp.zeros((1, 8, 16, 1)), jnp.zeros((1,)))
    assert sum(k.startswith("AttnBlock_") for k in p["params"]) == 4


def test_unet_label_embedding_is_added_to_the_time_embedding():
    """UNet's docstring: labels are embedded and *added* to the time embedding; the temb each
    residual block receives is Dense(silu(Dense(sinusoidal(t)))) + label_embed[y] (random parameters)."""
    net = gf.nets.UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=3)
    x, t, y = jnp.zeros((2, 4, 4, 1)), jnp.array([0.2, 0.7]), jnp.array([0, 3])
    p = net.init(jax.random.key(0), x, t, y)
    leaves, tdef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    p = jax.tree.unflatten(tdef, [jax.random.normal(k, l.shape) * 0.5 for k, l in zip(keys, leaves)])
    temb = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, gf.nets.ResBlock) and context.method_name == "__call__":
            temb.append(np.asarray(args[1]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _, st = net.apply(p, x, t, y, capture_intermediates=True)
    time_part = np.asarray(st["intermediates"]["Dense_0"]["__call__"][0])  # (the outer time Dense)
    label_part = np.asarray(p["params"]["label_embed"]["embedding"])[np.asarray(y)]
    assert np.abs(label_part).min() > 0
    np.testing.assert_allclose(temb[0], time_part + label_part, rtol=1e-5, atol=1e-5)


def test_mlp_label_embedding_has_class_dim_features():
    """MLP: labels are embedded in class_dim features (not time_dim: the defaults are both 64)."""
    m = gf.nets.MLP(hidden=(4,), time_dim=6, num_classes=3, class_dim=5)
    x, t = jnp.ones((2, 2)), jnp.zeros(2)
    p = m.init(jax.random.key(0), x, t, jnp.array([0, 1]))["params"]
    assert p["Embed_0"]["embedding"].shape == (4, 5)
    assert p["Dense_0"]["kernel"].shape == (2 + 6 + 5, 4)


def test_mlp_output_layer_computes_in_the_given_dtype():
    """MLP(dtype=bfloat16): every layer computes in bfloat16, the output layer too (parameters stay
    float32; the returned array is in x's dtype)."""
    m = gf.nets.MLP(hidden=(8,), time_dim=4, dtype=jnp.bfloat16)
    x, t = jax.random.normal(jax.random.key(0), (3, 2)), jnp.array([0.1, 0.5, 0.9])
    p = m.init(jax.random.key(1), x, t)
    out, st = m.apply(p, x, t, capture_intermediates=True)
    assert st["intermediates"]["Dense_1"]["__call__"][0].dtype == jnp.bfloat16
    assert out.dtype == jnp.float32


def test_model_fn_static_options_are_part_of_its_identity_under_jit():
    """model_fn binds static keywords into the callable: two model_fns differing only in a static
    option are different functions to jit (an __eq__ that ignored them reused the first's compiled
    program for the second)."""
    class M(nn.Module):
        @nn.compact
        def __call__(self, x, t, mode="plus"):
            return x + 1.0 if mode == "plus" else x - 1.0

    m = M()
    x = jnp.zeros((2, 2))
    p = m.init(jax.random.key(0), x, 0.0)
    run = jax.jit(lambda fn, x: fn(x, 0.5))
    np.testing.assert_array_equal(run(gf.nets.model_fn(m, p, mode="plus"), x), 1.0)
    np.testing.assert_array_equal(run(gf.nets.model_fn(m, p, mode="minus"), x), -1.0)


def test_nets_take_a_length_1_t_for_the_whole_batch():
    """t of shape [1] is one time for the whole batch, as a scalar is (labels are broadcast "as t")."""
    m = gf.nets.MLP(hidden=(8,))
    x = jax.random.normal(jax.random.key(0), (3, 2))
    p = m.init(jax.random.key(1), x, jnp.zeros(3))
    np.testing.assert_array_equal(m.apply(p, x, jnp.array([0.4])), m.apply(p, x, 0.4))


def test_mlp_uses_the_requested_time_embedding():
    """MLP(time_embedding=...): "identity" feeds t itself (one feature, time_dim ignored); "fourier"
    feeds TimeEmbedding(time_dim, "fourier")(t) (checked against the first layer with its parameters)."""
    x, t = jax.random.normal(jax.random.key(0), (3, 2)), jnp.array([0.1, 0.5, 0.9])
    ident = gf.nets.MLP(hidden=(4,), time_embedding="identity", time_dim=6)
    assert ident.init(jax.random.key(1), x, t)["params"]["Dense_0"]["kernel"].shape == (2 + 1, 4)
    m = gf.nets.MLP(hidden=(4,), time_embedding="fourier", time_dim=6)
    p = m.init(jax.random.key(1), x, t)
    _, st = m.apply(p, x, t, capture_intermediates=True)
    emb = gf.nets.TimeEmbedding(6, "fourier").apply({}, t)
    q = p["params"]["Dense_0"]
    want = np.concatenate([np.asarray(x), np.asarray(emb)], -1) @ np.asarray(q["kernel"]) + np.asarray(q["bias"])
    np.testing.assert_allclose(st["intermediates"]["Dense_0"]["__call__"][0], want, rtol=1e-5, atol=1e-5)


def test_dit_unpatchify_and_final_layer_follow_the_patch_order_and_shift_scale_order():
    """The un-patchify is the inverse of the documented patchify order (row, column, channel within a
    patch, patches row-major): out[b, i p + r, j p + s, c] = final[b, i gw + j, (r p + s) C + c]; and
    the final adaLN layer is DiT's: shift, scale = split(final_adaLN(silu(c))), then
    LN(x) (1 + scale) + shift. Checked with random parameters on a non-square image."""
    p, co = 2, 3
    net = gf.nets.DiT(patch_size=p, hidden=16, depth=1, num_heads=2, out_channels=co)
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 1))
    t = jnp.array([0.3, 0.7])
    params = _randomize(net.init(jax.random.key(1), x, t), jax.random.key(2))
    out, st = net.apply(params, x, t, capture_intermediates=True)
    it = st["intermediates"]
    fin = np.asarray(it["final"]["__call__"][0])  # [B, N, p*p*co]
    out = np.asarray(out)
    gh, gw = 2, 3
    for i in range(gh):
        for j in range(gw):
            for r in range(p):
                for s in range(p):
                    np.testing.assert_allclose(out[:, i * p + r, j * p + s, :],
                                               fin[:, i * gw + j, (r * p + s) * co:(r * p + s + 1) * co], rtol=1e-6)
    mod = np.asarray(it["final_adaLN"]["__call__"][0])
    shift, scale = mod[:, :16], mod[:, 16:]
    ln = np.asarray(it["LayerNorm_0"]["__call__"][0])
    q = params["params"]["final"]
    want = (ln * (1 + scale[:, None]) + shift[:, None]) @ np.asarray(q["kernel"]) + np.asarray(q["bias"])
    np.testing.assert_allclose(fin, want, rtol=1e-4, atol=1e-4)


def test_dit_adds_the_row_column_position_embedding_of_a_non_square_patch_grid():
    """Module docstring: a fixed 2-D sin-cos position embedding is added to the patch tokens, half
    the features encoding the row, half the column. At initialisation every block is the identity
    (adaLN-Zero), so block0's output minus the patch embedding is the position embedding: on a
    non-square 2 x 3 patch grid it must be sincos_pos_embedding_2d(d, 2, 3)."""
    net = gf.nets.DiT(patch_size=2, hidden=16, depth=1, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (1, 4, 6, 1))
    t = jnp.array([0.5])
    params = net.init(jax.random.key(1), x, t)
    _, st = net.apply(params, x, t, capture_intermediates=True)
    it = st["intermediates"]
    pos = np.asarray(it["block0"]["__call__"][0] - it["patch_embed"]["__call__"][0])[0]
    np.testing.assert_allclose(pos, gf.nets.sincos_pos_embedding_2d(16, 2, 3), atol=1e-5)


def test_dit_final_layer_norm_has_no_parameters():
    """DiT's final layer (as its blocks) normalises without a learned affine (elementwise_affine=False
    in the paper's code): the adaLN modulation is the only scale and shift, so the parameters are the
    patch embedding, time / label embeddings, the blocks and final_adaLN / final only."""
    net = gf.nets.DiT(patch_size=2, hidden=16, depth=1, num_heads=2)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.ones((1, 4, 4, 1)), jnp.zeros((1,)))
    assert set(shapes["params"]) == {"patch_embed", "t_embed0", "t_embed1", "block0", "final_adaLN", "final"}


def test_dit_bfloat16_compute_keeps_the_time_embedding_accurate():
    """dtype=bfloat16 is the computation dtype of the layers; the time embedding's phases
    (sinusoidal_embedding of 1000 t) are computed from t in float32, so a bfloat16 DiT stays within
    bfloat16 rounding of the float32 DiT with the same random parameters (measured 0.014 relative;
    rounding t itself to bfloat16 first moves the phases by up to ~1 rad: 0.33)."""
    net = gf.nets.DiT(patch_size=2, hidden=16, depth=1, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
    t = jnp.array([0.1003, 0.3137, 0.6071, 0.9013])
    params = _randomize(net.init(jax.random.key(1), x, t), jax.random.key(2))
    f32 = net.apply(params, x, t)
    b16 = net.clone(dtype=jnp.bfloat16).apply(params, x, t)
    assert float(jnp.linalg.norm(b16 - f32) / jnp.linalg.norm(f32)) < 0.05


def test_fresh_unconditional_dit_can_learn_its_time_conditioning():
    """adaLN-Zero zeroes the modulation layers only: the time embedding c = emb(t) is non-zero at
    initialisation, so the gradient reaches every block's adaLN kernel and the final adaLN kernel.
    (With the time MLP's output layer zero too, c = 0 and silu(c) = 0: those kernels get no gradient,
    c none either, and an unconditional DiT could never learn to depend on t.)"""
    net = gf.nets.DiT(patch_size=2, hidden=16, depth=2, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
    t = jnp.array([0.1, 0.4, 0.6, 0.9])
    params = jax.jit(net.init)(jax.random.key(1), x, t)
    # (compiled once: run op by op, the two gradients compiled ~110 programs, 13 s)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(net.apply(q, x, t) * x)))
    g = grad(params)
    # at init only the zero final layer gets gradient; after one SGD step on it, the modulation
    # kernels (whose gradient is silu(c) times the back-propagated signal) get gradient too
    params = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
    g = grad(params)["params"]
    for k in (g["final_adaLN"]["kernel"], g["block0"]["adaLN"]["kernel"], g["block1"]["adaLN"]["kernel"]):
        assert float(jnp.abs(k).max()) > 0.0
