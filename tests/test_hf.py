"""MoGE's term from a Hugging Face MoE model's router logits, against HF's own loss and a float64 reference."""

import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moge_ds.config import MoEConfig
from moge_ds.hf.export_names import hf_state_dict
from moge_ds.hf.loss import causal_lm_loss, router_group_sparsity
from tests.reference import reference_loss

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2))
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, moe_intermediate_size=16, num_experts=16,
                                              num_experts_per_tok=2, decoder_sparse_step=1))


def forward(model):
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    return model(input_ids=tokens, labels=tokens, output_router_logits=True)


# 8 experts make a 2x4 map, too narrow for a 3x3 window without wrapping.
@pytest.mark.parametrize("family,padding", [("mixtral", "circular"), ("qwen3_moe", "valid"), ("qwen3_moe", "circular")])
def test_term_matches_float64_reference(family, padding):
    out = forward(tiny_model(family))
    moe = MoEConfig(padding=padding, gs_weight=2.0, aux_loss_weight=0.01)
    experts = out.router_logits[0].shape[-1]
    shape = (2, 4) if experts == 8 else (4, 4)
    expected = sum(reference_loss(torch.softmax(logits.double(), dim=-1), shape, 3, 1.5, 1, padding, "mean")
                   for logits in out.router_logits)
    assert router_group_sparsity(out.router_logits, moe, sigma=1.5).item() == pytest.approx(expected, rel=1e-5)


def lm_batch(mask_from: int = 9) -> dict[str, torch.Tensor]:
    """Our LM sample layout: labels are the tokens shifted by one; the loss mask ends early."""
    sequence = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12)
    mask[:, mask_from:] = 0
    return {"tokens": sequence[:, :-1], "labels": sequence[:, 1:], "loss_mask": mask}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_training_loss_is_hf_loss_plus_the_term(family):
    """What the trainer backpropagates, ``hf_loss + aux_loss_weight * l_aux``: HF's own loss bit for bit
    at gs_weight 0; HF's loss plus the weighted float64 reference term otherwise."""
    model, batch = tiny_model(family), lm_batch()
    labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
    # HF's own causal-LM loss with HF's labels (it shifts them itself): the same predictions and
    # targets, as the last position is masked.
    own = model(input_ids=batch["tokens"], labels=torch.cat([batch["tokens"][:, :1], labels[:, :-1]], dim=1),
                output_router_logits=True)
    moe = MoEConfig(gs_weight=0.0, padding="circular")
    hf_loss, l_aux, _ = causal_lm_loss(model, batch, moe, sigma=1.0)
    assert torch.equal(hf_loss + moe.aux_loss_weight * l_aux, own.loss)
    moe.gs_weight = 3.0
    hf_loss, l_aux, _ = causal_lm_loss(model, batch, moe, sigma=1.0)
    shape = (2, 4) if family == "mixtral" else (4, 4)
    expected = sum(reference_loss(torch.softmax(logits.double(), dim=-1), shape, 3, 1.0, 1, "circular", "mean")
                   for logits in own.router_logits)
    assert torch.equal(hf_loss, own.loss)
    assert (hf_loss + moe.aux_loss_weight * l_aux).item() == pytest.approx(own.loss.item() + 0.03 * expected, rel=1e-6)


def test_autoep_names_map_back_to_hf():
    """AutoEP's router and w1/w2/w3 experts become HF's gate and fused gate_up_proj/down_proj."""
    model = tiny_model("mixtral")
    hf = model.state_dict()
    autoep = {}
    for name, tensor in hf.items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            autoep[name.replace("gate_up_proj", "w1")], autoep[name.replace("gate_up_proj", "w3")] = gate, up
        elif name.endswith("experts.down_proj"):
            autoep[name.replace("down_proj", "w2")] = tensor
        else:
            autoep[name.replace("mlp.gate.", "mlp.router.gate.")] = tensor
    mapped = hf_state_dict(autoep, model.config)
    assert mapped.keys() == hf.keys() and all(torch.equal(mapped[k], hf[k]) for k in hf)


def test_term_trains_only_the_routers():
    model = tiny_model("mixtral")
    out = forward(model)
    router_group_sparsity(out.router_logits, MoEConfig(padding="circular"), sigma=1.0).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    routers = [name for name in grads if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(grads[name].abs().sum() > 0 for name in routers)
    # Whatever feeds a router learns from the term (layer 0's experts feed layer 1's router); what
    # comes after the last router does not.
    assert all(grads[name] is None for name in grads if name.startswith("model.layers.1.mlp.experts"))
    assert grads["lm_head.weight"] is None and grads["model.norm.weight"] is None


def hf_tokenizer(texts: list[str], directory) -> None:
    """A byte-level BPE tokenizer trained on ``texts``, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(directory)


def test_hf_tokenizer_feeds_the_data_pipeline(corpus, tmp_path):
    """A model's own Hugging Face tokenizer (a local directory) tokenizes, pre-tokenizes a corpus and
    feeds the hf task like a sentencepiece model does."""
    from moge_ds.config import load_config
    from moge_ds.data.documents import DataError
    from moge_ds.data.preprocess import preprocess
    from moge_ds.data.tokenizer import HFTokenizer, load_tokenizer
    from moge_ds.tasks import HFLanguageModelling

    _, texts, spec, _ = corpus
    hf_tokenizer(texts, tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.detokenize(tokenizer.tokenize(texts[0])) == texts[0]
    preprocess(spec, str(tmp_path / "tok"), str(tmp_path / "text"), progress=False)
    small = MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2)
    small.save_pretrained(tmp_path / "small")
    config = load_config(None, ("model.kind=hf", f"model.hf_path={tmp_path / 'small'}", "model.hf_init=random",
                                "model.seq_length=16", f"data.prefixes=[{tmp_path / 'text'}]",
                                f"data.tokenizer={tmp_path / 'tok'}", "data.split=80,10,10"))
    with pytest.raises(DataError, match=f"has {tokenizer.vocab_size} tokens, more than the 96 of the model"):
        HFLanguageModelling(config, 2, 0, 1, 4, torch.device("cpu"))
    small.vocab_size = 256
    small.save_pretrained(tmp_path / "model")
    config.model.hf_path = str(tmp_path / "model")
    task = HFLanguageModelling(config, 2, 0, 1, 4, torch.device("cpu"))
    batch = task.train_batch(0)
    assert batch["tokens"].max() < tokenizer.vocab_size
    hf_loss, l_aux, items = task.loss(MixtralForCausalLM(small), batch, step=0)
    assert torch.isfinite(hf_loss) and l_aux == 0 and items == 2 * 16


class TwiceRouted(torch.nn.Module):
    """``model.layers.0.mlp`` calling its router twice, the second time on other inputs (as DeepSpeed's
    Qwen3.5-MoE layer calls it again to return its logits)."""

    def __init__(self):
        super().__init__()
        mlp = torch.nn.Module()
        mlp.gate = torch.nn.Linear(4, 8, bias=False)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].mlp = mlp

    def forward(self, x):
        gate = self.model.layers[0].mlp.gate
        return gate(x) + gate(2 * x)


def test_router_hooks_keep_the_first_call_and_leave_no_hook_behind():
    from moge_ds.hf.families import Family
    from moge_ds.hf.routers import RouterLogits

    model, x = TwiceRouted(), torch.randn(3, 4)
    fam = Family("toy", "toy", num_experts=8, top_k=2, score_func="softmax",
                 moe_layer_pattern=r"model\.layers\.\d+\.mlp", router_names=("gate", ))
    with RouterLogits(model, fam) as routers:
        model(x)
    assert len(routers.logits) == 1 and torch.equal(routers.logits[0], model.model.layers[0].mlp.gate(x))
    assert not model.model.layers[0].mlp.gate._forward_hooks


def test_correction_bias_exports_under_the_hf_router():
    """DeepSeek-V3's ``e_score_correction_bias`` sits on AutoEP's router; HF keeps it on ``mlp.gate``."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(n_routed_experts=8, num_experts_per_tok=2)
    bias = torch.arange(8.0)
    mapped = hf_state_dict({"model.layers.1.mlp.router.e_score_correction_bias": bias,
                            "model.layers.1.mlp.router.gate.weight": torch.ones(8, 4)}, config)
    assert mapped.keys() == {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.weight"}


def partitioned(path, monkeypatch, dtype="fp32", hf_init="pretrained"):
    """The model under ``path`` built as ZeRO-3 partitions (one-rank group) and loaded by moge-ds."""
    from moge_ds.config import ModelConfig
    from moge_ds.hf.loading import build

    monkeypatch.setenv("LOCAL_RANK", "0")  # zero.Init reads it; a launcher sets it
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, dtype: {"enabled": True}}
    return build(ModelConfig(kind="hf", hf_path=str(path), hf_init=hf_init), seed=0, ds=ds)


def gathered(model) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: p.data.reshape(p.ds_shape).clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("original_format", [True, False], ids=["per_expert_layout", "fused_layout"])
@pytest.mark.parametrize("reads", ["blocks", "one_row", "whole_conversion"])
def test_partitioned_loading_reads_the_weights_of_either_layout(family, original_format, reads, tmp_path,
                                                                monkeypatch, process_group):
    """Each partition is read in blocks of rows (one expert's keys converted at a time), also one row per
    read, and through the whole-tensor conversion kept for layouts that cannot be cut into rows."""
    if reads == "one_row":
        monkeypatch.setattr("moge_ds.hf.loading.ROWS_READ_NUMEL", 1)
    if reads == "whole_conversion":
        monkeypatch.setattr("moge_ds.hf.loading._keeps_rows", lambda converter: False)
    source = tiny_model(family)
    source.save_pretrained(tmp_path, save_original_format=original_format)
    model = partitioned(tmp_path, monkeypatch)
    assert all(p.numel() == 0 for p in model.parameters())  # partitions only outside a gather
    weights, expected = gathered(model), source.state_dict()
    assert set(weights) <= set(expected) and weights
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name


def test_partitioned_loading_builds_in_the_training_dtype(tmp_path, monkeypatch, process_group):
    source = tiny_model("mixtral")
    source.save_pretrained(tmp_path)
    model = partitioned(tmp_path, monkeypatch, dtype="bf16")
    for name, tensor in gathered(model).items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, source.state_dict()[name].to(torch.bfloat16)), name
    # The rotary frequencies stay fp32, as from_pretrained keeps them (zero.Init made them bf16).
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, source.model.rotary_emb.inv_freq)


def test_partitioned_loading_names_a_damaged_checkpoint(tmp_path, monkeypatch, process_group):
    from moge_ds.hf.families import HFModelError

    tiny_model("mixtral").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(HFModelError, match="header"):
        partitioned(tmp_path, monkeypatch)


@pytest.mark.parametrize("change", ["vocab_size", "num_local_experts"])
def test_partitioned_loading_refuses_weights_of_another_shape(change, tmp_path, monkeypatch, process_group):
    """A checkpoint of the same family whose vocabulary (a copied tensor) or expert count (a tensor
    merged from one key per expert) differs from its config.json is refused, not read in part."""
    from moge_ds.hf.families import HFModelError

    source = tiny_model("mixtral")
    source.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[change] -= 4  # fewer than the weights hold: reading the first rows would succeed silently
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFModelError, match="not a checkpoint of this model"):
        partitioned(tmp_path, monkeypatch)


def test_partitioned_loading_refuses_another_models_checkpoint(tmp_path, monkeypatch, process_group):
    from moge_ds.hf.families import HFModelError

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "qwen3")
    tiny_model("mixtral").config.save_pretrained(tmp_path / "mixtral")
    (tmp_path / "mixtral" / "model.safetensors").write_bytes((tmp_path / "qwen3" / "model.safetensors").read_bytes())
    with pytest.raises(HFModelError, match="no weights for .* of the model's parameters"):
        partitioned(tmp_path / "mixtral", monkeypatch)
