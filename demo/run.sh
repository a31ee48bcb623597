#!/usr/bin/env bash
# `make demo`: codemoat's story end to end, offline, on the bundled model.
# Each step in demo/steps/ is a small script; they share $DEMO (a scratch folder) and $CODEMOAT_HOME.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PY="${PY:-$ROOT/.venv/bin/python}"
export CODEMOAT="${CODEMOAT:-$ROOT/.venv/bin/codemoat}"
export DEMO="${DEMO:-$(mktemp -d /tmp/codemoat-demo.XXXXXX)}"
export CODEMOAT_HOME="$DEMO/home"
export PYTHONUNBUFFERED=1
if [[ -n "${CODEMOAT_DEMO_MODEL:-}" ]]; then
  : # a GGUF of your own, e.g. a Qwen2.5-Coder build: CODEMOAT_DEMO_MODEL=/path/model.gguf make demo
elif [[ -f "$ROOT/models/codemoat-tiny.gguf" ]]; then
  export CODEMOAT_DEMO_MODEL="$ROOT/models/codemoat-tiny.gguf"
else
  echo "(models/codemoat-tiny.gguf is missing: the demo uses a tiny random model, so the text is noise)"
  export CODEMOAT_DEMO_MODEL="$DEMO/tiny-random.gguf"
  "$PY" -c "import sys; sys.path.insert(0, '$ROOT/tests'); from tinymodel import build_tiny_gguf; from pathlib import Path; build_tiny_gguf(Path('$CODEMOAT_DEMO_MODEL'))"
fi
printf '\033[1mcodemoat demo\033[0m — scratch folder %s, model %s\n' "$DEMO" "$(basename "$CODEMOAT_DEMO_MODEL")"
for step in "$ROOT"/demo/steps/*.sh; do
  printf '\n\033[1;36m### %s\033[0m\n' "$(basename "$step" .sh)"
  bash "$step"
done
printf '\n\033[1mdemo finished\033[0m (scratch folder: %s)\n' "$DEMO"
