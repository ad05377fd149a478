"""Checkpoint averaging: the averaged weights are the element-wise mean (computed here by hand), tied weights stay
tied, and the folders written by `rnn-seq2seq average-checkpoints` and by `average_last_checkpoints: N` at the end of
training load with `AutoModelForSeq2SeqLM`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from helpers import make_seq2seq
from rnn_seq2seq_hf.averaging import average_checkpoints, complete_checkpoints, load_averaged_weights
from rnn_seq2seq_hf.cli import main

PAIRS = [
    ("ein hund läuft", "a dog runs"),
    ("zwei katzen schlafen", "two cats sleep"),
    ("ein mann liest", "a man reads"),
]
RECIPE = """
task: translation
tokenizer: {kind: bpe, vocab_size: 60}
model: {embedding_size: 16, hidden_size: 16, encoder_layers: 1, decoder_layers: 1, attention_type: dot,
        share_embeddings: true, tie_word_embeddings: true}
training: {max_steps: 9, per_device_train_batch_size: 4, learning_rate: 0.05, logging_steps: 3, eval_strategy: steps,
           eval_steps: 3, save_total_limit: 5, report_to: [], disable_tqdm: true}
generation: {num_beams: 1, max_new_tokens: 6}
"""


def fake_checkpoint(folder, weights: dict) -> None:
    folder.mkdir(parents=True)
    save_file(weights, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text("{}")


def test_the_average_is_the_element_wise_mean(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weights = [
        {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(3)
    ]
    for step, values in zip((10, 20, 30), weights):
        fake_checkpoint(tmp_path / f"checkpoint-{step}", values)
    (tmp_path / "checkpoint-40").mkdir()  # incomplete: no state file, no weights
    folders = complete_checkpoints(tmp_path)
    assert [f.name for f in folders] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    averaged = average_checkpoints(folders)
    for name in ("a", "b"):
        by_hand = (weights[0][name].double() + weights[1][name].double() + weights[2][name].double()) / 3
        torch.testing.assert_close(averaged[name], by_hand.float(), rtol=0, atol=1e-7)
        assert averaged[name].dtype == torch.float32


def test_checkpoints_of_different_models_are_refused(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-1", {"a": torch.zeros(2)})
    fake_checkpoint(tmp_path / "checkpoint-2", {"a": torch.zeros(3)})
    fake_checkpoint(tmp_path / "checkpoint-3", {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tensor 'a' has shape \(3,\)"):
        average_checkpoints([tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"])
    with pytest.raises(ValueError, match="holds other tensors"):
        average_checkpoints([tmp_path / "checkpoint-1", tmp_path / "checkpoint-3"])


def test_tied_weights_stay_tied_after_averaging(tmp_path):
    models = [make_seq2seq(seed=seed, share_embeddings=True, tie_word_embeddings=True) for seed in (1, 2)]
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"checkpoint-{index}")
        (tmp_path / f"checkpoint-{index}" / "trainer_state.json").write_text("{}")
    stored = load_file(tmp_path / "checkpoint-0" / "model.safetensors")
    target = make_seq2seq(seed=3, share_embeddings=True, tie_word_embeddings=True)
    load_averaged_weights(target, complete_checkpoints(tmp_path))
    assert target.get_output_embeddings().weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    for name, parameter in target.named_parameters():
        if name in stored:
            by_hand = (models[0].state_dict()[name].double() + models[1].state_dict()[name].double()) / 2
            torch.testing.assert_close(parameter.detach(), by_hand.float(), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("averaging")
    (root / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS * 8))
    (root / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def train(data, output, *extra):
    args = ["train-translation", "--recipe", str(data / "recipe.yaml"), "--output-dir", str(output),
            "--train", str(data / "train.tsv"), "--validation", str(data / "valid.tsv"), *extra]  # fmt: skip
    assert main(args) == 0


def by_hand_mean(folders) -> dict:
    loaded = [load_file(folder / "model.safetensors") for folder in folders]
    return {name: sum(weights[name].double() for weights in loaded) / len(loaded) for name in loaded[0]}


def test_average_checkpoints_command_writes_a_model_folder_that_loads(data, tmp_path, capsys):
    train(data, tmp_path / "run")
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    capsys.readouterr()
    assert main(["average-checkpoints", "--last", "2", "--run-dir", str(tmp_path / "run"),
                 "--output-dir", str(tmp_path / "averaged")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["averaged"] == [str(c) for c in checkpoints[1:]]
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "averaged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "averaged")
    expected = by_hand_mean(checkpoints[1:])
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value.float(), rtol=0, atol=1e-7, msg=name)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.generation_config.max_new_tokens == 6 and model.config.use_cache
    assert len(tokenizer) == model.config.vocab_size
    with torch.no_grad():  # it translates
        model.generate(**tokenizer(["ein hund läuft"], return_tensors="pt"))

    assert main(["average-checkpoints", "--checkpoints", str(checkpoints[0]), str(checkpoints[2]),
                 "--output-dir", str(tmp_path / "first-and-last")]) == 0  # fmt: skip
    state = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "first-and-last").state_dict()
    for name, value in by_hand_mean([checkpoints[0], checkpoints[2]]).items():
        torch.testing.assert_close(state[name], value.float(), rtol=0, atol=1e-7, msg=name)


def test_average_checkpoints_command_errors_are_one_line(data, tmp_path, capsys):
    assert main(["average-checkpoints", "--last", "2", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--last N needs --run-dir" in capsys.readouterr().err
    assert main(["average-checkpoints", "--last", "3", "--run-dir", str(tmp_path), "--output-dir", "x"]) == 2
    assert "3 complete checkpoints needed, found 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_average_last_checkpoints_at_the_end_of_training(data, tmp_path, engine):
    extra = ["--set", "average_last_checkpoints=3"]
    if engine == "accelerate":
        extra += ["--engine", "accelerate", "--set", "training.save_steps=3"]
    train(data, tmp_path / "run", *extra)
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "model")
    state = model.state_dict()
    for name, value in by_hand_mean(checkpoints).items():
        torch.testing.assert_close(state[name], value.float(), rtol=0, atol=1e-7, msg=name)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "| checkpoints averaged | 3 |" in card
