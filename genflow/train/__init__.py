"""Training: state, a pure (shardable) train step that ``fit`` compiles, the scan-chunked ``fit``
loop, objectives, checkpoints, optimizer presets and metric logs.

    state = gf.train.init_state(params, optimizer, key, ema_decays=(0.999,))
    step = gf.train.make_train_step(gf.train.diffusion_objective(model.apply, path, prediction="velocity"), optimizer)
    state, history = gf.train.fit(state, step, batch_fn, num_steps=3000)

Scale: ``fit(..., mesh=gf.train.make_mesh(fsdp=4))`` shards the state (FSDP) and the batches
(data parallel) with explicit in/out shardings; ``fit(..., checkpointer=gf.train.Checkpointer(dir,
save_every=1000))`` saves asynchronously and resumes bit-identically.
"""

from genflow.train._checkpoint import Checkpointer
from genflow.train._logging import MetricsWriter, read_jsonl
from genflow.train._loop import NonFiniteLossError, fit
from genflow.train._objective import diffusion_objective
from genflow.train._optim import eval_params, lr_schedule, make_optimizer
from genflow.train._sharding import (batch_sharding, fsdp_spec, make_mesh, maybe_initialize_distributed, replicated,
                                     shard_batch, shard_state, tree_shardings)
from genflow.train._state import TrainState, ema_key, init_state
from genflow.train._step import batch_key, make_train_step

__all__ = ["TrainState", "init_state", "ema_key", "make_train_step", "batch_key", "fit", "NonFiniteLossError",
           "diffusion_objective", "Checkpointer", "MetricsWriter", "read_jsonl", "lr_schedule", "make_optimizer",
           "eval_params", "make_mesh", "fsdp_spec", "tree_shardings", "batch_sharding", "replicated", "shard_batch",
           "shard_state", "maybe_initialize_distributed"]
