"""Using trained models: batched translation, attention of one translation, and language-model perplexity."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .metrics import load_metric


@torch.no_grad()
def translate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    batch_size: int = 32,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Translate `sentences` in batches of similar length; returns detokenized strings in the input order.

    An empty (or whitespace-only) sentence gives an empty translation without running the model. Generation
    options (num_beams, max_new_tokens, length_penalty, ...) default to the model's generation config.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    outputs = [""] * len(sentences)
    todo = [i for i, sentence in enumerate(sentences) if sentence.strip()]
    lengths = {i: len(tokenizer(sentences[i])["input_ids"]) for i in todo}
    todo.sort(key=lambda i: lengths[i])  # similar lengths together: little padding, faster batches
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="translating", disable=not progress):
        encoded = tokenizer([sentences[i] for i in batch], return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(**encoded, **generate_kwargs)
        for i, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs


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


__all__ = ["attention_weights", "evaluate_perplexity", "translate"]
