"""A text-to-text pipeline for encoder-decoder models, registered as the task "seq2seq-generation".

transformers 5.x removed (and blocks the names of) `text2text-generation`, `translation` and `summarization`, so an
encoder-decoder model needs a pipeline of its own. Strings in, `{"generated_text": ...}` out, with batching,
generation keyword arguments (num_beams, max_new_tokens, ...) and, on request, the source-target alignment.

This file imports only installed packages: it travels with Seq2Seq checkpoints (config.json names it under
`custom_pipelines`), so `pipeline("seq2seq-generation", model=repo_id, trust_remote_code=True)` works for people who
never installed rnn_seq2seq_hf.
"""

from __future__ import annotations

import torch
from transformers import Pipeline

TASK = "seq2seq-generation"


class Seq2SeqGenerationPipeline(Pipeline):
    """Generate text from text with an encoder-decoder model.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> translator = pipeline("seq2seq-generation", model="path/to/model")
    >>> translator(["ein Hund läuft", "zwei Katzen"], num_beams=5, batch_size=2)
    [[{'generated_text': 'a dog runs'}], [{'generated_text': 'two cats'}]]
    ```

    Call arguments:
        inputs: a string or a list of strings.
        return_alignment: also return, per output, the decoder's attention over the source while writing it
            (`{"source_tokens", "target_tokens", "weights"}`, weights as `[target][source]` lists). The weights come
            from one teacher-forced pass over the final output, so they belong to the sequence returned even after
            beam search.
        truncation: truncate inputs longer than the tokenizer's maximum length.
        Any `generate()` argument: num_beams, max_new_tokens, num_return_sequences, do_sample, ...

    An empty (or blank) input gives an empty output.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, return_alignment=None, truncation=None, **generate_kwargs):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        postprocess_params = {} if return_alignment is None else {"return_alignment": return_alignment}
        forward_params = dict(generate_kwargs)
        if return_alignment is not None:
            forward_params["return_alignment"] = return_alignment
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, inputs: str | list[str], **kwargs):
        """Generate for one string (returns a list of outputs) or a list of strings (a list of such lists)."""
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ValueError(f"{TASK}: `inputs` is an empty list; give a string or a list of at least one string")
        return super().__call__(inputs, **kwargs)

    def preprocess(self, text: str, truncation: bool = False) -> dict:
        if not isinstance(text, str):
            raise ValueError(f"{TASK} takes strings (or lists of strings), got {type(text).__name__}")
        encoded = self.tokenizer(text, return_tensors="pt", truncation=truncation)
        encoded["is_empty"] = torch.tensor([not text.strip()])
        return encoded

    def _forward(self, model_inputs: dict, return_alignment: bool = False, **generate_kwargs) -> dict:
        is_empty = model_inputs.pop("is_empty")
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs.get("attention_mask")
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        generated = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        batch_size = input_ids.shape[0]
        per_input = generated.shape[0] // batch_size  # num_return_sequences
        outputs = {"generated": generated.view(batch_size, per_input, -1), "is_empty": is_empty}
        if return_alignment:
            repeated_mask = None if attention_mask is None else attention_mask.repeat_interleave(per_input, 0)
            forward = self.model(
                input_ids=input_ids.repeat_interleave(per_input, 0),
                attention_mask=repeated_mask,
                decoder_input_ids=generated[:, :-1],
                output_attentions=True,
            )
            if forward.cross_attentions is None:
                raise ValueError("return_alignment needs a model with attention (this one has attention_type='none')")
            weights = forward.cross_attentions[0][:, 0]  # [B * R, T - 1, S]: row t wrote output token t + 1
            outputs["alignment"] = weights.reshape(batch_size, per_input, *weights.shape[1:])
            outputs["input_ids"] = input_ids
            outputs["attention_mask"] = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return outputs

    def postprocess(self, model_outputs: dict, return_alignment: bool = False) -> list[dict]:
        empty = bool(model_outputs["is_empty"][0])
        records = []
        for index, sequence in enumerate(model_outputs["generated"][0]):
            output_ids = sequence[1:].tolist()  # drop the decoder start token
            if self.tokenizer.eos_token_id in output_ids:
                output_ids = output_ids[: output_ids.index(self.tokenizer.eos_token_id) + 1]
            text = "" if empty else self.tokenizer.decode(output_ids, skip_special_tokens=True).strip()
            record = {"generated_text": text}
            if return_alignment:
                real = model_outputs["attention_mask"][0].bool()  # the source may be padded on either side
                source_ids = model_outputs["input_ids"][0][real].tolist()
                output_ids = [] if empty else output_ids
                weights = model_outputs["alignment"][0][index][: len(output_ids)][:, real]
                record["alignment"] = {
                    "source_tokens": self.tokenizer.convert_ids_to_tokens(source_ids),
                    "target_tokens": self.tokenizer.convert_ids_to_tokens(output_ids),
                    "weights": weights.float().cpu().tolist(),
                }
            records.append(record)
        return records


__all__ = ["TASK", "Seq2SeqGenerationPipeline"]
