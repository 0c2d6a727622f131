"""`janus-pretrain generate`: one hypothesis per source line, AR or NAR, from a checkpoint.

    janus-pretrain generate --checkpoint runs/demo/train --mode ar --beam 5 < sources.txt
    janus-pretrain generate --checkpoint runs/demo/train --mode nar --iterations 4 --input src.txt
    janus-pretrain generate --checkpoint runs/bang_nar --mode bang_nar --max-len 64 < sources.txt
    janus-pretrain generate --checkpoint runs/demo/train --mode spec --spec-block 4 < sources.txt

Input lines that are not UTF-8 are decoded with U+FFFD for the bad bytes (as `data prepare` does)
and counted on stderr; an empty line gives an empty output line, so outputs stay line-aligned.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import BinaryIO

# Batches decoded between two writes of the output: long enough that sorting by length pays,
# short enough that an interrupted run loses little.
WRITE_EVERY = 16


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="decode sources with a checkpoint (AR or NAR)")
    g.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoints/ dir, step_* dir or consolidated .safetensors file")
    g.add_argument("--mode", choices=["ar", "nar", "bang_nar", "spec"], default="ar",
                   help="ar: beam/greedy; nar: JANUS mask-predict; bang_nar: BANG one pass; "
                        "spec: NAR drafts, AR verifies (exact: AR greedy's output)")
    g.add_argument("--input", default="-", help="source file, one per line (default: stdin)")
    g.add_argument("--output", default="-", help="hypothesis file (default: stdout)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-len", type=int, default=200)
    g.add_argument("--beam", type=int, default=5, help="AR beam size; 1 is greedy")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram", type=int, default=0)
    g.add_argument("--iterations", type=int, default=10, help="NAR mask-predict passes T")
    g.add_argument("--length-beam", type=int, default=3, help="NAR length candidates")
    g.add_argument("--dedup", action="store_true", help="NAR: drop consecutive repeated tokens")
    g.add_argument("--rerank", action="store_true", help="NAR: pick the candidate the AR stream scores best")
    g.add_argument("--spec-block", type=int, default=4, help="spec: tokens drafted per iteration")
    g.add_argument("--spec-accept", choices=["exact", "relaxed"], default="exact",
                   help="spec: exact (AR greedy's output) or relaxed (top-b within a margin)")
    g.add_argument("--spec-top", type=int, default=3, help="spec relaxed: AR's top-b")
    g.add_argument("--spec-margin", type=float, default=1.0,
                   help="spec relaxed: log-prob margin tau below AR's best")
    g.add_argument("--force-mode", action="store_true",
                   help="decode in a mode the checkpoint's objective never trained")
    g.set_defaults(run=run)


def read_sources(stream: BinaryIO) -> tuple[list[str], list[int]]:
    """Lines of a byte stream -> (texts, 1-based numbers of the lines that were not UTF-8)."""
    texts, bad = [], []
    for number, raw in enumerate(stream, 1):
        raw = raw.rstrip(b"\n")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", errors="replace"))
            bad.append(number)
    return texts, bad


def decode_options(args) -> dict:
    """The DecodeOptions of the command line, checked (one line each) before anything loads."""
    from janus_pretrain.generate.api import DecodeOptions

    options = dict(mode=args.mode, beam=args.beam, max_len=args.max_len,
                   length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                   iterations=args.iterations, length_beam=args.length_beam, dedup=args.dedup,
                   rerank=args.rerank, batch_size=args.batch_size, spec_block=args.spec_block,
                   spec_accept=args.spec_accept, spec_top=args.spec_top,
                   spec_margin=args.spec_margin)
    DecodeOptions(**options)
    return options


def run(args) -> None:
    from janus_pretrain.errors import JanusError
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.generate.output import Output
    from janus_pretrain.parallel import state

    options = decode_options(args)
    if args.input != "-" and not Path(args.input).is_file():
        what = "a directory" if Path(args.input).is_dir() else "not found"
        raise JanusError(f"generate: --input {args.input} is {what} (name a file of sources)")
    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    with src:
        sources, bad = read_sources(src)
    if bad:
        print(f"generate: warning: {len(bad)} input line(s) were not valid UTF-8 (first: line "
              f"{bad[0]}); their bad bytes were decoded as U+FFFD", file=sys.stderr, flush=True)
    consolidated = Path(args.checkpoint).is_file()
    # The output is a temporary file until the run ends (output.py): a refusal below leaves an
    # existing --output as it was. SIGTERM (a job's time limit) ends the run as Ctrl-C does, so
    # the finished chunks still reach --output.
    previous = signal.signal(signal.SIGTERM, _stop)
    with Output(args.output) as out:
        try:
            gen = (Generator.from_consolidated if consolidated else Generator.from_checkpoint)(
                args.checkpoint)
            # WRITE_EVERY batches of sources at a time, in input order, each chunk written and
            # flushed before the next is decoded: an interrupted run keeps every finished chunk,
            # and `generate` still sorts each chunk by length (a chunk of one batch would not).
            chunk = args.batch_size * WRITE_EVERY
            for start in range(0, len(sources), chunk):
                hyps = gen.generate(sources[start:start + chunk], force=args.force_mode, **options)
                out.write(h + "\n" for h in hyps)
        finally:
            state.shutdown()
            signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)  # the status the signal itself would have given
