"""launch/slurm.sbatch on a real Slurm: a controller and two slurmd "nodes" on this machine.

Needs Slurm and munge (`make system-deps` installs them) and root, to run the daemons.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.launching import REPO, free_port, tiny_train_args

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [d for d in DAEMONS if not (shutil.which(d) or Path("/usr/sbin", d).exists())]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs Slurm and munge ({'missing ' + ', '.join(missing) if missing else 'present'}) and root "
                    f"to run the daemons: `make system-deps` as root installs them")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    ports = [free_port() for _ in range(3)]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=mogetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports[0]}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool.%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
ReturnToService=2
MpiDefault=none
AuthType=auth/munge
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=1 State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    for d in ("state", "spool.node1", "spool.node2"):
        (root / d).mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # A credential round trip tells a live munged from a stale socket left by an earlier session.
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld"], env=env, check=True)
    for node in ("node1", "node2"):
        subprocess.run(["slurmd", "-N", node], env=env, check=True)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, (root / "slurmctld.log").read_text()[-3000:]
        time.sleep(1)
    yield env
    for pid_file in root.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def test_sbatch_trains_across_two_slurm_nodes(slurm, workspace, tmp_path):
    out = tmp_path / "slurm run"
    train_args = tiny_train_args(workspace, out, steps=3)
    env = {**slurm, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    job_log = tmp_path / "job.out"
    result = subprocess.run(["sbatch", "--wait", "--nodes", "2", f"--output={job_log}", "--parsable",
                             str(REPO / "launch/slurm.sbatch"), *train_args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
    job_id = result.stdout.strip().split(";")[0]
    (REPO / "runs" / f"hostfile.{job_id}").unlink(missing_ok=True)
    assert result.returncode == 0, job_log.read_text()[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"


def test_every_rank_ends_when_its_job_step_is_killed(slurm, workspace, tmp_path):
    """SIGKILL to the job step's slurmstepd on each node (a node daemon's death, after which Slurm
    cannot signal the step's processes itself): every rank ends within seconds (moge_ds.lifeline)."""
    from tests.test_reliability import processes_mentioning, wait_for_training

    out = tmp_path / "killed_step"
    env = {**slurm, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    job = subprocess.Popen(["sbatch", "--wait", "--nodes", "2", f"--output={tmp_path / 'job.out'}",
                            str(REPO / "launch/slurm.sbatch"), *tiny_train_args(workspace, out, steps=100000)],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_training(out, job)
        ranks = [p for p in processes_mentioning(str(out))
                 if any(arg.startswith("--local_rank=") for arg in psutil_cmdline(p))]
        steps = {parent.pid for rank in ranks for parent in psutil.Process(rank).parents()
                 if parent.name() == "slurmstepd"}
        assert len(ranks) == 2 and len(steps) == 2, (ranks, steps)
        for pid in steps:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in ranks):
            assert time.monotonic() - killed < 15, "ranks outlived their killed job step by 15 s"
            time.sleep(0.1)
        print(f"\nslurmstepd SIGKILL: no rank left after {time.monotonic() - killed:.1f} s")
    finally:
        subprocess.run(["scancel", "--name", "slurm.sbatch"], env=env, capture_output=True)
        for pid in processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)
        job.kill()
        job.communicate()
        for hostfile in (REPO / "runs").glob("hostfile.*"):
            hostfile.unlink(missing_ok=True)


def psutil_cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return []
