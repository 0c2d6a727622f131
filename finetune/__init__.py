"""Fine-tuning JANUS on GLGE and NMT tasks, evaluating AR and NAR decoding, comparing to baselines.

tasks.py (registry) -> pairs.py (aligned token shards) -> the janus_pretrain training loop ->
checkpoints.py (best / averaged checkpoint) -> evaluate.py (decode, metrics.py, latency) -> compare.py.
"""
