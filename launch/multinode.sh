#!/usr/bin/env bash
# Several nodes from a hostfile (`host slots=N` lines) through the deepspeed launcher.
#
#   launch/multinode.sh --hostfile FILE [--launcher pdsh|openmpi|mpich|impi|slurm]
#       [--master-addr ADDR] [--master-port P] [--venv-script FILE] [--export NAME=VALUE ...]
#       [--no-ssh --node-rank R]           # one launcher per node, started by you or by Slurm
#       [--preset NAME|--config FILE] [--ds-config FILE] [--dry-run] [--] [moge_ds.train arguments]
#
# With ssh-based launchers (pdsh, openmpi, mpich, impi, slurm) run it once, on the first host.
# With --no-ssh run it on every node with that node's --node-rank and the same --master-addr.
# NCCL_*, PYTHON* and UCX_* variables reach the ranks through DeepSpeed; add others with --export
# (written to a .deepspeed_env file along with PYTHONPATH and any .deepspeed_env you already have).
# --dry-run prints the launcher command and the backend command DeepSpeed would run, and stops;
# it never starts a rank (with one host DeepSpeed would start the ranks locally: only the launcher
# command is printed then).
# The ds_config defaults to ds_configs/zero2_bf16.json (GPU clusters); pass --ds-config otherwise.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

hostfile="" launcher=pdsh master_addr="" venv_script="" no_ssh=0 node_rank="" exports=()
ds_config=$(repo_root)/ds_configs/zero2_bf16.json  # several nodes: GPUs
while (($#)); do
  common_option "$@" && { shift "$consumed"; continue; }
  case "$1" in
    --hostfile) hostfile=${2:?--hostfile needs a file}; shift 2 ;;
    --launcher) launcher=${2:?--launcher needs a name}; shift 2 ;;
    --master-addr) master_addr=${2:?--master-addr needs an address}; shift 2 ;;
    --venv-script) venv_script=${2:?--venv-script needs a file}; shift 2 ;;
    --export) exports+=("${2:?--export needs NAME=VALUE}"); shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
    --node-rank) node_rank=${2:?--node-rank needs a number}; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

[[ -n "$hostfile" ]] || die "--hostfile is required (lines of 'host slots=N')"
[[ -f "$hostfile" ]] || die "hostfile '$hostfile' does not exist"
case "$launcher" in pdsh|openmpi|mpich|impi|slurm) ;; *) die "--launcher must be pdsh, openmpi, mpich, impi or slurm, got '$launcher'" ;; esac
check_common_options
[[ -z "$venv_script" || -f "$venv_script" ]] || die "--venv-script '$venv_script' does not exist"

# The hostfile: every non-comment line is 'host slots=N'.
hosts=() total_slots=0 lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
  lineno=$((lineno + 1))
  line=${line%%#*}
  [[ -z "${line//[[:space:]]/}" ]] && continue
  if [[ ! "$line" =~ ^[[:space:]]*([A-Za-z0-9._-]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
    die "$hostfile line $lineno: '$line' is not 'host slots=N'"
  fi
  hosts+=("${BASH_REMATCH[1]}")
  total_slots=$((total_slots + BASH_REMATCH[2]))
done < "$hostfile"
((${#hosts[@]})) || die "hostfile '$hostfile' lists no hosts"

# The expert-parallel size this run will use, read the way moge_ds.train reads it.
ep_size=$("$(find_tool python)" -m moge_ds.config --config "$config" --get moe.ep_size "$@") \
  || die "cannot read moe.ep_size from $config"
((total_slots % ep_size == 0)) || die "the hostfile has $total_slots slots in all, not a multiple of moe.ep_size $ep_size: \
change the slots or --set moe.ep_size"

if ((no_ssh)); then
  [[ "$node_rank" =~ ^[0-9]+$ ]] && ((node_rank < ${#hosts[@]})) \
    || die "--no-ssh needs --node-rank between 0 and $((${#hosts[@]} - 1)), got '${node_rank}'"
  [[ -n "$master_addr" ]] || die "--no-ssh needs --master-addr (the address of node rank 0)"
  if ((node_rank == 0 && !dry_run)); then
    port_free 0.0.0.0 "$master_port" || die "port $master_port is in use on this node: pass --master-port"
  fi
fi
master_addr=${master_addr:-${hosts[0]}}

# DeepSpeed reads extra variables for the ranks from DS_ENV_FILE; start from the user's own
# .deepspeed_env files so nothing in them is lost.
env_file=$(mktemp "${TMPDIR:-/tmp}/moge_ds_env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
for existing in "$HOME/.deepspeed_env" "./.deepspeed_env"; do
  # grep exits 1 when a file holds only blank lines: nothing to copy, not an error.
  [[ -f "$existing" ]] && { grep -v '^[[:space:]]*$' "$existing" >> "$env_file" || (($? == 1)); }
done
printf 'PYTHONPATH=%s\n' "$(repo_root)${PYTHONPATH:+:$PYTHONPATH}" >> "$env_file"
for item in "${exports[@]+"${exports[@]}"}"; do
  [[ "$item" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--export '$item' is not NAME=VALUE"
  printf '%s\n' "$item" >> "$env_file"
done
export DS_ENV_FILE="$env_file"

cmd=("$(find_tool deepspeed)" --hostfile "$hostfile" --launcher "$launcher" --master_addr "$master_addr"
     --master_port "$master_port")
((no_ssh)) && cmd+=(--no_ssh --node_rank "$node_rank")
((dry_run)) && cmd+=(--no_ssh_check)
[[ -n "$venv_script" ]] && cmd+=(--venv_script "$venv_script")
# A script path, not --module: DeepSpeed's slurm runner drops --module and its mpich runner mangles it.
cmd+=("$(repo_root)/launch/moge_train.py" --config "$config" --deepspeed_config "$ds_config" "$@")

if ((dry_run)); then
  printf 'launcher: '; printf '%q ' "${cmd[@]}"; printf '\n'
  # DeepSpeed's runner starts a single host's ranks itself, with no backend to stand in for.
  ((no_ssh || ${#hosts[@]} == 1)) && exit 0
  # Let DeepSpeed's runner build its backend command for real; stand-ins for the backend
  # binaries print it instead of running it.
  stubs=$(mktemp -d "${TMPDIR:-/tmp}/moge_ds_dry.XXXXXX")
  trap 'rm -f "$env_file"; rm -rf "$stubs"' EXIT
  for tool in pdsh mpirun ompi_info sinfo srun; do
    printf '#!/usr/bin/env bash\nprintf "backend: %%s" "%s"; printf " %%q" "$@"; printf "\\n"\n' "$tool" > "$stubs/$tool"
    chmod +x "$stubs/$tool"
  done
  PATH="$stubs:$PATH" "${cmd[@]}" 2>/dev/null | grep '^backend: '
  exit 0
fi
run_launcher "${cmd[@]}"
