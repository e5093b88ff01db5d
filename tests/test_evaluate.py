"""Scoring: sacreBLEU's lines, and the BLEU of the Multi30k literature on Moses-tokenized text."""

import gzip
import math
import os
import shutil

import pytest

from conftest import MULTI30K, TINY_CONFIG, TOY
from transformer import cli
from transformer.config import load_config
from transformer.evaluate import moses_bleu, moses_tokenize, score
from transformer.train import train


def test_moses_bleu_on_a_case_computed_by_hand():
    ref = ["ein mann fährt ein rotes auto ."]
    # Lowercased and tokenized first: "Auto." becomes "auto ." and matches.
    assert moses_bleu(["Ein Mann fährt ein rotes Auto."], ref, "de")[0] == pytest.approx(100)
    # One token of 7 wrong, same length (no brevity penalty). By hand, the n-grams of the
    # hypothesis that the reference has: 6 of 7 words, 4 of 6 bigrams (not "rotes fahrrad",
    # "fahrrad ."), 3 of 5 trigrams, 2 of 4 4-grams; BLEU is their geometric mean.
    got, signature = moses_bleu(["Ein Mann fährt ein rotes Fahrrad."], ref, "de")
    assert got == pytest.approx(100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, abs=0.01)
    assert "tok:none" in signature and "sacremoses-de" in signature


def test_moses_tokenize_escapes_and_splits_as_the_corpus_script():
    assert moses_tokenize(['Ein Schild: "Kids\' Food Basket".'], "de") == \
        ["ein schild : &quot; kids &apos; food basket &quot; ."]


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="../shared/multi30k is absent")
def test_moses_tokenize_gives_the_corpus_own_tokenized_references():
    def lines(path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()

    for split in ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"):
        raw = lines(os.path.join(MULTI30K, f"{split}.de.gz"))
        tok = lines(os.path.join(MULTI30K, "tok", f"{split}.lc.norm.tok.de.gz"))
        assert moses_tokenize(raw, "de") == tok, split
        # The references score 100 against themselves, the raw ones as hypotheses.
        assert moses_bleu(raw[:200], tok[:200], "de")[0] == pytest.approx(100)


def test_evaluate_adds_the_moses_line_where_the_folder_has_tokenized_references(
        tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(TOY, corpus)
    run = train(load_config(TINY_CONFIG, [f"train.runs_dir={tmp_path}/runs", "train.name=e",
                                          f"data.data_dir={tmp_path}/data", "train.max_steps=60",
                                          "train.device=cpu", f"data.path={corpus}"]))
    ckpt = os.path.join(run, "last.pt")
    assert cli.evaluate_main(["--ckpt", ckpt, f"data.path={corpus}"]) == 0
    plain = capsys.readouterr().out
    assert "BLEU lowercase" in plain and "Moses" not in plain  # no tok/ folder: no such line
    # A second test set, by its file stem, and tokenized references for it.
    shutil.copy(corpus / "test.tsv", corpus / "test_extra.tsv")
    with open(corpus / "test.tsv", encoding="utf-8") as f:
        refs = [line.rstrip("\n").split("\t")[1] for line in f if line.strip()]
    (corpus / "tok").mkdir()
    (corpus / "tok" / "test_extra.lc.norm.tok.de").write_text(
        "".join(t + "\n" for t in moses_tokenize(refs, "de")), encoding="utf-8")
    assert cli.evaluate_main(["--ckpt", ckpt, "--split", "test_extra", f"data.path={corpus}"]) == 0
    out = capsys.readouterr().out
    moses = [line for line in out.splitlines() if line.startswith("BLEU lc Moses")]
    assert len(moses) == 1 and "test_extra.lc.norm.tok.de" in moses[0]
    value = float(moses[0].split("=")[1].split()[0])
    with open(os.path.join(run, "last.test_extra.hyp.txt"), encoding="utf-8") as f:
        hyps = f.read().splitlines()
    assert value == pytest.approx(score(hyps, refs).bleu_lc, abs=1.0)  # the same words
    assert math.isfinite(value) and value > 0
    assert cli.evaluate_main(["--ckpt", ckpt, "--split", "test_2099", f"data.path={corpus}"]) == 2
    assert "no split 'test_2099'" in capsys.readouterr().err


def test_evaluate_scores_several_checkpoints_on_several_splits_and_their_spread(
        tmp_path, capsys):
    run = train(load_config(TINY_CONFIG, [f"train.runs_dir={tmp_path}/runs", "train.name=s",
                                          f"data.data_dir={tmp_path}/data", "train.max_steps=40",
                                          "train.device=cpu", "train.save_every=20",
                                          "train.keep_checkpoints=2"]))
    ckpts = [os.path.join(run, f"step-0000{n}.pt") for n in (20, 40)]
    missing = os.path.join(run, "step-000099.pt")
    assert cli.evaluate_main(["--ckpt", *ckpts, missing, "--split", "test", "valid"]) == 2
    assert "step-000099.pt: no such checkpoint" in capsys.readouterr().err  # before any work
    assert cli.evaluate_main(["--ckpt", *ckpts, "--split", "test", "valid", "--beam", "1"]) == 0
    out = capsys.readouterr().out
    # Each checkpoint on each split, in that order, then a row per split over the two.
    bleu = [float(line.split("=")[1].split()[0]) for line in out.splitlines()
            if line.startswith("BLEU  ")]
    assert len(bleu) == 4
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip()
            for line in out.splitlines() if line.startswith("| test") or line.startswith("| valid")}
    for split, (a, b) in (("test", bleu[0::2]), ("valid", bleu[1::2])):
        assert a != b  # 20 steps apart: two different models
        mean, sd, low_high = rows[split].replace("±", " ").split()
        assert float(mean) == pytest.approx((a + b) / 2, abs=0.006)
        assert float(sd) == pytest.approx(abs(a - b) / math.sqrt(2), abs=0.006)
        assert low_high == f"({min(a, b):.2f}-{max(a, b):.2f})"
