"""The JANUS encoder-decoder (plain PyTorch + megatron-core parallel layers; torch layers alone
when no tensor-parallel group is set up, model/layers.py)."""
from janus_pretrain.model.transformer import JanusModel

__all__ = ["JanusModel"]
