"""Corpora -> memory-mapped token shards -> deterministic, resumable batches."""
