"""Optimizer and learning-rate schedule presets composed from optax (warmup, cosine decay, clipping)."""

from __future__ import annotations

import math
from typing import Any

import optax

from genflow._checks import check_int, concrete_real


def _finite_real(value, positive: bool = False) -> bool:
    """Whether ``value`` is a concrete finite real >= 0 (> 0 with ``positive``)."""
    v = concrete_real(value)  # (None for strings, bools and non-numbers)
    return v is not None and (v > 0 if positive else v >= 0) and v < math.inf


def lr_schedule(learning_rate: float, *, warmup_steps: int = 0, decay_steps: int | None = None,
                end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant, or, with
    ``decay_steps`` (the total length, warmup included), a cosine decay to
    ``end_factor * learning_rate`` (``optax.warmup_cosine_decay_schedule``; Loshchilov & Hutter 2017)."""
    import jax  # (checks only concrete values: inject_hyperparams traces learning_rate)

    if not isinstance(learning_rate, jax.core.Tracer) and not _finite_real(learning_rate):
        raise ValueError(f"learning_rate must be a finite real >= 0; got {learning_rate!r}")
    if not isinstance(end_factor, jax.core.Tracer) and not (_finite_real(end_factor) and float(end_factor) <= 1.0):
        # (> 1 was accepted: the cosine "decay" rose to end_factor * learning_rate)
        raise ValueError(f"end_factor must be a real in [0, 1] (the final learning rate is end_factor * "
                         f"learning_rate); got {end_factor!r}")
    check_int("warmup_steps", warmup_steps, 0)
    if decay_steps is None:
        if not isinstance(end_factor, jax.core.Tracer) and float(end_factor) != 0.0:
            raise ValueError(f"end_factor needs decay_steps (without them the schedule is constant after the warmup); "
                             f"got end_factor={end_factor!r}")
    else:
        check_int("decay_steps", decay_steps)
    if decay_steps is not None:
        if decay_steps <= warmup_steps:
            raise ValueError(f"decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps})")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, decay_steps,
                                                  end_value=end_factor * learning_rate)
    if warmup_steps == 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                 optax.constant_schedule(learning_rate)], [warmup_steps])


# optax optimizers whose learning_rate must be a float (a schedule fails inside optax with a cryptic error)
FLOAT_LR_ONLY = frozenset({"sm3", "rprop", "optimistic_adam"})


def make_optimizer(learning_rate: float = 1e-3, *, name: str = "adamw", warmup_steps: int = 0,
                   decay_steps: int | None = None, end_factor: float = 0.0, clip_norm: float | None = None,
                   **kwargs: Any) -> optax.GradientTransformation:
    """``gf.optim.get(name, learning_rate=lr_schedule(...), **kwargs)``, preceded by
    ``optax.clip_by_global_norm(clip_norm)`` (not for ``"smb"``, which re-evaluates the unclipped
    gradient).

    ``name`` is any optimizer of :func:`genflow.optim.names` that takes a ``learning_rate``:
    genflow's (``"grams"``, ``"fadam"``, ...), optax's (``"adam"``, ``"adamw"``, ``"sgd"``,
    ``"lion"``, ...) and optax.contrib's (``"momo"``, ``"momo_adam"``, ``"ademamix"``, ...);
    ``kwargs`` go to it (e.g. ``b2=0.99, weight_decay=0.0``). optax's ``"sm3"``, ``"rprop"`` and
    ``"optimistic_adam"`` take only a float learning rate: they get ``learning_rate`` itself, and
    ``warmup_steps`` / ``decay_steps`` are refused for them. ``"prodigy"`` with a warm-up gets
    ``safeguard_warmup=True`` (without it optax's Prodigy divides by the warm-up's first learning
    rate, 0: NaN updates).

    ``learning_rate`` defaults to 1e-3 for every ``name``, also for the optimizers whose own
    default is 1 because they adapt their step size (``"prodigy"``, ``"dog"``, ``"dowg"``,
    ``"dadapt_adamw"``, ``"cocob"``, ``"momo"``, ``"adadelta"``): at 1e-3 most of them barely move (a
    least-squares loss stayed at 1.00x its start over 300 steps for prodigy, dog, dowg, dadapt_adamw and
    adadelta; cocob still converged, momo reached 0.26x); pass ``learning_rate=1.0`` for them.

    Schedule-free optimizers (``"schedule_free_adamw"``, ``"schedule_free_sgd"``) train the point
    ``y`` at which gradients are taken, which is what ``TrainState.params`` (and its EMA copies)
    hold; evaluate at their averaged ``x``, :func:`eval_params` ``(state)`` (about half the
    excess loss of ``y`` on a noisy least-squares problem).

    Raises:
      ValueError: a bad ``learning_rate`` / ``warmup_steps`` / ``decay_steps`` / ``end_factor`` /
        ``clip_norm``, a schedule for an optimizer that takes only a float, ``clip_norm`` with SMB,
        ``"prodigy"`` with a warm-up and ``safeguard_warmup=False``, ``"dadapt_adamw"`` with a
        warm-up, ``"schedule_free"`` (its step size is its ``base_optimizer``'s).
    """
    from genflow import optim  # (genflow.optim does not import genflow.train)
    from genflow.optim._smb import holds_smb

    lr = lr_schedule(learning_rate, warmup_steps=warmup_steps, decay_steps=decay_steps, end_factor=end_factor)
    if name in FLOAT_LR_ONLY:  # (they failed on the schedule with "bad operand type for unary -: 'function'")
        if warmup_steps or decay_steps is not None:
            alt = f"; optax's {name}_v2 takes a schedule" if name == "optimistic_adam" else ""
            raise ValueError(f"optimizer {name!r} takes a float learning rate, not a schedule (optax builds it so)"
                             f"{alt}: pass warmup_steps=0 and decay_steps=None; got warmup_steps={warmup_steps!r}, "
                             f"decay_steps={decay_steps!r}")
        lr = learning_rate  # (the same constant schedule)
    if name == "prodigy" and warmup_steps:
        # optax's Prodigy divides its D estimate by the learning rate unless safeguard_warmup: the
        # warm-up's 0 at step 0 made every update NaN (the Prodigy paper's remedy for warm-ups)
        if not kwargs.setdefault("safeguard_warmup", True):
            raise ValueError(f"prodigy with warmup_steps={warmup_steps} needs safeguard_warmup=True (its first learning "
                             f"rate is 0, which optax's Prodigy divides by otherwise: NaN updates); got "
                             f"safeguard_warmup={kwargs['safeguard_warmup']!r}")
    if name == "dadapt_adamw" and warmup_steps:
        # (its D estimate at step 0 is 0 / 0 with the warm-up's rate 0: a NaN optimizer state that the
        # train step's finite check does not see, so every later step failed and the "last good
        # state" was already poisoned; optax's D-Adaptation has no safeguard option)
        raise ValueError(f"dadapt_adamw cannot start from the warm-up's learning rate 0 (optax's D-Adaptation divides "
                         f"by it: a NaN state); pass warmup_steps=0 (it adapts its own step size) or use 'prodigy', "
                         f"which has a safe warm-up; got warmup_steps={warmup_steps!r}")
    if name == "schedule_free":
        # (its learning_rate only weights the averages; a rate, warm-up or decay given here changed nothing)
        raise ValueError("make_optimizer cannot schedule 'schedule_free': its step size is its base_optimizer's, so "
                         "learning_rate / warmup_steps / decay_steps would be ignored; use 'schedule_free_adamw' or "
                         "'schedule_free_sgd', or build gf.optim.schedule_free(learning_rate, base_optimizer) with "
                         "the schedule in base_optimizer")
    try:
        tx = optim.get(name, learning_rate=lr, **kwargs)
    except TypeError as e:
        # (a registered factory computing with its rate, e.g. optax.scale(-learning_rate), failed with "bad
        # operand type for unary -: 'function'" and no hint; extension audit): if it builds from the float,
        # the schedule is what it cannot take
        if callable(lr) and optim.source(name) == "user" and _builds(name, learning_rate, kwargs):
            e.add_note(f"make_optimizer passes optimizer {name!r} its learning_rate as an optax schedule (a function "
                       f"of the step), and its factory fails on one (it builds from the float {learning_rate!r}); a "
                       f"factory registered with gf.optim.register must accept one: scale the updates with "
                       f"optax.scale_by_learning_rate(learning_rate) rather than computing with it")
        raise
    if clip_norm is not None:
        if not _finite_real(clip_norm, positive=True):
            raise ValueError(f"clip_norm must be a finite real > 0; got {clip_norm!r}")
        if holds_smb(tx):  # (also under a registered alias or a partial of gf.optim.smb)
            # SMB compares its incoming gradient with value_fn's gradient at the trial point: a clipped
            # incoming gradient makes y = g_t - g and the Armijo threshold mix clipped and unclipped
            # gradients (gf.optim.smb must come first in a chain)
            raise ValueError(f"clip_norm cannot be used with SMB (name={name!r}; SMB re-evaluates the unclipped gradient "
                             f"through value_fn=, so clipping before it builds an inconsistent model step); "
                             f"got clip_norm={clip_norm!r}")
        # (through the train step's extra-argument view: inside chain, a transform that names only
        # some of value= / grad= / value_fn= was given all three, "unexpected keyword argument")
        from genflow.train._step import _extra_args_view

        tx = optax.chain(optax.clip_by_global_norm(clip_norm), _extra_args_view(tx))
    return tx


def _builds(name: str, learning_rate: float, kwargs: dict) -> bool:
    """Whether optimizer ``name`` builds from a float ``learning_rate``."""
    from genflow import optim

    try:
        optim.get(name, learning_rate=learning_rate, **kwargs)
    except Exception:
        return False
    return True


def eval_params(state):
    """The parameters to evaluate a :class:`TrainState` at: schedule-free optimizers' averaged
    ``x`` (``optax.contrib.schedule_free_eval_params``) when ``state.opt_state`` holds a
    ``ScheduleFreeState`` anywhere (also inside ``optax.chain``, e.g. with ``clip_norm``, where
    that helper failed with "'tuple' object has no attribute 'b1'"); else ``state.params``."""
    import jax
    from optax.contrib import ScheduleFreeState, schedule_free_eval_params

    from genflow.optim._smb import _is_masked_node

    found = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, ScheduleFreeState))
             if isinstance(s, ScheduleFreeState)]
    masked = found and any(_is_masked_node(z) for z in jax.tree.leaves(found[0].z, is_leaf=_is_masked_node))
    if len(found) > 1 or masked:  # (a partitioned one failed inside optax: "Only integer scalar arrays ...")
        raise ValueError("state.opt_state holds a schedule-free state for part of the parameters only "
                         "(optax.multi_transform / optax.masked) or several of them: apply "
                         "optax.contrib.schedule_free_eval_params to each part's own parameters")
    return schedule_free_eval_params(found[0], state.params) if found else state.params
