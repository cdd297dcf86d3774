"""Data pipelines: raw text -> sentencepiece -> megatron-core indexed datasets; images."""
