"""Ensemble decoding (`Seq2SeqEnsemble`) against hand computations from its members' own forward passes."""

import pytest
import torch

from helpers import PAD, make_seq2seq, random_tokens, right_padded, strip_after_eos
from rnn_seq2seq_hf.ensemble import EnsembleCache, Seq2SeqEnsemble


def members():
    """Two members that share a vocabulary but little else (cell, attention, input feeding, layers)."""
    first = make_seq2seq(seed=0)
    second = make_seq2seq(seed=1, cell_type="gru", attention_type="bahdanau", input_feeding=True, decoder_layers=1,
                          encoder_layers=1)  # fmt: skip
    return first, second


def sources():
    ids, mask = right_padded([[5, 6, 7, 8, 2], [9, 10, 2], [11, 12, 13, 2]])
    return ids, mask


@torch.no_grad()
def averaged_next_token_probs(models, source, mask, prefix, weights=None):
    """p(. | prefix, source) = sum_i w_i p_i, from each member's full forward over the prefix (no cache)."""
    weights = weights or [1 / len(models)] * len(models)
    probs = 0
    for weight, model in zip(weights, models):
        logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=prefix, use_cache=False).logits
        probs = probs + weight * logits[:, -1].float().softmax(-1)
    return probs


@torch.no_grad()
def ensemble_log_prob(models, source, output_ids):
    """log p(output | source) under the averaged distributions, summed over the output tokens."""
    start = models[0].config.decoder_start_token_id
    prefix = torch.tensor([[start] + output_ids[:-1]])
    total = 0.0
    for t, token in enumerate(output_ids):
        probs = averaged_next_token_probs(models, source[None], None, prefix[:, : t + 1])
        total += probs[0, token].log().item()
    return total


@pytest.mark.parametrize("num_beams", [1, 3])
def test_an_ensemble_of_one_is_the_model(num_beams):
    model, _ = members()
    ensemble = Seq2SeqEnsemble([model]).eval()
    ids, mask = sources()
    alone = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=7)
    together = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=7)
    assert torch.equal(alone, together)
    decoder_input_ids = random_tokens(3, 4, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
        got = ensemble(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(got, expected.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_every_greedy_step_is_the_argmax_of_the_averaged_probabilities():
    models = members()
    ensemble = Seq2SeqEnsemble(models).eval()
    ids, mask = sources()
    generated = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_new_tokens=8)
    different = False
    for step in range(1, generated.shape[1]):
        prefix = generated[:, :step]
        probs = averaged_next_token_probs(models, ids, mask, prefix)
        for row in range(ids.shape[0]):
            if step > 1 and models[0].config.eos_token_id in prefix[row, 1:].tolist():
                continue  # finished: the rest is padding
            assert generated[row, step].item() == probs[row].argmax().item()
            alone = [averaged_next_token_probs([m], ids, mask, prefix)[row].argmax().item() for m in models]
            different |= alone[0] != alone[1]
    assert different  # the members disagree somewhere, so averaging was really tested


def test_beam_search_scores_are_the_ensemble_probabilities_and_batching_changes_nothing():
    models = members()
    ensemble = Seq2SeqEnsemble(models).eval()
    ids, mask = sources()
    batched = ensemble.generate(
        input_ids=ids, attention_mask=mask, num_beams=4, num_return_sequences=2, max_new_tokens=6,
        length_penalty=0.8, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    for row in range(ids.shape[0]):
        source = ids[row][mask[row].bool()]
        alone = ensemble.generate(input_ids=source[None], num_beams=4, num_return_sequences=2, max_new_tokens=6,
                                  length_penalty=0.8)  # fmt: skip
        # the encoder outputs and caches of every member follow their beams (wrong expansion mixes sentences)
        assert alone.tolist() == batched.sequences[2 * row : 2 * row + 2, : alone.shape[1]].tolist()
        for rank in range(2):
            output = strip_after_eos(batched.sequences[2 * row + rank, 1:].tolist())
            expected = ensemble_log_prob(models, source, output) / len(output) ** 0.8
            assert batched.sequences_scores[2 * row + rank].item() == pytest.approx(expected, abs=1e-4)


def test_weights_select_members_and_the_loss_is_the_ensemble_likelihood():
    first, second = members()
    ids, mask = sources()
    only_first = Seq2SeqEnsemble([first, second], weights=[1.0, 0.0]).eval()
    assert torch.equal(
        only_first.generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=6),
        first.generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=6),
    )
    ensemble = Seq2SeqEnsemble([first, second], weights=[3.0, 1.0]).eval()
    labels = random_tokens(3, 4, seed=5)
    labels[2, 3] = -100
    with torch.no_grad():
        out = ensemble(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    start = first.config.decoder_start_token_id
    prefix = torch.cat([torch.full((3, 1), start), labels[:, :-1].clamp(min=PAD)], dim=1)
    nll = []
    for t in range(4):
        probs = averaged_next_token_probs([first, second], ids, mask, prefix[:, : t + 1], weights=[0.75, 0.25])
        nll += [-probs[b, labels[b, t]].log().item() for b in range(3) if labels[b, t] != -100]
    assert out.loss.item() == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert isinstance(out.cache, EnsembleCache) and len(out.cache.members) == 2
    assert out.cross_attentions[0].shape == (3, 1, 4, ids.shape[1])  # the members' average


def test_members_must_share_the_vocabulary():
    first, _ = members()
    other = make_seq2seq(seed=2, vocab_size=30)
    with pytest.raises(ValueError, match="vocab_size is 30 but model 0 has 23"):
        Seq2SeqEnsemble([first, other])
    other_eos = make_seq2seq(seed=2, eos_token_id=3)
    with pytest.raises(ValueError, match="eos_token_id"):
        Seq2SeqEnsemble([first, other_eos])
    with pytest.raises(ValueError, match="weights"):
        Seq2SeqEnsemble([first, first], weights=[1.0, -1.0])
