#!/usr/bin/env bash
# Submit a lov-jax train/eval job to SLURM (GPU nodes) with launch/slurm.sbatch.
#
#   launch/slurm_submit.sh [--dry-run] --nodes 2 [--gpus-per-node 8] [--per gpu|node] \
#       [--partition P] [--account A] [--time 24:00:00] [--job-name NAME] train|eval ARGS...
#
# --per gpu (default): one process per GPU; --per node: one process per node.
# --dry-run prints the sbatch command and the srun line each allocation runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODES=1 GPUS=8 PER=gpu PARTITION="" ACCOUNT="" TIME="" JOB_NAME="lov-jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --per) PER="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --job-name) JOB_NAME="$2"; shift 2 ;;
    -h|--help) sed -n '/^set -euo/q;2,$p' "$0"; exit 0 ;;
    --*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "no job (train|eval ARGS...)"
JOB="$1"; shift
[[ "$JOB" == train || "$JOB" == eval ]] || die "job must be train or eval, got $JOB"
case "$PER" in
  gpu) TASKS="$GPUS" ;;
  node) TASKS=1 ;;
  *) die "--per must be gpu or node" ;;
esac
args=(sbatch --nodes="$NODES" --ntasks-per-node="$TASKS" --gpus-per-node="$GPUS"
      --job-name="$JOB_NAME" --export=ALL,LOV_JAX_REPO="$REPO_ROOT")
[[ -n "$PARTITION" ]] && args+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && args+=(--account="$ACCOUNT")
[[ -n "$TIME" ]] && args+=(--time="$TIME")
args+=("$REPO_ROOT/launch/slurm.sbatch" lov-jax "$JOB" "$@")
run "${args[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  DRY_RUN=1 SLURM_NNODES="$NODES" SLURM_NTASKS_PER_NODE="$TASKS" SLURM_GPUS_ON_NODE="$GPUS" \
    SLURM_SUBMIT_DIR="$REPO_ROOT" bash "$REPO_ROOT/launch/slurm.sbatch" lov-jax "$JOB" "$@"
fi
