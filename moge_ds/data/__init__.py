"""Data pipelines: raw text -> sentencepiece -> megatron-core indexed datasets; images."""

import warnings

# megatron-core warns on import that Transformer Engine and Apex are absent; its datasets need neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
