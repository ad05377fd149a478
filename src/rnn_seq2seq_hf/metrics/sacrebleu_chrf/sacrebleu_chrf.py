"""Corpus chrF with sacreBLEU, as a local `evaluate` module. Inputs as for `sacrebleu_bleu`; option `word_order`
(0 for chrF, 2 for chrF++)."""

import datasets
import evaluate
import sacrebleu


class SacrebleuChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus chrF computed by sacreBLEU.",
            citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description=__doc__,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, word_order=0):
        streams = [list(stream) for stream in zip(*references)]
        chrf = sacrebleu.CHRF(word_order=word_order)
        return {"score": chrf.corpus_score(predictions, streams).score, "signature": str(chrf.get_signature())}
