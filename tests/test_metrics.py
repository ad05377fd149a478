"""The local evaluate modules give sacreBLEU's scores, offline."""

import math

import pytest
import sacrebleu

from rnn_seq2seq_hf.metrics import load_metric, translation_scores

HYPOTHESES = ["The cat sat on the mat.", "A dog runs in the park!", "Zwei Männer spielen Fußball.", ""]
REFERENCES = ["The cat sat on a mat.", "a dog runs in the park", "Zwei Männer spielen Fussball.", "Nothing here."]
SECOND_REFERENCES = ["A cat sat on the mat.", "A dog is running in a park!", "Zwei Männer spielen Fußball.", "Empty."]


def test_bleu_and_chrf_equal_sacrebleu_on_fixed_strings():
    scores = translation_scores(HYPOTHESES, REFERENCES)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score, abs=1e-9)
    lower = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], lowercase=True).score
    assert scores["bleu_lowercase"] == pytest.approx(lower, abs=1e-9)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score, abs=1e-9)
    assert scores["exact_match"] == 0.0
    assert translation_scores(REFERENCES, REFERENCES)["exact_match"] == 100.0


def test_multiple_references_and_signature():
    bleu = load_metric("sacrebleu_bleu")
    result = bleu.compute(predictions=HYPOTHESES, references=[list(r) for r in zip(REFERENCES, SECOND_REFERENCES)])
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES, SECOND_REFERENCES]).score
    assert result["score"] == pytest.approx(expected, abs=1e-9)
    assert "tok:13a" in result["signature"] and "case:mixed" in result["signature"]
    chrf_pp = load_metric("sacrebleu_chrf").compute(
        predictions=HYPOTHESES, references=[[r] for r in REFERENCES], word_order=2
    )
    assert chrf_pp["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES], word_order=2).score)


def test_perplexity_metric():
    result = load_metric("perplexity").compute(nll_sums=[10.0, 5.0], token_counts=[4, 2])
    assert result["perplexity"] == pytest.approx(math.exp(2.5))
    assert result["bits_per_token"] == pytest.approx(2.5 / math.log(2))
    with pytest.raises(ValueError):
        load_metric("perplexity").compute(nll_sums=[1.0], token_counts=[0])


def test_unknown_metric_and_length_mismatch():
    with pytest.raises(ValueError, match="metric must be one of"):
        load_metric("rouge")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        translation_scores(["a", "b"], ["a"])
