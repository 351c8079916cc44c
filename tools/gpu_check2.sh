#!/usr/bin/env bash
# Second accelerator session: Hugging Face parity and sampling on the GPU, and sampling speed.
# Run on the GPU machine from the project root: cp tools/gpu_check2.sh .whl/ && bash .whl/gpu_check2.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Parity with transformers on the GPU, as computed (default matmul precision), then at highest.
JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_hf.py \
  tests/test_sampling.py -k "logits_match or greedy or cached or reward_model_scores" 2>&1 | tee "$OUT/pytest_default.log" | tail -4
JAX_DEFAULT_MATMUL_PRECISION=highest JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_hf.py tests/test_sampling.py -k "logits_match or greedy or cached or reward_model_scores" 2>&1 | tee "$OUT/pytest_highest.log" | tail -4
for args in "--model bench-1b --batch 1 --prompt 128 --new 256" "--model bench-1b --batch 16 --prompt 128 --new 256" \
            "--model bench-1b --batch 64 --prompt 512 --new 256"; do
  echo "== $args"; timeout 100 python3 tools/bench_sample.py --dtype bfloat16 $args 2>&1 | tee -a "$OUT/bench_sample.log" | grep -E '^\{|Error' | tail -2
done
