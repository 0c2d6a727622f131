"""python -m janus_pretrain.bench
{accounting,checkpoint,cuda,data,decode,gpu,memory,overhead,padding,plan,profile,train} [...]"""
import sys

from janus_pretrain.bench import (accounting, checkpoint, cuda, data, decode, gpu, memory,
                                  overhead, padding, plan, profile, train)

BENCHMARKS = {"accounting": accounting.main, "checkpoint": checkpoint.main, "cuda": cuda.main,
              "data": data.main, "decode": decode.main, "gpu": gpu.main, "memory": memory.main,
              "overhead": overhead.main, "padding": padding.main, "plan": plan.main,
              "profile": profile.main, "train": train.main}

if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
    sys.exit(f"usage: python -m janus_pretrain.bench {{{','.join(BENCHMARKS)}}} [options]")
BENCHMARKS[sys.argv[1]](sys.argv[2:])
