"""translate(), attention_weights() and evaluate_perplexity() against direct computations."""

import math

import numpy as np
import pytest
import torch

from helpers import make_lm, make_seq2seq
from rnn_seq2seq_hf.inference import attention_weights, evaluate_perplexity, translate
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
