"""Compare the experts of matched runs (one grid point, one seed, every arm)."""

from __future__ import annotations

import shutil
from pathlib import Path

from moge_ds.experiments.sweep import Run, Sweep


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
