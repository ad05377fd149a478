"""Train a tokenizer from text with the `tokenizers` library and wrap it as a transformers fast tokenizer.

Kinds:
- "bpe" / "unigram": subword vocabularies for translation, trained on source and target text together (a joint
  vocabulary, so encoder and decoder embeddings can be shared). SentencePiece-style: spaces become "▁", so decoding
  gives back detokenized text, as sacreBLEU expects.
- "word": whitespace-separated words, for word-level language modelling. Trained with no size limit on Penn Treebank
  it gives the standard 10k vocabulary: the 9,999 words of ptb.train.txt (its `<unk>` is our unknown token) and the
  end of sentence. Words are stored with the "▁" space marker and decode with a leading space (strip it).
- "char": one token per character, newlines included (Tiny Shakespeare).

Every tokenizer has the special tokens `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3 (the ids the model configs default
to). Translation tokenizers append `</s>` to each text they encode (`add_special_tokens=False` leaves it out);
language-model tokenizers (`add_eos=False`) do not, so a prompt is encoded as it is (transformers' text-generation
pipeline encodes prompts with the tokenizer's defaults) and the data pipeline adds `</s>` at line ends itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3
TOKENIZER_KINDS = ("bpe", "unigram", "word", "char")


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int | None = 8000,
    min_frequency: int = 1,
    lowercase: bool = False,
    padding_side: str = "right",
    add_eos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of `kind` on `texts` and return it as a `PreTrainedTokenizerFast`.

    Args:
        texts: training text, one sentence (or document) per item.
        kind: "bpe", "unigram", "word" or "char".
        vocab_size: largest vocabulary, special tokens included; None keeps every word/character seen ("word",
            "char" only).
        min_frequency: drop words/merges seen fewer times (not used by "unigram" and "char").
        lowercase: lowercase the text before anything else (and at encoding time).
        padding_side: where batches are padded; "left" is the transformers convention for language-model prompts
            (saved with the tokenizer, so pipelines use it).
        add_eos: append `</s>` to every encoded text (translation); False for language models.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer `kind` must be one of {list(TOKENIZER_KINDS)}, got {kind!r}.")
    if vocab_size is None and kind in ("bpe", "unigram"):
        raise ValueError(f"a {kind} tokenizer needs a `vocab_size`.")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"`vocab_size` must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}."
        )
    size = {"vocab_size": vocab_size} if vocab_size is not None else {}

    normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    if kind in ("bpe", "unigram"):
        if kind == "bpe":
            tokenizer = Tokenizer(models.BPE(unk_token=UNK))
            trainer = trainers.BpeTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency, **size)
        else:
            tokenizer = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(special_tokens=SPECIAL_TOKENS, unk_token=UNK, **size)
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        tokenizer.train_from_iterator(texts, trainer)
    else:
        if kind == "word":
            # Words carry the SentencePiece space marker ("▁the") and decode with their leading space, so text
            # decoded piece by piece (transformers' text-generation pipeline decodes the new tokens on their own
            # and appends them to the prompt) keeps its spaces.
            pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always", split=False)]
            )
        else:
            pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        vocab = count_vocabulary(texts, normalizer, pre_tokenizer, vocab_size, min_frequency if kind == "word" else 1)
        tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = decoders.Fuse() if kind == "char" else decoders.Metaspace(prepend_scheme="never")

    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # matched in raw text (PTB's literal "<unk>" is our unknown token)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    if add_eos:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 2)])
    return wrap_tokenizer(tokenizer, padding_side)


def count_vocabulary(
    texts: Iterable[str],
    normalizer: normalizers.Normalizer,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    vocab_size: int | None,
    min_frequency: int,
) -> dict[str, int]:
    """Word/character vocabulary: special tokens first, then pieces by decreasing count (ties: first seen first).

    Built by hand because `WordLevelTrainer` gives special tokens found in the text (PTB's "<unk>") odd ids.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    for token in SPECIAL_TOKENS:  # special tokens in the text are matched as such when encoding, never as words
        counts.pop(token, None)
        counts.pop(f"▁{token}", None)
    pieces = [piece for piece, count in counts.most_common() if count >= min_frequency]
    if vocab_size is not None:
        pieces = pieces[: vocab_size - len(SPECIAL_TOKENS)]
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + pieces)}


def wrap_tokenizer(tokenizer: Tokenizer, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` with our special tokens as a transformers tokenizer (loads with `AutoTokenizer`)."""
    return PreTrainedTokenizerFast(
        padding_side=padding_side,
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The token-id fields of a model config, read from the tokenizer."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


__all__ = ["SPECIAL_TOKENS", "TOKENIZER_KINDS", "special_token_ids", "train_tokenizer", "wrap_tokenizer"]
