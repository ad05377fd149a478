"""generate() for both families against independent references: a cache-free greedy loop (full recomputation at
every step), full-forward sequence log-probabilities, an exhaustive search, the same sequence generated alone, and
the sampling distributions computed by hand."""

import itertools

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

from helpers import (
    CELL_TYPES,
    EOS,
    SEQ2SEQ_IDS,
    SEQ2SEQ_VARIANTS,
    left_padded,
    lm_sequence_logprob,
    make_lm,
    make_seq2seq,
    right_padded,
    seq2seq_sequence_logprob,
    seq2seq_variant_config,
    strip_after_eos,
)

SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [14, 15, 16]]


@torch.no_grad()
def reference_greedy_seq2seq(model, source: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding that recomputes the whole decoder from scratch at every step (no cache at all)."""
    decoded = [model.config.decoder_start_token_id]
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([decoded]), use_cache=False)
        decoded.append(int(logits.logits[0, -1].argmax()))
        if decoded[-1] == EOS:
            break
    return decoded[1:]


@torch.no_grad()
def reference_greedy_lm(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax()))
        if tokens[-1] == EOS:
            break
    return tokens[len(prompt) :]


def generated_rows(sequences: torch.Tensor, prompt_length: int) -> list[list[int]]:
    return [strip_after_eos(row[prompt_length:].tolist()) for row in sequences]


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
def test_seq2seq_greedy_equals_cache_free_reference(cell, attention, feeding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding))
    source, mask = right_padded(SOURCES)
    out = model.generate(input_ids=source, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, src in enumerate(SOURCES):
        assert generated_rows(out, 1)[row] == reference_greedy_seq2seq(model, src, 8)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("input_to_output", [False, True])
def test_lm_greedy_on_left_padded_prompts_equals_cache_free_reference(cell, input_to_output):
    model = make_lm(cell_type=cell, input_to_output=input_to_output)
    ids, mask = left_padded(PROMPTS)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in enumerate(PROMPTS):
        assert generated_rows(out, ids.shape[1])[row] == reference_greedy_lm(model, prompt, 8)


def force_beam_search(monkeypatch):
    """Route generate() through the beam-search code even with num_beams=1."""
    monkeypatch.setattr(GenerationConfig, "get_generation_mode", lambda self, *a, **k: GenerationMode.BEAM_SEARCH)


@pytest.mark.parametrize("family", ["seq2seq", "lm"])
@pytest.mark.parametrize("cell", CELL_TYPES)
def test_beam_search_with_one_beam_equals_greedy(monkeypatch, family, cell):
    if family == "seq2seq":
        model = make_seq2seq(cell_type=cell, attention_type="bahdanau", input_feeding=True)
        inputs = dict(zip(("input_ids", "attention_mask"), right_padded(SOURCES)))
    else:
        model = make_lm(cell_type=cell)
        inputs = dict(zip(("input_ids", "attention_mask"), left_padded(PROMPTS)))
    greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    force_beam_search(monkeypatch)
    beam = model.generate(**inputs, max_new_tokens=8, num_beams=1, do_sample=False)
    prompt_length = 1 if family == "seq2seq" else inputs["input_ids"].shape[1]
    assert generated_rows(beam, prompt_length) == generated_rows(greedy, prompt_length)


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
def test_seq2seq_every_beam_score_is_its_full_forward_log_probability(cell, attention, feeding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding))
    source, mask = right_padded(SOURCES)
    out = model.generate(
        input_ids=source,
        attention_mask=mask,
        max_new_tokens=6,
        num_beams=4,
        num_return_sequences=4,
        length_penalty=1.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    for index, sequence in enumerate(out.sequences):
        generated = strip_after_eos(sequence[1:].tolist())
        logprob = seq2seq_sequence_logprob(model, torch.tensor(SOURCES[index // 4]), generated)
        assert out.sequences_scores[index].item() == pytest.approx(logprob / len(generated), abs=1e-4)
        assert transition[index, : len(generated)].sum().item() == pytest.approx(logprob, abs=1e-4)
    scores = out.sequences_scores.view(3, 4)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_lm_every_beam_score_is_its_full_forward_log_probability(cell):
    model = make_lm(cell_type=cell)
    ids, mask = left_padded(PROMPTS)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.7,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for index, sequence in enumerate(out.sequences):
        generated = strip_after_eos(sequence[ids.shape[1] :].tolist())
        logprob = lm_sequence_logprob(model, PROMPTS[index // 3], generated)
        assert out.sequences_scores[index].item() == pytest.approx(logprob / len(generated) ** 0.7, abs=1e-4)


def exhaustive_best(logprob_fn, vocab_size: int, max_new_tokens: int) -> tuple[list[int], float]:
    """Best complete hypothesis: any sequence that ends with EOS, or reaches the length limit."""
    best, best_score = None, -float("inf")
    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(vocab_size), repeat=length):
            if EOS in tokens[:-1] or (length < max_new_tokens and tokens[-1] != EOS):
                continue
            score = logprob_fn(list(tokens))
            if score > best_score:
                best, best_score = list(tokens), score
    return best, best_score


@pytest.mark.parametrize("attention", ["none", "bahdanau", "general"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_seq2seq_beam_search_finds_the_exhaustive_optimum(attention, cell):
    vocab, steps = 5, 3
    model = make_seq2seq(vocab_size=vocab, cell_type=cell, attention_type=attention, input_feeding=False)
    source = torch.tensor([3, 4, 4, 3])
    best, best_score = exhaustive_best(lambda g: seq2seq_sequence_logprob(model, source, g), vocab, steps)
    out = model.generate(
        input_ids=source[None],
        max_new_tokens=steps,
        num_beams=vocab ** (steps - 1),
        length_penalty=0.0,
        early_stopping="never",
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert strip_after_eos(out.sequences[0, 1:].tolist()) == best
    assert out.sequences_scores[0].item() == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_lm_beam_search_finds_the_exhaustive_optimum(cell):
    vocab, steps, prompt = 5, 3, [3, 4]
    model = make_lm(vocab_size=vocab, cell_type=cell)
    best, best_score = exhaustive_best(lambda g: lm_sequence_logprob(model, prompt, g), vocab, steps)
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=steps,
        num_beams=vocab ** (steps - 1),
        length_penalty=0.0,
        early_stopping="never",
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert strip_after_eos(out.sequences[0, len(prompt) :].tolist()) == best
    assert out.sequences_scores[0].item() == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_seq2seq_sequence_alone_equals_sequence_in_padded_batch(cell, attention, feeding, num_beams):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding))
    source, mask = right_padded(SOURCES)
    kwargs = dict(max_new_tokens=7, num_beams=num_beams, output_scores=True, return_dict_in_generate=True)
    batch = model.generate(input_ids=source, attention_mask=mask, **kwargs)
    for row, src in enumerate(SOURCES):
        alone = model.generate(input_ids=torch.tensor([src]), **kwargs)
        assert generated_rows(batch.sequences, 1)[row] == generated_rows(alone.sequences, 1)[0]
        if num_beams > 1:
            assert batch.sequences_scores[row].item() == pytest.approx(alone.sequences_scores[0].item(), abs=1e-4)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_lm_prompt_alone_equals_prompt_in_left_padded_batch(cell, num_beams):
    model = make_lm(cell_type=cell)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=7, num_beams=num_beams, do_sample=False)
    batch = generated_rows(model.generate(input_ids=ids, attention_mask=mask, **kwargs), ids.shape[1])
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(input_ids=torch.tensor([prompt]), **kwargs)
        assert batch[row] == generated_rows(alone, len(prompt))[0]


def expected_sampling_distribution(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Next-token distribution after temperature, top-k and top-p (nucleus), computed by hand."""
    probs = (logits / temperature).softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= probs >= probs.topk(top_k).values[-1]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        keep_sorted = mass_before < top_p  # smallest set of most likely tokens holding at least top_p
        keep &= torch.zeros_like(keep).scatter(0, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.5, 5, 0.9)]
)
@pytest.mark.parametrize("family", ["seq2seq", "lm"])
def test_sampling_draws_from_the_processed_next_token_distribution(family, temperature, top_k, top_p):
    model = make_seq2seq(seed=3) if family == "seq2seq" else make_lm(seed=3)
    with torch.no_grad():  # soften the sharpened model so that many tokens have visible probability
        model.lm_head.linear.weight.mul_(0.3)
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        if family == "seq2seq":
            logits = model(input_ids=prompt, decoder_input_ids=torch.tensor([[1]])).logits[0, -1]
        else:
            logits = model(input_ids=prompt).logits[0, -1]
    expected = expected_sampling_distribution(logits, temperature, top_k, top_p)
    torch.manual_seed(0)
    n = 6000
    out = model.generate(
        input_ids=prompt,
        do_sample=True,
        max_new_tokens=1,
        num_return_sequences=n,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    counts = torch.bincount(out[:, -1], minlength=logits.shape[-1]).float() / n
    assert torch.all(counts[expected == 0] == 0)
    assert (counts - expected).abs().max().item() < 0.025


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = make_seq2seq()
    source, mask = right_padded(SOURCES)
    torch.manual_seed(5)
    a = model.generate(input_ids=source, attention_mask=mask, do_sample=True, max_new_tokens=6)
    torch.manual_seed(5)
    b = model.generate(input_ids=source, attention_mask=mask, do_sample=True, max_new_tokens=6)
    assert torch.equal(a, b)
    top1 = model.generate(input_ids=source, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=6)
    greedy = model.generate(input_ids=source, attention_mask=mask, do_sample=False, max_new_tokens=6)
    assert generated_rows(top1, 1) == generated_rows(greedy, 1)


@pytest.mark.parametrize("attention", ["bahdanau", "dot", "general", "concat"])
@pytest.mark.parametrize("feeding", [False, True])
def test_generated_cross_attention_equals_full_forward_attention(attention, feeding):
    model = make_seq2seq(attention_type=attention, input_feeding=feeding)
    source, mask = right_padded(SOURCES)
    out = model.generate(
        input_ids=source,
        attention_mask=mask,
        max_new_tokens=5,
        min_new_tokens=5,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    steps = len(out.cross_attentions)
    assert steps == 5 and out.cross_attentions[0][0].shape == (3, 1, 1, 7)
    generated_attention = torch.cat([step[0] for step in out.cross_attentions], dim=2)  # [B, 1, T, S]
    with torch.no_grad():
        full = model(
            input_ids=source, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1], output_attentions=True
        )
    torch.testing.assert_close(generated_attention, full.cross_attentions[0], atol=1e-5, rtol=1e-5)


def test_beam_search_options():
    model = make_seq2seq(seed=1)
    source, mask = right_padded(SOURCES)
    out = model.generate(input_ids=source, attention_mask=mask, num_beams=4, num_return_sequences=3, max_new_tokens=6)
    assert out.shape[0] == 9
    for row in range(3):
        hypotheses = [tuple(strip_after_eos(s[1:].tolist())) for s in out[3 * row : 3 * row + 3]]
        assert len(set(hypotheses)) == 3

    no_repeat = model.generate(
        input_ids=source, attention_mask=mask, num_beams=3, no_repeat_ngram_size=2, max_new_tokens=12
    )
    for sequence in generated_rows(no_repeat, 1):
        bigrams = list(zip(sequence, sequence[1:]))
        assert len(bigrams) == len(set(bigrams))

    at_least = model.generate(input_ids=source, attention_mask=mask, num_beams=3, min_new_tokens=6, max_new_tokens=9)
    for sequence in generated_rows(at_least, 1):
        assert EOS not in sequence[:6] and len(sequence) >= 6
    assert model.generate(input_ids=source, attention_mask=mask, max_new_tokens=4).shape[1] <= 5


def test_encoder_runs_once_per_generate_call():
    model = make_seq2seq(attention_type="bahdanau", input_feeding=True)
    calls = []
    model.get_encoder().register_forward_hook(lambda *args: calls.append(1))
    source, mask = right_padded(SOURCES)
    model.generate(input_ids=source, attention_mask=mask, num_beams=4, max_new_tokens=6)
    assert len(calls) == 1


def test_assisted_decoding_is_refused_for_stateful_models():
    model = make_lm()
    with pytest.raises(ValueError, match="stateful"):
        model.generate(input_ids=torch.tensor([[5, 6]]), assistant_model=make_lm(seed=1), max_new_tokens=3)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("input_to_output", [False, True])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_lm_right_padded_prompts_generate_like_left_padded_ones(cell, input_to_output, num_beams):
    """Logits at padding repeat the last real position and the state skips padding, so right padding is safe."""
    model = make_lm(cell_type=cell, input_to_output=input_to_output)
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    left_ids, left_mask = left_padded(PROMPTS)
    left = generated_rows(model.generate(input_ids=left_ids, attention_mask=left_mask, **kwargs), left_ids.shape[1])
    right_ids, right_mask = right_padded(PROMPTS)
    right = generated_rows(
        model.generate(input_ids=right_ids, attention_mask=right_mask, **kwargs), right_ids.shape[1]
    )
    assert right == left
