#!/usr/bin/env bash
# Third accelerator session: cuDNN attention against XLA (correctness, then speed on bench-1b).
# Run on the GPU machine from the project root: cp tools/gpu_check3.sh .whl/ && bash .whl/gpu_check3.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 tools/gpu_attention_check.py 2>&1 | tee "$OUT/attention_check.log" | tail -3
B="timeout 75 python3 tools/bench.py --dtype bfloat16 --steps 10 --model bench-1b --remat dots_no_batch"
for args in "--objective sft --batch 8 --seq 2048 --attention cudnn" \
            "--objective sft --batch 8 --seq 2048 --attention xla" \
            "--objective dpo --batch 4 --seq 2048 --logits_chunk 512 --attention cudnn"; do
  echo "== $args"; $B $args 2>&1 | tee -a "$OUT/bench.log" | grep -E '^\{|Error' | tail -2
done
