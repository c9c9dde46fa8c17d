#!/usr/bin/env bash
# The GPU benchmarks in one prepared run (~7-11 minutes on one H100/H200; results/gpu.md has the 2026-12-04 run), for a machine that has
# jax[cuda], flax, optax, diffrax, chex, orbax and torch but not genflow or the peers:
#
#   bash experiments/benchmarks/gpu.sh [OUT_DIR]      # from the repository root
#
# The peers (torchcfm, POT, diffusers, k-diffusion, torchsde, ...) come from wheels in .whl/
# when that folder exists (an offline machine), else from `pip install -e ".[peers]"` beforehand.
# Each part has its own time limit, so one slow part cannot take the others' results with it.
# Writes into OUT_DIR (default experiments/benchmarks/results):
#   train_throughput_gpu_bfloat16.json  U-Net / DiT training steps/s, FLOPs and MFU, bf16, batch 256
#   cfm_throughput_gpu.json             issue 2's CFM problem: genflow on the GPU vs torchcfm on the GPU
#   samplers_timing_cuda.{md,json}      issue 3's per-step overhead: genflow vs k-diffusion/diffusers on the GPU
#   compile_time_gpu.json               a U-Net sampler's compile time per solver against the U-Net's own
#   gpu_log.txt                         everything printed
set -u
out=${1:-experiments/benchmarks/results}
mkdir -p "$out"
log="$out/gpu_log.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
  echo "== samplers per-step timing (genflow and the peers' torch on the GPU)"
  JAX_PLATFORMS=cuda timeout 100 python3 experiments/benchmarks/samplers.py --timing-only --torch-device cuda \
    && cp experiments/benchmarks/results/samplers_timing_cuda.* "$out/" 2>/dev/null
  echo "== cfm_throughput (independent + OT, torch on cuda)"
  timeout 110 python3 experiments/benchmarks/cfm_throughput.py --part throughput --torch-device cuda --repeats 2 \
    --steps 2000 --ot-steps 300 --slow-ot-steps 50 --unroll 1 --json "$out/cfm_throughput_gpu.json"
  echo "== train_throughput (bf16, batch 256)"
  # (XLA's GPU autotuning makes each U-Net compile take ~50 s on an H200)
  timeout 300 python3 experiments/benchmarks/train_throughput.py --dtype bfloat16 --batch 256 --steps 5 --repeats 3 \
    --only "DiT-Ti/4;UNet ch32 (1,2,2)x1" --out "$out"
  echo "== compile_time (U-Net ch=32 at 32x32: sampler vs network compile, copies of the network)"
  JAX_PLATFORMS=cuda timeout 240 python3 experiments/benchmarks/compile_time.py --ch 32 --solvers dpm++2m heun \
    --json "$out/compile_time_gpu.json"
  date -u
} 2>&1 | grep -v "last_sigmas_type='zero'" | tee "$log"
