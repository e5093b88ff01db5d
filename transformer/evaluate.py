"""Scores with sacreBLEU: corpus BLEU and chrF on detokenized text, with signatures."""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class Scores:
    """Corpus-level BLEU and chrF, and sacreBLEU's signatures that say how they were computed."""

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str

    def lines(self) -> list[str]:
        return [
            f"BLEU = {self.bleu:.2f}  ({self.bleu_signature})",
            f"chrF = {self.chrf:.2f}  ({self.chrf_signature})",
        ]


def score(hypotheses: list[str], references: list[str]) -> Scores:
    """Cased, detokenized sacreBLEU and chrF of hypotheses against one reference each."""
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()))
