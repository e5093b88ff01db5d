"""Scores with sacreBLEU: corpus BLEU and chrF on detokenized text, with signatures."""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class Scores:
    """Corpus-level BLEU and chrF, and sacreBLEU's signatures that say how they were computed."""

    bleu: float
    bleu_lc: float
    chrf: float
    bleu_signature: str
    bleu_lc_signature: str
    chrf_signature: str

    def lines(self) -> list[str]:
        return [
            f"BLEU           = {self.bleu:.2f}  ({self.bleu_signature})",
            f"BLEU lowercase = {self.bleu_lc:.2f}  ({self.bleu_lc_signature})",
            f"chrF           = {self.chrf:.2f}  ({self.chrf_signature})",
        ]


def score(hypotheses: list[str], references: list[str]) -> Scores:
    """sacreBLEU on detokenized text against one reference each.

    BLEU: cased, the standard. BLEU lowercase: what the Multi30k literature reports
    (lowercased, 13a-tokenized). chrF: character n-gram F-score.
    """
    bleu, bleu_lc, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    refs = [references]
    return Scores(
        bleu.corpus_score(hypotheses, refs).score,
        bleu_lc.corpus_score(hypotheses, refs).score,
        chrf.corpus_score(hypotheses, refs).score,
        str(bleu.get_signature()), str(bleu_lc.get_signature()), str(chrf.get_signature()),
    )
