#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv/, lint with ruff, then run the whole test suite. Extra args go
# to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# lint first (a second; configured in pyproject.toml [tool.ruff]): a finding fails the command like a failed test
"$ROOT/.venv/bin/ruff" check "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
