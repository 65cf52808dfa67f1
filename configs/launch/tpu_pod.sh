#!/usr/bin/env bash
# Run one kuaijax job on every worker of a Cloud TPU VM pod slice (v4-32, v5p-64, v5litepod-16, ...).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/kj/lm_mixture \
#     CONFIG=configs/lm/mixture.py configs/launch/tpu_pod.sh [--config.train.steps=1000 ...]
#
# SETUP=1 first copies this checkout to ~/kuaijax on every worker and installs it with the [tpu]
# extra. Every worker then runs `python -m kuaijax.main` with the same arguments; JAX finds the other
# workers from the TPU metadata (TPU_WORKER_HOSTNAMES) and kuaijax calls jax.distributed.initialize().
# WORKDIR must be visible to all workers with the same path: a gs:// bucket (orbax writes each
# worker's shards there, process 0 writes config.json / metrics.jsonl / results). The embedded data
# sets are built into each worker's local ~/tensorflow_datasets on first use.
# With XPK on GKE the same command runs as:
#   xpk workload create --cluster "$CLUSTER" --workload kj-lm --tpu-type v5litepod-16 --num-slices 1 \
#     --command "python -m kuaijax.main --config=$CONFIG --workdir=$WORKDIR"
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
: "${CONFIG:?set CONFIG, e.g. configs/lm/mixture.py}"
REMOTE_DIR=${REMOTE_DIR:-kuaijax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR"
  git ls-files -z | tar --null -T - -czf /tmp/kuaijax_src.tgz
  gcloud compute tpus tpu-vm scp /tmp/kuaijax_src.tgz "$TPU_NAME:~/$REMOTE_DIR/" --zone "$ZONE" \
    --worker=all
  ssh_all "cd ~/$REMOTE_DIR && tar xzf kuaijax_src.tgz && pip install -q -e '.[tpu]'"
fi
ARGS=$(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
ssh_all "cd ~/$REMOTE_DIR && python -m kuaijax.main $ARGS"
