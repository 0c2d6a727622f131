"""The JANUS encoder-decoder (plain PyTorch + megatron-core parallel layers)."""
from janus_pretrain.model.transformer import JanusModel

__all__ = ["JanusModel"]
