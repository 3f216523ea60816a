# Helpers shared by the launch scripts (sourced).
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"

# Quote like a shell would need it, but leave plain words readable.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Print the command (--dry-run) or print and run it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==\(.*\)$/\1/p' "$REPO_ROOT/requirements.txt")"
