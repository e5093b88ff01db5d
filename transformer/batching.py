"""Batches by token count, with sentences of similar length together.

A batch of B sentences padded to length L costs B * L positions of compute
whatever their real length. Sorting by length before packing keeps L close to
each sentence's own length, so little compute goes to padding; packing up to a
token budget (not a sentence count) keeps every step about the same size.

`prepare` makes a run's batches from its config: corpus, tokenizer, length filter.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import Config
from .data import DataError, columns, load_corpus
from .tokenizer import BOS, EOS, PAD, Tokenizer, load_or_train

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Padded tensors of one batch: src (B, S), tgt_in (B, T), tgt_out (B, T).

    Also what the host knows without asking the device: n_tokens, the real target
    tokens (the unit of loss and of throughput), and real (N,), their flat indices
    in tgt_out, so that the loss never needs a boolean mask (see step.py).
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    real: torch.Tensor
    n_tokens: int

    def _map(self, fn) -> Batch:
        return Batch(*(fn(t) for t in (self.src, self.tgt_in, self.tgt_out, self.real)),
                     self.n_tokens)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch on device; non_blocking copies overlap with work already queued."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory, which the GPU copies from asynchronously."""
        return self._map(torch.Tensor.pin_memory)


@dataclass
class Update:
    """What one process trains on for one optimizer update.

    batches: this process's micro-batches (train.accumulate of them); n_tokens: the real
    target tokens of the whole update, every process's micro-batches together, known on
    the host: each micro-batch's loss is divided by it, so that the summed gradients are
    those of one big batch.
    """

    batches: list[Batch]
    n_tokens: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Update:
        return Update([b.to(device, non_blocking) for b in self.batches], self.n_tokens)

    def pin_memory(self) -> Update:
        return Update([b.pin_memory() for b in self.batches], self.n_tokens)


def pad(seqs: list[list[int]], pad_id: int = PAD, length: int = 0) -> torch.Tensor:
    """List of id lists -> (B, L) tensor, padded on the right to the longest (or `length`)."""
    out = torch.full((len(seqs), max(length, *(len(s) for s in seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(src: list[list[int]], tgt: list[list[int]],
            shape: tuple[int, int] | None = None) -> Batch:
    """Sources as they are; targets <s> y </s> split into decoder input and output.

    shape (rows, length): pad the batch to exactly rows x length, source and target
    alike, for a compiled step that must see few shapes. The extra rows are the
    shortest possible pair, source </s> and target <s>: a row with no real source
    token would leave its attention nothing to attend to, and they add no loss.
    """
    length = 0
    if shape is not None:
        rows, length = shape
        src = src + [[EOS]] * (rows - len(src))
        tgt = tgt + [[BOS]] * (rows - len(tgt))
    tgt_t = pad(tgt, length=length + 1 if length else 0)
    tgt_out = tgt_t[:, 1:]
    real = (tgt_out != PAD).flatten().nonzero().squeeze(1)  # (N,), on the host
    return Batch(pad(src, length=length), tgt_t[:, :-1], tgt_out, real, real.numel())


def prefetch(batches: Iterator, device: torch.device) -> Iterator:
    """The batches (or updates) on device, each copied while the one before it is being trained on.

    On a GPU the next batch is made, pinned and its copy queued before the current
    one is handed out, so the step never waits for a host-to-device copy. On the
    CPU the batches pass through as they are.
    """
    if device.type != "cuda":
        yield from batches
        return
    ahead = None
    for batch in batches:
        batch = batch.pin_memory().to(device, non_blocking=True)
        if ahead is not None:
            yield ahead
        ahead = batch
    if ahead is not None:
        yield ahead


def token_batches(lengths: list[int], batch_tokens: int, rng: random.Random | None) -> list:
    """Group indices so that len(batch) * longest <= batch_tokens.

    With an rng: shuffle first (so equal lengths come in a new order each epoch),
    sort by length, pack, then shuffle the order of the batches. Without one: the
    same deterministic batches every time, for evaluation.
    """
    order = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])  # stable: ties keep the shuffled order
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


class BatchIterator:
    """Token-budget batches over encoded (src, tgt) pairs, reshuffled every epoch.

    bucket > 0 makes few batch shapes, for a compiled step (train.compile): lengths
    are rounded up to a multiple of `bucket` and a batch of length L is padded to
    batch_tokens // L rows, so there is one shape per length bucket.
    """

    def __init__(self, src: list[list[int]], tgt: list[list[int]], batch_tokens: int,
                 shuffle: bool, seed: int = 0, bucket: int = 0):
        assert len(src) == len(tgt)
        self.src, self.tgt = src, tgt
        self.batch_tokens = batch_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = bucket
        # A pair costs max(source length, target length) positions in its batch.
        self.lengths = [max(len(s), len(t) - 1) for s, t in zip(src, tgt)]
        if bucket:
            self.lengths = [-(-n // bucket) * bucket for n in self.lengths]  # rounded up

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch) if self.shuffle else None
        return token_batches(self.lengths, self.batch_tokens, rng)

    def _collate(self, idx: list[int]) -> Batch:
        shape = None
        if self.bucket:
            length = max(self.lengths[i] for i in idx)
            shape = (max(self.batch_tokens // length, len(idx)), length)
        return collate([self.src[i] for i in idx], [self.tgt[i] for i in idx], shape)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from the start-th on; the same epoch gives the same batches."""
        for idx in self._batches(epoch)[start:]:
            yield self._collate(idx)

    def updates(self, epoch: int, start: int = 0, processes: int = 1, rank: int = 0,
                accumulate: int = 1) -> Iterator[Update]:
        """The updates of one epoch from the start-th on, as process `rank` takes them.

        Every process draws the same seeded epoch of micro-batches and cuts it into
        updates of processes * accumulate consecutive micro-batches; process r takes
        the r-th `accumulate` of each. So no pair comes twice in an epoch, and one
        process with accumulate=2 makes the very updates of two processes with 1.
        The last micro-batches, too few to fill an update, wait for a later epoch
        (each epoch is shuffled anew); with one process and accumulate=1 there are none.
        """
        per_update = processes * accumulate
        batches = self._batches(epoch)
        for u in range(start, len(batches) // per_update):
            group = batches[u * per_update:(u + 1) * per_update]
            mine = group[rank * accumulate:(rank + 1) * accumulate]
            n_tokens = sum(len(self.tgt[i]) - 1 for idx in group for i in idx)
            yield Update([self._collate(idx) for idx in mine], n_tokens)

    def __len__(self) -> int:
        return len(token_batches(self.lengths, self.batch_tokens, None))


@dataclass
class Prepared:
    """What a run needs from the data: tokenizer, batches and validation text."""

    tokenizer: Tokenizer
    train: BatchIterator
    valid: BatchIterator
    valid_src: list[str]
    valid_ref: list[str]


COMPILE_BUCKET = 8  # with train.compile, batch lengths are multiples of this


def prepare(cfg: Config, tokenizer: Tokenizer | None = None, processes: int = 1) -> Prepared:
    """Load the corpus, train or load the tokenizer (unless given), encode and batch.

    The training batches are micro-batches of train.batch_tokens / (processes *
    train.accumulate) tokens, `processes * accumulate` of which make one update.
    """
    corpus = load_corpus(cfg.data)
    train_src, train_tgt = columns(corpus["train"])
    if tokenizer is None:
        tokenizer = load_or_train(cfg.data, train_src, train_tgt)
    src_ids, tgt_ids = tokenizer.encode_src(train_src), tokenizer.encode_tgt(train_tgt)
    limit = cfg.model.max_positions
    if cfg.data.max_tokens:
        limit = min(limit, cfg.data.max_tokens)
    keep = [i for i in range(len(src_ids)) if len(src_ids[i]) <= limit and len(tgt_ids[i]) <= limit]
    if not keep:
        raise DataError(f"data.max_tokens={cfg.data.max_tokens} removes every training pair")
    if len(keep) < len(src_ids):
        log.info("length filter (%d tokens): kept %d of %d training pairs",
                 limit, len(keep), len(src_ids))
    micro_tokens = max(cfg.train.batch_tokens // (processes * cfg.train.accumulate), 1)
    train = BatchIterator([src_ids[i] for i in keep], [tgt_ids[i] for i in keep],
                          micro_tokens, shuffle=True, seed=cfg.train.seed,
                          bucket=COMPILE_BUCKET if cfg.train.compile else 0)
    valid_src, valid_ref = columns(corpus["valid"])
    # Validation keeps long pairs (no length filter), cut only to what the model can hold.
    most = cfg.model.max_positions
    v_src = [s[:most] for s in tokenizer.encode_src(valid_src)]
    v_tgt = [t[:most + 1] for t in tokenizer.encode_tgt(valid_ref)]
    valid = BatchIterator(v_src, v_tgt, cfg.train.batch_tokens, shuffle=False)
    return Prepared(tokenizer, train, valid, valid_src, valid_ref)
