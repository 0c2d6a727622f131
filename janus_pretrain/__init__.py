"""janus-pretrain: distributed pretraining and fine-tuning of JANUS (joint AR / NAR seq2seq)."""
import os
import warnings

# torch's CPU allocator backs each tensor of 2 MB or more with transparent huge pages when this is
# set; it reads it once, at its first allocation, so before torch is imported. A step's large
# temporaries (logits, log-probabilities, their gradients) are fresh every step, and their first
# touch faulted in 4 KB pages costs a CPU as much as the arithmetic on them (docs/performance.md,
# "Where a CPU step's time goes"). No effect on CUDA memory; set it to 0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# megatron-core announces at import that it falls back from Apex / Transformer Engine to torch
# implementations, which is what we want on CPU and harmless on GPU.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
