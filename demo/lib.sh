# Sourced by demo/steps/*.sh: the shared environment (each step also runs alone) and small helpers.
: "${CODEMOAT:=codemoat}" "${PY:=python3}" "${DEMO:=$(mktemp -d)}"
export CODEMOAT_HOME="${CODEMOAT_HOME:-$DEMO/home}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A free TCP port on 127.0.0.1.
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_healthy PORT [SECONDS]: until http://127.0.0.1:PORT/health answers 200 (default 60 s); says so
# on stderr if it never does, and lets the step go on to show what the server answers.
wait_healthy() {
  local deadline=$((SECONDS + ${2:-60}))
  until curl -sf "http://127.0.0.1:$1/health" >/dev/null; do
    if ((SECONDS >= deadline)); then echo "   (port $1 not healthy after ${2:-60} s)" >&2; return 0; fi
    sleep 0.1
  done
}

# demo_model NAME: $CODEMOAT_DEMO_MODEL, else the bundled model, else a tiny random GGUF at $DEMO/NAME
# (its text is noise, but every step still runs).
demo_model() {
  local model="${CODEMOAT_DEMO_MODEL:-}"
  if [[ -z "$model" && -f "$ROOT/models/codemoat-tiny.gguf" ]]; then model="$ROOT/models/codemoat-tiny.gguf"; fi
  if [[ -z "$model" ]]; then
    model="$DEMO/$1"
    [[ -f "$model" ]] || "$PY" -c "import sys; sys.path.insert(0, '$ROOT/tests'); from tinymodel import build_tiny_gguf; from pathlib import Path; build_tiny_gguf(Path('$model'))"
  fi
  echo "$model"
}
