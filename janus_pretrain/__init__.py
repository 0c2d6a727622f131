"""janus-pretrain: distributed pretraining and fine-tuning of JANUS (joint AR / NAR seq2seq)."""
import warnings

# megatron-core announces at import that it falls back from Apex / Transformer Engine to torch
# implementations, which is what we want on CPU and harmless on GPU.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
