#!/usr/bin/env bash
# One kuaijax job on one host with several GPUs: a single process drives all of them.
#
#   CONFIG=configs/lm/mixture.py WORKDIR=/data/runs/lm_mixture configs/launch/multi_gpu.sh \
#     [--config.parallel.mesh.fsdp=8 --config.parallel.mesh.data=1 ...]
#
# JAX sees every visible GPU (CUDA_VISIBLE_DEVICES picks a subset); the mesh in config.parallel
# spreads the batch and parameters over them. WORKDIR is a local path (or gs://). No coordinator
# is involved; to run one process per GPU instead, set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS for each process (the contract kuaijax.launch uses on CPU).
set -euo pipefail
: "${CONFIG:?set CONFIG, e.g. configs/lm/mixture.py}" "${WORKDIR:?set WORKDIR}"
# Let XLA use most of the GPU memory but leave room for the data pipeline's host copies.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m kuaijax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
