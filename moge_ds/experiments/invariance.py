"""The invariance report of a sweep (pre-registered in ``experiments/vit_fmnist_plateau.md``).

    python -m moge_ds.experiments invariance experiments/vit_fmnist_plateau.yaml [--arm circular_lam9e-3]

For every finished run (``metrics.json`` exists): export its final checkpoint and measure, on the test
split, accuracy and noise-free routing under shifts and rotations, expert diversity and expert-class
information (``moge_ds.analysis.invariance``), cached as ``invariance.json`` in the run directory. Then
per arm the mean ± std over seeds of every measure; each arm minus the baseline, paired over seeds
(paired t-test); the two primary tests (rotated accuracy and rotation routing correlation, ``--arm``
vs the baseline) Holm-corrected; per run its code commit and its distance from a plateau (the last two
validation evaluations' difference). Writes ``results/<name>/invariance.{md,json}``,
``invariance.png`` (accuracy and routing correlation against angle and shift, a line per arm, the
seeds' min-max shaded) and ``valid_curves.png`` (each run's validation curve).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path

from moge_ds import provenance
from moge_ds.analysis.invariance import invariance_of_export
from moge_ds.experiments.report import paired_difference
from moge_ds.experiments.sweep import Run, Sweep, SweepError
from moge_ds.monitor import read_history

PRIMARY_ARM = "circular_lam9e-3"  # the pre-registered MoGE arm
PRIMARY = ("rotated_accuracy", "rotation_routing_correlation")
ALPHA = 0.05
METRICS = {"rotated_accuracy": "rotated accuracy (mean of ±10°, ±20°)",
           "rotation_routing_correlation": "rotation routing correlation",
           "rotation_top1_agreement": "rotation top-1 agreement",
           "shifted_accuracy": "shifted accuracy (mean of ±1-3 px in x and y)",
           "shift_routing_correlation": "shift routing correlation",
           "shift_top1_agreement": "shift top-1 agreement",
           "unrelated_routing_correlation": "routing correlation with another image (control, post hoc)",
           "unrelated_top1_agreement": "top-1 agreement with another image (control, post hoc)",
           "clean_accuracy": "clean accuracy",
           "expert_output_diversity": "expert output diversity (cosine distance)",
           "expert_class_mi_bits": "MI(top-1 expert; class), bits"}


def run_invariance(run_dir: Path, images: int | None) -> dict:
    """The measures of one finished run's final checkpoint (its step and source recorded), cached in
    ``run_dir/invariance.json`` (recomputed when the cache was made for another image count, or
    before a measure existed)."""
    cached = run_dir / "invariance.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        # Only this function's files carry images_requested (the analysis CLI writes the same name).
        if "images_requested" in result and result["images_requested"] == images and set(METRICS) <= set(result):
            return result
    from moge_ds.export import export

    with tempfile.TemporaryDirectory() as tmp:
        exported = export(run_dir / "checkpoints", Path(tmp) / "export")
        saved = json.loads((exported / "config.json").read_text())
        result = invariance_of_export(exported, images)
    result.update(export=saved["source"], step=saved["step"], images_requested=images)
    cached.write_text(json.dumps(result, indent=1))
    return result


def valid_curve(history: list[dict], metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of each validation evaluation, one per step (the last record wins: the final
    evaluation can share its step with an interval evaluation)."""
    by_step = {r["step"]: r[metric] for r in history if r.get("split") == "valid" and metric in r}
    return sorted(by_step.items())


def plateau_distance(curve: list[tuple[int, float]]) -> float:
    """The last validation evaluation minus the one before it (0: flat at the end); NaN with fewer than 2."""
    return curve[-1][1] - curve[-2][1] if len(curve) >= 2 else math.nan


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values in the given order (step-down, monotone, capped at 1); all None if any is
    missing or NaN, since the correction needs every test of the family."""
    if any(p is None or math.isnan(p) for p in p_values):
        return [None] * len(p_values)
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def run_record(sweep: Sweep, run: Run, images: int | None) -> dict | None:
    """One finished run's measures, code commit, training metrics and validation curve; None if unfinished."""
    run_dir = sweep.root / "runs" / run.name
    if not (run_dir / "metrics.json").is_file():
        return None
    measured = run_invariance(run_dir, images)
    curve = valid_curve(read_history(run_dir / "history.jsonl"), sweep.metric)
    trained = json.loads((run_dir / "metrics.json").read_text())
    views = {name: {"accuracy": v["accuracy"], "routing_correlation": statistics.fmean(v["routing_correlation"]),
                    "top1_agreement": statistics.fmean(v["top1_agreement"]), "kind": v["kind"], "dy": v["dy"],
                    "dx": v["dx"], "angle": v["angle"]} for name, v in measured["views"].items()}
    return {"run": run.name, "arm": run.arm, "seed": run.seed, "code": provenance.describe(run_dir),
            "step": measured["step"], "images": measured["images"],
            "trained_test": trained.get("test", {}).get(sweep.metric, math.nan),
            "valid_curve": curve, "plateau_distance": plateau_distance(curve),
            **{m: measured[m] for m in METRICS}, "views": views}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "min": min(values), "max": max(values), "n": len(values)}


def arm_summary(records: list[dict]) -> dict:
    """One arm's runs: mean/std/min/max over seeds of every metric, of the plateau distance, and per view."""
    summary = {m: _spread([r[m] for r in records]) for m in (*METRICS, "plateau_distance")}
    summary["views"] = {}
    for name, view in records[0]["views"].items():
        summary["views"][name] = {**{k: view[k] for k in ("kind", "dy", "dx", "angle")},
                                  **{k: _spread([r["views"][name][k] for r in records])
                                     for k in ("accuracy", "routing_correlation", "top1_agreement")}}
    return summary


def paired_tests(treated: list[dict], baseline: list[dict]) -> dict[str, dict]:
    """Every metric of ``treated`` minus ``baseline`` runs, paired by seed (higher is read as better)."""
    base = {r["seed"]: r for r in baseline}
    pairs = [(r, base[r["seed"]]) for r in sorted(treated, key=lambda r: r["seed"]) if r["seed"] in base]
    if not pairs:
        return {}
    return {m: paired_difference([t[m] for t, _ in pairs], [b[m] for _, b in pairs], True) for m in METRICS}


def primary_verdict(diff: dict, holm_p: float | None) -> str:
    """The pre-registered reading: called only when significant after Holm; otherwise say why not."""
    if holm_p is None:
        return "n/a: no p-value (fewer than 2 paired seeds, or no spread)"
    if holm_p < ALPHA:
        return "MoGE higher" if diff["mean"] > 0 else "MoGE lower"
    if not abs(diff["mean"]) > diff["std"]:
        return "not called: the seed spread exceeds the effect, more seeds needed"
    return f"not called at alpha {ALPHA} after Holm"


def primary_tests(differences: dict[str, dict]) -> list[dict]:
    """The two pre-registered tests with their Holm-adjusted p and verdict (empty without pairs)."""
    if not differences:
        return []
    adjusted = holm([differences[m]["p"] for m in PRIMARY])
    return [{"metric": m, **differences[m], "holm_p": p, "verdict": primary_verdict(differences[m], p)}
            for m, p in zip(PRIMARY, adjusted)]


def collect_invariance(sweep: Sweep, primary_arm: str = PRIMARY_ARM, images: int | None = None) -> dict:
    """Measure every finished run (cached) and compute the per-arm summaries and paired tests."""
    points = list(dict.fromkeys(run.point for run in sweep.runs()))
    if len(points) > 1:
        raise SweepError(f"{sweep.name}: the invariance report compares arms at one grid point, the sweep has "
                         f"{len(points)}")
    if primary_arm not in sweep.arms or primary_arm == sweep.baseline:
        raise SweepError(f"{sweep.name}: --arm {primary_arm!r} must be a non-baseline arm of {list(sweep.arms)}")
    records = [r for r in (run_record(sweep, run, images) for run in sweep.runs()) if r is not None]
    if not records:
        raise SweepError(f"{sweep.name}: no finished run under {sweep.root / 'runs'} (none has metrics.json)")
    by_arm = {arm: [r for r in records if r["arm"] == arm] for arm in sweep.arms}
    by_arm = {arm: runs for arm, runs in by_arm.items() if runs}
    differences = {arm: paired_tests(runs, by_arm.get(sweep.baseline, []))
                   for arm, runs in by_arm.items() if arm != sweep.baseline}
    return {"sweep": sweep.name, "baseline": sweep.baseline, "primary_arm": primary_arm, "seeds": sweep.seeds,
            "arms": {arm: arm_summary(runs) for arm, runs in by_arm.items()}, "differences": differences,
            "primary": primary_tests(differences.get(primary_arm, {})), "runs": records}


def write_invariance_report(sweep: Sweep, primary_arm: str = PRIMARY_ARM, images: int | None = None) -> Path:
    """``results/<name>/invariance.{md,json,png}`` and ``valid_curves.png``; returns the Markdown's path."""
    result = collect_invariance(sweep, primary_arm, images)
    sweep.root.mkdir(parents=True, exist_ok=True)
    (sweep.root / "invariance.json").write_text(json.dumps(result, indent=1))
    (sweep.root / "invariance.md").write_text(_markdown(sweep, result))
    _plot_views(result, sweep.root / "invariance.png")
    _plot_valid_curves(result, sweep.metric, sweep.root / "valid_curves.png")
    return sweep.root / "invariance.md"


def _fmt(stats: dict, digits: int = 4) -> str:
    std = "" if math.isnan(stats["std"]) else f" ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}{std}"


def _p(p: float | None) -> str:
    return "-" if p is None or math.isnan(p) else f"{p:.3f}"


def _markdown(sweep: Sweep, result: dict) -> str:
    first = result["runs"][0]
    lines = [f"# {sweep.name}: invariance to rotation and shift", "",
             f"Test split ({first['images']} images), final checkpoints; arms {list(result['arms'])}, seeds "
             f"{sweep.seeds}, mean ± std over seeds. Routing measures are noise-free: per token and MoE layer, "
             "the Pearson correlation over the experts of the router logits of the image and of its transformed "
             "copy (scale-free), and whether the top-1 expert is the same; averaged over tokens, layers and "
             "views. Pre-registered in `experiments/vit_fmnist_plateau.md`.", ""]
    lines += _primary_lines(result) + _arm_lines(result) + _difference_lines(result) + _view_lines(result)
    lines += _run_lines(sweep, result)
    lines += ["", "![accuracy and routing correlation against angle and shift](invariance.png)", "",
              "![validation curves](valid_curves.png)", "",
              f"Reproduce: `python -m moge_ds.experiments run experiments/{sweep.name}.yaml --parallel 2`, then "
              f"`python -m moge_ds.experiments invariance experiments/{sweep.name}.yaml` (measures cached per run "
              "in `runs/<run>/invariance.json`).", ""]
    return "\n".join(lines)


def _primary_lines(result: dict) -> list[str]:
    arm, base = result["primary_arm"], result["baseline"]
    lines = [f"## Primary: `{arm}` vs `{base}`, paired t over seeds, Holm over the two tests at alpha {ALPHA}", "",
             f"| outcome | {arm} | {base} | paired difference | p | Holm p | verdict |", "|" + "---|" * 7]
    arms = result["arms"]
    for test in result["primary"]:
        m = test["metric"]
        lines.append(f"| {METRICS[m]} | {_fmt(arms[arm][m])} | {_fmt(arms[base][m])} | "
                     f"{test['mean']:+.4f} ± {test['std']:.4f} (n={test['n']}) | {_p(test['p'])} | "
                     f"{_p(test['holm_p'])} | {test['verdict']} |")
    if not result["primary"]:
        lines.append(f"| (no seed has finished runs of both `{arm}` and `{base}`) | | | | | | |")
    return lines + [""]


def _arm_lines(result: dict) -> list[str]:
    arms = list(result["arms"])
    lines = ["## Every measure per arm (mean ± std over seeds)", "", "| measure | " + " | ".join(arms) + " |",
             "|---|" + "---|" * len(arms)]
    for m, title in (*METRICS.items(), ("plateau_distance", "plateau distance (last two valid evaluations)")):
        lines.append(f"| {title} | " + " | ".join(f"{_fmt(result['arms'][a][m])} (n={result['arms'][a][m]['n']})"
                                                   for a in arms) + " |")
    return lines + [""]


def _difference_lines(result: dict) -> list[str]:
    arms = [a for a, d in result["differences"].items() if d]
    base = result["baseline"]
    lines = [f"## Each arm minus `{base}`, paired by seed (secondary: uncorrected p)", "",
             "| measure | " + " | ".join(f"{a} - {base} | p" for a in arms) + " |", "|---|" + "---|---|" * len(arms)]
    for m, title in METRICS.items():
        cells = [f"{d[m]['mean']:+.4f} ± {d[m]['std']:.4f} | {_p(d[m]['p'])}"
                 for d in (result["differences"][a] for a in arms)]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines + [""]


def _view_lines(result: dict) -> list[str]:
    arms = list(result["arms"])
    lines = ["## Per view: accuracy, routing correlation, top-1 agreement (mean over seeds)", "",
             "| view | " + " | ".join(f"{a} acc. | {a} corr. | {a} top-1" for a in arms) + " |",
             "|---|" + "---|---|---|" * len(arms)]
    for name in result["arms"][arms[0]]["views"]:
        cells = [" | ".join(f"{result['arms'][a]['views'][name][k]['mean']:.4f}"
                            for k in ("accuracy", "routing_correlation", "top1_agreement")) for a in arms]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _run_lines(sweep: Sweep, result: dict) -> list[str]:
    m = sweep.metric
    lines = ["## Runs", "", "Code: commit (+dirty: uncommitted code changes; ?: not recorded). Plateau distance: the "
             f"last validation {m} minus the one before it.", "",
             f"| run | code | step | test {m} (training) | clean | rotated | rotation corr. | final valid {m} | "
             "plateau distance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        final = f"{r['valid_curve'][-1][1]:.4f}" if r["valid_curve"] else "-"
        lines.append(f"| {r['run']} | `{r['code']}` | {r['step']} | {r['trained_test']:.4f} | "
                     f"{r['clean_accuracy']:.4f} | {r['rotated_accuracy']:.4f} | "
                     f"{r['rotation_routing_correlation']:.4f} | {final} | {r['plateau_distance']:+.4f} |")
    return lines


def _view_series(summary: dict, key: str, panel: str) -> list[tuple[float, dict]]:
    """(x, spread over seeds) of one arm along one panel: angle, x shift or y shift (clean at 0 for accuracy)."""
    picks = {"angle": lambda v: v["angle"] if v["kind"] == "rotate" else None,
             "x shift": lambda v: v["dx"] if v["kind"] == "shift" and v["dy"] == 0 else None,
             "y shift": lambda v: v["dy"] if v["kind"] == "shift" and v["dx"] == 0 else None}[panel]
    points = [(picks(v), v[key]) for v in summary["views"].values() if picks(v) is not None]
    if key == "accuracy":
        points.append((0, summary["clean_accuracy"]))
    return sorted(points, key=lambda p: p[0])


def _plot_views(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (("accuracy", "test accuracy"), ("routing_correlation", "routing correlation vs clean"))
    panels = ("angle", "x shift", "y shift")
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.4 * len(rows)), squeeze=False)
    for row, (key, label) in enumerate(rows):
        for col, panel in enumerate(panels):
            axis = axes[row][col]
            for arm, summary in result["arms"].items():
                points = _view_series(summary, key, panel)
                x = [p[0] for p in points]
                axis.plot(x, [p[1]["mean"] for p in points], marker="o", label=arm)
                axis.fill_between(x, [p[1]["min"] for p in points], [p[1]["max"] for p in points], alpha=0.2)
            axis.set_xlabel(f"{panel} ({'degrees' if panel == 'angle' else 'pixels'})")
            axis.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['sweep']}: mean over seeds, min-max shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_valid_curves(result: dict, metric: str, path: Path) -> None:
    """Each run's validation curve, a colour per arm: how close to a plateau each run ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(result["arms"])}
    for r in result["runs"]:
        if r["valid_curve"]:
            steps, values = zip(*r["valid_curve"])
            axis.plot(steps, values, marker=".", color=colours[r["arm"]], label=f"{r['arm']} s{r['seed']}")
    axis.set_xlabel("step")
    axis.set_ylabel(f"valid {metric}")
    axis.set_title(f"{result['sweep']}: validation during training")
    axis.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
