"""Scoring throughput: pairs/second of `pipeline.generation.scoring.score` on ~100-word texts, next to plain rouge_score.

Rates are per CPU-second of this process (scoring is single-threaded), so a busy shared machine skews them less.
Usage: python benchmarks/scoring.py [pairs]   (texts are 100-word windows of the local CNN/DailyMail slice)
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from rouge_score import rouge_scorer

from pipeline.generation.scoring import score, sentence_lines, sentence_splitter

DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def main(pairs: int) -> None:
    with (DATA / "cnn_dailymail" / "test_sample.jsonl").open() as handle:
        words = [word for line in handle for word in json.loads(line)["article"].split()]
    rng = random.Random(0)

    def window() -> str:
        start = rng.randrange(len(words) - 100)
        return " ".join(words[start : start + 100])

    outputs, references, full = ([window() for _ in range(pairs)] for _ in range(3))
    started = time.process_time()
    score(outputs, references, full, summary=True)
    ours = pairs / (time.process_time() - started)

    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    fidelity = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    started = time.process_time()
    for output, reference, whole in zip(outputs, references, full):
        rouge.score(sentence_lines(reference), sentence_lines(output))
        fidelity.score(whole, output)
    plain = pairs / (time.process_time() - started)
    print(f"score(): {ours:.0f} pairs/s for {pairs} pairs (5 columns, summary=True, splitter={sentence_splitter()}); "
          f"the same calls to rouge_score's own scorers: {plain:.0f} pairs/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
