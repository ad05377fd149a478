"""Recipes: YAML files with the settings of one training job (presets live in `examples/configs/`).

A recipe has the sections
- `task`: "translation" or "language_modeling";
- `tokenizer`: arguments of `train_tokenizer` (kind, vocab_size, min_frequency, lowercase);
- `model`: fields of `RNNSeq2SeqConfig` / `RNNLMConfig` (vocabulary size and token ids come from the tokenizer);
- `training`: fields of `Seq2SeqTrainingArguments` / `TrainingArguments`;
- `generation`: `GenerationConfig` fields used to evaluate and saved with the model (translation);
- `data`: max_source_length / max_target_length (translation), block_size (language modelling), ...;
- `evaluation`: batch_size and block_size of the stateful perplexity evaluation (language modelling);
- `sample`: prompt and sampling settings of the samples written after training (language modelling);
- top-level `name`, `description` (free text for the model card) and `early_stopping_patience` (evaluations
  without improvement before training stops).
Any value can be overridden with `section.key=value` strings (`--set training.num_train_epochs=2` on the CLI).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TASKS = ("translation", "language_modeling")
SECTIONS = ("tokenizer", "model", "training", "generation", "data", "evaluation", "sample")
TOP_LEVEL = ("name", "description", "task", "early_stopping_patience")


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
    """Read a recipe and apply `section.key=value` overrides (values parsed as YAML: 2, 1e-3, true, null)."""
    path = find_recipe_file(name_or_path)
    with path.open() as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections")
    unknown = sorted(set(recipe) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {list(TOP_LEVEL + SECTIONS)}")
    recipe = copy.deepcopy(recipe)
    for override in overrides or []:
        apply_override(recipe, override)
    if recipe.get("task") not in TASKS:
        raise ValueError(f"{path}: `task` must be one of {list(TASKS)}, got {recipe.get('task')!r}")
    recipe["source"] = str(path)
    return recipe


def apply_override(recipe: dict, override: str) -> None:
    """Set `section.key=value` (or a top-level `key=value`) in `recipe`, in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value, e.g. training.num_train_epochs=2")
    key, value = override.split("=", 1)
    if key in TOP_LEVEL:
        recipe[key] = yaml.safe_load(value)
        return
    if "." not in key:
        raise ValueError(f"override {override!r} must look like section.key=value, e.g. training.num_train_epochs=2")
    section, field = key.split(".", 1)
    if section not in SECTIONS:
        raise ValueError(f"override {override!r}: unknown section {section!r}; expected one of {list(SECTIONS)}")
    recipe.setdefault(section, {})[field] = yaml.safe_load(value)


__all__ = ["TASKS", "apply_override", "available_presets", "find_recipe_file", "load_recipe", "preset_dirs"]
