"""Does the penalty organise the router, and does that help? Per run and per arm of a sweep.

    python -m moge_ds.experiments topography experiments/vit_fmnist_lambda.yaml [--probe 2000]

For every finished run: export the final checkpoint, route a probe from the test split, and keep
the noise-free topography of each MoE layer (``topography.json`` in the run directory). Then per
arm: the paper's lambda of the run, the validation metric, the topography measures and how far the
run was from a plateau; the best MoGE arm chosen on validation, and its test metric against the
baseline, once. Writes ``results/<name>/topography.{md,json}``, ``topography.png`` (metrics against
lambda) and ``neighbour_curves.png`` (the training log's noise-free neighbour rate against step).
A sweep over several grid points (e.g. E x k) gets one row per point and arm instead, with the
test difference paired over seeds, and ``scaling.png`` (the measures against the grid).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from moge_ds.analysis.report import model_batches, probe_inputs
from moge_ds.analysis.routing import capture_routing
from moge_ds.analysis.topography import MapGeometry, topography
from moge_ds.config import config_from_dict, tokens_per_sample
from moge_ds.experiments.report import paired_difference
from moge_ds.experiments.sweep import Run, Sweep, SweepError
from moge_ds.monitor import read_history
from moge_ds.topographic import default_map_shape

MEASURES = ("top2_neighbour_rate", "top2_neighbour_chance", "map_smoothness", "border_bias", "entropy_normalized",
            "group_sparsity_loss", "group_sparsity_loss_uniform", "top2_neighbour_rate_torus",
            "top2_neighbour_chance_torus", "top2_neighbour_rate_flat", "top2_neighbour_chance_flat")


def paper_lambda(saved: dict) -> float:
    """The paper's token-summed lambda of a run, from its saved ``config.json``."""
    config, ds = config_from_dict(saved["config"]), saved["ds_config"]
    moe = config.moe
    tokens = ds["train_micro_batch_size_per_gpu"] * tokens_per_sample(config.model)
    per_token = moe.aux_loss_weight * moe.gs_weight
    return per_token / tokens if moe.reduction == "mean" else per_token


@torch.no_grad()
def run_topography(run_dir: Path, probe: int) -> dict:
    """The noise-free topography of each MoE layer of a finished run (cached in ``topography.json``)."""
    cached = run_dir / "topography.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from moge_ds.export import export, load_export

    with tempfile.TemporaryDirectory() as tmp:  # the export (and its tokenizer) lives while we probe
        model, config = load_export(export(run_dir / "checkpoints", Path(tmp) / "export"))
        inputs, _, _ = probe_inputs(config, probe)
        torch.manual_seed(0)
        routing = capture_routing(model, model_batches(config, inputs))
    moe = config.moe
    geometry = MapGeometry(tuple(moe.map_shape) if moe.map_shape else default_map_shape(moe.num_experts),
                           moe.window_size, moe.stride, moe.padding, moe.sigma_min)
    # A dense run (no MoE layer: e.g. the dense arm of an upcycling sweep) has no map and no lambda.
    lam = paper_lambda(json.loads((run_dir / "config.json").read_text())) if routing else math.nan
    result = {"paper_lambda": lam, "gs_weight": moe.gs_weight, "padding": moe.padding if routing else "-",
              "layers": [topography(layer.scores, geometry, moe.top_k) for layer in routing]}
    cached.write_text(json.dumps(result, indent=1))
    return result


def plateau_gap(history: list[dict], metric: str) -> float:
    """Change of the validation metric over the last quarter of the run (0: flat at the end)."""
    evals = [r for r in history if r.get("split") == "valid" and metric in r]
    if len(evals) < 2:
        return math.nan
    last_step = evals[-1]["step"]
    earlier = [r for r in evals if r["step"] <= 0.75 * last_step] or evals[:1]
    return evals[-1][metric] - earlier[-1][metric]


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def arm_summary(sweep: Sweep, point, arm: str, probe: int) -> dict | None:
    """Seeds of one arm: metrics per split, topography averaged over layers, plateau gap."""
    seeds = {}
    for seed in sweep.seeds:
        run_dir = sweep.root / "runs" / Run(point, arm, seed).name
        if not (run_dir / "metrics.json").is_file():
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        topo = run_topography(run_dir, probe)
        if any(sweep.metric not in metrics.get(split, {}) for split in ("valid", "test")):
            raise SweepError(f"{run_dir / 'metrics.json'} lacks the {sweep.metric} of valid or test: a sweep's runs "
                             f"evaluate both (train.final_eval [valid, test])")
        seeds[seed] = {"valid": metrics["valid"][sweep.metric], "test": metrics["test"][sweep.metric],
                       "plateau_gap": plateau_gap(read_history(run_dir / "history.jsonl"), sweep.metric),
                       # runs measured before both graphs were scored lack the *_torus/*_flat keys
                       **{m: _mean([layer.get(m, math.nan) for layer in topo["layers"]]) for m in MEASURES},
                       "paper_lambda": topo["paper_lambda"], "gs_weight": topo["gs_weight"],
                       "padding": topo["padding"]}
    if not seeds:
        return None
    first = next(iter(seeds.values()))
    summary = {"arm": arm, "seeds": seeds, "paper_lambda": first["paper_lambda"], "gs_weight": first["gs_weight"],
               "padding": first["padding"]}
    for key in ("valid", "test", "plateau_gap", *MEASURES):
        values = [s[key] for s in seeds.values()]
        summary[key] = _mean(values)
        summary[key + "_std"] = float(torch.tensor(values).std()) if len(values) > 1 else math.nan
    return summary


def choose_on_validation(sweep: Sweep, arms: list[dict]) -> dict:
    """The best non-baseline arm by mean validation metric, and its test metric against the baseline,
    paired over seeds: the one test-split comparison of the sweep."""
    base = next(a for a in arms if a["arm"] == sweep.baseline)
    candidates = [a for a in arms if a["arm"] != sweep.baseline]
    sign = 1 if sweep.higher_is_better else -1
    best = max(candidates, key=lambda a: sign * a["valid"])
    seeds = sorted(set(best["seeds"]) & set(base["seeds"]))
    test = paired_difference([best["seeds"][s]["test"] for s in seeds], [base["seeds"][s]["test"] for s in seeds],
                             sweep.higher_is_better)
    valid = paired_difference([best["seeds"][s]["valid"] for s in seeds],
                              [base["seeds"][s]["valid"] for s in seeds], sweep.higher_is_better)
    return {"chosen": best["arm"], "paper_lambda": best["paper_lambda"], "padding": best["padding"],
            "seeds": seeds, "valid_difference": valid, "test_difference": test,
            "test": {"chosen": best["test"], "baseline": base["test"]}}


def _both_graphs(arm: dict) -> str:
    """The top-2 neighbour rate on the torus and on the flat grid, each with its chance level."""
    if math.isnan(arm["top2_neighbour_rate_torus"]):
        return "- (not measured)"
    return (f"{arm['top2_neighbour_rate_torus']:.3f} ({arm['top2_neighbour_chance_torus']:.3f}) / "
            f"{arm['top2_neighbour_rate_flat']:.3f} ({arm['top2_neighbour_chance_flat']:.3f})")


def _fmt(value: float, std: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def write_topography_report(sweep: Sweep, probe: int = 2000) -> Path:
    points = list(dict.fromkeys(run.point for run in sweep.runs()))
    if len(points) > 1:
        return write_scaling_report(sweep, points, probe)
    point = points[0]
    arms = [s for s in (arm_summary(sweep, point, arm, probe) for arm in sweep.arms) if s is not None]
    # Only a tuning sweep (reported on validation) chooses an arm; a test-reported sweep compares
    # its pre-registered arms in results.md.
    choice = choose_on_validation(sweep, arms) if sweep.report_split == "valid" else None
    (sweep.root / "topography.json").write_text(json.dumps({"arms": arms, "choice": choice}, indent=1))
    m = sweep.metric
    lines = [f"# {sweep.name}: does the penalty organise the router, and does that help?", "",
             f"Per arm, mean ± std over seeds {sweep.seeds}; topography measured on the noise-free scores of "
             f"{probe} probe {'images' if 'vit' in sweep.preset else 'tokens'} from the test split, averaged over "
             f"the MoE layers. Plateau gap: change of the validation {m} over the last quarter of the run.", "",
             f"| arm | paper lambda | gs_weight | padding | valid {m} | plateau gap | top-2 neighbours | chance | "
             f"torus / flat (chance) | smoothness | border bias | entropy (norm.) | GS loss / uniform |",
             "|" + "---|" * 13]
    for a in arms:
        ratio = a["group_sparsity_loss"] / a["group_sparsity_loss_uniform"]
        lam = "-" if math.isnan(a["paper_lambda"]) else f"{a['paper_lambda']:.2g}"
        lines.append(f"| {a['arm']} | {lam} | {a['gs_weight']:.4g} | {a['padding']} | "
                     f"{_fmt(a['valid'], a['valid_std'], 4)} | {a['plateau_gap']:+.4f} | "
                     f"{_fmt(a['top2_neighbour_rate'], a['top2_neighbour_rate_std'])} | "
                     f"{a['top2_neighbour_chance']:.3f} | {_both_graphs(a)} | "
                     f"{_fmt(a['map_smoothness'], a['map_smoothness_std'])} | "
                     f"{_fmt(a['border_bias'], a['border_bias_std'])} | {a['entropy_normalized']:.3f} | "
                     f"{ratio:.3f} |")
    lines += _choice_lines(sweep, choice) + ["![metrics against lambda](topography.png)", "",
                                             "![neighbour rate during training](neighbour_curves.png)", "",
                                             f"Reproduce: `python -m moge_ds.experiments run experiments/"
                                             f"{sweep.name}.yaml`, then `python -m moge_ds.experiments topography "
                                             f"experiments/{sweep.name}.yaml`.", ""]
    (sweep.root / "topography.md").write_text("\n".join(lines))
    _plot_against_lambda(sweep, arms, sweep.root / "topography.png")
    _plot_neighbour_curves(sweep, point, sweep.root / "neighbour_curves.png")
    return sweep.root / "topography.md"


def _choice_lines(sweep: Sweep, choice: dict | None) -> list[str]:
    m = sweep.metric
    if choice is None:
        return ["", f"Nothing is chosen here: the pre-registered arms' test {m} against `{sweep.baseline}` is in "
                f"results.md.", ""]
    test, valid = choice["test_difference"], choice["valid_difference"]
    return ["", f"**Chosen on validation:** `{choice['chosen']}` (paper lambda {choice['paper_lambda']:.2g}, "
              f"{choice['padding']} padding): valid {m} {valid['mean']:+.4f} ± {valid['std']:.4f} against "
              f"`{sweep.baseline}`.", "",
              f"**Test, reported once:** {choice['chosen']} {choice['test']['chosen']:.4f} vs {sweep.baseline} "
              f"{choice['test']['baseline']:.4f}; paired difference {test['mean']:+.4f} ± {test['std']:.4f} over "
              f"seeds {choice['seeds']} (paired t p = {test['p']:.3f})." if test["p"] is not None else "", ""]


def _plot_against_lambda(sweep: Sweep, arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("valid", f"valid {sweep.metric}"), ("top2_neighbour_rate", "top-2 map-neighbour rate"),
              ("map_smoothness", "map smoothness"), ("border_bias", "border bias (load vs coverage)")]
    base = next(a for a in arms if a["arm"] == sweep.baseline)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (key, title) in zip(axes, panels):
        for padding, colour in (("valid", "tab:blue"), ("circular", "tab:orange")):
            pts = sorted((a["paper_lambda"], a[key], a[key + "_std"]) for a in arms
                         if a["arm"] != sweep.baseline and a["padding"] == padding and a["paper_lambda"] > 0)
            if pts:
                x, y, e = zip(*pts)
                axis.errorbar(x, y, yerr=[0 if math.isnan(v) else v for v in e], marker="o", capsize=3,
                              color=colour, label=f"MoGE, {padding} padding")
        if not math.isnan(base[key]):
            axis.axhline(base[key], color="black", linestyle="--", label=sweep.baseline)
        if key == "top2_neighbour_rate":
            axis.axhline(base["top2_neighbour_chance"], color="grey", linestyle=":", label="chance (valid map)")
        axis.set_xscale("log")
        axis.set_xlabel("paper lambda (token-summed)")
        axis.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(sweep.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_neighbour_curves(sweep: Sweep, point, path: Path) -> None:
    """The training log's noise-free top-2 neighbour rate (mean over layers) against step, first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for arm in sweep.arms:
        history = read_history(sweep.root / "runs" / Run(point, arm, sweep.seeds[0]).name / "history.jsonl")
        points = [(r["step"], _mean([v for k, v in r.items() if k.startswith("top2_neighbour_rate/")]))
                  for r in history if "split" not in r]
        if points:
            axis.plot(*zip(*points), label=arm, linestyle="--" if arm == sweep.baseline else "-")
    axis.set_xlabel("step")
    axis.set_ylabel("top-2 map-neighbour rate (noise-free, training batch)")
    axis.set_title(f"{sweep.name}, seed {sweep.seeds[0]}")
    if axis.lines:  # runs without a training log (e.g. copied metrics only) leave an empty plot
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_scaling_report(sweep: Sweep, points: list, probe: int) -> Path:
    """A sweep over grid points (e.g. E x k) at fixed arms: per point, the test metric of each MoGE arm
    against the baseline (paired over seeds) next to the topography of both. Writes
    ``topography.{md,json}`` and ``scaling.png`` (the measures against the first grid key)."""
    rows = []
    for point in points:
        arms = [a for a in (arm_summary(sweep, point, arm, probe) for arm in sweep.arms) if a is not None]
        base = next(a for a in arms if a["arm"] == sweep.baseline)
        for arm in (a for a in arms if a["arm"] != sweep.baseline):
            seeds = sorted(set(arm["seeds"]) & set(base["seeds"]))
            test = paired_difference([arm["seeds"][s]["test"] for s in seeds],
                                     [base["seeds"][s]["test"] for s in seeds], sweep.higher_is_better)
            rows.append({"point": dict(point), "arm": arm, "baseline": base, "test_difference": test})
    (sweep.root / "topography.json").write_text(json.dumps(rows, indent=1))
    m = sweep.metric
    keys = list(dict(points[0]))
    lines = [f"# {sweep.name}: topography and {m} per grid point", "",
             f"Mean ± std over seeds {sweep.seeds}, noise-free scores of {probe} probe inputs from the test split, "
             f"averaged over the MoE layers; MoGE arm vs `{sweep.baseline}` (in parentheses). Plateau gap: change of "
             f"the validation {m} over the last quarter of the run.", "",
             "Top-2 neighbours are scored on each arm's own map (the flat grid under valid padding, the torus "
             "under circular); the torus / flat column scores both arms on both graphs where measured.", "",
             "| " + " | ".join(k.split(".")[-1] for k in keys) + f" | arm | test {m} diff (paired) | p | top-2 "
             f"neighbours | chance | torus / flat (chance) | smoothness | entropy (norm.) | plateau gap |",
             "|" + "---|" * (len(keys) + 9)]
    for r in rows:
        arm, base, test = r["arm"], r["baseline"], r["test_difference"]
        lines.append("| " + " | ".join(str(r["point"][k]) for k in keys) + f" | {arm['arm']} | "
                     f"{test['mean']:+.4f} ± {test['std']:.4f} | {test['p']:.3f} | "
                     f"{arm['top2_neighbour_rate']:.3f} ({base['top2_neighbour_rate']:.3f}) | "
                     f"{arm['top2_neighbour_chance']:.3f} ({base['top2_neighbour_chance']:.3f}) | "
                     f"{_both_graphs(arm)} ({_both_graphs(base)}) | "
                     f"{arm['map_smoothness']:+.3f} ({base['map_smoothness']:+.3f}) | "
                     f"{arm['entropy_normalized']:.3f} ({base['entropy_normalized']:.3f}) | "
                     f"{arm['plateau_gap']:+.4f} ({base['plateau_gap']:+.4f}) |")
    lines += ["", "![topography and metric against the grid](scaling.png)", "",
              f"Reproduce: `python -m moge_ds.experiments run experiments/{sweep.name}.yaml`, then "
              f"`python -m moge_ds.experiments topography experiments/{sweep.name}.yaml`.", ""]
    (sweep.root / "topography.md").write_text("\n".join(lines))
    _plot_scaling(rows, keys, m, sweep.root / "scaling.png")
    return sweep.root / "topography.md"


def _plot_scaling(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    """Test difference, neighbour rate above chance and smoothness against the first grid key, a line
    per value of the other keys (e.g. against E, one line per k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"test {metric}: MoGE - MoE", lambda r: r["test_difference"]["mean"]),
              ("top-2 neighbours above chance: MoGE", lambda r: r["arm"]["top2_neighbour_rate"]
               - r["arm"]["top2_neighbour_chance"]),
              ("top-2 neighbours above chance: MoE", lambda r: r["baseline"]["top2_neighbour_rate"]
               - r["baseline"]["top2_neighbour_chance"]),
              ("map smoothness: MoGE", lambda r: r["arm"]["map_smoothness"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    lines = sorted({tuple(r["point"][k] for k in keys[1:]) for r in rows})
    for axis, (title, value) in zip(axes, panels):
        for line in lines:
            pts = sorted((r["point"][keys[0]], value(r)) for r in rows
                         if tuple(r["point"][k] for k in keys[1:]) == line)
            label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys[1:], line))
            axis.plot(*zip(*pts), marker="o", label=label)
        axis.axhline(0, color="grey", linestyle=":")
        axis.set_xscale("log", base=2)
        axis.set_xlabel(keys[0].split(".")[-1])
        axis.set_title(title, fontsize=9)
    if len(keys) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
