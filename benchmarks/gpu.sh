#!/usr/bin/env bash
# GPU figures (issue 21) in one go, at most ~8 minutes on one H100/H200:
#
#   benchmarks/gpu.sh [--smoke] [--no-install] [gpu_bench.py args...]
#
# 1. installs this repo with the `gpu` extra (jax[cuda12] pinned to requirements.txt's
#    jax) and the `hf` extra (torch + transformers, for HF generate beside ours) into
#    .venv, unless jax already sees a GPU there or --no-install is given;
# 2. sources launch/gpu_env.sh (the XLA-on-GPU flags);
# 3. runs benchmarks/gpu_bench.py: attention fwd+bwd per kernel at 8k and 32k packed, the
#    0.5B train step at 8k and 32k in bf16 (tokens/s, MFU), decode tokens/s at batch 1
#    and 32 beside HF generate.
# --smoke: tiny sizes, no install, runs on CPU (checks the script end to end).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
INSTALL=1 ARGS=()
for a in "$@"; do
  case "$a" in
    --smoke) INSTALL=0; ARGS+=("$a") ;;
    --no-install) INSTALL=0 ;;
    *) ARGS+=("$a") ;;
  esac
done
PY="${LOV_JAX_VENV:-$REPO/.venv}/bin/python"
[[ -x "$PY" ]] || { python3 -m venv "$REPO/.venv"; PY="$REPO/.venv/bin/python"; }
has_gpu() { "$PY" -c 'import jax; jax.devices("gpu")' >/dev/null 2>&1; }
if [[ "$INSTALL" == 1 ]] && ! has_gpu; then
  echo "+ pip install -e '.[gpu,hf]'" >&2
  "$PY" -m pip install -q -e ".[gpu,hf]"
fi
source "$REPO/launch/gpu_env.sh"
if [[ " ${ARGS[*]:-} " == *" --smoke "* ]]; then
  # No time limit: on 2 shared CPU cores the tiny sizes take several minutes.
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  exec "$PY" "$REPO/benchmarks/gpu_bench.py" "${ARGS[@]}"
fi
exec timeout "${LOV_JAX_BENCH_TIMEOUT:-480}" "$PY" "$REPO/benchmarks/gpu_bench.py" "${ARGS[@]}"
