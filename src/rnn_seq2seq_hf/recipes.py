"""Recipes: YAML files with the settings of one training job (presets live in `examples/configs/`).

A recipe has the sections
- `task`: "translation" or "language_modeling";
- `tokenizer`: arguments of `train_tokenizer` (kind, vocab_size, min_frequency, lowercase, split_digits);
- `model`: fields of `RNNSeq2SeqConfig` / `RNNLMConfig` (vocabulary size and token ids come from the tokenizer);
- `training`: fields of `Seq2SeqTrainingArguments` / `TrainingArguments` (and of `LoopArguments` with the
  Accelerate engine);
- `generation`: `GenerationConfig` fields used to evaluate and saved with the model (translation);
- `data`: max_source_length / max_target_length (translation), block_size (language modelling), train_pairs /
  validation_pairs / test_pairs (the demo's generated data);
- `evaluation`: batch_size and block_size of the stateful perplexity evaluation (language modelling);
- `sample`: prompt and sampling settings of the samples written after training (language modelling);
- top-level `name`, `description` (free text), `early_stopping_patience` (evaluations without improvement before
  training stops), `average_last_checkpoints` (the final model is the average of the last N checkpoints) and
  `time_limit_minutes` (training stops after this wall time, evaluates and keeps the best checkpoint as usual).
Any value can be overridden with `section.key=value` strings (`--set training.num_train_epochs=2` on the CLI).

`validate_recipe` checks every section before any work starts: an unknown key is an error naming the key and the
nearest valid one, a value of the wrong type or range is an error naming the key, the value and what is expected.
PyYAML reads `1e-3` (no dot) as a string: for a float field such a string is converted to the number it spells.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path

import yaml

TASKS = ("translation", "language_modeling")
SECTIONS = ("tokenizer", "model", "training", "generation", "data", "evaluation", "sample")
TOP_LEVEL = (
    "name",
    "description",
    "task",
    "early_stopping_patience",
    "average_last_checkpoints",
    "time_limit_minutes",
)
# Model-config fields the job sets from the tokenizer; a recipe must not set them.
FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
# Tokenizer arguments the job sets itself (language models pad on the left and add no end token).
SET_BY_JOB = ("texts", "padding_side", "add_eos")


class RecipeError(ValueError):
    """A recipe that cannot be used; the one-line message names `section.key`, the value and what is expected."""


def preset_dirs() -> list[Path]:
    """Where presets are looked up: `examples/configs/` of a source checkout, then the copy inside the package."""
    package = Path(__file__).resolve().parent
    return [package.parents[1] / "examples" / "configs", package / "presets"]


def available_presets() -> list[str]:
    names = {path.stem for folder in preset_dirs() if folder.is_dir() for path in folder.glob("*.yaml")}
    return sorted(names)


def find_recipe_file(name_or_path: str) -> Path:
    """A recipe file from a path or a preset name (e.g. "multi30k_de_en_cpu")."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        return path
    for folder in preset_dirs():
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"unknown preset {name_or_path!r}; presets: {', '.join(available_presets()) or 'none'}")


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> dict:
    """Read a recipe and apply `section.key=value` overrides (values parsed as YAML: 2, 1e-3, true, null).

    `recipe["source"]` names where it came from without the machine's paths: the preset name, or the file name.
    """
    path = find_recipe_file(name_or_path)
    with path.open() as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    unknown = sorted(set(recipe) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(f"{path}: unknown key `{unknown[0]}`{_suggestion(unknown[0], TOP_LEVEL + SECTIONS)}")
    recipe = copy.deepcopy(recipe)
    for override in overrides or []:
        apply_override(recipe, override)
    if recipe.get("task") not in TASKS:
        raise RecipeError(f"{path}: `task` must be one of {list(TASKS)}, got {recipe.get('task')!r}")
    recipe["source"] = path.stem if Path(name_or_path).suffix not in (".yaml", ".yml") else path.name
    return recipe


def apply_override(recipe: dict, override: str) -> None:
    """Set `section.key=value` (or a top-level `key=value`) in `recipe`, in place."""
    if "=" not in override:
        raise RecipeError(f"override {override!r} must look like section.key=value, e.g. training.num_train_epochs=2")
    key, value = override.split("=", 1)
    if key in TOP_LEVEL:
        recipe[key] = yaml.safe_load(value)
        return
    if "." not in key:
        raise RecipeError(
            f"override {override!r} must look like section.key=value, e.g. training.num_train_epochs=2"
            f"{_suggestion(key, TOP_LEVEL)}"
        )
    section, field = key.split(".", 1)
    if section not in SECTIONS:
        raise RecipeError(
            f"--set {override}: unknown section `{section}`"
            + _suggestion(section, SECTIONS).replace("valid keys", "valid sections")
        )
    if not isinstance(recipe.get(section) or {}, dict):
        raise RecipeError(f"--set {override}: section `{section}` of the recipe is not a mapping")
    recipe[section] = recipe.get(section) or {}
    recipe[section][field] = yaml.safe_load(value)


def recipe_yaml(recipe: dict) -> str:
    """The recipe as a YAML file that `load_recipe` reads back (the resolved recipe a run wrote)."""
    body = {key: value for key, value in recipe.items() if key != "source"}
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


# --- validation ----------------------------------------------------------------------------------------------------


def _suggestion(key: str, valid, prefix: str = "") -> str:
    """ "; did you mean `x`?" with the nearest valid key, or the valid keys when none is near."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{prefix}{close[0]}`?"
    shown = ", ".join(valid[:15]) + (", ..." if len(valid) > 15 else "")
    return f"; valid keys: {shown}"


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(annotation) -> str:
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is list or annotation is list:
        return "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


class _WrongType(Exception):
    pass


def _convert(value, annotation):
    """`value` as the type `annotation` names (a float spelled as a string becomes the float); `_WrongType` if it
    is not one. Annotations this does not know accept any value (their owner checks them)."""
    if annotation in (inspect.Parameter.empty, typing.Any, object):
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(annotation)
        if value is None:
            if type(None) in arguments:
                return None
            raise _WrongType
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return _convert(value, argument)
            except _WrongType:
                continue
        raise _WrongType
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise _WrongType
    if annotation is type(None):
        if value is None:
            return None
        raise _WrongType
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _WrongType
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _WrongType
    if annotation is float:
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise _WrongType
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _WrongType
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation) or value in {member.value for member in annotation}:
            return value
        raise _WrongType
    if origin is list or annotation is list:
        if not isinstance(value, list):
            raise _WrongType
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return [_convert(element, item) for element in value]
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise _WrongType
    return value


Check = Callable[[object], str | None]  # returns what is expected when the value is out of range


def at_least(minimum: float) -> Check:
    return lambda value: None if value is None or value >= minimum else f">= {minimum}"


def greater_than(minimum: float) -> Check:
    return lambda value: None if value is None or value > minimum else f"> {minimum}"


def in_range(low: float, high: float, high_open: bool = False) -> Check:
    def check(value):
        if value is None or (low <= value < high if high_open else low <= value <= high):
            return None
        return f"in [{low}, {high}{')' if high_open else ']'}"

    return check


def steps_or_minus_one(value) -> str | None:
    return None if value is None or value == -1 or value >= 1 else ">= 1 (or -1: use num_train_epochs)"


# Sections without a class to read their keys from: key -> (annotation, range check).
DATA_KEYS = {
    "translation": {
        "max_source_length": (int | None, at_least(1)),
        "max_target_length": (int | None, at_least(1)),
        "train_pairs": (int, at_least(1)),  # the demo's generated data
        "validation_pairs": (int, at_least(1)),
        "test_pairs": (int, at_least(1)),
    },
    "language_modeling": {
        "block_size": (int, at_least(1)),
        # truncated BPTT with the state carried across windows (tbptt.py); else independent blocks
        "stateful": (bool, None),
        "random_window_lengths": (bool, None),
        "scale_lr_by_window_length": (bool, None),
    },
}
EVALUATION_KEYS = {"batch_size": (int, at_least(1)), "block_size": (int, at_least(1))}
SAMPLE_KEYS = {
    "prompt": (str, None),
    "max_new_tokens": (int, at_least(1)),
    "temperature": (float, greater_than(0)),
    "top_k": (int, at_least(0)),
    "top_p": (float, in_range(0, 1)),
    "do_sample": (bool, None),
    "num_samples": (int, at_least(1)),
    "seed": (int, None),
}
TOP_LEVEL_KEYS = {
    "name": (str, None),
    "description": (str, None),
    "early_stopping_patience": (int | None, at_least(1)),
    "average_last_checkpoints": (int | None, at_least(2)),
    "time_limit_minutes": (float | None, greater_than(0)),
}
# Ranges of training fields that TrainingArguments does not check itself before training.
TRAINING_RANGES = {
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "max_steps": steps_or_minus_one,
    "num_train_epochs": greater_than(0),
    "learning_rate": at_least(0),
    "weight_decay": at_least(0),
    "warmup_steps": at_least(0),
    "logging_steps": greater_than(0),
    "save_steps": greater_than(0),
    "eval_steps": greater_than(0),
    "save_total_limit": at_least(1),
    "label_smoothing_factor": in_range(0, 1, high_open=True),
    "generation_num_beams": at_least(1),
    "generation_max_length": at_least(1),
    "max_grad_norm": at_least(0),
}
# Types and ranges of the generation settings recipes use (GenerationConfig declares no types).
GENERATION_KEYS = {
    "num_beams": (int, at_least(1)),
    "max_new_tokens": (int, at_least(1)),
    "min_new_tokens": (int, at_least(0)),
    "max_length": (int, at_least(1)),
    "min_length": (int, at_least(0)),
    "num_return_sequences": (int, at_least(1)),
    "length_penalty": (float, None),
    "early_stopping": (bool | typing.Literal["never"], None),
    "no_repeat_ngram_size": (int, at_least(0)),
    "repetition_penalty": (float, greater_than(0)),
    "do_sample": (bool, None),
    "temperature": (float, greater_than(0)),
    "top_k": (int, at_least(0)),
    "top_p": (float, in_range(0, 1)),
}
GENERATION_INTERNAL = ("_from_model_config", "transformers_version")


def _check_section(section: str, values: dict, schema: dict[str, tuple[object, Check | None]]) -> dict:
    """Keys, types and ranges of one section; returns the values converted (floats from strings)."""
    if not isinstance(values, dict):
        raise RecipeError(f"recipe section `{section}` must be a mapping, got {values!r}")
    checked = {}
    prefix = "" if section == "top level" else f"{section}."
    for key, value in values.items():
        if key not in schema:
            raise RecipeError(f"recipe: unknown key `{prefix}{key}`{_suggestion(str(key), schema, prefix)}")
        annotation, check = schema[key]
        try:
            value = _convert(value, annotation)
        except _WrongType:
            raise RecipeError(f"recipe: `{section}.{key}` must be {_describe(annotation)}, got {value!r}") from None
        expected = check(value) if check is not None and isinstance(value, (int, float)) else None
        if expected:
            raise RecipeError(f"recipe: `{prefix}{key}` must be {expected}, got {value!r}")
        checked[key] = value
    return checked


def _signature_schema(function, skip=()) -> dict[str, tuple[object, None]]:
    hints = typing.get_type_hints(function)
    return {
        name: (hints.get(name, inspect.Parameter.empty), None)
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in ("self", *skip) and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    }


def _dataclass_schema(cls) -> dict[str, tuple[object, Check | None]]:
    hints = typing.get_type_hints(cls)
    return {
        field.name: (hints.get(field.name, inspect.Parameter.empty), TRAINING_RANGES.get(field.name))
        for field in dataclasses.fields(cls)
        if field.init and not field.name.startswith("_")
    }


def config_class(task: str):
    from .models import RNNLMConfig, RNNSeq2SeqConfig

    return RNNSeq2SeqConfig if task == "translation" else RNNLMConfig


def training_schema(task: str, engine: str) -> dict[str, tuple[object, Check | None]]:
    """The keys a recipe's `training` section may use: the TrainingArguments fields (and, for the Accelerate engine,
    the `LoopArguments` fields), without `output_dir`, which `--output-dir` sets."""
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    schema = _dataclass_schema(Seq2SeqTrainingArguments if task == "translation" else TrainingArguments)
    if engine == "accelerate":
        from .accelerate_loop import LoopArguments

        schema = {**_dataclass_schema(LoopArguments), **schema}
        schema.pop("fingerprint", None)
    schema.pop("output_dir", None)
    return schema


def generation_schema() -> dict[str, tuple[object, Check | None]]:
    from transformers import GenerationConfig

    schema = {}
    for key, default in GenerationConfig().to_dict().items():
        if key in GENERATION_INTERNAL:
            continue
        simple = type(default) if isinstance(default, (bool, int, float, str)) else inspect.Parameter.empty
        schema[key] = GENERATION_KEYS.get(key, (simple, None))
    return schema


def validate_recipe(recipe: dict, engine: str = "trainer", pretrained: bool = False) -> dict:
    """Check every key, type and range of `recipe` (see the module docstring); returns a copy with float strings
    converted. Raises `RecipeError` (a `ValueError`) with a one-line message.

    With `pretrained=True` (fine-tuning an existing model) the `model` section is checked against the loaded
    model's config by the job instead, and the `tokenizer` section is not used.
    """
    from .tokenization import check_tokenizer_settings, train_tokenizer

    task = recipe.get("task")
    if task not in TASKS:
        raise RecipeError(f"recipe: `task` must be one of {list(TASKS)}, got {task!r}")
    checked = {"task": task}
    if "source" in recipe:
        checked["source"] = recipe["source"]
    for key in recipe:
        if key not in (*SECTIONS, *TOP_LEVEL, "source"):
            raise RecipeError(f"recipe: unknown key `{key}`{_suggestion(str(key), TOP_LEVEL + SECTIONS)}")
    top = {key: recipe[key] for key in TOP_LEVEL_KEYS if key in recipe}
    checked.update(_check_section("top level", top, TOP_LEVEL_KEYS) if top else {})

    unused = ("generation",) if task == "language_modeling" else ("evaluation", "sample")
    for section in unused:
        if recipe.get(section):
            raise RecipeError(f"recipe: section `{section}` is not used by {task} recipes")

    tokenizer = recipe.get("tokenizer") or {}
    tokenizer = _check_section("tokenizer", tokenizer, _signature_schema(train_tokenizer, skip=SET_BY_JOB))
    if not pretrained:
        try:
            check_tokenizer_settings(**tokenizer)
        except ValueError as error:
            raise RecipeError(f"recipe tokenizer: {error}") from None
    checked["tokenizer"] = tokenizer

    model = recipe.get("model") or {}
    config_schema = _signature_schema(config_class(task).__init__)
    if not pretrained:
        for key in FROM_TOKENIZER:
            if key in model:
                raise RecipeError(f"recipe: `model.{key}` comes from the tokenizer; remove it from the recipe")
    checked["model"] = _check_section("model", model, config_schema)

    checked["training"] = _check_section("training", recipe.get("training") or {}, training_schema(task, engine))
    if task == "translation":
        checked["generation"] = _check_section("generation", recipe.get("generation") or {}, generation_schema())
    checked["data"] = _check_section("data", recipe.get("data") or {}, DATA_KEYS[task])
    if task == "language_modeling":
        checked["evaluation"] = _check_section("evaluation", recipe.get("evaluation") or {}, EVALUATION_KEYS)
        checked["sample"] = _check_section("sample", recipe.get("sample") or {}, SAMPLE_KEYS)
    return checked


__all__ = [
    "SECTIONS",
    "TASKS",
    "TOP_LEVEL",
    "RecipeError",
    "apply_override",
    "available_presets",
    "config_class",
    "find_recipe_file",
    "load_recipe",
    "preset_dirs",
    "recipe_yaml",
    "validate_recipe",
]
