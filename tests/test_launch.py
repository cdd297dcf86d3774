"""The launch scripts: argument checks, dry runs against DeepSpeed's own runner, and real launches
(mpirun with mpi4py discovery; two simulated nodes with --no-ssh; a node that dies)."""

import json
import os
import shlex
import signal
import subprocess
import time

import pytest

from tests.launching import BIN, REPO, free_port, run_checked, tiny_train_args

LAUNCH = REPO / "launch"


def script(name, *args, env=None, check=False):
    return subprocess.run([str(LAUNCH / name), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, check=check)


def test_train_sh_dry_run_passes_arguments_through_unchanged():
    out = script("train.sh", "--dry-run", "--nproc", "3", "--preset", "vit_fmnist", "--",
                 "--set", "train.output_dir=/tmp/a b", "moe.gs_weight=0", check=True).stdout
    argv = shlex.split(out)
    assert argv[:3] == [str(BIN / "deepspeed"), "--num_gpus", "3"]
    assert argv[-3:] == ["--set", "train.output_dir=/tmp/a b", "moe.gs_weight=0"]
    assert str(REPO / "configs/vit_fmnist.yaml") in argv


@pytest.mark.parametrize("args, message", [
    (["--nproc", "zero"], "--nproc must be a positive integer, got 'zero'"),
    (["--preset", "nope"], "no config 'nope': give a file or one of: gpt_tiny mixtral_tiny vit_fmnist"),
    (["--ds-config", "/nope.json"], "ds_config '/nope.json' does not exist"),
])
def test_train_sh_rejects_bad_input(args, message):
    result = script("train.sh", *args)
    assert result.returncode == 2 and message in result.stderr


def test_train_sh_refuses_a_busy_port():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = script("train.sh", "--master-port", str(busy.getsockname()[1]))
    assert result.returncode == 2 and "is in use" in result.stderr


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nnode1 slots=2\nnode2 slots=2\n")
    return path


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi", "mpich", "slurm"])
def test_multinode_dry_run_matches_deepspeeds_runner(launcher, hostfile):
    from deepspeed.launcher import runner as ds

    user_args = ["--set", "train.output_dir=/tmp/a b"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(ds.EXPORT_ENVS))}
    env["PATH"] = f"{BIN}:{os.environ['PATH']}"
    result = subprocess.run([str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), "--launcher", launcher,
                             "--master-addr", "10.0.0.1", "--dry-run", "--", *user_args], capture_output=True,
                            text=True, cwd=REPO, env=env, check=True)
    ours = next(line for line in result.stdout.splitlines() if line.startswith("backend: "))[len("backend: "):]

    # The same launch built directly from DeepSpeed's runner classes.
    args = ds.parse_args(["--hostfile", str(hostfile), "--launcher", launcher, "--master_addr", "10.0.0.1",
                          "--master_port", "29500", str(LAUNCH / "moge_train.py"), "--config",
                          str(REPO / "configs/gpt_tiny.yaml"), "--deepspeed_config",
                          str(REPO / "ds_configs/zero2_bf16.json"), *user_args])
    pool = ds.fetch_hostfile(str(hostfile))
    active = ds.parse_inclusion_exclusion(pool, "", "")
    world_info = ds.encode_world_info(active)
    runner = {"pdsh": lambda: ds.PDSHRunner(args, world_info),
              "openmpi": lambda: ds.OpenMPIRunner(args, world_info, pool),
              "mpich": lambda: ds.MPICHRunner(args, world_info, pool),
              "slurm": lambda: ds.SlurmRunner(args, world_info, pool)}[launcher]()
    runner.add_export("PYTHONPATH", str(REPO))
    built = runner.get_cmd(dict(env), active)
    cmd = built[0] if launcher == "pdsh" else built
    assert _normalised(shlex.split(ours)) == _normalised(cmd)
    assert f"PYTHONPATH={REPO}" in ours.replace("\\", "")


def _normalised(argv):
    """Python interpreter paths as one token, and the exported variables (pdsh 'export X=..;',
    mpirun -x X=.. / -genv X=.., srun --export=..) dropped: DeepSpeed adds those from its own
    environment. Launch settings such as mpich's '-genv MASTER_ADDR <addr>' stay."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in ("-x", "-genv") and "=" in argv[i + 1]:
            i += 2
            continue
        if not token.startswith(("export ", "--export=")):
            is_python = os.path.basename(token).startswith("python") and os.path.isfile(token)
            out.append("<python>" if is_python else token)
        i += 1
    return out


@pytest.mark.parametrize("content, message", [
    ("node1 slotz=2\n", "line 1: 'node1 slotz=2' is not 'host slots=N'"),
    ("# nothing\n", "lists no hosts"),
    ("node1 slots=3\n", "3 slots in all, not a multiple of moe.ep_size 2"),
])
def test_multinode_rejects_bad_hostfiles(tmp_path, content, message):
    path = tmp_path / "hostfile"
    path.write_text(content)
    result = script("multinode.sh", "--hostfile", str(path), "--dry-run")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_multinode_checks_its_arguments(tmp_path, hostfile):
    missing = script("multinode.sh", "--hostfile", str(tmp_path / "none"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    rank = script("multinode.sh", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "2", "--master-addr", "x")
    assert rank.returncode == 2 and "--node-rank between 0 and 1, got '2'" in rank.stderr
    launcher = script("multinode.sh", "--hostfile", str(hostfile), "--launcher", "ssh")
    assert launcher.returncode == 2 and "--launcher must be pdsh" in launcher.stderr


@pytest.mark.parametrize("name", ["train.sh", "multinode.sh", "mpi.sh"])
def test_help_is_the_usage_text(name):
    result = script(name, "--help", check=True)
    assert "--dry-run" in result.stdout and "set -euo" not in result.stdout and "source " not in result.stdout
    assert not any(line.startswith("#") for line in result.stdout.splitlines())


def test_multinode_keeps_going_with_a_blank_deepspeed_env(tmp_path, hostfile):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("\n   \n")
    result = script("multinode.sh", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "0", "--master-addr",
                    "10.0.0.1", "--dry-run", env={"HOME": str(home)})
    assert result.returncode == 0 and result.stdout.startswith("launcher: "), result.stderr


@pytest.mark.slow
def test_mpirun_with_mpi4py_discovery(workspace, tmp_path):
    out = tmp_path / "mpi"
    run_checked([str(LAUNCH / "mpi.sh"), "--np", "2", "--master-port", str(free_port()),
                 *tiny_train_args(workspace, out)], cwd=REPO, timeout=300)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and (out / "checkpoints" / "latest").is_file()


def start_two_nodes(workspace, tmp_path, out, steps):
    """Two launchers with --no-ssh on this machine, node ranks 0 and 1, one rank each."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = free_port()
    return [start_node(workspace, hostfile, rank, port, out, steps) for rank in (0, 1)]


def start_node(workspace, hostfile, rank, port, out, steps):
    return subprocess.Popen([str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), "--no-ssh", "--node-rank",
                             str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                             *tiny_train_args(workspace, out, steps)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_simulated_nodes_train_and_checkpoint(workspace, tmp_path):
    out = tmp_path / "two_nodes"
    nodes = start_two_nodes(workspace, tmp_path, out, 3)
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"


@pytest.mark.slow
def test_a_dead_node_fails_the_other_in_bounded_time(workspace, tmp_path):
    out = tmp_path / "dying"
    nodes = start_two_nodes(workspace, tmp_path, out, 100000)
    history = out / "history.jsonl"
    deadline = time.time() + 240
    while not (history.is_file() and history.read_text().count("\n") >= 2):
        assert time.time() < deadline and nodes[0].poll() is None, "training never started"
        time.sleep(1)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    killed = time.time()
    try:
        output = nodes[0].communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(nodes[0].pid, signal.SIGKILL)
        pytest.fail("the surviving node hung for 120 s after its peer died")
    assert nodes[0].returncode != 0
    detection = time.time() - killed
    print(f"surviving node exited {detection:.1f} s after its peer was killed")
    assert detection < 120
    assert any(word in output for word in ("Connection closed", "Connection reset", "timed out", "Timeout",
                                           "peer", "exits with return code")), output[-3000:]
