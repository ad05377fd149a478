"""Train a tokenizer from text with the `tokenizers` library and wrap it as a transformers fast tokenizer.

Kinds:
- "bpe" / "unigram": subword vocabularies for translation, trained on source and target text together (a joint
  vocabulary, so encoder and decoder embeddings can be shared). SentencePiece-style: spaces become "▁", so decoding
  gives back detokenized text, as sacreBLEU expects.
- "word": whitespace-separated words, for word-level language modelling. Trained with no size limit on Penn Treebank
  it gives the standard 10k vocabulary: the 9,999 words of ptb.train.txt (its `<unk>` is our unknown token) and the
  end of sentence. Words are stored with the "▁" space marker and decode with a leading space (strip it).
- "char": one token per character, newlines included (Tiny Shakespeare).
`split_digits` (bpe/unigram) cuts runs of digits into pieces of their own before BPE/unigram sees them, so no merge
joins digits of different fields ("0-12" in "1994-10-12"): `True` or 1 makes every digit a token (as Llama's
tokenizer does), N cuts digits into groups of at most N from the left ("1994" -> "19", "94" for 2; GPT-4 uses 3). The
demo uses 2: every output date is then "19", "94", "-", "03", "-", "23", each piece written from one source field.

Every tokenizer has the special tokens `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3 (the ids the model configs default
to). Translation tokenizers append `</s>` to each text they encode (`add_special_tokens=False` leaves it out);
language-model tokenizers (`add_eos=False`) do not, so a prompt is encoded as it is (transformers' text-generation
pipeline encodes prompts with the tokenizer's defaults) and the data pipeline adds `</s>` at line ends itself.

What a saved tokenizer is, is read back from the tokenizer itself in one place: `tokenizer_kind(tokenizer)` and
`appends_eos(tokenizer)` (the model cards, the training jobs and the CLI ask these instead of re-deriving them).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3
TOKENIZER_KINDS = ("bpe", "unigram", "word", "char")


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int | None = 8000,
    min_frequency: int = 1,
    lowercase: bool = False,
    split_digits: bool | int = False,
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
        split_digits: cut digits into pieces of their own ("bpe", "unigram" only), so no merge joins digits of
            different fields such as "0-12" in "1994-10-12": True or 1 (every digit a token), N (groups of at most N
            digits, from the left), False (no rule).
        padding_side: where batches are padded; "left" is the transformers convention for language-model prompts
            (saved with the tokenizer, so pipelines use it).
        add_eos: append `</s>` to every encoded text (translation); False for language models.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    check_tokenizer_settings(kind=kind, vocab_size=vocab_size, min_frequency=min_frequency, split_digits=split_digits)
    size = {"vocab_size": vocab_size} if vocab_size is not None else {}

    normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    if kind in ("bpe", "unigram"):
        if kind == "bpe":
            tokenizer = Tokenizer(models.BPE(unk_token=UNK))
            # show_progress=False: the Rust progress bar writes to the terminal's stdout, which carries results
            trainer = trainers.BpeTrainer(
                special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency, show_progress=False, **size
            )
        else:
            tokenizer = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(
                special_tokens=SPECIAL_TOKENS, unk_token=UNK, show_progress=False, **size
            )
        tokenizer.normalizer = normalizer
        # Digits split after the space marker: "▁1994" -> "▁", "1", "9", "9", "4" (decodes back to " 1994").
        if split_digits:
            # after the space marker, for 2: "▁1994-10-12" -> "▁", "19", "94", "-", "10", "-", "12"
            digits = pre_tokenizers.Split(Regex(rf"\d{{1,{int(split_digits)}}}"), behavior="isolated")
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), digits])
        else:
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


def check_tokenizer_settings(
    kind: str = "bpe",
    vocab_size: int | None = 8000,
    min_frequency: int = 1,
    split_digits: bool | int = False,
    **_,
) -> None:
    """The checks `train_tokenizer` makes on its settings, also run on a recipe before any work starts."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer `kind` must be one of {list(TOKENIZER_KINDS)}, got {kind!r}.")
    if vocab_size is None and kind in ("bpe", "unigram"):
        raise ValueError(f"a {kind} tokenizer needs a `vocab_size`.")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"`vocab_size` must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}."
        )
    if min_frequency < 1:
        raise ValueError(f"`min_frequency` must be >= 1, got {min_frequency}.")
    if not isinstance(split_digits, (bool, int)) or split_digits < 0:
        raise ValueError(f"`split_digits` must be false, true or a group size >= 1, got {split_digits!r}.")
    if split_digits and kind not in ("bpe", "unigram"):
        raise ValueError(f"`split_digits` applies to 'bpe' and 'unigram' tokenizers, not {kind!r}.")


def tokenizer_kind(tokenizer: PreTrainedTokenizerBase) -> str:
    """What a (saved or trained) tokenizer is: "bpe", "unigram", "word", "char", or another model's lowercased name
    ("wordpiece", ...); "slow" for a tokenizer without a `tokenizers` backend.

    Read from the tokenizer itself, so it also holds for a tokenizer loaded from a folder or the Hub: our character
    tokenizers are word-level models whose decoder fuses the pieces without spaces.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "slow"
    model = type(backend.model).__name__
    if model == "WordLevel":
        return "char" if isinstance(backend.decoder, decoders.Fuse) else "word"
    return {"BPE": "bpe", "Unigram": "unigram"}.get(model, model.lower())


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding a text with the tokenizer's defaults ends it with the end token (translation tokenizers do,
    language-model tokenizers do not). Found by encoding a text, so it holds for any tokenizer."""
    if tokenizer.eos_token_id is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[-1:] == [tokenizer.eos_token_id] and plain[-1:] != [tokenizer.eos_token_id]


DIGIT_GROUPS = re.compile(r"\\d\{1,(\d+)\}")


def splits_digits(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The size of the digit groups the tokenizer cuts digits into (`split_digits`; 1: every digit), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    described = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    for step in described.get("pretokenizers", [described]):
        if step.get("type") == "Digits" and step.get("individual_digits"):
            return 1
        if step.get("type") == "Split":
            found = DIGIT_GROUPS.fullmatch((step.get("pattern") or {}).get("Regex", ""))
            if found:
                return int(found[1])
    return None


def lm_reads_lines(tokenizer: PreTrainedTokenizerBase) -> bool:
    """How a language model's text becomes one token stream with this tokenizer: line by line with `</s>` after each
    line (word and subword vocabularies, as in Penn Treebank), or as raw text with its newlines (characters)."""
    return tokenizer_kind(tokenizer) != "char"


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


__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "appends_eos",
    "check_tokenizer_settings",
    "lm_reads_lines",
    "special_token_ids",
    "splits_digits",
    "tokenizer_kind",
    "train_tokenizer",
    "wrap_tokenizer",
]
