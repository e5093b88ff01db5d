"""Configuration: YAML -> frozen, validated dataclasses.

A config file has four sections (model, data, train, decode), each read into
its own frozen dataclass. Every mistake a user can make in a config file, an
unknown key, a wrong type, an impossible value, raises one `ConfigError` whose
message names the file, the key and what was expected. Each dataclass checks its own
values as it is made (`__post_init__`), so a config built in code is checked too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line for the user."""


def _choices(*values: str) -> dict:
    return {"choices": values}


def _need(ok: bool, key: str, expected: str, got: Any) -> None:
    """The check every section runs on its own values, as it is made (__post_init__)."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _check_choices(section: str, obj) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"{section}.{f.name}: expected one of {', '.join(choices)}, "
                              f"got {getattr(obj, f.name)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the encoder-decoder Transformer (paper, section 3)."""

    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 3  # encoder layers and decoder layers each
    d_ff: int = 1024
    dropout: float = 0.1  # on embeddings, sub-layer outputs (section 5.4)
    attn_dropout: float = 0.0  # on the attention weights
    ff_dropout: float = 0.0  # on the feed-forward hidden layer
    positions: str = field(default="sinusoidal", metadata=_choices("sinusoidal", "learned"))
    norm: str = field(default="post", metadata=_choices("post", "pre"))
    # The score function of every attention: q.k / sqrt(d_k) (the paper) or
    # v^T tanh(W_q q + W_k k) (Bahdanau et al.; runs on the slower reference path).
    attention: str = field(default="scaled_dot", metadata=_choices("scaled_dot", "additive"))
    # Share source embedding, target embedding and output projection. None: share
    # when the vocabulary is joint (section 3.4), else tie only target and output.
    share_embeddings: bool | None = None
    max_positions: int = 512

    def __post_init__(self):
        _check_choices("model", self)
        for key in ("d_model", "n_heads", "n_layers", "d_ff", "max_positions"):
            _need(getattr(self, key) > 0, f"model.{key}", "a positive integer",
                  getattr(self, key))
        _need(self.d_model % self.n_heads == 0, "model.d_model",
              f"a multiple of model.n_heads ({self.n_heads}) so that d_k = d_model / n_heads",
              self.d_model)
        for key in ("dropout", "attn_dropout", "ff_dropout"):
            _need(0.0 <= getattr(self, key) < 1.0, f"model.{key}", "a value in [0, 1)",
                  getattr(self, key))


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, which language pair, and how it is tokenized."""

    corpus: str = field(default="bible", metadata=_choices("bible", "multi30k", "files"))
    # bible: translation codes ("4" World English Bible, "e" Elberfelder, ...);
    # multi30k and files: language codes ("en", "de", ...).
    src_lang: str = "4"
    tgt_lang: str = "e"
    # multi30k: a local folder of the raw files (None: the Hugging Face Hub);
    # files: the folder holding train/valid/test files (required).
    path: str | None = None
    valid_size: int = 1000  # bible only: verses held out for validation
    test_size: int = 1000  # bible only: verses held out for test
    split_seed: int = 1234  # bible only: the fixed seed of the split
    max_tokens: int = 0  # drop training pairs longer than this (subwords); 0 keeps all
    vocab_size: int = 8000
    joint_vocab: bool = True
    tokenizer: str = field(default="unigram", metadata=_choices("unigram", "bpe"))
    # Learn lowercased text, as the Multi30k literature does: the tokenizer lowercases all
    # it reads (training text, sentences to translate), so translations come out lowercased.
    lowercase: bool = False
    # Split punctuation from words with the Moses tokenizer before the subword model reads
    # text, as the Multi30k literature's preprocessing did; translations are detokenized.
    moses_tokenize: bool = False
    data_dir: str = "data"  # where downloads and tokenizer models are cached

    def __post_init__(self):
        _check_choices("data", self)
        _need(self.vocab_size >= 16, "data.vocab_size", "at least 16", self.vocab_size)
        _need(self.max_tokens >= 0, "data.max_tokens", "0 (no filter) or a positive integer",
              self.max_tokens)
        _need(self.valid_size > 0 and self.test_size > 0, "data.valid_size/test_size",
              "positive sizes", (self.valid_size, self.test_size))
        _need(self.src_lang != self.tgt_lang or self.corpus == "files", "data.tgt_lang",
              "a language other than data.src_lang", self.tgt_lang)
        _need(not (self.moses_tokenize and self.corpus == "bible"), "data.moses_tokenize",
              "false for the Bible, whose languages are translation codes", self.moses_tokenize)
        if self.corpus == "files":
            _need(self.path is not None, "data.path", "the folder of your parallel files",
                  self.path)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, budgets and bookkeeping of a training run."""

    # Tokens per update, padding included (max of source, target): over all processes
    # and accumulated micro-batches, so that a recipe makes the same updates on 1 GPU or 8.
    batch_tokens: int = 4096
    # Micro-batches whose gradients are summed before an update; each process takes
    # batch_tokens / (processes * accumulate) tokens a micro-batch (a big batch on a small GPU).
    accumulate: int = 1
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 1000
    # After warmup, inverse_sqrt: lr * sqrt(warmup_steps / step) (the paper's); cosine: half
    # a cosine down to 0 at max_steps, which it needs.
    schedule: str = field(default="inverse_sqrt", metadata=_choices("inverse_sqrt", "cosine"))
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    max_epochs: int = 100
    max_steps: int = 0  # 0: no step budget
    max_minutes: float = 0.0  # 0: no time budget
    eval_every: int = 500  # steps between evaluations (and at the end)
    eval_bleu_sentences: int = 0  # decode this many validation sentences for BLEU; 0: all
    log_every: int = 50
    max_bad_steps: int = 20  # non-finite losses in a row before the run stops
    patience: int = 0  # stop after this many evaluations without a better BLEU; 0: never
    # Also keep the weights of the last N step checkpoints, step-<step>.pt (for averaging),
    # written every save_every steps (0: at every evaluation).
    keep_checkpoints: int = 0
    save_every: int = 0
    average_at_end: bool = False  # write average.pt, the mean of those N, when training ends
    seed: int = 1
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # Mixed precision (torch.autocast); weights, optimizer and checkpoints stay fp32.
    # auto: bf16 on a GPU that has it, else fp32. fp16 adds a gradient scaler (GPU only).
    precision: str = field(default="auto", metadata=_choices("auto", "fp32", "bf16", "fp16"))
    # Kernels that repeat bit for bit on CUDA (slower); the CPU is deterministic anyway.
    deterministic: bool = False
    # torch.compile the forward pass and loss; batches are padded to a few shapes
    # (lengths rounded up to multiples of 8), one compilation each.
    compile: bool = False
    threads: int = 0  # torch CPU threads; 0 keeps torch's choice
    name: str | None = None  # run folder name; None: <config name>-<timestamp>
    runs_dir: str = "runs"
    resume: str | None = None  # a run folder to continue from its last.pt

    def __post_init__(self):
        _check_choices("train", self)
        _need(self.batch_tokens > 0, "train.batch_tokens", "a positive integer",
              self.batch_tokens)
        _need(self.lr > 0, "train.lr", "a positive number", self.lr)
        _need(self.warmup_steps >= 0, "train.warmup_steps", "0 or more", self.warmup_steps)
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
              "two numbers in [0, 1)", self.betas)
        _need(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", "a value in [0, 1)",
              self.label_smoothing)
        for key in ("accumulate", "max_epochs", "eval_every", "log_every", "max_bad_steps"):
            _need(getattr(self, key) > 0, f"train.{key}", "a positive integer",
                  getattr(self, key))
        for key in ("max_steps", "max_minutes", "clip_norm", "threads", "eval_bleu_sentences",
                    "keep_checkpoints", "save_every", "patience"):
            _need(getattr(self, key) >= 0, f"train.{key}", "0 or more", getattr(self, key))
        _need(self.schedule != "cosine" or self.max_steps > self.warmup_steps,
              "train.max_steps", "more than train.warmup_steps for the cosine schedule, "
              "which ends at max_steps", self.max_steps)


@dataclass(frozen=True)
class DecodeConfig:
    """How translations are generated."""

    max_len_a: float = 1.5  # stop after a * source length + b tokens
    max_len_b: int = 10
    batch_size: int = 64  # sentences decoded together (divided by the beam size)
    beam_size: int = 1  # 1: greedy search
    length_penalty: float = 1.0  # beam search ranks log-probability / length**length_penalty

    def __post_init__(self):
        _need(self.max_len_a >= 0 and self.max_len_b > 0, "decode.max_len_a/max_len_b",
              "a >= 0 and b > 0", (self.max_len_a, self.max_len_b))
        _need(self.batch_size > 0, "decode.batch_size", "a positive integer", self.batch_size)
        _need(self.beam_size > 0, "decode.beam_size", "a positive integer (1: greedy)",
              self.beam_size)
        _need(self.length_penalty >= 0, "decode.length_penalty", "0 or more",
              self.length_penalty)


@dataclass(frozen=True)
class Config:
    """The whole run: one dataclass per section."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()
    name: str = "config"  # the config file's stem, used to name runs

    def __post_init__(self):  # what no one section can check alone
        if self.model.share_embeddings is True and not self.data.joint_vocab:
            raise ConfigError("model.share_embeddings: true needs data.joint_vocab: true "
                              "(one vocabulary for source and target)")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "decode": DecodeConfig}


# --- type checking --------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if tp is tuple:
        return "a list of numbers"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return value as type tp, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, where)
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-3 and 5e-4 (no dot in the mantissa) as text; they are numbers.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif tp is str:
        # YAML reads `src_lang: 4` as an int; a language code is text either way.
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        value = str(value) if ok else value
    elif tp is tuple:  # a list of numbers, each checked as a float
        ok = isinstance(value, (list, tuple))
        value = tuple(_coerce(v, float, where) for v in value) if ok else value
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build_section(cls: type, values: dict, source: str, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{source}: {section}.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key; expected one of {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)  # its __post_init__ checks the values
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_path(cfg: Config, source: str) -> None:
    """The one check that reads the disk: the corpus folder exists."""
    path = cfg.data.path
    if path is not None and not os.path.isdir(path):
        raise ConfigError(f"{source}: data.path: expected a folder holding the corpus, "
                          f"but {path!r} does not exist")


def shares_embeddings(cfg: Config) -> bool:
    """Whether all three embedding matrices are one (section 3.4)."""
    if cfg.model.share_embeddings is None:
        return cfg.data.joint_vocab
    return cfg.model.share_embeddings


# --- loading ---------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, str, Any]:
    """'model.n_heads=8' -> ('model', 'n_heads', 8); the value is read as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. model.n_heads=8")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}; "
                          f"expected one of {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, key, value


def from_dict(raw: dict, source: str = "<config>", name: str = "config",
              check_paths: bool = True) -> Config:
    """Build and validate a Config from a plain mapping of sections.

    check_paths=False skips the check that data.path exists (a checkpoint that
    only translates does not need its corpus).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {section}: unknown section; "
                              f"expected one of {', '.join(SECTIONS)}")
        sections[section] = _build_section(SECTIONS[section], values or {}, source, section)
    try:
        cfg = Config(name=name, **sections)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if check_paths:
        _check_path(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (the inverse of from_dict)."""
    out = {}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


class _SafeNoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no tags that build objects), refusing anchors, aliases and
    keys given twice.

    A config never needs them, and aliases nested in aliases can expand a small file
    into billions of nodes.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("anchors and aliases (&name, *name) are not allowed in a config")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is a mistake (a second `model:` block would silently replace
        the first), not the last one winning as plain YAML has it."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str, what: str = "config file") -> Any:
    """A YAML file (config, sweep or probe) as plain data, by the safe loader below; any
    problem is one ConfigError naming the file (and the line)."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_SafeNoAliasLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_config(path: str, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read a YAML config, apply dotted overrides, validate, freeze."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][key] = value
    source = path + (" (with overrides)" if overrides else "")
    name = os.path.splitext(os.path.basename(path))[0]
    return from_dict(raw, source, name, check_paths)


def with_overrides(cfg: Config, overrides: list[str], source: str,
                   sections: tuple[str, ...] = tuple(SECTIONS), check_paths: bool = True) -> Config:
    """A copy of cfg with dotted overrides applied to the given sections, validated again.

    sections: what may change, whole sections ("train") or single keys ("data.path").
    """
    raw = to_dict(cfg)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in sections and f"{section}.{key}" not in sections:
            allowed = ", ".join(a if "." in a else f"{a}.*" for a in sections)
            raise ConfigError(f"override {text!r}: only {allowed} can be changed here")
        raw[section][key] = value
    return from_dict(raw, source=f"{source} (with overrides)", name=cfg.name,
                     check_paths=check_paths)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config so that the run can be reproduced from its folder.

    Written beside and then renamed over the old file: never half a config.
    """
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(path + ".tmp", path)
