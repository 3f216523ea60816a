#!/usr/bin/env bash
# lmms-eval (from PyPI, in a throwaway venv layered over .venv) drives `lov-jax serve` on a
# tiny checkpoint and a local task; its score must equal `lov-jax eval` on the same records.
#   scripts/lmms_eval_e2e.sh [WORKDIR]
# LMMS_VENV (default /tmp/lmms_eval_venv) keeps the install between runs; lmms-eval 0.7.3
# pulls ~5 GB (CUDA torch wheels among them), so it is not part of CI's install.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="$REPO/.venv/bin/python"
WORK="${1:-/tmp/lmms_eval_e2e}"
VENV="${LMMS_VENV:-/tmp/lmms_eval_venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  BASE="$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
  "$BASE" -m venv --without-pip "$VENV"
  # .venv's packages (torch CPU, transformers, openai) are seen, not modified.
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/lov_jax_venv.pth"
fi
# lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed.
"$VENV/bin/python" -c "import lmms_eval, filelock._api" 2>/dev/null ||
  "$VENV/bin/python" -m pip install lmms-eval==0.7.3 "filelock<4"
cd "$REPO"
PYTHONPATH="$REPO" "$PY" scripts/lmms_eval_e2e.py "$WORK" "$VENV/bin/python"
