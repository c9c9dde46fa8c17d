"""Training: state, jitted train step, the scan-chunked ``fit`` loop, objectives.

    state = gf.train.init_state(params, optimizer, key, ema_decays=(0.999,))
    step = gf.train.make_train_step(gf.train.diffusion_objective(model.apply, path, prediction="velocity"), optimizer)
    state, history = gf.train.fit(state, step, batch_fn, num_steps=3000)
"""

from genflow.train._loop import NonFiniteLossError, fit
from genflow.train._objective import diffusion_objective
from genflow.train._state import TrainState, ema_key, init_state
from genflow.train._step import make_train_step

__all__ = ["TrainState", "init_state", "ema_key", "make_train_step", "fit", "NonFiniteLossError", "diffusion_objective"]
