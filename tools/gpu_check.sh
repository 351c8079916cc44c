#!/usr/bin/env bash
# One prepared accelerator session (see ../shared/device/README.md): installs the carried wheels,
# checks the loss library and a short training run on the GPU, then benchmarks train steps.
# Run on the GPU machine from the project root:  cp tools/gpu_check.sh .whl/ && bash .whl/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
# Loss-library tests on the GPU (conftest defaults to CPU; JAX_PLATFORMS=cuda overrides it).
JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_losses.py \
  tests/test_preference_losses.py 2>&1 | tee "$OUT/pytest.log" | tail -3
# The whole loop (grain data, eval, checkpoint) on the GPU: the demo's SFT stage.
timeout 100 python3 -m jaxpost.main train --config=configs/sft.py --workdir=/tmp/w_sft \
  2>&1 | tee "$OUT/train_sft.log" | tail -6
B="timeout 75 python3 tools/bench.py --dtype bfloat16 --steps 10"
for args in \
  "--objective sft --model bench-1b --batch 8 --seq 2048 --remat dots_no_batch" \
  "--objective sft --model bench-1b --batch 8 --seq 2048 --remat dots_no_batch --logits_chunk 512" \
  "--objective dpo --model bench-1b --batch 4 --seq 2048 --remat dots_no_batch --logits_chunk 512" \
  "--objective rm --model bench-1b --batch 4 --seq 2048 --remat dots_no_batch" \
  "--objective sft --model bench-small --batch 16 --seq 1024"; do
  echo "== $args"; $B $args 2>&1 | tee -a "$OUT/bench.log" | grep -E '^\{|Error' | tail -2
done
