"""python -m janus_pretrain.bench {decode,memory,padding,train} [...]"""
import sys

from janus_pretrain.bench import decode, memory, padding, train

BENCHMARKS = {"decode": decode.main, "memory": memory.main, "padding": padding.main, "train": train.main}

if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
    sys.exit(f"usage: python -m janus_pretrain.bench {{{','.join(BENCHMARKS)}}} [options]")
BENCHMARKS[sys.argv[1]](sys.argv[2:])
