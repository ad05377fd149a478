"""Value checks shared by the two configuration classes.

Every check raises a ``ValueError`` that names the field, the value it got and what it expected, so that a typo in a
config file is reported where it is made and not as a shape error deep inside torch.

This file is a sibling of the configuration files on purpose: code loaded with ``trust_remote_code`` may only import
installed packages and files of its own folder.
"""

from __future__ import annotations

CELL_TYPES = ("rnn_tanh", "rnn_relu", "lstm", "gru")


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
    """Raise unless ``value`` is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")


def check_token_id(name: str, value: object, vocab_size: int, required: bool = False) -> None:
    """Raise unless ``value`` is a token id in [0, vocab_size) (or None when not ``required``)."""
    if value is None and not required:
        return
    ids = value if isinstance(value, (list, tuple)) and name == "eos_token_id" else [value]
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(f"`{name}` must be a token id in [0, vocab_size={vocab_size}), got {value!r}.")
