"""Write the toy corpus in tests/toy_corpus: English number words -> German number words.

One TSV file per split (train, valid, test): English<TAB>German on each line.

A deterministic word-for-word "translation" that a tiny model learns in a minute on
a CPU, so that tests (and `make train CONFIG=configs/tiny.yaml`) can train, translate
and evaluate end to end without downloading anything. Run it to regenerate the files.
"""

import os
import random

EN = "zero one two three four five six seven eight nine".split()
DE = "null eins zwei drei vier fünf sechs sieben acht neun".split()


def pairs(n: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(1, 8))]
        out.append((" ".join(EN[d] for d in digits), " ".join(DE[d] for d in digits)))
    return out


def main(folder: str = os.path.join(os.path.dirname(__file__), "toy_corpus")) -> None:
    rng = random.Random(0)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", 3000), ("valid", 100), ("test", 100)):
        with open(os.path.join(folder, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("".join(f"{en}\t{de}\n" for en, de in pairs(n, rng)))


if __name__ == "__main__":
    main()
