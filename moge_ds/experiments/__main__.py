"""``python -m moge_ds.experiments``: see the package docstring."""

from __future__ import annotations

import argparse
import sys

import yaml

from moge_ds.distributed import single_process_group
from moge_ds.experiments import __doc__ as DOC
from moge_ds.analysis.invariance import InvarianceError
from moge_ds.checkpoint import CheckpointError
from moge_ds.data.documents import DataError
from moge_ds.experiments.analyse import analyse_point
from moge_ds.experiments.invariance import PRIMARY_ARM, write_invariance_report
from moge_ds.experiments.report import write_report
from moge_ds.experiments.runner import run_sweep
from moge_ds.experiments.sweep import Sweep, SweepError
from moge_ds.experiments.topography import write_topography_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.experiments", description=DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report", "list", "analyse", "topography", "invariance"])
    parser.add_argument("sweep", help="a sweep YAML, e.g. experiments/vit_fmnist.yaml")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (CPU threads are split)")
    parser.add_argument("--point", default="", help="analyse: the grid point, e.g. moe.num_experts=32,moe.top_k=1")
    parser.add_argument("--seed", type=int, default=1, help="analyse: which seed's runs")
    parser.add_argument("--probe", type=int, default=2000, help="topography: probe images, or about this many tokens")
    parser.add_argument("--arm", default=PRIMARY_ARM, help="invariance: the arm of the primary tests vs the baseline")
    parser.add_argument("--images", type=int, help="invariance: the first N test images (default: all)")
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 1:
        parser.error(f"--images must be a positive count, got {args.images}")
    try:
        sweep = Sweep.load(args.sweep)
    except (OSError, SweepError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.command == "list":
        for run in sweep.runs():
            print(" ".join(sweep.command(run, 29700)))
        return
    if args.command == "analyse":
        point = {k: yaml.safe_load(v) for k, v in (item.split("=") for item in args.point.split(",") if item)}
        with single_process_group():
            print(f"wrote {analyse_point(sweep, point, args.seed)}")
        return
    if args.command == "topography":
        with single_process_group():
            print(f"wrote {write_topography_report(sweep, args.probe)}")
        return
    if args.command == "invariance":
        try:
            with single_process_group():
                print(f"wrote {write_invariance_report(sweep, args.arm, args.images)}")
        except (SweepError, CheckpointError, DataError, InvarianceError) as err:
            parser.exit(2, f"error: {err}\n")
        return
    if args.command == "run":
        run_sweep(sweep, args.parallel)
    print(f"wrote {write_report(sweep)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
