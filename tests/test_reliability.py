"""Bad input, frozen ranks, stopped launchers, dry runs: every one ends in one clear paragraph, in
bounded time, with nothing written or lost. Real processes throughout (no mocks)."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import LlamaConfig

from moge_ds.data.documents import SourceSpec
from moge_ds.data.preprocess import preprocess
from moge_ds.data.tokenizer import train_tokenizer
from moge_ds.train import LOCK_FILE
from tests.launching import BIN, REPO, TINY, free_port, launch_deepspeed, make_corpus, tiny_train_args

pytestmark = pytest.mark.slow

LAUNCH = REPO / "launch"
ONE_RANK = [o for o in TINY if not o.startswith("moe.ep_size")] + ["moe.ep_size=1"]


def one_rank_env() -> dict:
    """What a launcher gives a lone rank."""
    return {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}


def train_cmd(workspace, out, *overrides, ds=None, config="gpt_tiny.yaml", flags=()):
    """``python -m moge_ds.train`` as one rank on the workspace's data."""
    return [sys.executable, "-m", "moge_ds.train", "--config", str(REPO / "configs" / config),
            "--deepspeed_config", str(ds or workspace / "ds.json"), *flags, "--set", *ONE_RANK,
            f"data.prefixes=[{workspace / 'text'}]", f"data.tokenizer={workspace / 'tok.model'}",
            "model.seq_length=32", "data.split=80,10,10", "train.steps=2", f"train.output_dir={out}", *overrides]


@dataclass
class Case:
    """One bad input: the command, the message it must print, the path it must leave as it was."""

    name: str
    cmd: list
    message: str
    untouched: Path
    env: dict = field(default_factory=one_rank_env)


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its size, mtime and contents' hash, and every directory (empty
    when ``path`` does not exist). Not a directory's mtime: an --overwrite that moved the earlier run
    aside and back changes it, not what the directory holds. Not the run directory's lock file: a
    start that claimed the directory records its holder there."""
    if not path.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(path.rglob("*")) if p.name != LOCK_FILE}


def ds_variant(workspace, tmp, name, change) -> Path:
    ds = json.loads((workspace / "ds.json").read_text())
    change(ds)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.fixture(scope="module")
def earlier_run(workspace, tmp_path_factory):
    """A finished 2-step, 1-rank run with a checkpoint: what the data-loss cases must not harm."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    subprocess.run(train_cmd(workspace, out), env=one_rank_env(), check=True, capture_output=True, timeout=300)
    return out


def small_corpus(workspace, tmp, docs: int) -> Path:
    corpus = tmp / f"corpus{docs}"
    corpus.mkdir()
    make_corpus(corpus, docs=docs, seed=docs)
    preprocess(SourceSpec((str(corpus / "*.txt"), )), str(workspace / "tok.model"), str(tmp / f"small{docs}"),
               progress=False)
    return tmp / f"small{docs}"


def bad_input_cases(workspace, tmp, earlier, exported) -> list[Case]:
    fresh = tmp / "never"
    other_tok = other_tokenizer(workspace, tmp)
    cases = [Case(name, train_cmd(workspace, fresh, *overrides), message, fresh) for name, overrides, message in [
        ("log interval 0", ["train.log_interval=0"], "train.log_interval must be >= 1, got 0"),
        ("no heads", ["model.heads=0"], "model.heads must be >= 1, got 0"),
        ("sequence length 0", ["model.seq_length=0"], "model.seq_length must be >= 1, got 0"),
        ("negative capacity", ["moe.capacity_factor=-1"], "moe.capacity_factor must be >= 0, got -1.0"),
        ("negative save interval", ["train.save_interval=-1"], "train.save_interval must be >= 0, got -1"),
        ("negative gs_weight", ["moe.gs_weight=-1e-3"], "moe.gs_weight must be >= 0, got -0.001"),
        ("top-k 0", ["moe.top_k=0"], r"moe.top_k must be in \[1, 4\], got 0"),
        ("misspelled setting", ["moe.gs_wieght=1"], "unknown setting moe.gs_wieght"),
        ("wrong type", ["model.dim=wide"], "model.dim must be int, got 'wide'"),
        ("map does not fit", ["moe.map_shape=[3,3]"], r"map_shape \(3, 3\) does not fit 4 experts"),
        ("lambda without aux weight", ["moe.gs_lambda=1e-5", "moe.aux_loss_weight=0"], "aux_loss_weight > 0"),
        ("lambda and weight", ["moe.gs_lambda=1e-5", "moe.gs_weight=3"], "are both set"),
        ("a split with no share", ["data.split=100,0,0"], "gives the valid split no share"),
        ("blend weights for one prefix", ["data.weights=[1,2]"], "2 blend weights for 1 datasets"),
        ("a zero blend weight", ["data.weights=[0]"], r"data.weights must be finite and > 0, got \[0.0\]"),
    ]]
    cases += [
        Case("missing config file", train_cmd(workspace, fresh, config="nope.yaml"), "nope.yaml' does not exist",
             fresh),
        Case("missing ds_config", train_cmd(workspace, fresh, ds=tmp / "nope.json"), "nope.json' does not exist",
             fresh),
        Case("misspelled ZeRO key", train_cmd(workspace, fresh, ds=ds_variant(
            workspace, tmp, "stgae", lambda d: d["zero_optimization"].update(stgae=2))), "stgae", fresh),
        Case("misspelled optimizer parameter", train_cmd(workspace, fresh, ds=ds_variant(
            workspace, tmp, "lrr", lambda d: d["optimizer"]["params"].update(lrr=1e-3))),
            r"unknown params \['lrr'\]", fresh),
        Case("unknown ds_config section", train_cmd(workspace, fresh, ds=ds_variant(
            workspace, tmp, "section", lambda d: d.update(zero_optimisation={}))), "unknown keys", fresh),
        Case("micro-batch 0", train_cmd(workspace, fresh, ds=ds_variant(
            workspace, tmp, "micro", lambda d: d.update(train_micro_batch_size_per_gpu=0))),
            "train_micro_batch_size_per_gpu as a positive integer", fresh),
        Case("batch arithmetic", train_cmd(workspace, fresh, ds=ds_variant(
            workspace, tmp, "batch", lambda d: d.update(train_batch_size=7))), "train_batch_size 7 !=", fresh),
        Case("3-document corpus", train_cmd(workspace, fresh, f"data.prefixes=[{small_corpus(workspace, tmp, 3)}]"),
             f"smallest split holds.*({SPLIT_THAT_WORKS}|No data.split of these 3 documents)", fresh),
        Case("17-document corpus", train_cmd(workspace, fresh, "data.split=98,1,1",
                                             f"data.prefixes=[{small_corpus(workspace, tmp, 17)}]"),
             f"gives the valid split 0 of 17 documents.*{SPLIT_THAT_WORKS}", fresh),
        Case("another tokenizer", train_cmd(workspace, fresh, f"data.tokenizer={other_tok}"),
             "was tokenized by .*tok.model", fresh),
        Case("data from a larger tokenizer", train_cmd(workspace, fresh, f"data.tokenizer={other_tok}",
                                                       f"data.prefixes=[{unrecorded_data(workspace, tmp)}]"),
             r"unrecorded.bin holds token id \d+, but data.tokenizer .*other_tok.model has 290 tokens", fresh),
        Case("run directory in use", train_cmd(workspace, earlier), "holds an earlier run", earlier),
        Case("resume and overwrite", train_cmd(workspace, earlier, flags=["--resume", "--overwrite"]),
             "contradict", earlier),
        Case("latest names a missing tag", train_cmd(workspace, broken_latest(earlier, tmp), flags=["--resume"]),
             "names step00000009, but .* holds no complete checkpoint", tmp / "latest_run"),
        Case("truncated checkpoint file", train_cmd(workspace, truncated_checkpoint(earlier, tmp),
                                                    flags=["--resume"]),
             "damaged checkpoint files: .*mp_rank_00_model_states.pt", tmp / "truncated_run"),
    ]
    cases += tool_cases(workspace, tmp) + checkpoint_tool_cases(earlier, tmp) + model_tool_cases(exported) + \
        data_tool_cases(workspace, tmp) + config_file_cases(workspace, tmp) + \
        analysis_and_sweep_cases(workspace, tmp, exported) + init_from_cases(workspace, tmp, earlier, exported)
    return [own_run_directory(case, fresh, i) for i, case in enumerate(cases)]


def own_run_directory(case: Case, fresh: Path, index: int) -> Case:
    """The case with its own never-created run directory: cases run two at a time, and two that reached
    the run-directory lock together would meet there ("in use by another run") instead of their error."""
    def own(text: str) -> str:
        return text.replace(str(fresh), f"{fresh}{index}")
    return dataclasses.replace(case, cmd=[own(str(arg)) for arg in case.cmd], untouched=Path(own(str(case.untouched))))


# A split suggested to a corpus too small for the one given: not the "80,10,10" every case was given.
SPLIT_THAT_WORKS = r'data.split="(?!80,10,10")\d+,\d+,\d+" works'


def unrecorded_data(workspace, tmp) -> Path:
    """The workspace's data without its tokenizer record, as preprocessing wrote it before it kept one."""
    for suffix in (".bin", ".idx"):
        shutil.copy(workspace / f"text{suffix}", tmp / f"unrecorded{suffix}")
    return tmp / "unrecorded"


def model_tool_cases(exported: Path) -> list[Case]:
    """evaluate and generate with counts that would measure or generate nothing, or sample wrongly."""
    evaluate = [sys.executable, "-m", "moge_ds.evaluate", str(exported)]
    generate = [sys.executable, "-m", "moge_ds.generate", str(exported), "--prompt"]
    return [Case(name, cmd, message, exported) for name, cmd, message in [
        ("evaluate --batches 0", [*evaluate, "--batches", "0"], r"--batches must be >= 1 .*got 0$"),
        ("evaluate --batches -3", [*evaluate, "--batches=-3"], r"--batches must be >= 1 .*got -3$"),
        ("evaluate --micro-batch 0", [*evaluate, "--micro-batch", "0"], r"--micro-batch must be >= 1, got 0$"),
        ("generate --tokens -1", [*generate, "The list", "--tokens=-1"], r"--tokens must be >= 1 .*got -1$"),
        ("generate --temperature -1", [*generate, "The list", "--temperature=-1"],
         r"--temperature must be a finite number >= 0 \(0: greedy\), got -1.0$"),
        ("generate --top-k -5", [*generate, "The list", "--top-k=-5"], r"--top-k must be >= 1, or 0 .*got -5$"),
        ("generate --prompt ''", [*generate, ""], "--prompt is empty"),
    ]]


def data_tool_cases(workspace, tmp) -> list[Case]:
    """The tokenizer and preprocessing CLIs with sizes sentencepiece or the pool would not take."""
    train = [sys.executable, "-m", "moge_ds.data.tokenizer", "train", "--input", str(workspace / "corpus" / "*.txt"),
             "--model-prefix", str(tmp / "tok_never" / "tok")]
    decode = [sys.executable, "-m", "moge_ds.data.tokenizer", "decode", "--model", str(workspace / "tok.model")]
    prep = [sys.executable, "-m", "moge_ds.data.preprocess", "--tokenizer", str(workspace / "tok.model"), "--input",
            str(workspace / "corpus" / "*.txt"), "--output-prefix", str(tmp / "prep_never" / "out")]
    cases = [Case(name, cmd, message, tmp / "tok_never") for name, cmd, message in [
        ("tokenizer --vocab-size 0", [*train, "--vocab-size", "0"], r"vocab_size \(--vocab-size\) must be >= 8, got 0"),
        ("tokenizer --character-coverage 2", [*train, "--character-coverage", "2"],
         r"--character-coverage\) must be in \[0.98, 1\] .*got 2.0"),
        ("tokenizer --input-sentence-size -5", [*train, "--input-sentence-size=-5"],
         r"--input-sentence-size\) must be >= 0 .*got -5"),
        ("decode a word", [*decode, "abc"], "decode takes token ids, integers in 0..299 .*got 'abc'"),
        ("decode an unknown id", [*decode, "99999"], "decode takes token ids, integers in 0..299 .*got '99999'"),
    ]]
    existing = tmp / "existing_tokenizer"
    existing.mkdir()
    shutil.copyfile(workspace / "tok.model", existing / "tok.model")
    retrain = [*train[:-1], str(existing / "tok")]
    return cases + [Case("preprocess --workers 0", [*prep, "--workers", "0"], r"--workers must be >= 1 .*got 0",
                         tmp / "prep_never"),
                    Case("tokenizer over an existing model", retrain,
                         r"tok.model exists .* --overwrite to replace it", existing)]


def other_tokenizer(workspace, tmp) -> Path:
    tok = train_tokenizer(SourceSpec((str(workspace / "corpus" / "*.txt"), )), str(tmp / "other_tok"), vocab_size=290,
                          input_sentence_size=0)
    return tok.path


def broken_latest(earlier: Path, tmp: Path) -> Path:
    run = tmp / "latest_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000009")
    return run


def truncated_checkpoint(earlier: Path, tmp: Path) -> Path:
    run = tmp / "truncated_run"
    shutil.copytree(earlier, run)
    tag = (run / "checkpoints" / "latest").read_text()
    model = run / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:2000])
    return run


def tool_cases(workspace, tmp) -> list[Case]:
    """The launch scripts and the data CLIs."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots two\n")
    (tmp / "empty").mkdir()
    (tmp / "fake.parquet").write_text("not parquet at all\n")
    prep = [sys.executable, "-m", "moge_ds.data.preprocess", "--tokenizer", str(workspace / "tok.model")]
    existing = tmp / "existing_data"
    existing.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copyfile(workspace / f"text{ext}", existing / f"text{ext}")
    out = tmp / "prep"
    return [
        Case("malformed hostfile line", [str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), "--", "--set",
                                         f"train.output_dir={tmp / 'never'}"],
             "line 2: 'node2 slots two' is not 'host slots=N'", tmp / "never"),
        Case("empty corpus", [*prep, "--input", str(tmp / "empty" / "*.txt"), "--output-prefix", str(out)],
             "matches no file", out),
        Case("not Parquet", [*prep, "--input", str(tmp / "fake.parquet"), "--output-prefix", str(out)],
             "is not a Parquet file", out),
        Case("preprocess over an existing dataset", [*prep, "--input", str(workspace / "corpus" / "*.txt"),
                                                     "--output-prefix", str(existing / "text")],
             r"text.bin and .*text.idx exist .* --overwrite to replace them", existing),
        Case("bad document separator", [*prep, "--input", str(workspace / "corpus" / "*.txt"), "--doc-separator",
                                        "(%", "--output-prefix", str(out)], "is not a regular expression", out),
    ]


def checkpoint_tool_cases(earlier: Path, tmp: Path) -> list[Case]:
    """Export and universal conversion pointed at what an earlier command wrote."""
    prior_export = tmp / "prior_export"
    prior_export.mkdir()
    (prior_export / "model.safetensors").write_text("an earlier export")
    hf_model = tmp / "mixtral_tiny"
    shutil.copytree(REPO / "configs/hf/mixtral_tiny", hf_model)
    export = [sys.executable, "-m", "moge_ds.export", str(earlier / "checkpoints")]
    return [
        Case("export over an export", [sys.executable, "-m", "moge_ds.export", str(earlier / "checkpoints"), "--out",
                                       str(prior_export)], "already holds an export", prior_export),
        Case("universal conversion into a run", [sys.executable, "-m", "moge_ds.universal",
                                                 str(earlier / "checkpoints"), "--out", str(earlier / "checkpoints")],
             "already holds checkpoints", earlier),
        Case("export into its own run directory", [*export, "--out", str(earlier)], "is not empty .*config.json",
             earlier),
        Case("export into a Hugging Face model", [*export, "--out", str(hf_model)], "is not empty .*config.json",
             hf_model),
        Case("universal conversion of a gpt run", [sys.executable, "-m", "moge_ds.universal",
                                                   str(earlier / "checkpoints"), "--out", str(tmp / "universal")],
             "gpt and vit checkpoints need no conversion", tmp / "universal"),
    ]


def analysis_and_sweep_cases(workspace, tmp, exported) -> list[Case]:
    """moge_ds.analysis, moge_ds.experiments and a Hugging Face model that AutoEP cannot take."""
    (tmp / "bogus_sweep.yaml").write_text("name: x\npreset: configs/vit_fmnist.yaml\nbogus: 1\n")
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=300).save_pretrained(tmp / "dense_llama")
    analysis = [sys.executable, "-m", "moge_ds.analysis"]
    sweep = [sys.executable, "-m", "moge_ds.experiments", "report"]
    fresh = tmp / "never_hf"
    return [
        Case("analysis of a missing export", [*analysis, str(tmp / "nope"), "--out", str(tmp / "an")],
             "is not an export: it needs model.safetensors", tmp / "an"),
        Case("invariance of a language model", [*analysis, str(exported), "--invariance", "--out", str(tmp / "an")],
             "is a 'gpt' export: the invariance measures need a ViT", tmp / "an"),
        Case("a missing sweep file", [*sweep, str(tmp / "nope.yaml")], "nope.yaml does not exist", tmp / "an"),
        Case("a sweep with an unknown key", [*sweep, str(tmp / "bogus_sweep.yaml")], r"unknown keys \['bogus'\]",
             tmp / "an"),
        Case("a dense Hugging Face model", train_cmd(workspace, fresh, "model.kind=hf",
                                                     f"model.hf_path={tmp / 'dense_llama'}", "model.hf_init=random"),
             "'llama' has no DeepSpeed AutoEP preset", fresh),
    ]


def init_from_cases(workspace, tmp, earlier, exported) -> list[Case]:
    """Upcycling, and a run started from an export (model.init_from): refused before anything is
    written, and a mismatch found only once the model is built leaves an --overwrite'd earlier run whole."""
    fresh = tmp / "never_init"
    upcycle = [sys.executable, "-m", "moge_ds.upcycle", str(exported), "--num-experts", "4"]
    return [
        Case("upcycle a MoE export", [*upcycle, "--top-k", "2", "--out", str(tmp / "up")],
             r"the export already has MoE blocks \(moe.placement 'every_other'\)", tmp / "up"),
        Case("upcycle into a run directory", [*upcycle, "--top-k", "2", "--out", str(earlier)],
             "is not empty .*upcycling writes a new directory", earlier),
        Case("init_from not an export", train_cmd(workspace, fresh, f"model.init_from={tmp}"),
             r"model.init_from '.*' is not an export \(it lacks \['model.safetensors', 'config.json'\]\)", fresh),
        Case("init_from another model's export", train_cmd(workspace, earlier, "model.dim=64",
                                                           f"model.init_from={exported}", flags=["--overwrite"]),
             r"model.init_from error: .* does not match this model: .*shape mismatches \['embed.weight", earlier),
    ]


def config_file_cases(workspace, tmp) -> list[Case]:
    """Config files a hand could break: YAML with a tab or a bad indent, a NaN learning rate, a
    collective timeout of 0 (each refused before torch.distributed starts)."""
    fresh = tmp / "never_config"
    (tmp / "tab.yaml").write_text("model:\n\tdim: 32\n")
    (tmp / "indent.yaml").write_text("model:\n  dim: 32\n heads: 2\n")
    nan_lr = ds_variant(workspace, tmp, "nan_lr", lambda d: d["optimizer"]["params"].update(lr=float("nan")))
    return [
        Case("config YAML with a tab", train_cmd(workspace, fresh, config=str(tmp / "tab.yaml")),
             r"tab.yaml is not valid YAML at line 2, column 1: .*tab", fresh),
        Case("config YAML with a bad indent", train_cmd(workspace, fresh, config=str(tmp / "indent.yaml")),
             "indent.yaml is not valid YAML at line 3", fresh),
        Case("NaN learning rate", train_cmd(workspace, fresh, ds=nan_lr),
             "optimizer.params.lr is nan: it must be a finite number", fresh),
        Case("collective timeout 0", train_cmd(workspace, fresh, "train.dist_timeout_s=0"),
             "train.dist_timeout_s must be >= 1, got 0", fresh),
    ]


@pytest.fixture(scope="module")
def earlier_export(earlier_run, tmp_path_factory):
    """The earlier run exported: what evaluate and generate read and must not write into."""
    out = tmp_path_factory.mktemp("export") / "export"
    subprocess.run([sys.executable, "-m", "moge_ds.export", str(earlier_run / "checkpoints"), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def outcomes(workspace, earlier_run, earlier_export, tmp_path_factory):
    """Every case run once, two at a time; per case: exit status, output, seconds, and whether the
    path it must not touch was left as it was."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = bad_input_cases(workspace, tmp, earlier_run, earlier_export)

    def run(case: Case):
        before = snapshot(case.untouched)
        started = time.monotonic()
        try:
            proc = subprocess.run(case.cmd, env=case.env, capture_output=True, text=True, timeout=300, cwd=tmp)
        except subprocess.TimeoutExpired as err:  # a hang: reported by this case's test, not the whole table
            proc = subprocess.CompletedProcess(case.cmd, None, str(err.stdout or ""), f"hung: {err}")
        return case, proc, time.monotonic() - started, snapshot(case.untouched) == before

    with ThreadPoolExecutor(2) as pool:
        return {result[0].name: result for result in pool.map(run, cases)}


CASE_NAMES = [
    "log interval 0", "no heads", "sequence length 0", "negative capacity", "negative save interval",
    "negative gs_weight", "top-k 0", "misspelled setting", "wrong type", "map does not fit",
    "lambda without aux weight", "lambda and weight", "a split with no share", "missing config file",
    "missing ds_config", "misspelled ZeRO key", "misspelled optimizer parameter", "unknown ds_config section",
    "micro-batch 0", "batch arithmetic", "3-document corpus", "17-document corpus", "another tokenizer",
    "run directory in use", "resume and overwrite", "latest names a missing tag", "truncated checkpoint file",
    "malformed hostfile line", "empty corpus", "not Parquet", "bad document separator",
    "blend weights for one prefix", "a zero blend weight", "data from a larger tokenizer", "evaluate --batches 0",
    "evaluate --batches -3", "evaluate --micro-batch 0", "generate --tokens -1", "generate --temperature -1",
    "generate --top-k -5", "generate --prompt ''", "tokenizer --vocab-size 0", "tokenizer --character-coverage 2",
    "tokenizer --input-sentence-size -5", "decode a word", "decode an unknown id", "preprocess --workers 0",
    "export over an export", "universal conversion into a run", "export into its own run directory",
    "export into a Hugging Face model", "universal conversion of a gpt run", "config YAML with a tab",
    "config YAML with a bad indent", "NaN learning rate", "collective timeout 0", "analysis of a missing export",
    "invariance of a language model", "a missing sweep file", "a sweep with an unknown key",
    "a dense Hugging Face model", "preprocess over an existing dataset", "tokenizer over an existing model",
    "init_from not an export", "init_from another model's export", "upcycle a MoE export",
    "upcycle into a run directory"]


def test_every_case_is_checked(outcomes):
    """The table's cases and the parametrised names agree: no case runs without its checks; and
    every command-line tool has cases."""
    assert sorted(outcomes) == sorted(CASE_NAMES)
    per_tool = Counter(next((arg for arg in case.cmd if arg.startswith("moge_ds.")), case.cmd[0])
                       for case, *_ in outcomes.values())
    print(f"bad-input cases per tool ({len(outcomes)}): {dict(sorted(per_tool.items()))}")
    tools = ("train", "export", "evaluate", "generate", "universal", "analysis", "experiments", "data.tokenizer",
             "data.preprocess", "upcycle")
    assert all(per_tool[f"moge_ds.{tool}"] for tool in tools), per_tool


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_paragraph_and_writes_nothing(outcomes, name):
    case, proc, seconds, untouched = outcomes[name]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{output[-3000:]}"
    assert re.search(case.message, proc.stderr), f"{name}: message missing\n{proc.stderr[-3000:]}"
    assert "Traceback" not in output, f"{name}: a traceback\n{output[-3000:]}"
    assert untouched, f"{name}: changed what it must leave alone"
    assert seconds < 60, f"{name}: took {seconds:.0f} s"



def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (read from /proc, this machine's real processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and entry.name != str(os.getpid()):
                pids.append(int(entry.name))
    return pids


def wait_for_training(out: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "history.jsonl").is_file() or not (out / "history.jsonl").read_text().strip():
        assert proc.poll() is None, f"the run ended early:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)


def test_sigterm_to_the_launcher_stops_every_rank(workspace, tmp_path):
    out = tmp_path / "sigterm"
    proc = subprocess.Popen([str(LAUNCH / "train.sh"), "--nproc", "2", "--master-port", str(free_port()),
                             *tiny_train_args(workspace, out, steps=100000)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_training(out, proc)
        assert len(processes_mentioning(str(out))) >= 2  # the ranks run
        proc.send_signal(signal.SIGTERM)  # what Slurm sends at the time limit
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_mentioning(str(out)) == [], "ranks outlived the launcher"
    finally:
        for pid in processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)


def test_a_frozen_rank_ends_the_job_within_the_timeout(workspace, tmp_path):
    """SIGSTOP one rank (a hung GPU or an NFS stall looks like that): the other gives up after
    train.dist_timeout_s, on DeepSpeed's expert-parallel group too, with one paragraph saying so."""
    out, timeout_s = tmp_path / "frozen", 20
    args = [a if not a.startswith("train.dist_timeout_s") else f"train.dist_timeout_s={timeout_s}"
            for a in tiny_train_args(workspace, out, steps=100000)]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "moge_ds.train", *[a for a in args[:4]], *args[5:]]
    cmd[cmd.index("--ds-config")] = "--deepspeed_config"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_training(out, proc)
        rank1 = [p for p in processes_mentioning(str(out)) if "--local_rank=1" in Path(f"/proc/{p}/cmdline")
                 .read_bytes().replace(b"\0", b" ").decode()]
        assert len(rank1) == 1
        rank0 = [p for p in processes_mentioning(str(out)) if "--local_rank=0" in Path(f"/proc/{p}/cmdline")
                 .read_bytes().replace(b"\0", b" ").decode()]
        os.kill(rank1[0], signal.SIGSTOP)
        frozen_at = time.monotonic()
        while rank0[0] in processes_mentioning(str(out)):
            assert time.monotonic() - frozen_at < timeout_s + 15, "rank 0 waited past train.dist_timeout_s"
            time.sleep(0.2)
        # DeepSpeed's launcher would give the frozen rank its fixed 30 s to stop before SIGKILL: do it now.
        os.kill(rank1[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "rank 0: a collective failed" in output and "train.dist_timeout_s" in output, output[-3000:]
        assert "Traceback" not in output.split("rank 0: a collective failed")[0][-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)


def test_a_dry_run_never_starts_a_rank(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "dry"
    result = subprocess.run([str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), "--dry-run", "--",
                             "--set", f"train.output_dir={out}"], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("launcher: ") and "moge_train.py" in result.stdout
    time.sleep(2)
    assert not out.exists() and processes_mentioning(str(out)) == []


def test_trainer_and_evaluate_agree_on_every_split(workspace, tmp_path):
    """Same samples, same tokens, same loss: 2 ranks of micro-batch 4 in training, 1 process of 8 here."""
    from moge_ds.evaluate import evaluate
    from moge_ds.export import export

    out = tmp_path / "agree"
    routing = ["moe.drop_tokens=false", "moe.top2_2nd_expert_sampling=false", "train.steps=3"]
    launch_deepspeed(["--module", "moge_ds.train", "--config", str(REPO / "configs/gpt_tiny.yaml"),
                      "--deepspeed_config", str(workspace / "ds.json"), *tiny_train_args(workspace, out)[5:],
                      *routing], cwd=REPO)
    trained = json.loads((out / "metrics.json").read_text())
    exported = export(out / "checkpoints", tmp_path / "export")
    for split in ("valid", "test"):
        ours = evaluate(exported, split, micro_batch=8)
        assert ours["tokens"] == trained[split]["tokens"], (split, ours, trained[split])
        assert ours["loss"] == pytest.approx(trained[split]["loss"], rel=1e-4), (split, ours, trained[split])


def test_a_failed_save_is_one_paragraph(workspace, tmp_path):
    """A save that cannot be written (here a file where the tag directory goes; a full disk is reported the
    same way) ends the run with the path and the free space, not a traceback."""
    out = tmp_path / "save"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step00000001").write_text("in the way")
    proc = subprocess.run(train_cmd(workspace, out, "train.save_interval=1", "train.steps=3", flags=["--resume"]),
                          env=one_rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(r"rank 0: checkpoint error: cannot write checkpoint .*step00000001: .* GiB free", proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
