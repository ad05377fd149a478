"""`rnn-seq2seq translate`, `evaluate` and `score` as a user runs them: streaming, files, n-best lists, scores,
alignments, token batching, ensembles, and what they refuse to load (remote code, pickles)."""

import io
import json
import os
import re
import select
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from helpers import make_seq2seq
from rnn_seq2seq_hf.cli import main
from rnn_seq2seq_hf.inference import translate, translate_hypotheses
from rnn_seq2seq_hf.tokenization import train_tokenizer

WORDS = "a b c d e f g h i j k l m n o p q r s"
LINES = ["a b c d", "e f", "", "g h i j k l", "m"]


def console_command() -> list[str]:
    """The installed console script (what a user types), or the module where it is not installed."""
    script = shutil.which("rnn-seq2seq")
    return [script] if script else [sys.executable, "-m", "rnn_seq2seq_hf.cli"]


def save_model(folder, seed=0, words=WORDS, max_new_tokens=6, **overrides):
    tokenizer = train_tokenizer([words], kind="word", vocab_size=None)
    model = make_seq2seq(seed=seed, vocab_size=len(tokenizer), **overrides)
    with torch.no_grad():  # let outputs end now and then, as a trained model's do
        model.lm_head.linear.bias[model.config.eos_token_id] += 3.0
    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.num_beams = 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "second", seed=1, cell_type="gru", attention_type="dot")


def loaded(model_dir):
    return AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def run_with_stdin(monkeypatch, capsys, args, data: bytes):
    """main() in this process with `data` on stdin (not a terminal); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line]


# --- what may be loaded ------------------------------------------------------------------------------------------


def booby_trapped_copy(model_dir, tmp_path, model_type):
    """The model folder plus a Python file that its config (and tokenizer config) name in `auto_map`; importing
    that file creates `tmp_path / "MARKER"`."""
    folder = tmp_path / f"trap-{model_type}"
    shutil.copytree(model_dir, folder)
    marker = tmp_path / "MARKER"
    (folder / "trap.py").write_text(
        f"open({str(marker)!r}, 'w').write('the folder ran code')\n"
        "from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast\n"
        f"class TrapConfig(PretrainedConfig):\n    model_type = {model_type!r}\n"
        "class TrapModel(PreTrainedModel):\n    config_class = TrapConfig\n"
        "    def __init__(self, config):\n        raise ValueError('the trap model cannot be built')\n"
        "class TrapTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "trap.TrapConfig", "AutoModelForSeq2SeqLM": "trap.TrapModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["trap.TrapTokenizer", "trap.TrapTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(folder), marker


def test_translate_never_runs_the_folders_code_and_never_asks(model_dir, tmp_path):
    """Before: transformers asked "Do you wish to run the custom code? [y/N]" on stdin, the text being translated,
    so an input line "y" ran the folder's code and the question landed in the output."""
    folder, marker = booby_trapped_copy(model_dir, tmp_path, "trap_model")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [*console_command(), "translate", "--model", folder],
        input="y\na b c\n", capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert not marker.exists()
    assert result.stdout == ""  # no prompt text, no translation of "y"
    assert "Do you wish" not in result.stderr and "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert f"--model {folder}: this model's config asks to run Python code" in line and "--trust-remote-code" in line


def test_a_known_model_type_loads_with_the_installed_classes_and_runs_nothing(
    model_dir, tmp_path, monkeypatch, capsys
):
    folder, marker = booby_trapped_copy(model_dir, tmp_path, "rnn_seq2seq")
    code, out, _ = run_with_stdin(monkeypatch, capsys, ["translate", "--model", folder], b"y\na b c\n")
    assert code == 0 and not marker.exists()
    model, tokenizer = loaded(model_dir)
    assert out.splitlines() == translate(model, tokenizer, ["y", "a b c"])


def test_trust_remote_code_is_passed_on_when_the_user_asks(model_dir, tmp_path, monkeypatch, capsys):
    folder, marker = booby_trapped_copy(model_dir, tmp_path, "trap_model")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    code, out, err = run_with_stdin(
        monkeypatch, capsys, ["translate", "--model", folder, "--trust-remote-code"], b"a\n"
    )
    assert marker.exists()  # the user allowed it
    assert code == 2 and "the trap model cannot be built" in err


def test_a_folder_with_only_pytorch_model_bin_is_refused(model_dir, tmp_path, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["evaluate", "--model", str(folder), "--source", __file__, "--reference", __file__]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--model {folder}: only pytorch_model.bin here, a pickle file" in line and "safetensors" in line


# --- input and output --------------------------------------------------------------------------------------------


def test_bad_bytes_on_stdin_name_the_line_after_translating_the_lines_before(model_dir, monkeypatch, capsys):
    code, out, err = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir], b"a b\nc d\n\xff\xfe\n")
    assert code == 2
    model, tokenizer = loaded(model_dir)
    assert out.splitlines() == translate(model, tokenizer, ["a b", "c d"])
    (line,) = error_lines(err)
    assert line.startswith("rnn-seq2seq translate: error: stdin:3: not valid UTF-8")


def test_a_byte_order_mark_is_dropped(model_dir, monkeypatch, capsys):
    plain = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir], b"a b c\nd\n")
    marked = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir], b"\xef\xbb\xbfa b c\nd\n")
    assert marked == plain and plain[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["translate", "--device", "bogus"], "--device bogus: expected auto, cpu, cuda, cuda:N or mps"),
        (["translate", "--output", "/no/such/folder/out.txt"], "--output /no/such/folder/out.txt: the folder"),
        (["translate", "--input", "/no/such/input.txt"], "--input /no/such/input.txt: no such file"),
        (["translate", "--n-best", "3", "--num-beams", "2"], "--n-best 3 needs --num-beams >= 3, got 2"),
        (["score", "--source", __file__, "--target", "/no/such/target"], "/no/such/target: no such file"),
    ],
)
def test_bad_arguments_are_one_line(model_dir, monkeypatch, capsys, args, message):
    code, _, err = run_with_stdin(monkeypatch, capsys, [args[0], "--model", model_dir, *args[1:]], b"a\n")
    assert code == 2
    (line,) = error_lines(err)
    assert message in line


def test_evaluate_checks_its_output_folder_before_translating(model_dir, tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("translated before checking --output")

    monkeypatch.setattr("rnn_seq2seq_hf.inference.translate", must_not_run)
    (tmp_path / "src").write_text("a b\n")
    args = ["evaluate", "--model", model_dir, "--source", str(tmp_path / "src"), "--reference", str(tmp_path / "src")]
    assert main([*args, "--output", str(tmp_path / "missing" / "hyp.txt")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--output {tmp_path / 'missing' / 'hyp.txt'}: the folder {tmp_path / 'missing'} does not exist" in line


def read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output line within {timeout} s"
    return stream.readline().decode()


def test_translate_streams_each_line_before_the_input_ends(model_dir):
    """Before: nothing came out until stdin closed, so `translate` could not sit in a pipe or answer a person."""
    process = subprocess.Popen(
        [*console_command(), "translate", "--model", model_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        model, tokenizer = loaded(model_dir)
        expected = translate(model, tokenizer, ["a b c", "d e"])
        process.stdin.write(b"a b c\n")
        process.stdin.flush()
        assert read_line(process.stdout, 300) == expected[0] + "\n"  # stdin is still open
        process.stdin.write(b"d e\n")
        process.stdin.close()
        assert read_line(process.stdout, 300) == expected[1] + "\n"
        assert process.wait(timeout=300) == 0
    finally:
        process.kill()
        process.wait()


def test_a_reader_that_goes_away_stops_translate_quietly(model_dir):
    """`rnn-seq2seq translate ... | head -1`: before, a BrokenPipeError line and "Exception ignored" on stderr."""
    process = subprocess.Popen(
        [*console_command(), "translate", "--model", model_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        process.stdin.write(b"a b c\n")
        process.stdin.flush()
        assert read_line(process.stdout, 300)  # the first translation came out; now the reader leaves
        process.stdout.close()
        process.stdin.write(b"d e\n" * 5000)  # more lines than any pipe buffer holds translated
        process.stdin.close()
        assert process.wait(timeout=300) == 141
        stderr = process.stderr.read().decode()  # the progress bar only (long piped input gets one)
        assert not re.search("error|exception|traceback", stderr, re.IGNORECASE), stderr
    finally:
        process.kill()
        process.wait()


def test_translate_at_a_terminal_answers_each_line(model_dir):
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*console_command(), "translate", "--model", model_dir],
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(terminal)
    try:
        model, tokenizer = loaded(model_dir)
        os.write(controller, b"g h i\n")
        assert read_line(process.stdout, 300) == translate(model, tokenizer, ["g h i"])[0] + "\n"
        os.write(controller, b"\x04")  # Ctrl-D
        assert process.wait(timeout=300) == 0
        assert "type a sentence and press Enter" in process.stderr.read().decode()
    finally:
        process.kill()
        process.wait()
        os.close(controller)


def test_input_and_output_files_with_a_progress_bar(model_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in LINES))
    args = ["translate", "--model", model_dir, "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o")]
    assert main(args) == 0
    captured = capsys.readouterr()
    model, tokenizer = loaded(model_dir)
    assert (tmp_path / "o").read_text().split("\n") == [*translate(model, tokenizer, LINES), ""]
    assert captured.out == "" and "translating" in captured.err and "5/5" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "o"]  # no temporary file left


def test_long_piped_input_gets_a_progress_bar_short_input_does_not(model_dir, monkeypatch, capsys):
    _, out, err = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir], b"a b\n" * 3)
    assert err == "" and len(out.splitlines()) == 3
    _, out, err = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir], b"a b\n" * 320)
    assert "translating" in err and len(out.splitlines()) == 320


# --- n-best, scores, alignments, token batching, ensembles, forced decoding ---------------------------------------


def test_n_best_lists_with_scores_and_alignments(model_dir, monkeypatch, capsys):
    data = "".join(line + "\n" for line in LINES).encode()
    args = ["translate", "--model", model_dir, "--n-best", "3", "--num-beams", "3", "--print-alignment"]
    code, out, _ = run_with_stdin(monkeypatch, capsys, args, data)
    assert code == 0
    model, tokenizer = loaded(model_dir)
    expected = translate_hypotheses(
        model, tokenizer, LINES, n_best=3, num_beams=3, with_scores=True, with_alignment=True
    )
    rows = [line.split("\t") for line in out.split("\n")[:-1]]
    assert len(rows) == 3 * len(LINES) and all(len(row) == 4 for row in rows)
    assert [int(row[0]) for row in rows] == [i for i in range(len(LINES)) for _ in range(3)]
    for row, hypothesis in zip(rows, [h for hypotheses in expected for h in hypotheses]):
        if not hypothesis.text and hypothesis.score is None:  # an empty input line: empty fields
            assert row[1:] == ["", "", ""]
            continue
        assert float(row[1]) == pytest.approx(hypothesis.score, abs=1e-5)
        assert row[2] == hypothesis.text
        pairs = [tuple(map(int, pair.split("-"))) for pair in row[3].split()]
        assert pairs == hypothesis.alignment.hard(tokenizer.eos_token)
        assert re.fullmatch(r"(\d+-\d+( \d+-\d+)*)?", row[3])
    scores = [float(row[1]) for row in rows[:3]]
    assert scores == sorted(scores, reverse=True)  # best first

    code, out, _ = run_with_stdin(
        monkeypatch,
        capsys,
        ["translate", "--model", model_dir, "--print-scores", "--print-alignment", "json"],
        b"a b\n",
    )
    score, text, alignment = out.rstrip("\n").split("\t")
    best = translate_hypotheses(model, tokenizer, ["a b"], with_scores=True, with_alignment=True)[0][0]
    assert float(score) == pytest.approx(best.score, abs=1e-5) and text == best.text
    assert json.loads(alignment)["target_tokens"] == best.alignment.target_tokens
    torch.testing.assert_close(torch.tensor(json.loads(alignment)["weights"]), torch.tensor(best.alignment.weights))


def test_max_tokens_batches_by_tokens_without_changing_the_output(model_dir, monkeypatch, capsys):
    data = "".join(line + "\n" for line in LINES * 3).encode()
    default = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir], data)
    by_tokens = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir, "--max-tokens", "10"], data)
    assert by_tokens == default and default[0] == 0


def test_an_ensemble_of_the_same_model_twice_translates_like_the_model(model_dir, monkeypatch, capsys):
    data = "".join(line + "\n" for line in LINES).encode()
    alone = run_with_stdin(monkeypatch, capsys, ["translate", "--model", model_dir, "--print-scores"], data)
    twice = run_with_stdin(
        monkeypatch, capsys, ["translate", "--model", model_dir, "--model", model_dir, "--print-scores"], data
    )
    assert twice == alone and alone[0] == 0


def test_an_ensemble_of_two_models_is_their_average(model_dir, second_model_dir, monkeypatch, capsys):
    from rnn_seq2seq_hf.ensemble import Seq2SeqEnsemble

    args = ["translate", "--model", model_dir, "--model", second_model_dir, "--print-scores", "--num-beams", "3"]
    code, out, _ = run_with_stdin(monkeypatch, capsys, args, b"a b c d\ne f g\n")
    assert code == 0
    (first, tokenizer), (second, _) = loaded(model_dir), loaded(second_model_dir)
    expected = translate_hypotheses(
        Seq2SeqEnsemble([first, second]), tokenizer, ["a b c d", "e f g"], with_scores=True, num_beams=3
    )
    assert out.splitlines() == [f"{best.score:.6f}\t{best.text}" for best, *_ in expected]


def test_ensemble_members_with_another_vocabulary_are_refused(model_dir, tmp_path, capsys):
    other = save_model(tmp_path / "other", words="t u v w x y z")
    assert main(["translate", "--model", model_dir, "--model", other]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--model {other}: vocab_size is 11 but --model {model_dir} has 23" in line
    shuffled = tmp_path / "shuffled"  # same size, two tokens swapped
    shutil.copytree(model_dir, shuffled)
    tokenizer_json = json.loads((shuffled / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    vocab["▁a"], vocab["▁b"] = vocab["▁b"], vocab["▁a"]
    (shuffled / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    assert main(["translate", "--model", model_dir, "--model", str(shuffled)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--model {shuffled}: its tokenizer's vocabulary (23 tokens) differs" in line


def test_score_prints_the_teacher_forced_log_probability_of_each_pair(model_dir, tmp_path, capsys):
    sources, targets = ["a b c", "d e f g", "h"], ["i j", "", "k l m"]
    (tmp_path / "src").write_text("".join(s + "\n" for s in sources))
    (tmp_path / "tgt").write_text("".join(t + "\n" for t in targets))
    args = ["score", "--model", model_dir, "--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt")]
    assert main([*args, "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    model, tokenizer = loaded(model_dir)
    rows = [line.split("\t") for line in captured.out.splitlines()]
    assert len(rows) == 3
    total_log_prob, total_tokens = 0.0, 0
    for (log_prob, tokens, perplexity), source, target in zip(rows, sources, targets):
        labels = tokenizer([target])["input_ids"][0]
        decoder_inputs = torch.tensor([[model.config.decoder_start_token_id, *labels[:-1]]])
        with torch.no_grad():
            logits = model(**tokenizer([source], return_tensors="pt"), decoder_input_ids=decoder_inputs).logits[0]
        by_hand = sum(logits[t].log_softmax(-1)[token].item() for t, token in enumerate(labels))
        assert float(log_prob) == pytest.approx(by_hand, abs=1e-4) and int(tokens) == len(labels)
        assert float(perplexity) == pytest.approx(torch.tensor(-by_hand / len(labels)).exp().item(), rel=1e-4)
        total_log_prob, total_tokens = total_log_prob + by_hand, total_tokens + len(labels)
    assert f"{total_tokens} target tokens, log-probability {total_log_prob:.4f}" in captured.err
