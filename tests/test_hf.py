"""MoGE's term from a Hugging Face MoE model's router logits, against HF's own loss and a float64 reference."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moge_ds.config import MoEConfig
from moge_ds.models.hf import moge_loss, router_group_sparsity
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
    total = moge_loss(out.loss, out.router_logits, moe, sigma=1.5)
    assert total.item() == pytest.approx(out.loss.item() + 0.01 * 2.0 * expected, rel=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_weight_zero_is_hf_loss_bit_for_bit(family):
    out = forward(tiny_model(family))
    total = moge_loss(out.loss, out.router_logits, MoEConfig(gs_weight=0.0), sigma=1.0)
    assert torch.equal(total, out.loss)


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
