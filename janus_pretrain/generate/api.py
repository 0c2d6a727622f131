"""Load a JANUS checkpoint once, then decode batches of source strings AR or NAR.

    gen = Generator.from_checkpoint("runs/demo/train")        # a run dir or a step_* dir
    gen = Generator.from_consolidated("model.safetensors")    # `checkpoint consolidate` output
    gen.generate(["a source sentence"], mode="ar", beam=5)
    gen.generate(["a source sentence"], mode="nar", iterations=4)
    gen.generate(["a source sentence"], mode="bang_nar")      # a BANG NAR checkpoint: one pass
    gen.generate(["a source sentence"], mode="spec", spec_block=4)  # AR greedy's output, drafted
    gen.stats                                                 # passes and tokens of the last call

A BANG checkpoint (objective.kind=bang) decodes `ar` with its first predicting stream, as trained.

Sources are sorted by length and decoded in batches of `batch_size`, then returned in input
order; an empty source gives an empty hypothesis. Sources longer than data.max_source_len are cut
(counted on stderr). A mode the checkpoint's objective never trained is refused unless
`force=True`. Under tensor parallelism every rank calls `generate` with the same inputs.

A consolidated file decoded at TP = 1 needs torch alone: no process group, and neither
megatron-core nor DeepSpeed is imported (model/layers.py, parallel/tp.py).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from janus_pretrain.checkpoint import consolidated, store, weights
from janus_pretrain.config import DECODING_TERMS, RunConfig, from_dict
from janus_pretrain.data.padding import pad_batch, with_bos_eos
from janus_pretrain.errors import JanusError, NonFiniteOutput
from janus_pretrain.generate.ar import beam_search, greedy
from janus_pretrain.generate.bang import one_pass
from janus_pretrain.generate.hypothesis import Hypothesis
from janus_pretrain.generate.nar import mask_predict
from janus_pretrain.generate.spec import ACCEPT, speculative
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import reshard, tp
from janus_pretrain.tokenizer import PAD, Tokenizer, load_tokenizer


# Decoding modes: AR search, JANUS mask-predict, BANG's one-pass NAR, and self-speculative
# decoding (the NAR stream drafts, the AR stream verifies: generate/spec.py).
MODES = ("ar", "nar", "bang_nar", "spec")


def _model(cfg: RunConfig, tokenizer: Tokenizer) -> JanusModel:
    return JanusModel(cfg.model, tokenizer.vocab_size, PAD, mask_vector=cfg.objective.is_bang)


@dataclass
class DecodeOptions:
    """Search settings; `beam=1` with mode ar is greedy search. `bang_nar` uses max_len only.
    `spec` drafts `spec_block` tokens per iteration and accepts them `exact`ly as AR greedy would
    or `relaxed` (among AR's `spec_top` best, within `spec_margin` of its best log-prob)."""

    mode: str = "ar"
    beam: int = 5
    length_penalty: float = 1.0
    max_len: int = 200
    no_repeat_ngram: int = 0
    iterations: int = 10
    length_beam: int = 3
    dedup: bool = False
    rerank: bool = False
    batch_size: int = 32
    spec_block: int = 4
    spec_accept: str = "exact"
    spec_top: int = 3
    spec_margin: float = 1.0
    force_lengths: Optional[Sequence[int]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise JanusError(f"generate: mode '{self.mode}' is not one of {', '.join(MODES)}")
        # The name is the option's and, with dashes, the command line's flag.
        for name, least in (("beam", 1), ("max_len", 1), ("iterations", 1), ("length_beam", 1),
                            ("batch_size", 1), ("spec_block", 1), ("spec_top", 1),
                            ("no_repeat_ngram", 0)):
            if getattr(self, name) < least:
                raise JanusError(f"generate: {name} (--{name.replace('_', '-')}) must be at "
                                 f"least {least}, not {getattr(self, name)}")
        for name in ("length_penalty", "spec_margin"):
            if not math.isfinite(getattr(self, name)):
                raise JanusError(f"generate: {name} (--{name.replace('_', '-')}) must be a "
                                 f"finite number, not {getattr(self, name)}")
        if self.spec_accept not in ACCEPT:
            raise JanusError(f"generate: spec_accept '{self.spec_accept}' is not one of "
                             f"{', '.join(ACCEPT)}")
        if self.spec_margin < 0:
            raise JanusError("generate: spec_margin (--spec-margin) must be at least 0")


@dataclass
class DecodeStats:
    """Decoder passes and emitted tokens (EOS included) of one `decode_ids` call, for the modes
    that count them: AR greedy (one pass per token) and spec (a draft and a verify pass per
    iteration). Times: spec's draft and verify phases (generate/spec.py::SpecStats)."""
    sentences: int = 0
    passes: int = 0
    tokens: int = 0
    iterations: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0

    @property
    def passes_per_sentence(self) -> float:
        return self.passes / max(self.sentences, 1)

    @property
    def tokens_per_iteration(self) -> float:
        return self.tokens / max(self.iterations, 1)


class Generator:
    """Decodes with one model, in the modes its objective trained (see check_mode)."""

    def __init__(self, model: JanusModel, tokenizer: Tokenizer, cfg: RunConfig,
                 device: torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.stats = DecodeStats()

    @classmethod
    def from_checkpoint(cls, path: str | Path, tensor_parallel: int = 1) -> "Generator":
        from janus_pretrain.parallel import state

        ckpt = weights.resolve(path)
        cfg = from_dict(store.read_meta(ckpt)["config"])
        tokenizer = load_tokenizer(ckpt)
        topo = state.initialize(tensor_parallel)
        model = _model(cfg, tokenizer)
        weights.load_into(model, weights.weights_for_this_rank(ckpt, model), ckpt)
        return cls(model.to(topo.device), tokenizer, cfg, topo.device)

    @classmethod
    def from_consolidated(cls, path: str | Path, tensor_parallel: int = 1) -> "Generator":
        """Load a file written by `checkpoint consolidate` or `convert from-hf`, at any TP size.
        At TP = 1 in a process without tensor parallelism set up, this is torch alone."""
        saved = consolidated.read(path)
        cfg = from_dict(saved.config)
        if tensor_parallel > 1 or tp.megatron_state() is not None:
            from janus_pretrain.parallel import state

            device = state.initialize(tensor_parallel).device
        else:
            device = tp.pick_device(0)
        model = _model(cfg, saved.tokenizer)
        weights.load_into(model, reshard.shard_for_this_rank(saved.weights, model), path)
        return cls(model.to(device), saved.tokenizer, cfg, device)

    def check_mode(self, mode: str, force: bool = False) -> None:
        """Refuse a mode the objective never trained (ObjectiveConfig.decoding_modes): its
        stream decodes to fluent-looking repetition, not to an error."""
        objective = self.cfg.objective
        trained = objective.decoding_modes()
        if mode == "spec":
            if objective.is_bang:
                raise JanusError(f"generate: spec decoding drafts with JANUS's NAR stream; "
                                 f"objective.kind={objective.kind} has none")
            for needed in ("ar", "nar"):  # the AR stream verifies, the NAR stream drafts
                self.check_mode(needed, force)
            return
        if force or mode in trained:
            return
        if objective.kind == "janus" and mode in DECODING_TERMS:
            term = DECODING_TERMS[mode]
            why = f"objective.weights.{term}={getattr(objective.weights, term)}"
        else:
            why = f"objective.kind={objective.kind}"
        raise JanusError(f"generate: this checkpoint's objective never trained {mode.upper()} "
                         f"decoding ({why}; it trained: {', '.join(trained) or 'neither'}); pass "
                         f"--force-mode (force=True) to decode anyway")

    def source_ids(self, sources: Sequence[str]) -> list[np.ndarray]:
        """Source strings -> id arrays with BOS/EOS, cut to data.max_source_len; how many were
        cut goes to stderr, since the end of a cut source is silently missing from its output."""
        keep = self.cfg.data.max_source_len - 2
        ids = self.tokenizer.encode(sources)
        cut = sum(len(x) > keep for x in ids)
        if cut and tp.rank() == 0:
            print(f"generate: warning: {cut} of {len(ids)} sources were longer than {keep} tokens "
                  f"and were cut to their first {keep} (data.max_source_len="
                  f"{self.cfg.data.max_source_len} with BOS and EOS)", file=sys.stderr, flush=True)
        return [with_bos_eos(np.asarray(x[:keep], dtype=np.int64)) for x in ids]

    def decode_ids(self, src: list[np.ndarray], opts: DecodeOptions) -> list[Hypothesis]:
        """Source id arrays (with BOS/EOS) -> the best hypothesis each, in input order; a
        non-finite log-probability is NonFiniteOutput."""
        order = sorted(range(len(src)), key=lambda i: len(src[i]))
        self.stats = DecodeStats()
        out: list[Optional[Hypothesis]] = [None] * len(src)
        for start in range(0, len(order), opts.batch_size):
            idx = order[start:start + opts.batch_size]
            batch = pad_batch([src[i] for i in idx]).to(self.device)
            forced = None if opts.force_lengths is None else [opts.force_lengths[i] for i in idx]
            for i, hyp in zip(idx, self._search(batch, opts, forced)):
                out[i] = hyp
        bad = sum(not math.isfinite(h.log_prob) for h in out)
        if bad:  # NaN log-probs decode to empty or repeated tokens: never a result
            raise NonFiniteOutput(f"generate: the model's log-probabilities are NaN or inf for "
                                  f"{bad} of {len(out)} sources: its weights diverged (a run "
                                  f"whose loss went NaN); decode an earlier checkpoint")
        return out

    @torch.no_grad()
    def _search(self, src: torch.Tensor, opts: DecodeOptions, forced: Optional[list[int]]
                ) -> list[Hypothesis]:
        memory, memory_mask = self.model.run_encoder(src)
        if opts.mode == "bang_nar":
            return one_pass(self.model, memory, memory_mask, opts.max_len)
        if opts.mode == "nar":
            lengths = None if forced is None else torch.tensor(forced, device=self.device)
            return mask_predict(self.model, memory, memory_mask, opts.iterations,
                                opts.length_beam, lengths, opts.max_len, opts.dedup, opts.rerank)
        if forced is not None and len(set(forced)) > 1:
            # A forced length is one number per AR batch: decode such sources one by one.
            return [h for i in range(src.shape[0])
                    for h in self._search(src[i:i + 1], opts, forced[i:i + 1])]
        force_len = forced[0] if forced is not None else None
        if opts.mode == "spec":
            hyps, spec = speculative(self.model, memory, memory_mask, opts.max_len,
                                     opts.spec_block, opts.spec_accept, opts.spec_top,
                                     opts.spec_margin, force_len)
            s = self.stats
            s.sentences += len(hyps)
            s.passes += 2 * sum(spec.iterations)
            s.iterations += sum(spec.iterations)
            s.tokens += sum(spec.emitted)
            s.accepted += sum(spec.accepted)
            s.draft_s, s.verify_s = s.draft_s + spec.draft_s, s.verify_s + spec.verify_s
            s.total_s += spec.total_s
            return hyps
        stream = self.cfg.objective.kind == "bang"
        if opts.beam == 1:
            hyps = greedy(self.model, memory, memory_mask, opts.max_len, force_len,
                          predict_stream=stream)
            steps = sum(len(h.tokens) + 1 for h in hyps)
            self.stats.sentences += len(hyps)
            self.stats.passes += steps
            self.stats.tokens += steps
            return hyps
        beams = beam_search(self.model, memory, memory_mask, opts.beam, opts.max_len,
                            opts.length_penalty, opts.no_repeat_ngram, force_len,
                            predict_stream=stream)
        # A source with no finished hypothesis: every score was NaN (decode_ids refuses it).
        return [b[0] if b else Hypothesis([], math.nan, math.nan) for b in beams]

    def generate(self, sources: Sequence[str], force: bool = False, **options) -> list[str]:
        """Source strings -> hypothesis strings, one each (see DecodeOptions for the options).
        A source with no tokens gives "" without decoding: the model would invent a sentence.
        `force` decodes in a mode the objective never trained (see check_mode)."""
        opts = DecodeOptions(**options)
        self.check_mode(opts.mode, force)
        src = self.source_ids(sources)
        todo = [i for i, ids in enumerate(src) if len(ids) > 2]  # more than BOS and EOS
        if opts.force_lengths is not None:
            opts = replace(opts, force_lengths=[opts.force_lengths[i] for i in todo])
        out = [""] * len(src)
        for i, hyp in zip(todo, self.decode_ids([src[i] for i in todo], opts)):
            out[i] = self.tokenizer.decode(hyp.tokens)
        return out
