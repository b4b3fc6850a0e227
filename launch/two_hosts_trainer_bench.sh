#!/usr/bin/env bash
# The JAX trainer on two hosts as one mesh (jax.distributed; NCCL between GPUs, gloo between CPU processes): the
# trainer benchmark, one packed row per device of both hosts. Only the trainer (the whole loop on several hosts:
# launch/hosts.sh). Tested on CPU with two local processes; NOT yet run on GPUs.
# Run on every host, process 0 first or not (each waits for the others):
#   host 0: bash launch/two_hosts_trainer_bench.sh 0 host0:12355 [--one=1.7b:16384] [bench flags]
#   host 1: bash launch/two_hosts_trainer_bench.sh 1 host0:12355 [--one=1.7b:16384] [bench flags]
# host0:12355 is an address of host 0 that host 1 reaches, with a free port. Prints one JSON line per process.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCESS_ID=${1:?process id (0 on the coordinator host)}
COORDINATOR=${2:?host:port of process 0}
shift 2
export CTXD_COORDINATOR_ADDRESS="$COORDINATOR" CTXD_NUM_PROCESSES="${NUM_PROCESSES:-2}" CTXD_PROCESS_ID="$PROCESS_ID"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec "${PYTHON:-python3}" bench/trainer_bench.py --one=1.7b:16384 --devices=0 "$@"
