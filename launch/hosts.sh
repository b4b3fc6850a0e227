#!/usr/bin/env bash
# The training loop on several hosts, one process per host (BUILD.md, "Several hosts"). Every host runs the same
# command; process 0 (the first host) runs the orchestrator. Three ways to start it:
#
#   1. From one machine over ssh (the repository, its .venv and the model at the same paths on every host):
#        HOSTS="host0 host1" bash launch/hosts.sh --config=configs/rl.py --inference_gpu_ids=0,1 ... [--dry_run]
#      PORT (default 12355) is the coordinator's port on host0; the lines of host i are prefixed "[i]".
#   2. By hand on each host (process 0 first or not; each waits for the others):
#        PROCESS_ID=i NUM_PROCESSES=n COORDINATOR=host0:12355 bash launch/hosts.sh [train flags...]
#   3. Under SLURM, one task per node: srun reads nothing from here, the tasks' variables are enough:
#        srun --nodes=2 --ntasks-per-node=1 bash launch/hosts.sh [train flags...]
#
# Assumed: the run folder (--config.output_dir) is one folder every host sees (NFS or the like: checkpoints are
# written by all processes; checked at start); process 0's host is reachable from the others on PORT and on one
# ephemeral port (its link to them). Weight files never cross hosts. Tested: mode 2 with two processes on one CPU
# machine (tests/test_hosts.py does the same through the CLI); modes 1 and 3 and real separate hosts: not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ -n "${HOSTS:-}" ]; then
  read -r -a hosts <<< "$HOSTS"
  coordinator="${hosts[0]}:${PORT:-12355}"
  args=$(printf '%q ' "$@")
  # ssh -tt: Ctrl-C here reaches every process (process 0 stops the run after a checkpoint; the others follow it),
  # and a lost ssh session hangs the remote process up.
  for i in "${!hosts[@]}"; do
    ssh -tt "${hosts[$i]}" "cd $(printf '%q' "$PWD") && CTXD_COORDINATOR_ADDRESS=$coordinator CTXD_PROCESS_ID=$i \
      CTXD_NUM_PROCESSES=${#hosts[@]} exec $PYTHON -m ctxd_jax.train $args" 2>&1 | sed -u "s/^/[$i] /" &
  done
  status=0
  for job in $(jobs -p); do wait "$job" || status=1; done
  exit $status
fi
if [ -n "${PROCESS_ID:-}" ]; then
  export CTXD_PROCESS_ID="$PROCESS_ID" CTXD_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}" \
    CTXD_COORDINATOR_ADDRESS="${COORDINATOR:?set COORDINATOR to host0:port}"
elif [ -z "${SLURM_PROCID:-}" ]; then
  echo "launch/hosts.sh: set HOSTS, or PROCESS_ID/NUM_PROCESSES/COORDINATOR, or run it under srun" >&2
  exit 2
fi
exec "$PYTHON" -m ctxd_jax.train "$@"
