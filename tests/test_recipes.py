"""Recipes are checked before any work: unknown keys (with the nearest valid key), wrong types and ranges, and the
checks of the config, TrainingArguments and GenerationConfig the run will build, all as one-line errors."""

import os

import pytest
import yaml

from rnn_seq2seq_hf.cli import main
from rnn_seq2seq_hf.recipes import RecipeError, available_presets, load_recipe, recipe_yaml, validate_recipe
from rnn_seq2seq_hf.training import check_recipe, loop_arguments

LM_RECIPE = {
    "task": "language_modeling",
    "tokenizer": {"kind": "word", "vocab_size": None},
    "model": {"hidden_size": 16, "embedding_size": 16, "num_hidden_layers": 1},
    "training": {"max_steps": 4, "learning_rate": 0.01},
    "data": {"block_size": 8},
    "evaluation": {"batch_size": 2},
    "sample": {"prompt": "the"},
}


def with_value(recipe: dict, section: str, key: str, value) -> dict:
    changed = {name: dict(values) if isinstance(values, dict) else values for name, values in recipe.items()}
    changed.setdefault(section, {})[key] = value
    return changed


@pytest.mark.parametrize("name", available_presets())
@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_every_preset_passes_the_checks(name, engine):
    check_recipe(load_recipe(name), engine)


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("training", "learning_rat", "training.learning_rate"),
        ("model", "hiden_size", "model.hidden_size"),
        ("tokenizer", "vocab_sise", "tokenizer.vocab_size"),
        ("data", "blok_size", "data.block_size"),
        ("evaluation", "batchsize", "evaluation.batch_size"),
        ("sample", "temprature", "sample.temperature"),
    ],
)
def test_an_unknown_key_names_the_nearest_valid_one(section, key, suggestion):
    with pytest.raises(RecipeError, match=rf"unknown key `{section}.{key}`; did you mean `{suggestion}`\?"):
        validate_recipe(with_value(LM_RECIPE, section, key, 1))


def test_unknown_generation_keys_and_sections_of_the_other_task_are_refused():
    translation = load_recipe("demo_dates")
    with pytest.raises(RecipeError, match=r"unknown key `generation.num_beam`; did you mean `generation.num_beams`"):
        validate_recipe(with_value(translation, "generation", "num_beam", 2))
    with pytest.raises(RecipeError, match="section `sample` is not used by translation recipes"):
        validate_recipe(with_value(translation, "sample", "prompt", "x"))
    with pytest.raises(RecipeError, match="section `generation` is not used by language_modeling recipes"):
        validate_recipe(with_value(LM_RECIPE, "generation", "num_beams", 2))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("training", "max_steps", "abc", "`training.max_steps` must be an integer, got 'abc'"),
        ("training", "logging_steps", 0, "`training.logging_steps` must be > 0, got 0"),
        ("training", "per_device_train_batch_size", 0, "must be >= 1, got 0"),
        ("training", "learning_rate", "fast", "`training.learning_rate` must be a number, got 'fast'"),
        ("training", "label_smoothing_factor", 1.5, r"must be in \[0, 1\), got 1.5"),
        ("evaluation", "batch_size", 0, "`evaluation.batch_size` must be >= 1, got 0"),
        ("model", "hidden_size", "big", "`model.hidden_size` must be an integer, got 'big'"),
        ("model", "tie_word_embeddings", "yes", "`model.tie_word_embeddings` must be true or false"),
        ("model", "vocab_size", 10, "`model.vocab_size` comes from the tokenizer"),
        ("tokenizer", "kind", "wordpiece", "tokenizer `kind` must be one of"),
        ("data", "block_size", 0, "`data.block_size` must be >= 1, got 0"),
        ("sample", "temperature", 0, "`sample.temperature` must be > 0"),
    ],
)
def test_wrong_types_and_ranges_are_refused(section, key, value, message):
    with pytest.raises(RecipeError, match=message):
        check_recipe(with_value(LM_RECIPE, section, key, value))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.num_beams=0", "`generation.num_beams` must be >= 1, got 0"),
        ("data.test_pairs=0", "`data.test_pairs` must be >= 1, got 0"),
        ("generation.early_stopping=maybe", "`generation.early_stopping` must be true or false or one of 'never'"),
        ("model.cell_type=transformer", "recipe model: .*cell_type"),  # the config's own check, run up front
        ("training.eval_strategy=sometimes", "recipe training: .*sometimes"),  # TrainingArguments' own check
        ("training.lr_scheduler_type=bogus", "recipe training: .*bogus"),
        ("generation.temperature=0.5", "recipe generation: .*temperature"),  # set but unused without do_sample
        ("average_last_checkpoints=1", "`average_last_checkpoints` must be >= 2"),
        ("tokenizer.split_digits=sometimes", "`tokenizer.split_digits` must be"),
    ],
)
def test_values_used_only_after_training_are_checked_before_it(override, message):
    with pytest.raises(RecipeError, match=message):
        check_recipe(load_recipe("demo_dates", [override]))


def test_averaging_needs_checkpoints_kept():
    with pytest.raises(RecipeError, match="needs checkpoints; set training.save_strategy"):
        check_recipe(load_recipe("demo_dates", ["average_last_checkpoints=3"]))
    recipe = load_recipe("demo_dates", ["average_last_checkpoints=3", "training.save_strategy=steps",
                                        "training.save_steps=100", "training.save_total_limit=2"])  # fmt: skip
    with pytest.raises(
        RecipeError, match="save_total_limit` is 2, but `average_last_checkpoints: 3` needs at least 3"
    ):
        check_recipe(recipe)
    with pytest.raises(RecipeError, match="needs checkpoints; set training.save_strategy"):
        check_recipe(load_recipe("demo_dates", ["average_last_checkpoints=3"]), engine="accelerate")
    # without a save_strategy in the recipe, the Accelerate engine keeps one checkpoint per epoch, as Trainer does
    args = loop_arguments({"task": "translation", "training": {}, "average_last_checkpoints": 3}, "out")
    assert (args.save_strategy, args.save_total_limit) == ("epoch", 3)


def test_a_float_that_pyyaml_reads_as_a_string_is_converted():
    recipe = load_recipe("demo_dates", ["training.learning_rate=1e-3", "training.weight_decay=1E-2"])
    assert recipe["training"]["learning_rate"] == "1e-3"  # what PyYAML gives
    checked = check_recipe(recipe)
    assert checked["training"]["learning_rate"] == 0.001 and checked["training"]["weight_decay"] == 0.01
    file_recipe = yaml.safe_load("training: {learning_rate: 5e-4}")
    assert file_recipe["training"]["learning_rate"] == "5e-4"


def test_the_resolved_recipe_reads_back_as_the_same_recipe(tmp_path):
    recipe = check_recipe(load_recipe("demo_dates", ["training.max_steps=7"]))
    (tmp_path / "recipe.yaml").write_text(recipe_yaml(recipe))
    again = check_recipe(load_recipe(str(tmp_path / "recipe.yaml")))
    assert {k: v for k, v in again.items() if k != "source"} == {k: v for k, v in recipe.items() if k != "source"}
    assert recipe["source"] == "demo_dates" and again["source"] == "recipe.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.learning_rat=0.1", "unknown key `training.learning_rat`; did you mean `training.learning_rate`?"),
        ("trainin.max_steps=2", "unknown section `trainin`; did you mean `training`?"),
        ("training.max_steps=abc", "`training.max_steps` must be an integer, got 'abc'"),
    ],
)
@pytest.mark.parametrize("command", ["train-translation", "train-lm"])
def test_a_bad_set_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, override, message, command):
    # on a busy machine too: the threads hint comes only before real work (it made these errors two lines when the
    # test run itself loaded the machine)
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    recipe = "demo_dates" if command == "train-translation" else "ptb_word_cpu"
    args = [command, "--recipe", recipe, "--output-dir", str(tmp_path / "out"), "--set", override]
    args += ["--train", "a,b", "--validation", "c,d"] if command == "train-translation" else ["--train", "missing.txt"]
    assert main(args) == 2
    errors = capsys.readouterr().err
    assert message in errors and "Traceback" not in errors and len(errors.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing was read, trained or written (the data files do not even exist)
