"""Tabulate a sweep: mean and std over seeds, paired differences from the baseline, a plot."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from moge_ds import provenance
from moge_ds.experiments.sweep import Run, Sweep


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


def _verdict(diff: dict, split: str) -> str:
    if split != "test":  # a split the arms are chosen on: its differences are selected, not tested
        return "selection, not a test"
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
                  _verdict(first, sweep.report_split) if first else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _pooled_lines(sweep, overall, "All points pooled")
    fresh = [s for s in sweep.seeds if s not in sweep.selection_seeds]
    if sweep.selection_seeds and fresh:
        _, fresh_overall = collect(dataclasses.replace(sweep, seeds=fresh))
        lines += _pooled_lines(sweep, fresh_overall, f"Fresh seeds {fresh} alone (seeds {sweep.selection_seeds} "
                                                     f"chose the arm)")
    lines += ["", *_provenance_lines(sweep)]
    lines += ["", "Reproduce: `python -m moge_ds.experiments run " + f"experiments/{sweep.name}.yaml` "
              "then `report` (runs under results/<name>/runs/, each with its launch.log and config.json)."]
    (sweep.root / "results.md").write_text("\n".join(lines) + "\n")
    _plot(sweep, rows)
    return sweep.root / "results.md"


def _pooled_lines(sweep: Sweep, overall: dict, label: str) -> list[str]:
    lines = []
    for arm, d in overall.items():
        p = f"{d['p']:.3f}" if d["p"] is not None else "-"
        lines += ["", f"{label}, {arm} - {sweep.baseline}: {d['mean']:+.4g} ± {d['std']:.2g} over {d['n']} "
                  f"(point, seed) pairs, paired t p = {p}: {_verdict(d, sweep.report_split)}."]
    return lines


def _provenance_lines(sweep: Sweep) -> list[str]:
    """Which code each finished run ran (``provenance.jsonl``): runs grouped by commit."""
    by_code: dict[str, list[str]] = {}
    for run in sweep.runs():
        run_dir = sweep.root / "runs" / run.name
        if (run_dir / "metrics.json").is_file():
            by_code.setdefault(provenance.describe(run_dir), []).append(run.name)
    return ["Code per run (commit; +dirty: uncommitted code changes; ?: not recorded, runs before provenance):",
            *(f"- `{code}`: {len(names)} runs ({', '.join(names)})" for code, names in by_code.items())]


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
