"""Checkpoints, in one place: the format's names (layout), the atomic writer (atomic), training
save / resume (store) and model weights for any TP size, averaging and consolidation (weights).

train/, generate/ and finetune/ read and write checkpoints only through this package.
"""
