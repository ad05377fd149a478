"""Tokenizer training, saving and reloading; PTB's standard 10k vocabulary."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rnn_seq2seq_hf.tokenization import (
    SPECIAL_TOKENS,
    appends_eos,
    lm_reads_lines,
    splits_digits,
    tokenizer_kind,
    train_tokenizer,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "A man rides a bike.",
    "Zwei Hunde spielen im Schnee.",
    "Two dogs play in the snow.",
] * 20


@pytest.mark.parametrize("kind", ["bpe", "unigram", "word", "char"])
def test_special_tokens_come_first_and_texts_end_with_eos(kind):
    tokenizer = train_tokenizer(SENTENCES, kind=kind, vocab_size=60 if kind in ("bpe", "unigram") else None)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    ids = tokenizer("Ein Mann")["input_ids"]
    assert ids[-1] == 2 and 2 not in tokenizer("Ein Mann", add_special_tokens=False)["input_ids"]
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_subword_tokenizers_decode_to_the_original_text(kind):
    tokenizer = train_tokenizer(SENTENCES, kind=kind, vocab_size=80)
    for sentence in SENTENCES[:4] + ["Ein Hund fährt im Schnee."]:
        assert tokenizer.decode(tokenizer(sentence)["input_ids"], skip_special_tokens=True) == sentence


def test_character_tokenizer_keeps_newlines_and_spaces():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    tokenizer = train_tokenizer([text], kind="char", vocab_size=None)
    assert len(tokenizer) == len(set(text)) + 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_word_tokenizer_vocabulary_limit_and_unknown_words():
    tokenizer = train_tokenizer(["a a a b b c", "a b d"], kind="word", vocab_size=6)  # 4 special + 2 words
    assert len(tokenizer) == 6
    assert tokenizer.convert_ids_to_tokens(tokenizer("a b c zzz")["input_ids"]) == [
        "▁a",
        "▁b",
        "<unk>",
        "<unk>",
        "</s>",
    ]
    assert tokenizer.decode(tokenizer("a b")["input_ids"], skip_special_tokens=True) == " a b"
    frequent = train_tokenizer(["x y y"], kind="word", vocab_size=None, min_frequency=2).get_vocab()
    assert "▁y" in frequent and "▁x" not in frequent


def test_language_model_tokenizers_encode_prompts_as_they_are():
    tokenizer = train_tokenizer(SENTENCES, kind="word", vocab_size=None, add_eos=False, padding_side="left")
    assert tokenizer.convert_ids_to_tokens(tokenizer("Ein Mann")["input_ids"]) == ["▁Ein", "▁Mann"]
    assert tokenizer(["Ein", "Ein Mann"], padding=True)["input_ids"][0][0] == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="padding_side"):
        train_tokenizer(SENTENCES, kind="word", padding_side="middle")


def test_lowercase_option():
    tokenizer = train_tokenizer(["Hello World"], kind="word", vocab_size=None, lowercase=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("HELLO world")["input_ids"]) == ["▁hello", "▁world", "</s>"]


@pytest.mark.parametrize("kind", ["bpe", "word", "char"])
def test_save_and_reload_with_auto_tokenizer(tmp_path, kind):
    tokenizer = train_tokenizer(SENTENCES, kind=kind, vocab_size=70 if kind == "bpe" else None)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    batch = ["Zwei Männer spielen.", "A dog."]
    assert reloaded(batch, padding=True)["input_ids"] == tokenizer(batch, padding=True)["input_ids"]
    assert reloaded.decode(reloaded(batch[0])["input_ids"], skip_special_tokens=True) == tokenizer.decode(
        tokenizer(batch[0])["input_ids"], skip_special_tokens=True
    )
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(SENTENCES, kind="wordpiece")
    with pytest.raises(ValueError, match="needs a `vocab_size`"):
        train_tokenizer(SENTENCES, kind="bpe", vocab_size=None)
    with pytest.raises(ValueError, match="larger than the 4 special tokens"):
        train_tokenizer(SENTENCES, kind="word", vocab_size=4)


@pytest.mark.skipif(
    not (SHARED / "ptb").is_dir(), reason=f"needs the Penn Treebank in {SHARED} (the project's shared data folder)"
)
def test_penn_treebank_gives_the_standard_10k_vocabulary():
    """The 9,999 words of ptb.train.txt (its <unk> is our unknown token) plus the end of sentence: 10,000 tokens
    that can be predicted, as in every published PTB perplexity; <pad> and <s> are never targets."""
    lines = (SHARED / "ptb" / "ptb.train.txt").read_text().splitlines()
    tokenizer = train_tokenizer(lines, kind="word", vocab_size=None)
    predictable = {token.removeprefix("▁") for token in tokenizer.get_vocab()} - {"<pad>", "<s>"}
    assert len(predictable) == 10_000
    words = {word for line in lines for word in line.split()}
    assert predictable == words | {"</s>"}
    test_ids = [
        i for line in (SHARED / "ptb" / "ptb.test.txt").read_text().splitlines() for i in tokenizer(line)["input_ids"]
    ]
    assert len(test_ids) == 82_430  # 78,669 words + 3,761 sentence ends, the standard PTB test size


@pytest.mark.parametrize("kind", ["bpe", "unigram", "word", "char"])
@pytest.mark.parametrize("add_eos", [True, False])
def test_kind_and_end_token_are_read_back_from_the_saved_tokenizer(tmp_path, kind, add_eos):
    size = 60 if kind in ("bpe", "unigram") else None
    tokenizer = train_tokenizer(SENTENCES, kind=kind, vocab_size=size, add_eos=add_eos)
    tokenizer.save_pretrained(tmp_path)
    for candidate in (tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        assert tokenizer_kind(candidate) == kind
        assert appends_eos(candidate) == add_eos
        assert lm_reads_lines(candidate) == (kind != "char")


@pytest.mark.parametrize(
    ("split_digits", "pieces"), [(True, ["1", "9", "9", "4"]), (2, ["19", "94"]), (3, ["199", "4"])]
)
def test_split_digits_keeps_the_fields_of_a_date_apart(tmp_path, split_digits, pieces):
    dates = ["1994-03-23", "2008-11-05", "23/03/1994", "March 23, 1994"] * 30
    tokenizer = train_tokenizer(dates, kind="bpe", vocab_size=200, split_digits=split_digits)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("1994-03-23", add_special_tokens=False)["input_ids"])
    month_day = ["0", "3", "-", "2", "3"] if split_digits is True else ["03", "-", "23"]
    assert tokens == ["▁", *pieces, "-", *month_day]
    assert tokenizer.decode(tokenizer("March 23, 1994")["input_ids"], skip_special_tokens=True) == "March 23, 1994"
    tokenizer.save_pretrained(tmp_path)
    assert splits_digits(AutoTokenizer.from_pretrained(tmp_path)) == (1 if split_digits is True else split_digits)
    plain = train_tokenizer(dates, kind="bpe", vocab_size=200)
    assert splits_digits(plain) is None
    assert any("-" in token and any(c.isdigit() for c in token) for token in plain.get_vocab())  # e.g. "4-03"
    with pytest.raises(ValueError, match="`split_digits` applies to 'bpe' and 'unigram' tokenizers"):
        train_tokenizer(dates, kind="word", vocab_size=None, split_digits=True)
