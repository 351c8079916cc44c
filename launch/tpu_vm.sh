#!/usr/bin/env bash
# Run one jaxpost job on every host of a Cloud TPU VM (single host or a multi-host pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE WORKDIR CONFIG [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh my-v5p-64 us-east5-a gs://bucket/runs/sft1 configs/sft.py:smoke
#
# Copies this checkout to every worker, installs it into ~/jaxpost/.venv (jax[tpu] included), and
# starts `jaxpost train --distributed` on all workers at once; jax.distributed.initialize()
# discovers the pod's hosts by itself. WORKDIR must be shared by all hosts (a gs:// path). The
# job stops with an error, instead of hanging, if a host does not join within --init_timeout.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,11p' "$0"; exit 2; fi
tpu=$1 zone=$2 workdir=$3 config=$4; shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxpost-src.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxpost-src.tgz "$tpu":/tmp/ --zone "$zone" --worker=all
setup='mkdir -p ~/jaxpost && tar -C ~/jaxpost -xzf /tmp/jaxpost-src.tgz && cd ~/jaxpost &&
  { [ -x .venv/bin/jaxpost ] || { python3 -m venv .venv && .venv/bin/pip install -q -e . "jax[tpu]"; }; }'
run="cd ~/jaxpost && .venv/bin/jaxpost train --distributed --config=$config --workdir=$workdir $*"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$setup && $run"
