"""python -m janus_pretrain.bench decode [...]"""
import sys

from janus_pretrain.bench import decode

BENCHMARKS = {"decode": decode.main}

if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
    sys.exit(f"usage: python -m janus_pretrain.bench {{{','.join(BENCHMARKS)}}} [options]")
BENCHMARKS[sys.argv[1]](sys.argv[2:])
