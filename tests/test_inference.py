"""translate() (n-best, scores, alignments, token batching), score_translations(), attention_weights() and
evaluate_perplexity() against direct computations."""

import math

import numpy as np
import pytest
import torch

from helpers import make_lm, make_seq2seq, seq2seq_sequence_logprob, strip_after_eos
from rnn_seq2seq_hf.inference import (
    DEFAULT_MAX_NEW_TOKENS,
    attention_weights,
    evaluate_perplexity,
    make_batches,
    score_translations,
    translate,
    translate_hypotheses,
)
from rnn_seq2seq_hf.tokenization import train_tokenizer

WORDS = "a b c d e f g h i j k l m n o p q r s"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([WORDS], kind="word", vocab_size=None)  # 4 special + 19 words = 23 = tiny vocab


def test_translate_keeps_order_handles_empty_lines_and_equals_one_by_one(tokenizer):
    model = make_seq2seq()
    sentences = ["a b c d e f", "", "g h", "   ", "i j k l m n o p", "q"]
    outputs = translate(model, tokenizer, sentences, batch_size=2, num_beams=3, max_new_tokens=6)
    assert len(outputs) == len(sentences)
    assert outputs[1] == "" and outputs[3] == ""
    for sentence, output in zip(sentences, outputs):
        if sentence.strip():
            alone = model.generate(**tokenizer([sentence], return_tensors="pt"), num_beams=3, max_new_tokens=6)
            assert output == tokenizer.decode(alone[0], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="batch_size"):
        translate(model, tokenizer, ["a"], batch_size=0)


def test_attention_weights_for_a_translation(tokenizer):
    model = make_seq2seq(attention_type="bahdanau")
    weights, source_tokens, target_tokens = attention_weights(model, tokenizer, "a b c", "d e")
    assert source_tokens == ["▁a", "▁b", "▁c", "</s>"] and target_tokens == ["▁d", "▁e", "</s>"]
    assert weights.shape == (3, 4)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="no attention"):
        attention_weights(make_seq2seq(attention_type="none"), tokenizer, "a", "b")


@torch.no_grad()
def full_nll(model, tokens: torch.Tensor) -> float:
    logprobs = model(input_ids=tokens[None], use_cache=False).logits[0].float().log_softmax(-1)
    return -logprobs[:-1].gather(-1, tokens[1:, None]).sum().item()


@pytest.mark.parametrize(("batch_size", "block_size"), [(1, 4), (1, 100), (3, 5), (2, 7)])
def test_stateful_perplexity_equals_one_forward_per_part(batch_size, block_size):
    model = make_lm(cell_type="gru")
    stream = np.random.default_rng(0).integers(3, 23, size=47)
    result = evaluate_perplexity(model, stream, batch_size=batch_size, block_size=block_size)
    tokens = torch.as_tensor(stream)
    per_part = len(stream) // batch_size
    parts = [tokens[i * per_part : (i + 1) * per_part] for i in range(batch_size)]
    if len(stream) - per_part * batch_size > 1:
        parts.append(tokens[per_part * batch_size :])
    expected_nll = sum(full_nll(model, part) for part in parts)
    expected_tokens = sum(len(part) - 1 for part in parts)
    assert result["tokens"] == expected_tokens
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll / expected_tokens), rel=1e-4)


def test_make_batches_respects_both_limits_and_covers_every_sentence():
    lengths = [5, 1, 9, 3, 3, 7, 2, 12, 4]
    batches = make_batches(lengths, batch_size=3, max_tokens=14)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 14  # 12 > 14 / 2: alone
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths)  # sorted by length, as before
    assert make_batches(lengths, batch_size=None, max_tokens=108) == [sorted(range(9), key=lambda i: lengths[i])]
    with pytest.raises(ValueError, match="max_tokens"):
        make_batches(lengths, batch_size=None, max_tokens=0)


def test_token_batching_gives_the_same_translations(tokenizer):
    model = make_seq2seq()
    sentences = ["a b c d e f", "g h", "", "i j k l m n o p", "q", "r s a b"]
    alone = translate(model, tokenizer, sentences, batch_size=1, num_beams=2, max_new_tokens=5)
    by_tokens = translate(model, tokenizer, sentences, batch_size=None, max_tokens=12, num_beams=2, max_new_tokens=5)
    assert by_tokens == alone


def test_translation_without_a_length_limit_stops_at_the_default(tokenizer):
    model = make_seq2seq()
    assert model.generation_config.max_new_tokens is None and model.generation_config.max_length is None
    with torch.no_grad():  # never end: the default limit must stop it
        model.lm_head.linear.bias[model.config.eos_token_id] = -100.0
    (hypothesis,) = translate_hypotheses(model, tokenizer, ["a b"])[0]
    assert len(hypothesis.token_ids) == DEFAULT_MAX_NEW_TOKENS


@pytest.mark.parametrize("num_beams", [1, 3])
def test_scores_are_the_sequence_log_probability_under_the_length_penalty(tokenizer, num_beams):
    model = make_seq2seq(attention_type="bahdanau", input_feeding=True)
    sentences = ["a b c d e", "f g", "h i j k l m"]
    penalty = 0.7
    results = translate_hypotheses(
        model, tokenizer, sentences, batch_size=2, n_best=num_beams, with_scores=True, num_beams=num_beams,
        max_new_tokens=6, length_penalty=penalty,
    )  # fmt: skip
    for sentence, hypotheses in zip(sentences, results):
        encoded = tokenizer([sentence], return_tensors="pt")
        generated = model.generate(
            **encoded, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=6,
            length_penalty=penalty, return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        assert [h.token_ids for h in hypotheses] == [
            strip_after_eos(row[1:].tolist()) for row in generated.sequences
        ]  # n-best in beam search's order, best first
        for rank, hypothesis in enumerate(hypotheses):
            expected = seq2seq_sequence_logprob(model, encoded["input_ids"][0], hypothesis.token_ids)
            assert hypothesis.log_prob == pytest.approx(expected, abs=1e-4)
            assert hypothesis.score == pytest.approx(expected / len(hypothesis.token_ids) ** penalty, abs=1e-4)
            if num_beams > 1:  # the quantity beam search ranked by
                assert hypothesis.score == pytest.approx(generated.sequences_scores[rank].item(), abs=1e-4)


def test_alignments_are_the_cross_attention_of_the_output(tokenizer):
    model = make_seq2seq(attention_type="concat")
    with torch.no_grad():  # let some outputs end, so the final </s> is seen
        model.lm_head.linear.bias[model.config.eos_token_id] += 4.0
    sentences = ["a b c d e", "f g h", "i j k l"]
    results = translate_hypotheses(model, tokenizer, sentences, batch_size=3, with_alignment=True, max_new_tokens=8)
    assert any(hypothesis.token_ids[-1] == tokenizer.eos_token_id for (hypothesis,) in results)
    for sentence, (hypothesis,) in zip(sentences, results):
        alignment = hypothesis.alignment
        source = tokenizer([sentence], return_tensors="pt")
        assert alignment.source_tokens == tokenizer.convert_ids_to_tokens(source["input_ids"][0].tolist())
        assert alignment.target_tokens == tokenizer.convert_ids_to_tokens(hypothesis.token_ids)
        decoder_inputs = torch.tensor([[model.config.decoder_start_token_id, *hypothesis.token_ids[:-1]]])
        with torch.no_grad():  # the same sentence alone, teacher-forced on its output
            expected = model(**source, decoder_input_ids=decoder_inputs, output_attentions=True).cross_attentions
        np.testing.assert_allclose(alignment.weights, expected[0][0, 0].numpy(), atol=1e-5)
        hard = alignment.hard(tokenizer.eos_token)
        last = len(alignment.target_tokens) - (alignment.target_tokens[-1] == tokenizer.eos_token)
        assert [t for _, t in hard] == list(range(last))
        assert [s for s, _ in hard] == [int(row.argmax()) for row in alignment.weights[:last]]


def test_score_translations_is_the_teacher_forced_log_probability(tokenizer):
    model = make_seq2seq(cell_type="gru", attention_type="dot")
    sources = ["a b c", "d e f g h", "i"]
    targets = ["j k", "", "l m n o"]
    scores = score_translations(model, tokenizer, sources, targets, batch_size=2)
    for source, target, score in zip(sources, targets, scores):
        labels = tokenizer([target])["input_ids"][0]  # ends in </s>
        decoder_inputs = torch.tensor([[model.config.decoder_start_token_id, *labels[:-1]]])
        with torch.no_grad():
            logits = model(**tokenizer([source], return_tensors="pt"), decoder_input_ids=decoder_inputs).logits[0]
        by_hand = sum(torch.log_softmax(logits[t], -1)[token].item() for t, token in enumerate(labels))
        assert score.tokens == len(labels)
        assert score.log_prob == pytest.approx(by_hand, abs=1e-4)
        assert score.perplexity == pytest.approx(math.exp(-by_hand / len(labels)), rel=1e-4)
