"""What `make demo` prints last: a pretrained checkpoint at work on held-out text, AR and NAR.

    python -m janus_pretrain.showcase --checkpoint runs/demo/train \
        --input ../shared/data/nmt/multi30k/val.en [--count 6] [--max-tokens 64]

Each of the first `count` non-empty lines, cut to `max-tokens` tokens, is noised exactly as
pretraining noised its targets (the checkpoint's own objective: text infilling, spans replaced by
one [MASK]) and the model reconstructs it in the modes its objective trained (JANUS: AR beam
search and NAR mask-predict; BANG pretraining: AR), at most `max-tokens` tokens; the outputs are
printed with the wall time per sentence at batch 1 (after one untimed warm-up decode). Whether
an output follows its source is what minutes of pretraining show; how good it gets is not.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from janus_pretrain.errors import JanusError, run_cli
from janus_pretrain.quiet import silence_third_party
from janus_pretrain.tokenizer import MASK, PAD


def paragraphs(path: str, count: int) -> list[str]:
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    found.append(line.strip())
                if len(found) == count:
                    break
    except FileNotFoundError:
        raise JanusError(f"showcase: input file not found: {path}") from None
    return found


def shown(tokenizer, ids: np.ndarray) -> str:
    """Source ids -> text with every [MASK] written as <mask> (decode drops special ids)."""
    pieces = np.split(ids, np.flatnonzero(ids == MASK))
    return " <mask> ".join(tokenizer.decode(p) for p in pieces).strip()


def reconstruct(gen, texts: list[str], max_tokens: int, beam: int, iterations: int,
                seed: int) -> list[dict]:
    """-> per text {"original", "source" (ids with BOS/EOS), "outputs": {setting: (text, ms)}}."""
    from janus_pretrain.generate.api import DecodeOptions
    from janus_pretrain.objectives.build import build_objective

    objective = build_objective(gen.cfg)
    originals = [np.asarray(ids[:max_tokens], dtype=np.int64) for ids in gen.tokenizer.encode(texts)]
    batch = objective.collate([(None, ids) for ids in originals], np.random.default_rng(seed))
    sources = [row[row != PAD].numpy() for row in batch["src"]]
    # Outputs no longer than the originals: a poor model would otherwise run to max_target_len.
    # Only the modes the objective trained (a BANG-pretrained model decodes AR only).
    every = {"ar": (f"AR beam {beam}", DecodeOptions(mode="ar", beam=beam, max_len=max_tokens)),
             "nar": (f"NAR T={iterations}", DecodeOptions(mode="nar", iterations=iterations,
                                                          max_len=max_tokens)),
             "bang_nar": ("NAR one pass", DecodeOptions(mode="bang_nar", max_len=max_tokens))}
    settings = dict(every[mode] for mode in gen.cfg.objective.decoding_modes())
    for opts in settings.values():
        gen.check_mode(opts.mode)
        gen.decode_ids(sources[:1], opts)  # warm-up, untimed
    rows = []
    for original, src in zip(originals, sources):
        outputs = {}
        for name, opts in settings.items():
            start = time.perf_counter()
            hyp = gen.decode_ids([src], opts)[0]
            outputs[name] = (gen.tokenizer.decode(hyp.tokens), 1000 * (time.perf_counter() - start))
        rows.append({"original": original, "source": src, "outputs": outputs})
    return rows


def run(args) -> None:
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.parallel import state

    texts = paragraphs(args.input, args.count)
    if not texts:
        raise JanusError(f"showcase: no non-empty line in {args.input}")
    gen = Generator.from_checkpoint(args.checkpoint)
    try:
        rows = reconstruct(gen, texts, args.max_tokens, args.beam, args.iterations, args.seed)
    finally:
        state.shutdown()
    print(f"\nshowcase: {len(texts)} held-out paragraphs ({args.input}), each cut to "
          f"{args.max_tokens} tokens and noised as pretraining noised its targets "
          f"(objective.masking={gen.cfg.objective.masking}); the model reconstructs them.")
    for k, row in enumerate(rows, 1):
        print(f"\n[{k}] original: {gen.tokenizer.decode(row['original'])}")
        print(f"    source:   {shown(gen.tokenizer, row['source'][1:-1])}")
        for name, (text, ms) in row["outputs"].items():
            print(f"    {name:<10} ({ms:6.1f} ms): {text}")
    print("\nshowcase: ms per sentence at batch 1: " + ", ".join(
        f"{name} {np.mean([r['outputs'][name][1] for r in rows]):.1f}" for name in rows[0]["outputs"]))
    print(f"showcase: this model was pretrained for {gen.cfg.train.steps} steps; what it "
          f"reconstructs is what that buys, not what JANUS reaches")


def main(argv: list[str] | None = None) -> None:
    silence_third_party()
    p = argparse.ArgumentParser(prog="showcase", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ dir or step_* dir")
    p.add_argument("--input", required=True, help="held-out text, one paragraph a line")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="cut each paragraph to this many")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--iterations", type=int, default=4, help="NAR mask-predict passes T")
    p.add_argument("--seed", type=int, default=0, help="of the noise")
    args = p.parse_args(argv)
    run_cli(run, args)


if __name__ == "__main__":
    main()
