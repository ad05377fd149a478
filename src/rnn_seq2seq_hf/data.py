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

from .tokenization import appends_eos


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


def load_dataset_splits(name: str, config_name: str | None = None, **kwargs) -> datasets.DatasetDict:
    """All splits of a `datasets` dataset (a Hub name or a local folder) as a `DatasetDict`; a `DataError` naming
    the dataset when it cannot be loaded."""
    try:
        loaded = datasets.load_dataset(name, config_name, **kwargs)
    except Exception as error:  # datasets raises many types (connection, bad files, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--dataset {name}: could not be loaded ({reason})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def select_split(splits: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    """`splits[split]`, or a `DataError` naming the splits the dataset has."""
    if split not in splits:
        raise DataError(f"--dataset {name} has no split {split!r}; its splits are: {', '.join(splits) or 'none'}")
    return splits[split]


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _text_columns(dataset: datasets.Dataset, source_lang: str, target_lang: str) -> list[str]:
    """The columns that hold the text: `translation`, or the two language columns."""
    if "translation" in dataset.column_names:
        return ["translation"]
    if source_lang in dataset.column_names and target_lang in dataset.column_names:
        return [source_lang, target_lang]
    raise DataError(
        f"dataset has columns {dataset.column_names}: expected 'translation' or {source_lang!r} and {target_lang!r}"
    )


def _needs_reading_as_text(dataset: datasets.Dataset, columns: list[str], source_lang: str, target_lang: str) -> bool:
    features = dataset.features
    if columns == ["translation"]:
        inner = features["translation"]
        if isinstance(inner, dict):
            return not all(_is_string(inner.get(lang)) for lang in (source_lang, target_lang))
        return not isinstance(inner, datasets.Translation)  # Translation columns are strings
    return not all(_is_string(features[column]) for column in columns)


def load_parallel_dataset(
    name: str, split: str, source_lang: str, target_lang: str, config_name: str | None = None
) -> datasets.Dataset:
    """A split of a `datasets` dataset (Hub name or local folder) as `source` / `target` string columns.

    `datasets` infers column types from the files: JSON or CSV text such as "1994-03-23" becomes a timestamp. The
    text columns are then read again as text (JSON values as they are written, CSV cells as strings), so a date
    stays the string it was in the file; columns stored typed (parquet, arrow) are converted to text
    (timestamps in ISO form).
    """
    splits = load_dataset_splits(name, config_name)
    dataset = select_split(splits, split, name)
    columns = _text_columns(dataset, source_lang, target_lang)
    builder = getattr(dataset.info, "builder_name", None)
    if _needs_reading_as_text(dataset, columns, source_lang, target_lang) and builder in ("json", "csv"):
        text_type = datasets.Json() if builder == "json" else datasets.Value("string")
        features = dataset.features.copy()
        for column in columns:
            features[column] = text_type
        splits = load_dataset_splits(name, config_name, features=datasets.Features(features))
        dataset = splits[split]

    def text(value, column: str) -> str:
        if isinstance(value, str):
            return value
        if value is None or isinstance(value, (dict, list)):
            raise DataError(f"--dataset {name} split {split!r}: column {column!r} holds {value!r}, not text")
        return value.isoformat() if hasattr(value, "isoformat") else str(value)

    def convert(batch):
        if columns == ["translation"]:
            rows = [pair if isinstance(pair, dict) else {} for pair in batch["translation"]]
            for row in rows:
                if source_lang not in row or target_lang not in row:
                    raise DataError(
                        f"--dataset {name} split {split!r}: a translation without {source_lang!r} and "
                        f"{target_lang!r} (keys: {sorted(row)})"
                    )
            return {
                "source": [text(row[source_lang], source_lang) for row in rows],
                "target": [text(row[target_lang], target_lang) for row in rows],
            }
        return {
            "source": [text(value, source_lang) for value in batch[source_lang]],
            "target": [text(value, target_lang) for value in batch[target_lang]],
        }

    converted = dataset.map(convert, batched=True, remove_columns=dataset.column_names)
    return converted.cast(datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string")}))


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

    # Sources and targets end with `</s>`: added here when the tokenizer does not append it (a model fine-tuned from
    # the Hub may come with such a tokenizer).
    end = [] if appends_eos(tokenizer) else [tokenizer.eos_token_id]

    def encode(batch):
        encoded = tokenizer(batch["source"])
        if end:
            encoded["input_ids"] = [ids + end for ids in encoded["input_ids"]]
            encoded["attention_mask"] = [mask + [1] for mask in encoded["attention_mask"]]
        encoded["labels"] = [ids + end for ids in tokenizer(batch["target"])["input_ids"]]
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
        raise DataError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
    cut = int(round(len(lines) * (1 - validation_fraction)))
    if cut >= len(lines):
        raise DataError(
            f"--validation-fraction {validation_fraction} of {len(lines)} lines leaves no validation line; "
            f"give at least {1 / len(lines):.2g}, or --validation FILE"
        )
    if cut < 1:
        raise DataError(
            f"--validation-fraction {validation_fraction} of {len(lines)} lines leaves no training line; give less"
        )
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
    "load_dataset_splits",
    "load_parallel",
    "load_parallel_dataset",
    "lm_blocks",
    "lm_token_stream",
    "read_jsonl",
    "read_lines",
    "read_lm_text",
    "read_parallel_files",
    "read_tsv",
    "select_split",
    "split_text",
    "tokenize_parallel",
]
