"""Weight initialisation shared by both families.

Uniform in [-r, r] for every weight (embeddings, recurrent and linear layers) and zero biases: the scheme of Zaremba
et al. (2014) and OpenNMT (`param_init 0.1`). transformers' default `_init_weights` handles `nn.LSTM` but not
`nn.GRU` or `nn.RNN`, so this covers every `nn.RNNBase`.

The functions of `transformers.initialization` skip tensors already loaded from a checkpoint.
"""

from __future__ import annotations

from torch import nn
from transformers import initialization as init


def init_weights_uniform(module: nn.Module, init_range: float) -> None:
    """Initialise the parameters owned directly by `module`."""
    if isinstance(module, nn.Embedding):
        init.uniform_(module.weight, -init_range, init_range)
        if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
            init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.Linear):
        init.uniform_(module.weight, -init_range, init_range)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.RNNBase):
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("weight"):
                init.uniform_(param, -init_range, init_range)
            else:
                init.zeros_(param)


__all__ = ["init_weights_uniform"]
