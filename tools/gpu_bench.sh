#!/usr/bin/env bash
# The GPU check and benchmark, for one prepared accelerator session (../shared/device/README.md:
# 15 device minutes in all, a bare offline machine). Run on the GPU machine from the project root:
#
#   cp tools/gpu_bench.sh .whl/ && bash .whl/gpu_bench.sh [SECTION ...]
#
# Sections (all, in this order, when none is named; each has its own time limit and appends its
# output under $OUT, default /tmp/out):
#   correctness  the loss-library tests on the GPU, then transformers parity and sampling at the
#                default and at the highest matmul precision, and cuDNN attention against XLA
#   loop         the whole loop (grain data, eval, checkpoint): the demo's SFT stage
#   train        train-step throughput, MFU and memory: bench-1b SFT / DPO / RM at seq 2048 (bf16
#                compute, float32 master weights), chunked logits, cuDNN vs XLA attention
#   sample       KV-cache sampling throughput on bench-1b
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
sections=${*:-correctness loop train sample}

bench() {  # one tools/bench.py row, its JSON line kept
  echo "== $*"; timeout 75 python3 tools/bench.py --dtype bfloat16 --steps 10 "$@" 2>&1 \
    | tee -a "$OUT/bench.log" | grep -E '^\{|Error' | tail -2
}

for s in $sections; do
  case $s in
  correctness)
    # conftest defaults to CPU; JAX_PLATFORMS=cuda overrides it
    JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_losses.py \
      tests/test_preference_losses.py 2>&1 | tee "$OUT/pytest_losses.log" | tail -3
    for precision in default highest; do
      JAX_DEFAULT_MATMUL_PRECISION=$precision JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q \
        -p no:cacheprovider tests/test_hf.py tests/test_sampling.py \
        -k "logits_match or greedy or cached or reward_model_scores" 2>&1 \
        | tee "$OUT/pytest_parity_$precision.log" | tail -4
    done
    timeout 90 python3 tools/gpu_attention_check.py 2>&1 | tee "$OUT/attention_check.log" | tail -3 ;;
  loop)
    timeout 100 python3 -m jaxpost.main train --config=configs/sft.py --workdir=/tmp/w_sft \
      2>&1 | tee "$OUT/train_sft.log" | tail -6 ;;
  train)
    B="--model bench-1b --remat dots_no_batch"
    bench --objective sft $B --batch 8 --seq 2048
    bench --objective sft $B --batch 8 --seq 2048 --logits_chunk 512
    bench --objective sft $B --batch 8 --seq 2048 --attention xla
    bench --objective dpo $B --batch 4 --seq 2048 --logits_chunk 512
    bench --objective rm $B --batch 4 --seq 2048
    bench --objective sft --model bench-small --batch 16 --seq 1024 ;;
  sample)
    for args in "--batch 1 --prompt 128 --new 256" "--batch 16 --prompt 128 --new 256" \
                "--batch 64 --prompt 512 --new 256"; do
      echo "== $args"; timeout 100 python3 tools/bench_sample.py --dtype bfloat16 --model bench-1b $args \
        2>&1 | tee -a "$OUT/bench_sample.log" | grep -E '^\{|Error' | tail -2
    done ;;
  *) echo "unknown section $s (correctness, loop, train, sample)"; exit 2 ;;
  esac
done
