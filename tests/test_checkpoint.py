"""Checkpoints: resharding across world and expert-parallel sizes, crash safety, keep-last, bad input."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from moge_ds.checkpoint import STATE_FILE, complete_tags
from moge_ds.export import export, load_export
from tests.launching import BIN, REPO, free_port, launch_deepspeed, train

pytestmark = pytest.mark.slow

MODEL = ["model.kind=gpt", "model.dim=32", "model.depth=2", "model.heads=2", "model.seq_length=32",
         "model.vocab_size=300", "moe.num_experts=4", "moe.map_shape=[2,2]", "moe.padding=circular",
         "moe.gs_weight=1.0", "moe.drop_tokens=false"]


def saved_run(workspace, name, nproc, ep):
    """A finished 2-step run's checkpoints, trained once per session (runs never overwrite each other)."""
    if not (workspace / name / "metrics.json").is_file():
        train(workspace, name, "train.steps=2", f"moe.ep_size={ep}", "moe.drop_tokens=false",
              "model.vocab_size=300", nproc=nproc)
    return workspace / name / "checkpoints"


def load_into(workspace, checkpoints, nproc, ep, tmp_path):
    out = tmp_path / f"load_{nproc}_{ep}"
    out.mkdir()
    result = launch_deepspeed([str(REPO / "tests/dist/reshard_check.py"), "--checkpoints", str(checkpoints), "--ds",
                               str(workspace / "ds.json"), "--out", str(out), "--set", *MODEL, f"moe.ep_size={ep}"],
                              cwd=tmp_path, num_ranks=nproc)
    return torch.load(out / "logits.pt", weights_only=True), json.loads((out / "result.json").read_text()), result


def reference_logits(checkpoints, tmp_path):
    model, config = load_export(export(checkpoints, tmp_path / "export"))
    tokens = torch.randint(0, 300, (4, config.model.seq_length), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        return model(tokens)[0]


@pytest.mark.parametrize("saved, loaded", [((2, 2), (1, 1)), ((2, 2), (2, 1)), ((1, 1), (2, 2))],
                         ids=["2x2->1x1", "2x2->2x1", "1x1->2x2"])
def test_reshard_gives_identical_outputs(workspace, tmp_path, saved, loaded):
    checkpoints = saved_run(workspace, f"saved_{saved[0]}_{saved[1]}", *saved)
    want = reference_logits(checkpoints, tmp_path)
    got, result, proc = load_into(workspace, checkpoints, *loaded, tmp_path)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert result["step"] == 2 and result["loss_after"] == result["loss_after"]  # trains on, finite
    assert "resetting the optimizer state" in proc.stdout + proc.stderr


def test_kill_during_saves_never_leaves_latest_incomplete(workspace, tmp_path):
    out = tmp_path / "killed"
    args = ["--module", "moge_ds.train", "--config", str(REPO / "configs/gpt_tiny.yaml"), "--deepspeed_config",
            str(workspace / "ds.json"), "--set", "model.dim=32", "model.depth=2", "model.heads=2",
            "moe.num_experts=4", "moe.map_shape=[2,2]", "moe.padding=circular", "moe.ep_size=2",
            f"data.prefixes=[{workspace / 'text'}]", f"data.tokenizer={workspace / 'tok.model'}",
            "model.seq_length=32", "data.split=80,10,10", "train.steps=100000", "train.save_interval=1",
            "train.keep_last=2", "train.eval_interval=0", f"train.output_dir={out}"]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while len(complete_tags(out / "checkpoints")) < 2:
        assert time.time() < deadline and proc.poll() is None, "no checkpoints were written"
        time.sleep(0.2)
    time.sleep(0.7)  # land somewhere inside the save/train cycle
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    root = out / "checkpoints"
    latest = (root / "latest").read_text()
    assert (root / latest / STATE_FILE).is_file(), f"latest -> {latest} is incomplete"
    tags = complete_tags(root)
    assert len(tags) <= 3 and tags[-1] == latest  # keep_last=2, plus at most the one being replaced
    resumed = launch_deepspeed(args[:-5] + ["train.steps=" + str(int(latest[4:]) + 1), "train.save_interval=0",
                                            "train.keep_last=2", "train.eval_interval=0", f"train.output_dir={out}",
                                            "--resume"], cwd=tmp_path)
    assert f"resumed from {root / latest}" in resumed.stdout + resumed.stderr


def test_resume_into_another_model_shape_is_refused(workspace, tmp_path):
    checkpoints = saved_run(workspace, "shape_src", 2, 2)
    with pytest.raises(AssertionError) as failure:
        train(workspace, "shape_src", "train.steps=4", "model.dim=48", "moe.drop_tokens=false",
              "model.vocab_size=300", resume=True)
    message = str(failure.value)
    assert "checkpoint error: cannot load" in message and str(checkpoints) in message
    assert "size mismatch" in message


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_a_damaged_file_only_rank_1_reads_is_named_before_loading(workspace, damage):
    """Checksums recorded at save catch what a zip directory check cannot: a file deleted (only
    rank 1 reads its ZeRO partition) and bytes changed in place (same size, still a valid zip)."""
    source = saved_run(workspace, "saved_2_2", 2, 2)
    shutil.copytree(source.parent, workspace / f"damaged_{damage}")
    tag = workspace / f"damaged_{damage}" / "checkpoints" / (source / "latest").read_text()
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "deleted":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    with pytest.raises(AssertionError) as failure:
        train(workspace, f"damaged_{damage}", "train.steps=4", "moe.ep_size=2", "moe.drop_tokens=false",
              "model.vocab_size=300", resume=True)
    expected = "is missing" if damage == "deleted" else "differs from what was saved (checksum mismatch"
    assert f"checkpoint error: damaged checkpoint files: {victim} {expected}" in str(failure.value), \
        str(failure.value)[-3000:]
    assert "Traceback" not in str(failure.value)
