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

# The comment block under the shebang, without its '# ': the script's help.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# The options every launcher takes, with one set of defaults. In the option loop:
#   common_option "$@" && { shift "$consumed"; continue; }
config=gpt_tiny
ds_config=$(repo_root)/ds_configs/cpu.json
master_port=${MASTER_PORT:-29500}
dry_run=0
common_option() {
  case "$1" in
    --preset|--config) config=${2:?$1 needs a value}; consumed=2 ;;
    --ds-config) ds_config=${2:?--ds-config needs a file}; consumed=2 ;;
    --master-port) master_port=${2:?--master-port needs a port}; consumed=2 ;;
    --dry-run) dry_run=1; consumed=1 ;;
    -h|--help) usage "$0"; exit 0 ;;
    *) return 1 ;;
  esac
}

# Check the common options once the loop is done; resolves the preset name to a file.
check_common_options() {
  require_int --master-port "$master_port"
  config=$(resolve_config "$config")
  [[ -f "$ds_config" ]] || die "ds_config '$ds_config' does not exist (see ds_configs/)"
}

# Run a launcher so that stopping this script stops every rank: DeepSpeed's runner does not pass
# SIGTERM on (Slurm's time limit, `kill`, some shells' Ctrl-C), so its ranks would run on. On
# TERM/INT/HUP the launcher's whole process tree gets SIGTERM. The launcher stays in this script's
# process group, so killing that group (what a scheduler or `kill -- -PGID` does) still reaches it.
run_launcher() {
  "$@" &
  local pid=$! status=0
  trap 'stop_tree "$pid"; trap - TERM INT HUP' TERM INT HUP
  wait "$pid" || status=$?
  # wait returns early when a trapped signal arrives: then wait for the launcher to finish stopping.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || status=$?; done
  return "$status"
}

stop_tree() {  # pid: SIGTERM to it and every process below it
  "$(find_tool python)" - "$1" <<'PY'
import sys
import psutil
try:
    root = psutil.Process(int(sys.argv[1]))
    for process in [*root.children(recursive=True), root]:
        process.terminate()
except psutil.NoSuchProcess:
    pass
PY
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
