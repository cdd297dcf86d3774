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
