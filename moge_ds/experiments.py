"""Sweeps: MoE vs MoGE over a grid and seeds, launched through launch/train.sh, then a results table.

    python -m moge_ds.experiments run experiments/vit_fmnist.yaml [--parallel 2]
    python -m moge_ds.experiments report experiments/vit_fmnist.yaml
    python -m moge_ds.experiments analyse experiments/vit_fmnist.yaml --point moe.num_experts=32,moe.top_k=1

A sweep file names a preset, a ds_config, overrides common to every run, a grid, the arms
(MoE/MoGE settings; one arm is the baseline) and the seeds. Every run writes its own directory
under ``results/<name>/runs/``; a run that has ``metrics.json`` is done, so re-running the
command finishes a half-done sweep. The report gives mean and standard deviation over seeds,
each arm minus the baseline, and a paired t-test over seeds (runs with the same seed share the
initialisation and data order, so the pairs are matched).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    point: tuple[tuple[str, object], ...]  # grid values, e.g. (("moe.num_experts", 16), ("moe.top_k", 1))
    arm: str
    seed: int

    @property
    def name(self) -> str:
        values = "_".join(f"{key.split('.')[-1]}{value}" for key, value in self.point)
        return f"{values}_{self.arm}_s{self.seed}"


@dataclass
class Sweep:
    name: str
    preset: str
    ds_config: str
    metric: str  # a key of metrics.json's split section: accuracy, perplexity, loss
    higher_is_better: bool
    report_split: str  # "test" for results, "valid" for tuning
    baseline: str
    common: list[str]
    grid: dict[str, list]
    arms: dict[str, list[str]]
    seeds: list[int]
    nproc: int = 1

    @classmethod
    def load(cls, path: str) -> "Sweep":
        spec = yaml.safe_load(Path(path).read_text())
        try:
            sweep = cls(**spec)
        except TypeError as err:
            raise SystemExit(f"error: {path}: {err}") from None
        if sweep.baseline not in sweep.arms:
            raise SystemExit(f"error: {path}: baseline {sweep.baseline!r} is not one of the arms {list(sweep.arms)}")
        return sweep

    @property
    def root(self) -> Path:
        return REPO / "results" / self.name

    def runs(self) -> list[Run]:
        keys = list(self.grid)
        points = [tuple(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        # Seed-major order: a sweep stopped early still has complete seeds for every point.
        return [Run(p, arm, seed) for seed in self.seeds for p in points for arm in self.arms]

    def command(self, run: Run, port: int) -> list[str]:
        overrides = [*self.common, *(f"{k}={v}" for k, v in run.point), *self.arms[run.arm],
                     f"train.seed={run.seed}", f"train.output_dir={self.root / 'runs' / run.name}"]
        return [str(REPO / "launch/train.sh"), "--nproc", str(self.nproc), "--master-port", str(port),
                "--config", str(REPO / self.preset), "--ds-config", str(REPO / self.ds_config), "--",
                "--resume", "--set", *overrides]


def free_port() -> int:
    """A port nothing listens on now (sweeps may run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(sweep: Sweep, parallel: int) -> None:
    todo = [r for r in sweep.runs() if not (sweep.root / "runs" / r.name / "metrics.json").is_file()]
    total = len(sweep.runs())
    print(f"{sweep.name}: {total - len(todo)} of {total} runs done, {len(todo)} to go, {parallel} at a time",
          flush=True)
    # Split the cores between the runs at a time, unless the caller chose a thread count.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel)), **os.environ}
    started = time.perf_counter()
    done = 0

    def launch(run: Run) -> None:
        nonlocal done
        out = sweep.root / "runs" / run.name
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "launch.log", "w") as log:
            proc = subprocess.run(sweep.command(run, free_port()), stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=REPO)
        done += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (len(todo) - done)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out / 'launch.log'})"
        print(f"[{done}/{len(todo)}] {run.name}: {status}; {elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min",
              flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(launch, todo))


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean)**2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def paired_difference(treated: list[float], baseline: list[float], higher_is_better: bool) -> dict:
    """Mean/std of ``treated - baseline`` over matched pairs, the paired t-test's p, and the direction."""
    from scipy import stats

    diffs = [t - b for t, b in zip(treated, baseline)]
    mean, std = _mean_std(diffs)
    p_value = float(stats.ttest_rel(treated, baseline).pvalue) if len(diffs) > 1 else None
    return {"mean": mean, "std": std, "n": len(diffs), "p": p_value,
            "better": mean > 0 if higher_is_better else mean < 0}


def _metric_values(sweep: Sweep, point, arm: str) -> dict[int, float]:
    values = {}
    for seed in sweep.seeds:
        path = sweep.root / "runs" / Run(point, arm, seed).name / "metrics.json"
        if path.is_file():
            values[seed] = json.loads(path.read_text())[sweep.report_split][sweep.metric]
    return values


def collect(sweep: Sweep) -> tuple[list[dict], dict]:
    """Per grid point: each arm's mean/std over seeds and each other arm's paired difference from the
    baseline; and the paired differences pooled over all points (one pair per point and seed)."""
    rows = []
    pooled: dict[str, tuple[list[float], list[float]]] = {a: ([], []) for a in sweep.arms if a != sweep.baseline}
    for point in dict.fromkeys(r.point for r in sweep.runs()):
        row: dict = {"point": dict(point)}
        values = {arm: _metric_values(sweep, point, arm) for arm in sweep.arms}
        for arm, by_seed in values.items():
            if by_seed:
                mean, std = _mean_std(list(by_seed.values()))
                row[arm] = {"mean": mean, "std": std, "n": len(by_seed)}
        for arm, (treated, base) in pooled.items():
            seeds = sorted(set(values[arm]) & set(values[sweep.baseline]))
            if seeds:
                pair = [values[arm][s] for s in seeds], [values[sweep.baseline][s] for s in seeds]
                row[f"{arm}-{sweep.baseline}"] = paired_difference(*pair, sweep.higher_is_better)
                treated += pair[0]
                base += pair[1]
        rows.append(row)
    overall = {arm: paired_difference(t, b, sweep.higher_is_better) for arm, (t, b) in pooled.items() if t}
    return rows, overall


def _verdict(diff: dict) -> str:
    if diff["p"] is None or math.isnan(diff["p"]):
        return "n/a"
    if diff["p"] >= 0.05:
        return "tie"
    return "win" if diff["better"] else "loss"


def write_report(sweep: Sweep) -> Path:
    rows, overall = collect(sweep)
    sweep.root.mkdir(parents=True, exist_ok=True)
    (sweep.root / "results.json").write_text(json.dumps({"points": rows, "pooled": overall}, indent=1))
    arms = list(sweep.arms)
    others = [a for a in arms if a != sweep.baseline]
    keys = list(sweep.grid)
    header = [k.split(".")[-1] for k in keys] + [f"{a} {sweep.metric}" for a in arms]
    header += [f"{a} - {sweep.baseline}" for a in others] + ["p (paired t)", "verdict"]
    lines = [f"# {sweep.name}: {sweep.report_split} {sweep.metric} "
             f"({'higher' if sweep.higher_is_better else 'lower'} is better)", "",
             f"Mean ± std over seeds {sweep.seeds}. Verdict: the paired t-test over seeds at p < 0.05, "
             f"for {others[0] if others else ''} against {sweep.baseline}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["point"][k]) for k in keys]
        cells += [f"{row[a]['mean']:.4g} ± {row[a]['std']:.2g} (n={row[a]['n']})" if a in row else "-" for a in arms]
        diffs = [row.get(f"{a}-{sweep.baseline}") for a in others]
        cells += [f"{d['mean']:+.4g} ± {d['std']:.2g}" if d else "-" for d in diffs]
        first = diffs[0] if diffs else None
        cells += [f"{first['p']:.3f}" if first and first["p"] is not None else "-",
                  _verdict(first) if first else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for arm, d in overall.items():
        p = f"{d['p']:.3f}" if d["p"] is not None else "-"
        lines += ["", f"All points pooled, {arm} - {sweep.baseline}: {d['mean']:+.4g} ± {d['std']:.2g} over {d['n']} "
                  f"(point, seed) pairs, paired t p = {p}: {_verdict(d)}."]
    lines += ["", "Reproduce: `python -m moge_ds.experiments run " + f"experiments/{sweep.name}.yaml` "
              "then `report` (runs under results/<name>/runs/, each with its launch.log and config.json)."]
    (sweep.root / "results.md").write_text("\n".join(lines) + "\n")
    _plot(sweep, rows)
    return sweep.root / "results.md"


def _plot(sweep: Sweep, rows: list[dict]) -> None:
    """Metric against the first grid key, one panel per value of the second (if any), one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.grid)
    panels = sweep.grid[keys[1]] if len(keys) > 1 else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        subset = [r for r in rows if panel is None or r["point"][keys[1]] == panel]
        for arm in sweep.arms:
            pts = [(r["point"][keys[0]], r[arm]["mean"], r[arm]["std"]) for r in subset if arm in r]
            if pts:
                x, y, e = zip(*pts)
                axis.errorbar(x, y, yerr=[0 if math.isnan(v) else v for v in e], marker="o", capsize=3, label=arm)
        axis.set_xlabel(keys[0])
        axis.set_ylabel(f"{sweep.report_split} {sweep.metric}")
        axis.set_title(f"{keys[1]}={panel}" if panel is not None else sweep.name)
        if isinstance(sweep.grid[keys[0]][0], (int, float)) and len(set(sweep.grid[keys[0]])) > 2:
            axis.set_xscale("log", base=2)
        axis.legend()
    fig.suptitle(sweep.name)
    fig.tight_layout()
    fig.savefig(sweep.root / "results.png", dpi=110)
    plt.close(fig)


def analyse_point(sweep: Sweep, point: dict, seed: int, probe: int = 2000) -> Path:
    """Export and analyse every arm's run at one grid point and seed; write a side-by-side table."""
    from moge_ds.analysis.report import analyse
    from moge_ds.export import export

    key = tuple((k, point[k]) for k in sweep.grid)
    label = Run(key, "", seed).name.replace("__", "_")
    out = sweep.root / "analysis" / label
    results = {}
    for arm in sweep.arms:
        run = Run(key, arm, seed)
        exported = export(sweep.root / "runs" / run.name / "checkpoints", out / arm / "export")
        results[arm] = analyse(exported, out / arm, probe)
        shutil.rmtree(exported)  # weights are reproducible from the run; keep the report
    rows = [("mean expert-output cosine (lower: more diverse)", lambda r, i: r["layers"][i]["expert_output_cosine"]),
            ("mean expert-weight cosine", lambda r, i: r["layers"][i]["expert_weight_cosine"]),
            ("routing entropy / log E", lambda r, i: r["layers"][i]["routing_entropy_normalized"]),
            ("MI(top-1 expert; label), normalised", lambda r, i: r["layers"][i]["mi_top1_vs_label"]["normalized"]),
            ("top-2 experts are map neighbours", lambda r, i: r["layers"][i]["top2_map_neighbour_rate"]),
            ("expert load CV", lambda r, i: r["layers"][i]["cv"])]
    first = next(iter(results.values()))
    for name in first["invariance_jaccard"]:
        rows.append((f"top-k Jaccard under {name} (higher: more invariant)",
                     lambda r, i, name=name: r["invariance_jaccard"][name][i]))
    arms = list(results)
    lines = [f"# {sweep.name}: expert analysis at {point}, seed {seed}", "",
             "| metric | layer | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for title, get in rows:
        for layer in range(len(first["layers"])):
            lines.append(f"| {title} | {layer} | " + " | ".join(f"{get(results[a], layer):.3f}" for a in arms) + " |")
    lines += ["", "Per-arm reports with topographic maps: " + ", ".join(f"[{a}]({a}/report.md)" for a in arms), ""]
    (out / "analysis.md").write_text("\n".join(lines))
    return out / "analysis.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report", "list", "analyse"])
    parser.add_argument("sweep", help="a sweep YAML, e.g. experiments/vit_fmnist.yaml")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (CPU threads are split)")
    parser.add_argument("--point", default="", help="analyse: the grid point, e.g. moe.num_experts=32,moe.top_k=1")
    parser.add_argument("--seed", type=int, default=1, help="analyse: which seed's runs")
    args = parser.parse_args(argv)
    sweep = Sweep.load(args.sweep)
    if args.command == "list":
        for run in sweep.runs():
            print(" ".join(sweep.command(run, 29700)))
        return
    if args.command == "analyse":
        point = {k: yaml.safe_load(v) for k, v in (item.split("=") for item in args.point.split(",") if item)}
        print(f"wrote {analyse_point(sweep, point, args.seed)}")
        return
    if args.command == "run":
        run_sweep(sweep, args.parallel)
    print(f"wrote {write_report(sweep)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
