"""Data: record formats, tokenizers and the grain pipeline. Never imports jax."""
