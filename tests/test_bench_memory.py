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
