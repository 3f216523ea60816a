#!/usr/bin/env bash
# Cloud TPU VM pods (single slice): create via queued resources, set up every worker,
# run lov-jax on all workers, stream process-0 logs, move checkpoints via GCS, delete.
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --accelerator-type v5p-64 \
#       [--project P] [--runtime-version V] [--spot] [--bucket gs://B] [--job JOB] ACTION ...
#
# Actions:
#   create              queued resource NAME; waits until it is ACTIVE
#   setup               copy this repo (git archive) to every worker; venv from
#                       requirements.txt + jax[tpu]; mount --bucket at /mnt/gcs (gcsfuse)
#   train ARGS...       `lov-jax train ARGS` on all workers (one process per host, started
#   eval ARGS...        with nohup), then stream process 0's log (Ctrl-C stops the
#                       streaming, not the job); likewise `lov-jax eval ARGS`
#   logs                stream process 0's log of --job
#   push SRC GS_DST     gcloud storage cp -r (e.g. an HF checkpoint onto the bucket)
#   pull GS_SRC DST     gcloud storage cp -r (e.g. a finished run's checkpoints)
#   delete              delete the queued resource and its TPU VM
#
# Multi-host checkpoints need one filesystem seen by all workers: use --workdir
# /mnt/gcs/... (the bucket, mounted by `setup`). Workers read launch/tpu_env.sh.
# Options go before the action. --dry-run prints the exact commands and runs nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME="" ZONE="" PROJECT="" ACCEL="" RUNTIME="" SPOT=0 BUCKET="" JOB="lov_jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --runtime-version) RUNTIME="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --bucket) BUCKET="${2%/}"; shift 2 ;;
    --job) JOB="$2"; shift 2 ;;
    -h|--help) sed -n '/^set -euo/q;2,$p' "$0"; exit 0 ;;
    --*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "no action (create|setup|train|eval|logs|push|pull|delete)"
ACTION="$1"; shift
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"

# gcloud names v5e slices v5litepod-N; runtimes differ per generation.
gcloud_accel() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}
default_runtime() {
  case "$1" in
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5e-*|v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

GLOBAL=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GLOBAL+=(--project="$PROJECT")
REMOTE_DIR='$HOME/lov_jax'
LOG="\$HOME/lov_jax_logs/$JOB.log"

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker=all --command="$1"; }

lov_jax_remote() {
  # Every worker: the same command; jax.distributed.initialize() finds the pod itself.
  local cmd
  cmd="cd $REMOTE_DIR && source launch/tpu_env.sh && export LOV_JAX_DISTRIBUTED=1"
  cmd+=" && mkdir -p \$HOME/lov_jax_logs"
  cmd+=" && nohup .venv/bin/lov-jax $(quote "$@") > $LOG 2>&1 < /dev/null &"
  ssh_all "$cmd"
}

stream_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker=0 \
    --command="tail -n +1 -F $LOG"
}

case "$ACTION" in
  create)
    [[ -n "$ACCEL" ]] || die "--accelerator-type is required (e.g. v5p-64, v5e-16)"
    args=(gcloud compute tpus queued-resources create "$NAME" "${GLOBAL[@]}" --node-id="$NAME"
          --accelerator-type="$(gcloud_accel "$ACCEL")"
          --runtime-version="${RUNTIME:-$(default_runtime "$ACCEL")}")
    [[ $SPOT == 1 ]] && args+=(--spot)
    run "${args[@]}"
    wait_cmd="until [ \"\$(gcloud compute tpus queued-resources describe $NAME ${GLOBAL[*]} --format='value(state.state)')\" = ACTIVE ]; do sleep 30; done"
    run bash -c "$wait_cmd"
    ;;
  setup)
    tarball="/tmp/lov_jax_$NAME.tar.gz"
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:lov_jax.tar.gz" "${GLOBAL[@]}" --worker=all
    setup="mkdir -p $REMOTE_DIR && tar -xzf \$HOME/lov_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR"
    setup+=" && python3 -m venv .venv && .venv/bin/pip install -q -U pip"
    setup+=" && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
    setup+=" && .venv/bin/pip install -q --no-deps -e ."
    if [[ -n "$BUCKET" ]]; then
      setup+=" && (command -v gcsfuse >/dev/null || (echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))"
      setup+=" && sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs"
      setup+=" && (mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs ${BUCKET#gs://} /mnt/gcs)"
    fi
    ssh_all "$setup"
    ;;
  train|eval)
    lov_jax_remote "$ACTION" "$@"
    stream_logs
    ;;
  logs) stream_logs ;;
  push|pull)
    [[ $# -eq 2 ]] || die "$ACTION needs SRC DST"
    run gcloud storage cp -r "$1" "$2"
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" "${GLOBAL[@]}" --force --quiet
    ;;
  *) die "unknown action $ACTION" ;;
esac
