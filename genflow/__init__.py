"""genflow: generative flows in JAX.

Diffusion and score-based models, flow matching, normalizing flows, their samplers,
likelihoods and optimizers, as pure functions over flax.linen networks and optax transforms.

    import jax
    import genflow as gf
    path = gf.paths.linear()
    fn = gf.oracles.Gaussian.diagonal([1.0, -1.0], [0.5, 0.2]).model(path, "velocity")  # or a trained network
    x1 = path.prior_sample(jax.random.key(0), (512, 2))
    x0, info = gf.sample(fn, path, x1, prediction="velocity", solver="heun", steps=20)
"""

from genflow import losses, nets, oracles, param, paths, sampling
from genflow.sampling import sample

__version__ = "0.1.0"

_LAZY = ("train", "data", "metrics", "viz", "likelihood", "flows", "optim", "guidance", "inverse", "ot")


def __getattr__(name):
    # Heavier modules (orbax, tfds, matplotlib) are imported on first use.
    if name == "log_prob":
        from genflow.likelihood import log_prob

        return log_prob
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f"genflow.{name}")
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'genflow' has no attribute {name!r}")


def __dir__():
    # the lazy names too (tab completion, help(gf) and dir(gf) listed neither gf.log_prob nor gf.train, ...)
    return sorted(set(globals()) | set(__all__))


__all__ = ["paths", "param", "losses", "nets", "oracles", "sampling", "sample", "log_prob", *_LAZY]
