"""MoGE inside real DeepSpeed: 2 CPU ranks through the deepspeed launcher (gloo), ep_size 2."""

import json

import pytest

from tests.launching import REPO, launch_deepspeed

pytestmark = pytest.mark.slow


def test_moge_trains_with_expert_parallelism_and_zero(tmp_path):
    launch_deepspeed([str(REPO / "tests/dist/moge_zero_check.py"), "--zero", "1", "2", "3", "--out", str(tmp_path)],
                     cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        for stage in ("1", "2"):
            run = result[stage]
            losses = run["losses"]
            assert all(x == x and abs(x) < 1e6 for x in losses), losses
            assert sum(losses[-5:]) < sum(losses[:5]), losses
            assert run["experts_differ"], "expert parameters should be rank-local under ep_size 2"
            assert run["dense_in_sync"], "non-expert parameters must stay identical across ranks"
            assert run["restored"], "checkpoint load did not restore the saved weights"
            assert run["gs_loss"] > 0
        assert "not supported with ZeRO Stage 3" in result["3"]["init_error"]


def test_a_stale_build_lock_is_named_before_the_wait(tmp_path, monkeypatch, caplog):
    """A lock left by a build killed midway makes DeepSpeed wait forever: init_job names it first."""
    import os
    import time

    from moge_ds.distributed import STALE_BUILD_LOCK_S, warn_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, young = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (old, young):
        lock.parent.mkdir(parents=True)
        lock.touch()
    past = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(old, (past, past))
    with caplog.at_level("WARNING", logger="moge_ds"):
        assert warn_stale_build_locks() == [old]
    assert f"{old} is 11 min old" in caplog.text and "deepspeed_shm_comm" in caplog.text
