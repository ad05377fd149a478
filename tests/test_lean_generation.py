"""The lean decoding loops behind generate() (models/generation_rnn.py) against transformers' own loops on the same
model (`lean_generation = False`): identical tokens, beam indices and returned caches, scores within float tolerance,
for greedy search, sampling and beam search under the generation options users pass; and the argument checks."""

import itertools

import pytest
import torch

from helpers import (
    CELL_TYPES,
    LOGIT_TOL,
    SEQ2SEQ_IDS,
    SEQ2SEQ_VARIANTS,
    HostReads,
    left_padded,
    make_lm,
    make_seq2seq,
    right_padded,
    seq2seq_variant_config,
)

SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [14, 15, 16]]


def both_loops(model, **kwargs):
    """generate() with the lean loops and with transformers' loops, same seed for sampling."""
    results = []
    for lean in (True, False):
        model.lean_generation = lean
        torch.manual_seed(123)
        results.append(model.generate(**kwargs))
    model.lean_generation = True
    return results


def assert_same_generation(lean, reference):
    if isinstance(reference, torch.Tensor):
        assert lean.tolist() == reference.tolist()
        return
    assert lean.sequences.tolist() == reference.sequences.tolist()
    for field in ("scores", "logits"):
        ours, theirs = getattr(lean, field), getattr(reference, field)
        assert (ours is None) == (theirs is None), field
        if theirs is not None:
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, **LOGIT_TOL)
    if getattr(reference, "beam_indices", None) is not None:
        assert lean.beam_indices.tolist() == reference.beam_indices.tolist()
    if getattr(reference, "sequences_scores", None) is not None:
        torch.testing.assert_close(lean.sequences_scores, reference.sequences_scores, **LOGIT_TOL)
    if reference.cache is not None:
        assert lean.cache.num_seen_tokens == reference.cache.num_seen_tokens
        for a, b in zip(lean.cache.get_state(), reference.cache.get_state(), strict=True):
            torch.testing.assert_close(a, b, **LOGIT_TOL)


def seq2seq_inputs():
    source, mask = right_padded(SOURCES)
    return {"input_ids": source, "attention_mask": mask}


def lm_inputs():
    prompt, mask = left_padded(PROMPTS)
    return {"input_ids": prompt, "attention_mask": mask}


OPTIONS = [
    dict(),  # the model's defaults: greedy, stops at EOS
    dict(num_beams=4),
    dict(num_beams=4, num_return_sequences=3, length_penalty=0.6),
    dict(num_beams=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3),
    dict(num_beams=3, min_new_tokens=5),
    dict(num_beams=2, eos_token_id=None),
    dict(min_new_tokens=4, no_repeat_ngram_size=2),
    dict(do_sample=True, top_k=5, temperature=0.7),
    dict(do_sample=True, top_p=0.8),
]
OUTPUTS = [dict(), dict(return_dict_in_generate=True, output_scores=True, output_logits=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("outputs", OUTPUTS, ids=["tensor", "dict"])
@pytest.mark.parametrize("family", ["seq2seq", "lm"])
def test_lean_loops_equal_transformers_loops(family, options, outputs):
    model = make_seq2seq(seed=3) if family == "seq2seq" else make_lm(seed=3)
    inputs = seq2seq_inputs() if family == "seq2seq" else lm_inputs()
    lean, reference = both_loops(model, **inputs, max_new_tokens=9, **options, **outputs)
    assert_same_generation(lean, reference)


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
def test_lean_loops_equal_transformers_loops_for_every_seq2seq_variant(cell, attention, feeding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding))
    for options in (dict(), dict(num_beams=3, num_return_sequences=2)):
        lean, reference = both_loops(
            model, **seq2seq_inputs(), max_new_tokens=7, return_dict_in_generate=True, output_scores=True, **options
        )
        assert_same_generation(lean, reference)


@pytest.mark.parametrize(
    ("cell", "input_to_output", "tie"), list(itertools.product(CELL_TYPES, [False, True], [False, True]))
)
def test_lean_loops_equal_transformers_loops_for_every_lm_variant(cell, input_to_output, tie):
    model = make_lm(cell_type=cell, input_to_output=input_to_output, tie_word_embeddings=tie)
    for options in (dict(), dict(num_beams=3)):
        lean, reference = both_loops(
            model, **lm_inputs(), max_new_tokens=7, return_dict_in_generate=True, output_scores=True, **options
        )
        assert_same_generation(lean, reference)


def test_a_step_of_the_lean_loop_is_the_forward_of_one_token():
    """The one-token step gives the logits and state of the model's forward, source padding included."""
    model = make_seq2seq(attention_type="bahdanau", input_feeding=True)
    inputs = seq2seq_inputs()
    start = torch.ones(3, 1, dtype=torch.long)
    with torch.no_grad():
        first = model(**inputs, decoder_input_ids=start)
        expected = model(**inputs, decoder_input_ids=torch.tensor([[1, 7], [1, 8], [1, 9]]))
        kwargs = {
            "encoder_outputs": model.get_encoder()(**inputs),
            "attention_mask": inputs["attention_mask"],
            "cache": first.cache,
        }
        step = model._decoding_step(model._decoding_function(kwargs), first.cache, reorders=False)
        logits = step(torch.tensor([[7], [8], [9]]))[:, 0]
    torch.testing.assert_close(logits, expected.logits[:, -1], **LOGIT_TOL)
    for a, b in zip(first.cache.get_state(), expected.cache.get_state()):
        torch.testing.assert_close(a, b, **LOGIT_TOL)
    assert first.cache.num_seen_tokens == 2


def test_transformers_loops_still_run_what_the_lean_loops_do_not_cover():
    """output_hidden_states (and other settings) fall back to transformers' loops: the same tokens either way."""
    model = make_seq2seq(seed=4)
    plain = model.generate(**seq2seq_inputs(), max_new_tokens=6, num_beams=3)
    with_states = model.generate(
        **seq2seq_inputs(), max_new_tokens=6, num_beams=3, return_dict_in_generate=True, output_hidden_states=True
    )
    assert with_states.decoder_hidden_states is not None
    assert plain.tolist() == with_states.sequences.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=0), r"`num_beams` must be an integer >= 1, got 0"),
        (dict(num_return_sequences=0), r"`num_return_sequences` must be an integer >= 1, got 0"),
        (dict(do_sample=True, top_p=0.0), r"`top_p` must be a number in \(0, 1\], got 0.0"),
        (dict(do_sample=True, top_p=1.5), r"`top_p` must be a number in \(0, 1\], got 1.5"),
        (dict(pad_token_id=500), r"`pad_token_id` must be a token id in \[0, vocab_size=23\), got 500"),
        (dict(eos_token_id=[2, 99]), r"`eos_token_id` must be a token id in \[0, vocab_size=23\)"),
        (dict(eos_token_id=-3), r"`eos_token_id` must be a token id"),
    ],
)
def test_bad_generation_values_are_refused_before_any_work(kwargs, message):
    model = make_seq2seq()
    with pytest.raises(ValueError, match=message):
        model.generate(**seq2seq_inputs(), max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_lean_beam_search_equals_transformers_on_long_searches_with_many_finished_hypotheses(
    seed, early_stopping, length_penalty
):
    """Sentences finish at different steps, pools fill and the early-stopping heuristic ends searches."""
    model = make_seq2seq(seed=seed, attention_type="dot")
    generator = torch.Generator().manual_seed(seed)
    sources = [torch.randint(3, 23, (int(n),), generator=generator).tolist() for n in torch.randint(2, 9, (6,))]
    source, mask = right_padded(sources)
    lean, reference = both_loops(
        model,
        input_ids=source,
        attention_mask=mask,
        num_beams=5,
        num_return_sequences=5,
        max_new_tokens=15,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert_same_generation(lean, reference)


@pytest.mark.parametrize("family", ["seq2seq", "lm"])
@pytest.mark.parametrize("options", [dict(), dict(num_beams=4, num_return_sequences=2)], ids=["greedy", "beam"])
def test_the_static_buffers_of_the_cuda_graph_step_give_the_eager_results(monkeypatch, family, options):
    """The graph driver's buffer logic (reorder inside the step, state written in place, final state) run eagerly
    on the CPU (capture=False): the same tokens, scores and final cache as the plain driver. On a GPU the captured
    graph itself is compared in tests/test_cuda.py."""
    from rnn_seq2seq_hf.models.generation_rnn import GraphedDecodingStep

    model = make_seq2seq(seed=5, input_feeding=True) if family == "seq2seq" else make_lm(seed=5)
    inputs = seq2seq_inputs() if family == "seq2seq" else lm_inputs()
    settings = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, **options)
    eager = model.generate(**inputs, **settings)
    monkeypatch.setattr(
        type(model),
        "_decoding_step",
        lambda self, function, cache, reorders: GraphedDecodingStep(function, cache, reorders, capture=False),
    )
    graphed = model.generate(**inputs, **settings)
    assert_same_generation(graphed, eager)


# --- host reads in the decoding step -------------------------------------------------------------------------------


def host_reads_per_step(model, inputs, forced, steps_short=4, steps_long=10, **kwargs):
    """(reads of the whole call at steps_long - at steps_short) / the extra steps: what one more step reads.
    `forced`: min_new_tokens = max_new_tokens, so that no sequence can end before the last step."""
    counts = []
    for steps in (steps_short, steps_long):
        torch.manual_seed(0)
        with HostReads() as reads:
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps if forced else 0, **kwargs)
        assert out.shape[1] - (0 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]) >= steps
        counts.append((reads.calls, reads.scalar_reads))
    extra = steps_long - steps_short
    return tuple((long - short) / extra for short, long in zip(*counts))


DECODING = {"greedy": {}, "sampling": {"do_sample": True, "top_k": 5}, "beam 3": {"num_beams": 3}}


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
@pytest.mark.parametrize("decoding", list(DECODING))
def test_a_decoding_step_reads_no_tensor_values(family, decoding):
    """Issue 12: validation runs once per call on the whole input, never per one-token step. While no sequence can
    end (min_new_tokens bans EOS) a step reads nothing; where one can, the loop reads one value per step to stop when
    all have ended (transformers' loops read one too), and nothing else."""
    model = make_lm() if family == "lm" else make_seq2seq()
    tokens, mask = right_padded(SOURCES) if family == "seq2seq" else left_padded(PROMPTS)
    inputs = {"input_ids": tokens, "attention_mask": mask}
    with torch.no_grad():  # EOS never wins, so that every call runs to max_new_tokens
        model.lm_head.linear.bias[model.config.eos_token_id] -= 1.0e4
    # torch.multinomial checks its probabilities with host reads on a CPU (not on CUDA): the sampler's own, which
    # transformers' loop and any sampler have too
    sampler = 0
    if decoding == "sampling":
        with HostReads() as reads:
            torch.multinomial(torch.softmax(torch.randn(3, 30), dim=-1), num_samples=1)
        sampler = reads.scalar_reads
    assert host_reads_per_step(model, inputs, forced=True, **DECODING[decoding]) == (0.0, sampler)
    free = host_reads_per_step(model, inputs, forced=False, **DECODING[decoding])
    assert free[0] <= 1.0 and free[1] <= 1.0 + sampler
    model.lean_generation = False  # transformers' own loop, for comparison: it reads at least as much
    reference = host_reads_per_step(model, inputs, forced=False, **DECODING[decoding])
    assert reference[1] >= free[1]


def test_signatures_computed_once_are_the_functions_own():
    """generate() inspects these signatures at every call; they are stored once (`signature_computed_once`) and must
    be exactly what inspect derives from the function itself."""
    import inspect
    import types

    from rnn_seq2seq_hf import RNNLMForCausalLM, RNNSeq2SeqForConditionalGeneration
    from rnn_seq2seq_hf.models.generation_rnn import RecurrentGenerationMixin
    from rnn_seq2seq_hf.models.modeling_rnn_seq2seq import RNNDecoder, RNNEncoder

    functions = [
        RNNSeq2SeqForConditionalGeneration.forward,
        RNNEncoder.forward,
        RNNDecoder.forward,
        RNNLMForCausalLM.forward,
        RecurrentGenerationMixin.prepare_inputs_for_generation,
        RecurrentGenerationMixin._sample,
        RecurrentGenerationMixin._beam_search,
    ]
    for function in functions:
        assert "__signature__" in vars(function), function.__qualname__
        fresh = types.FunctionType(
            function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
        )
        fresh.__kwdefaults__, fresh.__annotations__ = function.__kwdefaults__, function.__annotations__
        assert inspect.signature(function) == inspect.signature(fresh), function.__qualname__
    model = make_seq2seq()
    assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]  # bound: no self


def test_the_source_mask_checked_by_the_first_forward_is_not_checked_again():
    """The decoding loop reuses the padding the prefill forward checked (no second host read of the same mask), but
    only for that very mask, unchanged: another tensor, or the same one changed in place, is checked again."""
    from rnn_seq2seq_hf.models.cache_rnn import RNNCache

    cache = RNNCache(num_layers=1, num_states=1)
    mask = torch.ones(2, 3, dtype=torch.long)
    checked, calls = object(), []

    def check(tensor):
        calls.append(tensor)
        return "checked again"

    cache.remember_source_padding(mask, checked)
    assert cache.source_padding(mask, check) is checked and calls == []
    assert cache.source_padding(mask.clone(), check) == "checked again"
    mask[0, 2] = 0
    assert cache.source_padding(mask, check) == "checked again" and len(calls) == 2
    # end to end: a padded source decodes as with transformers' loop (which checks at every step)
    model = make_seq2seq()
    tokens, padding = right_padded(SOURCES)
    lean, reference = both_loops(model, input_ids=tokens, attention_mask=padding, max_new_tokens=6, num_beams=2)
    assert_same_generation(lean, reference)
