"""Upcycling dense Hugging Face models (``moge_ds.upcycle``): exact at step 0, loads without fresh
weights, streams one layer per shard, and refuses bad input with one line and exit status 2."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config,
                          Qwen3Config)

from moge_ds.upcycle import INDEX_FILE, Options, main, upcycle
from tests.launching import REPO, train

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SOURCES = {  # each dense family, with one feature that the MoE format must carry over exactly
    "llama": LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "mistral": MistralConfig(**SHAPE, sliding_window=4),  # shorter than the test sequence: it matters
    "qwen3": Qwen3Config(**SHAPE),
    "qwen2": Qwen2Config(**{k: v for k, v in SHAPE.items() if k != "head_dim"}),
}
TOKENS = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Each source saved as a dense model directory (qwen3 sharded, with an index) beside its model."""
    root = tmp_path_factory.mktemp("dense")
    models = {}
    for name, config in SOURCES.items():
        torch.manual_seed(0)
        models[name] = AutoModelForCausalLM.from_config(config).eval()
        models[name].save_pretrained(root / name, max_shard_size="20KB" if name == "qwen3" else "5GB")
        (root / name / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return root, models


def load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, local_files_only=True)
    assert not any(info.values()), info  # no missing key: no weight was freshly initialised
    return model.eval()


def rel_diff(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def assert_weights_are_copies(moe, dense_model, out):
    """Every weight of the loaded MoE model is the dense one's, an exact expert copy, or the written router."""
    own = dense_model.state_dict()
    written = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        written.update(load_file(shard))
    for name, value in moe.state_dict().items():
        layer = name.split(".mlp.")[0]
        if name in own:
            expected = own[name]
        elif name.endswith("experts.gate_up_proj"):
            expected = torch.cat([own[f"{layer}.mlp.gate_proj.weight"], own[f"{layer}.mlp.up_proj.weight"]])
        elif name.endswith("experts.down_proj"):
            expected = own[f"{layer}.mlp.down_proj.weight"]
        elif name.endswith("mlp.gate.weight"):
            expected = next(v for k, v in written.items() if k.startswith(layer) and k.endswith(".gate.weight"))
        else:
            assert "shared_expert" in name and value.abs().sum() == 0, name
            continue
        assert torch.equal(value, expected.expand_as(value)), name


@pytest.mark.parametrize("router_init", ["zeros", "normal"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_logits_and_loss_equal_the_dense_model(dense, tmp_path, source, router_init):
    root, models = dense
    out = upcycle(root / source, tmp_path / "moe", Options(num_experts=4, top_k=2, router_init=router_init, seed=3))
    moe = load(out)
    assert moe.config.model_type == {"llama": "mixtral", "mistral": "mixtral"}.get(source, source + "_moe")
    assert_weights_are_copies(moe, models[source], out)
    with torch.no_grad():
        want, got = models[source](TOKENS, labels=TOKENS), moe(TOKENS, labels=TOKENS)
    assert rel_diff(want.logits, got.logits) <= 1e-5
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    routers = [v for k, v in moe.state_dict().items() if k.endswith("mlp.gate.weight")]
    assert all((r.abs().sum() > 0) == (router_init == "normal") for r in routers)


def test_noise_makes_a_small_measured_difference(dense, tmp_path):
    root, models = dense
    diffs = {}
    for noise in (1e-3, 1e-2):
        moe = load(upcycle(root / "llama", tmp_path / f"moe{noise}", Options(4, 2, "normal", noise=noise)))
        with torch.no_grad():
            diffs[noise] = rel_diff(models["llama"](TOKENS).logits, moe(TOKENS).logits)
    print(f"max relative logit difference by --noise: {diffs}")
    assert 0 < diffs[1e-3] < diffs[1e-2] < 0.05


def test_streams_one_layer_per_shard_and_carries_side_files(dense, tmp_path):
    root, _ = dense
    out = upcycle(root / "qwen3", tmp_path / "moe", Options(8, 2, dtype="bfloat16"))
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    layer_shards = {index[k] for k in index if k.startswith("model.layers.1.")}
    assert len(layer_shards) == 1 and len(set(index.values())) == SHAPE["num_hidden_layers"] + 1
    with safe_open(out / layer_shards.pop(), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert sum(".experts." in k for k in f.keys()) == 8 * 3
    assert (out / "tokenizer_config.json").read_text() == (root / "qwen3" / "tokenizer_config.json").read_text()
    assert (out / "generation_config.json").is_file()
    assert load(out).config.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".moe.partial-*"))


def write_config(path, config):
    path.mkdir()
    config.save_pretrained(path)
    return path


def without_tensor(src, dest, name):
    dest.mkdir()
    (dest / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != name}, dest / "model.safetensors")
    return dest


REFUSALS = {  # case -> (extra arguments or a source to build, what stderr must say)
    "already_moe": ("moe_src", r"already a mixture of experts \(model_type 'mixtral'"),
    "unsupported": ("gpt2_src", "model_type 'gpt2' of .* is not supported: supported dense sources are llama"),
    "attention_bias": ("bias_src", "attention_bias=True: Mixtral's attention has no biases"),
    "no_weights": ("config_only", "holds no weights: neither model.safetensors nor"),
    "missing_tensor": ("cut_src", r"lacks 1 tensor\(s\) of its dense model, e.g. \['model.layers.1.mlp.up_proj"),
    "zero_experts": (["--num-experts", "0"], "--num-experts 0: give at least 1"),
    "top_k_above_e": (["--top-k", "5"], r"--top-k 5: give a value in \[1, 4\]"),
    "top_k_zero": (["--top-k", "0"], r"--top-k 0: give a value in \[1, 4\]"),
    "negative_noise": (["--noise", "-0.1"], "--noise -0.1: give a finite value >= 0"),
    "nan_noise": (["--noise", "nan"], "--noise nan: give a finite value >= 0"),
    "existing_out": ("existing", "is not empty .*upcycling writes a new directory"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_bad_input_with_one_line(dense, tmp_path, capsys, case):
    root, _ = dense
    how, message = REFUSALS[case]
    src, out, extra = root / "llama", tmp_path / "out", how if isinstance(how, list) else []
    if how == "moe_src":
        src = write_config(tmp_path / "mixtral", MixtralConfig(**SHAPE))
    elif how == "gpt2_src":
        src = tmp_path / "gpt2"
        src.mkdir()
        (src / "config.json").write_text('{"model_type": "gpt2"}')
    elif how == "bias_src":
        src = write_config(tmp_path / "biased", LlamaConfig(**SHAPE, attention_bias=True))
    elif how == "config_only":
        src = write_config(tmp_path / "empty", LlamaConfig(**SHAPE))
    elif how == "cut_src":
        src = without_tensor(root / "qwen2", tmp_path / "cut", "model.layers.1.mlp.up_proj.weight")
    elif how == "existing":  # another model's directory
        out.mkdir()
        (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), "--out", str(out), "--num-experts", "4", "--top-k", "2", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert (how == "existing") == out.exists() and not list(tmp_path.glob(".out.partial-*"))
    if how == "existing":
        assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


def test_command_line_refusal_is_one_line_without_traceback(dense, tmp_path):
    root, _ = dense
    src = without_tensor(root / "mistral", tmp_path / "cut", "model.layers.0.mlp.down_proj.weight")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "moge_ds.upcycle", str(src), "--out", str(tmp_path / "out"),
                           "--num-experts", "4", "--top-k", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.layers.0.mlp.down_proj.weight" in lines[0] and time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["llama", "qwen3", "qwen2"])
def test_first_training_loss_under_autoep_zero3_is_the_dense_models(workspace, tmp_path, source):
    """The upcycled model's first loss through moge_ds.train (2 ranks, AutoEP ZeRO-3, MoGE at weight 0)
    is the dense model's HF loss on rank 0's batch, plus the load-balancing term: with the zeros
    router every probability is 1/E, so that term is exactly router_aux_loss_coef * top_k."""
    from moge_ds.config import config_from_dict, load_ds_config
    from moge_ds.tasks import build_task

    torch.manual_seed(0)
    config = type(SOURCES[source])(**{**SOURCES[source].to_dict(), "vocab_size": 320})
    dense_model = AutoModelForCausalLM.from_config(config).eval()
    dense_model.save_pretrained(tmp_path / "dense")
    out = upcycle(tmp_path / "dense", tmp_path / "moe", Options(num_experts=8, top_k=2))
    ds = load_ds_config(str(REPO / "ds_configs/autoep_zero3_cpu.json"))
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    settings = ["train.log_interval=1", "train.eval_interval=0", "train.final_eval=[]", "train.steps=1",
                "moe.gs_weight=0", "train.dist_timeout_s=120", f"model.hf_path={out}", "model.hf_init=pretrained"]
    run, history = train(workspace, f"upcycled_{source}", preset="mixtral_tiny.yaml", tiny=settings,
                         ds_config=str(tmp_path / "ds.json"))
    config = config_from_dict(json.loads((run / "config.json").read_text())["config"])  # as the run saw it
    batch = build_task(config, 4, rank=0, world=2, total_micro_batches=1, device=torch.device("cpu")).train_batch(0)
    labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
    with torch.no_grad():
        dense_loss = dense_model(input_ids=batch["tokens"], labels=labels, shift_labels=labels).loss.item()
    moe_config = json.loads((out / "config.json").read_text())
    expected = dense_loss + moe_config["router_aux_loss_coef"] * moe_config["num_experts_per_tok"]
    print(f"{source}: first loss {history[0]['task_loss']!r}, dense HF loss {dense_loss!r} + balance term: "
          f"{expected!r}")
    assert history[0]["task_loss"] == pytest.approx(expected, rel=1e-5)


# Our GPT (moge_ds.upcycle of a moge_ds.export): the same guarantees through DeepSpeed's MoE layer.
GPT_TOKENS = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("placement, router_init", [(None, "zeros"), ("every_other", "normal")])
def test_gpt_logits_equal_the_dense_gpt(dense_gpt, tmp_path, placement, router_init):
    from moge_ds.export import load_export

    src, dense_model = dense_gpt
    out = upcycle(src, tmp_path / "moe", Options(8, 2, router_init=router_init, seed=1, placement=placement))
    moe, config = load_export(out)
    expected_blocks = [1] if placement == "every_other" else [0, 1, 2]
    assert [i for i, b in enumerate(moe.blocks) if hasattr(b.ffn, "moe")] == expected_blocks
    assert config.moe.num_experts == 8 and not config.moe.drop_tokens
    with torch.no_grad():
        want, got = dense_model(GPT_TOKENS)[0], moe(GPT_TOKENS)[0]
    print(f"max relative logit difference ({placement}, {router_init}): {rel_diff(want, got):.2e}")
    assert rel_diff(want, got) <= 1e-5
    dense_ffn, experts = dense_model.blocks[1].ffn, moe.blocks[1].ffn.moe.deepspeed_moe.experts.deepspeed_experts
    assert all(torch.equal(e.fc2.bias, dense_ffn.fc2.bias) and torch.equal(e.fc1.weight, dense_ffn.fc1.weight)
               for e in experts)
    router = moe.blocks[1].ffn.moe.deepspeed_moe.gate.wg.weight
    assert (router.abs().sum() > 0) == (router_init == "normal")


def test_gpt_noise_and_expert_parallel_slices(dense_gpt, tmp_path):
    """With --noise the experts differ (by a small measured amount); model.init_from gives each
    expert-parallel rank its own global experts."""
    from moge_ds.export import init_from_export, load_export
    from moge_ds.models import build_model

    src, dense_model = dense_gpt
    out = upcycle(src, tmp_path / "moe", Options(4, 2, noise=1e-2, seed=5))
    moe, config = load_export(out)
    with torch.no_grad():
        diff = rel_diff(dense_model(GPT_TOKENS)[0], moe(GPT_TOKENS)[0])
    print(f"max relative logit difference at --noise 1e-2: {diff:.2e}")
    assert 0 < diff < 0.05
    full = moe.blocks[0].ffn.moe.deepspeed_moe.experts.deepspeed_experts
    config.moe.ep_size = 2
    for ep_rank in (0, 1):
        part = build_model(config, 64, ep_rank=ep_rank)
        init_from_export(part, out, ep_rank, 2)
        local = part.blocks[0].ffn.moe.deepspeed_moe.experts.deepspeed_experts
        assert len(local) == 2 and all(torch.equal(local[i].fc1.weight, full[2 * ep_rank + i].fc1.weight)
                                       for i in range(2))


GPT_REFUSALS = {  # case -> (options, what the error says)
    "top_1": (dict(top_k=1), "--top-k 1: DeepSpeed's top-1 gate scales the expert output"),
    "bf16": (dict(dtype="bfloat16"), "--dtype bfloat16: our exports are float32"),
    "vit": (dict(), "the export holds a 'vit' model: our upcycling takes a GPT"),
    "already_moe": (dict(), "the export already has MoE blocks"),
}


@pytest.mark.parametrize("case", list(GPT_REFUSALS))
def test_gpt_refusals(dense_gpt, tmp_path, case):
    from moge_ds.upcycle import UpcycleError
    from tests.conftest import write_dense_export

    src = dense_gpt[0]
    if case == "already_moe":
        src = upcycle(src, tmp_path / "moe", Options(4, 2))
    elif case == "vit":
        src = tmp_path / "vit"
        write_dense_export(src, 64, kind="vit", patch_size=7)
    options, message = GPT_REFUSALS[case]
    with pytest.raises(UpcycleError, match=re.escape(message)):
        upcycle(src, tmp_path / "out", Options(**{"num_experts": 4, "top_k": 2, **options}))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpt_first_training_loss_from_upcycled_export_is_the_dense_models(workspace, tmp_path):
    """A 2-rank MoGE run (expert-parallel size 2) started with model.init_from from an upcycled
    dense GPT: its first loss is the dense model's loss on rank 0's batch."""
    from moge_ds.config import config_from_dict
    from moge_ds.tasks import build_task
    from tests.conftest import write_dense_export

    dense_model = write_dense_export(tmp_path / "dense", 300, tokenizer=str(workspace / "tok.model"))
    out = upcycle(tmp_path / "dense", tmp_path / "moe", Options(4, 2, router_init="normal", placement="every_other"))
    run, history = train(workspace, "from_upcycled", "train.steps=1", "moe.drop_tokens=false", "moe.gs_weight=1.0",
                         f"model.init_from={out}")
    config = config_from_dict(json.loads((run / "config.json").read_text())["config"])
    batch = build_task(config, 4, rank=0, world=2, total_micro_batches=1, device=torch.device("cpu")).train_batch(0)
    with torch.no_grad():
        logits = dense_model(batch["tokens"])[0]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().float()
    dense_loss = ((nll * mask).sum() / mask.sum()).item()
    print(f"first loss {history[0]['task_loss']!r}, dense GPT loss {dense_loss!r}")
    assert history[0]["task_loss"] == pytest.approx(dense_loss, rel=1e-5)
