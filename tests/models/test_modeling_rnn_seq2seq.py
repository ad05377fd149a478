"""RNNSeq2SeqForConditionalGeneration: incremental decoding, fused vs step-by-step paths, attention, bridges, tying,
loss and input checks, for every cell type x attention type x input feeding."""

import pytest
import torch

from helpers import (
    CELL_TYPES,
    LOGIT_TOL,
    SEQ2SEQ_IDS,
    SEQ2SEQ_VARIANTS,
    assert_sharp,
    make_seq2seq,
    random_tokens,
    right_padded,
    seq2seq_variant_config,
    tiny_seq2seq_config,
)
from rnn_seq2seq_hf import RNNCache, RNNEncoderOutput, RNNSeq2SeqConfig, RNNSeq2SeqModel
from rnn_seq2seq_hf.models.modeling_rnn_seq2seq import shift_tokens_right


def padded_sources():
    return right_padded([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]])


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
def test_one_token_at_a_time_through_cache_equals_full_forward(cell, attention, feeding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding))
    source, source_mask = padded_sources()
    decoder_input_ids = torch.cat([torch.ones(3, 1, dtype=torch.long), random_tokens(3, 5)], dim=1)
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_input_ids)
        assert_sharp(full.logits)
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=source_mask)
        cache, steps = None, []
        for t in range(decoder_input_ids.shape[1]):
            out = model(
                encoder_outputs=encoder_outputs,
                attention_mask=source_mask,
                decoder_input_ids=decoder_input_ids[:, t : t + 1],
                cache=cache,
            )
            cache = out.cache
            steps.append(out.logits)
    assert isinstance(cache, RNNCache) and cache.num_seen_tokens == decoder_input_ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, **LOGIT_TOL)


FUSABLE = [(c, a, f) for c, a, f in SEQ2SEQ_VARIANTS if a != "bahdanau" and not f]


@pytest.mark.parametrize(("cell", "attention", "feeding"), FUSABLE, ids=[f"{c}-{a}" for c, a, _ in FUSABLE])
@pytest.mark.parametrize("decoder_padding", [False, True])
def test_fused_training_path_equals_step_by_step_reference(cell, attention, feeding, decoder_padding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding)).train()
    assert model.model.decoder.can_fuse
    source, source_mask = padded_sources()
    labels = random_tokens(3, 6)
    decoder_mask = None
    if decoder_padding:  # padding in the middle and at the end of the decoder inputs is skipped by both paths
        decoder_mask = torch.ones(3, 6, dtype=torch.long)
        decoder_mask[0, 2] = 0
        decoder_mask[1, 4:] = 0
        labels = labels.masked_fill(decoder_mask == 0, -100)

    results = []
    for fused in (True, False):
        model.zero_grad()
        model.model.decoder.use_fused = fused
        out = model(
            input_ids=source,
            attention_mask=source_mask,
            labels=labels,
            decoder_attention_mask=decoder_mask,
            output_attentions=True,
            use_cache=True,
        )
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.cross_attentions, out.cache.get_state(), grads))

    (logits_a, attn_a, state_a, grads_a), (logits_b, attn_b, state_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, **LOGIT_TOL)
    if attention != "none":
        torch.testing.assert_close(attn_a[0], attn_b[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(state_a, state_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() == {n for n, _ in model.named_parameters()}
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["bahdanau", "dot", "general", "concat"])
def test_cross_attention_is_a_distribution_over_real_source_tokens(attention):
    model = make_seq2seq(attention_type=attention)
    source, source_mask = padded_sources()
    out = model(input_ids=source, attention_mask=source_mask, labels=random_tokens(3, 4), output_attentions=True)
    (weights,) = out.cross_attentions
    assert weights.shape == (3, 1, 4, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 1, 4))
    assert torch.all(weights[source_mask[:, None, None, :].expand_as(weights) == 0] == 0)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_source_gives_the_same_translation_scores_as_alone(cell, bidirectional):
    model = make_seq2seq(cell_type=cell, bidirectional_encoder=bidirectional)
    sources = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    source, source_mask = right_padded(sources)
    decoder_input_ids = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 9]])
    with torch.no_grad():
        batch = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_input_ids).logits
        for row, seq in enumerate(sources):
            alone = model(input_ids=torch.tensor([seq]), decoder_input_ids=decoder_input_ids[row : row + 1]).logits
            torch.testing.assert_close(batch[row], alone[0], **LOGIT_TOL)


class TestBridge:
    def encoder_outputs(self, model, source):
        return model.get_encoder()(input_ids=source)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_last_copies_each_encoder_layer_with_directions_concatenated(self, cell):
        model = make_seq2seq(cell_type=cell, bridge="last", bidirectional_encoder=True)
        source = random_tokens(2, 5)
        enc = self.encoder_outputs(model, source)
        state = model.model.decoder.init_cache(enc).get_state()
        _, final = model.model.encoder.rnn.rnn(model.model.encoder.embed_tokens(source))
        h_n, *rest = final if cell == "lstm" else (final,)
        # h_n: [layers * 2, B, H/2]; decoder layer l starts from [forward_l; backward_l]
        for layer in range(2):
            torch.testing.assert_close(state[0][layer], torch.cat([h_n[2 * layer], h_n[2 * layer + 1]], dim=-1))
        if cell == "lstm":
            c_n = rest[0]
            torch.testing.assert_close(state[1][1], torch.cat([c_n[2], c_n[3]], dim=-1))

    def test_linear_maps_the_top_encoder_layer_to_every_decoder_layer(self):
        model = make_seq2seq(bridge="linear", encoder_layers=1, decoder_layers=3)
        enc = self.encoder_outputs(model, random_tokens(2, 5))
        h, c = model.model.decoder.init_cache(enc).get_state()
        assert h.shape == c.shape == (3, 2, 16)
        bridge = model.model.decoder.bridge
        expected = torch.tanh(bridge.hidden_projection(enc.final_hidden_state[:, -1])).view(2, 3, 16)
        torch.testing.assert_close(h, expected.transpose(0, 1))

    def test_zero_starts_from_zeros(self):
        model = make_seq2seq(bridge="zero", cell_type="gru")
        (h,) = model.model.decoder.init_cache(self.encoder_outputs(model, random_tokens(2, 5))).get_state()
        assert torch.all(h == 0) and h.shape == (2, 2, 16)

    def test_plain_encoder_decoder_depends_on_the_source_through_the_bridge(self):
        model = make_seq2seq(attention_type="none", bridge="last")
        dec = torch.tensor([[1, 5, 6]])
        a = model(input_ids=random_tokens(1, 5, seed=1), decoder_input_ids=dec).logits
        b = model(input_ids=random_tokens(1, 5, seed=2), decoder_input_ids=dec).logits
        assert not torch.allclose(a, b)


class TestEmbeddings:
    def test_tied_output_and_shared_embeddings(self):
        model = make_seq2seq(share_embeddings=True, tie_word_embeddings=True)
        enc, dec = model.model.encoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight
        assert enc is dec is model.lm_head.linear.weight
        assert model.lm_head.projection is not None  # hidden 16 != embedding 12

    def test_shared_without_tied_output(self):
        model = make_seq2seq(share_embeddings=True, tie_word_embeddings=False)
        assert model.model.encoder.embed_tokens.weight is model.model.decoder.embed_tokens.weight
        assert model.lm_head.linear.weight is not model.model.decoder.embed_tokens.weight

    def test_tied_output_without_sharing(self):
        model = make_seq2seq(share_embeddings=False, tie_word_embeddings=True, embedding_size=16)
        assert model.lm_head.linear.weight is model.model.decoder.embed_tokens.weight
        assert model.model.encoder.embed_tokens.weight is not model.model.decoder.embed_tokens.weight
        assert model.lm_head.projection is None

    def test_nothing_shared_by_default(self):
        model = make_seq2seq()
        weights = [
            model.model.encoder.embed_tokens.weight,
            model.model.decoder.embed_tokens.weight,
            model.lm_head.linear.weight,
        ]
        assert len({id(w) for w in weights}) == 3


def test_loss_is_unshifted_cross_entropy_and_decoder_inputs_are_shifted_labels():
    model = make_seq2seq()
    source = random_tokens(2, 5)
    labels = torch.tensor([[4, 5, 6, 2], [7, 2, -100, -100]])
    out = model(input_ids=source, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 23), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert shift_tokens_right(labels, 0, 1).tolist() == [[1, 4, 5, 6], [1, 7, 2, 0]]
    explicit = model(input_ids=source, decoder_input_ids=shift_tokens_right(labels, 0, 1), labels=labels)
    torch.testing.assert_close(explicit.loss, out.loss)
    summed = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, 23), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(model(input_ids=source, labels=labels, num_items_in_batch=11).loss, summed / 11)


def test_outputs_of_the_base_model_and_head():
    model = make_seq2seq()
    source, source_mask = padded_sources()
    out = model(input_ids=source, attention_mask=source_mask, labels=random_tokens(3, 4), output_hidden_states=True)
    assert out.encoder_last_hidden_state.shape == (3, 7, 16)
    assert torch.all(out.encoder_last_hidden_state[source_mask == 0] == 0)
    # embeddings, then every one of the 2 layers
    assert [t.shape for t in out.encoder_hidden_states] == [(3, 7, 12), (3, 7, 16), (3, 7, 16)]
    torch.testing.assert_close(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
    assert [t.shape for t in out.decoder_hidden_states] == [(3, 4, 12), (3, 4, 16), (3, 4, 16)]
    assert out.cross_attentions is None
    base = RNNSeq2SeqModel(model.config)
    assert base(input_ids=source, decoder_input_ids=random_tokens(3, 2)).last_hidden_state.shape == (3, 2, 16)
    enc = model.get_encoder()(input_ids=source, attention_mask=source_mask)
    assert isinstance(enc, RNNEncoderOutput) and enc.final_hidden_state.shape == (3, 2, 16)
    assert enc.final_cell_state.shape == (3, 2, 16)
    assert model(input_ids=source, decoder_input_ids=random_tokens(3, 2), use_cache=False).cache is None


class TestBadInput:
    model = make_seq2seq()

    def test_token_ids_out_of_range(self):
        with pytest.raises(ValueError, match=r"`input_ids` holds token ids outside \[0, vocab_size=23\)"):
            self.model(input_ids=torch.tensor([[5, 40]]), decoder_input_ids=torch.tensor([[1]]))
        with pytest.raises(ValueError, match="`decoder_input_ids` holds token ids outside"):
            self.model(input_ids=torch.tensor([[5, 6]]), decoder_input_ids=torch.tensor([[1, 23]]))
        with pytest.raises(ValueError, match="labels"):
            self.model(input_ids=torch.tensor([[5, 6]]), labels=torch.tensor([[1, 23]]))

    def test_source_mask_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(2, 5\)"):
            self.model(input_ids=random_tokens(2, 5), attention_mask=torch.ones(2, 6), labels=random_tokens(2, 3))
        with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(2, 5\)"):
            self.model(input_ids=random_tokens(2, 5), attention_mask=torch.ones(5, 2), labels=random_tokens(2, 3))

    def test_decoder_mask_of_wrong_shape(self):
        with pytest.raises(ValueError, match="decoder_attention_mask"):
            self.model(
                input_ids=random_tokens(2, 5), labels=random_tokens(2, 3), decoder_attention_mask=torch.ones(2, 2)
            )

    def test_empty_batch(self):
        with pytest.raises(ValueError, match="empty"):
            self.model(input_ids=torch.zeros(0, 4, dtype=torch.long), labels=torch.zeros(0, 3, dtype=torch.long))

    def test_all_padding_source_row_is_refused(self):
        """Decided: a source of padding only has nothing to attend to, so it is a ValueError naming the row."""
        with pytest.raises(ValueError, match=r"rows \[1\] contain only padding"):
            self.model(
                input_ids=random_tokens(2, 3),
                attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]),
                labels=random_tokens(2, 2),
            )

    def test_missing_decoder_inputs(self):
        with pytest.raises(ValueError, match="decoder_input_ids"):
            self.model(input_ids=random_tokens(2, 3))

    def test_batch_mismatch_between_source_and_target(self):
        with pytest.raises(ValueError, match="3 rows but the encoder outputs have 2"):
            self.model(input_ids=random_tokens(2, 3), labels=random_tokens(3, 2))

    def test_cache_of_another_batch(self):
        cache = self.model(input_ids=random_tokens(2, 3), decoder_input_ids=random_tokens(2, 1)).cache
        with pytest.raises(ValueError, match="holds 2 sequences"):
            self.model(input_ids=random_tokens(3, 3), decoder_input_ids=random_tokens(3, 1), cache=cache)

    def test_unknown_keyword(self):
        with pytest.raises(TypeError, match="decoder_inputs_ids"):
            self.model(input_ids=random_tokens(1, 3), decoder_inputs_ids=random_tokens(1, 2))


BAD_CONFIGS = [
    (dict(cell_type="gpt"), r"`cell_type` must be one of \['rnn_tanh', 'rnn_relu', 'lstm', 'gru'\], got 'gpt'"),
    (dict(attention_type="luong"), r"`attention_type` must be one of .*got 'luong'"),
    (dict(bridge="mean"), r"`bridge` must be one of \['zero', 'last', 'linear'\], got 'mean'"),
    (dict(hidden_size=0), r"`hidden_size` must be an integer >= 1, got 0"),
    (dict(vocab_size=-3), r"`vocab_size` must be an integer >= 1, got -3"),
    (dict(encoder_layers=1.5), r"`encoder_layers` must be an integer >= 1, got 1.5"),
    (dict(embedding_dropout=1.0), r"`embedding_dropout` must be a number in \[0, 1\), got 1.0"),
    (dict(input_feeding="yes"), r"`input_feeding` must be True or False, got 'yes'"),
    (dict(attention_type="none", input_feeding=True), r"`input_feeding=True` needs attention"),
    (dict(attention_type="none", bridge="zero"), r"never sees the source"),
    (dict(hidden_size=15, bidirectional_encoder=True), r"`hidden_size` must be even"),
    (dict(bridge="last", encoder_layers=2, decoder_layers=3), r"`encoder_layers` \(2\) must equal `decoder_layers`"),
    (dict(eos_token_id=10000, vocab_size=100), r"`eos_token_id` must be a token id in \[0, vocab_size=100\), got 10"),
    (dict(decoder_start_token_id=-1), r"`decoder_start_token_id` must be a token id"),
    (dict(initializer_range=0), r"`initializer_range` must be a finite number > 0"),
    (dict(initializer_range=float("nan")), r"`initializer_range` must be a finite number > 0, got nan"),
    (dict(initializer_range=float("inf")), r"`initializer_range` must be a finite number > 0, got inf"),
    (dict(hiden_size=64), r"unknown key `hiden_size`; did you mean `hidden_size`\?"),
    (dict(num_beams=4), r"`num_beams` is a generation setting"),
]


@pytest.mark.parametrize(("values", "message"), BAD_CONFIGS)
def test_bad_config_values_raise_value_error_naming_field_and_value(values, message):
    with pytest.raises(ValueError, match=message):
        RNNSeq2SeqConfig(**values)


def test_config_changed_after_construction_is_checked_by_the_model():
    config = tiny_seq2seq_config()
    config.attention_type = "dott"
    with pytest.raises(ValueError, match="got 'dott'"):
        RNNSeq2SeqModel(config)
