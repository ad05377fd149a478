"""What both recurrent families tell transformers about themselves."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .initialization import init_weights_uniform


class RecurrentPreTrainedModel(PreTrainedModel):
    """Base of the LM and Seq2Seq classes: weight init and the flags `generate()` reads."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
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
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.realign_weights()
        return model

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


__all__ = ["RecurrentPreTrainedModel"]
