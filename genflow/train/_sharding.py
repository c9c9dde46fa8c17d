"""Meshes and sharding rules: data parallelism and FSDP-style parameter sharding (the pjit model).

genflow writes no distribution machinery of its own: a :class:`jax.sharding.Mesh` with the named
axes ``("data", "fsdp")``, :class:`~jax.sharding.NamedSharding` rules derived from array shapes,
and ``jax.jit`` with explicit in/out shardings; XLA's SPMD partitioner inserts the collectives.

- Batches are split along their leading axis over *both* mesh axes (every device sees a different
  slice of the global batch).
- Parameters, optimizer state and EMA copies are sharded over ``fsdp`` along their largest axis
  divisible by the ``fsdp`` size (ZeRO-3 / FSDP); arrays smaller than ``min_size`` elements, or
  without such an axis, are replicated. With ``fsdp=1`` this is plain data parallelism.

The same code runs on one CPU device, on ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
fake CPU devices, and on a multi-host TPU/GPU slice after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genflow._checks import check_int
from genflow.train._state import is_typed_key

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
MIN_SHARD_SIZE = 2 ** 14


def make_mesh(data: int | None = None, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh with axes ``("data", "fsdp")`` of shape ``(data, fsdp)``.

    Args:
      data: data-parallel size (default: all the devices not used by ``fsdp``).
      fsdp: number of devices each parameter is sharded over.
      devices: the devices (default ``jax.devices()``, all processes); when ``data * fsdp`` is
        smaller than their number, the first ``data * fsdp`` are used (single-process only).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not all(isinstance(d, jax.Device) for d in devices):  # (a 2-D array of devices: "unhashable type")
        raise TypeError(f"devices must be a flat sequence of jax.Device; got {[type(d).__name__ for d in devices]}")
    if not devices:  # (it read as "data must be a positive int; got 0")
        raise ValueError("devices is empty: a mesh needs at least one device")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices holds a device more than once: {devices}")
    fsdp = check_int("fsdp", fsdp)
    if data is None:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the number of devices ({len(devices)})")
        data = len(devices) // fsdp
    data = check_int("data", data)
    if data * fsdp > len(devices):
        raise ValueError(f"a ({data}, {fsdp}) mesh needs data * fsdp <= {len(devices)} devices; got data={data!r}")
    if data * fsdp < len(devices) and jax.process_count() > 1:
        # (the first devices belong to the first processes: the others had none, and failed far
        # from here, "Fetching value for jax.Array that spans non-addressable devices")
        raise ValueError(f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices; got "
                         f"data={data} x fsdp={fsdp} = {data * fsdp}")
    devices = devices[: data * fsdp]
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices)  # topology-aware on TPU/GPU
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def _check_mesh(mesh) -> None:
    """A ``ValueError`` naming ``mesh`` unless it has the axes ``("data", "fsdp")``: a plain
    ``Mesh(devices, ("data",))`` failed with a bare ``KeyError: 'fsdp'``."""
    names = tuple(getattr(mesh, "axis_names", ()) or ())
    if not isinstance(mesh, Mesh) or DATA not in names or FSDP not in names:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with the axes {BATCH_AXES} (gf.train.make_mesh(data, "
                         f"fsdp); fsdp=1 for pure data parallelism); got "
                         f"{'axes ' + repr(names) if isinstance(mesh, Mesh) else type(mesh).__name__}")


def check_auto_axes(mesh) -> None:
    """``fit`` shards with ``with_sharding_constraint``, which needs a mesh of Auto axes: one of
    ``jax.make_mesh``'s default Explicit axes failed deep inside fit ("can only refer to Auto
    axes ... You probably meant to use reshard")."""
    _check_mesh(mesh)
    kinds = {n: str(t) for n, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if n in BATCH_AXES}
    if any("Auto" not in k for k in kinds.values()):  # (other axes, e.g. a model-parallel one, are not fit's)
        raise ValueError(f"fit's mesh must have Auto 'data' and 'fsdp' axes (gf.train.make_mesh builds them; or "
                         f"jax.make_mesh(..., axis_types=...) with jax.sharding.AxisType.Auto for both); got {kinds}")


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """The :class:`PartitionSpec` of one array: its largest axis divisible by ``fsdp_size`` is
    sharded over ``"fsdp"`` (the first such axis on ties); small or indivisible arrays are replicated."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    axes = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
    if not axes:
        return P()
    i = max(axes, key=lambda a: (shape[a], -a))
    return P(*[FSDP if a == i else None for a in range(len(shape))])


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``) by :func:`fsdp_spec`.

    Works for parameters, optimizer states, EMA copies and whole :class:`TrainState` s: scalars
    (step counters, PRNG keys) are replicated.
    """
    _check_mesh(mesh)
    f = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), f, min_size)), tree)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Leading (batch) axis split over ``("data", "fsdp")``; with ``stacked`` the batch axis is the
    second one (a ``[steps, B, ...]`` chunk of batches)."""
    _check_mesh(mesh)
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh, stacked: bool = False) -> Any:
    """Assemble global ``jax.Array`` s from this process's share of a batch.

    Each process passes its own ``[B_local, ...]`` (or ``[steps, B_local, ...]`` with ``stacked``)
    numpy arrays; the global batch has ``B_local * process_count`` rows, split over the mesh
    (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh, stacked)
    n = mesh.shape[DATA] * mesh.shape[FSDP]
    axis = 1 if stacked else 0

    def put(x):
        x = np.asarray(x)
        if x.ndim <= axis:
            raise ValueError(f"every batch leaf needs a batch axis to split over the mesh; got a leaf of shape "
                             f"{x.shape[1:] if stacked else x.shape}")
        rows = x.shape[axis] * jax.process_count()
        if rows % n:
            raise ValueError(f"the global batch ({rows} rows) must be divisible by the mesh size ({n} devices)")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also places typed PRNG keys on shardings spanning
    other processes' devices (JAX refuses to ``device_put`` a key array there: every multi-process
    ``fit(..., mesh=...)`` failed on ``state.rng``): a key goes as its raw data, re-wrapped."""
    def one(x, sh):
        if isinstance(x, jax.Array) and is_typed_key(x):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sh), impl=jax.random.key_impl(x))
        return jax.device_put(x, sh)

    return jax.tree.map(one, tree, shardings)


def shard_state(state: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """Place a train state (or any pytree) on ``mesh`` by :func:`tree_shardings`."""
    return place(state, tree_shardings(state, mesh, min_size))


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when several processes are configured.

    Several processes are configured when ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``) is set, or on a cluster that JAX detects itself (SLURM, Cloud TPU
    pods: ``GENFLOW_DISTRIBUTED=1``). Call it first thing in an experiment entry point, before
    any other JAX call. Returns True if it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        n, i = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=None if n is None else int(n),
                                   process_id=None if i is None else int(i))
        return True
    if env.get("GENFLOW_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # cluster auto-detection (Cloud TPU, SLURM, ...)
        return True
    return False
