"""Export to `torch.export` programs and ONNX: the pieces a serving runtime calls, as modules of tensors only.

A language model is exported as one *step* module, `(input_ids [B, T], *state) -> (logits [B, T, V], *state)`, and
a Seq2Seq model as two: the encoder, `(input_ids [B, S], attention_mask [B, S]) -> (memory, keys, *decoder state)`,
and one decoder step, `(decoder_input_ids [B, 1], memory, keys, attention_mask, *state) -> (logits [B, V], *state)`.
The state is `h` (and `c` for an LSTM), each `[layers, B, H]`, plus the previous attentional vector `[B, H]` for a
decoder with input feeding. A decoding loop (greedy, beam search) around the step runs in the serving runtime.

Shapes: the batch size is dynamic everywhere, and so is the source length seen by the decoder step. Lengths that a
recurrent layer runs over are fixed when exporting (torch.export unrolls `nn.LSTM` / `nn.GRU` over time): the LM step
reads `length` tokens per call (default 1: one decoding step; feed a prompt token by token), and the encoder reads
`source_length` tokens (pad every batch to that length; padding is skipped exactly as in PyTorch).

Example:

```python
from rnn_seq2seq_hf.export import export_onnx

paths = export_onnx(model, "onnx/")  # {"encoder": ..., "decoder_step": ...} or {"lm_step": ...}
```
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class LMStepForExport(nn.Module):
    """`(input_ids [B, T], *state) -> (logits [B, T, V], *state)` of an `RNNLMForCausalLM` (no padding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        weight = self.model.lm_head.linear.weight
        return self.model.model.rnn.zero_state(batch_size, weight.device, weight.dtype)

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        lm = self.model
        embeddings = lm.model.embed_tokens(input_ids)
        outputs, new_state, _ = lm.model.rnn(embeddings, tuple(state))
        logits = lm.lm_head(outputs)
        if lm.input_to_output is not None:
            logits = logits + lm.input_to_output(embeddings)
        return (logits, *new_state)


class EncoderForExport(nn.Module):
    """`(input_ids [B, S], attention_mask [B, S]) -> (memory [B, S, H], keys, *decoder state)` of an
    `RNNSeq2SeqForConditionalGeneration` (keys are what the attention compares the decoder state with: `[B, H, S]`
    for dot and general attention, `[B, S, A]` for additive attention, the memory itself without attention)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        encoder, decoder = self.model.model.encoder, self.model.model.decoder
        encoded = encoder(input_ids=input_ids, attention_mask=attention_mask)
        memory = encoded.last_hidden_state
        keys = memory if decoder.attention is None else decoder.attention.project_memory(memory)
        state = decoder.bridge(encoded)
        if decoder.input_feeding:
            state = (*state, memory.new_zeros(memory.shape[0], decoder.hidden_size))
        return (memory, keys, *state)


class DecoderStepForExport(nn.Module):
    """`(decoder_input_ids [B, 1], memory, keys, attention_mask [B, S], *state) -> (logits [B, V], *state)`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, memory, keys, attention_mask, *state):
        decoder = self.model.model.decoder
        input_feed = None
        if decoder.input_feeding:
            *state, input_feed = state
        embedding = decoder.embed_tokens(decoder_input_ids)
        padding = (attention_mask == 0)[:, None, :]  # [B, 1, S], True at source padding
        feature, _, new_state, _ = decoder.step(embedding, tuple(state), input_feed, memory, keys, padding, None)
        logits = self.model.lm_head(feature)[:, 0]
        extra = (feature[:, 0],) if decoder.input_feeding else ()
        return (logits, *new_state, *extra)


def _state_names(model, prefix: str = "") -> list[str]:
    names = ["h", "c"] if model.config.cell_type == "lstm" else ["h"]
    if model.config.is_encoder_decoder and model.config.input_feeding:
        names.append("input_feed")
    return [f"{prefix}{name}" for name in names]


def export_programs(model, batch_size: int = 2, length: int = 1, source_length: int = 16) -> dict:
    """`torch.export` programs of the model's pieces (see the module docstring), traced on random inputs.

    Args:
        length: tokens per call of the LM step.
        source_length: source tokens per call of the encoder.

    Returns `{"lm_step": program}` for a language model, `{"encoder": ..., "decoder_step": ...}` for a Seq2Seq
    model, each with the example inputs it was traced on under `"<name>_inputs"`.
    """
    model = model.eval()
    with warnings.catch_warnings():
        # nn.RNNBase re-reads its weights into `_flat_weights` on every call; torch.export reports that as a tensor
        # attribute assigned during export, which is harmless here (the weights are the module's parameters).
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        return _export_programs(model, batch_size, length, source_length)


def _export_programs(model, batch_size: int, length: int, source_length: int) -> dict:
    device = model.device
    vocab = model.config.vocab_size
    batch = torch.export.Dim("batch", min=1)
    programs = {}
    if not model.config.is_encoder_decoder:
        step = LMStepForExport(model)
        inputs = (torch.randint(3, vocab, (batch_size, length), device=device), *step.initial_state(batch_size))
        shapes = ({0: batch}, tuple({1: batch} for _ in inputs[1:]))  # forward(input_ids, *state)
        programs["lm_step"] = torch.export.export(step, inputs, dynamic_shapes=shapes)
        programs["lm_step_inputs"] = inputs
        return programs

    input_ids = torch.randint(3, vocab, (batch_size, source_length), device=device)
    mask = torch.ones(batch_size, source_length, dtype=torch.long, device=device)
    mask[0, max(1, source_length // 2) :] = 0  # one padded row
    encoder = EncoderForExport(model)
    programs["encoder"] = torch.export.export(encoder, (input_ids, mask), dynamic_shapes=({0: batch}, {0: batch}))
    programs["encoder_inputs"] = (input_ids, mask)

    with torch.no_grad():
        memory, keys, *state = encoder(input_ids, mask)
    step = DecoderStepForExport(model)
    start = torch.full((batch_size, 1), model.config.decoder_start_token_id, device=device)
    step_inputs = (start, memory, keys, mask, *state)
    source = torch.export.Dim("source", min=2)
    state_shapes = tuple({1: batch} if tensor.dim() == 3 else {0: batch} for tensor in state)
    keys_source_dim = 2 if model.config.attention_type in ("dot", "general") else 1  # dot/general keys: [B, K, S]
    keys_shape = {0: batch, keys_source_dim: source}
    step_shapes = ({0: batch}, {0: batch, 1: source}, keys_shape, {0: batch, 1: source}, state_shapes)
    programs["decoder_step"] = torch.export.export(step, step_inputs, dynamic_shapes=step_shapes)
    programs["decoder_step_inputs"] = step_inputs
    return programs


def export_onnx(
    model, output_dir: str | Path, batch_size: int = 2, length: int = 1, source_length: int = 16
) -> dict[str, Path]:
    """Write the model's pieces as ONNX files into `output_dir` (needs `pip install onnx onnxscript`, or the
    `export` extra); returns their paths. Input and output names: `input_ids`, `attention_mask`,
    `decoder_input_ids`, `memory`, `keys`, `h`/`c` (`input_feed`), `logits`, and `next_h`/`next_c`
    (`next_input_feed`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    programs = export_programs(model, batch_size=batch_size, length=length, source_length=source_length)
    if "lm_step" in programs:
        names = {"lm_step": (["input_ids", *_state_names(model)], ["logits", *_state_names(model, "next_")])}
    else:
        names = {
            "encoder": (["input_ids", "attention_mask"], ["memory", "keys", *_state_names(model)]),
            "decoder_step": (
                ["decoder_input_ids", "memory", "keys", "attention_mask", *_state_names(model)],
                ["logits", *_state_names(model, "next_")],
            ),
        }
    paths = {}
    for name, (input_names, output_names) in names.items():
        path = output_dir / f"{name}.onnx"
        onnx_program = torch.onnx.export(
            programs[name], input_names=input_names, output_names=output_names, dynamo=True, verbose=False
        )
        onnx_program.save(str(path))
        paths[name] = path
    return paths


__all__ = ["DecoderStepForExport", "EncoderForExport", "LMStepForExport", "export_onnx", "export_programs"]
