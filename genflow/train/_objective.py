"""Build ``loss_fn(params, batch, key)`` for a flax module, a path and an objective."""

from __future__ import annotations

from typing import Any, Callable

import jax

from genflow import losses
from genflow._checks import split_batch
from genflow.paths import Path

Array = jax.Array


def diffusion_objective(
    apply_fn: Callable,
    path: Path,
    *,
    prediction: str = "eps",
    weighting: str | Callable = "uniform",
    coupling: str | Callable = "independent",
    label_dropout: float = 0.0,
    null_label: int | None = None,
    dropout_rng: bool = False,
    **loss_kwargs: Any,
) -> Callable[[Any, Any, Array], tuple[Array, dict]]:
    """``loss_fn(params, batch, key) -> (loss, aux)`` for :func:`genflow.train.make_train_step`.

    Args:
      apply_fn: ``apply_fn(params, x, t[, y=labels])``, e.g. ``module.apply``.
      path, prediction, weighting, coupling, **loss_kwargs: see :func:`genflow.losses.diffusion_loss`.
        ``prediction="velocity", weighting="uniform"`` is conditional flow matching.
      label_dropout: probability of replacing a label by ``null_label`` (classifier-free guidance);
        > 0 needs batches with labels ``y``.
      null_label: the "no label" index (e.g. ``num_classes`` for :class:`genflow.nets.MLP`).
      dropout_rng: call ``apply_fn(..., train=True, rngs={"dropout": key})`` (networks with
        dropout such as :class:`genflow.nets.UNet`), with a fresh key every step.
    The batch is ``x: [B, ...]`` or ``{"x": [B, ...], "y": [B], "x1": [B, ...]}``: labels ``y``
    and pre-coupled noise ``x1`` (e.g. from :class:`genflow.ot.CoupledBatches`, whose exact OT
    pairings are computed ahead in a background thread) are optional; given ``x1``, it replaces
    the noise draw and ``coupling`` is not used.

    Keys: ``key`` is split into ``(k_drop, k_loss)``; the loss is
    ``genflow.losses.diffusion_loss(..., k_loss)`` (not of ``key`` itself), labels are dropped
    with ``k_drop`` and the network's dropout uses ``jax.random.fold_in(key, 2)``.
    """
    if label_dropout and null_label is None:
        raise ValueError("label_dropout > 0 needs null_label (the index of the 'no label' class)")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1]; got {label_dropout}")

    def loss_fn(params, batch, key):
        x0, y, x1 = split_batch(batch)
        k_drop, k_loss = jax.random.split(key)
        if label_dropout > 0:
            if y is None:  # (the dropout was skipped: a conditional net trained without a null label)
                raise ValueError(f"label_dropout={label_dropout} needs labels: the batch has no 'y' "
                                 f"(pass {{'x': ..., 'y': ...}} batches, or label_dropout=0)")
            y = losses.drop_labels(k_drop, y, label_dropout, null_label)
        kw = {} if y is None else {"y": y}
        if dropout_rng:
            kw.update(train=True, rngs={"dropout": jax.random.fold_in(key, 2)})

        def fn(x, t):
            return apply_fn(params, x, t, **kw)

        # noise paired with the data outside the loss (e.g. gf.ot.CoupledBatches' exact OT)
        pairing = coupling if x1 is None else losses.paired_coupling(x1)
        loss, aux = losses.diffusion_loss(fn, path, x0, k_loss, prediction=prediction, weighting=weighting,
                                          coupling=pairing, **loss_kwargs)
        return loss, {}

    return loss_fn
