"""The models on one process: shapes, causality, placement, and MoE vs MoGE differing in one setting."""

import torch

from moge_ds.config import load_config
from moge_ds.layer import MoGE
from moge_ds.models import build_model
from moge_ds.models.blocks import DenseFFN, MoEFFN


def tiny(*overrides):
    return load_config(None, ("model.dim=32", "model.depth=4", "model.heads=4", "model.seq_length=16",
                              "moe.num_experts=4", "moe.map_shape=[2,2]", "moe.padding=circular", *overrides))


def test_gpt_is_causal_and_places_moe_every_other_block():
    # Capacity-limited routing lets later tokens evict earlier ones from an expert (GShard-style
    # dropping is not causal), so causality of the model itself is checked without dropping.
    model = build_model(tiny("moe.drop_tokens=false"), vocab_size=50).eval()
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [DenseFFN, MoEFFN, DenseFFN, MoEFFN]
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    torch.manual_seed(0)  # DeepSpeed samples the 2nd expert with Gumbel noise, in eval mode too
    logits, l_aux = model(tokens)
    torch.manual_seed(0)
    logits_changed, _ = model(changed)
    assert logits.shape == (2, 16, 50) and l_aux.item() > 0
    assert torch.allclose(logits[:, :10], logits_changed[:, :10], atol=1e-5)
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])
    assert model.head.weight is model.embed.weight


def test_vit_last_two_blocks():
    model = build_model(tiny("model.kind=vit", "moe.placement=last_2", "moe.top_k=1"))
    assert [type(b.ffn) for b in model.blocks] == [DenseFFN, DenseFFN, MoEFFN, MoEFFN]
    logits, _ = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)


def test_moe_and_moge_differ_only_in_gs_weight():
    moe, moge = build_model(tiny(), vocab_size=50), build_model(tiny("moe.gs_weight=2"), vocab_size=50)
    for (name, a), (_, b) in zip(moe.state_dict().items(), moge.state_dict().items()):
        assert torch.equal(a, b), name
    gates = [m.gate for m in moge.modules() if isinstance(m, MoGE)]
    assert gates and all(g.gs_weight == 2.0 for g in gates)


def test_expert_init_does_not_depend_on_expert_parallel_size():
    whole = build_model(tiny(), vocab_size=50)
    halves = [build_model(tiny("moe.ep_size=2"), vocab_size=50, ep_rank=r) for r in (0, 1)]
    def experts(m):
        return [e for f in m.modules() if isinstance(f, MoEFFN) for e in f.moe.deepspeed_moe.experts.deepspeed_experts]
    for layer in range(2):
        full = experts(whole)[layer * 4:(layer + 1) * 4]
        split = experts(halves[0])[layer * 2:(layer + 1) * 2] + experts(halves[1])[layer * 2:(layer + 1) * 2]
        for a, b in zip(full, split):
            assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(experts(whole)[0].fc1.weight, experts(whole)[1].fc1.weight)
