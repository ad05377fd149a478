"""What both recurrent families tell transformers about themselves."""

from __future__ import annotations

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


__all__ = ["RecurrentPreTrainedModel"]
