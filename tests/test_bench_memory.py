"""`bench memory --activations` runs end to end: each variant's worker builds the janus step from
the shared bench builders (bench/train.py) and reports a positive activation peak."""
import re

from janus_pretrain.bench import memory


def test_activation_peaks_of_both_variants(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    memory.main(["--activations", "--model", "tiny", "--batch", "2", "--src-len", "16",
                 "--tgt-len", "16", "--vocab", "64"])
    out = capsys.readouterr().out
    peaks = {k: float(v) for k, v in re.findall(r"^(none|full)\s+(-?[\d.]+)$", out, re.M)}
    assert set(peaks) == {"none", "full"} and re.search(r"^full/none -?[\d.]+$", out, re.M), out


def test_relayout_reads_far_less_than_the_whole_checkpoint(capsys, monkeypatch):
    """`bench memory --relayout` end to end at the tiny shape: a row per rank of every target
    layout, each resume's extra memory a fraction of the whole-checkpoint read every rank used to
    make (measured: at most a fifth)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    memory.main(["--relayout", "--model", "tiny"])
    out = capsys.readouterr().out
    rows = re.findall(r"^(whole \(TP=1, read all\)|TP=\d x DP=\d, ZeRO-\d)\s+(\d)\s+[\d.]+\s+"
                      r"(-?[\d.]+)\s+[\d.]+", out, re.M)
    extra = {(name, int(rank)): float(mib) for name, rank, mib in rows}
    assert len(extra) == 6, out  # whole; ZeRO-1 x 2 ranks; ZeRO-0; ZeRO-3 x 2 ranks
    whole = extra.pop(("whole (TP=1, read all)", 0))
    assert max(extra.values()) < 0.4 * whole, out
