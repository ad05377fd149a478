"""Reading parallel and LM text from every supported form, with the error cases named by file and line."""

import json

import datasets
import numpy as np
import pytest

from rnn_seq2seq_hf.data import (
    DataError,
    lm_blocks,
    lm_token_stream,
    load_parallel,
    load_parallel_dataset,
    read_lines,
    read_parallel_files,
    split_text,
    tokenize_parallel,
)
from rnn_seq2seq_hf.tokenization import train_tokenizer

PAIRS = [("ein Hund", "a dog"), ("zwei Katzen", "two cats"), ("ein Mann läuft", "a man runs")]


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_plain_files_tsv_and_jsonl_give_the_same_pairs(tmp_path):
    src = write(tmp_path / "train.de", "".join(s + "\n" for s, _ in PAIRS))
    tgt = write(tmp_path / "train.en", "".join(t + "\n" for _, t in PAIRS))
    tsv = write(tmp_path / "train.tsv", "".join(f"{s}\t{t}\n" for s, t in PAIRS))
    flat = write(tmp_path / "flat.jsonl", "".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in PAIRS))
    nested = write(
        tmp_path / "nested.jsonl",
        "".join(json.dumps({"translation": {"de": s, "en": t}}, ensure_ascii=False) + "\n" for s, t in PAIRS),
    )
    for spec in (f"{src},{tgt}", str(tsv), str(flat), str(nested)):
        dataset = load_parallel(spec, "de", "en")
        assert list(zip(dataset["source"], dataset["target"])) == PAIRS, spec


def test_windows_line_endings_are_stripped(tmp_path):
    assert read_lines(write(tmp_path / "a.txt", "one\r\ntwo\r\n")) == ["one", "two"]


def test_mismatched_line_counts_name_both_files(tmp_path):
    src = write(tmp_path / "a.de", "eins\nzwei\ndrei\n")
    tgt = write(tmp_path / "a.en", "one\ntwo\n")
    with pytest.raises(DataError, match=r"a\.de has 3 lines but .*a\.en has 2"):
        read_parallel_files(src, tgt)


def test_empty_line_is_named_by_file_and_line(tmp_path):
    path = write(tmp_path / "a.de", "eins\n\ndrei\n")
    with pytest.raises(DataError, match=r"a\.de:2: empty line"):
        read_lines(path)
    assert read_lines(path, allow_empty_lines=True) == ["eins", "", "drei"]


def test_undecodable_bytes_are_named_by_file_and_line(tmp_path):
    path = write(tmp_path / "bad.de", b"gut\nschlecht \xff\xfe\n", mode="wb")
    with pytest.raises(DataError, match=r"bad\.de:2: not valid UTF-8"):
        read_lines(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_lines(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="the file is empty"):
        read_lines(write(tmp_path / "empty.txt", ""))


def test_bad_tsv_and_jsonl_lines(tmp_path):
    with pytest.raises(DataError, match=r"x\.tsv:2: expected 'source<TAB>target'"):
        load_parallel(str(write(tmp_path / "x.tsv", "a\tb\nonly one column\n")))
    with pytest.raises(DataError, match=r"x\.jsonl:1: not valid JSON"):
        load_parallel(str(write(tmp_path / "x.jsonl", "{not json\n")), "de", "en")
    with pytest.raises(DataError, match=r"y\.jsonl:1: expected keys 'de' and 'en'"):
        load_parallel(str(write(tmp_path / "y.jsonl", '{"de": "a", "fr": "b"}\n')), "de", "en")
    with pytest.raises(DataError, match="give two plain files"):
        load_parallel("data.txt")


def test_datasets_folder_with_a_translation_column(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split in ("train", "validation"):
        write(
            folder / f"{split}.jsonl",
            "".join(json.dumps({"translation": {"de": s, "en": t}}) + "\n" for s, t in PAIRS),
        )
    dataset = load_parallel_dataset(str(folder), "validation", "de", "en")
    assert list(zip(dataset["source"], dataset["target"])) == PAIRS
    with pytest.raises(DataError, match="could not be loaded"):
        load_parallel_dataset(str(tmp_path / "missing"), "train", "de", "en")


def test_tokenize_parallel_adds_eos_and_drops_only_long_pairs():
    tokenizer = train_tokenizer([w for pair in PAIRS for w in pair], kind="word", vocab_size=None)
    dataset = datasets.Dataset.from_dict({"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]})
    features = tokenize_parallel(dataset, tokenizer)
    assert features[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert features[0]["labels"][-1] == tokenizer.eos_token_id
    assert features["length"] == [3, 3, 4]
    assert len(tokenize_parallel(dataset, tokenizer, max_source_length=3)) == 2
    with pytest.raises(DataError, match="no sentence pair fits"):
        tokenize_parallel(dataset, tokenizer, max_source_length=1)


def test_lm_stream_per_line_and_as_characters():
    lines = ["a b", "c"]
    word = train_tokenizer(lines, kind="word", vocab_size=None, add_eos=False)
    assert word("a b")["input_ids"] == [word.convert_tokens_to_ids("▁a"), word.convert_tokens_to_ids("▁b")]
    stream = word.convert_ids_to_tokens(lm_token_stream(lines, word, per_line=True).tolist())
    assert stream == ["▁a", "▁b", "</s>", "▁c", "</s>"]
    char = train_tokenizer(["a b\nc\n"], kind="char", vocab_size=None)
    assert char.decode(lm_token_stream(lines, char, per_line=False).tolist()) == "a b\nc\n"


@pytest.mark.parametrize("block_size", [1, 3, 4, 10])
def test_lm_blocks_predict_every_token_after_the_first_exactly_once(block_size):
    stream = np.arange(100, 111)  # 11 tokens
    blocks = lm_blocks(stream, block_size)
    targets = [token for block in blocks["input_ids"] for token in block[1:]]  # the model shifts labels by one
    assert sorted(targets) == list(range(101, 111))
    assert all(len(block) <= block_size + 1 for block in blocks["input_ids"])


def test_split_text_keeps_the_end_for_validation():
    train, validation = split_text([str(i) for i in range(10)], 0.2)
    assert train == [str(i) for i in range(8)] and validation == ["8", "9"]
    with pytest.raises(DataError):
        split_text(["a"], 1.5)


def test_dataset_text_that_looks_like_dates_stays_text(tmp_path):
    """`datasets` reads "1994-03-23" in JSON or CSV as a timestamp; the pairs must keep the text as written."""
    pairs = [("23/03/1994", "1994-03-23"), ("march the fifth, 2008", "2008-03-05")]
    folder = tmp_path / "json"
    folder.mkdir()
    for split in ("train", "validation"):
        write(
            folder / f"{split}.jsonl",
            "".join(json.dumps({"translation": {"src": s, "tgt": t}}) + "\n" for s, t in pairs),
        )
    assert "timestamp" in str(datasets.load_dataset(str(folder), split="train").features)  # what datasets infers
    loaded = load_parallel_dataset(str(folder), "validation", "src", "tgt")
    assert list(zip(loaded["source"], loaded["target"])) == pairs
    flat = tmp_path / "csv"
    flat.mkdir()
    write(flat / "train.csv", "src,tgt\n" + "".join(f'"{s}",{t}\n' for s, t in pairs))
    loaded = load_parallel_dataset(str(flat), "train", "src", "tgt")
    assert list(zip(loaded["source"], loaded["target"])) == pairs


def test_a_missing_split_names_the_splits_there_are(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split in ("train", "test"):
        write(folder / f"{split}.jsonl", "".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in PAIRS))
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are: train, test$"):
        load_parallel_dataset(str(folder), "validation", "de", "en")


def test_split_text_refuses_a_fraction_that_leaves_a_side_empty():
    lines = [str(i) for i in range(30)]
    with pytest.raises(DataError, match=r"--validation-fraction 0.01 of 30 lines leaves no validation line"):
        split_text(lines, 0.01)
    with pytest.raises(DataError, match="leaves no training line"):
        split_text(lines, 0.99)
    assert split_text(lines, 0.05) == (lines[:28], lines[28:])


def test_a_tokenizer_without_an_end_token_still_gives_pairs_ending_with_it():
    tokenizer = train_tokenizer([w for pair in PAIRS for w in pair], kind="word", vocab_size=None, add_eos=False)
    dataset = datasets.Dataset.from_dict({"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]})
    encoded = tokenize_parallel(dataset, tokenizer)
    for row in encoded:
        assert row["input_ids"][-1] == row["labels"][-1] == tokenizer.eos_token_id
        assert len(row["attention_mask"]) == len(row["input_ids"]) and row["length"] == len(row["input_ids"])
