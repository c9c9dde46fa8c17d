"""Optimizers as optax transforms.

genflow adds the transforms optax does not have, one file each, optax style:

* :func:`grams`: Adam's magnitude with the sign of the current gradient (Cao et al. 2024),
* :func:`fadam`: Adam as natural gradient with the diagonal empirical Fisher (Hwang 2024),
* :func:`diffgrad`: Adam scaled by a friction coefficient from the gradient change
  (Dubey et al. 2020),
* :func:`smb`: SGD with a model-building step correction (Birbil et al. 2024), a
  ``GradientTransformationExtraArgs`` that re-evaluates the loss through ``value_fn=``,

and re-exports the optax / optax.contrib ones unchanged (``adam``, ``adamw``, ``amsgrad``,
``sgd``, clipping, ``momo``, ``momo_adam`` (which need ``value=loss``), ``ademamix``,
``schedule_free_*``, ...; ``get("sophia")`` adapts optax.contrib's sophia, which reads the loss
closure as ``obj_fn=``, to the ``value_fn=`` that :func:`genflow.train.make_train_step` passes;
``get("adadelta")`` defaults to Zeiler's learning rate 1, where optax's ``None`` ascends).
:func:`get` builds any of them by name::

    opt = gf.optim.get("momo_adam", learning_rate=1e-2)
    step = gf.train.make_train_step(loss_fn, opt)   # passes value=loss and value_fn= to the optimizer

Every other optax / optax.contrib optimizer is also reachable as an attribute,
``gf.optim.<name>`` (see :func:`names`).
"""

from optax import (adam, adamw, amsgrad, chain, clip, clip_by_block_rms, clip_by_global_norm, masked, sgd,
                   with_extra_args_support)
from optax.contrib import (ademamix, momo, momo_adam, schedule_free, schedule_free_adamw, schedule_free_eval_params,
                           schedule_free_sgd, simplified_ademamix)

from genflow.optim._diffgrad import ScaleByDiffGradState, diffgrad, scale_by_diffgrad
from genflow.optim._fadam import ScaleByFAdamState, fadam, scale_by_fadam
from genflow.optim._grams import ScaleByGramsState, grams, scale_by_grams
from genflow.optim._registry import get, names, register, source, unregister
from genflow.optim._smb import SMBState, model_step, smb

__all__ = [
    # genflow
    "grams", "scale_by_grams", "ScaleByGramsState",
    "fadam", "scale_by_fadam", "ScaleByFAdamState",
    "diffgrad", "scale_by_diffgrad", "ScaleByDiffGradState",
    "smb", "model_step", "SMBState",
    "get", "names", "source", "register", "unregister",
    # re-exported from optax / optax.contrib
    "adam", "adamw", "amsgrad", "sgd", "clip", "clip_by_global_norm", "clip_by_block_rms", "chain", "masked",
    "with_extra_args_support", "momo", "momo_adam", "ademamix", "simplified_ademamix", "schedule_free",
    "schedule_free_adamw", "schedule_free_sgd", "schedule_free_eval_params",
]


def __getattr__(name: str):
    # gf.optim.<any optimizer name>: the optax / optax.contrib ones not imported above.
    from genflow.optim import _registry

    if name in _registry._TABLE:
        return _registry._TABLE[name][1]
    raise AttributeError(f"module 'genflow.optim' has no attribute {name!r}")


def __dir__():
    # every optimizer name too (tab completion listed only the names imported above)
    from genflow.optim import _registry

    return sorted(set(globals()) | set(_registry._TABLE))
