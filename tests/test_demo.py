"""The README's main job, `rnn-seq2seq demo`: a reduced run in the default tests, the full run as a slow test."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from rnn_seq2seq_hf.demo import attention_example, run_demo
from rnn_seq2seq_hf.demo_data import MONTHS, make_date_pairs, spell_ordinal, spell_year
from rnn_seq2seq_hf.inference import attention_weights, translate
from rnn_seq2seq_hf.recipes import load_recipe
from rnn_seq2seq_hf.run_folder import RunFolderError

NO_LIBRARY_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "rnn_seq2seq_hf":
                raise ImportError("blocked")
    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
    folder = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)
    inputs = tokenizer(["the third of may, nineteen ninety"], return_tensors="pt")
    out = model.generate(**inputs, num_beams=3)
    print(json.dumps({"module": type(model).__module__, "output": tokenizer.decode(out[0], skip_special_tokens=True)}))
    """
)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    metrics = run_demo(output, quick=True)
    return output, metrics


def test_demo_writes_model_metrics_heatmap_and_card(quick_demo):
    output, metrics = quick_demo
    saved = json.loads((output / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics, default=str))
    assert {"bleu", "chrf", "exact_match"} <= saved.keys()
    assert (output / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(output / "model" / "README.md")
    index = card.data.eval_results
    assert {result.metric_type: result.metric_value for result in index} == {
        name: round(saved[name], 4) for name in ("bleu", "bleu_lowercase", "chrf", "exact_match")
    }
    assert card.data.library_name == "transformers" and "rnn_seq2seq_hf" in card.data.tags
    assert "![attention heatmap](attention.png)" in card.text and (output / "model" / "attention.png").is_file()


def test_demo_model_loads_with_the_auto_classes_and_translates_like_the_metrics_say(quick_demo):
    output, _ = quick_demo
    model = AutoModelForSeq2SeqLM.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    _, heldout = make_date_pairs(2000, 80, seed=0)
    sources = [source for source, _ in heldout[20:23]]
    first_outputs = (output / "test_translations.txt").read_text().splitlines()[:3]
    with torch.no_grad():
        for source, expected in zip(sources, first_outputs):
            generated = model.generate(**tokenizer([source], return_tensors="pt"))
            assert tokenizer.decode(generated[0], skip_special_tokens=True).strip() == expected


def test_demo_model_loads_with_trust_remote_code_without_the_library(quick_demo, tmp_path):
    output, _ = quick_demo
    script = tmp_path / "load.py"
    script.write_text(NO_LIBRARY_LOADER)
    result = subprocess.run(
        [sys.executable, str(script), str(output / "model")], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.")


def test_running_the_demo_again_refuses_to_replace_it_unless_asked(quick_demo):
    output, _ = quick_demo
    before = (output / "model" / "model.safetensors").read_bytes()
    with pytest.raises(RunFolderError, match="holds a finished run"):
        run_demo(output, quick=True)
    assert (output / "model" / "model.safetensors").read_bytes() == before


def test_demo_tokenizer_keeps_the_fields_of_a_date_apart(quick_demo):
    """BPE alone merges digits of different fields ("4-03" in "1994-03-23"), so no output token would belong to one
    field of the date; the demo's tokenizer cuts digits into pairs of their own."""
    output, _ = quick_demo
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("1994-03-23", add_special_tokens=False)["input_ids"])
    assert tokens == ["▁", "19", "94", "-", "03", "-", "23"]
    assert tokenizer.decode(tokenizer("1994-03-23")["input_ids"], skip_special_tokens=True) == "1994-03-23"
    card = (output / "model" / "README.md").read_text()
    assert "digits are cut into groups of at most 2" in card


def test_the_heatmap_shows_a_date_written_out_in_words():
    recipe = load_recipe("demo_dates")
    sizes = recipe["data"]
    _, heldout = make_date_pairs(sizes["train_pairs"], sizes["validation_pairs"] + sizes["test_pairs"], seed=0)
    example = attention_example([source for source, _ in heldout[: sizes["validation_pairs"]]])
    assert example == "the twenty-eighth of may, two thousand and seventy-nine"


def test_generated_dates_are_right():
    assert spell_ordinal(23) == "twenty-third" and spell_ordinal(30) == "thirtieth" and spell_ordinal(12) == "twelfth"
    import random

    rng = random.Random(0)
    assert spell_year(1994, rng) == "nineteen ninety-four" and spell_year(1905, rng) == "nineteen oh five"
    assert spell_year(2000, rng) == "two thousand"
    train, heldout = make_date_pairs(3000, 200, seed=3)
    assert not {target for _, target in train} & {target for _, target in heldout}
    assert len({target for _, target in heldout}) == 200


@pytest.mark.slow
def test_full_demo_reaches_95_percent_exact_match(tmp_path):
    result = subprocess.run(
        ["rnn-seq2seq", "demo", "--output-dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["exact_match"] >= 95.0
    # The README's heatmap claim, on the example attention.png shows: the month is written looking at the month
    # name, the day at the start of the source ("the twenty-eighth"), the year at the end of the source, after the
    # spelled-out year.
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "demo" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "demo" / "model")
    recipe = load_recipe("demo_dates")
    sizes = recipe["data"]
    _, heldout = make_date_pairs(sizes["train_pairs"], sizes["validation_pairs"] + sizes["test_pairs"], seed=0)
    example = attention_example([source for source, _ in heldout[: sizes["validation_pairs"]]])
    output = translate(model, tokenizer, [example])[0]
    weights, source_tokens, target_tokens = attention_weights(model, tokenizer, example, output)
    looked_at = [source_tokens[int(row.argmax())] for row in weights]  # per output token
    year, month, day = output.split("-")
    assert target_tokens[:7] == ["▁", year[:2], year[2:], "-", month, "-", day]
    month_name = next(token for token in source_tokens if token.strip("▁,") in MONTHS)
    assert looked_at[4] == month_name
    assert looked_at[6] in source_tokens[:2]  # "▁the", "▁twenty-eighth"
    year_start = source_tokens.index(month_name) + 1
    assert all(token in source_tokens[year_start:] for token in looked_at[1:3])
    # the README's pipeline example (the library is imported above, so the task is registered)
    translator = pipeline("seq2seq-generation", model=str(tmp_path / "demo" / "model"))
    outputs = translator(["the third of may, nineteen ninety", "12/01/2024"], num_beams=5, batch_size=2)
    assert outputs == [[{"generated_text": "1990-05-03"}], [{"generated_text": "2024-01-12"}]]
