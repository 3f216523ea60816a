#!/usr/bin/env bash
# GKE (TPU node pools) through XPK: one `xpk workload create` for a lov-jax train/eval job.
#
#   launch/gke_xpk.sh [--dry-run] --cluster C --tpu-type v5p-64 [--num-slices 1] \
#       [--project P] [--zone Z] [--workload NAME] [--docker-image IMG | --base-docker-image IMG] \
#       train|eval ARGS...
#
# With --docker-image, the image must hold this repo at /app with its venv installed;
# otherwise XPK builds one from --base-docker-image (default python:3.11) plus this
# directory (--script-dir), and the command installs requirements + jax[tpu] first.
# GKE sets TPU_WORKER_HOSTNAMES (and MEGASCALE_* for several slices), which
# lov_jax.distributed.maybe_initialize() detects. Use a gs://-mounted (GCS FUSE) or
# shared path for --workdir so every host writes to the same checkpoint directory.
# A train job on several slices gets --config.mesh.dcn_data=<num-slices> (the data
# axis across slices) unless its arguments set mesh.dcn_data themselves.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CLUSTER="" TPU_TYPE="" SLICES=1 PROJECT="" ZONE="" WORKLOAD="" IMAGE="" BASE_IMAGE="python:3.11"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --cluster) CLUSTER="$2"; shift 2 ;;
    --tpu-type) TPU_TYPE="$2"; shift 2 ;;
    --num-slices) SLICES="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --workload) WORKLOAD="$2"; shift 2 ;;
    --docker-image) IMAGE="$2"; shift 2 ;;
    --base-docker-image) BASE_IMAGE="$2"; shift 2 ;;
    -h|--help) sed -n '/^set -euo/q;2,$p' "$0"; exit 0 ;;
    --*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "no job (train|eval ARGS...)"
JOB="$1"; shift
[[ "$JOB" == train || "$JOB" == eval ]] || die "job must be train or eval, got $JOB"
[[ -n "$CLUSTER" && -n "$TPU_TYPE" ]] || die "--cluster and --tpu-type are required"
WORKLOAD="${WORKLOAD:-lov-jax-$JOB-$(date +%m%d-%H%M)}"
if [[ "$JOB" == train && "$SLICES" -gt 1 && "$*" != *--config.mesh.dcn_data* ]]; then
  set -- "$@" "--config.mesh.dcn_data=$SLICES"
fi

if [[ -n "$IMAGE" ]]; then
  cmd="cd /app && source launch/tpu_env.sh && .venv/bin/lov-jax $(quote "$JOB" "$@")"
  image_args=(--docker-image="$IMAGE")
else
  cmd="source launch/tpu_env.sh && pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
  cmd+=" && pip install -q --no-deps -e . && lov-jax $(quote "$JOB" "$@")"
  image_args=(--base-docker-image="$BASE_IMAGE" --script-dir="$REPO_ROOT")
fi
args=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE"
      --num-slices="$SLICES" "${image_args[@]}" --command="$cmd")
[[ -n "$PROJECT" ]] && args+=(--project="$PROJECT")
[[ -n "$ZONE" ]] && args+=(--zone="$ZONE")
run "${args[@]}"
