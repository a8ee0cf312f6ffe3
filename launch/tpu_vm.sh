#!/usr/bin/env bash
# Run one lmjax training run on every host of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh my-tpu us-central2-b v4-32 gs://my-bucket/runs/r1 \
#       --config=experiments/configs/smoke.py --config.mesh.fsdp=-1 --config.mesh.data=1
#
# Every host runs the same command; `--distributed` makes them one JAX program
# (jax.distributed.initialize() detects the slice). WORKDIR should be a gs:// path so
# that checkpoints outlive the VM; a preempted run exits 75 and is resumed by running
# this script again with the same WORKDIR. Requires gcloud, a TPU quota and a bucket.
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; accel=${3:?accelerator type, e.g. v4-32}
workdir=${4:?workdir, e.g. gs://bucket/runs/r1}; shift 4
repo=${LMJAX_REPO:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
runtime=${LMJAX_TPU_RUNTIME:-tpu-ubuntu2204-base}

if ! gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
      --version="$runtime" ${LMJAX_SPOT:+--spot}
fi
# Ship this checkout (what is committed) to every host and install it with the TPU jax.
git -C "$repo" archive --format=tar.gz -o /tmp/lmjax.tgz HEAD
gcloud compute tpus tpu-vm scp /tmp/lmjax.tgz "$name":~/lmjax.tgz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "
  set -e; mkdir -p ~/lmjax && tar -xzf ~/lmjax.tgz -C ~/lmjax && cd ~/lmjax
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -e . 'jax[tpu]' gcsfs
  python -m lmjax.train --distributed --workdir=$workdir $*"
