# Shared by the launch scripts: find the tools, check inputs. Sourced, never run.

die() { printf 'error: %s\n' "$*" >&2; exit 2; }

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

# The venv's tools when there is one (make setup), else whatever is on PATH.
find_tool() {
  local name=$1 venv=${VENV:-$(repo_root)/.venv}
  if [[ -x "$venv/bin/$name" ]]; then printf '%s\n' "$venv/bin/$name"; return; fi
  command -v "$name" || die "$name not found: run 'make setup' or activate the environment that has it"
}

# Resolve a preset name (gpt_tiny) or path to a config file.
resolve_config() {
  local spec=$1 root
  root=$(repo_root)
  if [[ -f "$spec" ]]; then printf '%s\n' "$spec"; return; fi
  if [[ -f "$root/configs/$spec.yaml" ]]; then printf '%s\n' "$root/configs/$spec.yaml"; return; fi
  die "no config '$spec': give a file or one of: $(cd "$root/configs" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
}

require_int() {  # name value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

port_free() {  # host port -> 0 if nothing listens there
  local python
  python=$(find_tool python)
  "$python" - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1] if sys.argv[1] not in ("localhost",) else "127.0.0.1", int(sys.argv[2])))
except OSError:
    sys.exit(1)
PY
}
