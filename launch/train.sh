#!/usr/bin/env bash
# One node: N ranks of moge_ds.train through the deepspeed launcher.
#
#   launch/train.sh [--nproc N] [--preset NAME|--config FILE] [--ds-config FILE] [--master-port P]
#                   [--dry-run] [--] [moge_ds.train arguments, e.g. --set moe.gs_weight=0 --resume]
#
# Ranks are GPUs where there are GPUs, CPU processes (gloo) otherwise. Anything not listed above
# is passed to moge_ds.train unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc=${NPROC:-2}
while (($#)); do
  common_option "$@" && { shift "$consumed"; continue; }
  case "$1" in
    --nproc) nproc=${2:?--nproc needs a value}; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
require_int --nproc "$nproc"
check_common_options

cmd=("$(find_tool deepspeed)" --num_gpus "$nproc" --master_port "$master_port"
     --module moge_ds.train --config "$config" --deepspeed_config "$ds_config" "$@")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"; printf '\n'
  exit 0
fi
port_free 127.0.0.1 "$master_port" || die "port $master_port is in use: pass --master-port or set MASTER_PORT"
run_launcher "${cmd[@]}"
