"""End-to-end training through the deepspeed launcher: 2 CPU ranks, expert-parallel size 2."""

import json

import numpy as np
import pytest

from tests.launching import train

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def gpt_run(workspace):
    return train(workspace, "full", "train.steps=8")


def test_gpt_moge_trains_and_resumes_exactly(workspace, gpt_run):
    out, full = gpt_run
    assert len(full) == 8 and all(np.isfinite(r["loss"]) for r in full)
    assert np.mean([r["task_loss"] for r in full[-3:]]) < np.mean([r["task_loss"] for r in full[:3]])
    assert all(r["group_sparsity_loss"] > 0 for r in full)
    assert full[0]["sigma"] > full[-1]["sigma"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] > 1 and (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text() == "step00000008"

    train(workspace, "resumed", "train.steps=8", "train.exit_after_steps=4")
    _, resumed = train(workspace, "resumed", "train.steps=8", resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full[4:], resumed[4:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["sigma"] == pytest.approx(a["sigma"])


def test_gpt_moe_baseline(workspace):
    _, history = train(workspace, "moe", "train.steps=4", "moe.gs_weight=0")
    assert all(np.isfinite(r["loss"]) and "group_sparsity_loss" not in r for r in history)


@pytest.mark.parametrize("gs_weight", [0.0, 1.0])
def test_vit_trains(workspace, gs_weight):
    out, history = train(workspace, f"vit{gs_weight}", "train.steps=6", f"moe.gs_weight={gs_weight}",
                         preset="vit_fmnist.yaml")
    assert len(history) == 6 and all(np.isfinite(r["loss"]) for r in history)
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["test"]["accuracy"] <= 1.0


def test_config_error_is_reported_before_training(workspace):
    with pytest.raises(AssertionError, match="world size 2 is not divisible by moe.ep_size 4"):
        train(workspace, "bad", "train.steps=2", "moe.ep_size=4")


def test_export_evaluate_generate_analyse(workspace, gpt_run, tmp_path):
    import torch

    from moge_ds.analysis.report import analyse
    from moge_ds.evaluate import evaluate
    from moge_ds.export import export, load_export
    from moge_ds.generate import generate

    out, _ = gpt_run
    export_dir = export(out / "checkpoints", tmp_path / "export")
    model, config = load_export(export_dir)
    assert config.moe.ep_size == 1 and len(model.blocks[1].ffn.moe.deepspeed_moe.experts.deepspeed_experts) == 4
    metrics = evaluate(export_dir, "test", batches=4)
    trained = json.loads((out / "metrics.json").read_text())["test"]["perplexity"]
    # Same weights, a subset of the test split: close to what training reported, far below chance (vocab 300).
    assert 0.5 * trained < metrics["perplexity"] < 1.5 * trained
    torch.manual_seed(0)
    ids = generate(model, [5, 6, 7], 10, config.model.seq_length, temperature=0)
    assert len(ids) <= 13 and ids[:3] == [5, 6, 7]
    result = analyse(export_dir, tmp_path / "analysis", probe=512)
    assert len(result["layers"]) == 1 and (tmp_path / "analysis" / "topographic_maps.png").is_file()
    assert sum(result["layers"][0]["fraction"]) == pytest.approx(1.0)


def test_evaluate_refuses_a_tokenizer_larger_than_the_model(workspace, gpt_run, tmp_path):
    """An export evaluated with a tokenizer of more tokens than its embedding (vocab 300) is refused
    by name, before any data is read, instead of an index error deep in the forward pass."""
    from moge_ds.data.documents import DataError, SourceSpec
    from moge_ds.data.tokenizer import train_tokenizer
    from moge_ds.evaluate import evaluate
    from moge_ds.export import export

    spec = SourceSpec((str(workspace / "corpus" / "*.txt"), ))
    big = train_tokenizer(spec, str(tmp_path / "big"), vocab_size=304, input_sentence_size=0)
    export_dir = export(gpt_run[0] / "checkpoints", tmp_path / "export")
    with pytest.raises(DataError, match=f"{big.path} has 304 tokens, more than the 300 of the model"):
        evaluate(export_dir, "test", (f"data.tokenizer={big.path}",))


def test_export_refuses_bad_input(workspace, gpt_run, tmp_path):
    from moge_ds.checkpoint import CheckpointError
    from moge_ds.export import export

    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nothing", tmp_path / "x")
    out, _ = gpt_run
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out / "checkpoints" / "step00000008", broken)
    main_file = broken / "mp_rank_00_model_states.pt"
    main_file.write_bytes(main_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read .*broken"):
        export(broken, tmp_path / "y")
