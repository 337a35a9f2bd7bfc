#!/usr/bin/env bash
# Static checks, the same here and in CI: lint, formatting, types, import contracts.
# Runs every check and fails at the end if any failed, so one run shows all problems.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BIN="$VENV/bin"
failed=()

run() {
  local name=$1
  shift
  echo "== $name: $*"
  if ! "$@"; then
    failed+=("$name")
  fi
}

run "ruff check" "$BIN/ruff" check .
run "ruff format" "$BIN/ruff" format --check .
run "mypy" "$BIN/mypy" node pipelines
if [ -f .importlinter ]; then
  run "import contracts" "$BIN/lint-imports" --cache-dir .cache/import-linter .importlinter
fi

if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all checks passed"
