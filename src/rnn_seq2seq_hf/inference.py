"""Using trained models: batched translation (n-best lists, scores, alignments), forced decoding of given
translations, attention of one translation, and language-model perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .metrics import load_metric

# Outputs stop here when neither the caller nor the model's generation config sets a length limit (transformers'
# own fallback, 20 tokens in all, silently cuts longer translations and warns on every call).
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Alignment:
    """Where the decoder looked while writing one output: cross-attention weights from a teacher-forced pass.

    Attributes:
        source_tokens: the source as the model read it (subword tokens, `</s>` included).
        target_tokens: the output tokens (the final `</s>` included when the output ended).
        weights: `[len(target_tokens), len(source_tokens)]`; row t is the attention while writing target token t.
    """

    source_tokens: list[str]
    target_tokens: list[str]
    weights: np.ndarray

    def hard(self, eos_token: str | None = None) -> list[tuple[int, int]]:
        """`(source index, target index)` of the most attended source token for every target token, a final
        `eos_token` excluded."""
        count = len(self.target_tokens)
        if count and eos_token is not None and self.target_tokens[-1] == eos_token:
            count -= 1
        return [(int(self.weights[t].argmax()), t) for t in range(count)]

    def to_dict(self) -> dict:
        return {
            "source_tokens": self.source_tokens,
            "target_tokens": self.target_tokens,
            "weights": self.weights.tolist(),
        }


@dataclass
class Hypothesis:
    """One translation of one sentence.

    Attributes:
        text: the detokenized output ("" for an empty input).
        token_ids: the output token ids (no decoder start token; up to and including the first `</s>`).
        log_prob: log p(output | source), summed over the output tokens, `</s>` included (None unless scores were
            asked for, and for an empty input).
        score: `log_prob / len(token_ids) ** length_penalty`, the quantity beam search ranks finished hypotheses by
            (with the default `length_penalty` 1.0: the mean log-probability per token).
        alignment: the cross attention of the output (None unless asked for).
    """

    text: str
    token_ids: list[int]
    log_prob: float | None = None
    score: float | None = None
    alignment: Alignment | None = None


@dataclass
class SentenceScore:
    """Forced-decoding score of one given translation: `log_prob` summed over its `tokens` target tokens (its
    `</s>` included) and `perplexity = exp(-log_prob / tokens)`."""

    log_prob: float
    tokens: int
    perplexity: float


def make_batches(
    lengths: Sequence[int], batch_size: int | None = 32, max_tokens: int | None = None
) -> list[list[int]]:
    """Group the indices of `lengths` into batches of similar length (sorted, shortest first).

    A batch holds at most `batch_size` sentences (None: no limit) and at most `max_tokens` tokens counting padding,
    i.e. rows x the longest length in the batch (None: no limit). A sentence longer than `max_tokens` gets a batch
    of its own.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens or both")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        batch = batches[-1] if batches else None
        fits = batch is not None and (batch_size is None or len(batch) < batch_size)
        # sorted by length, so the new sentence is the batch's longest
        fits = fits and (max_tokens is None or (len(batch) + 1) * lengths[index] <= max_tokens)
        if fits:
            batch.append(index)
        else:
            batches.append([index])
    return batches


def _length_limit(model: PreTrainedModel, generate_kwargs: dict) -> dict:
    """`generate_kwargs` with `max_new_tokens=DEFAULT_MAX_NEW_TOKENS` added when nothing sets a length limit."""
    config = model.generation_config
    limits = ("max_new_tokens", "max_length")
    if any(generate_kwargs.get(name) is not None or getattr(config, name, None) is not None for name in limits):
        return generate_kwargs
    return {**generate_kwargs, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}


def _output_ids(sequence: torch.Tensor, eos_token_id: int | None) -> list[int]:
    """Generated ids without the decoder start token, cut after the first `</s>` (what follows is padding)."""
    ids = sequence[1:].tolist()
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id) + 1]
    return ids


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    outputs: list[list[int]],
    with_attention: bool = False,
) -> tuple[list[list[float]], torch.Tensor | None]:
    """Per-token log-probabilities of given outputs, from one forward pass with the outputs as decoder inputs.

    Args:
        input_ids, attention_mask: `[B, S]` sources; `outputs` holds `len(outputs) = B * R` token lists (R outputs
            per source, in order), each without the decoder start token.
        with_attention: also return the cross attention `[B * R, T, S]` (T = the longest output).

    Returns:
        log p of each output token given the source and the tokens before it, per output; the attention or None.
    """
    repeats = len(outputs) // input_ids.shape[0]
    length = max(1, max(len(ids) for ids in outputs))
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id or 0
    decoder_input_ids = torch.full((len(outputs), length), pad, dtype=torch.long)
    labels = torch.zeros((len(outputs), length), dtype=torch.long)
    for row, ids in enumerate(outputs):
        decoder_input_ids[row, : len(ids)] = torch.tensor([start, *ids[:-1]][: len(ids)], dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    out = model(
        input_ids=input_ids.repeat_interleave(repeats, 0),
        attention_mask=attention_mask.repeat_interleave(repeats, 0),
        decoder_input_ids=decoder_input_ids.to(input_ids.device),
        output_attentions=with_attention,
        use_cache=False,
    )
    logprobs = out.logits.float().log_softmax(-1)  # [B * R, T, V]
    picked = logprobs.gather(-1, labels.to(logprobs.device)[..., None])[..., 0].cpu()  # [B * R, T]
    per_token = [picked[row, : len(ids)].tolist() for row, ids in enumerate(outputs)]
    attention = None
    if with_attention:
        if out.cross_attentions is None:
            raise ValueError("alignments need a model with attention (this one has attention_type='none')")
        attention = out.cross_attentions[0][:, 0]  # [B * R, T, S]: row t wrote output token t
    return per_token, attention


@torch.no_grad()
def translate_hypotheses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    batch_size: int | None = 32,
    max_tokens: int | None = None,
    n_best: int = 1,
    with_scores: bool = False,
    with_alignment: bool = False,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs,
) -> list[list[Hypothesis]]:
    """Translate `sentences`; returns, in input order, the `n_best` best hypotheses of each (best first).

    Sentences are sorted by length and batched (`batch_size` sentences and/or `max_tokens` source tokens per batch,
    see `make_batches`); results do not depend on the batching. An empty (or whitespace-only) sentence gives
    `n_best` empty hypotheses without running the model. Generation options (num_beams, max_new_tokens,
    length_penalty, ...) default to the model's generation config; `n_best > 1` returns that many beams (num_beams
    defaults to at least `n_best`). With neither setting a length limit, outputs stop after
    `DEFAULT_MAX_NEW_TOKENS` tokens.

    `with_scores` fills `log_prob` and `score`, `with_alignment` the cross attention, both from one teacher-forced
    pass over the final outputs (so they belong to the returned sequences, whatever the search did).
    `on_batch(n)` is called after each batch with its number of sentences (for progress bars).
    """
    if n_best < 1:
        raise ValueError(f"n_best must be >= 1, got {n_best}")
    generate_kwargs = _length_limit(model, dict(generate_kwargs))
    if n_best > 1:
        beams = generate_kwargs.get("num_beams")
        if beams is not None and beams < n_best:
            raise ValueError(f"n_best ({n_best}) cannot exceed num_beams ({beams})")
        generate_kwargs["num_beams"] = beams or max(n_best, model.generation_config.num_beams or 1)
        generate_kwargs["num_return_sequences"] = n_best
    length_penalty = generate_kwargs.get("length_penalty", model.generation_config.length_penalty)
    length_penalty = 1.0 if length_penalty is None else length_penalty
    eos = model.config.eos_token_id
    model.eval()

    results: list[list[Hypothesis]] = [[Hypothesis("", []) for _ in range(n_best)] for _ in sentences]
    todo = [i for i, sentence in enumerate(sentences) if sentence.strip()]
    lengths = [len(ids) for ids in tokenizer([sentences[i] for i in todo])["input_ids"]] if todo else []
    batches = [[todo[k] for k in batch] for batch in make_batches(lengths, batch_size, max_tokens)] if todo else []
    for batch in tqdm(batches, desc="translating", disable=not progress):
        encoded = tokenizer([sentences[i] for i in batch], return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(**encoded, **generate_kwargs)
        outputs = [_output_ids(sequence, eos) for sequence in generated]  # len(batch) * n_best, best first
        per_token, attention = None, None
        if with_scores or with_alignment:
            per_token, attention = teacher_forced(
                model, encoded["input_ids"], encoded["attention_mask"], outputs, with_alignment
            )
        for row, ids in enumerate(outputs):
            source_row, rank = divmod(row, n_best)
            hypothesis = Hypothesis(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids)
            if per_token is not None and with_scores:
                hypothesis.log_prob = float(sum(per_token[row]))
                hypothesis.score = hypothesis.log_prob / max(1, len(ids)) ** length_penalty
            if attention is not None:
                real = encoded["attention_mask"][source_row].bool()  # the source may be padded on either side
                hypothesis.alignment = Alignment(
                    source_tokens=tokenizer.convert_ids_to_tokens(encoded["input_ids"][source_row][real].tolist()),
                    target_tokens=tokenizer.convert_ids_to_tokens(ids),
                    weights=attention[row, : len(ids)][:, real].float().cpu().numpy(),
                )
            results[batch[source_row]][rank] = hypothesis
        if on_batch is not None:
            on_batch(len(batch))
    return results


def translate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    batch_size: int | None = 32,
    progress: bool = False,
    max_tokens: int | None = None,
    **generate_kwargs,
) -> list[str]:
    """Translate `sentences` in batches of similar length; returns detokenized strings in the input order.

    An empty (or whitespace-only) sentence gives an empty translation without running the model. Generation
    options (num_beams, max_new_tokens, length_penalty, ...) default to the model's generation config; see
    `translate_hypotheses` for batching (`batch_size`, `max_tokens`) and the default length limit.
    """
    hypotheses = translate_hypotheses(
        model, tokenizer, sentences, batch_size=batch_size, max_tokens=max_tokens, progress=progress, **generate_kwargs
    )
    return [best.text for best, *_ in hypotheses]


@torch.no_grad()
def score_translations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    targets: Sequence[str],
    batch_size: int | None = 32,
    max_tokens: int | None = None,
    progress: bool = False,
) -> list[SentenceScore]:
    """Forced decoding: how likely the model finds each given translation (teacher-forced, no search).

    Targets are tokenized as training tokenizes labels (ending in `</s>`), so an empty target is the probability
    of stopping at once. Returns one `SentenceScore` per pair, in input order.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    model.eval()
    target_ids = tokenizer(list(targets))["input_ids"] if targets else []
    lengths = [len(ids) for ids in tokenizer(list(sources))["input_ids"]] if sources else []
    results: list[SentenceScore | None] = [None] * len(sources)
    for batch in tqdm(make_batches(lengths, batch_size, max_tokens), desc="scoring", disable=not progress):
        encoded = tokenizer([sources[i] for i in batch], return_tensors="pt", padding=True).to(model.device)
        per_token, _ = teacher_forced(
            model, encoded["input_ids"], encoded["attention_mask"], [target_ids[i] for i in batch]
        )
        for i, logprobs in zip(batch, per_token):
            log_prob = float(sum(logprobs))
            results[i] = SentenceScore(log_prob, len(logprobs), math.exp(-log_prob / len(logprobs)))
    return results


@torch.no_grad()
def attention_weights(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str, translation: str
) -> tuple[np.ndarray, list[str], list[str]]:
    """Attention of the decoder over the source while it produces `translation` (teacher-forced).

    Returns weights `[target tokens, source tokens]` and the token strings of both sides (`</s>` included).
    """
    model.eval()
    encoded = tokenizer([source], return_tensors="pt").to(model.device)
    labels = tokenizer([translation], return_tensors="pt")["input_ids"].to(model.device)
    out = model(**encoded, labels=labels, output_attentions=True)
    if out.cross_attentions is None:
        raise ValueError("this model has no attention (attention_type='none')")
    weights = out.cross_attentions[0][0, 0].float().cpu().numpy()
    source_tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    target_tokens = tokenizer.convert_ids_to_tokens(labels[0].tolist())
    return weights, source_tokens, target_tokens


@torch.no_grad()
def evaluate_perplexity(
    model: PreTrainedModel, stream: np.ndarray, batch_size: int = 10, block_size: int = 70, progress: bool = False
) -> dict[str, float]:
    """Perplexity of a causal LM on a token stream, carrying the recurrent state across blocks.

    The stream is cut into `batch_size` contiguous parts read side by side (the usual batched evaluation of PTB
    language models); the tokens left over by the division form one more part. Every token of a part except its
    first is predicted from everything before it in the part, through the cache.

    Returns perplexity, nats and bits per token, and the number of predicted tokens.
    """
    model.eval()
    stream = torch.as_tensor(stream, dtype=torch.long)
    per_part = len(stream) // batch_size
    parts = [stream[: per_part * batch_size].view(batch_size, per_part)] if per_part > 1 else []
    if len(stream) - per_part * batch_size > 1 or not parts:
        parts.append(stream[per_part * batch_size if parts else 0 :][None])
    nll_sums, token_counts = [], []
    for part in parts:
        part = part.to(model.device)
        cache = None
        starts = range(0, part.shape[1] - 1, block_size)
        for start in tqdm(starts, desc="perplexity", disable=not progress):
            inputs = part[:, start : start + block_size]
            targets = part[:, start + 1 : start + block_size + 1]
            inputs = inputs[:, : targets.shape[1]]
            out = model(input_ids=inputs, cache=cache, use_cache=True)
            cache = out.cache
            logprobs = out.logits.float().log_softmax(-1)
            nll_sums.append(-logprobs.gather(-1, targets[..., None]).sum().item())
            token_counts.append(targets.numel())
    result = load_metric("perplexity").compute(nll_sums=nll_sums, token_counts=token_counts)
    result["bits_per_token"] = result["nats_per_token"] / math.log(2)
    return result


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "Alignment",
    "Hypothesis",
    "SentenceScore",
    "attention_weights",
    "evaluate_perplexity",
    "make_batches",
    "score_translations",
    "teacher_forced",
    "translate",
    "translate_hypotheses",
]
