"""Whole directories appear at once or not at all (exports, universal conversions)."""

import socket
import subprocess

import pytest

from moge_ds.checkpoint import CheckpointError, staged_dir


def test_a_finished_block_renames_into_place(tmp_path):
    out = tmp_path / "export"
    with staged_dir(out) as staging:
        assert staging.parent == tmp_path and not out.exists()
        (staging / "model.safetensors").write_text("weights")
    assert (out / "model.safetensors").read_text() == "weights"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_failed_block_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(ValueError):
        with staged_dir(out) as staging:
            (staging / "half").write_text("x")
            raise ValueError("converter died")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_leftover_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    leftover = tmp_path / f".export.partial-{socket.gethostname()}-{dead.pid}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("half")
    with staged_dir(tmp_path / "export") as staging:
        (staging / "ok").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_existing_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is not empty .it holds config.json."):
        with staged_dir(tmp_path / "run"):
            pass
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
