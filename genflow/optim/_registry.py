"""Every optimizer by name: genflow's transforms, optax's and optax.contrib's optimizers."""

from __future__ import annotations

import difflib
import functools
import inspect
from types import ModuleType
from typing import Callable

import optax
import optax.contrib

from genflow._checks import check_registration, check_removal
from genflow.optim._diffgrad import diffgrad
from genflow.optim._fadam import fadam
from genflow.optim._grams import grams
from genflow.optim._smb import smb

GENFLOW: dict[str, Callable] = {"grams": grams, "fadam": fadam, "diffgrad": diffgrad, "smb": smb}


def _optimizers_in(module: ModuleType) -> dict[str, Callable]:
    """Public functions of ``module`` that build an optimizer: they take a ``learning_rate``
    (the transforms ``scale_by_*`` are building blocks, not optimizers)."""
    out = {}
    for name in dir(module):
        fn = getattr(module, name)
        if name.startswith(("_", "scale_by")) or not inspect.isfunction(fn):
            continue
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            continue
        if "learning_rate" in params or "max_learning_rate" in params:  # polyak_sgd caps its own step
            out[name] = fn
    return out


@functools.wraps(optax.contrib.sophia)  # (its signature, for get's hyper-parameter check)
def _sophia(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    # optax.contrib.sophia reads the loss closure as obj_fn=; genflow.train.make_train_step passes
    # it as value_fn= (optax's name: passing obj_fn= too breaks optax.lbfgs's line search)
    tx = optax.contrib.sophia(*args, **kwargs)

    def update_fn(updates, state, params=None, *, obj_fn=None, value_fn=None, **extra_args):
        return tx.update(updates, state, params, obj_fn=value_fn if obj_fn is None else obj_fn, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _adadelta(learning_rate=1.0, *args, **kwargs) -> optax.GradientTransformationExtraArgs:
    # optax.adadelta's default learning_rate=None applies scale_by_learning_rate(None), the
    # identity: its update has the gradient's sign and climbs the loss (113x on a least-squares
    # problem in 300 steps). Zeiler's AdaDelta is the descent step, learning rate 1.
    if learning_rate is None:
        raise ValueError("adadelta: learning_rate=None makes optax's update ascend the loss (scale_by_learning_rate"
                         "(None) is the identity, without the descent sign); pass a rate (1.0 is Zeiler's AdaDelta)")
    return optax.adadelta(learning_rate, *args, **kwargs)


_adadelta.__doc__ = optax.adadelta.__doc__
_adadelta.__signature__ = inspect.signature(optax.adadelta).replace(parameters=[
    p.replace(default=1.0) if p.name == "learning_rate" else p
    for p in inspect.signature(optax.adadelta).parameters.values()])

# re-exports whose update reads an extra argument under another name than make_train_step's, or
# whose default does not descend
_ADAPTED: dict[str, Callable] = {"sophia": _sophia, "adadelta": _adadelta}


def _table() -> dict[str, tuple[str, Callable]]:
    table: dict[str, tuple[str, Callable]] = {}
    for source, fns in (("genflow", GENFLOW), ("optax", _optimizers_in(optax)),
                        ("optax.contrib", _optimizers_in(optax.contrib))):
        for name, fn in fns.items():
            table.setdefault(name, (source, _ADAPTED.get(name, fn) if source != "genflow" else fn))
            # (genflow > optax > optax.contrib on a clash)
    return dict(sorted(table.items()))


_TABLE = _table()


_SOURCES = ("genflow", "optax", "optax.contrib", "user")


def names(source: str | None = None) -> list[str]:
    """Sorted names accepted by :func:`get`; ``source`` in {"genflow", "optax", "optax.contrib",
    "user"} restricts them to one library ("user": those added by :func:`register`)."""
    if source is not None and source not in _SOURCES:
        raise ValueError(f"source must be one of {', '.join(map(repr, _SOURCES))}; got {source!r}")
    return sorted(n for n, (src, _) in _TABLE.items() if source is None or src == source)


def source(name: str) -> str:
    """Which library provides optimizer ``name``: "genflow", "optax", "optax.contrib" or "user"."""
    return _lookup(name)[0]


def register(name: str, factory: Callable[..., optax.GradientTransformation], *, overwrite: bool = False) -> Callable:
    """Make an optimizer of your own available by name: :func:`get` and
    :func:`genflow.train.make_optimizer` (its warm-up, decay and clipping) then build it with
    ``factory(**hparams)``. To be used by ``make_optimizer``, take a ``learning_rate``: it is given
    an optax schedule (a callable of the step count, as optax's own optimizers accept), also for a
    constant rate, so scale updates with ``optax.scale_by_learning_rate(learning_rate)`` rather than
    multiplying by it. (The experiment scripts' optimizer flags take their own fixed lists.) Names are unique: an existing one is refused, unless it is one
    of yours and ``overwrite=True`` (re-running a notebook cell); genflow's, optax's and
    optax.contrib's names cannot be replaced. :func:`unregister` removes one of yours;
    :func:`source` reports it as "user". Returns ``factory``. A transform that uses the loss (``value=``), the
    gradient (``grad=``) or ``value_fn=``, which genflow's train step passes, must be an
    ``optax.GradientTransformationExtraArgs`` (optax drops them for a plain one: refused when the
    factory returns it directly; inside ``optax.chain`` it cannot be seen, so build the chain's
    parts that need them as ``GradientTransformationExtraArgs`` too).

    Example::

        def my_sgd(learning_rate, momentum=0.9):
            return optax.sgd(learning_rate, momentum)
        gf.optim.register("my_sgd", my_sgd)
        tx = gf.train.make_optimizer(1e-2, name="my_sgd", warmup_steps=100)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a non-empty str; got {type(name).__name__}")
    if not name:
        raise ValueError("name must be a non-empty str; got ''")
    check_registration("optimizer", name, _owner(name), overwrite)
    import genflow.optim as _optim_module

    if name not in _TABLE and name in vars(_optim_module):
        # (gf.optim.clip stayed optax.clip while gf.optim.get("clip") built the user's factory)
        raise ValueError(f"name {name!r} is already an attribute of genflow.optim (a transform or function, not an "
                         f"optimizer of the table): gf.optim.{name} and gf.optim.get({name!r}) would differ; pick "
                         f"another name")
    if not callable(factory):
        raise TypeError(f"factory must be callable (hyper-parameters -> optax.GradientTransformation); got "
                        f"{type(factory).__name__}")
    _TABLE[name] = ("user", factory)
    return factory


def unregister(name: str) -> Callable:
    """Remove optimizer ``name`` added by :func:`register`; returns its factory. genflow's, optax's
    and optax.contrib's names cannot be removed (``ValueError``), nor an unknown name."""
    check_removal("optimizer", name, _owner(name), names("user"))
    return _TABLE.pop(name)[1]


def _owner(name) -> str | None:
    """Who registered optimizer ``name`` (see :func:`genflow._checks.check_registration`)."""
    if not isinstance(name, str) or name not in _TABLE:
        return None
    src = _TABLE[name][0]
    return "you" if src == "user" else src


def _lookup(name: str) -> tuple[str, Callable]:
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str; got {type(name).__name__}")
    if name not in _TABLE:
        close = difflib.get_close_matches(name, _TABLE, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; valid names: {', '.join(_TABLE)}")
    return _TABLE[name]


def get(name: str, **hparams) -> optax.GradientTransformation:
    """The optimizer ``name`` built with ``hparams``, for experiment configs.

    ``name`` is any of :func:`names`: genflow's transforms (``grams``, ``fadam``, ``diffgrad``,
    ``smb``), every optax optimizer (``adam``, ``adamw``, ``sgd``, ``amsgrad``, ``lion``, ...)
    and every optax.contrib one (``momo``, ``momo_adam``, ``ademamix``, ``schedule_free_adamw``,
    ...). Hyper-parameters are passed through unchanged (``learning_rate`` accepts a float, or an
    optax schedule where the optimizer supports one: optax's ``sm3``, ``rprop`` and
    ``optimistic_adam`` take only a float).

    Raises:
      ValueError: unknown name (the message lists the valid names).
      TypeError: a hyper-parameter the optimizer does not take, or a required one missing
        (the message lists the accepted ones).

    Examples:
      >>> import genflow as gf
      >>> opt = gf.optim.get("momo_adam", learning_rate=1e-2)
      >>> opt = gf.optim.get("grams", learning_rate=1e-3, weight_decay=1e-4)
    """
    src, fn = _lookup(name)
    sig = inspect.signature(fn)
    try:
        sig.bind(**hparams)
    except TypeError as e:
        accepted = ", ".join(sig.parameters)
        hint = ""
        if "learning_rate" in hparams and "learning_rate" not in sig.parameters and not any(
                p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            hint = ("; gf.train.make_optimizer passes learning_rate=...: the factory must take a `learning_rate` "
                    "argument")
        raise TypeError(f"bad hyper-parameters for {src} optimizer {name!r}: {e}; it accepts: {accepted}"
                        f"{hint}") from None
    tx = fn(**hparams)
    if not isinstance(tx, optax.GradientTransformation):  # (a factory returning 3 failed in init_state: "'int' object has no attribute 'init'")
        raise TypeError(f"{src} optimizer {name!r}: its factory must return an optax.GradientTransformation; got "
                        f"{type(tx).__name__}")
    return check_extra_args(tx, f"optimizer {name!r}")


_EXTRA = ("value", "grad", "value_fn")


def check_transform(tx, what: str = "optimizer"):
    """Return ``tx``; raise ``TypeError`` unless it has callable ``init`` and ``update`` (an optax
    ``GradientTransformation`` or one built the same way): a name or ``None`` failed deep inside
    optax with "'NoneType' object has no attribute 'init'"."""
    if isinstance(tx, str):
        raise TypeError(f"{what} must be an optax.GradientTransformation; got the name {tx!r}: build it with "
                        f"gf.optim.get({tx!r})(learning_rate) or gf.train.make_optimizer(lr, name={tx!r})")
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"{what} must be an optax.GradientTransformation (with init and update); got "
                        f"{type(tx).__name__}")
    return tx


def check_extra_args(tx, what: str = "optimizer"):
    """Return ``tx``; raise ``TypeError`` if it is a plain ``optax.GradientTransformation`` whose
    ``update`` names one of the extra arguments genflow's train step passes (``value``, ``grad``,
    ``value_fn``): optax hands extra arguments only to ``GradientTransformationExtraArgs``, so such
    a transform (a Polyak or MoMo-style step of your own) would silently get its default
    (``value=None``) at every step. Only ``tx`` itself is inspected: optax exposes no way to see
    the parts of an ``optax.chain`` (always an ``ExtraArgs`` one), which drops them for its plain
    parts."""
    if isinstance(tx, optax.GradientTransformationExtraArgs) or not isinstance(tx, optax.GradientTransformation):
        return tx
    try:
        params = inspect.signature(tx.update).parameters
    except (TypeError, ValueError):  # (a builtin or C callable: no signature to read)
        return tx
    named = [a for a in _EXTRA if a in params]
    if named:
        raise TypeError(f"{what}: its update takes {', '.join(named)}=, which optax passes only to an "
                        f"optax.GradientTransformationExtraArgs; build it as GradientTransformationExtraArgs(init, "
                        f"update) so that it receives them (as a plain GradientTransformation it would get None)")
    return tx
