"""Scores with sacreBLEU: corpus BLEU and chrF on detokenized text, with signatures; and
the BLEU the Multi30k literature reports, on Moses-tokenized text."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from .tokenizer import prepare_text


@dataclass(frozen=True)
class Scores:
    """Corpus-level BLEU and chrF, and sacreBLEU's signatures that say how they were computed."""

    bleu: float
    bleu_lc: float
    chrf: float
    bleu_signature: str
    bleu_lc_signature: str
    chrf_signature: str
    bleu_tok: float | None = None  # against tokenized references, where there are some
    bleu_tok_signature: str = ""

    def lines(self) -> list[str]:
        lines = [
            f"BLEU           = {self.bleu:.2f}  ({self.bleu_signature})",
            f"BLEU lowercase = {self.bleu_lc:.2f}  ({self.bleu_lc_signature})",
            f"chrF           = {self.chrf:.2f}  ({self.chrf_signature})",
        ]
        if self.bleu_tok is not None:
            lines.append(f"BLEU lc Moses  = {self.bleu_tok:.2f}  ({self.bleu_tok_signature})")
        return lines


def score(hypotheses: list[str], references: list[str],
          tokenized: tuple[str, list[str]] | None = None, lang: str = "de") -> Scores:
    """sacreBLEU on detokenized text against one reference each.

    BLEU: cased, the standard. BLEU lowercase: lowercased, 13a-tokenized. chrF:
    character n-gram F-score. tokenized = (file, lines): references that are already
    lowercased and Moses-tokenized; then also `moses_bleu` against them.
    """
    bleu, bleu_lc, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    refs = [references]
    tok, tok_signature = None, ""
    if tokenized is not None:
        tok, tok_signature = moses_bleu(hypotheses, tokenized[1], lang)
        tok_signature += f" against {tokenized[0]}"
    return Scores(
        bleu.corpus_score(hypotheses, refs).score,
        bleu_lc.corpus_score(hypotheses, refs).score,
        chrf.corpus_score(hypotheses, refs).score,
        str(bleu.get_signature()), str(bleu_lc.get_signature()), str(chrf.get_signature()),
        tok, tok_signature,
    )


def moses_tokenize(lines: list[str], lang: str) -> list[str]:
    """What Multi30k's own script does to its references: lowercase.perl, then
    normalize-punctuation.perl -l lang, then tokenizer.perl -l lang (escaping & ' " as
    &amp; &apos; &quot;), here by sacremoses. On the corpus' raw German references it gives
    the files in tok/ line for line (3,474 of the 3,475 lines of val and the three tests)."""
    return prepare_text(lines, lowercase=True, moses_lang=lang, escape=True)


def moses_bleu(hypotheses: list[str], tokenized_refs: list[str], lang: str) -> tuple[float, str]:
    """Corpus BLEU of the hypotheses, lowercased and Moses-tokenized (`moses_tokenize`),
    against references already so, with no further tokenization: the BLEU of
    multi-bleu.perl and fairseq's scorer, which the Multi30k literature reports."""
    metric = BLEU(tokenize="none", force=True)  # force: the text is tokenized on purpose
    result = metric.corpus_score(moses_tokenize(hypotheses, lang), [tokenized_refs])
    return result.score, f"lc+sacremoses-{lang}|{metric.get_signature()}"


def spread(values: list[float]) -> str:
    """'40.12 ± 0.31 (39.80-40.52)': the mean, the sample standard deviation and the range."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f} ({min(values):.2f}-{max(values):.2f})"


def spread_table(scores: dict[str, list[Scores]]) -> list[str]:
    """A Markdown table: a row per split, each scoring's spread over the checkpoints
    (several runs of one recipe, say, one per seed)."""
    columns = [("BLEU", "bleu"), ("BLEU lc", "bleu_lc"), ("chrF", "chrf")]
    if all(s.bleu_tok is not None for runs in scores.values() for s in runs):
        columns.insert(2, ("BLEU lc Moses", "bleu_tok"))
    lines = ["| split | runs | " + " | ".join(title for title, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for split, runs in scores.items():
        cells = [spread([getattr(s, key) for s in runs]) for _, key in columns]
        lines.append(f"| {split} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines
