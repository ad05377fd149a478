"""Corpus BLEU with sacreBLEU, as a local `evaluate` module (loaded by path, so nothing is fetched from the Hub).

Inputs: `predictions` (list of detokenized strings) and `references` (list of lists of strings, one list of
references per prediction; every prediction needs the same number). Options: `lowercase`, `tokenize` ("13a", the
default, as WMT and sacreBLEU's signature use).
"""

import datasets
import evaluate
import sacrebleu


class SacrebleuBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU computed by sacreBLEU (detokenized input).",
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=__doc__,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, lowercase=False, tokenize="13a"):
        counts = {len(refs) for refs in references}
        if len(counts) > 1:
            raise ValueError("every prediction needs the same number of references")
        streams = [list(stream) for stream in zip(*references)]
        bleu = sacrebleu.BLEU(lowercase=lowercase, tokenize=tokenize)
        result = bleu.corpus_score(predictions, streams)
        return {
            "score": result.score,
            "precisions": result.precisions,
            "brevity_penalty": result.bp,
            "signature": str(bleu.get_signature()),
        }
