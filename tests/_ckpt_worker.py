"""A small checkpointed training run, killed and restarted by tests/test_checkpoint.py.

    python tests/_ckpt_worker.py CKPT_DIR OUT_NPZ [--steps 30] [--slow_save SECONDS]

Trains a tiny class-conditional MLP on the bundled digits from a grain loader, saving every 5
steps (async) and printing ``step N`` after every chunk and ``saving N`` while a save is in flight.
On start it resumes from the latest complete checkpoint (state, RNG and loader position). At the
end it writes the parameters to OUT_NPZ. ``--slow_save`` delays the commit of every checkpoint
(simulating a slow filesystem) so that the test can kill the process mid-save.
"""

import argparse
import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genflow as gf

p = argparse.ArgumentParser()
p.add_argument("ckpt_dir")
p.add_argument("out")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--slow_save", type=float, default=0.0)
args = p.parse_args()

SAVE_EVERY = 5
options = {}
if args.slow_save:
    from orbax.checkpoint._src.path import atomicity

    class SlowCommit(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *a, **kw):
            await asyncio.sleep(args.slow_save)
            return await super().finalize(*a, **kw)

    options["temporary_path_class"] = SlowCommit

mlp = gf.nets.MLP(hidden=(32,), time_dim=8, num_classes=10)


def apply(params, x, t, y=None):
    return mlp.apply(params, x.reshape(len(x), -1), t, y).reshape(x.shape)


opt = optax.adam(1e-2)
params = mlp.init(jax.random.key(0), jnp.zeros((1, 64)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
state = gf.train.init_state(params, opt, jax.random.key(1), ema_decays=(0.9,))
loader = gf.data.image_loader("digits", 16, seed=0)
class ReportingCheckpointer(gf.train.Checkpointer):
    def save(self, st, **kw):  # (the save runs after fit's callbacks: report it from here)
        started = super().save(st, **kw)
        print(f"saving {int(st.step)}", flush=True)
        return started


ckpt = ReportingCheckpointer(args.ckpt_dir, save_every=SAVE_EVERY, keep=2, **options)
state, data_state = ckpt.restore_or(state)
if data_state is not None:
    loader.set_state(data_state)
print(f"resumed from {int(state.step)}", flush=True)


def report(st, metrics):
    print(f"step {int(st.step)}", flush=True)


step = gf.train.make_train_step(gf.train.diffusion_objective(apply, gf.paths.linear(), prediction="velocity"), opt)
state, _ = gf.train.fit(state, step, loader, args.steps - int(state.step), chunk_size=2, progress=False,
                        checkpointer=ckpt, callback=report)
ckpt.close()
np.savez(args.out, *[np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.ema))],
         rng=np.asarray(jax.random.key_data(state.rng)))
print("done", flush=True)
