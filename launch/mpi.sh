#!/usr/bin/env bash
# Ranks started directly by mpirun; each finds its rank, world size and master address through
# mpi4py (deepspeed.init_distributed's MPI discovery). No deepspeed launcher, no ssh set-up of ours.
#
#   launch/mpi.sh [--np N] [--hostfile FILE] [--master-port P] [--preset NAME|--config FILE]
#                 [--ds-config FILE] [--dry-run] [--] [moge_ds.train arguments]
#
# Works with MPICH (Hydra) and Open MPI; the hostfile is in your MPI's own format.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

np=${NP:-2} hostfile=""
while (($#)); do
  common_option "$@" && { shift "$consumed"; continue; }
  case "$1" in
    --np) np=${2:?--np needs a number}; shift 2 ;;
    --hostfile) hostfile=${2:?--hostfile needs a file}; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
require_int --np "$np"
check_common_options
[[ -z "$hostfile" || -f "$hostfile" ]] || die "hostfile '$hostfile' does not exist"
mpirun=$(find_tool mpirun 2>/dev/null) || die "no MPI found (mpirun): 'make setup' installs MPICH into .venv; on a cluster load your MPI module"
python=$(find_tool python)
"$python" -c 'import mpi4py' 2>/dev/null || die "mpi4py is not installed in $python's environment: run 'make setup'"

ep_size=$("$python" -m moge_ds.config --config "$config" --get moe.ep_size "$@") || die "cannot read moe.ep_size from $config"
((np % ep_size == 0)) || die "--np $np is not a multiple of moe.ep_size $ep_size"

# MPICH's Hydra and Open MPI spell 'set this variable on every rank' differently.
if "$mpirun" --version 2>&1 | grep -qi 'open mpi'; then
  env_args=(-x "MASTER_PORT=$master_port" -x PYTHONUNBUFFERED=1)
  host_args=(${hostfile:+--hostfile "$hostfile"})
else
  env_args=(-genv MASTER_PORT "$master_port" -genv PYTHONUNBUFFERED 1)
  host_args=(${hostfile:+-f "$hostfile"})
fi
cmd=("$mpirun" -np "$np" "${host_args[@]+"${host_args[@]}"}" "${env_args[@]}"
     "$python" "$(repo_root)/launch/moge_train.py" --config "$config" --deepspeed_config "$ds_config" "$@")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"; printf '\n'
  exit 0
fi
[[ -n "$hostfile" ]] || port_free 127.0.0.1 "$master_port" || die "port $master_port is in use: pass --master-port"
exec "${cmd[@]}"
