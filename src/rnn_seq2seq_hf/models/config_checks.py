"""Value checks shared by the two configuration classes.

Every check raises a ``ValueError`` that names the field, the value it got and what it expected, so that a typo in a
config file is reported where it is made and not as a shape error deep inside torch.

This file is a sibling of the configuration files on purpose: code loaded with ``trust_remote_code`` may only import
installed packages and files of its own folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
import math
from dataclasses import fields

from transformers import GenerationConfig, PreTrainedConfig

CELL_TYPES = ("rnn_tanh", "rnn_relu", "lstm", "gru")

# Keys a saved config.json carries, or that `PreTrainedConfig` handles itself, besides its dataclass fields.
BASE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "model_type",
        "auto_map",
        "custom_pipelines",
        "torch_dtype",
        "num_labels",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
    }
)
_TOLERATE_UNKNOWN_KEYS = contextvars.ContextVar("tolerate_unknown_config_keys", default=False)


@contextlib.contextmanager
def tolerating_unknown_keys():
    """Inside, configs keep unknown keys as attributes (transformers' behaviour for config.json files)."""
    token = _TOLERATE_UNKNOWN_KEYS.set(True)
    try:
        yield
    finally:
        _TOLERATE_UNKNOWN_KEYS.reset(token)


def check_known_keys(config_class: type, kwargs: dict) -> None:
    """Raise for keyword arguments the config class does not know, naming the nearest valid one.

    A typo (`hiden_size=64`) would otherwise be stored as a stray attribute while the model silently uses the
    default. Configs read from a checkpoint (`from_dict` / `from_pretrained`) keep transformers' tolerance.
    """
    if _TOLERATE_UNKNOWN_KEYS.get():
        return
    own = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    known = own | {f.name for f in fields(PreTrainedConfig)} | BASE_CONFIG_KEYS | set(config_class.attribute_map)
    generation = set(GenerationConfig._get_default_generation_params())
    for key in sorted(kwargs):
        if key in known:
            continue
        if key in generation:
            raise ValueError(
                f"`{key}` is a generation setting, not a model setting of {config_class.__name__}: set it on "
                f"`model.generation_config` (or pass it to `generate()`)."
            )
        nearest = difflib.get_close_matches(key, sorted(own), n=1)
        hint = f"; did you mean `{nearest[0]}`?" if nearest else f"; valid keys: {sorted(own)}"
        raise ValueError(f"{config_class.__name__} got an unknown key `{key}`{hint}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def check_positive_int(name: str, value: object) -> None:
    """Raise unless ``value`` is an integer >= 1 (booleans are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def check_probability(name: str, value: object) -> None:
    """Raise unless ``value`` is a number in [0, 1) (a dropout of 1 would zero everything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")


def check_bool(name: str, value: object) -> None:
    """Raise unless ``value`` is a real boolean (``"false"`` from a YAML typo would otherwise be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_positive_float(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def check_token_id(name: str, value: object, vocab_size: int, required: bool = False) -> None:
    """Raise unless ``value`` is a token id in [0, vocab_size) (or None when not ``required``)."""
    if value is None and not required:
        return
    ids = value if isinstance(value, (list, tuple)) and name == "eos_token_id" else [value]
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(f"`{name}` must be a token id in [0, vocab_size={vocab_size}), got {value!r}.")
