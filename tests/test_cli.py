"""Every `rnn-seq2seq` subcommand end to end on tiny data (a few training steps), and its error handling."""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import rnn_seq2seq_hf
from helpers import tiny_lm_config
from rnn_seq2seq_hf import RNNLMForCausalLM, RNNSeq2SeqConfig
from rnn_seq2seq_hf.cli import build_parser, main
from rnn_seq2seq_hf.tokenization import special_token_ids, train_tokenizer
from rnn_seq2seq_hf.training import _lm_samples

PAIRS = [
    ("ein hund läuft", "a dog runs"),
    ("zwei katzen schlafen", "two cats sleep"),
    ("ein mann liest", "a man reads"),
    ("eine frau singt", "a woman sings"),
] * 8
LM_TEXT = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 10

TINY_TRANSLATION_RECIPE = """
name: tiny-translation
task: translation
description: A tiny test recipe.
tokenizer: {kind: bpe, vocab_size: 60}
model: {embedding_size: 16, hidden_size: 16, encoder_layers: 1, decoder_layers: 1, attention_type: dot}
training: {max_steps: 6, per_device_train_batch_size: 8, learning_rate: 0.01, logging_steps: 2, eval_strategy: steps,
           eval_steps: 3, save_steps: 3, report_to: [], disable_tqdm: true}
generation: {num_beams: 2, max_new_tokens: 8}
data: {max_source_length: 20, max_target_length: 20}
early_stopping_patience: 2
"""
TINY_LM_RECIPE = """
name: tiny-lm
task: language_modeling
tokenizer: {kind: KIND, vocab_size: null}
model: {embedding_size: 16, hidden_size: 16, num_hidden_layers: 1, cell_type: gru}
training: {max_steps: 6, per_device_train_batch_size: 4, learning_rate: 0.01, logging_steps: 2, report_to: [],
           disable_tqdm: true}
data: {block_size: 8}
evaluation: {batch_size: 2, block_size: 5}
sample: {prompt: "the", max_new_tokens: 5, num_samples: 2}
"""


def run_cli(*args, stdin=None, env=None):
    """The installed console script in a fresh process (what a user types); `env` adds environment variables."""
    command = [
        shutil.which("rnn-seq2seq") or sys.executable,
        *([] if shutil.which("rnn-seq2seq") else ["-m", "rnn_seq2seq_hf.cli"]),
    ]
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def translation_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation")
    (root / "train.de").write_text("".join(s + "\n" for s, _ in PAIRS))
    (root / "train.en").write_text("".join(t + "\n" for _, t in PAIRS))
    (root / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS[:4]))
    (root / "test.jsonl").write_text("".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in PAIRS[:4]))
    (root / "recipe.yaml").write_text(TINY_TRANSLATION_RECIPE)
    code = main(
        [
            "train-translation",
            "--recipe", str(root / "recipe.yaml"),
            "--output-dir", str(root / "out"),
            "--train", f"{root / 'train.de'},{root / 'train.en'}",
            "--validation", str(root / "valid.tsv"),
            "--test", str(root / "test.jsonl"),
            "--source-lang", "de",
            "--target-lang", "en",
            "--set", "training.learning_rate=0.02",
        ]
    )  # fmt: skip
    assert code == 0
    return root


def test_train_translation_writes_a_model_that_reloads(translation_model):
    out = translation_model / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bleu", "bleu_lowercase", "chrf", "exact_match"} <= metrics.keys() and metrics["split"] == "test"
    for name in ("loss.png", "attention.png", "test_translations.txt", "model/README.md", "model/model.safetensors"):
        assert (out / name).is_file(), name
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.attention_type == "dot" and model.generation_config.num_beams == 2
    # Seq2SeqTrainer's evaluation filled in max_length=20 in place; the saved config must stay as configured, or
    # every generate() warns that max_length and max_new_tokens are both set.
    assert model.generation_config.max_new_tokens == 8 and model.generation_config.max_length is None
    assert model.config.vocab_size == len(tokenizer) and model.config.use_cache
    assert (out / "test_translations.txt").read_text().count("\n") == 4


def test_translate_reads_stdin_and_keeps_order_and_empty_lines(translation_model):
    model_dir = str(translation_model / "out" / "model")
    result = run_cli("translate", "--model", model_dir, "--num-beams", "3", "--batch-size", "2",
                     stdin="ein hund läuft\n\nzwei katzen schlafen\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = model.generate(**tokenizer(["zwei katzen schlafen"], return_tensors="pt"), num_beams=3)
    assert lines[2] == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_evaluate_prints_bleu_and_chrf(translation_model, capsys, tmp_path):
    (tmp_path / "src").write_text("".join(s + "\n" for s, _ in PAIRS[:4]))
    (tmp_path / "ref").write_text("".join(t + "\n" for _, t in PAIRS[:4]))
    code = main(["evaluate", "--model", str(translation_model / "out" / "model"), "--source", str(tmp_path / "src"),
                 "--reference", str(tmp_path / "ref"), "--output", str(tmp_path / "hyp")])  # fmt: skip
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["sentences"] == 4 and {"bleu", "chrf", "exact_match"} <= scores.keys()
    assert len((tmp_path / "hyp").read_text().splitlines()) == 4


@pytest.mark.parametrize("kind", ["word", "char"])
def test_train_lm_then_evaluate_lm_and_generate(tmp_path, capsys, kind):
    (tmp_path / "recipe.yaml").write_text(TINY_LM_RECIPE.replace("KIND", kind))
    (tmp_path / "train.txt").write_text("\n".join(LM_TEXT) + "\n")
    (tmp_path / "test.txt").write_text("the cat sat on the log\n")
    code = main(["train-lm", "--recipe", str(tmp_path / "recipe.yaml"), "--output-dir", str(tmp_path / "out"),
                 "--train", str(tmp_path / "train.txt"), "--validation-fraction", "0.2",
                 "--test", str(tmp_path / "test.txt")])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test_perplexity"] > 1 and metrics["tokenizer"] == kind
    assert (tmp_path / "out" / "samples.txt").read_text().strip()
    model_dir = tmp_path / "out" / "model"
    assert isinstance(AutoModelForCausalLM.from_pretrained(model_dir), torch.nn.Module)
    card = ModelCard.load(model_dir / "README.md")
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values["perplexity"] == pytest.approx(metrics["test_perplexity"], abs=1e-4)
    assert card.data.pipeline_tag == "text-generation" and ("bits_per_character" in values) == (kind == "char")
    capsys.readouterr()

    assert main(["evaluate-lm", "--model", str(model_dir), "--text", str(tmp_path / "test.txt"),
                 "--batch-size", "1"]) == 0  # fmt: skip
    scores = json.loads(capsys.readouterr().out)
    assert scores["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=0.05)

    assert main(["generate", "--model", str(model_dir), "--prompt", "the", "--max-new-tokens", "4", "--do-sample",
                 "--seed", "1", "--num-return-sequences", "2"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("---") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no max_length warning without --max-new-tokens
        assert main(["generate", "--model", str(model_dir), "--prompt", "the"]) == 0


def test_presets_lists_the_shipped_recipes(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name in ("demo_dates", "multi30k_de_en_cpu", "multi30k_en_de_cpu", "ptb_word_cpu", "shakespeare_char_cpu"):
        assert name in listed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["translate", "--model", "/no/such/dir"], "no such folder"),
        (["evaluate", "--model", "x", "--source", "/no/src", "--reference", "/no/ref"], "/no/src: no such file"),
        (
            ["train-translation", "--recipe", "nope", "--output-dir", "o", "--train", "a,b", "--validation", "c"],
            "unknown preset 'nope'",
        ),
        (["train-lm", "--recipe", "demo_dates", "--output-dir", "o", "--train", "t"], "is a translation recipe"),
        (["translate", "--model", ".", "--num-beams", "0"], "argument --num-beams: must be an integer >= 1, got '0'"),
        (["demo", "--output-dir", "o", "--set", "nonsense"], "must look like section.key=value"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    errors = capsys.readouterr().err
    assert "Traceback" not in errors and message in errors
    assert len([line for line in errors.splitlines() if "error" in line]) == 1


def test_installed_command_reports_a_bad_path_in_one_line():
    result = run_cli("evaluate-lm", "--model", "./missing-model", "--text", "x.txt")
    assert result.returncode == 2
    assert result.stderr.strip() == "rnn-seq2seq evaluate-lm: error: x.txt: no such file"


def test_every_subcommand_has_help_and_the_common_options(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "train-translation", "train-lm", "translate", "evaluate", "score", "evaluate-lm", "generate",
            "push", "presets"} <= commands.keys()  # fmt: skip
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: rnn-seq2seq {command}" in text
        assert "--threads THREADS" in text and "--verbose" in text, command


def test_threads_sets_the_torch_thread_count_for_the_command(monkeypatch):
    seen = []
    monkeypatch.setattr("rnn_seq2seq_hf.cli.cmd_presets", lambda args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    assert main(["presets", "--threads", "3"]) == 0
    assert main(["presets"]) == 0
    assert seen == [3, before] and torch.get_num_threads() == before  # restored after the command


@pytest.mark.parametrize(("load", "hinted"), [(3.0, True), (0.1, False)])
def test_the_demo_hints_at_threads_on_a_busy_machine(tmp_path, monkeypatch, capsys, load, hinted):
    monkeypatch.setattr("rnn_seq2seq_hf.demo.run_demo", lambda *args, **kwargs: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    real_get_num_threads = torch.get_num_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    errors = capsys.readouterr().err
    assert ("note: this machine is busy (load 3.0 on 4 cores)" in errors and "try --threads 1" in errors) == hinted
    assert len(errors.splitlines()) == int(hinted)
    monkeypatch.setattr(torch, "get_num_threads", real_get_num_threads)  # --threads sets and restores the real one
    assert main(["demo", "--output-dir", str(tmp_path), "--threads", "1"]) == 0  # the user chose: no hint
    assert capsys.readouterr().err == ""


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"rnn-seq2seq {rnn_seq2seq_hf.__version__} (torch {torch.__version__}")


@pytest.mark.parametrize(
    "args", [["translate", "--model", "m", "--bogus"], ["translate", "--model", "m", "--num-beams", "0"], ["score"]]
)
def test_argparse_errors_show_the_subcommands_usage(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    errors = capsys.readouterr().err
    assert errors.startswith(f"usage: rnn-seq2seq {args[0]} ")
    assert len([line for line in errors.splitlines() if "error" in line]) == 1


def closed_port_url() -> str:
    """An address where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_model_that_is_neither_a_folder_nor_a_reachable_hub_id_fails_fast_in_one_line():
    """Before: 28 s of retries on stderr, then a message that said nothing about a local folder."""
    result = run_cli("translate", "--model", "someone/no-such-model", stdin="a b\n",
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed_port_url()})  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr  # one request, no retries
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rnn-seq2seq translate: error: --model someone/no-such-model: no such folder, and the Hub")
    assert "cannot be reached" in line


def test_an_unknown_hub_id_in_offline_mode_says_so(capsys):
    assert main(["evaluate-lm", "--model", "someone/no-such-model", "--text", __file__]) == 2
    errors = capsys.readouterr().err.strip()
    assert errors == (
        "rnn-seq2seq evaluate-lm: error: --model someone/no-such-model: no such folder, and HF_HUB_OFFLINE is set "
        "and the Hub cache has no model 'someone/no-such-model'"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HF_TOKEN": ""}, "cannot push: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)"),
        ({"HF_TOKEN": "a-token"}, "cannot reach the Hub at http://127.0.0.1:"),
    ],
)
def test_push_without_login_or_network_is_one_line(translation_model, tmp_path, env, message):
    """Before: a 71-line traceback."""
    environment = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed_port_url(), "HF_HOME": str(tmp_path), **env}
    result = run_cli("push", "--model", str(translation_model / "out" / "model"), "--repo-id", "me/model",
                     env=environment)  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"rnn-seq2seq push: error: {message}")


def test_push_in_offline_mode_is_one_line(translation_model, capsys):
    assert main(["push", "--model", str(translation_model / "out" / "model"), "--repo-id", "me/model"]) == 2
    assert capsys.readouterr().err == (
        "rnn-seq2seq push: error: cannot push: HF_HUB_OFFLINE is set (unset it to reach the Hub)\n"
    )


def test_quiet_by_default_verbose_on_request(tmp_path):
    """A model without a length limit in its generation config made generate() warn about max_length on every
    call, and loading printed progress bars; stdout carries only the translations."""
    tokenizer = train_tokenizer(["a b c d e f g h"], kind="word", vocab_size=None)
    model = AutoModelForSeq2SeqLM.from_config(
        RNNSeq2SeqConfig(vocab_size=len(tokenizer), embedding_size=8, hidden_size=8, **special_token_ids(tokenizer))
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert model.generation_config.max_new_tokens is None and model.generation_config.max_length is None
    quiet = run_cli("translate", "--model", str(tmp_path / "model"), stdin="a b\n\nc\n")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert len(quiet.stdout.split("\n")) == 4 and quiet.stdout.split("\n")[1] == ""
    verbose = run_cli("translate", "--model", str(tmp_path / "model"), "--verbose", stdin="a b\n\nc\n")
    assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
    assert "loading" in verbose.stderr.lower()


def test_train_translation_with_the_accelerate_engine_checkpoints_and_resumes(translation_model, tmp_path):
    root = translation_model
    args = [
        "train-translation", "--recipe", str(root / "recipe.yaml"), "--output-dir", str(tmp_path / "out"),
        "--train", f"{root / 'train.de'},{root / 'train.en'}", "--validation", str(root / "valid.tsv"),
        "--engine", "accelerate", "--set", "training.save_steps=3",
    ]  # fmt: skip
    assert main(args) == 0
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and "bleu" in metrics
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out" / "model").config.attention_type == "dot"
    # a finished run is never overwritten silently
    assert main(args) == 2
    assert (tmp_path / "out" / "metrics.json").read_text() == json.dumps(metrics, indent=2) + "\n"
    # an interrupted run (no metrics yet) resumes from its final checkpoint: it only re-evaluates and re-saves
    (tmp_path / "out" / "metrics.json").unlink()
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bleu"] == metrics["bleu"]


def test_lm_samples_run_on_across_sentence_ends():
    """PTB ends many sentences with "... the company said </s>": samples of a stream LM must not stop there."""
    tokenizer = train_tokenizer(LM_TEXT, kind="word", vocab_size=None, padding_side="left", add_eos=False)
    config = tiny_lm_config(vocab_size=len(tokenizer), **special_token_ids(tokenizer))
    model = RNNLMForCausalLM(config).eval()
    with torch.no_grad():  # make the end of sentence by far the likeliest next token
        model.lm_head.linear.bias[tokenizer.eos_token_id] = 8.0
    samples = _lm_samples(model, tokenizer, {"prompt": "the cat", "max_new_tokens": 6, "num_samples": 2}, True)
    for sample in samples.split("\n---\n"):
        assert sample.startswith("the cat") and sample.count("\n") >= 3  # sentence ends became line breaks
