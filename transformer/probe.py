"""A probe of the lecture notes' "it -> animal" claim: where does a pronoun attend?

For each sentence of a probe file (configs/probe.yaml) the model translates it, and its
encoder self-attention weights are read on the reference path (visualize.py). From the
pronoun's first piece, as the query, we add up the weight each head of each layer puts
on the pieces of each of the two candidate nouns. A head "picks" the candidate with
more weight; the probe reports, per layer, how often the mean over heads picks the
right one, and whether the translation uses the German pronoun that agrees with it.

The sentences come in pairs that flip the answer, so a model that attends by position
or by word, not by meaning, scores about one half.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from .config import ConfigError, read_yaml
from .model import Transformer
from .tokenizer import Tokenizer
from .visualize import translate_with_attention

WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word


@dataclass(frozen=True)
class Item:
    sentence: str
    pronoun: str
    candidates: tuple[str, str]
    answer: str
    de: str = ""  # the target-language pronoun that agrees with the answer


def load_items(path: str) -> list[Item]:
    """The probe file: a list of items, each checked, one line naming what is wrong."""
    raw = read_yaml(path, "probe file")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a list of items (sentence, pronoun, candidates, "
                          "answer)")
    items = []
    for number, entry in enumerate(raw, 1):
        where = f"{path}: item {number}"
        if not isinstance(entry, dict) or set(entry) - {"sentence", "pronoun", "candidates",
                                                        "answer", "de"}:
            raise ConfigError(f"{where}: expected the keys sentence, pronoun, candidates, "
                              "answer (and de)")
        try:
            item = Item(str(entry["sentence"]), str(entry["pronoun"]),
                        tuple(str(c) for c in entry["candidates"]), str(entry["answer"]),
                        str(entry.get("de") or ""))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: missing or malformed {e}") from None
        if len(item.candidates) != 2 or item.answer not in item.candidates:
            raise ConfigError(f"{where}: expected two candidates, the answer one of them")
        for word in (item.pronoun, *item.candidates):
            if _word(word) not in [_word(w) for w in item.sentence.split()]:
                raise ConfigError(f"{where}: {word!r} is not a word of the sentence")
        items.append(item)
    return items


def _word(text: str) -> str:
    return text.strip(string.punctuation).lower()


def word_pieces(sentence: str, pieces: list[str]) -> list[tuple[str, list[int]]]:
    """The sentence's words, each with the indices of its pieces.

    SentencePiece starts a piece at every space, marked: the k-th marked group of pieces
    is the k-th word (however the word is cut up, and even with pieces it has never seen).
    """
    groups: list[list[int]] = []
    for i, piece in enumerate(pieces):
        if piece == "</s>":
            break
        if piece.startswith(WORD_START) or not groups:
            groups.append([])
        groups[-1].append(i)
    words = sentence.split()
    if len(groups) != len(words):
        raise ValueError(f"{len(words)} words but {len(groups)} word starts in the pieces")
    return [(_word(w), g) for w, g in zip(words, groups)]


def find(words: list[tuple[str, list[int]]], word: str) -> list[int]:
    """The piece indices of the first occurrence of word."""
    for text, indices in words:
        if text == _word(word):
            return indices
    raise ValueError(f"no word {word!r}")


@dataclass
class Result:
    item: Item
    translation: str
    # (layers, heads, 2): weight from the pronoun onto each candidate, in candidate order
    weights: torch.Tensor

    def picks_right(self) -> torch.Tensor:
        """(layers,) whether the mean over heads puts more weight on the answer."""
        right = self.item.candidates.index(self.item.answer)
        mean = self.weights.mean(1)  # (layers, 2)
        return mean[:, right] > mean[:, 1 - right]

    def heads_right(self) -> int:
        right = self.item.candidates.index(self.item.answer)
        return int((self.weights[..., right] > self.weights[..., 1 - right]).sum())

    def pronoun_agrees(self) -> bool | None:
        if not self.item.de:
            return None
        return self.item.de.lower() in [_word(w) for w in self.translation.split()]


def probe(model: Transformer, tokenizer: Tokenizer, items: list[Item],
          beam: int = 1) -> list[Result]:
    results = []
    for item in items:
        maps = translate_with_attention(model, tokenizer, item.sentence, beam)
        try:
            words = word_pieces(item.sentence, maps.src_pieces)
            query = find(words, item.pronoun)[0]
            keys = [find(words, c) for c in item.candidates]
        except ValueError as e:
            raise ConfigError(f"{item.sentence!r}: cannot find the words in the model's pieces "
                              f"({e}; pieces: {' '.join(maps.src_pieces)})") from None
        per_layer = [w[0, :, query] for w in maps.weights["encoder-self"]]  # (H, S) each
        weights = torch.stack([torch.stack([w[:, k].sum(-1) for k in keys], -1)
                               for w in per_layer])  # (layers, heads, 2)
        results.append(Result(item, maps.translation, weights))
    return results


def report(results: list[Result]) -> list[str]:
    """Lines to print: each sentence's weights, then what the model did overall."""
    lines = []
    layers, heads = results[0].weights.shape[:2]
    for r in results:
        a, b = r.item.candidates
        agrees = r.pronoun_agrees()
        lines.append(f"{r.item.sentence}  [{r.item.pronoun} -> {r.item.answer}]")
        lines.append(f"  translation: {r.translation}" + (
            "" if agrees is None else
            f"  ({r.item.de!r} {'present' if agrees else 'absent'})"))
        for layer in range(layers):
            w = r.weights[layer]
            by_head = " ".join(f"{x:.2f}/{y:.2f}" for x, y in w.tolist())
            mean = w.mean(0).tolist()
            lines.append(f"  layer {layer + 1}: mean {a} {mean[0]:.3f}, {b} {mean[1]:.3f} "
                         f"| per head {a}/{b}: {by_head}")
    lines.append("")
    n = len(results)
    for layer in range(layers):
        right = sum(bool(r.picks_right()[layer]) for r in results)
        lines.append(f"layer {layer + 1}: the mean over heads puts more weight on the right "
                     f"noun in {right} of {n} sentences")
    total = sum(r.heads_right() for r in results)
    lines.append(f"all heads of all layers: {total} of {n * layers * heads} prefer the right "
                 f"noun ({100 * total / (n * layers * heads):.0f}%; by chance about 50%)")
    agreeing = [r.pronoun_agrees() for r in results if r.pronoun_agrees() is not None]
    if agreeing:
        lines.append(f"translations with the pronoun that agrees with the right noun: "
                     f"{sum(agreeing)} of {len(agreeing)}")
    return lines
