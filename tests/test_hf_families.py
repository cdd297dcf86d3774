"""Every Hugging Face MoE family, from its tiny config under configs/hf/ (AutoEP presets, and OLMoE and
GPT-OSS, which have none and train under plain ZeRO-3):
router logits by hooks against the model's own, the loss at gs_weight 0 against the model's own, the
sigmoid routers' map values against a float64 reference, and (2 real CPU ranks) the engine's
first loss against plain HF's on the same weights and a falling loss with MoGE on.

Run as ``python -m tests.test_hf_families --families ...`` by the deepspeed launcher, this module is
also the rank side of the 2-rank test."""

import argparse
import copy
import functools
import json
import os
from pathlib import Path

import pytest
import torch

from moge_ds.config import ConfigError, MoEConfig, load_config, load_ds_config, validate
from moge_ds.distributed import single_process_group
from moge_ds.hf.families import family, read_config
from moge_ds.hf.loss import causal_lm_loss, map_values, router_group_sparsity
from moge_ds.hf.routers import RouterLogits
from tests.launching import REPO, launch_deepspeed
from tests.reference import reference_loss

FAMILIES = {"mixtral": "mixtral_tiny", "qwen2_moe": "qwen2_moe_tiny", "qwen3_moe": "qwen3_moe_tiny",
            "qwen3_5_moe": "qwen3_5_moe_tiny", "deepseek_v2": "deepseek_v2_tiny",
            "deepseek_v3": "deepseek_v3_tiny", "minimax_m3": "minimax_m3_tiny", "olmoe": "olmoe_tiny",
            "gpt_oss": "gpt_oss_tiny"}
SIGMOID = ("deepseek_v3", "minimax_m3")
NO_PRESET = ("olmoe", "gpt_oss")  # plain ZeRO-3, experts not split
STEPS = 3


def config_dir(name: str) -> str:
    return str(REPO / "configs" / "hf" / FAMILIES[name])


@functools.cache
def build(name: str) -> torch.nn.Module:
    """The family's tiny model (built once; the tests here only run forwards)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(read_config(config_dir(name)), dtype=torch.float32)


def lm_batch(vocab: int, seed: int = 1, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """Our LM sample layout (labels shifted by one), the last 3 positions masked."""
    sequence = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length)
    mask[:, -3:] = 0
    return {"tokens": sequence[:, :-1], "labels": sequence[:, 1:], "loss_mask": mask}


def own_forward(model, batch):
    """The model's own forward with HF's labels (it shifts them itself) and, where it has them, its
    router logits and load-balancing loss."""
    labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
    hf_labels = torch.cat([batch["tokens"][:, :1], labels[:, :-1]], dim=1)
    returns_logits = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
    return model(input_ids=batch["tokens"], labels=hf_labels, **returns_logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_hooked_logits_are_the_routers_own(name):
    """Hooked logits equal the model's returned router logits where it returns them, and in every family
    the router's weight applied to its input in float64 (DeepSeek returns none)."""
    model = build(name)
    batch = lm_batch(model.config.vocab_size)
    routers = RouterLogits(model, family(model.config))
    inputs = []  # each router's input [T, H], by pre-hooks (independent of RouterLogits' hooks)
    handles = [router.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
               for router in routers.routers]
    with routers:
        out = own_forward(model, batch)
    for handle in handles:
        handle.remove()
    expected_layers = sum(1 for layer in model.model.layers if any(hasattr(layer.mlp, n) for n in ("gate", "router")))
    assert len(routers.logits) == len(inputs) == expected_layers >= 3
    for logits, x, router in zip(routers.logits, inputs, routers.routers):
        reference = x.reshape(-1, x.shape[-1]).double() @ router.weight.double().T
        if getattr(router, "bias", None) is not None:  # GPT-OSS
            reference = reference + router.bias.double()
        assert (logits.double() - reference).abs().max() < 1e-6
    if getattr(out, "router_logits", None) is not None:
        assert all(torch.equal(a, b) for a, b in zip(routers.logits, out.router_logits))


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_zero_is_the_models_own_loss(name):
    """At gs_weight 0 the training loss is the model's own, bit for bit (cross-entropy plus its
    load-balancing loss, where it has one); at gs_weight 3 the model's own plus the float64 term."""
    model = build(name)
    batch = lm_batch(model.config.vocab_size)
    own = own_forward(model, batch).loss
    moe = MoEConfig(gs_weight=0.0, padding="circular")
    hf_loss, l_aux, _ = causal_lm_loss(model, batch, moe, sigma=1.0)
    assert torch.equal(hf_loss + moe.aux_loss_weight * l_aux, own)
    moe.gs_weight = 3.0
    with RouterLogits(model, family(model.config)) as routers:
        own_forward(model, batch)
    hf_loss, l_aux, _ = causal_lm_loss(model, batch, moe, sigma=1.0)
    expected = sum(reference_loss(reference_map_values(logits, name), (4, 4), 3, 1.0, 1, "circular", "mean")
                   for logits in routers.logits)
    assert torch.equal(hf_loss, own)
    assert l_aux.item() == pytest.approx(3.0 * expected, rel=1e-6)


def reference_map_values(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Float64: softmax, or sigmoid scores over the sum of all routed experts' sigmoid scores."""
    logits = logits.detach().double()
    if name not in SIGMOID:
        return torch.softmax(logits, dim=-1)
    scores = 1 / (1 + torch.exp(-logits))
    return scores / scores.sum(dim=-1, keepdim=True)


def test_sigmoid_map_values_against_float64():
    """Sigmoid routers' map values: their scores normalised over the routed experts; a shift of all
    logits changes them (unlike a softmax), and they sum to 1 per token."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3
    values = map_values(logits, "sigmoid")
    expected = reference_map_values(logits, "deepseek_v3")
    assert (values.double() - expected).abs().max() < 1e-7
    assert torch.allclose(values.sum(-1), torch.ones(64))
    assert not torch.allclose(map_values(logits + 1, "sigmoid"), values, atol=1e-3)
    moe = MoEConfig(padding="circular")
    term = router_group_sparsity([logits], moe, sigma=1.5, score_func="sigmoid")
    assert term.item() == pytest.approx(reference_loss(expected, (4, 4), 3, 1.5, 1, "circular", "mean"), rel=1e-6)


def ds_config_file(name: str, stage: int) -> str:
    return str(REPO / "ds_configs" / (f"zero{stage}_cpu.json" if name in NO_PRESET else f"autoep_zero{stage}_cpu.json"))


@pytest.mark.parametrize("name", FAMILIES)
def test_shipped_config_validates_and_fills_the_expert_layout(name):
    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"), (f"model.hf_path={config_dir(name)}", ))
    validate(config, load_ds_config(ds_config_file(name, 3)), 2)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.ep_size) == (16, 2, 1 if name in NO_PRESET else 2)
    assert family(read_config(config_dir(name))).score_func == ("sigmoid" if name in SIGMOID else "softmax")


def test_full_vision_language_configs_are_refused_with_the_text_backbone_named(tmp_path):
    from transformers import Qwen3_5MoeConfig

    Qwen3_5MoeConfig().save_pretrained(tmp_path)
    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"), (f"model.hf_path={tmp_path}", ))
    with pytest.raises(ConfigError, match="model type 'qwen3_5_moe' has no DeepSpeed AutoEP preset.* "
                                          "model_type='qwen3_5_moe_text'"):
        validate(config, load_ds_config(str(REPO / "ds_configs/autoep_zero3_cpu.json")), 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_analysis_captures_every_familys_map_values_choices_and_experts(name):
    """moge_ds.analysis on a Hugging Face model: per MoE layer the map values of the hooked raw logits
    (float64 reference), the router's own top-k choice, and each expert as a function of its tokens."""
    from moge_ds.analysis.report import expert_functions
    from moge_ds.analysis.routing import capture_routing

    model = build(name)
    fam = family(model.config)
    tokens = lm_batch(model.config.vocab_size)["tokens"]
    routing = capture_routing(model, [tokens])
    with RouterLogits(model, fam) as routers:
        model(input_ids=tokens)
    assert len(routing) == len(routers.logits) >= 3
    for layer, logits in zip(routing, routers.logits):
        assert (layer.scores.double() - reference_map_values(logits, name)).abs().max() < 1e-6
        assert layer.topk.shape == (tokens.numel(), fam.top_k) and not layer.dropped.any()
        if name not in SIGMOID:  # a softmax router picks its top-k scores (sigmoid ones steer by their bias)
            assert torch.equal(layer.topk.sort(-1).values, layer.scores.topk(fam.top_k).indices.sort(-1).values)
    experts = expert_functions(model)
    assert [len(layer) for layer in experts] == [fam.num_experts] * len(routing)
    outputs = torch.stack([expert(routing[0].inputs) for expert in experts[0]])
    assert outputs.shape == (fam.num_experts, *routing[0].inputs.shape) and outputs.isfinite().all()
    if name == "mixtral":  # SwiGLU by hand from the fused weights
        block, x = model.model.layers[0].mlp.experts, routing[0].inputs
        gate, up = (x @ block.gate_up_proj[3].T).chunk(2, dim=-1)
        assert torch.allclose(outputs[3], (torch.nn.functional.silu(gate) * up) @ block.down_proj[3].T, atol=1e-5)


@pytest.fixture(scope="module")
def one_rank():
    """One process group for every one-rank AutoEP engine of this module: DeepSpeed caches its expert
    groups per process, so engines in a later group would meet the cached ones of a destroyed group."""
    previous = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"  # deepspeed.initialize asks for it; no launcher here
    with single_process_group():
        yield
    if previous is None:
        os.environ.pop("LOCAL_RANK")
    else:
        os.environ["LOCAL_RANK"] = previous


def one_rank_engine(model: torch.nn.Module):
    import deepspeed

    ds = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "expert_parallel": {"enabled": True}}
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)[0]


def test_correction_bias_moves_against_the_load_the_models_own_routing_chose(one_rank):
    """Auxiliary-loss-free balancing on a one-rank AutoEP engine, per sigmoid family: the loads it
    counts are those of the plain model's own router (bias and group limits included) on the same
    batch, and each bias moves by exactly the rate against its load; evaluation forwards are not
    counted."""
    for name in SIGMOID:
        check_balancer(name)


def test_autoep_weights_map_back_to_every_familys_own_names(one_rank):
    """What the export does, per AutoEP family: a one-rank engine's weights (every expert, buffers
    included) under Hugging Face's names load into the plain model with nothing missing or left
    over, and give the engine's loss."""
    from transformers import AutoModelForCausalLM

    from moge_ds.export import load_weights
    from moge_ds.hf.export_names import hf_state_dict

    for name in (n for n in FAMILIES if n not in NO_PRESET):
        model = copy.deepcopy(build(name))
        with torch.no_grad():  # a bias that is not zero, so that a lost one shows in the loss
            for module in model.modules():
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        engine = one_rank_engine(model)
        batch = lm_batch(model.config.vocab_size)
        plain = AutoModelForCausalLM.from_config(model.config)
        own = plain.state_dict()
        weights = {k: v for k, v in hf_state_dict(engine.module.state_dict(), model.config).items() if k in own}
        if "lm_head.weight" not in weights and model.config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        load_weights(plain, weights, name)
        with torch.no_grad():
            expected = causal_lm_loss(engine, batch, MoEConfig(), sigma=1.0)[0]
            assert causal_lm_loss(plain, batch, MoEConfig(), sigma=1.0)[0].item() == pytest.approx(
                expected.item(), rel=1e-6), name


def check_balancer(name: str) -> None:
    from moge_ds.hf.balance import CorrectionBiasBalancer

    model = copy.deepcopy(build(name))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    plain = copy.deepcopy(model)
    engine = one_rank_engine(model)
    fam = family(model.config)
    balancer = CorrectionBiasBalancer(engine, fam, rate=0.01)
    before = [b.clone() for b in balancer.biases]
    tokens = lm_batch(model.config.vocab_size)["tokens"]
    engine.eval()
    engine(input_ids=tokens)
    engine.train()
    engine(input_ids=tokens)
    loads = balancer.step()
    chosen = []  # the plain model's own choice per MoE layer, [T, k]
    handles = [router.register_forward_hook(lambda m, i, out: chosen.append(out[2]))
               for router in RouterLogits(plain, fam).routers]
    plain(input_ids=tokens)
    for handle in handles:
        handle.remove()
    expected = torch.stack([torch.bincount(c.flatten(), minlength=fam.num_experts) for c in chosen]).double()
    assert torch.equal(loads, expected)
    for bias, old, load in zip(balancer.biases, before, expected):
        assert torch.allclose(bias - old, 0.01 * torch.sign(load.mean() - load).float(), atol=1e-7)
    assert all(torch.equal(r.e_score_correction_bias, b) for r, b in zip(balancer.routers, balancer.biases))
    balancer.close()


# --- 2 ranks ---------------------------------------------------------------------------------------------

# ZeRO stage per family: both stages covered, ZeRO-3 on the sigmoid routers' correction bias and on the
# families without a preset (plain ZeRO-3 is what they are for).
STAGES = {"mixtral": 3, "qwen2_moe": 2, "qwen3_moe": 2, "qwen3_5_moe": 2, "deepseek_v2": 2, "deepseek_v3": 3,
          "minimax_m3": 3, "olmoe": 3, "gpt_oss": 3}


@pytest.fixture(scope="module")
def autoep_results(tmp_path_factory):
    """One 2-rank launch (autoep_size 2; plain ZeRO-3 without a preset) for all families:
    ``{family: [rank 0's, rank 1's results]}``."""
    out = tmp_path_factory.mktemp("autoep")
    launch_deepspeed(["--module", "tests.test_hf_families", "--families", *FAMILIES, "--out", str(out)], cwd=REPO,
                     timeout=600)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return {name: [results[name] for results in ranks] for name in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_autoep_engine_matches_plain_hf_and_trains(autoep_results, name):
    """The engine's first loss (the model's own plus MoGE's term) equals plain HF's on the same weights
    and batch on each rank, and 3 steps with MoGE on make the loss fall."""
    for result in autoep_results[name]:
        assert result["engine"][0] == pytest.approx(result["plain"][0], rel=1e-6, abs=0), result
        assert result["engine"][1] == pytest.approx(result["plain"][1], rel=1e-5), result
        assert result["engine"][1] > 0
        losses = result["losses"]
        assert losses[-1] < losses[0] - 0.05, f"the loss did not fall: {losses}"


def rank_main() -> None:
    """The rank side: writes ``<out>/rank<R>.json`` with, per family, plain HF's and the engine's first
    ``(hf_loss, l_aux)`` and the losses of 3 MoGE steps."""
    from moge_ds.distributed import init_job, shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--families", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_job()
    results = {name: train_family(name) for name in args.families}
    (args.out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results))
    shutdown()


def train_family(name: str) -> dict:
    """Plain HF's and the AutoEP engine's first ``(hf_loss, l_aux)`` on this rank's batch, and the
    losses of 3 steps on it."""
    import deepspeed
    import torch.distributed as dist

    from moge_ds.models import build_model

    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"),
                         (f"model.hf_path={config_dir(name)}", "model.hf_init=random", "moe.gs_weight=4.0",
                          "moe.padding=circular"))
    ds = load_ds_config(ds_config_file(name, STAGES[name]))
    ds.pop("csv_monitor")
    ds.pop("scheduler")
    ds["train_micro_batch_size_per_gpu"] = 2
    ds = validate(config, ds, dist.get_world_size())
    model = build_model(config)
    plain = copy.deepcopy(model)
    batch = lm_batch(model.config.vocab_size, seed=dist.get_rank())
    plain_loss = [t.item() for t in causal_lm_loss(plain, batch, config.moe, sigma=1.0)[:2]]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    losses = []
    for step in range(STEPS + 1):
        hf_loss, l_aux, _ = causal_lm_loss(engine, batch, config.moe, sigma=1.0)
        if step == 0:
            first = [hf_loss.item(), l_aux.item()]
        loss = hf_loss + config.moe.aux_loss_weight * l_aux
        losses.append(loss.item())
        if step < STEPS:
            engine.backward(loss)
            engine.step()
    return {"plain": plain_loss, "engine": first, "losses": losses}


if __name__ == "__main__":
    rank_main()
