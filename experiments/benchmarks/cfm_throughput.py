"""Conditional flow matching on 2-D moons: training throughput and sample quality, genflow vs torchcfm.

The problem (issue 2): moons (``gf.data.moons``: noise 0.05, centred, scaled x2), an MLP
3x256 SiLU on ``concat(x, t)``, batch 256, Adam 1e-3 (constant), CPU, linear (CondOT / rectified
flow) path, velocity regression. Contenders:

* ``genflow``: ``gf.train.fit`` with on-device data (``gf.data.moons`` sampled inside the
  ``lax.scan`` of each chunk), ``gf.train.make_train_step`` (finite-loss guard, EMA 0.99),
  independent coupling; ``unroll`` = steps unrolled per scan iteration.
* ``genflow OT``: exact minibatch OT. ``gf.ot.CoupledBatches`` draws a chunk of minibatches
  on device, solves their exact assignments on the host thread pool (SciPy on
  Sinkhorn-preconditioned costs, same optimum) in a background thread, and ``fit`` consumes
  them as host batches with the loss using ``gf.losses.paired_coupling(batch["x1"])``.
* ``genflow OT (per-step callback)``: ``coupling="ot"`` inside the loss, i.e. one blocking host
  callback per step (the simple path; reference).
* ``torchcfm``: ``ConditionalFlowMatcher(sigma=0)`` / ``ExactOptimalTransportConditionalFlowMatcher
  (sigma=0)`` in a plain PyTorch loop, same MLP (``nn.Sequential`` of Linear/SiLU on
  ``cat([x, t])``), moons generated the same way with torch ops, Adam 1e-3; its weights start
  from genflow's initial parameters for the same seed (the same initial field; see ``TorchRunner``).

Throughput: contenders are timed round-robin (interleaved), after a warm-up run; each timed run
is a fresh ``fit`` call whose compilation is excluded (the persistent compilation cache makes
the recompiles cheap; the first compile is reported). OT pipelines are timed from a cold start
(the first chunk's couplings are inside the timed run). Quality: each contender is trained 3,000
steps per seed; samples from the same 4,096 noise draws are integrated by genflow's sampler
(an adaptive solver at rtol = atol = 1e-5, and a fixed-step one) and compared with fresh data
by the exact 2-Wasserstein distance (``gf.metrics.w2_exact``); the data-vs-data floor (two
independent draws of 4,096) is reported beside it. torchcfm's networks are evaluated by copying
their weights into the same flax MLP (torchcfm's time runs noise -> data, so its field is
``v_gf(x, t) = -v_torch(x, 1 - t)``).

Investigation notes (measured on the shared 2-core box while other jobs kept its load average at
7-9, so absolute rates are 2-4x below the idle machine's; results/cfm_throughput.md has the tables):

* torch with its default 2 OpenMP threads collapses on an oversubscribed box (3-11 steps/s
  against 68-180 with 1 thread), so the ratios use torchcfm's faster thread setting per round.
* Exact OT, pure JAX: shortest augmenting paths (Jonker-Volgenant / Crouse, column-reduction
  start) vectorised over the 256 columns and vmapped over a chunk of problems, one lockstep
  ``while_loop`` iteration per Dijkstra or augmentation step, need ~8,000-11,000 iterations per
  256-point moons-vs-Gaussian problem (max over a batch). XLA:CPU ran them at ~9 us/iteration
  for 1 problem and ~3-4 us per problem-iteration for 16-256 problems (its argmin is a scalar
  loop: 194 us for [64, 256]; min-reductions ~4 us): 40-70 ms per problem against ~3 ms (idle)
  for SciPy. Augmenting-row reduction (LAPJV) hit price wars (300k+ row steps) on these
  near-tie costs; auction or population-potential warm starts cut the Dijkstra steps only
  1.3-1.7x. Rejected on CPU.
* Exact OT, what helps: (1) the coupling depends only on the random draws, so a whole chunk is
  prepared ahead in a background thread (``gf.ot.CoupledBatches``) and overlaps training;
  (2) SciPy releases the GIL, so a chunk's problems are spread over the cores; (3) SciPy runs on
  ``cost - g`` with ``g`` a Sinkhorn column potential (NumPy/BLAS, ~1.4 ms loaded), which has
  the same optimum and needs far shorter augmenting paths (``--part solver``). The Sinkhorn step
  in XLA:CPU was slower than in NumPy (batched mat-vecs at ~1 GFLOP/s), so it runs on the host.
* Independent coupling: scan ``unroll`` and the train-step guards (finite-loss ``lax.cond`` on
  the whole state, twice per step) are within the load noise here; bf16 compute halved the rate
  (XLA:CPU converts around its float32 dots). XLA:CPU's library paths (jaxlib 0.10.2:
  ``--xla_cpu_experimental_xnn_fusion_type=dot`` / ``dot,eltwise,reduce``, ``..._ynn_fusion_type=dot``,
  ``..._onednn_fusion_type=dot``, ``--xla_cpu_use_onednn=true``, XNN graph fusion, fast math)
  gave 210-296 steps/s against 222-262 without flags (2026-12-02, idle box, 4 x 500 steps each):
  within the run-to-run noise. One core alone does 181 steps/s (~41 GFLOP/s), two 262: torch's
  single thread (190-240 steps/s) is as fast per core, so the 2.5x target would need ~2x the
  FLOP rate per core on these 256-wide layers.
* Roofline (``--part roofline``, 2026-12-02, idle): a step is 203 MFLOP of dense layers (XLA's
  cost analysis: 209 for the whole step); the best float32 matmul rate on the two cores was
  110-125 GFLOP/s (XLA, chained [256, 256] matmuls). 2.5x the issue's torchcfm rate (271 steps/s)
  would need 138 GFLOP/s in the dense layers alone -- above that rate; 5x its OT rate (90 steps/s)
  91 GFLOP/s even with a free coupling. genflow's step runs at 0.45-0.61 of the best matmul rate.
  That rate is not a hard ceiling, though: in a later run the same day (09:20, the machine running
  fast) genflow's step reached 510 steps/s = 104 GFLOP/s, 1.16x that run's best matmul rate (90).
  The hardware peak of these two Zen 3 cores (AVX2, two 256-bit FMA pipes, 2.45 GHz nominal) is
  ~157 GFLOP/s, so 138 GFLOP/s would take 88% of it (or sustained boost clocks).
* Where the step's time went (2026-12-02 afternoon, a different machine: 2-core AMD EPYC family 26,
  i.e. Zen 5 with AVX-512; XLA's chained [256, 256] matmuls at ~290 GFLOP/s, [2048, 2048] at 273).
  Per-op timing (``jax.profiler`` trace, then isolated loops of each op) found three costs that
  were not matmuls: (1) the output layer's kernel gradient ``h^T g`` with a [256, 2] result took
  XLA:CPU's slow dot path (forward + both gradients 147 us, against 23 us with the kernel stored
  [out, in]) -- now ``gf.nets.OutputDense``; (2) ``gf.data.moons``' random permutation (a sort,
  ~40-50 us) -- now one coin per row pair; (3) the finite guard's ``all(isfinite)`` per leaf on
  gradients and parameters (~2 x 55 us) -- now one sum per tree, reusing the gradient norm. The step
  went from ~1.4 ms (699 steps/s) to ~1.0-1.1 ms (900-990 steps/s), where the two hidden layers'
  six [256, 256] matmuls take ~690 us at ~290 GFLOP/s. What is left: Adam vs SGD ~50 us, the
  guard's ``lax.cond`` ~30 us, the data ~40 us, the RNG (five threefry calls) ~23 us; EMA, scan
  unroll, the PRNG implementation (rbg), ``optax.flatten`` (2x slower) and XLA:CPU flags (XNN,
  YNN off, oneDNN, 512-bit vectors, concurrency-optimised scheduler, single-threaded Eigen) gave
  nothing beyond the run-to-run noise. XLA uses both cores (1.9 CPU-seconds per second; pinned
  to one core it trains at ~560 steps/s). Data parallelism over two host devices (one thread each)
  was slower (380 steps/s). For OT the host assignment (2.3 ms per minibatch on one thread,
  ``--part solver``) and training (1.8 ms on one core) share the two cores: ~490 steps/s at
  best with perfect overlap; 5x torchcfm's OT rate (~100 steps/s here) needs ~500.
* The OT host path, measured whole (2026-12-02 evening, same Zen 5 machine): ``--part solver`` had
  timed the solver on ready cost matrices (2.3 ms), but ``CoupledBatches`` also builds them from the
  points, and ``gf.ot.sq_distances`` reduced a [256, 256, 2] float64 difference over its short last
  axis: 1.55-1.9 ms per minibatch, so the host path took 4.4 ms, not 2.3 (the background stream
  alone delivered 198 minibatches/s on one thread, 399 on two). It now adds one feature at a time
  in place (0.19 ms; the same float64 values): 2.8 ms per minibatch, 409 / 751 minibatches/s,
  and genflow OT training went from 272 to 369 steps/s in a same-hour A/B. ``--part solver`` now
  has a row for the whole path from the points. What is left is SciPy (~1.6-1.8 ms) and the
  potential (~0.55 ms): even with the exact optimal column duals SciPy takes 0.6 ms per problem,
  and with duals perturbed by N(0, 0.01^2) 1.3 ms; Sinkhorn schedules with smaller eps (0.03,
  0.01, 0.003 after 0.1, warm-started), row orders, the transposed problem and SciPy's sparse
  LAPJVsp (84 ms dense; a k-nearest candidate graph from the reduced costs often has no perfect
  matching, the optimal partner ranking up to 23rd in its row) did not beat it. With training
  at ~1.9 core-ms per step and the host path at ~2.7, the two cores allow ~440 OT steps/s.
* Over-relaxed Sinkhorn (2026-12-02, later): ``column_potential`` now runs the scaling updates
  over-relaxed (``omega = 1.8``, Thibault et al. 2021) for 20 iterations instead of plain ones for
  40, then one pair of hard c-transforms; the float32 pass is redone in float64 when its scalings
  overflow (16-D Gaussians). On 256 moons-vs-Gaussian points the potential costs ~0.48 ms and
  SciPy then ~1.0 ms (plain, 40 it: ~0.6 + ~1.4); ``--part solver``: potential + SciPy 1.55 vs
  1.96 ms, the whole host path 1.65 ms (was ~2.8); the same permutations as before on 200 problems
  (the optimum is unique). OT training 470 steps/s in the first run (was 350-404). Tried and not
  better: eps 0.05/0.07/0.15, 15/30 iterations, omega 1.5/1.7/1.85 (1.9 diverges in float32),
  float64 throughout (+0.35 ms), and the LAPJV family of ``lapx`` 0.11 (lapjv 12.8, lapjvc 1.8
  on shifted costs, lapjvh 3.8 ms: none beats SciPy on the shifted costs).
* Epsilon scaling and the host path's allocations (2026-12-03): ``column_potential`` now runs its 20
  iterations as 10 at eps 0.1 then 10 at eps 0.02 (warm-started; a stage that leaves float32's range
  is dropped; a float64 retry of the first stage runs all 20 at eps 0.1, so 16-D Gaussians cost what
  they did): the optimal assignment's mean reduced cost is 7.7x smaller (0.0012 vs 0.0089) and
  potential + SciPy per 256-point problem 1.17-1.26 vs 1.40-1.45 ms (moons; 8 Gaussians and
  checkerboard alike; 512 points 4.8-6.0 vs 6.6-9.0 ms). ``solve_ot_points`` converted the whole
  batch of points to float64 up front; in a standalone loop that made every problem's [B, B]
  temporaries page-fault afresh (~400 minor faults per problem: 2.1 vs 1.4 ms), so each problem is
  converted on its own now (inside ``CoupledBatches``' thread the old path did not fault). With both,
  ``CoupledBatches.prepare`` on one thread, the old and new module interleaved in one process (12
  rounds, twice): min 1.63-1.70 -> 1.43-1.56 CPU-ms per minibatch, median 1.77-2.06 -> 1.48-1.82
  (-8 to -17%); a first comparison in separate processes (2.08 -> 1.37) did not reproduce.
  Training gains less: an interleaved A/B of the old and new module in one process
  (10 rounds of 1,000 OT steps) gave a median per-round ratio of 1.055 (0.985-1.103), 545 vs 522
  steps/s; training (1.9 core-ms per step) and the host path now share the two cores at ~3.5 CPU-ms
  per step, where the ideal would be ~3.3. Also measured and not kept: a jitted XLA potential (no
  GIL, so two threads run in parallel: 0.29 vs 0.56 ms wall, but 0.61 CPU-ms against NumPy's 0.62:
  XLA spreads the small mat-vecs over both cores), thread-local [B, B] buffers (no gain once the
  conversion was per problem), XLA single-threaded beside one solver thread, and a lower OS
  priority for the solver threads (all within the run-to-run noise).

    python experiments/benchmarks/cfm_throughput.py                 # everything (~15 min on 2 idle cores)
    python experiments/benchmarks/cfm_throughput.py --part throughput --repeats 7
    python experiments/benchmarks/cfm_throughput.py --part quality --seeds 0 1 2
    python experiments/benchmarks/cfm_throughput.py --part data     # gf.data.moons vs sklearn's make_moons
    python experiments/benchmarks/cfm_throughput.py --part solver   # exact assignment: raw vs preconditioned
    python experiments/benchmarks/cfm_throughput.py --part ema --seeds 100 101 102 --json ''  # EMA decay, tuning seeds
    python experiments/benchmarks/cfm_throughput.py --part roofline --json ''  # FLOPs per step vs the CPU's matmul rate
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import jax

# A fresh persistent compilation cache per run: the first compile of each contender is cold (and
# reported); the later fit calls of the interleaved rounds hit the cache.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="genflow_bench_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import genflow as gf  # noqa: E402
from genflow import ot as gf_ot  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, markdown_table, run_meta, write_json  # noqa: E402

BATCH, WIDTH, DEPTH, LR, EMA = 256, 256, 3, 1e-3, 0.99
TARGETS = {"independent": (2.5, 271.0, 0.19), "ot": (5.0, 90.0, 0.14)}  # (ratio, torchcfm steps/s here, W2)


# -- genflow ------------------------------------------------------------------------------------
def gf_model():
    return gf.nets.MLP(hidden=(WIDTH,) * DEPTH, activation="silu", time_embedding="identity")


def gf_init_params(seed: int):
    """genflow's initial MLP parameters for ``seed`` (flax's LeCun-normal kernels, zero biases);
    torchcfm's model starts from the same ones (``TorchRunner.load_params``)."""
    return gf_model().init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)))


def gf_state(seed: int, ema: tuple = (EMA,)):
    return gf.train.init_state(gf_init_params(seed), optax.adam(LR), jax.random.key(seed + 1000), ema_decays=ema)


def gf_step(coupling: str):
    """The train step: ``coupling="independent"`` / ``"ot"`` (per-step callback) take a data batch
    ``x0``; ``"paired"`` takes ``{"x": x0, "x1": coupled noise}`` from ``gf.ot.CoupledBatches``."""
    model, path, opt = gf_model(), gf.paths.linear(), optax.adam(LR)
    if coupling == "paired":
        def loss_fn(params, batch, key):
            fn = jax.tree_util.Partial(model.apply, params)
            loss, _ = gf.losses.flow_matching_loss(fn, path, batch["x"], key,
                                                   coupling=gf.losses.paired_coupling(batch["x1"]))
            return loss, {}
    else:
        loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity", coupling=coupling)
    return gf.train.make_train_step(loss_fn, opt)


def moons_batch(key):
    return gf.data.moons(key, BATCH)


class GenflowRunner:
    """``run(n) -> seconds`` (excluding compilation): ``n`` more training steps of one state."""

    def __init__(self, kind: str, seed: int = 0, unroll: int = 1, chunk: int = 500, ot_chunk: int = 100,
                 ema: tuple = (EMA,)):
        self.kind, self.unroll, self.chunk, self.ot_chunk, self.seed = kind, unroll, chunk, ot_chunk, seed
        self.state = gf_state(seed, ema)
        self.step = gf_step({"independent": "independent", "ot": "paired", "ot_callback": "ot"}[kind])
        self.compile_times: list[float] = []
        self.calls = 0

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        if self.kind == "ot":
            data = gf_ot.CoupledBatches(gf.data.moons, BATCH, jax.random.fold_in(jax.random.key(self.seed), self.calls),
                                        chunk=min(self.ot_chunk, n), num_batches=n)
            chunk = min(self.ot_chunk, n)
        else:
            data, chunk = moons_batch, min(self.chunk, n)
        self.state, hist = gf.train.fit(self.state, self.step, data, n, chunk_size=chunk, progress=False,
                                        unroll=self.unroll)
        jax.block_until_ready(self.state.params)
        dt = time.perf_counter() - t0 - hist["compile_time"]
        self.compile_times.append(hist["compile_time"])
        self.calls += 1
        self.history = hist
        return dt

    def eval_params(self, which: str = "ema"):
        return self.state.ema[gf.train.ema_key(EMA)] if which == "ema" else self.state.params


# -- torchcfm -------------------------------------------------------------------------------------
class TorchRunner:
    """torchcfm's matcher in a plain PyTorch loop on the same problem."""

    def __init__(self, kind: str, seed: int = 0, threads: int | None = None, device: str = "cpu",
                 ema: float | None = None):
        import torch
        from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                        ExactOptimalTransportConditionalFlowMatcher)

        self.torch, self.threads = torch, threads or torch.get_num_threads()
        torch.manual_seed(seed)
        np.random.seed(seed)  # torchcfm's OT plan sampler draws pairs with NumPy's global RNG
        layers, d = [], 3
        for _ in range(DEPTH):
            layers += [torch.nn.Linear(d, WIDTH), torch.nn.SiLU()]
            d = WIDTH
        self.device = torch.device(device)
        self.model = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 2)).to(self.device)
        # Same initial function on both sides: the W2 comparison was confounded by the init (flax's
        # LeCun-normal kernels and zero biases for genflow, nn.Linear's uniform +-1/sqrt(fan_in)
        # weights and biases here, ~1/sqrt(3) of the weight scale; with torch's init genflow's EMA W2
        # was torchcfm's, 0.1317 vs 0.1318 over 4 seeds, against 0.1242 with its own). So the torch
        # model starts from genflow's initial parameters for this seed. (The Linear layers above still
        # draw their default init first, so torch's RNG stream for the data is unchanged; the init does
        # not change the speed, so the throughput parts get the same.)
        self.load_params(gf_init_params(seed))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.fm = (ExactOptimalTransportConditionalFlowMatcher if kind == "ot" else ConditionalFlowMatcher)(sigma=0.0)
        self.compile_times = [0.0]
        # an EMA of the weights as genflow's (ema <- d ema + (1 - d) params after every step, from the
        # initial weights), for the quality comparison on equal terms (not in the throughput runs)
        self.ema = ema
        self.ema_params = [p.detach().clone() for p in self.model.parameters()] if ema is not None else None

    def load_params(self, params):
        """Set the weights from genflow MLP parameters, so that the model's field, read back as
        ``evaluate`` reads it (``eval_params`` + ``v_gf(x, t) = -v_torch(x, 1 - t)``), is genflow's:
        ``v_torch(x, s) = -v_gf(x, 1 - s)``. The inverse of ``eval_params`` up to that time flip:
        hidden ``weight = kernel.T``, the output layer's ``weight = kernel_t`` ([out, in] already); the
        first layer's time column ``w_t`` becomes ``-w_t`` with ``w_t`` added to its bias
        (``w_t (1 - s) = w_t - w_t s``), and the output layer is negated."""
        torch = self.torch
        p = params["params"]
        linears = [m for m in self.model if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for k, m in enumerate(linears):
                d = p[f"Dense_{k}"]
                w = np.array(d["kernel_t"] if k == len(linears) - 1 else np.asarray(d["kernel"]).T, np.float32)
                b = np.array(d["bias"], np.float32)
                if k == 0:  # input = cat([x, t]): the time is the last column
                    b = b + w[:, -1]
                    w[:, -1] = -w[:, -1]
                if k == len(linears) - 1:
                    w, b = -w, -b
                m.weight.copy_(torch.from_numpy(w))
                m.bias.copy_(torch.from_numpy(b))

    def moons(self, n):
        torch = self.torch
        dev = self.device
        upper = torch.randperm(n, device=dev) < n // 2
        theta = torch.rand(n, device=dev) * math.pi
        x = torch.where(upper, torch.cos(theta), 1.0 - torch.cos(theta))
        y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
        pts = torch.stack([x, y], -1) + 0.05 * torch.randn(n, 2, device=dev)
        return 2.0 * (pts - torch.tensor([0.5, 0.25], device=dev))

    def run(self, n: int) -> float:
        torch = self.torch
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        for _ in range(n):
            self.opt.zero_grad()
            x0 = torch.randn(BATCH, 2, device=self.device)  # torchcfm: x0 = source (noise), x1 = target (data), t: 0 -> 1
            x1 = self.moons(BATCH)
            t, xt, ut = self.fm.sample_location_and_conditional_flow(x0, x1)
            vt = self.model(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema_params, list(self.model.parameters()), 1.0 - self.ema)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def eval_params(self, which: str = "raw"):
        """The weights (``which``: ``"raw"`` or ``"ema"``) as genflow MLP parameters (hidden
        ``Dense_k.kernel = weight.T``; the output layer stores ``kernel_t = weight``, torch's own
        ``[out, in]`` order)."""
        linears = [m for m in self.model if isinstance(m, self.torch.nn.Linear)]
        if which == "ema":
            values = iter(self.ema_params)
            tensors = {id(p): next(values) for p in self.model.parameters()}
        else:
            tensors = {id(p): p for p in self.model.parameters()}

        def layer(k, m):
            w, b = (tensors[id(m.weight)].detach().cpu().numpy(),
                    jnp.asarray(tensors[id(m.bias)].detach().cpu().numpy()))
            return {"kernel_t": jnp.asarray(w), "bias": b} if k == len(linears) - 1 else {"kernel": jnp.asarray(w.T), "bias": b}

        return {"params": {f"Dense_{k}": layer(k, m) for k, m in enumerate(linears)}}


# -- evaluation -------------------------------------------------------------------------------------
def velocity_fn(params, torch_time: bool):
    model = gf_model()
    if not torch_time:
        return gf.nets.model_fn(model, params)
    return jax.tree_util.Partial(_flipped, params)


def _flipped(params, x, t):
    return -gf_model().apply(params, x, 1.0 - t)


def evaluate(params, torch_time: bool, seed: int, n: int, solvers) -> dict:
    """W2 to fresh data for each ``(solver, kwargs)`` in ``solvers``, with its NFE."""
    fn = velocity_fn(params, torch_time)
    path = gf.paths.linear()
    k_noise, k_data = jax.random.split(jax.random.key(10_000 + seed))
    x1 = path.prior_sample(k_noise, (n, 2))
    data = np.asarray(gf.data.moons(k_data, n))
    out = {}
    for name, kw in solvers:
        x0, info = gf.sample(fn, path, x1, prediction="velocity", solver=kw["solver"],
                             **{k: v for k, v in kw.items() if k != "solver"})
        out[name] = {"w2": gf.metrics.w2_exact(np.asarray(x0), data), "nfe": int(info.nfe)}
    return out


def data_floor(seed: int, n: int) -> float:
    k_data = jax.random.split(jax.random.key(10_000 + seed))[1]
    return gf.metrics.w2_exact(np.asarray(gf.data.moons(k_data, n)),
                               np.asarray(gf.data.moons(jax.random.fold_in(k_data, 1), n)))


# -- parts ------------------------------------------------------------------------------------------
def part_data(n: int = 4096, seeds=(0, 1, 2)) -> dict:
    """``gf.data.moons`` against scikit-learn's ``make_moons`` transformed the same way."""
    from sklearn.datasets import make_moons

    rows, out = [], []
    for s in seeds:
        g1 = np.asarray(gf.data.moons(jax.random.key(s), n))
        g2 = np.asarray(gf.data.moons(jax.random.key(s + 100), n))
        sk = 2.0 * (make_moons(n, noise=0.05, random_state=s)[0] - np.array([0.5, 0.25]))
        sk2 = 2.0 * (make_moons(n, noise=0.05, random_state=s + 100)[0] - np.array([0.5, 0.25]))
        r = {"seed": s, "w2_gf_vs_sklearn": gf.metrics.w2_exact(g1, sk), "w2_gf_vs_gf": gf.metrics.w2_exact(g1, g2),
             "w2_sklearn_vs_sklearn": gf.metrics.w2_exact(sk, sk2),
             "mean_gf": g1.mean(0).tolist(), "mean_sklearn": sk.mean(0).tolist(),
             "std_gf": g1.std(0).tolist(), "std_sklearn": sk.std(0).tolist()}
        out.append(r)
        rows.append([s, r["w2_gf_vs_sklearn"], r["w2_gf_vs_gf"], r["w2_sklearn_vs_sklearn"],
                     np.round(r["mean_gf"], 3).tolist(), np.round(r["mean_sklearn"], 3).tolist(),
                     np.round(r["std_gf"], 3).tolist(), np.round(r["std_sklearn"], 3).tolist()])
    print(f"\n### Data check: gf.data.moons vs sklearn make_moons(noise=0.05), both (x - (0.5, 0.25)) * 2, n = {n}\n")
    print(markdown_table(["seed", "W2 gf vs sklearn", "W2 gf vs gf", "W2 sklearn vs sklearn", "mean gf",
                          "mean sklearn", "std gf", "std sklearn"], rows))
    return {"n": n, "rows": out}


def part_solver(problems: int = 40, repeats: int = 5) -> dict:
    """Per-problem time of the exact assignment of one 256-point moons-vs-Gaussian minibatch:
    SciPy on the raw costs vs on Sinkhorn-preconditioned costs (potential time included), and the
    whole host path from the points (cost matrix included, as ``CoupledBatches`` runs it), 1 thread."""
    from scipy.optimize import linear_sum_assignment

    keys = jax.random.split(jax.random.key(123), problems)
    x0 = np.asarray(jax.vmap(moons_batch)(keys), np.float64)
    x1 = np.asarray(jax.random.normal(jax.random.key(124), x0.shape), np.float64)
    costs = [gf_ot.sq_distances(a, b) for a, b in zip(x0, x1)]
    refs = np.array([c[linear_sum_assignment(c)].sum() for c in costs])

    def raw():
        return [linear_sum_assignment(c)[1] for c in costs]

    def potentials():
        return [gf_ot.column_potential(c) for c in costs]

    def pre():
        return [gf_ot.solve_assignment(c, threads=1) for c in costs]

    def plain():  # an earlier preconditioner: plain Sinkhorn (omega = 1), 40 iterations at eps 0.1
        return [linear_sum_assignment(c - gf_ot.column_potential(c, 0.1, 40, omega=1.0)[None])[1] for c in costs]

    def one_stage():  # the previous default: over-relaxed, one stage of 20 iterations at eps 0.1
        return [linear_sum_assignment(c - gf_ot.column_potential(c, 0.1, 20)[None])[1] for c in costs]

    x0_32, x1_32 = x0.astype(np.float32), x1.astype(np.float32)

    def points():  # what CoupledBatches runs per minibatch: float32 points -> float64 costs -> solver
        return list(gf_ot.solve_ot_points(x0_32, x1_32, threads=1))

    def cost_matrices():
        return [gf_ot.sq_distances(a, b) for a, b in zip(x0, x1)]

    contenders = {"SciPy, raw costs": raw,
                  "plain Sinkhorn potential (omega=1, 40 it) + SciPy": plain,
                  "one-stage potential (omega=1.8, 20 it at eps 0.1) + SciPy": one_stage,
                  "column_potential only (default: omega=1.8, 10 it at eps 0.1, then 10 at 0.02)": potentials,
                  "genflow: potential + SciPy on shifted costs": pre,
                  "sq_distances only (float64 costs from the points)": cost_matrices,
                  "genflow from the points (solve_ot_points: costs + potential + SciPy)": points}
    times = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, f in contenders.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) / problems * 1e3)
    perms = np.stack(pre())
    err = float(np.max(np.abs(np.array([c[np.arange(len(p)), p].sum() for c, p in zip(costs, perms)]) - refs) / refs))
    base = times["SciPy, raw costs"]
    rows = [[k, statistics.median(v), min(v), max(v), statistics.median([b / a for a, b in zip(v, base)])]
            for k, v in times.items()]
    print(f"\n### Exact assignment of one minibatch (256 moons vs 256 Gaussian points), ms per problem, "
          f"1 thread, {problems} problems x {repeats} interleaved rounds; max relative cost difference to "
          f"SciPy on raw costs: {err:.1e}\n")
    print(markdown_table(["method", "median ms", "min", "max", "speed-up vs raw (per round)"], rows))
    return {"ms_per_problem": {k: _stats(v) for k, v in times.items()}, "max_rel_cost_diff": err}


def _stats(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}


def part_throughput(repeats: int, steps: dict, unrolls, ot_chunk: int, torch_threads=(1, 2),
                    torch_device: str = "cpu") -> dict:
    """Steps/s of each contender, round-robin. ``torch_device="cuda"``: torchcfm on the GPU (one
    thread setting; genflow runs on JAX's default device)."""
    import torch

    if torch_device != "cpu":
        torch_threads = torch_threads[:1]

    default_threads = torch.get_num_threads()
    runners = {}
    for u in unrolls:
        runners[f"genflow independent (unroll={u})"] = (GenflowRunner("independent", unroll=u), steps["independent"])
    for th in torch_threads:
        runners[f"torchcfm independent (threads={th})"] = (TorchRunner("independent", threads=th, device=torch_device),
                                                           steps["independent"])
    runners[f"genflow OT (CoupledBatches, chunk={ot_chunk})"] = (GenflowRunner("ot", ot_chunk=ot_chunk),
                                                                  steps["ot"])
    runners["genflow OT (per-step callback)"] = (GenflowRunner("ot_callback", chunk=steps["ot_callback"]),
                                                 steps["ot_callback"])
    for th in torch_threads:
        runners[f"torchcfm OT (threads={th})"] = (TorchRunner("ot", threads=th, device=torch_device), steps["torch_ot"])
    # warm-up (first compile), then interleaved repeats
    for name, (r, n) in runners.items():
        print(f"warm-up {name}: {n} steps in {r.run(n):.3g} s", flush=True)
    rates = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (r, n) in runners.items():
            rates[name].append(n / r.run(n))
    res = {name: dict(_stats(v), steps_per_run=runners[name][1], first_compile_s=runners[name][0].compile_times[0])
           for name, v in rates.items()}
    # the reference is torchcfm in its faster thread setting, round by round (same round = same load)
    best_torch = {}
    for kind in ("independent", "OT"):
        names = [k for k in res if k.startswith(f"torchcfm {kind} ")]
        best_torch[kind] = [max(res[k]["runs"][i] for k in names) for i in range(repeats)]
        res[f"torchcfm {kind}: best thread setting per round"] = dict(_stats(best_torch[kind]), steps_per_run="",
                                                                      first_compile_s=0.0)
    rows = []
    for name, r in res.items():
        ref = best_torch["OT" if "OT" in name else "independent"]
        ratio = r["median"] / statistics.median(ref)
        per_round = statistics.median([a / b for a, b in zip(r["runs"], ref)])
        rows.append([name, r["median"], r["min"], r["max"], ratio, per_round, r["first_compile_s"], r["steps_per_run"]])
    print(f"\n### Training throughput (steps/s), batch {BATCH}, MLP {DEPTH}x{WIDTH} SiLU, Adam {LR}; "
          f"genflow on {jax.devices()[0].device_kind}, torch on {torch_device}; "
          f"{repeats} interleaved rounds; torch default threads = {default_threads}, cpus = {os.cpu_count()}, "
          f"load average (1, 5, 15 min) at the end = {os.getloadavg()}\n")
    print(markdown_table(["contender", "median", "min", "max", "ratio of medians vs best torchcfm",
                          "median per-round ratio", "first compile (s)", "steps per run"], rows))
    tgt = {}
    for kind, key in (("independent", "genflow independent"), ("ot", "genflow OT")):
        best = max((k for k in res if k.startswith(key)), key=lambda k: res[k]["median"])
        ref = best_torch["OT" if kind == "ot" else "independent"]
        tgt[kind] = statistics.median([a / b for a, b in zip(res[best]["runs"], ref)])
    for k, (ratio, torch_ref, _) in TARGETS.items():
        print(f"- {k}: best genflow / best torchcfm (median per-round ratio) = {tgt[k]:.3f} (target >= {ratio}; "
              f"{'met' if tgt[k] >= ratio else 'MISSED'})")
    return {"results": res, "ratios": tgt}


def part_roofline(steps: int, repeats: int) -> dict:
    """How far the 2.5x / 5x targets are from what this CPU can do: FLOPs of one training step
    (XLA's cost analysis of genflow's step, and the dense layers' count), the rates each library
    trains at, and the CPU's own matmul rate (XLA and torch, the layers' shape and a large one)."""
    import torch

    dims = [3] + [WIDTH] * DEPTH + [2]
    dense = 2 * BATCH * sum(a * b for a, b in zip(dims[:-1], dims[1:]))  # forward matmuls
    layer_flops = 3 * dense  # forward + the two backward matmuls per layer (inputs' and weights' gradients)
    state, step = gf_state(0), gf_step("independent")
    batch = moons_batch(jax.random.key(0))
    xla_flops = float(jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"])

    g = GenflowRunner("independent")
    t = TorchRunner("independent", threads=1)
    g_rate = max(steps / g.run(steps) for _ in range(repeats + 1))
    t_rate = max(steps / t.run(steps) for _ in range(repeats + 1))
    t_ot = TorchRunner("ot", threads=1)
    t_ot_rate = max(100 / t_ot.run(100) for _ in range(repeats + 1))

    # Each repetition scales by 1/sqrt(k) (b ~ N(0, 1)), which keeps the chained values at O(1). The
    # earlier factor 1e-2 shrank them ~0.16x per [256, 256] repetition into float32 denormals and then
    # to zero: XLA flushes denormals, torch does not, so torch's [256, 256] rate was measured on
    # denormals (4.7 GFLOP/s on the Xeon, against ~70 achieved in training).
    @functools.partial(jax.jit, static_argnums=(2, 3))
    def xla_loop(a, b, reps, scale):
        return jax.lax.fori_loop(0, reps, lambda i, c: (c @ b) * scale, a)

    def torch_loop(a, b, reps, scale, threads):
        torch.set_num_threads(threads)
        for _ in range(reps):
            a = (a @ b) * scale
        return a

    calls, flops = {}, {}  # chained [n, k] @ [k, k] matmuls, ~2 GFLOP per timed call
    for n, k in ((BATCH, WIDTH), (2048, 2048)):
        reps, scale = max(1, int(2e9 // (2 * n * k * k))), 1.0 / math.sqrt(k)
        a, b = jax.random.normal(jax.random.key(1), (n, k)), jax.random.normal(jax.random.key(2), (k, k))
        shape = f"[{n}, {k}] @ [{k}, {k}]"
        calls[f"XLA, {shape}"] = functools.partial(xla_loop, a, b, reps, scale)
        for th in (1, 2):
            calls[f"torch {th} thread(s), {shape}"] = functools.partial(torch_loop, torch.randn(n, k),
                                                                         torch.randn(k, k), reps, scale, th)
        flops.update({name: reps * 2 * n * k * k for name in calls if name.endswith(shape)})
    times = interleaved(calls, repeats=repeats)
    # the chain's end values, checked: they must stay in float32's normal range (>= 1.18e-38) on both sides
    ends = {name: np.abs(np.asarray(f())) for name, f in calls.items()}
    end_abs = {name: {"max": float(e.max()), "median": float(np.median(e))} for name, e in ends.items()}
    for name, e in end_abs.items():
        print(f"{name}: after the chain max|a| = {e['max']:.3g}, median |a| = {e['median']:.3g}")
    mm = {name: flops[name] / times[name]["min"] / 1e9 for name in calls}
    peak = max(mm.values())
    rates = {"genflow independent (XLA, 2 cores)": g_rate, "torchcfm independent (torch, 1 thread)": t_rate,
             "torchcfm exact OT (torch, 1 thread)": t_ot_rate,
             f"target: {TARGETS['independent'][0]}x torchcfm independent": TARGETS["independent"][0] * t_rate,
             f"target: {TARGETS['ot'][0]}x torchcfm exact OT (even with the coupling free)": TARGETS["ot"][0] * t_ot_rate,
             f"target: {TARGETS['independent'][0]}x the issue's torchcfm rate ({TARGETS['independent'][1]:g} steps/s)":
                 TARGETS["independent"][0] * TARGETS["independent"][1],
             f"target: {TARGETS['ot'][0]}x the issue's torchcfm OT rate ({TARGETS['ot'][1]:g} steps/s)":
                 TARGETS["ot"][0] * TARGETS["ot"][1]}
    rows = [[k, r, r * layer_flops / 1e9, r * layer_flops / 1e9 / peak] for k, r in rates.items()]
    print(f"\n### Roofline: FLOPs per training step (batch {BATCH}, MLP {DEPTH}x{WIDTH}): dense layers "
          f"{layer_flops / 1e6:.1f} MFLOP, XLA's cost analysis of genflow's step {xla_flops / 1e6:.1f} MFLOP\n")
    print(markdown_table(["matmul", "GFLOP/s"], [[k, v] for k, v in mm.items()]))
    print()
    print(markdown_table(["training", "steps/s", "GFLOP/s in the dense layers", "fraction of the best matmul rate"],
                         rows))
    return {"layer_flops": layer_flops, "xla_flops": xla_flops, "matmul_gflops": mm, "steps_per_s": rates,
            "matmul_end_abs": end_abs}


TSIT5 = ("tsit5", {"solver": "tsit5", "rtol": 1e-5, "atol": 1e-5})  # the adaptive solve the W2 numbers use


def part_quality(seeds, train_steps: int, n_eval: int, unroll: int, ot_chunk: int) -> dict:
    solvers = [TSIT5, ("heun50", {"solver": "heun", "steps": 50})]
    out, rows = [], []
    for seed in seeds:
        floor = data_floor(seed, n_eval)
        rec = {"seed": seed, "floor": floor, "runs": {}}
        for kind in ("independent", "ot"):
            g = GenflowRunner(kind, seed=seed, unroll=unroll, ot_chunk=ot_chunk)
            t_gf = g.run(train_steps)
            loss = float(np.mean(g.history["loss"][-200:]))
            for which in ("ema", "raw"):
                ev = evaluate(g.eval_params(which), False, seed, n_eval, solvers if which == "ema" else solvers[:1])
                rec["runs"][f"genflow {kind} ({'EMA 0.99' if which == 'ema' else 'raw'})"] = dict(
                    ev, train_s=t_gf, final_loss=loss)
            # 1 thread: 2 OpenMP threads collapse on a loaded box; EMA 0.99 as genflow's, so that both
            # sides are compared on equal terms (raw vs raw, EMA vs EMA)
            t = TorchRunner(kind, seed=seed, threads=1, ema=EMA)
            t_t = t.run(train_steps)
            for which in ("ema", "raw"):
                ev = evaluate(t.eval_params(which), True, seed, n_eval, solvers if which == "ema" else solvers[:1])
                rec["runs"][f"torchcfm {kind} ({'EMA 0.99' if which == 'ema' else 'raw'})"] = dict(ev, train_s=t_t)
        out.append(rec)
        for name, r in rec["runs"].items():
            rows.append([seed, name, r["tsit5"]["w2"], r["tsit5"]["nfe"], r.get("heun50", {}).get("w2", ""),
                         r.get("heun50", {}).get("nfe", ""), floor])
        print(f"seed {seed} done: " + ", ".join(f"{k}: {v['tsit5']['w2']:.4f}" for k, v in rec["runs"].items()),
              flush=True)
    print(f"\n### Sample quality after {train_steps} steps: exact W2 to fresh data (n = {n_eval}); floor = W2 between "
          f"two independent data draws of the same size\n")
    print(markdown_table(["seed", "model", "W2 tsit5 (rtol=atol=1e-5)", "NFE tsit5", "W2 heun 50 steps",
                          "NFE heun", "data floor"], rows))
    names = list(out[0]["runs"])
    summary = []
    for name in names:
        w = [r["runs"][name]["tsit5"]["w2"] for r in out]
        nfe = [r["runs"][name]["tsit5"]["nfe"] for r in out]
        summary.append([name, float(np.mean(w)), float(np.min(w)), float(np.max(w)), float(np.mean(nfe)),
                        float(np.mean([r["floor"] for r in out]))])
    print(f"\n### Mean over seeds {list(seeds)} (tsit5)\n")
    print(markdown_table(["model", "mean W2", "min", "max", "mean NFE", "mean floor"], summary))
    mean = {s[0]: s[1] for s in summary}
    for kind in ("independent", "ot"):
        for which in ("EMA 0.99", "raw"):
            m, t = mean[f"genflow {kind} ({which})"], mean[f"torchcfm {kind} ({which})"]
            print(f"- genflow {kind} ({which}): mean W2 {m:.4f} (target <= {TARGETS[kind][2]}; "
                  f"{'met' if m <= TARGETS[kind][2] else 'MISSED'}); torchcfm with the same weights ({which}): {t:.4f}")
    return {"seeds": out, "summary": summary}


def part_ema(seeds, train_steps: int, n_eval: int, decays=(0.99, 0.995, 0.998, 0.999)) -> dict:
    """W2 after ``train_steps`` for several EMA decays tracked in the same run (tuning seeds: run
    it on seeds other than the quality part's, so the chosen decay is not fitted to them)."""
    solvers = [TSIT5]
    rows, res = [], {}
    for seed in seeds:
        for kind in ("independent", "ot"):
            g = GenflowRunner(kind, seed=seed, ema=tuple(decays))
            g.run(train_steps)
            w = {f"EMA {d}": evaluate(g.state.ema[gf.train.ema_key(d)], False, seed, n_eval, solvers)["tsit5"]["w2"]
                 for d in decays}
            w["raw"] = evaluate(g.state.params, False, seed, n_eval, solvers)["tsit5"]["w2"]
            res[f"{seed} {kind}"] = w
            rows.append([seed, kind, *w.values()])
            print(f"seed {seed} {kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in w.items()), flush=True)
    cols = [f"EMA {d}" for d in decays] + ["raw"]
    for kind in ("independent", "ot"):
        rows.append(["mean", kind, *[float(np.mean([res[f"{s} {kind}"][c] for s in seeds])) for c in cols]])
    print(f"\n### W2 to fresh data after {train_steps} steps by EMA decay (tsit5 rtol=atol=1e-5, n = {n_eval})\n")
    print(markdown_table(["seed", "coupling", *cols], rows))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "data", "solver", "throughput", "quality", "ema", "roofline"], default="all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=500, help="steps per timed run (independent coupling)")
    p.add_argument("--ot-steps", type=int, default=500, help="steps per timed run of genflow OT (CoupledBatches)")
    p.add_argument("--slow-ot-steps", type=int, default=100, help="steps per timed run of the per-step OT paths")
    p.add_argument("--unroll", type=int, nargs="+", default=[1, 4], help="scan unroll values timed")
    p.add_argument("--ot-chunk", type=int, default=100, help="minibatches per CoupledBatches chunk")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2], help="torch thread settings timed")
    p.add_argument("--torch-device", default="cpu", help="torchcfm's device (cuda: a GPU run, one thread setting)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=4096)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cfm_throughput.json"))
    args = p.parse_args(argv)
    # Each part carries the run that produced it ("meta": command-line config, commit, UTC start,
    # CPUs, XLA flags): a run of one part into an existing file keeps the other parts, which came
    # from other runs (a single top-level config described only the last one).
    results = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        # a file from before the per-part meta: its parts kept, with what it said of its runs
        legacy = {"legacy": "written before per-part meta: the config is that of the file's last run",
                  **{k: old[k] for k in ("config", "cpus", "xla_flags", "notes") if k in old}}
        results = {k: v if "meta" in v else {**v, "meta": legacy} for k, v in old.items()
                   if isinstance(v, dict) and k != "config"}
    meta = {"config": vars(args), **run_meta()}
    for k, v in _run_parts(args).items():
        results[k] = {**v, "meta": meta}
    if args.json:
        write_json(args.json, results, indent=1, default=float)
    return 0


def _run_parts(args) -> dict:
    results = {}
    if args.part in ("all", "data"):
        results["data"] = part_data(args.n_eval)
    if args.part in ("all", "solver"):
        results["solver"] = part_solver()
    if args.part in ("all", "throughput"):
        results["throughput"] = part_throughput(args.repeats, {"independent": args.steps, "ot": args.ot_steps,
                                                               "ot_callback": args.slow_ot_steps,
                                                               "torch_ot": args.slow_ot_steps},
                                                args.unroll, args.ot_chunk, tuple(args.torch_threads),
                                                args.torch_device)
    if args.part in ("all", "quality"):
        results["quality"] = part_quality(args.seeds, args.train_steps, args.n_eval, max(args.unroll), args.ot_chunk)
    if args.part == "roofline":  # not part of "all": what the CPU allows
        results["roofline"] = part_roofline(args.steps, args.repeats)
    if args.part == "ema":  # not part of "all": a tuning run, on its own seeds
        results["ema"] = part_ema(args.seeds, args.train_steps, args.n_eval)
    return results


if __name__ == "__main__":
    sys.exit(main())
