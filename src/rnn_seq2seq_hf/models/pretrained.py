"""What both recurrent families tell transformers about themselves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from .generation_rnn import check_generation_arguments
from .initialization import init_weights_uniform


class RecurrentPreTrainedModel(PreTrainedModel):
    """Base of the LM and Seq2Seq classes: weight init and the flags `generate()` reads."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    # The recurrent stacks recompute chunks of time steps (or layers) in the backward pass; see recurrent.py.
    supports_gradient_checkpointing = True
    # The state lives in the cache and cannot be rolled back, so assisted decoding refuses cleanly instead of
    # producing wrong text.
    _is_stateful = True
    _no_split_modules = ["RecurrentStack"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The models build their own RNNCache on the first forward. Otherwise generate() would create a
        # DynamicCache (and, for encoder-decoders, an EncoderDecoderCache that rejects recurrent layers).
        return False

    def _init_weights(self, module: nn.Module) -> None:
        init_weights_uniform(module, self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, stricter: weights come from safetensors only (never a pickle), and a
        checkpoint whose tensors do not match the model (a missing or unexpected tensor, a tensor of another shape)
        or whose `generation_config.json` is broken is an error naming the file and the keys, not a warning with
        silently changed outputs. Keys merely absent from an older config.json take their defaults as usual."""
        kwargs.setdefault("use_safetensors", True)
        if kwargs["use_safetensors"] is not True:
            raise ValueError(
                f"`use_safetensors` must be True for {cls.__name__}: weights are loaded from safetensors only "
                "(pickled `pytorch_model.bin` files can run code when loaded)."
            )
        want_info = kwargs.pop("output_loading_info", False)
        generation_values = read_generation_config_file(pretrained_model_name_or_path)
        user_ignores_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            # mismatched shapes are collected (not raised as a multi-line report) and refused below with their keys
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except OSError:
            folder = Path(str(pretrained_model_name_or_path))
            if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
                raise OSError(
                    f"{folder}: no safetensors weights (only {sorted(p.name for p in folder.glob('*.bin'))}); "
                    "this library loads safetensors only. Convert the checkpoint once, where you trust it: "
                    "`model = ...from_pretrained(folder, use_safetensors=False, weights_only=True)` with plain "
                    "transformers, then `model.save_pretrained(new_folder)`."
                ) from None
            raise
        check_loading_info(info, pretrained_model_name_or_path, allow_mismatched=user_ignores_sizes)
        if generation_values is not None:
            check_generation_config(model, generation_values, pretrained_model_name_or_path)
        model.realign_weights()
        return (model, info) if want_info else model

    def flatten_recurrent_weights(self) -> None:
        """Put each recurrent layer's weights back into one contiguous buffer (cuDNN's layout); call after moving
        or wrapping the model (DDP) so cuDNN does not re-flatten, and warn, on every call."""
        for module in self.modules():
            if isinstance(module, nn.RNNBase):
                module.flatten_parameters()

    @torch.no_grad()
    def realign_weights(self) -> None:
        """Give every parameter its own aligned memory and re-flatten the recurrent weights.

        Loaded weights are views into the memory-mapped safetensors file at arbitrary byte offsets. Matrix kernels
        pick other code paths for unaligned memory, so outputs then differ from the saved model's in the last bits
        (seen: 1e-6 on CPU). A copy makes a reloaded model compute bit-identically, and on a GPU
        `flatten_parameters` keeps cuDNN's weights in one contiguous buffer.
        """
        for parameter in self.parameters():
            if parameter.data_ptr() % 64:
                parameter.data = parameter.data.clone()
        for module in self.modules():
            if isinstance(module, nn.RNNBase):
                module._init_flat_weights()
        self.flatten_recurrent_weights()


def check_loading_info(info: dict, source, allow_mismatched: bool = False) -> None:
    """Raise a `ValueError` naming the tensors when the checkpoint's weights do not fit the model."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing tensors {sorted(info['missing_keys'])[:10]}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected tensors {sorted(info['unexpected_keys'])[:10]}")
    if info.get("mismatched_keys") and not allow_mismatched:
        shapes = [
            f"{key}: {tuple(saved)} in the file, {tuple(model)} in the model"
            for key, saved, model in sorted(info["mismatched_keys"])[:10]
        ]
        problems.append(f"tensors of another shape ({'; '.join(shapes)})")
    if problems:
        raise ValueError(
            f"{source}: the weights (model.safetensors) do not match config.json: {', '.join(problems)}. The "
            "checkpoint is damaged or its config.json was edited; outputs would silently change, so it is not loaded."
        )


def read_generation_config_file(source) -> dict | None:
    """The values of a local `generation_config.json` (None without one); raise naming the file when it is not a
    JSON object (transformers would fail with an unrelated error, or fall back to defaults)."""
    path = Path(str(source)) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {type(values).__name__}")
    except (ValueError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a valid generation config ({reason}).") from None
    return values


def check_generation_config(model, values: dict, source) -> None:
    """Raise naming the file when the saved generation settings are invalid for this model."""
    path = Path(str(source)) / "generation_config.json"
    try:
        config = GenerationConfig.from_dict(values)
        config.validate(strict=True)
        check_generation_arguments(model, {"generation_config": config})
    except (ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a valid generation config ({reason}).") from None


__all__ = ["RecurrentPreTrainedModel"]
