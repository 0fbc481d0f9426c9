#!/usr/bin/env bash
# The README's main command: set up (or reuse) .venv/, then run the online MPO loop on the embedded default
# (tiny VLM built from code + synthetic visual-reasoning tasks, jobs/configs/demo.yaml): warm start, then rounds of
# rollouts -> pairs -> MPO update -> hot-swap -> eval. Results land in runs/demo/ (summary.json, report.md,
# accuracy.png).
# Extra args are dotted config overrides, e.g. `bash scripts/demo.sh loop.rounds=3`. The terminal shows the loop's
# progress; Ray / Serve / vLLM / Train output goes to runs/demo/logs/ (`--verbose` shows it here instead).
# `bash scripts/demo.sh --config jobs/configs/learning_curve.yaml` runs the learning curve instead (the
# last --config wins) into runs/learning_curve/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" jobs/online_mpo.py --config jobs/configs/demo.yaml "$@"
