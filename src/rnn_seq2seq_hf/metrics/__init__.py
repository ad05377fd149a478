"""Metrics shipped as local `evaluate` modules, loaded by path.

`evaluate.load("sacrebleu")` fetches its script from the Hub, which fails offline; these modules live inside the
library and are loaded from disk, so evaluation works anywhere. Their scores equal sacreBLEU's (tested).
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
LOCAL_METRICS = ("sacrebleu_bleu", "sacrebleu_chrf", "perplexity")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of `LOCAL_METRICS` from this folder."""
    if name not in LOCAL_METRICS:
        raise ValueError(f"metric must be one of {list(LOCAL_METRICS)}, got {name!r}")
    return evaluate.load(str(METRICS_DIR / name))


def translation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """sacreBLEU BLEU (cased, detokenized, 13a), lowercased BLEU, chrF and exact match (in %), one reference each."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    refs = [[reference] for reference in references]
    bleu = load_metric("sacrebleu_bleu")
    chrf = load_metric("sacrebleu_chrf")
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {
        "bleu": bleu.compute(predictions=predictions, references=refs)["score"],
        "bleu_lowercase": bleu.compute(predictions=predictions, references=refs, lowercase=True)["score"],
        "chrf": chrf.compute(predictions=predictions, references=refs)["score"],
        "exact_match": 100.0 * exact / max(len(references), 1),
    }


__all__ = ["LOCAL_METRICS", "load_metric", "translation_scores"]
