"""The README's main job, `rnn-seq2seq demo`: a reduced run in the default tests, the full run as a slow test."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from rnn_seq2seq_hf.demo import run_demo
from rnn_seq2seq_hf.demo_data import make_date_pairs, spell_ordinal, spell_year

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
    # the README's pipeline example (the library is imported above, so the task is registered)
    translator = pipeline("seq2seq-generation", model=str(tmp_path / "demo" / "model"))
    outputs = translator(["the third of may, nineteen ninety", "12/01/2024"], num_beams=5, batch_size=2)
    assert outputs == [[{"generated_text": "1990-05-03"}], [{"generated_text": "2024-01-12"}]]
