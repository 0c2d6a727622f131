"""Typed run configuration: YAML files under configs/ plus `key=value` overrides.

OmegaConf structured configs give us type checking and unknown-key detection; the dataclasses'
`__post_init__` checks the values that must agree with each other. Every problem surfaces as one
`JanusError` line that names the offending key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from janus_pretrain.errors import JanusError

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise JanusError(f"config: {key}: {message}")


@dataclass
class ModelConfig:
    """Encoder-decoder shape (docs/method.md, section 7); the vocabulary size comes from the tokenizer.

    `arch` picks the layer flavour: "janus" (pre-LN, a final LayerNorm per stack) or "bart"
    (Hugging Face / fairseq BART: post-LN, a LayerNorm on the embeddings, positions offset by 2, a
    final-logits bias), so BART weights load and export unchanged (checkpoint/hf.py)."""

    arch: str = "janus"
    encoder_layers: int = 6
    decoder_layers: int = 6
    hidden_size: int = 768
    ffn_hidden_size: int = 3072
    num_heads: int = 12
    max_positions: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0  # after the feed-forward activation (BART's activation_dropout)
    scale_embedding: bool = False  # token embeddings times sqrt(hidden_size) (BART's scale_embedding)
    length_classes: int = 256
    # Megatron pads the vocabulary so every tensor-parallel shard has the same size.
    vocab_divisible_by: int = 128
    # "full": recompute every encoder/decoder layer in backward (model/recompute.py).
    activation_checkpointing: str = "none"
    # "flex": FlexAttention with a block mask on CUDA (model/flex.py); CPU always runs SDPA.
    attention: str = "sdpa"

    def __post_init__(self):
        for name in ("encoder_layers", "decoder_layers", "hidden_size", "ffn_hidden_size",
                     "num_heads", "max_positions", "length_classes", "vocab_divisible_by"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be positive")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
               f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        _check(self.arch in ("janus", "bart"), "model.arch", f"{self.arch!r} is not one of janus, bart")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, f"model.{name}", "must be in [0, 1)")
        _check(self.activation_checkpointing in ("none", "full"), "model.activation_checkpointing",
               f"{self.activation_checkpointing!r} is not one of none, full")
        _check(self.attention in ("sdpa", "flex"), "model.attention",
               f"{self.attention!r} is not one of sdpa, flex")
        _check(self.attention != "flex" or self.attention_dropout == 0.0, "model.attention",
               "flex has no attention dropout: set model.attention_dropout=0")


@dataclass
class LossWeights:
    """Weights of the JANUS loss terms (docs/method.md, section 4); 0 switches a term off."""

    ce_ar: float = 0.5
    ce_nar: float = 0.5
    ce_aux: float = 0.5
    kl_ar_nar: float = 0.0
    kl_ar_aux: float = 0.5
    kl_nar_aux: float = 0.5
    length: float = 0.0

    def decoding_modes(self) -> list[str]:
        """The modes ("ar", "nar") these weights train (objective.kind=janus; see
        ObjectiveConfig.decoding_modes): a stream without its cross-entropy term was never
        taught to produce text (the KL terms only pull it towards another)."""
        return [mode for mode, term in DECODING_TERMS.items() if getattr(self, term) > 0]


# The cross-entropy term that trains each decoding mode.
DECODING_TERMS = {"ar": "ce_ar", "nar": "ce_nar"}
# objective.kind -> what it builds (docs/method.md, sections 1-4 and 9).
OBJECTIVE_KINDS = ("janus", "bang", "bang_nar")


@dataclass
class ObjectiveConfig:
    """Which objective, how a batch is masked and which loss terms apply.

    `kind`: `janus` (the weighted JANUS terms below), `bang` (BANG's main stream plus `streams`
    cross-visible predicting streams of [MASK]; streams=1 is BANG's AR fine-tuning) or
    `bang_nar` (BANG's NAR fine-tuning: all-[MASK] input, causal); docs/method.md, section 9.
    `denoise` is BART text infilling on the encoder with the union mask on the decoder
    (pretraining); `span` and `uniform` mask only the target (fine-tuning); `none` masks nothing
    (BANG fine-tuning, whose decoder input does not depend on a target mask).
    """

    kind: str = "janus"
    masking: str = "denoise"
    weights: LossWeights = field(default_factory=LossWeights)
    label_smoothing: float = 0.0
    # Decoder NAR/AUX masking for `span` / `uniform`: ceil(ratio * n) target tokens.
    target_mask_ratio: float = 0.7
    target_span_lambda: float = 2.0
    # Encoder text infilling for `denoise`.
    source_mask_ratio: float = 0.3
    source_span_lambda: float = 3.0
    # Share of the decoder mask that the encoder does see (the rest is the encoder-masked spans).
    extra_mask_share: float = 0.5
    # `authors`: spans sampled as the JANUS authors' code does (docs/method.md, section 3: ~0.57
    # of a target masked for ratio 0.7; pretraining spans over source_mask_ratio, each hidden from
    # the encoder with probability 1 - extra_mask_share); `exact`: exactly ceil(ratio * n) target
    # tokens, and for `denoise` source_mask_ratio hidden plus extra visible spans on top.
    mask_sampler: str = "exact"
    # `term`: every loss term is a mean over its own tokens; `target_tokens` (the authors'
    # pretraining): each term's sum over its tokens divided by the number of target tokens.
    loss_normalization: str = "term"
    # Ours, not the authors' (they weigh the KL terms fully from step 0): the symmetric-KL weights
    # ramp linearly from 0 to their value over the first kl_warmup_steps updates; 0: no warm-up.
    kl_warmup_steps: int = 0
    # 1: one encoder pass feeds every stream; 2: the JANUS authors' step (their janus_loss.py
    # calls the model twice), an encoder pass of its own, with its own dropout, for the AR
    # stream and for the NAR/AUX pass, so that symKL(AR, .) also ties two dropout samples of
    # the encoder (R-Drop-like). Costs one more encoder pass per step.
    encoder_passes: int = 1
    # Ours, not the authors': the AR side of symKL(AR, NAR) and symKL(AR, AUX) is detached, so
    # AR teaches NAR and AUX (online self-distillation) and is not pulled towards them. The
    # terms' values are unchanged; only their gradients into the AR logits are dropped.
    kl_ar_detach: bool = False
    # kind=bang: the number N of predicting streams (stream k predicts y_t with the k - 1
    # tokens before it unseen).
    streams: int = 4

    def __post_init__(self):
        _check(self.kind in OBJECTIVE_KINDS, "objective.kind",
               f"'{self.kind}' is not one of {', '.join(OBJECTIVE_KINDS)}")
        maskings = ("denoise", "none") if self.is_bang else ("denoise", "span", "uniform")
        _check(self.masking in maskings, "objective.masking",
               f"'{self.masking}' is not one of {', '.join(maskings)} (objective.kind={self.kind})")
        _check(self.streams >= 1, "objective.streams", "must be at least 1")
        _check(self.mask_sampler in ("authors", "exact"), "objective.mask_sampler",
               f"'{self.mask_sampler}' is not one of authors, exact")
        _check(self.loss_normalization in ("term", "target_tokens"), "objective.loss_normalization",
               f"'{self.loss_normalization}' is not one of term, target_tokens")
        _check(self.kl_warmup_steps >= 0, "objective.kl_warmup_steps", "must be >= 0")
        _check(self.encoder_passes in (1, 2), "objective.encoder_passes", "must be 1 or 2")
        _check(self.encoder_passes == 1 or not self.is_bang, "objective.encoder_passes",
               f"2 is a JANUS step (one encoder pass per stream); objective.kind={self.kind} has one")
        _check(0.0 <= self.label_smoothing < 1.0, "objective.label_smoothing", "must be in [0, 1)")
        for name in ("target_mask_ratio", "source_mask_ratio"):
            _check(0.0 < getattr(self, name) <= 1.0, f"objective.{name}", "must be in (0, 1]")
        _check(0.0 <= self.extra_mask_share < 1.0, "objective.extra_mask_share", "must be in [0, 1)")
        for name in ("target_span_lambda", "source_span_lambda"):
            _check(getattr(self, name) > 0, f"objective.{name}", "must be positive")
        for w in dataclasses.fields(LossWeights):
            _check(getattr(self.weights, w.name) >= 0, f"objective.weights.{w.name}",
                   "must be >= 0")

    @property
    def is_bang(self) -> bool:
        """BANG's objectives feed [MASK] as one learned input vector (JanusModel.mask_vector)."""
        return self.kind != "janus"

    def decoding_modes(self) -> list[str]:
        """The modes this objective trains (`evaluate` decodes these, `generate` refuses the
        others): JANUS's from its weights; BANG's AR predicting stream is decoded as `ar`, its
        NAR fine-tuning as `bang_nar` (one pass)."""
        if self.kind == "bang":
            return ["ar"]
        if self.kind == "bang_nar":
            return ["bang_nar"]
        return self.weights.decoding_modes()


@dataclass
class DataConfig:
    """Where the token shards and tokenizer are, and how samples are cut and batched.

    Batches hold `micro_batch_size` examples, or, with `max_tokens` set (as fairseq's
    --max-tokens), as many length-bucketed examples as fit in max_tokens padded cells (rows x
    longest row, with [BOS]/[EOS], source and target each): then `micro_batch_size` does not
    shape the batch (DeepSpeed only books it as the nominal micro-batch)."""

    # Required to train (RunConfig.check_data), not to describe a model or an objective.
    # shard directory written by `janus-pretrain data prepare`, or several blended by weight:
    # [{path: a, weight: 0.8}, {path: b, weight: 0.2}] or "0.8 a 0.2 b" (data/blend.py)
    train: Any = None
    tokenizer: Optional[str] = None  # sentencepiece .model, tokenizer.json, or a directory holding one
    # Fine-tuning pairs: shards whose document i is the source of document i of `train` (see
    # `janus-finetune prepare`); unset, the objective derives sources (pretraining, `denoise`).
    source: Optional[str] = None
    # Validation (train.eval_interval): target shards, and for pairs their aligned source shards.
    valid: Optional[str] = None
    valid_source: Optional[str] = None
    max_source_len: int = 512
    max_target_len: int = 512
    micro_batch_size: int = 8
    max_tokens: Optional[int] = None  # token budget per micro-batch; None: micro_batch_size rows
    # Pretraining only: train on the documents back to back, cut into blocks of
    # max_target_len - 2 ids (as BART), instead of one (mostly padded) document per row.
    pack_documents: bool = False
    # Collation (noise, padding) runs in `workers` processes, each `prefetch` micro-batches
    # ahead of the step, so the training process only launches kernels; either 0: collated in
    # the training process when the step asks.
    prefetch: int = 2
    workers: int = 1
    seed: int = 1234
    # Few batch shapes (data/buckets.py): source and target rows padded up to the next of these
    # lengths (capped at max_source_len / max_target_len), JANUS's masked slots up to the next
    # of `slot_shares` x the padded target length (else all of it). [] pads each batch to its
    # longest row, as before buckets; with max_tokens, a bucket's batches have equal rows.
    length_buckets: list[int] = field(default_factory=lambda: [
        16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
    slot_shares: list[float] = field(default_factory=lambda: [0.75])

    def __post_init__(self):
        _check(self.micro_batch_size > 0, "data.micro_batch_size", "must be positive")
        _check(all(b > 0 for b in self.length_buckets), "data.length_buckets",
               "every length must be positive")
        _check(all(0 < f <= 1 for f in self.slot_shares), "data.slot_shares",
               "every share must be in (0, 1]")
        _check(self.max_tokens is None or self.max_tokens >= max(self.max_source_len,
                                                                 self.max_target_len),
               "data.max_tokens", "must be at least max(data.max_source_len, "
               "data.max_target_len), so that every example fits in a batch")
        _check(not (self.pack_documents and self.source), "data.pack_documents",
               "packs pretraining documents; it cannot be used with data.source (pairs)")
        _check(self.prefetch >= 0, "data.prefetch", "must be >= 0")
        _check(self.workers >= 0, "data.workers", "must be >= 0")
        _check(self.max_source_len >= 8, "data.max_source_len", "must be at least 8")
        _check(self.max_target_len >= 8, "data.max_target_len", "must be at least 8")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine / linear decay to min_lr or constant."""

    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    decay: str = "cosine"
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    clip_grad: float = 1.0

    def __post_init__(self):
        _check(0 < self.lr < float("inf"), "optim.lr", "must be positive and finite")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        _check(self.decay in ("cosine", "linear", "constant"), "optim.decay",
               f"'{self.decay}' is not one of cosine, linear, constant")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class ParallelConfig:
    """Parallel layout: TP through megatron-core, data parallel + ZeRO through DeepSpeed."""

    tensor_parallel: int = 1
    deepspeed_config: str = "configs/deepspeed/zero0.json"
    precision: str = "fp32"
    # A collective that waits longer fails the rank (NCCL's watchdog aborts it): a hung or lost
    # rank becomes an exit, and slurm/launch.sh a requeue, in minutes (docs/training.md).
    timeout_minutes: float = 10.0

    def __post_init__(self):
        _check(self.tensor_parallel >= 1, "parallel.tensor_parallel", "must be >= 1")
        _check(self.timeout_minutes > 0, "parallel.timeout_minutes", "must be positive")
        _check(self.precision in ("fp32", "bf16", "fp16"), "parallel.precision",
               f"'{self.precision}' is not one of fp32, bf16, fp16")


@dataclass
class TrainConfig:
    """Loop length, accumulation, logging and checkpoint cadence."""

    steps: int = 1000  # optimizer steps of the whole run (the LR schedule spans these)
    # Stop this invocation (with a checkpoint) after reaching this step; `--resume` continues.
    exit_after: Optional[int] = None
    # Sequences per optimizer step over all ranks (tokens with data.max_tokens): accumulation
    # is derived per layout (train/batch_size.py), and a grad_accum other than 1 must agree.
    # Unset, train.grad_accum micro-batches per rank: the batch then grows with the GPU count.
    global_batch: Optional[int] = None
    grad_accum: int = 1
    log_interval: int = 10
    save_interval: int = 500
    # Save also about every this many minutes (None: by steps alone); the step it falls on is
    # planned from the measured step time (checkpoint/store.py Checkpointer).
    save_interval_minutes: Optional[float] = None
    # Write, hash and publish checkpoints in a background thread: a save stalls training only
    # for its copy to host memory (checkpoint/background.py). The last save of an invocation
    # (and a validated step's) is complete before the step ends either way.
    async_save: bool = True
    keep_checkpoints: int = 3  # the newest k complete checkpoints stay on disk
    # On --resume, a checkpoint whose files fail their checksums is an error; true falls back to
    # the previous complete one instead.
    resume_fallback: bool = False
    # Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.
    max_bad_steps: int = 10
    output_dir: str = "runs/pretrain"
    # A fresh run starts from this checkpoint's model weights (fine-tuning a pretrained model);
    # optimizer, schedule and data position start anew, and the tokenizer must be the same.
    init_from: Optional[str] = None
    seed: int = 1234
    # torch.compile the model (in place: checkpoint names stay). Works on CPU (inductor, needs a
    # C++ compiler) and GPU; the first steps compile for minutes, and every new target or
    # masked length (K) can recompile, so it pays only on long runs.
    compile: bool = False
    wandb_project: str = "janus-pretrain"
    wandb_name: Optional[str] = None
    # Validate every eval_interval steps (None: never): every loss term on data.valid, and a
    # fine-tuning task's metric; checkpoints/best follows the best score. A multiple of
    # save_interval, so that each validated step has a checkpoint to copy to best.
    eval_interval: Optional[int] = None
    eval_batches: int = 50  # validation micro-batches per data-parallel rank (fewer if the set is)

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_interval", "save_interval", "keep_checkpoints",
                     "max_bad_steps", "eval_batches"):
            _check(getattr(self, name) > 0, f"train.{name}", "must be positive")
        for name in ("global_batch", "save_interval_minutes"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"train.{name}",
                   "must be positive")
        _check(self.eval_interval is None or (self.eval_interval > 0 and
                                              self.eval_interval % self.save_interval == 0),
               "train.eval_interval", f"must be a positive multiple of train.save_interval="
               f"{self.save_interval} (best is copied from the step's checkpoint)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _check(self.model.num_heads % self.parallel.tensor_parallel == 0, "parallel.tensor_parallel",
               f"{self.parallel.tensor_parallel} does not divide model.num_heads={self.model.num_heads}")
        _check(self.model.vocab_divisible_by % self.parallel.tensor_parallel == 0,
               "parallel.tensor_parallel", f"{self.parallel.tensor_parallel} does not divide "
               f"model.vocab_divisible_by={self.model.vocab_divisible_by}")
        longest = max(self.data.max_source_len, self.data.max_target_len)
        _check(longest <= self.model.max_positions, "data.max_target_len",
               f"{longest} exceeds model.max_positions={self.model.max_positions}")
        _check(self.data.max_target_len <= self.model.length_classes or
               self.objective.weights.length == 0, "model.length_classes",
               f"{self.model.length_classes} cannot classify targets of data.max_target_len="
               f"{self.data.max_target_len}")

    def check_data(self) -> None:
        """What training needs beyond a valid config: the data, and data that fits the objective."""
        for name in ("train", "tokenizer"):
            _check(getattr(self.data, name) is not None, f"data.{name}", "required value is missing")
        _check((self.data.source is None) == (self.objective.masking == "denoise"), "data.source",
               "is needed by objective.masking=span|uniform|none (fine-tuning pairs) and unused "
               "by denoise (pretraining derives the sources)")
        _check(self.data.valid is None or
               (self.data.valid_source is None) == (self.data.source is None), "data.valid_source",
               "is needed exactly when data.source is (validation pairs like the training pairs)")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently,
    so a second `train:` block would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str = "config") -> dict:
    """A YAML mapping from a file, or one `<what>:` error line with the problem, line and column."""
    if path.is_dir():
        raise JanusError(f"{what}: {path} is a directory, not a YAML file")
    if not path.is_file():
        raise JanusError(f"{what}: file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as e:
        raise JanusError(f"{what}: {path} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JanusError(f"{what}: {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise JanusError(f"{what}: {path} must hold a mapping at the top level")
    return data


def _model_preset(name: str) -> dict:
    path = CONFIG_ROOT / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
        raise JanusError(f"config: model: unknown preset {name!r} (known: {', '.join(known)})")
    return read_yaml(path)


def _check_sections(data: dict, schema: type, prefix: str = "") -> None:
    """A section (`train:`, `objective.weights:`) given a plain value is one line naming it;
    OmegaConf would say "Merge error: int is not a subclass of TrainConfig" and no key. An empty
    section (`train:` alone) means no settings."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind, value = hints[f.name], data.get(f.name)
        if f.name not in data or not dataclasses.is_dataclass(kind):
            continue
        if value is None:
            del data[f.name]
        elif isinstance(value, dict):
            _check_sections(value, kind, f"{prefix}{f.name}.")
        else:
            raise JanusError(f"config: {prefix}{f.name}: must be a mapping of settings "
                             f"({prefix}{f.name}.<key>: value), not {value!r}")


def _parse_override(item: str):
    """One `key=value` override; its value is YAML, and a value YAML rejects names its key."""
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        key, value = item.split("=", 1)
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise JanusError(f"config: {key}: {value!r} is not a valid value ({problem})") from None


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Load a run config from YAML and `key=value` overrides into a validated `RunConfig`.

    `model: tiny` (in the file or as an override) names a preset under configs/model/; keys given
    next to it or as `model.x=...` overrides take precedence.
    """
    raw = read_yaml(Path(path)) if path else {}
    if path and not raw:  # it would train the default base model without a word
        raise JanusError(f"config: {path} holds no settings (it is empty or only comments)")
    dotlist = []
    for item in overrides:
        if "=" not in item:
            raise JanusError(f"config: override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key == "model":
            raw["model"] = value
        else:
            dotlist.append(item)
    model = raw.get("model")
    if isinstance(model, str):
        raw["model"] = _model_preset(model)
    elif isinstance(model, dict) and "preset" in model:
        model = dict(model)
        raw["model"] = {**_model_preset(model.pop("preset")), **model}
    overrides = [_parse_override(item) for item in dotlist]
    for section in [raw, *(OmegaConf.to_container(o) for o in overrides)]:
        _check_sections(section, RunConfig)
    try:
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, OmegaConf.create(raw), *overrides)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise JanusError(f"config: {missing[0]}: required value is missing")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0].strip()
        raise JanusError(f"config: {key}: {msg}") from None


# What a resume may change of the model (regularisation and how the step is computed); every
# other model key shapes the weights, and the objective is what the run trains.
RESUMABLE_MODEL_KEYS = {"dropout", "attention_dropout", "activation_dropout",
                        "activation_checkpointing", "attention"}


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_difference(saved: dict, run: dict) -> Optional[tuple[str, object, object]]:
    """The first model or objective key (dotted) whose value a resumed run changes, with the
    saved and the new value; keys the saved config does not know (added since) are skipped."""
    old, new = _leaves({k: saved.get(k, {}) for k in ("model", "objective")}), \
        _leaves({k: run[k] for k in ("model", "objective")})
    for key, value in new.items():
        section, _, name = key.partition(".")
        if section == "model" and name in RESUMABLE_MODEL_KEYS:
            continue
        if key in old and old[key] != value:
            return key, old[key], value
    return None


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (for checkpoints and the W&B run config)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> RunConfig:
    """Inverse of `to_dict`, validated again."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as e:
        raise JanusError(f"config: {getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None
