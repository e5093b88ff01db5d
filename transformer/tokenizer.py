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

import sentencepiece as spm

from .config import DataConfig

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    """A source and a target SentencePiece model (the same one when the vocabulary is joint),
    and whether text is lowercased before either reads it."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None,
                 lowercase: bool = False):
        self.joint = tgt_proto is None
        self.lowercase = lowercase
        self.src = spm.SentencePieceProcessor(model_proto=src_proto)
        self.tgt = self.src if self.joint else spm.SentencePieceProcessor(model_proto=tgt_proto)

    @property
    def src_vocab(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab(self) -> int:
        return self.tgt.get_piece_size()

    def _text(self, texts: list[str]) -> list[str]:
        return [t.lower() for t in texts] if self.lowercase else texts

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        """Source ids end with </s>, so that an empty sentence still has one token."""
        return [ids + [EOS] for ids in self.src.encode(self._text(texts))]

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Target ids are <s> y_1 .. y_n </s>: the decoder reads [:-1] and predicts [1:]."""
        return [[BOS] + ids + [EOS] for ids in self.tgt.encode(self._text(texts))]

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)

    def to_dict(self) -> dict:
        """The serialized models, for a self-sufficient checkpoint."""
        return {
            "src": self.src.serialized_model_proto(),
            "tgt": None if self.joint else self.tgt.serialized_model_proto(),
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        return cls(d["src"], d["tgt"], d.get("lowercase", False))

    def save(self, folder: str) -> None:
        """Write the .model files (readable by any SentencePiece tool) into a run folder."""
        names = {"joint": self.src} if self.joint else {"src": self.src, "tgt": self.tgt}
        for name, sp in names.items():
            with open(os.path.join(folder, f"spm.{name}.model"), "wb") as f:
                f.write(sp.serialized_model_proto())


def _cache_key(cfg: DataConfig, src: list[str], tgt: list[str]) -> str:
    h = hashlib.sha1()
    settings = [cfg.corpus, cfg.src_lang, cfg.tgt_lang, cfg.vocab_size, cfg.joint_vocab,
                cfg.tokenizer, cfg.lowercase,
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
    if cfg.lowercase:
        src, tgt = [t.lower() for t in src], [t.lower() for t in tgt]
    if not os.path.isdir(folder):
        log.info("training a SentencePiece %s tokenizer (%d pieces) into %s",
                 cfg.tokenizer, cfg.vocab_size, folder)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
        try:
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
    return Tokenizer(*protos, lowercase=cfg.lowercase)
