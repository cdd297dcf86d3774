"""Sweeps: MoE vs MoGE over a grid and seeds, launched through launch/train.sh, then a results table.

    python -m moge_ds.experiments run experiments/vit_fmnist.yaml [--parallel 2]
    python -m moge_ds.experiments report experiments/vit_fmnist.yaml
    python -m moge_ds.experiments analyse experiments/vit_fmnist.yaml --point moe.num_experts=32,moe.top_k=1
    python -m moge_ds.experiments topography experiments/vit_fmnist_lambda.yaml
    python -m moge_ds.experiments invariance experiments/vit_fmnist_plateau.yaml [--arm circular_lam9e-3]

A sweep file names a preset, a ds_config, overrides common to every run, a grid, the arms
(MoE/MoGE settings; one arm is the baseline) and the seeds. Every run writes its own directory
under ``results/<name>/runs/``; a run that has ``metrics.json`` is done, so re-running the
command finishes a half-done sweep. The report gives mean and standard deviation over seeds,
each arm minus the baseline, and a paired t-test over seeds (runs with the same seed share the
initialisation and data order, so the pairs are matched).

``sweep`` defines a sweep, ``runner`` launches its runs, ``report`` tabulates and plots them,
``analyse`` compares the experts of matched runs, ``topography`` measures the routers' topographic
order per run and plots it against the paper's lambda, ``invariance`` measures accuracy and routing
under shifts and rotations per run and tests the pre-registered arm against the baseline.
"""

from moge_ds.experiments.report import collect, paired_difference, write_report
from moge_ds.experiments.runner import free_port, run_sweep
from moge_ds.experiments.sweep import REPO, Run, Sweep, SweepError

__all__ = ["REPO", "Run", "Sweep", "SweepError", "collect", "free_port", "paired_difference", "run_sweep",
           "write_report"]
