"""Invariance measures on hand-made routers and images; the CLI on a hand-made ViT export; the sweep
report end to end on a tiny sweep (one run trained through the experiments runner, the rest hand-made)."""

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from moge_ds import experiments
from moge_ds.analysis.__main__ import main as analysis_main
from moge_ds.analysis.invariance import (InvarianceError, View, expert_class_information, expert_output_diversity,
                                         logits_from_scores, measure, token_correlation, top1_agreement,
                                         unrelated_image_stats, views)
from moge_ds.config import Config, apply_overrides
from moge_ds.experiments.__main__ import main as experiments_main
from moge_ds.experiments.invariance import holm, plateau_distance, valid_curve
from tests.launching import BIN, REPO

TINY_VIT = ("model.kind=vit", "model.dim=16", "model.depth=2", "model.heads=2", "model.patch_size=7",
            "model.num_classes=2", "moe.num_experts=4", "moe.map_shape=[2,2]", "moe.padding=circular", "moe.ep_size=1",
            "moe.placement=last_2")


def centred_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, 1, 28, 28]`` with content only inside a 3-pixel zero border: shifts of up to 3 px lose nothing."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 3:25, 3:25] = torch.randint(0, 256, (n, 1, 22, 22), generator=torch.Generator().manual_seed(seed),
                                             dtype=torch.uint8)
    return images


def histogram_router(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, E]`` from each image's intensity histogram (16 bins): exactly shift-invariant while
    nothing leaves the frame."""
    bins = (images.flatten(1).long() // 16)
    counts = F.one_hot(bins, 16).sum(1).double()
    return counts @ weight


def test_shift_invariant_router_gives_correlation_and_agreement_1():
    images = centred_images(30)
    weight = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pixel_weight = torch.randn(28 * 28, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    shifts = [v for v in views() if v.kind == "shift"]
    assert len(shifts) == 12 and {(v.dy, v.dx) for v in shifts} == {(0, d) for d in (-3, -2, -1, 1, 2, 3)} | {
        (d, 0) for d in (-3, -2, -1, 1, 2, 3)}
    clean = histogram_router(images, weight)
    for view in shifts:
        moved = histogram_router(view.apply(images), weight)
        assert token_correlation(clean, moved).tolist() == pytest.approx([1.0] * 30, abs=1e-12)
        assert top1_agreement(clean, moved).all()
    # A router that reads pixel positions is not shift-invariant: the measure can fail.
    by_position = images.flatten(1).double() @ pixel_weight
    moved = View("shift_x+2", "shift", dx=2).apply(images).flatten(1).double() @ pixel_weight
    assert token_correlation(by_position, moved).mean() < 0.9


def test_correlation_hand_values_and_scale_freedom():
    before = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    after = torch.tensor([[1.0, 3.0, 2.0], [13.0, 23.0, 33.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    # Centred rows (-1, 0, 1) and (-1, 1, 0): dot 1 over norms sqrt(2) * sqrt(2) = 0.5; an affine map: 1;
    # reversed: -1; a constant router row expresses no preference: 0.
    assert token_correlation(before, after).tolist() == pytest.approx([0.5, 1.0, -1.0, 0.0], abs=1e-15)
    # The gate's softmax scores give the logits' correlation: log-softmax is the logits minus a per-token constant.
    torch.manual_seed(0)
    x, y = torch.randn(200, 32, dtype=torch.float64) * 3, torch.randn(200, 32, dtype=torch.float64) * 3
    got = token_correlation(logits_from_scores(F.softmax(x.float(), -1)), logits_from_scores(F.softmax(y.float(), -1)))
    torch.testing.assert_close(got, token_correlation(x, y), rtol=0, atol=1e-5)


def test_random_and_near_uniform_routers_get_no_credit():
    torch.manual_seed(0)
    a, b = torch.randn(20000, 32), torch.randn(20000, 32)
    assert abs(token_correlation(a, b).mean().item()) < 0.01
    assert top1_agreement(a, b).double().mean().item() == pytest.approx(1 / 32, abs=0.005)
    # Near-uniform scores barely move in absolute terms, but their logits are as unrelated as before.
    near_a, near_b = F.softmax(1e-3 * a, -1), F.softmax(1e-3 * b, -1)
    assert (near_a - near_b).abs().max() < 1e-3  # scores of about 1/32 = 0.031
    assert abs(token_correlation(logits_from_scores(near_a), logits_from_scores(near_b)).mean().item()) < 0.01


def test_expert_class_information_extremes():
    classes, experts = torch.arange(4), torch.arange(3)
    # Every (expert, class) pair equally often: the choice is independent of the label.
    grid_e, grid_c = torch.meshgrid(experts, classes, indexing="ij")
    independent_e, independent_c = grid_e.flatten().repeat(5), grid_c.flatten().repeat(5)
    assert expert_class_information(independent_e, independent_c) == pytest.approx(0.0, abs=1e-12)
    labels = torch.arange(4).repeat(7)
    bijection = torch.tensor([2, 0, 3, 1])[labels]
    assert expert_class_information(bijection, labels) == pytest.approx(math.log2(4), abs=1e-12)


def test_expert_output_diversity_hand_values():
    outputs = torch.randn(5, 7, 6)
    assert expert_output_diversity(outputs[:1].expand(4, 7, 6)) == pytest.approx(0.0, abs=1e-12)
    assert expert_output_diversity(torch.eye(3).unsqueeze(1)) == pytest.approx(1.0)  # orthogonal experts
    # Token 1: (1, 0) vs (1, 1): cosine 1/sqrt(2); token 2: (0, 1) vs (0, -1): cosine -1.
    two = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    assert expert_output_diversity(two) == pytest.approx((1 - 1 / math.sqrt(2) + 2) / 2, abs=1e-15)
    with pytest.raises(InvarianceError, match=r"at least 2 experts.*\(1, 7, 6\)"):
        expert_output_diversity(outputs[:1])


def test_holm_and_plateau_distance():
    assert holm([0.01, 0.04]) == pytest.approx([0.02, 0.04])
    assert holm([0.04, 0.01]) == pytest.approx([0.04, 0.02])
    assert holm([0.03, 0.02]) == pytest.approx([0.04, 0.04])  # step-down stays monotone
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([0.01, None]) == [None, None] and holm([0.01, math.nan]) == [None, None]
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "split": "valid", "accuracy": 0.5},
               {"step": 4, "split": "valid", "accuracy": 0.61}, {"step": 4, "split": "valid", "accuracy": 0.62},
               {"step": 4, "split": "test", "accuracy": 0.9}]
    curve = valid_curve(history, "accuracy")
    assert curve == [(2, 0.5), (4, 0.62)] and plateau_distance(curve) == pytest.approx(0.12)
    assert math.isnan(plateau_distance(curve[:1]))


def write_export(out, config: Config):
    """A hand-made export (random weights) in the layout ``moge_ds.export`` writes."""
    from safetensors.torch import save_model

    from moge_ds.models import build_model

    out.mkdir(parents=True)
    save_model(build_model(config, config.model.vocab_size), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"config": config.to_dict(), "step": 0, "source": "hand-made"}))
    return out


def test_measure_and_cli_on_a_hand_made_export(workspace, tmp_path, process_group, capsys):
    config = apply_overrides(Config(), (*TINY_VIT, f"data.images=folder:{workspace / 'images'}"))
    export_dir = write_export(tmp_path / "vit", config)
    analysis_main([str(export_dir), "--invariance", "--images", "10", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "invariance.json").read_text())
    assert result["images"] == 10 and result["moe_layers"] == 2 and len(result["views"]) == 16
    assert len(result["views"]["rotate+10"]["routing_correlation"]) == 2
    assert -1 <= result["rotation_routing_correlation"] < 1 and 0 <= result["shifted_accuracy"] <= 1
    assert result["expert_output_diversity"] > 0
    # Blank images are the same under every view: routing correlates perfectly token by token, layer by layer.
    from moge_ds.export import load_export

    model, _ = load_export(export_dir)
    blank = measure(model, config, torch.zeros(6, 1, 28, 28, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    assert blank["rotation_routing_correlation"] == pytest.approx(1.0) and blank["shift_top1_agreement"] == 1.0
    assert blank["rotated_accuracy"] == blank["clean_accuracy"]
    gpt = apply_overrides(Config(), ("model.dim=16", "model.depth=2", "model.heads=2", "model.vocab_size=50",
                                     "moe.num_experts=4", "moe.map_shape=[2,2]", "moe.padding=circular",
                                     "moe.ep_size=1"))
    gpt_dir = write_export(tmp_path / "gpt", gpt)
    for argv, message in (([str(gpt_dir), "--invariance"], "is a 'gpt' export"),
                          ([str(export_dir), "--invariance", "--images", "0"], "got 0"),
                          ([str(tmp_path / "nothing"), "--invariance"], "is not an export"),
                          ([str(export_dir), "--invariance", "--out", str(tmp_path / "out")],
                           "already holds a measurement")):
        with pytest.raises(SystemExit) as exit_info:
            analysis_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def hand_measures(rotated_accuracy: float, rotation_correlation: float) -> dict:
    """A run's cached ``invariance.json`` with chosen primary values (every view and other measure fixed)."""
    per_view = {v.name: {"kind": v.kind, "dy": v.dy, "dx": v.dx, "angle": v.angle,
                         "accuracy": rotated_accuracy if v.kind == "rotate" else 0.7,
                         "routing_correlation": [rotation_correlation if v.kind == "rotate" else 0.8] * 2,
                         "top1_agreement": [0.6, 0.6]} for v in views()}
    return {"export": "hand-made", "step": 4, "images": 48, "images_requested": None, "clean_accuracy": 0.75,
            "rotated_accuracy": rotated_accuracy, "rotation_routing_correlation": rotation_correlation,
            "rotation_top1_agreement": 0.6, "shifted_accuracy": 0.7, "shift_routing_correlation": 0.8,
            "shift_top1_agreement": 0.6, "expert_output_diversity": 0.9, "expert_class_mi_bits": 0.1,
            "unrelated_routing_correlation": 0.3, "unrelated_top1_agreement": 0.2, "views": per_view}


def write_hand_run(run_dir, measures: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.74}}))
    (run_dir / "history.jsonl").write_text("\n".join(json.dumps({"step": s, "split": "valid", "accuracy": a})
                                                     for s, a in ((2, 0.70), (4, 0.72))))
    (run_dir / "provenance.jsonl").write_text(json.dumps({"commit": "1234567abcdef", "dirty": False}) + "\n")
    (run_dir / "invariance.json").write_text(json.dumps(measures))


@pytest.mark.slow
def test_sweep_invariance_report_end_to_end(workspace, tmp_path, monkeypatch):
    """One run of a 2-arm x 2-seed sweep trained through the runner and measured from its checkpoint;
    the other three hand-made. Then every run hand-made: the report's statistics against a hand computation."""
    monkeypatch.setattr(experiments.sweep, "REPO", tmp_path)
    (tmp_path / "launch").symlink_to(REPO / "launch")
    monkeypatch.setenv("VENV", str(BIN.parent))  # the launcher looks for .venv beside the (symlinked) script
    spec = {"name": "tiny_plateau", "preset": str(REPO / "configs/vit_fmnist.yaml"),
            "ds_config": str(workspace / "ds.json"), "metric": "accuracy", "higher_is_better": True,
            "report_split": "test", "baseline": "moe",
            "common": [o for o in TINY_VIT if o != "model.kind=vit"] + [
                "train.steps=4", "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=1",
                f"data.images=folder:{workspace / 'images'}", "data.valid_images=8", "train.final_eval=[valid,test]"],
            "grid": {"moe.num_experts": [4]}, "arms": {"moe": ["moe.gs_weight=0"], "circular_lam9e-3": [
                "moe.gs_weight=1.0"]}, "seeds": [1, 2]}
    path = tmp_path / "tiny_plateau.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the baseline arm first, as in the real sweep
    sweep = experiments.Sweep.load(str(path))
    runs = {(r.arm, r.seed): sweep.root / "runs" / r.name for r in sweep.runs()}
    hand = {("circular_lam9e-3", 1): (0.65, 0.70), ("moe", 2): (0.62, 0.52), ("circular_lam9e-3", 2): (0.66, 0.74)}
    for key, values in hand.items():
        write_hand_run(runs[key], hand_measures(*values))
    experiments.run_sweep(sweep, 1)  # trains only the missing run: moe, seed 1
    experiments_main(["invariance", str(path)])
    trained = json.loads((runs["moe", 1] / "invariance.json").read_text())
    assert trained["step"] == 4 and trained["images"] == 48 and len(trained["views"]) == 16
    report = json.loads((sweep.root / "invariance.json").read_text())
    codes = {r["run"]: r["code"] for r in report["runs"]}
    assert re.fullmatch(r"[0-9a-f]{7}(\+dirty)?", codes[runs["moe", 1].name]) and set(codes.values()) > {"1234567"}
    assert (sweep.root / "invariance.png").stat().st_size > 1000 and (sweep.root / "valid_curves.png").is_file()

    # Cached measures are read, not recomputed: without its checkpoints the run still reports.
    write_hand_run(runs["moe", 1], hand_measures(0.60, 0.50))
    shutil.rmtree(runs["moe", 1] / "checkpoints")
    experiments_main(["invariance", str(path)])
    report = json.loads((sweep.root / "invariance.json").read_text())
    accuracy, correlation = report["primary"]
    # Differences (0.05, 0.04) and (0.20, 0.22): t = mean / (sd / sqrt 2) = 9 and 21; with 1 degree of
    # freedom the two-sided p is 1 - 2 atan(t) / pi. Holm: the smaller p doubled, then the running maximum.
    p_acc, p_corr = 1 - 2 * math.atan(9) / math.pi, 1 - 2 * math.atan(21) / math.pi
    assert accuracy["mean"] == pytest.approx(0.045) and accuracy["p"] == pytest.approx(p_acc, rel=1e-6)
    assert correlation["mean"] == pytest.approx(0.21) and correlation["p"] == pytest.approx(p_corr, rel=1e-6)
    assert correlation["holm_p"] == pytest.approx(2 * p_corr) and accuracy["holm_p"] == pytest.approx(p_acc)
    assert accuracy["verdict"] == "not called at alpha 0.05 after Holm"
    assert report["arms"]["moe"]["plateau_distance"]["mean"] == pytest.approx(0.02)
    markdown = (sweep.root / "invariance.md").read_text()
    assert f"| +0.0450 ± 0.0071 (n=2) | {p_acc:.3f} | {p_acc:.3f} |" in markdown
    assert "`1234567`" in markdown and "| rotate+10 | 0.6100 | 0.5100 | 0.6000 | 0.6550 | 0.7200 | 0.6000 |" in markdown
    with pytest.raises(SystemExit) as exit_info:
        experiments_main(["invariance", str(path), "--arm", "moe"])
    assert exit_info.value.code == 2


def test_the_unrelated_image_control_exposes_an_input_independent_router():
    """A router that gives every token the same tilted logits correlates perfectly with *another*
    image too (no invariance in it); one whose logits follow the image correlates about 0 there."""
    tokens_per_image, images, experts = 17, 50, 8
    tilt = torch.linspace(-1, 1, experts, dtype=torch.float64)
    static = tilt.expand(tokens_per_image * images, experts).clone()
    stats = unrelated_image_stats([static], tokens_per_image)
    assert stats["unrelated_routing_correlation"] == pytest.approx(1.0)
    assert stats["unrelated_top1_agreement"] == 1.0
    following = torch.randn(images, 1, experts, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    following = following.expand(images, tokens_per_image, experts).reshape(-1, experts)
    stats = unrelated_image_stats([following], tokens_per_image)
    assert abs(stats["unrelated_routing_correlation"]) < 0.2 and stats["unrelated_top1_agreement"] < 0.4
