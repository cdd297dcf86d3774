#!/usr/bin/env bash
# Issue 21's upcycling experiment (pre-registered in experiments/gpt_pydoc_upcycle.md), start to end:
# pre-train the dense GPT, export it, upcycle it, run the sweep, report. Each step is skipped when its
# output exists, so the script continues an interrupted experiment. Run from the repository root.
set -euo pipefail
root=results/gpt_pydoc_upcycle
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(model.dim=64 model.depth=4 model.heads=4 model.seq_length=64 moe.placement=none moe.ep_size=1
        train.eval_interval=250 train.eval_batches=10 train.log_interval=50 "train.final_eval=[valid,test]")
if [[ ! -f $root/pretrain/metrics.json ]]; then
  launch/train.sh --nproc 1 --config configs/gpt_tiny.yaml --ds-config experiments/ds_sweep.json -- \
    --resume --set "${common[@]}" train.steps=1500 train.seed=100 train.output_dir=$root/pretrain
fi
[[ -d $root/dense ]] || $py -m moge_ds.export $root/pretrain/checkpoints --out $root/dense
[[ -d $root/upcycled ]] || $py -m moge_ds.upcycle $root/dense --out $root/upcycled --num-experts 16 --top-k 2 \
  --placement every_other --router-init normal --seed 1
$py -m moge_ds.experiments run experiments/gpt_pydoc_upcycle.yaml --parallel "${PARALLEL:-2}"
$py -m moge_ds.experiments report experiments/gpt_pydoc_upcycle.yaml
$py -m moge_ds.experiments topography experiments/gpt_pydoc_upcycle.yaml
