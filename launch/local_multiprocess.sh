#!/usr/bin/env bash
# Rehearse a multi-host job on one machine: N processes on localhost, each with D CPU devices,
# forming one N*D-device mesh (what tests/test_multihost.py checks).
#
#   launch/local_multiprocess.sh N D WORKDIR CONFIG [--config.KEY=VALUE ...]
#   launch/local_multiprocess.sh 2 4 /tmp/mh configs/sft.py:smoke
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,7p' "$0"; exit 2; fi
n=$1 d=$2 workdir=$3 config=$4; shift 4
bin=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/jaxpost
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  env -u XLA_FLAGS JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$d" "$bin" train --distributed \
    --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i" --init_timeout=60 \
    --config="$config" --workdir="$workdir" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
