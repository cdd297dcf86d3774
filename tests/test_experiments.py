"""The sweep runner's bookkeeping and statistics, on metrics written by hand."""

import json

import pytest
import yaml

from moge_ds import experiments
from moge_ds.experiments import Run, Sweep, collect, write_report


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments.sweep, "REPO", tmp_path)
    spec = {"name": "toy", "preset": "configs/vit_fmnist.yaml", "ds_config": "experiments/ds_sweep.json",
            "metric": "accuracy", "higher_is_better": True, "report_split": "test", "baseline": "moe",
            "common": ["train.steps=5"], "grid": {"moe.num_experts": [16, 32]},
            "arms": {"moe": ["moe.gs_weight=0"], "moge": ["moe.gs_weight=4"]}, "seeds": [1, 2, 3]}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return Sweep.load(str(path))


def write_metric(sweep, run, value):
    out = sweep.root / "runs" / run.name
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"test": {"accuracy": value}}))


def test_runs_and_commands(sweep):
    runs = sweep.runs()
    assert len(runs) == 2 * 2 * 3 and runs[0].seed == 1 and runs[-1].seed == 3
    cmd = sweep.command(runs[1], 1234)
    assert "--resume" in cmd and "moe.gs_weight=4" in cmd and "train.seed=1" in cmd
    assert any(c.startswith("train.output_dir=") and c.endswith(runs[1].name) for c in cmd)
    assert runs[1].name == "num_experts16_moge_s1"


def test_statistics_match_a_hand_computation(sweep):
    moe = {1: 0.70, 2: 0.72, 3: 0.71}
    moge = {1: 0.73, 2: 0.74, 3: 0.74}  # differences 0.03, 0.02, 0.03
    for seed in (1, 2, 3):
        write_metric(sweep, Run((("moe.num_experts", 16), ), "moe", seed), moe[seed])
        write_metric(sweep, Run((("moe.num_experts", 16), ), "moge", seed), moge[seed])
    write_metric(sweep, Run((("moe.num_experts", 32), ), "moe", 1), 0.5)
    rows, overall = collect(sweep)
    first = rows[0]
    assert first["moe"]["mean"] == pytest.approx(0.71) and first["moe"]["std"] == pytest.approx(0.01)
    diff = first["moge-moe"]
    assert diff["mean"] == pytest.approx(0.08 / 3) and diff["better"]
    # Paired t: mean d / (sd_d / sqrt(n)), sd_d = 0.005774 -> t = 8.0, two-sided p with 2 dof.
    assert diff["p"] == pytest.approx(0.01527, abs=2e-4)
    assert rows[1]["moe"]["n"] == 1 and "moge" not in rows[1]
    assert overall["moge"]["n"] == 3 and overall["moge"]["mean"] == pytest.approx(diff["mean"])
    report = write_report(sweep).read_text()
    assert "| 16 | 0.71 ± 0.01 (n=3) | 0.7367 ± 0.0058 (n=3) | +0.02667 ± 0.0058 | 0.015 | win |" in report
    assert (sweep.root / "results.png").is_file()


def test_bad_sweep_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "preset": "p", "ds_config": "d", "metric": "m",
                                    "higher_is_better": True, "report_split": "test", "baseline": "base",
                                    "common": [], "grid": {}, "arms": {"a": []}, "seeds": [1]}))
    with pytest.raises(experiments.SweepError, match="baseline 'base' is not one of the arms"):
        Sweep.load(str(path))


def test_scaling_topography_report(sweep):
    """A multi-point sweep's topography report: per point, the paired test difference next to each
    arm's measures, read from each run's cached topography and history."""
    from moge_ds.experiments.topography import MEASURES, write_topography_report

    for run in sweep.runs():
        out = sweep.root / "runs" / run.name
        out.mkdir(parents=True)
        moge = run.arm == "moge"
        test = 0.70 + 0.01 * run.seed + (0.02 + 0.001 * run.seed if moge else 0.0)
        (out / "metrics.json").write_text(json.dumps({"valid": {"accuracy": test}, "test": {"accuracy": test}}))
        (out / "history.jsonl").write_text("\n".join(json.dumps({"step": s, "split": "valid", "accuracy": a})
                                                     for s, a in ((3, test - 0.05), (4, test))))
        layer = {m: 0.5 for m in MEASURES} | {"top2_neighbour_rate": 0.6 if moge else 0.4}
        (out / "topography.json").write_text(json.dumps({"paper_lambda": 0.0, "gs_weight": 4.0 * moge,
                                                          "padding": "valid", "layers": [layer, layer]}))
    report = write_topography_report(sweep, probe=10).read_text()
    assert "| 16 | moge | +0.0220 ± 0.0010 | 0.001 |" in report and "| 32 | moge | +0.0220 ± 0.0010 |" in report
    assert "0.600 (0.400)" in report and "+0.0500 (+0.0500)" in report
    assert (sweep.root / "scaling.png").is_file()


def test_topography_report_of_a_test_sweep_with_a_dense_arm(sweep):
    """A one-point sweep reported on test chooses nothing; a dense arm (no MoE layer) has no lambda."""
    from moge_ds.experiments.topography import MEASURES, write_topography_report

    sweep.grid = {"moe.num_experts": [16]}
    sweep.arms = {**sweep.arms, "dense": ["moe.placement=none"]}
    for run in sweep.runs():
        out = sweep.root / "runs" / run.name
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"valid": {"accuracy": 0.7}, "test": {"accuracy": 0.7}}))
        (out / "history.jsonl").write_text(json.dumps({"step": 4, "split": "valid", "accuracy": 0.7}))
        layers = [] if run.arm == "dense" else [{m: 0.5 for m in MEASURES}]
        lam = float("nan") if run.arm == "dense" else 1e-5 * (run.arm == "moge")
        (out / "topography.json").write_text(json.dumps({"paper_lambda": lam, "gs_weight": 4.0, "padding": "valid",
                                                          "layers": layers}))
    report = write_topography_report(sweep, probe=10).read_text()
    assert "Nothing is chosen here" in report and "Chosen on validation" not in report
    assert "| dense | - | 4 | valid | 0.7000 ± 0.0000 |" in report
    assert json.loads((sweep.root / "topography.json").read_text())["choice"] is None
