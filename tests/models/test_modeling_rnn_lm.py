"""RNNLMForCausalLM: incremental decoding, padding, tying, loss and input checks."""

import pytest
import torch

from helpers import CELL_TYPES, EOS, LOGIT_TOL, assert_sharp, left_padded, make_lm, random_tokens
from rnn_seq2seq_hf import RNNCache, RNNLMModel


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("input_to_output", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_one_token_at_a_time_through_cache_equals_full_forward(cell, input_to_output, tie):
    model = make_lm(cell_type=cell, input_to_output=input_to_output, tie_word_embeddings=tie)
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        assert_sharp(full[mask.bool()])
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            cache = out.cache
            steps.append(out.logits)
    assert isinstance(cache, RNNCache) and cache.num_seen_tokens == ids.shape[1]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], **LOGIT_TOL)


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_left_padded_prompt_equals_prompt_alone(cell):
    model = make_lm(cell_type=cell)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [14, 15, 16]]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt]))
            torch.testing.assert_close(batch.logits[row, -1], alone.logits[0, -1], **LOGIT_TOL)
            for a, b in zip(batch.cache.get_state(), alone.cache.get_state()):
                torch.testing.assert_close(a[:, row], b[:, 0], atol=1e-5, rtol=1e-5)


def test_continuing_from_a_cache_equals_one_call():
    model = make_lm(cell_type="gru")
    ids = random_tokens(2, 9)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4])
        second = model(input_ids=ids[:, 4:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, **LOGIT_TOL)


def test_loss_is_shifted_mean_cross_entropy_ignoring_minus_100():
    model = make_lm()
    ids = random_tokens(3, 6)
    labels = ids.clone()
    labels[0, 4:] = -100
    out = model(input_ids=ids, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, 23), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # with a token count for the whole accumulated batch, the loss is a sum divided by that count
    summed = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=40).loss, summed / 40)


@pytest.mark.parametrize("hidden_size", [12, 16])
def test_tied_output_layer_shares_the_embedding(hidden_size):
    model = make_lm(tie_word_embeddings=True, hidden_size=hidden_size)
    assert model.lm_head.linear.weight is model.model.embed_tokens.weight
    # a bottleneck projection exists only when the hidden size differs from the embedding size
    assert (model.lm_head.projection is not None) == (hidden_size != 12)
    untied = make_lm(tie_word_embeddings=False)
    assert untied.lm_head.linear.weight is not untied.model.embed_tokens.weight


def test_input_to_output_adds_the_classic_w_xo_term():
    model = make_lm(input_to_output=True)
    ids = random_tokens(2, 5)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1]
        expected = model.lm_head(h) + model.input_to_output(model.model.embed_tokens(ids))
    torch.testing.assert_close(out.logits, expected)


def test_base_model_and_outputs():
    model = make_lm()
    base = RNNLMModel(model.config)
    out = base(input_ids=random_tokens(2, 5), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 5, 16)
    # embeddings, then every one of the 2 layers
    assert [t.shape for t in out.hidden_states] == [(2, 5, 12), (2, 5, 16), (2, 5, 16)]
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    assert model(input_ids=random_tokens(2, 5), use_cache=False).cache is None
    assert isinstance(model(input_ids=random_tokens(2, 5), return_dict=False), tuple)
    assert model(input_ids=random_tokens(2, 5), logits_to_keep=1).logits.shape == (2, 1, 23)


def test_cache_detach_cuts_the_graph_for_truncated_bptt():
    model = make_lm()
    model.train()
    out = model(input_ids=random_tokens(2, 5), labels=random_tokens(2, 5), use_cache=True)
    out.loss.backward()
    cache = out.cache.detach_()
    out2 = model(input_ids=random_tokens(2, 5, seed=1), labels=random_tokens(2, 5, seed=1), cache=cache)
    out2.loss.backward()  # no error: the first chunk's graph is not needed


class TestBadInput:
    model = make_lm()

    def test_token_id_out_of_range(self):
        with pytest.raises(ValueError, match=r"outside \[0, vocab_size=23\).*23\.\.23"):
            self.model(input_ids=torch.tensor([[3, 23]]))
        with pytest.raises(ValueError, match="outside"):
            self.model(input_ids=torch.tensor([[-1, 4]]))

    def test_attention_mask_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"attention_mask.*shape \(2, 5\).*got \(2, 4\)"):
            self.model(input_ids=random_tokens(2, 5), attention_mask=torch.ones(2, 4))

    def test_attention_mask_values(self):
        with pytest.raises(ValueError, match="only 0"):
            self.model(input_ids=random_tokens(1, 3), attention_mask=torch.tensor([[1, 2, 1]]))

    def test_empty_batch(self):
        with pytest.raises(ValueError, match="empty"):
            self.model(input_ids=torch.zeros(0, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="empty"):
            self.model(input_ids=torch.zeros(2, 0, dtype=torch.long))

    def test_all_padding_row_is_an_empty_context(self):
        """Decided: a row of padding only keeps the initial (zero) state and has zero outputs; no error, so a
        left-padded batch can be fed one token at a time."""
        out = self.model(input_ids=random_tokens(2, 3), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
        for tensor in out.cache.get_state():
            assert torch.all(tensor[:, 1] == 0)
        with torch.no_grad():
            expected = self.model.lm_head(torch.zeros(16))
        torch.testing.assert_close(out.logits[1], expected.expand(3, -1))

    def test_float_ids_and_wrong_rank(self):
        with pytest.raises(ValueError, match="integer"):
            self.model(input_ids=torch.ones(2, 3))
        with pytest.raises(ValueError, match=r"shape \[batch, length\]"):
            self.model(input_ids=torch.ones(3, dtype=torch.long))

    def test_labels_of_wrong_shape_or_value(self):
        with pytest.raises(ValueError, match="labels"):
            self.model(input_ids=random_tokens(2, 5), labels=random_tokens(2, 4))
        with pytest.raises(ValueError, match="-100"):
            self.model(input_ids=random_tokens(1, 2), labels=torch.tensor([[4, 99]]))

    def test_cache_for_another_batch(self):
        cache = self.model(input_ids=random_tokens(2, 3)).cache
        with pytest.raises(ValueError, match="holds 2 sequences"):
            self.model(input_ids=random_tokens(3, 1), cache=cache)

    def test_unknown_keyword_is_an_error_not_ignored(self):
        with pytest.raises(TypeError, match="atention_mask"):
            self.model(input_ids=random_tokens(1, 3), atention_mask=torch.ones(1, 3))

    def test_eos_used_in_helpers(self):
        assert self.model.config.eos_token_id == EOS
