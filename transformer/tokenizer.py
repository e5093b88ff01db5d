"""SentencePiece subword tokenizers, trained on the training split only and cached.

Ids are fixed across every model: 0 <pad>, 1 <unk>, 2 <s> (bos), 3 </s> (eos).
With a joint vocabulary one model serves both languages, so that source
embedding, target embedding and output projection can be one matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from functools import cache

import sentencepiece as spm

from .config import DataConfig

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@cache
def moses(lang: str):
    """The Moses punctuation normaliser, tokenizer and detokenizer of a language (sacremoses),
    made once: each reads its language's word lists."""
    from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

    return MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang), MosesDetokenizer(lang=lang)


def prepare_text(texts: list[str], lowercase: bool, moses_lang: str | None,
                 escape: bool = False) -> list[str]:
    """The text as the subword model reads it: lowercased, and with punctuation normalised
    and split from words by the Moses tokenizer ("Strand." -> "Strand ."), where asked.
    escape: write & ' " as the Moses tokenizer's &amp; &apos; &quot; (for scoring only)."""
    if lowercase:
        texts = [t.lower() for t in texts]
    if moses_lang:
        normalizer, tokenizer, _ = moses(moses_lang)
        texts = [tokenizer.tokenize(normalizer.normalize(t), return_str=True, escape=escape)
                 for t in texts]
    return texts


class Tokenizer:
    """A source and a target SentencePiece model (the same one when the vocabulary is joint),
    and what is done to text before either reads it: lowercasing, and Moses tokenization
    (`moses` = the source and target languages; translations are then detokenized)."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None,
                 lowercase: bool = False, moses: tuple[str, str] | None = None):
        self.joint = tgt_proto is None
        self.lowercase = lowercase
        self.moses = tuple(moses) if moses else None
        self.src = spm.SentencePieceProcessor(model_proto=src_proto)
        self.tgt = self.src if self.joint else spm.SentencePieceProcessor(model_proto=tgt_proto)

    @property
    def src_vocab(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab(self) -> int:
        return self.tgt.get_piece_size()

    def _text(self, texts: list[str], side: int) -> list[str]:
        return prepare_text(texts, self.lowercase, self.moses[side] if self.moses else None)

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        """Source ids end with </s>, so that an empty sentence still has one token."""
        return [ids + [EOS] for ids in self.src.encode(self._text(texts, 0))]

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Target ids are <s> y_1 .. y_n </s>: the decoder reads [:-1] and predicts [1:]."""
        return [[BOS] + ids + [EOS] for ids in self.tgt.encode(self._text(texts, 1))]

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        texts = self.tgt.decode(ids)
        if self.moses:
            detokenizer = moses(self.moses[1])[2]
            texts = [detokenizer.detokenize(t.split()) for t in texts]
        return texts

    def to_dict(self) -> dict:
        """The serialized models, for a self-sufficient checkpoint."""
        return {
            "src": self.src.serialized_model_proto(),
            "tgt": None if self.joint else self.tgt.serialized_model_proto(),
            "lowercase": self.lowercase,
            "moses": self.moses,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        return cls(d["src"], d["tgt"], d.get("lowercase", False), d.get("moses"))

    def save(self, folder: str) -> None:
        """Write the .model files (readable by any SentencePiece tool) into a run folder."""
        names = {"joint": self.src} if self.joint else {"src": self.src, "tgt": self.tgt}
        for name, sp in names.items():
            with open(os.path.join(folder, f"spm.{name}.model"), "wb") as f:
                f.write(sp.serialized_model_proto())


def _cache_key(cfg: DataConfig, src: list[str], tgt: list[str]) -> str:
    h = hashlib.sha1()
    settings = [cfg.corpus, cfg.src_lang, cfg.tgt_lang, cfg.vocab_size, cfg.joint_vocab,
                cfg.tokenizer, cfg.lowercase, cfg.moses_tokenize,
                1]  # the last number versions the training recipe below
    h.update(json.dumps(settings).encode())
    for line in src + ["\0"] + tgt:
        h.update(line.encode())
        h.update(b"\n")
    return f"{cfg.corpus}-{cfg.src_lang}-{cfg.tgt_lang}-{cfg.vocab_size}-{h.hexdigest()[:12]}"


def _train_one(lines: list[str], vocab_size: int, model_type: str, prefix: str) -> None:
    # The text goes beside the model, in load_or_train's temporary folder, which is
    # removed whatever happens.
    with open(prefix + ".txt", "w", encoding="utf-8") as f:
        f.write("\n".join(line for line in lines if line) + "\n")
    spm.SentencePieceTrainer.train(
        input=f.name, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary, not an error
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )


def load_or_train(cfg: DataConfig, src: list[str], tgt: list[str]) -> Tokenizer:
    """The tokenizer for these training sentences, from data/tokenizers/ if made before."""
    folder = os.path.join(cfg.data_dir, "tokenizers", _cache_key(cfg, src, tgt))
    names = ["joint"] if cfg.joint_vocab else ["src", "tgt"]
    langs = (cfg.src_lang, cfg.tgt_lang) if cfg.moses_tokenize else None
    if not os.path.isdir(folder):
        log.info("training a SentencePiece %s tokenizer (%d pieces) into %s",
                 cfg.tokenizer, cfg.vocab_size, folder)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
        try:
            src = prepare_text(src, cfg.lowercase, langs and langs[0])
            tgt = prepare_text(tgt, cfg.lowercase, langs and langs[1])
            if cfg.joint_vocab:
                _train_one(src + tgt, cfg.vocab_size, cfg.tokenizer, os.path.join(tmp, "joint"))
            else:
                _train_one(src, cfg.vocab_size, cfg.tokenizer, os.path.join(tmp, "src"))
                _train_one(tgt, cfg.vocab_size, cfg.tokenizer, os.path.join(tmp, "tgt"))
            os.replace(tmp, folder)  # all or nothing: a killed run leaves no broken cache
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    protos = []
    for name in names:
        with open(os.path.join(folder, f"{name}.model"), "rb") as f:
            protos.append(f.read())
    return Tokenizer(*protos, lowercase=cfg.lowercase, moses=langs)
