#!/usr/bin/env bash
# Start an N-process JAX cluster on this machine (CPU devices), e.g.
#   launch/local_cluster.sh 2 lov-jax train --config configs/stage2_ov.py:demo --workdir /tmp/w
# Each process gets LOV_JAX_COORDINATOR / LOV_JAX_NUM_PROCESSES / LOV_JAX_PROCESS_ID
# (read by lov_jax.distributed.maybe_initialize) and LOCAL_CPU_DEVICES (default 4) CPU
# devices. Process i logs to $LOG_DIR/process_<i>.log (default: /tmp/lov_jax_cluster.<pid>); process 0
# is also streamed to stdout. Exits with the first non-zero status (all are waited for).
# --dry-run prints the per-process commands instead.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] N CMD [ARGS...]" >&2
  exit 2
fi
N="$1"; shift
DEVICES="${LOCAL_CPU_DEVICES:-4}"
PORT="${LOV_JAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/lov_jax_cluster.$$}"

env_for() {
  echo "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES" \
       "LOV_JAX_COORDINATOR=127.0.0.1:$PORT LOV_JAX_NUM_PROCESSES=$N LOV_JAX_PROCESS_ID=$1"
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    echo "env $(env_for "$i") $* > $LOG_DIR/process_$i.log 2>&1 &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$LOG_DIR"
for ((i = 0; i < N; i++)); do : > "$LOG_DIR/process_$i.log"; done
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < N; i++)); do
  # shellcheck disable=SC2046
  env $(env_for "$i") "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$LOG_DIR/process_0.log" --pid="${pids[0]}" &
tail_pid=$!
status=0
for ((i = 0; i < N; i++)); do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ $rc != 0 ]]; then
    echo "process $i exited with status $rc (log: $LOG_DIR/process_$i.log)" >&2
    [[ $status == 0 ]] && status=$rc
    cleanup
  fi
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
