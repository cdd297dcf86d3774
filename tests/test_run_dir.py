"""The run directory: claimed under a lock, and an earlier run replaced only once a start has
passed every check. Real single-rank training processes."""

import json
import shutil
import subprocess
import time

import pytest

from tests.test_reliability import (earlier_run, one_rank_env, other_tokenizer, snapshot, train_cmd,  # noqa: F401
                                    wait_for_training)

pytestmark = pytest.mark.slow


def test_overwrite_removes_the_earlier_run_only_after_every_check(workspace, earlier_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    before = snapshot(run)
    refused = subprocess.run(train_cmd(workspace, run, f"data.tokenizer={other_tokenizer(workspace, tmp_path)}",
                                       flags=["--overwrite"]), env=one_rank_env(), capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "was tokenized by" in refused.stderr, refused.stderr[-2000:]
    assert snapshot(run) == before, "a refused --overwrite changed the earlier run"

    subprocess.run(train_cmd(workspace, run, "train.steps=1", flags=["--overwrite"]), env=one_rank_env(),
                   check=True, capture_output=True, timeout=300)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "split" not in r] == [1]
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000001"]


def test_a_second_launch_into_a_running_run_directory_is_refused(workspace, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(train_cmd(workspace, out, "train.steps=100000"), env=one_rank_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_training(out, first)
        started = time.monotonic()
        second = subprocess.run(train_cmd(workspace, out, flags=["--overwrite"]), env=one_rank_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another run" in second.stderr
        assert f"last recorded holder: pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        assert time.monotonic() - started < 60
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.kill()
        first.communicate()
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), f"two runs wrote one history: {steps}"
