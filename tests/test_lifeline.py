"""Ranks die with their launcher: kill each launcher process of a real 2-rank job with SIGTERM or
SIGKILL and time how long any rank survives it (SIGTERM to launch/train.sh: test_reliability.py)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from moge_ds.lifeline import is_launcher, launcher_chain
from tests.launching import BIN, REPO, free_port, tiny_train_args
from tests.test_reliability import processes_mentioning, wait_for_training


@pytest.mark.parametrize("cmdline, expected", [
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2"], True),
    (["/usr/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"], True),
    (["/venv/bin/mpiexec", "-np", "2", "python"], True),
    (["/venv/bin/hydra_pmi_proxy", "--control-port", "x"], True),
    (["/bin/bash", "/repo/launch/train.sh", "--nproc", "2"], True),
    (["/usr/bin/python3", "-m", "torch.distributed.run", "x.py"], True),
    (["slurmstepd: [12.0]"], True),
    (["/bin/bash", "-l"], False),
    (["/venv/bin/python", "-m", "pytest", "tests"], False),
    (["make", "train"], False),
])
def test_is_launcher(cmdline, expected):
    assert is_launcher(cmdline) is expected


def test_the_chain_stops_at_the_outermost_launcher(tmp_path):
    """A real tree: bash (not a launcher) -> train.sh-named script (launcher) -> sleeper; the sleeper
    watches only the script, never the shell above it."""
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/bash\nsleep 60\n")
    script.chmod(0o755)
    shell = subprocess.Popen(["bash", "-c", f"{script}; true"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (sleepers := [c for c in psutil.Process(shell.pid).children(recursive=True) if c.name() == "sleep"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        chain = launcher_chain(sleepers[0])
        assert [p.cmdline()[1] for p in chain] == [str(script)]
    finally:
        os.killpg(shell.pid, signal.SIGKILL)


def test_no_launcher_means_no_watching(tmp_path):
    """An orphaned process (its launcher-free ancestry: init or a subreaper) watches nothing, so a
    rank started by hand never ends itself."""
    pid_file = tmp_path / "pid"
    subprocess.run(["bash", "-c", f"sleep 60 & echo $! > {pid_file}"], check=True)
    orphan = psutil.Process(int(pid_file.read_text()))
    try:
        assert launcher_chain(orphan) == []
    finally:
        orphan.kill()


def test_an_orphaned_launch_py_means_its_runner_is_gone_unless_init_is_the_launcher(tmp_path, monkeypatch):
    """A real process titled like launch.py and adopted by init: its runner is gone, unless init is
    itself a launcher (a container whose entrypoint is ``deepspeed``), when it is the runner."""
    from moge_ds import lifeline

    pid_file = tmp_path / "pid"
    subprocess.run(["bash", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' -m deepspeed.launcher.launch "
                    f"& echo $! > {pid_file}"], check=True)
    orphan = psutil.Process(int(pid_file.read_text()))
    try:
        assert orphan.ppid() == 1 and is_launcher(orphan.cmdline())
        assert lifeline.already_gone([orphan]) == "the deepspeed runner that started launch.py"
        monkeypatch.setattr(lifeline, "_init_is_a_launcher", lambda: True)
        assert lifeline.already_gone([orphan]) is None
    finally:
        orphan.kill()


def start_job(launcher: str, workspace, out) -> subprocess.Popen:
    args = tiny_train_args(workspace, out, steps=100000)
    port = str(free_port())
    if launcher == "mpirun":
        cmd = [str(REPO / "launch" / "mpi.sh"), "--np", "2", "--master-port", port, *args]
    elif launcher == "train.sh":
        cmd = [str(REPO / "launch" / "train.sh"), "--nproc", "2", "--master-port", port, *args]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "moge_ds.train",
               *args[:4], *args[5:]]
        cmd[cmd.index("--ds-config")] = "--deepspeed_config"
    else:  # the deepspeed runner itself, as the README's direct commands start it
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", "moge_ds.train",
               *args[:4], *args[5:]]
        cmd[cmd.index("--ds-config")] = "--deepspeed_config"
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def target_pid(launcher: str, job: subprocess.Popen, out) -> int:
    """The process to kill: the started one, or for launch.py and mpiexec the one below it."""
    if launcher == "launch.py":
        pids = [p for p in processes_mentioning(str(out)) if "deepspeed.launcher.launch" in cmdline(p)]
    elif launcher == "mpirun":
        pids = [p.pid for p in psutil.Process(job.pid).children(recursive=True) if p.name().startswith("mpiexec")] \
            or [job.pid]  # mpi.sh execs mpiexec: then it is the started process
    else:
        pids = [job.pid]
    assert len(pids) == 1, pids
    return pids[0]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, sig", [
    ("runner", signal.SIGTERM), ("runner", signal.SIGKILL), ("launch.py", signal.SIGTERM),
    ("launch.py", signal.SIGKILL), ("train.sh", signal.SIGKILL), ("mpirun", signal.SIGTERM),
    ("mpirun", signal.SIGKILL), ("torchrun", signal.SIGTERM), ("torchrun", signal.SIGKILL)])
def test_every_rank_ends_within_seconds_of_its_launchers_death(workspace, tmp_path, launcher, sig):
    out = tmp_path / "job"
    job = start_job(launcher, workspace, out)
    try:
        wait_for_training(out, job)
        ranks = [p for p in processes_mentioning(str(out)) if not is_launcher(cmdline(p))]
        assert len(ranks) == 2, [cmdline(p) for p in ranks]
        os.kill(target_pid(launcher, job, out), sig)
        killed = time.monotonic()
        while any(alive(p) for p in ranks):
            assert time.monotonic() - killed < 15, f"ranks outlived the {launcher} by 15 s"
            time.sleep(0.1)
        print(f"\nlauncher-kill: {launcher} {signal.Signals(sig).name}: no rank left after "
              f"{time.monotonic() - killed:.1f} s", file=sys.stderr)
    finally:
        for pid in processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)
        job.kill()
        job.communicate()


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_ranks_end_when_the_runner_died_before_they_started(workspace, tmp_path):
    """SIGKILL the deepspeed runner as soon as its launch.py exists, before any rank has started
    watching: the ranks find launch.py adopted by init and end at once, instead of training on."""
    out = tmp_path / "job"
    job = start_job("runner", workspace, out)
    try:
        started = time.monotonic()
        while not [p for p in processes_mentioning(str(out)) if "deepspeed.launcher.launch" in cmdline(p)]:
            assert job.poll() is None and time.monotonic() - started < 60, "the runner started nothing"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
        killed = time.monotonic()
        while processes_mentioning(str(out)):
            assert time.monotonic() - killed < 30, f"{[cmdline(p) for p in processes_mentioning(str(out))]} live on"
            time.sleep(0.1)
        assert not (out / "history.jsonl").is_file()
        assert "is gone: stopping this rank" in job.communicate()[0]
    finally:
        for pid in processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)
        job.kill()
