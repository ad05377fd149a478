"""The transformers model contract, checked the way transformers checks its own models (a small `ModelTester` per
family driving one battery of checks), on both families and several configurations each: save/load, tied weights
and loading info, resizing the vocabulary, hidden states per layer, inputs_embeds, generate() dict outputs,
continuing generation from a cache, gradient checkpointing, configuration keys.

Every check compares against an independent reference (an uninterrupted call, the unresized model, the fused
stack, a run without checkpointing, a saved-and-reloaded copy), never just that something runs.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from helpers import CELL_TYPES, LOGIT_TOL, make_lm, make_seq2seq, random_tokens
from rnn_seq2seq_hf import RNNCache, RNNLMConfig, RNNLMModel, RNNSeq2SeqConfig, RNNSeq2SeqModel


@dataclasses.dataclass
class LMTester:
    """Tiny RNN language models and their inputs."""

    overrides: dict
    batch_size: int = 3
    length: int = 6
    family: str = "lm"

    def model(self, seed: int = 0, **extra):
        return make_lm(seed, **{**self.overrides, **extra})

    def inputs(self, seed: int = 0) -> dict:
        ids = random_tokens(self.batch_size, self.length, seed=seed)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # a left-padded row
        return {"input_ids": ids, "attention_mask": mask}

    def expected_hidden_layers(self, config) -> dict[str, int]:
        return {"hidden_states": config.num_hidden_layers + 1}


@dataclasses.dataclass
class Seq2SeqTester(LMTester):
    """Tiny attention Seq2Seq models and their inputs."""

    family: str = "seq2seq"

    def model(self, seed: int = 0, **extra):
        return make_seq2seq(seed, **{**self.overrides, **extra})

    def inputs(self, seed: int = 0) -> dict:
        ids = random_tokens(self.batch_size, self.length, seed=seed)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # a right-padded source
        decoder_input_ids = torch.cat([torch.ones(self.batch_size, 1, dtype=torch.long), random_tokens(3, 4)], 1)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_input_ids}

    def expected_hidden_layers(self, config) -> dict[str, int]:
        return {
            "encoder_hidden_states": config.encoder_layers + 1,
            "decoder_hidden_states": config.decoder_layers + 1,
        }


TESTERS = {
    "lm-lstm-tied": LMTester(dict(cell_type="lstm", tie_word_embeddings=True)),
    "lm-gru-3layers-input_to_output": LMTester(dict(cell_type="gru", num_hidden_layers=3, input_to_output=True)),
    "lm-rnn_tanh-1layer": LMTester(dict(cell_type="rnn_tanh", num_hidden_layers=1)),
    "s2s-lstm-general": Seq2SeqTester(dict(cell_type="lstm", attention_type="general")),
    "s2s-gru-bahdanau": Seq2SeqTester(dict(cell_type="gru", attention_type="bahdanau")),
    "s2s-lstm-dot-feeding-shared-tied": Seq2SeqTester(
        dict(attention_type="dot", input_feeding=True, share_embeddings=True, tie_word_embeddings=True)
    ),
    "s2s-rnn_relu-concat-3x2-linear": Seq2SeqTester(
        dict(cell_type="rnn_relu", attention_type="concat", encoder_layers=3, bridge="linear")
    ),
    "s2s-lstm-none-unidirectional-tied": Seq2SeqTester(
        dict(attention_type="none", bidirectional_encoder=False, tie_word_embeddings=True)
    ),
}
CASES = pytest.mark.parametrize("tester", list(TESTERS.values()), ids=list(TESTERS))


def auto_class(tester):
    return AutoModelForCausalLM if tester.family == "lm" else AutoModelForSeq2SeqLM


# --- save, load, tied weights -------------------------------------------------------------------------------------


@CASES
def test_save_and_reload_gives_identical_outputs_and_keeps_ties(tester, tmp_path):
    model = tester.model()
    inputs = tester.inputs()
    model.save_pretrained(tmp_path)
    loaded, info = auto_class(tester).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    for tied, source in model.get_expanded_tied_weights_keys().items():
        assert loaded.get_parameter(tied) is loaded.get_parameter(source), tied


# --- resize_token_embeddings ----------------------------------------------------------------------------------------


def vocabulary_sized(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.shape[0] == model.config.vocab_size}


@CASES
@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_resizes_every_vocabulary_sized_layer(tester, tie, tmp_path):
    model = tester.model(tie_word_embeddings=tie)
    inputs = tester.inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    old_size = model.config.vocab_size
    names = set(vocabulary_sized(model))
    model.resize_token_embeddings(old_size + 5, mean_resizing=False)

    assert model.config.vocab_size == old_size + 5
    for name in names:
        assert model.get_parameter(name).shape[0] == old_size + 5, name
    for tied, source in model.get_expanded_tied_weights_keys().items():
        assert model.get_parameter(tied) is model.get_parameter(source), tied
    with torch.no_grad():
        after = model(**inputs).logits
        # the old tokens keep their logits; the new tokens exist (no IndexError) at every input
        torch.testing.assert_close(after[..., :old_size], before, **LOGIT_TOL)
        new_ids = {
            key: torch.full_like(value, old_size + 4) if "input_ids" in key else value for key, value in inputs.items()
        }
        assert model(**new_ids).logits.shape[-1] == old_size + 5
    model.save_pretrained(tmp_path)
    reloaded = auto_class(tester).from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, after)

    model.resize_token_embeddings(old_size - 3)
    assert all(model.get_parameter(name).shape[0] == old_size - 3 for name in names)


# --- hidden states ---------------------------------------------------------------------------------------------------


@CASES
def test_hidden_states_give_the_embeddings_and_every_layer(tester):
    model = tester.model()
    inputs = tester.inputs()
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)  # layer by layer == fused
    config = model.config
    for field, count in tester.expected_hidden_layers(config).items():
        states = getattr(out, field)
        assert len(states) == count, field
        assert states[0].shape[-1] == config.embedding_size
        assert all(
            state.shape[-1] == config.hidden_size and state.shape[:2] == states[0].shape[:2] for state in states[1:]
        )
    if tester.family == "lm":
        base = RNNLMModel(config)
        base.load_state_dict(model.model.state_dict())
        with torch.no_grad():
            bare = base(**inputs, output_hidden_states=True)
        torch.testing.assert_close(bare.hidden_states[-1], bare.last_hidden_state)
        assert torch.all(bare.hidden_states[-1][inputs["attention_mask"] == 0] == 0)  # padding is skipped
    else:
        torch.testing.assert_close(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
        assert torch.all(out.encoder_hidden_states[1][inputs["attention_mask"] == 0] == 0)


# --- inputs_embeds ---------------------------------------------------------------------------------------------------


@CASES
def test_inputs_embeds_give_the_outputs_of_the_ids(tester):
    model = tester.model()
    inputs = tester.inputs()
    embedded = dict(inputs)
    embedded["inputs_embeds"] = model.get_input_embeddings()(embedded.pop("input_ids"))
    if tester.family == "seq2seq":
        embedded["decoder_inputs_embeds"] = model.get_decoder().embed_tokens(embedded.pop("decoder_input_ids"))
    with torch.no_grad():
        torch.testing.assert_close(model(**embedded).logits, model(**inputs).logits)
    if tester.family == "seq2seq":
        with pytest.raises(ValueError, match="exactly one of `decoder_input_ids` and `decoder_inputs_embeds`"):
            model(**embedded, decoder_input_ids=inputs["decoder_input_ids"])


# --- generate() outputs ---------------------------------------------------------------------------------------------


def generate_inputs(tester, inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key != "decoder_input_ids"}


@CASES
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_dict_outputs_have_scores_hidden_states_and_attentions_per_step(tester, num_beams):
    model = tester.model()
    inputs = generate_inputs(tester, tester.inputs())
    steps = 4
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        num_beams=num_beams,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    rows = tester.batch_size * num_beams
    vocab = model.config.vocab_size
    assert len(out.scores) == steps and all(score.shape == (rows, vocab) for score in out.scores)
    assert len(out.logits) == steps
    layers = tester.expected_hidden_layers(model.config)
    if tester.family == "lm":
        assert len(out.hidden_states) == steps
        assert all(len(step) == layers["hidden_states"] for step in out.hidden_states)
        assert out.hidden_states[0][0].shape[:2] == (rows, tester.length)  # the prompt, then one token per step
        assert out.hidden_states[1][-1].shape == (rows, 1, model.config.hidden_size)
    else:
        assert len(out.encoder_hidden_states) == layers["encoder_hidden_states"]
        assert len(out.decoder_hidden_states) == steps
        assert all(len(step) == layers["decoder_hidden_states"] for step in out.decoder_hidden_states)
        if model.config.attention_type != "none":
            assert len(out.cross_attentions) == steps
            assert out.cross_attentions[0][0].shape == (rows, 1, 1, tester.length)
    if num_beams > 1:
        assert out.sequences_scores.shape == (tester.batch_size,)
        assert out.beam_indices.shape[0] == tester.batch_size


# --- continuing generation from a cache ------------------------------------------------------------------------------

NO_EOS = dict(eos_token_id=None, pad_token_id=0, do_sample=False, return_dict_in_generate=True, output_scores=True)


def assert_caches_equal(a: RNNCache, b: RNNCache) -> None:
    assert a.num_seen_tokens == b.num_seen_tokens
    for x, y in zip(a.get_state(), b.get_state(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert sorted(a.extras) == sorted(b.extras)
    for name in a.extras:
        torch.testing.assert_close(a.extras[name], b.extras[name], atol=1e-5, rtol=1e-5)


def continued_greedy(model, tester, inputs, first: int, second: int):
    """generate(first) and then generate(second more) from its cache, as a transformers user would."""
    part = model.generate(**inputs, max_new_tokens=first, **NO_EOS)
    continued = dict(inputs)
    if tester.family == "lm":
        continued["input_ids"] = part.sequences
        new_columns = part.sequences.shape[1] - inputs["attention_mask"].shape[1]
        continued["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, new_columns), value=1)
    else:
        continued["decoder_input_ids"] = part.sequences
    rest = model.generate(**continued, cache=part.cache, max_new_tokens=second, **NO_EOS)
    return part, rest


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_continuing_generate_from_its_cache_equals_one_uninterrupted_call(cell, family):
    tester = LMTester(dict(cell_type=cell)) if family == "lm" else Seq2SeqTester(dict(cell_type=cell))
    for tester_case in [tester] + (
        [Seq2SeqTester(dict(cell_type=cell, attention_type="bahdanau", input_feeding=True))]
        if family == "seq2seq"
        else []
    ):
        model = tester_case.model()
        inputs = generate_inputs(tester_case, tester_case.inputs())
        full = model.generate(**inputs, max_new_tokens=5, **NO_EOS)
        part, rest = continued_greedy(model, tester_case, inputs, 3, 2)
        assert torch.equal(rest.sequences[:, : part.sequences.shape[1]], part.sequences)
        assert rest.sequences.tolist() == full.sequences.tolist()
        for a, b in zip(part.scores + rest.scores, full.scores, strict=True):
            torch.testing.assert_close(a, b, **LOGIT_TOL)
        assert_caches_equal(rest.cache, full.cache)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_beam_search_from_a_cache_that_consumed_part_of_the_input_equals_beam_search_without_it(family, cell):
    """The cache is expanded to one copy per beam, and only the positions it has not seen are fed."""
    tester = LMTester(dict(cell_type=cell)) if family == "lm" else Seq2SeqTester(dict(cell_type=cell))
    model = tester.model(seed=2)
    inputs = generate_inputs(tester, tester.inputs())
    settings = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, **NO_EOS)
    reference = model.generate(**inputs, **settings)
    with torch.no_grad():
        if family == "lm":
            prefix = {"input_ids": inputs["input_ids"][:, :4], "attention_mask": inputs["attention_mask"][:, :4]}
            cache = model(**prefix, use_cache=True).cache
            continued = model.generate(**inputs, cache=cache, **settings)
        else:  # a forced decoder prefix, of which the cache has consumed all but the last token
            prefix = torch.cat([torch.ones(tester.batch_size, 1, dtype=torch.long), random_tokens(3, 2)], dim=1)
            reference = model.generate(**inputs, decoder_input_ids=prefix, **settings)
            cache = model(**inputs, decoder_input_ids=prefix[:, :2], use_cache=True).cache
            continued = model.generate(**inputs, decoder_input_ids=prefix, cache=cache, **settings)
    assert continued.sequences.tolist() == reference.sequences.tolist()
    torch.testing.assert_close(continued.sequences_scores, reference.sequences_scores, **LOGIT_TOL)


def test_lm_continues_from_inputs_embeds_and_its_cache():
    model = make_lm(cell_type="gru")
    ids = random_tokens(2, 5)
    embeds = model.get_input_embeddings()(ids).detach()
    settings = dict(eos_token_id=None, pad_token_id=0, do_sample=False, return_dict_in_generate=True)
    full = model.generate(inputs_embeds=embeds, max_new_tokens=4, **settings)
    part = model.generate(inputs_embeds=embeds, max_new_tokens=3, **settings)
    continued_embeds = torch.cat([embeds, model.get_input_embeddings()(part.sequences).detach()], dim=1)
    rest = model.generate(inputs_embeds=continued_embeds, cache=part.cache, max_new_tokens=1, **settings)
    assert torch.cat([part.sequences, rest.sequences], dim=1).tolist() == full.sequences.tolist()
    assert_caches_equal(rest.cache, full.cache)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_a_cache_that_has_seen_more_than_the_input_is_refused(family):
    tester = LMTester({}) if family == "lm" else Seq2SeqTester({})
    model = tester.model()
    inputs = generate_inputs(tester, tester.inputs())
    part = model.generate(**inputs, max_new_tokens=3, **NO_EOS)
    key = "input_ids" if family == "lm" else "decoder_input_ids"
    short = dict(inputs)
    short[key] = part.sequences[:, :2]
    if family == "lm":
        short["attention_mask"] = inputs["attention_mask"][:, :2]
    with pytest.raises(ValueError, match="the `cache` has already consumed"):
        model.generate(**short, cache=part.cache, max_new_tokens=1, **NO_EOS)


# --- caches that do not belong to the call --------------------------------------------------------------------------


def test_a_decoder_cache_of_another_source_of_the_same_length_is_refused():
    model = make_seq2seq()
    start = torch.ones(2, 1, dtype=torch.long)
    cache = model(input_ids=random_tokens(2, 5, seed=1), decoder_input_ids=start).cache
    with pytest.raises(ValueError, match="`cache` was built for another source"):
        model(input_ids=random_tokens(2, 5, seed=2), decoder_input_ids=start, cache=cache)
    # the same source, encoded again (a continuation), is accepted
    model(input_ids=random_tokens(2, 5, seed=1), decoder_input_ids=start, cache=cache)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
@pytest.mark.parametrize(
    ("other", "message"),
    [
        (dict(cell_type="gru"), "holds the state of an LSTM"),
        (dict(num_layers=3), "with 2 layers"),
        (dict(hidden_size=20), "states of size 16"),
    ],
)
def test_a_cache_of_another_cell_type_or_size_is_refused(family, other, message):
    if family == "lm":
        other = {("num_hidden_layers" if k == "num_layers" else k): v for k, v in other.items()}
        model, other_model = make_lm(), make_lm(**other)
        cache = model(input_ids=random_tokens(2, 3)).cache
        with pytest.raises(ValueError, match=message):
            other_model(input_ids=random_tokens(2, 1), cache=cache)
    else:
        other = {("decoder_layers" if k == "num_layers" else k): v for k, v in other.items()}
        if "decoder_layers" in other:
            other["encoder_layers"] = other["decoder_layers"]
        model, other_model = make_seq2seq(), make_seq2seq(**other)
        source = random_tokens(2, 3)
        cache = model(input_ids=source, decoder_input_ids=random_tokens(2, 1)).cache
        with pytest.raises(ValueError, match=message):
            other_model(input_ids=source, decoder_input_ids=random_tokens(2, 1), cache=cache)


# --- gradient checkpointing ------------------------------------------------------------------------------------------


@CASES
def test_gradient_checkpointing_gives_the_gradients_of_plain_training(tester):
    model = tester.model(embedding_dropout=0.2, output_dropout=0.2).train()  # dropout outside the stacks
    assert model.supports_gradient_checkpointing
    inputs = tester.inputs()
    long = tester.family == "lm"
    if long:
        inputs = {"input_ids": random_tokens(3, 30), "attention_mask": torch.ones(3, 30, dtype=torch.long)}
        inputs["attention_mask"][2, :7] = 0
    labels = inputs["input_ids"] if long else random_tokens(3, 12)

    def gradients():
        model.zero_grad()
        torch.manual_seed(5)
        model(**{k: v for k, v in inputs.items() if k != "decoder_input_ids"}, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)
    model.activation_checkpointing_disable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 deprecates the old name
        model.gradient_checkpointing_enable()
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))


# --- configuration ---------------------------------------------------------------------------------------------------


def test_seq2seq_num_hidden_layers_is_the_decoder_depth():
    config = RNNSeq2SeqConfig(encoder_layers=3, decoder_layers=2, bridge="linear")
    assert config.num_hidden_layers == 2
    config.num_hidden_layers = 4
    assert config.decoder_layers == 4
    assert "num_hidden_layers" not in config.to_dict()
    assert RNNSeq2SeqConfig(encoder_layers=3, decoder_layers=3).get_text_config(decoder=True).num_hidden_layers == 3


@pytest.mark.parametrize("config_class", [RNNLMConfig, RNNSeq2SeqConfig])
def test_unknown_config_keys_are_refused_in_code_and_tolerated_in_config_json(config_class, tmp_path):
    with pytest.raises(ValueError, match=r"unknown key `hiden_size`; did you mean `hidden_size`\?"):
        config_class(hiden_size=64)
    with pytest.raises(ValueError, match="`temperature` is a generation setting"):
        config_class(temperature=0.5)
    config = config_class(vocab_size=50, hidden_size=32)
    config.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(saved.replace('"hidden_size": 32', '"hidden_size": 32, "future_key": 1'))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.hidden_size == 32 and loaded.future_key == 1
    assert config_class.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_get_encoder_accepts_the_modality_argument():
    model = make_seq2seq()
    assert model.get_encoder(modality="text") is model.get_encoder()
    assert RNNSeq2SeqModel(model.config).get_encoder(modality=None) is not None
