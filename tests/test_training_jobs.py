"""`rnn-seq2seq train-translation` / `train-lm` as a user runs them: resuming, refusing to destroy a finished run or to
share a folder, stopping on a non-finite loss, saving before evaluating, fine-tuning, label smoothing, quiet stdout,
and model cards that tell the truth about the run (tiny models, a few seconds each)."""

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import rnn_seq2seq_hf.run_folder as run_folder
import rnn_seq2seq_hf.training as training
from rnn_seq2seq_hf.cli import main
from rnn_seq2seq_hf.model_card import python_string_literal, tokenizer_description
from rnn_seq2seq_hf.recipes import load_recipe
from rnn_seq2seq_hf.run_folder import LOCK_FILE
from rnn_seq2seq_hf.tokenization import train_tokenizer

PAIRS = [
    ("ein hund läuft", "a dog runs"),
    ("zwei katzen schlafen", "two cats sleep"),
    ("ein mann liest", "a man reads"),
    ("eine frau singt", "a woman sings"),
] * 8
# The first test sentence is what the model card's usage lines show: it must reach them quoted, never as shell code.
NASTY = "ein \"hund\" $(touch pwned) `id`; 'läuft' \\n"
RECIPE = """
name: tiny-translation
task: translation
description: A tiny test recipe.
tokenizer: {kind: bpe, vocab_size: 60}
model: {embedding_size: 16, hidden_size: 16, encoder_layers: 1, decoder_layers: 1, attention_type: dot}
training: {max_steps: 6, per_device_train_batch_size: 8, learning_rate: 0.02, logging_steps: 2, eval_strategy: steps,
           eval_steps: 3, load_best_model_at_end: false, report_to: [], disable_tqdm: true}
generation: {num_beams: 2, max_new_tokens: 8}
"""
LM_RECIPE = """
task: language_modeling
tokenizer: {kind: word, vocab_size: null}
model: {embedding_size: 16, hidden_size: 16, num_hidden_layers: 1, cell_type: gru}
training: {max_steps: 4, per_device_train_batch_size: 4, learning_rate: 0.01, logging_steps: 2, report_to: [],
           disable_tqdm: true}
data: {block_size: 8}
evaluation: {batch_size: 2, block_size: 5}
sample: {prompt: "the", max_new_tokens: 5, num_samples: 1}
"""
LM_TEXT = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "train.de").write_text("".join(s + "\n" for s, _ in PAIRS))
    (root / "train.en").write_text("".join(t + "\n" for _, t in PAIRS))
    (root / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS[:4]))
    test = [(NASTY, "a dog runs")] + PAIRS[1:4]
    (root / "test.jsonl").write_text("".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in test))
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "lm.yaml").write_text(LM_RECIPE)
    (root / "lm.txt").write_text("\n".join(LM_TEXT) + "\n")
    return root


def translation_args(data, output, *extra) -> list[str]:
    return [
        "train-translation", "--recipe", str(data / "recipe.yaml"), "--output-dir", str(output),
        "--train", f"{data / 'train.de'},{data / 'train.en'}", "--validation", str(data / "valid.tsv"),
        "--source-lang", "de", "--target-lang", "en", *extra,
    ]  # fmt: skip


def lm_args(data, output, *extra) -> list[str]:
    return ["train-lm", "--recipe", str(data / "lm.yaml"), "--output-dir", str(output), "--train",
            str(data / "lm.txt"), "--validation-fraction", "0.2", *extra]  # fmt: skip


def weights(folder) -> dict:
    return load_file(folder / "model.safetensors")


def one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert "Traceback" not in errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished translation run, uninterrupted, scored on the test file."""
    output = tmp_path_factory.mktemp("finished") / "out"
    args = translation_args(data, output, "--test", str(data / "test.jsonl"), "--dataset-name", "tiny pets corpus",
                            "--set", "training.seed=7")  # fmt: skip
    assert main(args) == 0
    return output


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C in the middle of training: KeyboardInterrupt at the end of optimizer step `step`."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.LossWatch, "on_step_end", on_step_end, raising=False)


def test_an_interrupted_run_resumes_from_its_newest_checkpoint_and_ends_as_an_uninterrupted_one(
    data, finished, tmp_path, monkeypatch
):
    output = tmp_path / "out"
    args = translation_args(data, output, "--test", str(data / "test.jsonl"), "--dataset-name", "tiny pets corpus",
                            "--set", "training.seed=7")  # fmt: skip
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        assert main(args) == 130
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-3"]
    assert not (output / "model").exists() and not (output / LOCK_FILE).exists()
    # a crash while Trainer wrote a checkpoint leaves it without trainer_state.json (Trainer writes that last)
    shutil.copytree(output / "checkpoints" / "checkpoint-3", output / "checkpoints" / "checkpoint-4")
    (output / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    assert main(args) == 0  # the same command again
    assert (
        "resuming from" in (output / "train.log").read_text() and "checkpoint-3" in (output / "train.log").read_text()
    )
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    resumed, uninterrupted = weights(output / "model"), weights(finished / "model")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    assert (output / "test_translations.txt").read_text() == (finished / "test_translations.txt").read_text()


def test_a_finished_run_is_refused_and_overwrite_starts_over(data, finished, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    before = weights(output / "model")
    capsys.readouterr()
    assert main(translation_args(data, output)) == 2
    assert "holds a finished run (model/ and metrics.json); pass --overwrite-output-dir" in one_error_line(capsys)
    assert all(torch.equal(weights(output / "model")[name], value) for name, value in before.items())
    started = time.time()
    assert main(translation_args(data, output, "--overwrite-output-dir", "--set", "training.seed=8")) == 0
    state = output / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    assert state.stat().st_mtime >= started  # trained again from step 0, not resumed
    assert "resuming from" not in (output / "train.log").read_text().split("holds")[-1]
    assert not all(torch.equal(weights(output / "model")[name], value) for name, value in before.items())


def test_checkpoints_of_another_run_are_not_resumed(data, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        assert main(translation_args(data, output)) == 130
    capsys.readouterr()
    assert main(translation_args(data, output, "--set", "training.learning_rate=0.03")) == 2
    assert "holds checkpoints of another run (the recipe, data or starting model changed)" in one_error_line(capsys)


# Another process holding the lock; it loads run_folder.py alone (no torch or transformers to import: fast).
HOLD_LOCK = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_folder", sys.argv[2])
    run_folder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_folder)
    run_folder.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_folder_in_use_by_a_live_run_is_refused(data, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out"), run_folder.__file__],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(lm_args(data, tmp_path / "out")) == 2
        assert f"is in use by another training run (pid {holder.pid})" in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert main(lm_args(data, tmp_path / "out")) == 0  # the stale lock of the killed run is taken over
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_non_finite_loss_stops_training_without_saving_a_model(data, tmp_path, capsys, monkeypatch):
    """A diverged run (here: a weight that is NaN from the start) stops at the first step with one line and exit
    status 2; no model is saved, the lock is released."""
    build = training.new_model

    def diverged(config):
        model = build(config)
        with torch.no_grad():
            model.lm_head.linear.bias[0] = float("nan")
        return model

    monkeypatch.setattr(training, "new_model", diverged)
    output = tmp_path / "out"
    assert main(lm_args(data, output)) == 2
    assert "training stopped at step 1: the training loss is nan (not finite)" in one_error_line(capsys)
    assert not (output / "model").exists() and not (output / "metrics.json").exists()
    assert not (output / LOCK_FILE).exists()


def test_the_model_is_saved_before_evaluation(data, tmp_path, monkeypatch):
    output = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    with monkeypatch.context() as patch:
        patch.setattr(training, "translate", broken)
        with pytest.raises(RuntimeError, match="evaluation broke"):
            main(translation_args(data, output))
    model = AutoModelForSeq2SeqLM.from_pretrained(output / "model")  # the training is not lost
    assert model.config.attention_type == "dot"
    assert not (output / "metrics.json").exists() and not (output / LOCK_FILE).exists()
    assert main(translation_args(data, output)) == 0  # the rerun resumes at the last step and evaluates
    assert json.loads((output / "metrics.json").read_text())["optimizer_steps"] == 6


def test_the_accelerate_engine_gets_the_run_fingerprint(data, tmp_path, monkeypatch):
    seen = {}

    def capture(model, train_dataset, collator, args, **kwargs):
        seen["fingerprint"] = args.fingerprint
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_with_accelerate", capture)
    assert main(translation_args(data, tmp_path / "out", "--engine", "accelerate")) == 130
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["fingerprint"]
    assert seen["fingerprint"] == recorded and len(recorded) == 32


@pytest.mark.parametrize("command", ["translation", "lm"])
def test_label_smoothing_trains_both_families(data, tmp_path, command):
    make = translation_args if command == "translation" else lm_args
    assert main(make(data, tmp_path / "out", "--set", "training.label_smoothing_factor=0.1",
                     "--set", "training.max_steps=2")) == 0  # fmt: skip
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_fine_tuning_starts_from_the_model_and_its_tokenizer(data, finished, tmp_path, capsys):
    base = finished / "model"
    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(RECIPE.replace("model: {", "# model: {").replace("tokenizer:", "# tokenizer:"))
    args = translation_args(data, tmp_path / "out", "--model-name-or-path", str(base), "--set",
                            "training.learning_rate=0")  # fmt: skip
    args[args.index("--recipe") + 1] = str(recipe)
    assert main(args) == 0
    tuned = tmp_path / "out" / "model"
    assert (tuned / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    for name, value in weights(base).items():  # learning rate 0: the weights it started from
        assert torch.equal(weights(tuned)[name], value), name
    card = (tuned / "README.md").read_text()
    assert "the tokenizer of `model`, the model this one was fine-tuned from" in card and str(tmp_path) not in card

    capsys.readouterr()
    mismatch = translation_args(data, tmp_path / "other", "--model-name-or-path", str(base), "--set",
                                "model.hidden_size=32")  # fmt: skip
    assert main(mismatch) == 2
    assert "`model.hidden_size: 32` differs from the model being fine-tuned (16)" in one_error_line(capsys)
    assert main(lm_args(data, tmp_path / "lm", "--model-name-or-path", str(base))) == 2
    assert "is a 'rnn_seq2seq' model; a language_modeling job fine-tunes 'rnn_lm' models" in one_error_line(capsys)
    assert main(lm_args(data, tmp_path / "lm", "--model-name-or-path", str(tmp_path / "nowhere"))) == 2
    assert "not a model folder" in one_error_line(capsys) or "cannot load" in capsys.readouterr().err


def test_the_model_card_tells_the_truth_about_the_run(data, finished):
    card = (finished / "model" / "README.md").read_text()
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 6 and metrics["epochs"] == 1.5  # 32 pairs, batches of 8: 4 steps an epoch
    assert "| optimizer steps | 6 |" in card and "| epochs trained | 1.5 |" in card
    assert "num_train_epochs" not in card and "SchedulerType" not in card and "| lr_scheduler_type | linear |" in card
    assert "| encoder | 1 layer, bidirectional |" in card and "| decoder | 1 layer |" in card
    assert "# RNN translation model (de to en) trained on tiny pets corpus" in card
    assert "A tiny test recipe." not in card  # the recipe's description is about the recipe's data, not the user's
    assert (
        "pip install git+https://github.com/rnn-seq2seq-hf/rnn-seq2seq-hf" in card and "`pip install rnn" not in card
    )
    assert "every encoded text ends with `</s>`" in card and "BPE subword vocabulary" in card
    # the usage lines carry the first test sentence as data: a Python literal, and one shell word
    literal = card.split("inputs = tokenizer([", 1)[1].split("], return_tensors", 1)[0]
    assert ast.literal_eval(literal) == NASTY
    shell = card.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert shlex.split(shell)[:3] == ["printf", "%s\\n", NASTY] and shlex.split(shell)[3] == "|"
    # the recipe by name, the resolved recipe beside it, and no path of the machine that trained it
    assert metrics["recipe"] == "recipe.yaml"
    resolved = load_recipe(str(finished / "recipe.yaml"))
    assert resolved["training"]["seed"] == 7 and resolved["name"] == "tiny-translation"
    for path in [finished / "metrics.json", finished / "recipe.yaml", *(finished / "model").iterdir()]:
        if path.suffix in (".md", ".json", ".yaml", ".txt"):
            assert str(data) not in path.read_text() and str(finished) not in path.read_text(), path


@pytest.mark.parametrize(
    "text", ["ein hund", "it's", 'say "hi"', "both ' and \"", "back\\' slash", "\n\t\x00 ü €", NASTY, ""]
)
def test_card_literals_read_back_and_use_the_quotes_formatters_keep(text):
    # repr() writes 'ein hund': ruff/black rewrite it to "ein hund", and a saved card then fails `ruff format --check`
    literal = python_string_literal(text)
    assert ast.literal_eval(literal) == text
    assert literal.startswith('"') or ('"' in text and "'" not in text)


def test_the_card_python_is_already_formatted(finished):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    card = finished / "model" / "README.md"
    result = subprocess.run([ruff, "format", "--check", "--no-cache", str(card)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lm_cards_describe_the_tokenizer_they_have():
    word = train_tokenizer(LM_TEXT, kind="word", vocab_size=None, padding_side="left", add_eos=False)
    char = train_tokenizer(["\n".join(LM_TEXT)], kind="char", vocab_size=None, padding_side="left", add_eos=False)
    word_text, char_text = tokenizer_description(word, False), tokenizer_description(char, False)
    for text in (word_text, char_text):
        assert "ends with `</s>`" not in text and "WordLevel" not in text
    assert word_text.startswith("A word vocabulary of") and "`</s>` is added after every line" in word_text
    assert char_text.startswith("A character vocabulary of") and "newlines included, without an end token" in char_text


QUIET_RECIPE = (
    RECIPE.replace("disable_tqdm: true", "disable_tqdm: false")
    .replace("load_best_model_at_end: false", "load_best_model_at_end: true")
    .replace("attention_type: dot}", "attention_type: dot, share_embeddings: true, tie_word_embeddings: true}")
)


def test_stdout_carries_only_the_metrics_and_the_log_goes_to_stderr_and_train_log(data, tmp_path):
    (tmp_path / "recipe.yaml").write_text(QUIET_RECIPE)
    args = translation_args(data, tmp_path / "out", "--test", str(data / "test.jsonl"))
    args[args.index("--recipe") + 1] = str(tmp_path / "recipe.yaml")
    command = [sys.executable, "-m", "rnn_seq2seq_hf.cli", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads(result.stdout)) == {"bleu", "bleu_lowercase", "chrf", "exact_match", "split"}
    assert result.stdout.startswith("{")  # nothing before it (the tokenizers trainer's progress wrote newlines)
    assert "'loss'" in result.stderr and "translating" in result.stderr  # Trainer's log and the progress bars
    log = (tmp_path / "out" / "train.log").read_text()
    assert "step 2: {'loss'" in log and "saved" in log
    # the best checkpoint of a tied model loads back without a warning about the (deliberately unsaved) tied copy
    assert "missing keys" not in result.stderr and "missing keys" not in log


def test_validation_fraction_too_small_is_one_line(data, tmp_path, capsys):
    assert main(lm_args(data, tmp_path / "out")[:-1] + ["0.001"]) == 2
    assert "--validation-fraction 0.001 of 30 lines leaves no validation line" in one_error_line(capsys)


def test_a_missing_split_names_the_splits_there_are(tmp_path, capsys):
    folder = tmp_path / "dataset"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"translation": {"de": s, "en": t}}) + "\n" for s, t in PAIRS[:4])
        )
    args = ["train-translation", "--recipe", "demo_dates", "--output-dir", str(tmp_path / "out"),
            "--dataset", str(folder), "--source-lang", "de", "--target-lang", "en"]  # fmt: skip
    assert main(args) == 2
    assert "has no split 'validation'; its splits are: train, test" in one_error_line(capsys)


def test_a_time_limit_ends_training_with_its_evaluation_and_best_checkpoint(data, tmp_path, capsys):
    recipe = QUIET_RECIPE.replace("max_steps: 6", "max_steps: 10000") + "time_limit_minutes: 0.0001\n"
    (tmp_path / "recipe.yaml").write_text(recipe)
    args = translation_args(data, tmp_path / "out")
    args[args.index("--recipe") + 1] = str(tmp_path / "recipe.yaml")
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] < 100  # stopped long before max_steps
    assert "time limit of" in (tmp_path / "out" / "train.log").read_text()


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_train_lm_with_stateful_windows_runs_truncated_bptt(data, tmp_path, monkeypatch, engine):
    """`data.stateful: true`: train-lm trains through tbptt.py (state carried across windows), on both engines."""
    import rnn_seq2seq_hf.tbptt as tbptt

    calls = []
    real = tbptt.fit_language_model_tbptt
    monkeypatch.setattr(tbptt, "fit_language_model_tbptt", lambda *a, **k: calls.append(k["engine"]) or real(*a, **k))
    (data / "lm.yaml").write_text(LM_RECIPE.replace("data: {block_size: 8}", "data: {block_size: 8, stateful: true}"))
    assert main(lm_args(data, tmp_path / "out", "--engine", engine)) == 0
    assert calls == [engine]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation_perplexity"] > 1 and metrics["optimizer_steps"] == 4
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").config.cell_type == "gru"
