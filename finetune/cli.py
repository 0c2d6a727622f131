"""`janus-finetune`: prepare a task, fine-tune, evaluate AR and NAR, compare.

    janus-finetune tasks
    janus-finetune prepare  --task multi30k_ende --output runs/m30k/data [--tokenizer pre.model]
    janus-finetune distill  --task multi30k_ende --teacher runs/m30k/ar --output runs/m30k/kd
    janus-finetune prepare  --task multi30k_ende --distilled runs/m30k/kd --output runs/m30k/kd_data
    janus-finetune train    --task multi30k_ende --data runs/m30k/data \
                            --config configs/finetune/janus.yaml [--init-from ckpt] [key=value ...]
    janus-finetune evaluate --task multi30k_ende --checkpoint runs/m30k/janus --output r.json
    janus-finetune compare  --results a.json b.json --output-dir docs/results
    janus-finetune experiment run multi30k [--dry-run]   (experiments/multi30k.yaml)
    janus-finetune experiment report multi30k            (docs/results from its JSONs alone)

`train` is the pretraining loop (janus_pretrain.train.loop) given a pair corpus: on several
ranks, launch `janus-pretrain train` with the same config and `data.train=<data>/target
data.source=<data>/source data.tokenizer=<data>/tokenizer.model`, then `janus-finetune select`.
User errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from janus_pretrain.cli import parse_with_overrides
from janus_pretrain.errors import JanusError, run_cli
from janus_pretrain.quiet import silence_third_party


def _tasks(args) -> None:
    from finetune.tasks import TASKS, data_root

    root = data_root(args.data_root)
    for t in TASKS.values():
        here = all(p.is_file() for split in t.splits for p in t.files(split, root))
        print(f"{t.name:<16} {'available' if here else 'missing  '}  {','.join(t.metrics):<32} "
              f"{t.description}")


def _prepare(args) -> None:
    from finetune.pairs import prepare_pairs
    from finetune.tasks import get_task

    s = prepare_pairs(get_task(args.task), args.output, args.tokenizer, args.vocab_size,
                      args.max_pairs, args.workers, args.data_root, args.distilled)
    kind = " distilled" if args.distilled else ""
    print(f"prepare: {s['pairs']} {args.task}{kind} training pairs (dropped {s['dropped_empty']} with an "
          f"empty side), vocabulary {s['vocab_size']} -> {args.output}")


def _distill(args) -> None:
    from janus_pretrain.parallel import state
    from finetune.distill import TARGETS, distill
    from finetune.tasks import get_task

    try:
        r = distill(get_task(args.task), args.teacher, args.output, args.beam, args.batch_size,
                    args.max_pairs, args.valid_size, args.chunk_batches, args.max_chunks,
                    args.data_root)
    finally:
        state.shutdown()
    if r is not None:
        score = ("not scored (--valid-size 0)" if r["valid_score"] is None else
                 f"validation {r['metric']} {r['valid_score']:.2f} (beam {r['beam']}, "
                 f"{r['valid_size']} pairs)")
        print(f"distill: {r['lines']} lines -> {Path(args.output) / TARGETS} in "
              f"{r['decode_s']:.0f} s; teacher {score}")


def _select(task, run: Path, args) -> None:
    from finetune.checkpoints import average_last, select_best

    if args.average_last:
        print(f"select: averaged -> {average_last(run, args.average_last)}")
    best, scores = select_best(task, run, args.valid_size, args.data_root)
    shown = ", ".join(f"{name} {v:.2f}" for name, v in scores.items())
    print(f"select: validation {task.metrics[0]}: {shown}; best -> {best}")


@contextlib.contextmanager
def _requeue_on_stop_signal():
    """A stop signal during the select that follows training (the run is checkpointed, nothing
    is left to save) ends it at once with REQUEUE_EXIT_CODE and says so: the requeued --resume
    finds the finished run and selects again. Without this, SIGTERM ended it as 143, silently."""
    from janus_pretrain.train.signals import REQUEUE_EXIT_CODE, STOP_SIGNALS

    def stop(signum, frame):
        print(f"select: stopped by {signal.Signals(signum).name}; exit status "
              f"{REQUEUE_EXIT_CODE} asks for a requeue (then --resume selects again)", flush=True)
        raise SystemExit(REQUEUE_EXIT_CODE)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(args) -> None:
    from janus_pretrain.config import load_config
    from janus_pretrain.parallel import state
    from janus_pretrain.train.loop import train
    from janus_pretrain.train.signals import REQUEUE_EXIT_CODE
    from finetune.pairs import data_overrides
    from finetune.tasks import get_task

    task = get_task(args.task)
    defaults = data_overrides(task, args.data)
    if args.init_from:
        defaults.append(f"train.init_from={args.init_from}")
    cfg = load_config(args.config, [*defaults, *args.overrides])
    try:
        live = None
        if cfg.train.eval_interval:  # validated in the loop, which also keeps checkpoints/best
            from finetune.live_eval import task_eval

            live = task_eval(task, cfg, args.valid_size, args.data_root)
        result = train(cfg, resume=args.resume, task_eval=live)
        print(f"train: step {result.step}, checkpoint {result.checkpoint}")
        if result.stopped_by:  # preempted: no `select` in the grace period, ask for a requeue
            print(f"train: stopped by {result.stopped_by} after step {result.step}; exit status "
                  f"{REQUEUE_EXIT_CODE} asks for a requeue (then --resume)")
        elif not cfg.train.eval_interval:
            with _requeue_on_stop_signal():
                _select(task, Path(cfg.train.output_dir), args)
    finally:
        state.shutdown()
    if result.stopped_by:
        sys.exit(REQUEUE_EXIT_CODE)


def _select_cmd(args) -> None:
    from janus_pretrain.parallel import state
    from finetune.tasks import get_task

    state.initialize(1)
    try:
        _select(get_task(args.task), Path(args.run), args)
    finally:
        state.shutdown()


def _evaluate(args) -> None:
    from janus_pretrain.parallel import state
    from finetune.evaluate import evaluate, write
    from finetune.tasks import get_task

    try:
        results = evaluate(get_task(args.task), args.checkpoint, args.split, args.limit,
                           args.latency_sentences, args.batch_size, args.name, args.data_root)
    finally:
        state.shutdown()
    print(f"evaluate: -> {write(results, args.output)}")
    for note in results["notes"]:
        print(f"evaluate: note: {note}")


def _compare(args) -> None:
    from finetune.compare import compare

    paths = compare(args.results, args.output_dir, args.note)
    print("compare: " + ", ".join(str(p) for p in paths.values()))


def _experiment(args) -> None:
    from finetune import experiment

    plan = experiment.Plan(experiment.load(args.name), args.data_root or "../shared/data")
    if args.dry_run:
        print(experiment.dry_run(plan))
    else:
        experiment.execute(plan, args.threads)


def _experiment_report(args) -> None:
    from finetune import experiment
    from finetune.compare import compare, load_results

    spec = experiment.load(args.name)
    results_dir = Path(spec.get("results_dir", "docs/results"))
    for task in [args.task] if args.task else experiment.tasks(spec):
        files = sorted(results_dir.glob(f"{task}.*.json"))
        if not files:
            raise JanusError(f"experiment: no results for {task} under {results_dir} yet")
        results = load_results(files)
        paths = compare(files, results_dir, experiment.report_notes(results),
                        experiment.provenance_table(results))
        print("experiment: report " + ", ".join(str(p) for p in paths.values()))


def _selection_args(p) -> None:
    p.add_argument("--average-last", type=int, default=0,
                   help="also average the newest k checkpoints and consider the average")
    p.add_argument("--valid-size", type=int, default=200,
                   help="validation pairs decoded to pick the best checkpoint")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="janus-finetune", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None,
                   help="where task files live (default: $JANUS_DATA or ../shared/data)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("tasks", help="list the tasks and whether their files are here").set_defaults(handler=_tasks)

    pr = sub.add_parser("prepare", help="tokenize a task's training pairs into aligned shards")
    pr.add_argument("--task", required=True)
    pr.add_argument("--output", required=True)
    pr.add_argument("--tokenizer", help="reuse this tokenizer (that of a pretrained checkpoint)")
    pr.add_argument("--vocab-size", type=int, default=8000, help="when training a tokenizer")
    pr.add_argument("--max-pairs", type=int, default=None)
    pr.add_argument("--workers", type=int, default=2)
    pr.add_argument("--distilled", help="targets from this `distill` output, not the references")
    pr.set_defaults(handler=_prepare)

    di = sub.add_parser("distill", help="decode the training sources with a teacher's AR mode "
                                        "(sequence-level distillation; resumable)")
    di.add_argument("--task", required=True)
    di.add_argument("--teacher", required=True, help="run dir, checkpoints/best or a step dir")
    di.add_argument("--output", required=True, help="directory for targets.txt and teacher.json")
    di.add_argument("--beam", type=int, default=5)
    di.add_argument("--batch-size", type=int, default=64)
    di.add_argument("--max-pairs", type=int, default=None, help="the first N training sources only")
    di.add_argument("--valid-size", type=int, default=200,
                    help="validation pairs decoded to score the teacher (0: none)")
    di.add_argument("--chunk-batches", type=int, default=16,
                    help="batches between two progress records")
    di.add_argument("--max-chunks", type=int, default=None,
                    help="stop after this many chunks; rerun to continue")
    di.set_defaults(handler=_distill)

    tr = sub.add_parser("train", help="fine-tune through the training loop, then pick the best checkpoint")
    tr.add_argument("--task", required=True)
    tr.add_argument("--data", required=True, help="directory written by `janus-finetune prepare`")
    tr.add_argument("--config", required=True, help="configs/finetune/{janus,ar,cmlm}.yaml")
    tr.add_argument("--init-from", help="pretrained checkpoint (model weights only)")
    tr.add_argument("--resume", action="store_true")
    _selection_args(tr)
    tr.add_argument("overrides", nargs="*", help="key=value config overrides")
    tr.set_defaults(handler=_train)

    se = sub.add_parser("select", help="pick the best (or averaged) checkpoint of a finished run")
    se.add_argument("--task", required=True)
    se.add_argument("--run", required=True, help="the run's train.output_dir")
    _selection_args(se)
    se.set_defaults(handler=_select_cmd)

    ev = sub.add_parser("evaluate", help="decode the test split AR and NAR; metrics and latency")
    ev.add_argument("--task", required=True)
    ev.add_argument("--checkpoint", required=True, help="run dir, checkpoints/best or a step dir")
    ev.add_argument("--output", required=True, help="results JSON")
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, default=None, help="first N examples only")
    ev.add_argument("--name", help="system name in reports (default: the run directory's)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--latency-sentences", type=int, default=50)
    ev.set_defaults(handler=_evaluate)

    co = sub.add_parser("compare", help="markdown + JSON + PNG against published baselines")
    co.add_argument("--results", nargs="+", required=True)
    co.add_argument("--output-dir", required=True)
    co.add_argument("--note", action="append", default=[], help="a line for the report header")
    co.set_defaults(handler=_compare)

    ex = sub.add_parser("experiment", help="run an experiment of experiments/*.yaml, or rebuild "
                                           "its report").add_subparsers(dest="action", required=True)
    er = ex.add_parser("run", help="run the steps not done yet (each leaves a done-file)")
    er.add_argument("name", help="experiments/<name>.yaml, or a path to a YAML file")
    er.add_argument("--dry-run", action="store_true", help="print the plan and what is done")
    er.add_argument("--threads", type=int, help="OMP threads per step (default: the file's)")
    er.set_defaults(handler=_experiment)
    ep = ex.add_parser("report", help="rebuild docs/results/<task>.md/.json/.png from the JSONs")
    ep.add_argument("name")
    ep.add_argument("--task", help="one of the experiment's tasks (default: all)")
    ep.set_defaults(handler=_experiment_report)
    return p


def main(argv: list[str] | None = None) -> None:
    silence_third_party()
    args = parse_with_overrides(parser(), argv)
    run_cli(args.handler, args)


if __name__ == "__main__":
    main()
