"""Checkpoint averaging: the element-wise mean of the weights of the last checkpoints of one run, a standard NMT
trick (OpenNMT-py's `average_models.py`, fairseq's `average_checkpoints.py`) that usually gains a little BLEU over the
last checkpoint alone.

Checkpoints of both engines are read (folders `checkpoint-<step>` holding `model.safetensors`): Trainer's, which also
hold the config, tokenizer and generation config, and the Accelerate loop's, which hold only the weights (the config
then comes from the run's final `model/` folder). Weights are read from safetensors only (nothing that can run code)
and averaged in float64. Tied weights are stored once; the averaged model ties them again, so they stay tied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
STATE_FILES = ("trainer_state.json", "loop_state.json")  # written last by Trainer / the Accelerate loop


def has_state_file(folder: Path) -> bool:
    """Whether the engine's state file (written last by both engines) is in `folder` and parses."""
    for name in STATE_FILES:
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        return True
    return False


def is_complete_checkpoint(folder: Path) -> bool:
    """A `checkpoint-<step>` folder whose engine finished writing it: its weights and its state file are there."""
    folder = Path(folder)
    if not (CHECKPOINT_PATTERN.fullmatch(folder.name) and folder.is_dir()):
        return False
    has_weights = (folder / WEIGHTS_FILE).is_file() or (folder / f"{WEIGHTS_FILE}.index.json").is_file()
    return has_weights and has_state_file(folder)


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first (by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if is_complete_checkpoint(path)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.fullmatch(path.name)[1]))


def last_checkpoints(run_dir: str | Path, count: int) -> list[Path]:
    """The `count` newest complete checkpoints of a run (`run_dir/checkpoints/`, or `run_dir` itself when it holds
    the checkpoint folders); a `ValueError` when there are fewer."""
    run_dir = Path(run_dir)
    if count < 1:
        raise ValueError(f"--last must be >= 1, got {count}")
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = complete_checkpoints(folder)
    if len(found) < count:
        names = ", ".join(path.name for path in found) or "none"
        raise ValueError(f"{folder}: {count} complete checkpoints needed, found {len(found)} ({names})")
    return found[-count:]


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise ValueError(f"{folder}: no {WEIGHTS_FILE} (weights are read from safetensors only)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: unreadable weights ({str(error).splitlines()[0]})") from None


def average_checkpoints(paths: list[str | Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the weights stored in `paths` (checkpoint folders or `.safetensors` files).

    Every checkpoint must hold the same tensor names and shapes. Floating-point tensors are summed in float64 and
    returned in their stored dtype; other tensors (integer buffers) must be equal in every checkpoint.

    Returns:
        name -> tensor, with the names as stored (tied weights appear once).
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    first = _read_weights(Path(paths[0]))
    sums = {name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in first.items()}
    for path in paths[1:]:
        weights = _read_weights(Path(path))
        if weights.keys() != sums.keys():
            differ = sorted(set(weights) ^ set(sums))
            raise ValueError(f"{path}: holds other tensors than {paths[0]} (first difference: {differ[0]!r})")
        for name, tensor in weights.items():
            if tensor.shape != sums[name].shape:
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"{paths[0]} has {tuple(sums[name].shape)}"
                )
            if tensor.is_floating_point():
                sums[name] += tensor.double()
            elif not torch.equal(tensor, sums[name]):
                raise ValueError(f"{path}: integer tensor {name!r} differs from {paths[0]}; cannot average it")
    return {
        name: (total / len(paths)).to(first[name].dtype) if first[name].is_floating_point() else total
        for name, total in sums.items()
    }


def load_averaged_weights(model: torch.nn.Module, paths: list[str | Path]) -> torch.nn.Module:
    """Put the average of the checkpoints' weights into `model` (in place) and tie its tied weights again.

    A weight missing from the checkpoints is an error unless it is tied to one they hold."""
    averaged = average_checkpoints(paths)
    result = model.load_state_dict(averaged, strict=False)
    # A group of tied weights (e.g. encoder embedding, decoder embedding and output layer) is one tensor, stored
    # once under any one of its names: a missing name is fine when another name of its group was loaded.
    groups: dict[str, set[str]] = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        group = groups.get(target, {target}) | groups.get(source, {source})
        for name in group:
            groups[name] = group
    missing = [key for key in result.missing_keys if not groups.get(key, set()) & averaged.keys()]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[0]!r}" if missing else f"unexpected {result.unexpected_keys[0]!r}"
        raise ValueError(f"{paths[0]}: the checkpoints do not match the model ({problem})")
    model.tie_weights()
    return model


def template_folder(checkpoint: Path) -> Path:
    """Where the config, tokenizer and generation config of a checkpoint are: the checkpoint itself (Trainer), or
    its run's final `model/` folder (the Accelerate loop saves only weights in its checkpoints)."""
    if (checkpoint / "config.json").is_file():
        return checkpoint
    run_model = checkpoint.parent.parent / "model"
    if (run_model / "config.json").is_file():
        return run_model
    raise ValueError(
        f"{checkpoint}: no config.json there or in {run_model}; average the checkpoints of a run whose model/ "
        "folder exists, or Trainer checkpoints"
    )


def averaged_model(paths: list[str | Path]):
    """A model (with its tokenizer) whose weights are the average of the checkpoints in `paths`: built from the
    config of the newest checkpoint's template folder, with its tokenizer and generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    import rnn_seq2seq_hf  # noqa: F401  (registers the model types)

    paths = [Path(path) for path in paths]
    template = template_folder(paths[-1])
    config = AutoConfig.from_pretrained(template, trust_remote_code=False)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    load_averaged_weights(model, paths)
    if (template / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(template)
    tokenizer = AutoTokenizer.from_pretrained(template, trust_remote_code=False)
    return model.eval(), tokenizer


__all__ = [
    "average_checkpoints",
    "has_state_file",
    "averaged_model",
    "complete_checkpoints",
    "is_complete_checkpoint",
    "last_checkpoints",
    "load_averaged_weights",
    "template_folder",
]
