"""`janus-pretrain`: a thin command line over the package.

    janus-pretrain tokenizer train --input corpus.txt --vocab-size 32000 --output tok.model
    janus-pretrain data prepare --input corpus.txt --tokenizer tok.model --output shards/
    janus-pretrain data prepare ... --partition 0/4   (then 1/4 .. 3/4 on other nodes)
    janus-pretrain data merge shards/
    janus-pretrain data verify shards/
    janus-pretrain train --config configs/pretrain/demo.yaml [--resume] [key=value ...]
    janus-pretrain generate --checkpoint runs/demo/train --mode ar|nar < sources.txt
    janus-pretrain checkpoint consolidate --checkpoint runs/demo/train --output model.safetensors
    janus-pretrain convert from-hf facebook/bart-base --output bart.safetensors
    janus-pretrain convert to-hf runs/demo/train --output hf_model/
    janus-pretrain plan --model large --objective janus --gpus 64 --global-batch 2048 --tokens 2.1e12

`train` runs as one process or under `torchrun` / `deepspeed --no_local_rank --module
janus_pretrain.cli train ...`. User errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from janus_pretrain.errors import run_cli
from janus_pretrain.generate import cli as generate_cli
from janus_pretrain.quiet import silence_third_party


def _tokenizer_train(args) -> None:
    from janus_pretrain.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.output, args.vocab_size, args.model_type,
                          args.max_sentences)
    print(f"tokenizer: {tok.vocab_size} pieces -> {tok.path}")


def _data_prepare(args) -> None:
    from janus_pretrain import disk_space
    from janus_pretrain.data.prepare import files_in, parse_partition, prepare, written_since

    partition = parse_partition(args.partition)
    before = files_in(args.output)
    with disk_space.one_line(
            "data", args.output,
            lambda: (sum(p.stat().st_size for p in written_since(args.output, before)), True),
            lambda: [p.unlink() for p in written_since(args.output, before)]):
        meta = prepare(args.input, args.tokenizer, args.output, args.workers, args.field,
                       args.max_docs, partition, args.shard_mb * 2**20)
    if meta is None:
        print(f"data: partition {args.partition} of {args.output} done; the others still run "
              f"(the last to finish writes meta.json, or `janus-pretrain data merge {args.output}`)")
    else:
        _print_meta(meta, args.output)


def _print_meta(meta: dict, output: str) -> None:
    print(f"data: {meta['documents']} documents, {meta['tokens']} tokens in "
          f"{len(meta['shards'])} shards -> {output}; skipped {meta['skipped']['empty']} "
          f"empty and {meta['skipped']['invalid_utf8']} non-UTF-8 documents")


def _data_merge(args) -> None:
    from janus_pretrain.data.prepare import merge

    _print_meta(merge(args.output, args.parts), args.output)


def _data_verify(args) -> None:
    from janus_pretrain.data.shards import verify_corpus

    meta = verify_corpus(args.directory)
    print(f"data: {args.directory}: {len(meta['shards'])} shards, {meta['documents']} documents, "
          f"{meta['tokens']} tokens match their checksums")


def _train(args) -> None:
    from janus_pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check:  # on a Slurm batch node: without DeepSpeed's and megatron-core's imports
        from janus_pretrain.train.preflight import check

        accum = check(cfg)
        print(f"config: ok ({os.environ.get('WORLD_SIZE', '1')} ranks, accumulation {accum})")
        return
    from janus_pretrain.parallel import state
    from janus_pretrain.train.loop import train
    from janus_pretrain.train.signals import REQUEUE_EXIT_CODE

    try:
        result = train(cfg, resume=args.resume)
        if result.rank == 0:
            print(f"checkpoint: {result.checkpoint}")
            print(f"wandb run (offline unless WANDB_MODE/WANDB_API_KEY): {result.wandb_dir}")
            print(f"metrics: {cfg.train.output_dir}/metrics.jsonl, curves: loss.png beside it")
            if result.stopped_by:
                print(f"train: stopped by {result.stopped_by} after step {result.step}; "
                      f"exit status {REQUEUE_EXIT_CODE} asks for a requeue (then --resume)")
    finally:
        state.shutdown()
    if result.stopped_by:
        sys.exit(REQUEUE_EXIT_CODE)


def _plan(args) -> None:
    from janus_pretrain.plan import main

    main(args)


def _checkpoint_consolidate(args) -> None:
    from janus_pretrain.checkpoint.weights import consolidate

    print(f"consolidated: {consolidate(args.checkpoint, args.output)}")


def _convert_from_hf(args) -> None:
    from janus_pretrain.checkpoint.hf import from_hf

    print(f"converted: {from_hf(args.source, args.output)}")


def _convert_to_hf(args) -> None:
    from janus_pretrain.checkpoint.hf import export

    print(f"exported: {export(args.source, args.output)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="janus-pretrain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    t = tok_sub.add_parser("train", help="train on text files (one sentence/paragraph a line)")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--output", required=True, help="the .model file to write")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    t.add_argument("--max-sentences", type=int, default=1_000_000,
                   help="sample at most this many lines for training")
    t.set_defaults(run=_tokenizer_train)

    data = sub.add_parser("data", help="prepare token shards")
    data_sub = data.add_subparsers(dest="action", required=True)
    d = data_sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards")
    d.add_argument("--input", nargs="+", required=True,
                   help="local .txt/.jsonl/.parquet files, or one HF hub dataset name")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--output", required=True, help="directory for the shards and meta.json")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--field", default="text", help="text column of jsonl/parquet/hub data")
    d.add_argument("--max-docs", type=int, default=None)
    d.add_argument("--partition", default="0/1",
                   help="i/N: prepare the i-th of N slices (N nodes sharing --output); a rerun "
                        "keeps finished shards")
    d.add_argument("--shard-mb", type=int, default=256, help="MB of text per shard (at most)")
    d.set_defaults(run=_data_prepare)
    m = data_sub.add_parser("merge", help="write meta.json once every partition has finished")
    m.add_argument("output")
    m.add_argument("--from", dest="parts", nargs="+", default=(),
                   help="partitions prepared into other directories: their shards move to output")
    m.set_defaults(run=_data_merge)
    v = data_sub.add_parser("verify", help="check prepared shards against meta.json's checksums "
                                           "(once after a prepare or a copy; training trusts them)")
    v.add_argument("directory")
    v.set_defaults(run=_data_verify)

    tr = sub.add_parser("train", help="pretrain (or fine-tune) with DeepSpeed")
    tr.add_argument("--config", required=True, help="run YAML, e.g. configs/pretrain/demo.yaml")
    tr.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    tr.add_argument("--check", action="store_true",
                    help="check the config and data for WORLD_SIZE ranks, then exit (0, or 2)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    tr.set_defaults(run=_train)

    from janus_pretrain.plan import parser as plan_parser

    pl = sub.add_parser("plan", help="which layouts fit on N GPUs, how fast, how many days")
    plan_parser(pl).set_defaults(run=_plan)

    ck = sub.add_parser("checkpoint", help="work with training checkpoints")
    ck_sub = ck.add_subparsers(dest="action", required=True)
    c = ck_sub.add_parser("consolidate", help="any TP x DP x ZeRO checkpoint -> one fp32 file")
    c.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ dir or step_* dir")
    c.add_argument("--output", required=True,
                   help="the safetensors file to write (loads at any TP size)")
    c.set_defaults(run=_checkpoint_consolidate)

    cv = sub.add_parser("convert", help="Hugging Face BART in and out (model.arch=bart)")
    cv_sub = cv.add_subparsers(dest="action", required=True)
    f = cv_sub.add_parser("from-hf", help="a BART save_pretrained directory (or hub name) -> "
                                          "a consolidated file")
    f.add_argument("source", help="directory with config.json, weights and tokenizer files")
    f.add_argument("--output", required=True, help="the safetensors file to write")
    f.set_defaults(run=_convert_from_hf)
    h = cv_sub.add_parser("to-hf", help="a checkpoint or consolidated file -> a directory "
                                        "BartForConditionalGeneration.from_pretrained loads")
    h.add_argument("source", help="run dir, checkpoints/ dir, step_* dir or consolidated file")
    h.add_argument("--output", required=True, help="the directory to write")
    h.set_defaults(run=_convert_to_hf)

    generate_cli.add_parser(sub)
    return p


def parse_with_overrides(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse gives a positional nargs="*" (the key=value overrides) only its first run of
    values, so overrides on both sides of an option (`a=1 --init-from X b=2`) came back as
    "unrecognized arguments": they are taken here, in their order."""
    args, extra = p.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        p.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> None:
    silence_third_party()
    args = parse_with_overrides(parser(), argv)
    run_cli(args.run, args)


if __name__ == "__main__":
    main()
