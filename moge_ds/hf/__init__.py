"""Hugging Face MoE causal LMs under DeepSpeed AutoEP, with MoGE's term on their routers.

- ``families``: what each family is (AutoEP preset, experts, top-k, softmax or sigmoid router).
- ``loading``: building the model from a local directory.
- ``routers``: raw router logits by forward hooks, for every family, plain or AutoEP-replaced.
- ``loss``: the model's own loss plus MoGE's term.
- ``export_names``: AutoEP's parameter names back to Hugging Face's.
- ``checks``: start-up validation (called by ``moge_ds.config.validate``).

AutoEP (``"expert_parallel"`` in the ds_config) replaces each MoE block with its grouped-GEMM,
all-to-all layer during ``deepspeed.initialize``.
"""
