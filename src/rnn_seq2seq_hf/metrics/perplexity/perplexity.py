"""Perplexity from summed negative log-likelihoods, as a local `evaluate` module.

Inputs: `nll_sums` (natural-log NLL summed over the tokens of a batch) and `token_counts` (tokens in that batch).
Returns perplexity = exp(total NLL / total tokens), the mean NLL in nats and bits per token.
"""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity of a language model from its summed token negative log-likelihoods.",
            citation="",
            inputs_description=__doc__,
            features=datasets.Features(
                {"nll_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sums, token_counts):
        tokens = sum(token_counts)
        if tokens <= 0:
            raise ValueError("perplexity needs at least one token")
        mean = sum(nll_sums) / tokens
        return {
            "perplexity": math.exp(mean),
            "nats_per_token": mean,
            "bits_per_token": mean / math.log(2),
            "tokens": tokens,
        }
