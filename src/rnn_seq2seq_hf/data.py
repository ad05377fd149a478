"""Reading parallel text and language-modelling text, and turning it into tokenized `datasets.Dataset`s.

Parallel text comes from
- two plain files, one sentence per line per language (as in Multi30k): the spec `"train.de,train.en"`;
- a TSV file, source and target in the first two columns: `"pairs.tsv"`;
- a JSON lines file with `{"<source_lang>": ..., "<target_lang>": ...}` or `{"translation": {...}}` (the layout
  of the translation datasets on the Hub): `"pairs.jsonl"`;
- any `datasets` dataset with a `translation` column (or source/target columns), by name or local folder.
Bad input is a `DataError` (a `ValueError`) that names the file and the line: different line counts, an empty
line, bytes that are not UTF-8, a TSV line without two columns, a JSON line that does not parse or lacks a key.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line."""


def read_lines(path: str | Path, allow_empty_lines: bool = False) -> list[str]:
    """The lines of a UTF-8 text file without their line endings.

    Raises:
        DataError: the file is missing or empty, has bytes that are not UTF-8, or (unless `allow_empty_lines`) an
            empty line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
            line = line.rstrip("\n").rstrip("\r")
            if not allow_empty_lines and not line.strip():
                raise DataError(f"{path}:{number}: empty line (every line must hold a sentence)")
            lines.append(line)
    if not lines:
        raise DataError(f"{path}: the file is empty")
    return lines


def read_parallel_files(source_path: str | Path, target_path: str | Path) -> list[tuple[str, str]]:
    """Sentence pairs from two line-aligned files."""
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise DataError(
            f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}: "
            "parallel files must have one sentence per line, aligned line by line"
        )
    return list(zip(sources, targets))


def read_tsv(path: str | Path) -> list[tuple[str, str]]:
    """Sentence pairs from the first two tab-separated columns of each line."""
    pairs = []
    for number, line in enumerate(read_lines(path), start=1):
        columns = line.split("\t")
        if len(columns) < 2 or not columns[0].strip() or not columns[1].strip():
            raise DataError(f"{path}:{number}: expected 'source<TAB>target', got {line[:80]!r}")
        pairs.append((columns[0], columns[1]))
    return pairs


def read_jsonl(path: str | Path, source_lang: str, target_lang: str) -> list[tuple[str, str]]:
    """Sentence pairs from JSON lines `{"de": ..., "en": ...}` or `{"translation": {"de": ..., "en": ...}}`."""
    pairs = []
    for number, line in enumerate(read_lines(path), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        record = record.get("translation", record) if isinstance(record, dict) else None
        if not isinstance(record, dict) or source_lang not in record or target_lang not in record:
            raise DataError(f"{path}:{number}: expected keys {source_lang!r} and {target_lang!r} (or 'translation')")
        source, target = record[source_lang], record[target_lang]
        if not isinstance(source, str) or not isinstance(target, str) or not source.strip() or not target.strip():
            raise DataError(f"{path}:{number}: source and target must be non-empty strings")
        pairs.append((source, target))
    return pairs


def load_parallel(spec: str, source_lang: str = "src", target_lang: str = "tgt") -> datasets.Dataset:
    """A `Dataset` with string columns `source` and `target` from a file spec (see the module docstring)."""
    if "," in spec:
        source_path, target_path = (part.strip() for part in spec.split(",", 1))
        pairs = read_parallel_files(source_path, target_path)
    elif spec.endswith(".tsv"):
        pairs = read_tsv(spec)
    elif spec.endswith((".jsonl", ".json")):
        pairs = read_jsonl(spec, source_lang, target_lang)
    else:
        raise DataError(
            f"{spec}: give two plain files as 'source_file,target_file', or a .tsv or .jsonl file "
            "(or use --dataset for a datasets name)"
        )
    return datasets.Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})


def load_parallel_dataset(
    name: str, split: str, source_lang: str, target_lang: str, config_name: str | None = None
) -> datasets.Dataset:
    """A split of a `datasets` dataset (Hub name or local folder) as `source` / `target` string columns."""
    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except Exception as error:  # datasets raises many types (connection, missing split, ...)
        where = f"dataset {name!r} (config {config_name!r}, split {split!r})"
        raise DataError(f"{where} could not be loaded: {error}") from None
    if "translation" in dataset.column_names:
        return dataset.map(
            lambda batch: {
                "source": [pair[source_lang] for pair in batch["translation"]],
                "target": [pair[target_lang] for pair in batch["translation"]],
            },
            batched=True,
            remove_columns=dataset.column_names,
        )
    if source_lang in dataset.column_names and target_lang in dataset.column_names:
        dataset = dataset.rename_columns({source_lang: "source", target_lang: "target"})
        return dataset.select_columns(["source", "target"])
    raise DataError(
        f"dataset {name!r} has columns {dataset.column_names}: expected 'translation' or {source_lang!r} and "
        f"{target_lang!r}"
    )


def tokenize_parallel(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> datasets.Dataset:
    """Add `input_ids`, `attention_mask`, `labels` (both ending in `</s>`) and `length` (for batching by length).

    With maximum lengths, longer pairs are dropped, not truncated: a truncated target would teach the model to
    stop early. Use it for training data only, so evaluation scores cover every test sentence.
    """

    def encode(batch):
        encoded = tokenizer(batch["source"])
        encoded["labels"] = tokenizer(batch["target"])["input_ids"]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    dataset = dataset.map(encode, batched=True, desc="tokenizing")
    if max_source_length or max_target_length:
        max_source_length = max_source_length or float("inf")
        max_target_length = max_target_length or float("inf")
        dataset = dataset.filter(
            lambda example: (
                len(example["input_ids"]) <= max_source_length and len(example["labels"]) <= max_target_length
            ),
            desc="dropping long pairs",
        )
        if len(dataset) == 0:
            raise DataError(
                f"no sentence pair fits max_source_length={max_source_length} and "
                f"max_target_length={max_target_length} tokens"
            )
    return dataset


def read_lm_text(path: str | Path) -> list[str]:
    """Lines of a language-modelling text file (empty lines are allowed: they are text too)."""
    return read_lines(path, allow_empty_lines=True)


def split_text(lines: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Train on the first lines, validate on the last `validation_fraction` of them (contiguous, as char-rnn and
    nanoGPT split Tiny Shakespeare)."""
    if not 0 < validation_fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {validation_fraction}")
    cut = int(round(len(lines) * (1 - validation_fraction)))
    return lines[:cut], lines[cut:]


def lm_token_stream(lines: list[str], tokenizer: PreTrainedTokenizerBase, per_line: bool) -> np.ndarray:
    """All tokens of a text as one stream.

    Args:
        per_line: encode each line followed by `</s>` (word-level corpora such as PTB, where the end of a sentence is
            a token to predict); otherwise encode the text with its newlines and no special tokens (character level).
    """
    if per_line:
        encoded = [ids + [tokenizer.eos_token_id] for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    else:
        encoded = tokenizer(["\n".join(lines) + "\n"], add_special_tokens=False)["input_ids"]
    return np.fromiter((token for ids in encoded for token in ids), dtype=np.int64)


def lm_blocks(stream: np.ndarray, block_size: int) -> datasets.Dataset:
    """Fixed-size training blocks of `block_size + 1` tokens overlapping by one, so every token after the first is a
    target exactly once (the model predicts position t+1 from t). The last block may be shorter; a collator such
    as `DataCollatorForLanguageModeling(tokenizer, mlm=False)` pads it and makes the labels."""
    if block_size < 1:
        raise DataError(f"block size must be >= 1, got {block_size}")
    starts = range(0, max(len(stream) - 1, 1), block_size)
    blocks = [stream[start : start + block_size + 1].tolist() for start in starts]
    blocks = [block for block in blocks if len(block) > 1]
    return datasets.Dataset.from_dict({"input_ids": blocks})


__all__ = [
    "DataError",
    "load_parallel",
    "load_parallel_dataset",
    "lm_blocks",
    "lm_token_stream",
    "read_jsonl",
    "read_lines",
    "read_lm_text",
    "read_parallel_files",
    "read_tsv",
    "split_text",
    "tokenize_parallel",
]
