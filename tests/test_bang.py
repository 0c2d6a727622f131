"""The BANG objective (docs/method.md, section 9): the stream mask against its rules written out,
no leakage on the real model, decoding equal to the training pass, and the modes it trains."""
import numpy as np
import pytest
import torch

from janus_pretrain.config import ModelConfig, ObjectiveConfig, RunConfig, load_config
from janus_pretrain.errors import JanusError
from janus_pretrain.generate.ar import beam_search, greedy
from janus_pretrain.generate.bang import collapse, one_pass
from janus_pretrain.generate.vocab import full_log_probs
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives.bang import BangObjective, stream_mask
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD
from conftest import REPO

VOCAB = 50
STREAMS = 3


@pytest.fixture(scope="module")
def model(single_process):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, hidden_size=32, ffn_hidden_size=64,
                      num_heads=4, max_positions=64, dropout=0.0, attention_dropout=0.0)
    return JanusModel(cfg, VOCAB, PAD, mask_vector=True).eval()


def objective(kind: str = "bang", streams: int = STREAMS) -> BangObjective:
    return BangObjective(ObjectiveConfig(kind=kind, masking="none", streams=streams), 32, 32)


def make_batch(obj, seed=0, lengths=(7, 4)):
    rng = np.random.default_rng(seed)
    return obj.collate([(rng.integers(5, VOCAB, n), rng.integers(5, VOCAB, n + 1))
                        for n in lengths], rng)


def logits(model, obj, batch) -> torch.Tensor:
    """-> [B, streams, T, V] predicting-row logits; row r of a stream predicts position r + 1."""
    with torch.no_grad():
        out = model(**obj.prepare(batch).model_inputs)["bang"]
    return out.view(out.shape[0], obj.streams, -1, out.shape[-1])


def other_token(t: int) -> int:
    return 5 + (t - 5 + 7) % (VOCAB - 5)


def test_stream_mask_follows_the_rules():
    for rows, n in ((5, 1), (6, 3), (4, 5)):
        def row(index):  # (stream, target position of its input or prediction)
            stream, r = divmod(index, rows)
            return stream, r if stream == 0 else r + 1
        size = (1 + n) * rows
        expected = torch.zeros(size, size, dtype=torch.bool)
        for i in range(size):
            k, t = row(i)
            for j in range(size):
                kj, tj = row(j)
                if k == 0:  # main: causal
                    expected[i, j] = kj == 0 and tj <= t
                elif kj == 0:  # the main rows whose inputs are y_0 .. y_t-k
                    expected[i, j] = tj <= t - k
                else:  # itself, and stream k-j at position t-j
                    expected[i, j] = 1 <= kj <= k and k - kj == t - tj
        assert torch.equal(stream_mask(rows, n, torch.device("cpu")), expected), (rows, n)


def test_stream_k_never_sees_y_t_minus_k_plus_1_to_t(model):
    """Changing y_s changes the prediction of stream k at position t exactly when s <= t - k:
    so no prediction of y_t ever sees y_t, and stream k never sees the k - 1 tokens before it."""
    obj = objective()
    batch = make_batch(obj)
    base = logits(model, obj, batch)
    for b in range(batch["tgt"].shape[0]):
        length = int((batch["tgt"][b] != PAD).sum())
        for s in range(1, length):  # y_1 .. EOS
            changed = {key: v.clone() for key, v in batch.items()}
            changed["tgt"][b, s] = other_token(int(batch["tgt"][b, s])) if s < length - 1 else 7
            out = logits(model, obj, changed)
            other = [i for i in range(batch["tgt"].shape[0]) if i != b]
            assert torch.equal(out[other], base[other])
            for k in range(1, STREAMS + 1):
                for t in range(1, length):
                    same = torch.allclose(out[b, k - 1, t - 1], base[b, k - 1, t - 1],
                                          rtol=0, atol=1e-6)
                    assert same == (s > t - k), f"stream {k}, y_{t}, after changing y_{s}"


def test_bang_nar_rows_see_no_target_and_not_the_length(model):
    obj = objective("bang_nar")
    short = make_batch(obj, seed=1, lengths=(4, 4))
    long = make_batch(obj, seed=2, lengths=(9, 4))
    a, b = logits(model, obj, short), logits(model, obj, long)
    # Same sources, other targets of another length: the first rows are the same function.
    long["src"] = short["src"]
    b = logits(model, obj, long)
    rows = a.shape[2]
    torch.testing.assert_close(b[:, :, :rows], a, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def bart_model(single_process):
    """The bart flavour (post-LN, embedding scale, offset positions) with the [MASK] vector."""
    torch.manual_seed(1)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, hidden_size=32, ffn_hidden_size=64,
                      num_heads=4, max_positions=64, dropout=0.0, attention_dropout=0.0,
                      arch="bart", scale_embedding=True)
    return JanusModel(cfg, VOCAB, PAD, mask_vector=True).eval()


@pytest.mark.parametrize("flavour", ["model", "bart_model"])
def test_ar_decoding_reads_the_trained_predicting_stream(flavour, request):
    """Greedy and beam search through stream 1, cached or not, agree; the greedy hypothesis's
    log-probability equals stream 1's teacher-forced log-probabilities of it (N = 3 training)."""
    model = request.getfixturevalue(flavour)
    obj = objective()
    batch = make_batch(obj, seed=3)
    with torch.no_grad():
        model.embed.weight.mul_(5)  # peaked distributions: no near-ties
        try:
            memory, mask = model.run_encoder(batch["src"])
            hyps = greedy(model, memory, mask, 10, predict_stream=True)
            recomputed = greedy(model, memory, mask, 10, predict_stream=True, incremental=False)
            assert [h.tokens for h in hyps] == [h.tokens for h in recomputed]
            assert [h.tokens for h in hyps] != [h.tokens for h in greedy(model, memory, mask, 10)]
            beams, recomputed = (
                [[h.tokens for h in b] for b in beam_search(model, memory, mask, 3, 10,
                                                            predict_stream=True, incremental=i)]
                for i in (True, False))
            assert beams == recomputed and beams[0][0] != beams[0][1]
            for i, h in enumerate(hyps):
                # Its tokens and EOS (chosen, or forced at max_len), teacher-forced.
                target = torch.tensor([[BOS, *h.tokens, EOS]])
                teacher = {"src": batch["src"][i:i + 1], "tgt": target}
                lp = full_log_probs(logits(model, obj, teacher)[0, 0], VOCAB, allow_eos=True)
                expected = lp.gather(1, target[0, 1:, None]).sum()
                assert abs(h.log_prob - float(expected)) < 1e-4
        finally:
            model.embed.weight.div_(5)


def test_one_pass_is_the_argmax_of_the_trained_rows(model):
    obj = objective("bang_nar")
    batch = make_batch(obj, seed=4, lengths=(6, 6))
    max_len = batch["tgt"].shape[1] - 2  # one pass of max_len + 1 rows = the training rows
    with torch.no_grad():
        memory, mask = model.run_encoder(batch["src"])
        hyps = one_pass(model, memory, mask, max_len)
    lp = full_log_probs(logits(model, obj, batch)[:, 0], VOCAB, allow_eos=True)
    best_lp, best = lp.max(-1)
    for i, h in enumerate(hyps):
        assert h.tokens == collapse(best[i].tolist())
        assert abs(h.log_prob - float(best_lp[i].sum())) < 1e-4


@pytest.mark.parametrize("sampler", ["authors", "exact"])
def test_pretraining_sources_are_janus_sources(sampler):
    from janus_pretrain.objectives.janus import JanusObjective

    rng = np.random.default_rng(5)
    examples = [(None, rng.integers(5, VOCAB, n)) for n in (30, 12, 21)]
    cfg = dict(masking="denoise", mask_sampler=sampler)
    bang = BangObjective(ObjectiveConfig(kind="bang", **cfg), 32, 32).collate(
        examples, np.random.default_rng(6))
    janus = JanusObjective(ObjectiveConfig(**cfg), 32, 32, 64).collate(
        examples, np.random.default_rng(6))
    assert torch.equal(bang["src"], janus["src"]) and torch.equal(bang["tgt"], janus["tgt"])
    assert (bang["src"] == MASK).any()  # noised


def test_collapse_skips_a_leading_eos_cuts_at_the_next_and_drops_repeats():
    assert collapse([EOS, 9, 9, 8, 9, EOS, 7]) == [9, 8, 9]
    assert collapse([9, 8, 8, 8]) == [9, 8]
    assert collapse([EOS, EOS]) == []


def test_objective_kind_sets_modes_masking_and_presets():
    assert ObjectiveConfig().kind == "janus"
    assert ObjectiveConfig(kind="bang", masking="none").decoding_modes() == ["ar"]
    assert ObjectiveConfig(kind="bang_nar", masking="none").decoding_modes() == ["bang_nar"]
    for bad, key in ((dict(kind="bart"), "objective.kind"),
                     (dict(kind="bang", masking="span"), "objective.masking"),
                     (dict(masking="none"), "objective.masking"),
                     (dict(kind="bang", streams=0), "objective.streams")):
        with pytest.raises(JanusError, match=key):
            ObjectiveConfig(**bad)
    base = ["data.train=t", "data.tokenizer=k.model", "model=tiny", "data.max_source_len=64",
            "data.max_target_len=64"]
    ar = load_config(REPO / "configs" / "finetune" / "bang_ar.yaml", [*base, "data.source=s"])
    nar = load_config(REPO / "configs" / "finetune" / "bang_nar.yaml", [*base, "data.source=s"])
    assert (ar.objective.kind, ar.objective.streams, nar.objective.kind) == ("bang", 1, "bang_nar")
    ar.check_data()
    pre = load_config(REPO / "configs" / "pretrain" / "bang_demo.yaml", base)
    pre.check_data()
    assert isinstance(pre, RunConfig) and pre.objective.is_bang


def test_generator_and_evaluate_use_the_modes_trained(model):
    from finetune.evaluate import settings
    from finetune.tasks import get_task
    from janus_pretrain.generate.api import Generator

    task = get_task("multi30k_ende")
    for kind, modes, names in (("bang", ["ar"], {"ar_beam5", "ar_greedy"}),
                               ("bang_nar", ["bang_nar"], {"bang_nar"})):
        cfg = RunConfig(objective=ObjectiveConfig(kind=kind, masking="none"))
        gen = Generator(model, None, cfg, torch.device("cpu"))
        assert set(settings(task, gen)) == names
        for mode in ("ar", "nar", "bang_nar"):
            if mode in modes:
                gen.check_mode(mode)
            else:
                with pytest.raises(JanusError, match=f"objective.kind={kind}"):
                    gen.check_mode(mode)


@pytest.mark.distributed
def test_pretrain_bang_then_finetune_evaluate_and_generate_bang_nar(
        launch_training, tokenizer_path, single_process, tmp_path):
    """BANG pretraining on two data-parallel ranks under ZeRO-2 (demo.yaml), its weights
    fine-tuned as bang_nar ([MASK] vector kept), evaluated in the one mode it trains (with
    latencies), and decoded by the Generator in the mode `generate --mode bang_nar` selects."""
    import sys

    from conftest import multi30k_slice, read_metrics, run_killable
    from finetune.evaluate import evaluate
    from finetune.pairs import prepare_pairs
    from finetune.tasks import get_task
    from janus_pretrain.cli import parser
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.showcase import reconstruct

    pre = tmp_path / "pre"
    result = launch_training(pre, nproc=2, extra=("objective.kind=bang", "objective.streams=2",
                                                  "train.steps=2", "train.save_interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(pre)[-1]["train/ce_bang"] > 0
    # `make demo`'s showcase on a BANG-pretrained checkpoint: only the AR mode it trained
    shown = reconstruct(Generator.from_checkpoint(pre), ["a dog runs across the green park"],
                        max_tokens=8, beam=2, iterations=2, seed=0)
    assert set(shown[0]["outputs"]) == {"AR beam 2"}

    task = get_task("multi30k_ende")
    data_root = str(multi30k_slice(tmp_path / "data", 64, 4, 4))
    prepare_pairs(task, tmp_path / "pairs", str(tokenizer_path), workers=1, root=data_root)
    run = tmp_path / "nar"
    done = run_killable([sys.executable, "-m", "finetune.cli", "--data-root", data_root, "train",
                         "--task", task.name, "--data", str(tmp_path / "pairs"), "--config",
                         "configs/finetune/bang_nar.yaml", "--init-from", str(pre),
                         "--valid-size", "4", "model=tiny", "train.steps=2",
                         "train.save_interval=2", "data.micro_batch_size=8",
                         f"train.output_dir={run}"], 240, "finetune train")
    assert done.returncode == 0, done.stderr[-3000:]

    results = evaluate(task, str(run), limit=4, latency_sentences=2, root=data_root)
    assert results["kind"] == "bang_nar" and set(results["settings"]) == {"bang_nar"}
    assert results["settings"]["bang_nar"]["latency_ms"] > 0
    args = parser().parse_args(["generate", "--checkpoint", str(run), "--mode", "bang_nar"])
    hyps = Generator.from_checkpoint(run).generate(["a dog runs", ""], mode=args.mode, max_len=8)
    assert len(hyps) == 2 and hyps[1] == ""
