"""The `text-generation` pipeline with the RNN LM and the registered `seq2seq-generation` pipeline, from an
instance and from a saved folder (loading from the Hub is in test_hub.py), against direct `generate()` calls."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from helpers import make_lm, make_seq2seq
from rnn_seq2seq_hf import Seq2SeqGenerationPipeline
from rnn_seq2seq_hf.inference import attention_weights
from rnn_seq2seq_hf.tokenization import train_tokenizer

WORDS = "a b c d e f g h i j k l m n o p q r s"
SOURCES = ["a b c d", "e f", "g h i j k l", "m"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([WORDS], kind="word", vocab_size=None)


@pytest.fixture(scope="module")
def lm_tokenizer():
    return train_tokenizer([WORDS], kind="word", vocab_size=None, padding_side="left", add_eos=False)


def direct_translation(model, tokenizer, text, **kwargs):
    generated = model.generate(**tokenizer([text], return_tensors="pt"), **kwargs)
    return tokenizer.decode(generated[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("source", ["instance", "folder"])
def test_seq2seq_pipeline_strings_in_strings_out_with_batching(tokenizer, tmp_path, source):
    model = make_seq2seq(attention_type="concat")
    if source == "folder":
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        translator = pipeline("seq2seq-generation", model=str(tmp_path))
    else:
        translator = pipeline("seq2seq-generation", model=model, tokenizer=tokenizer)
    assert isinstance(translator, Seq2SeqGenerationPipeline)
    single = translator(SOURCES[0], num_beams=3, max_new_tokens=5)
    assert single == [
        {"generated_text": direct_translation(model, tokenizer, SOURCES[0], num_beams=3, max_new_tokens=5)}
    ]
    batched = translator(SOURCES, num_beams=3, max_new_tokens=5, batch_size=3)
    one_by_one = [translator(text, num_beams=3, max_new_tokens=5) for text in SOURCES]
    assert batched == one_by_one
    several = translator(SOURCES[2], num_beams=4, num_return_sequences=3, max_new_tokens=5)
    assert len(several) == 3 and len({record["generated_text"] for record in several}) == 3
    assert translator(["", "a b"], max_new_tokens=4, batch_size=2)[0] == [{"generated_text": ""}]


def test_seq2seq_pipeline_returns_the_alignment(tokenizer):
    model = make_seq2seq(attention_type="bahdanau", input_feeding=True)
    translator = pipeline("seq2seq-generation", model=model, tokenizer=tokenizer)
    records = translator(SOURCES[:3], max_new_tokens=5, return_alignment=True, batch_size=2)
    for text, (record,) in zip(SOURCES, records):
        alignment = record["alignment"]
        output = record["generated_text"]
        expected, source_tokens, target_tokens = attention_weights(model, tokenizer, text, output)
        assert alignment["source_tokens"] == source_tokens
        weights = np.array(alignment["weights"])
        if tokenizer.eos_token in alignment["target_tokens"]:  # the output ended: it matches a teacher-forced pass
            assert alignment["target_tokens"] == target_tokens
            np.testing.assert_allclose(weights, expected, atol=1e-5)
        np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)


def test_seq2seq_pipeline_rejects_non_strings_and_empty_lists(tokenizer):
    translator = pipeline("seq2seq-generation", model=make_seq2seq(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="takes strings"):
        translator(42)
    with pytest.raises(ValueError, match="`inputs` is an empty list"):
        translator([])


@pytest.mark.parametrize("source", ["instance", "folder"])
def test_text_generation_pipeline_with_the_rnn_lm(lm_tokenizer, tmp_path, source):
    model = make_lm(cell_type="lstm", input_to_output=True)
    if source == "folder":
        model.save_pretrained(tmp_path)
        lm_tokenizer.save_pretrained(tmp_path)
        generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    else:
        generator = pipeline("text-generation", model=model, tokenizer=lm_tokenizer, device=-1)
    assert generator.device == torch.device("cpu")
    prompts = ["a b c", "d", "e f g h"]
    greedy = generator(prompts, max_new_tokens=5, do_sample=False, batch_size=2)
    for prompt, (record,) in zip(prompts, greedy):
        inputs = lm_tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        direct = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert record["generated_text"] == lm_tokenizer.decode(direct[0], skip_special_tokens=True).strip()
    beams = generator(prompts[0], max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    assert len(beams) == 2 and all(r["generated_text"].startswith("a b c") for r in beams)
    torch.manual_seed(0)
    first = generator(prompts[0], max_new_tokens=8, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert generator(prompts[0], max_new_tokens=8, do_sample=True, top_k=5) == first
    new_only = generator(prompts[0], max_new_tokens=3, do_sample=False, return_full_text=False)
    assert not new_only[0]["generated_text"].startswith("a b c")
