"""The Accelerate loop's checkpoint format: safetensors and JSON only, so loading a checkpoint runs no code.

A checkpoint is a folder `checkpoint-<step>/`:

    model.safetensors         the model's weights (tied weights stored once)
    optimizer.safetensors     the optimizer's state tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
    optimizer.json            the rest of the optimizer state: param_groups (lr, betas, eps, ...) as plain values
    scheduler.json            the learning-rate scheduler's state_dict
    scaler.json               the gradient scaler's state_dict (fp16 runs only)
    rng_state_<i>.safetensors process i's torch CPU (and CUDA) generator states
    rng_state_<i>.json        process i's python `random` and numpy generator states
    stream_state_<i>.safetensors  process i's carried recurrent states (truncated-BPTT language models only)
    loop_state.json           where training is (step, epoch, batches consumed, log, logging window, best model, ...)
    manifest.json             format, version, and the size and sha256 of every file above; written last

Nothing is ever unpickled: tensors come from safetensors files (a header of JSON and raw bytes) and everything else
from JSON, decoded by `decode_state` into dicts, lists, tuples, numbers, strings and tensors only. A file that is
not in the manifest is never opened (a stray `optimizer.bin` or `random_states_0.pkl` from an older version is
ignored with a warning).

Writing is atomic: every process writes into `.tmp-checkpoint-<step>/`, each file is flushed to disk, the main
process writes the manifest last and renames the folder to `checkpoint-<step>/` in one step. Reading verifies the
manifest (sizes and sha256) before any file is parsed; a damaged checkpoint is skipped for the previous complete one
with a warning (`choose_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

logger = logging.getLogger(__name__)

FORMAT = "rnn_seq2seq_hf.accelerate_loop"
VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
SCALER_STATE = "scaler.json"
LOOP_STATE = "loop_state.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: damaged, of another run, or not in this format. The message is one line
    that names the checkpoint folder and the file."""


# --- plain state <-> JSON + tensors ------------------------------------------------------------------------------


def encode_state(value, tensors: dict[str, torch.Tensor], key: str = "state"):
    """`value` as JSON-ready data; its tensors go into `tensors` under dotted keys and are referenced by
    `{"__tensor__": key}`. Tuples become `{"__tuple__": [...]}` and dicts with integer keys (optimizer states)
    `{"__int_keys__": {...}}`. Anything else that is not None, bool, int, float or str is refused."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [encode_state(item, tensors, f"{key}.{index}") for index, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(name, str) for name in value):
            if any(name.startswith("__") and name.endswith("__") for name in value):
                raise TypeError(f"cannot store a dict with a key like {sorted(value)[0]!r} at {key!r}")
            return {name: encode_state(item, tensors, f"{key}.{name}") for name, item in value.items()}
        if all(isinstance(name, int) and not isinstance(name, bool) for name in value):
            return {"__int_keys__": {str(n): encode_state(v, tensors, f"{key}.{n}") for n, v in value.items()}}
    raise TypeError(f"cannot store a {type(value).__name__} at {key!r} in a checkpoint ")


def decode_state(value, tensors: dict[str, torch.Tensor]):
    """The inverse of `encode_state`: builds only dicts, lists, tuples, numbers, strings and the referenced tensors."""
    if isinstance(value, list):
        return [decode_state(item, tensors) for item in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            if value["__tensor__"] not in tensors:
                raise KeyError(f"tensor {value['__tensor__']!r} is missing")
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(decode_state(item, tensors) for item in value["__tuple__"])
        if set(value) == {"__int_keys__"}:
            return {int(name): decode_state(item, tensors) for name, item in value["__int_keys__"].items()}
        return {name: decode_state(item, tensors) for name, item in value.items()}
    return value


# --- writing -----------------------------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, allow_nan=True) + "\n")
    fsync(path)


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    fsync(path)


def write_model(path: Path, model: torch.nn.Module) -> None:
    save_model(model, str(path))  # stores each tied (shared) tensor once
    fsync(path)


def rng_files(process_index: int) -> tuple[str, str]:
    return f"rng_state_{process_index}.safetensors", f"rng_state_{process_index}.json"


def process_tensor_file(process_index: int) -> str:
    """The file of process `process_index`'s own tensors (the recurrent states truncated BPTT carries)."""
    return f"stream_state_{process_index}.safetensors"


def write_rng_state(folder: Path, process_index: int) -> None:
    """This process's generator states: torch CPU and CUDA as tensors, python `random` and numpy as JSON."""
    tensor_file, json_file = rng_files(process_index)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    write_tensor_file(folder / tensor_file, tensors)
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    plain = {
        "python": encode_state(random.getstate(), {}),
        "numpy": {
            "bit_generator": name,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    write_json(folder / json_file, plain)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file in `folder`; written last, so a manifest means every file was complete."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    write_json(folder / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders in `output_dir` that were completed (renamed from their temporary name, manifest written),
    oldest first. They are not verified here: see `verify_checkpoint`."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and path.is_dir() and (path / MANIFEST).is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder (complete or not, of this format or not), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def rotate_checkpoints(output_dir: Path, total_limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest complete checkpoints beyond `total_limit`, never `keep` (the best checkpoint)."""
    if not total_limit:
        return
    checkpoints = complete_checkpoints(output_dir)
    for old in checkpoints[:-total_limit]:
        if keep is None or old.name != keep.name:
            shutil.rmtree(old)


def _plain(value, what: str):
    tensors: dict[str, torch.Tensor] = {}
    plain = encode_state(value, tensors, what)
    if tensors:
        raise TypeError(f"the {what} state holds tensors ({sorted(tensors)}); only plain values are stored as JSON")
    return plain


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    loop_state: dict,
    model,
    optimizer,
    scheduler,
    total_limit: int | None = None,
    keep: Path | None = None,
    process_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` atomically (see the module docstring) on every process; returns its folder.

    `loop_state` is the loop's plain state (JSON values). The RNG states and `process_tensors` (this process's own
    tensors, if given) are written by every process, everything else by the main process. Afterwards the oldest
    complete checkpoints beyond `total_limit` are deleted, never `keep` (the best checkpoint).
    """
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_rng_state(temporary, accelerator.process_index)
    if process_tensors is not None:
        write_tensor_file(temporary / process_tensor_file(accelerator.process_index), process_tensors)
    if accelerator.is_main_process:
        write_model(temporary / MODEL_FILE, accelerator.unwrap_model(model))
        plain, tensors = optimizer_state(optimizer)
        write_tensor_file(temporary / OPTIMIZER_TENSORS, tensors)
        write_json(temporary / OPTIMIZER_STATE, plain)
        write_json(temporary / SCHEDULER_STATE, _plain(scheduler.state_dict(), "scheduler"))
        if accelerator.scaler is not None:
            write_json(temporary / SCALER_STATE, _plain(accelerator.scaler.state_dict(), "scaler"))
        write_json(temporary / LOOP_STATE, loop_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(temporary)
        fsync(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)  # the one atomic step: before it the checkpoint does not exist
        fsync(output_dir)
        rotate_checkpoints(output_dir, total_limit, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, accelerator, model, optimizer, scheduler) -> None:
    """Restore model, optimizer, scheduler, gradient scaler and this process's RNG states from a checkpoint that
    `verify_checkpoint` accepted (read its `loop_state.json` with `read_json` first). Reads only safetensors and
    JSON files."""
    manifest = read_json(folder, MANIFEST)
    listed = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    needed = [*rng_files(accelerator.process_index)]
    if accelerator.scaler is not None:
        needed.append(SCALER_STATE)
    for name in needed:
        if name not in listed:
            raise _fail(folder, name, "not listed in the manifest")
    load_model_weights(folder, accelerator.unwrap_model(model))
    load_optimizer(folder, optimizer)
    load_plain_state(folder, SCHEDULER_STATE, scheduler)
    if accelerator.scaler is not None:
        load_plain_state(folder, SCALER_STATE, accelerator.scaler)
    load_rng_state(folder, accelerator.process_index)


# --- reading -----------------------------------------------------------------------------------------------------


def _fail(folder: Path, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{folder / name}: {problem}")


def read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _fail(folder, name, f"not a readable JSON file ({type(error).__name__}: {error})") from None


def read_tensor_file(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / name))
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise _fail(folder, name, f"not a readable safetensors file ({type(error).__name__}: {error})") from None


def verify_checkpoint(folder: Path) -> dict:
    """Check a checkpoint before anything in it is parsed; returns its manifest.

    The manifest must be of this format and list every file a resume reads, each present with the recorded size
    and sha256. Files in the folder that the manifest does not list are never read (a warning names them).

    Raises:
        CheckpointError: naming the first file that is missing, truncated, changed or unreadable.
    """
    if not (folder / MANIFEST).is_file():
        raise _fail(folder, MANIFEST, "missing (not a checkpoint of this format; older versions wrote pickles)")
    manifest = read_json(folder, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise _fail(folder, MANIFEST, f"not a checkpoint of format {FORMAT!r} version {VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(n, str) and _SAFE_NAME.fullmatch(n) and isinstance(e, dict) for n, e in files.items()
    ):
        raise _fail(folder, MANIFEST, "its file list is malformed")
    for name in (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_STATE, SCHEDULER_STATE, LOOP_STATE, *rng_files(0)):
        if name not in files:
            raise _fail(folder, name, "not listed in the manifest")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise _fail(folder, name, "missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise _fail(folder, name, f"truncated or changed ({size} bytes, the manifest says {entry.get('bytes')})")
        if sha256(path) != entry.get("sha256"):
            raise _fail(folder, name, "changed since it was written (sha256 differs from the manifest)")
    strays = sorted(p.name for p in folder.iterdir() if p.name not in files and p.name != MANIFEST)
    if strays:
        logger.warning("%s: ignoring files that are not part of the checkpoint (never read): %s", folder, strays)
    return manifest


def load_model_weights(folder: Path, model: torch.nn.Module) -> None:
    try:
        load_model(model, str(folder / MODEL_FILE), strict=True)
    except Exception as error:
        raise _fail(folder, MODEL_FILE, f"does not fit the model ({type(error).__name__}: {error})") from None
    if hasattr(model, "flatten_recurrent_weights"):
        model.flatten_recurrent_weights()


def optimizer_state(optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(plain part, tensors) of an optimizer's state_dict."""
    tensors: dict[str, torch.Tensor] = {}
    plain = encode_state(optimizer.state_dict(), tensors, "optimizer")
    return plain, tensors


def load_optimizer(folder: Path, optimizer) -> None:
    """Restore an optimizer; the state tensors must have the shapes of the parameters they belong to."""
    plain = read_json(folder, OPTIMIZER_STATE)
    tensors = read_tensor_file(folder, OPTIMIZER_TENSORS)
    try:
        state = decode_state(plain, tensors)
        current = optimizer.state_dict()
        if len(state["param_groups"]) != len(current["param_groups"]):
            raise ValueError("a different number of parameter groups")
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for index, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value) and value.ndim and value.shape != parameters[index].shape:
                    raise ValueError(f"{name} of parameter {index} has shape {list(value.shape)}")
        # JSON has no tuples: give group settings back the types the optimizer uses (betas is a tuple).
        for saved, now in zip(state["param_groups"], current["param_groups"]):
            for key, value in now.items():
                if isinstance(value, tuple) and isinstance(saved.get(key), list):
                    saved[key] = tuple(saved[key])
        optimizer.load_state_dict(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise _fail(folder, OPTIMIZER_STATE, f"does not fit the optimizer ({error})") from None


def read_process_tensors(folder: Path, process_index: int) -> dict[str, torch.Tensor]:
    """This process's own tensors from a checkpoint that `verify_checkpoint` accepted."""
    name = process_tensor_file(process_index)
    manifest = read_json(folder, MANIFEST)
    if name not in (manifest.get("files", {}) if isinstance(manifest, dict) else {}):
        raise _fail(folder, name, "not listed in the manifest (a checkpoint without carried recurrent states)")
    return read_tensor_file(folder, name)


def load_plain_state(folder: Path, name: str, target) -> None:
    """Restore a scheduler or a gradient scaler from its JSON state_dict."""
    try:
        target.load_state_dict(decode_state(read_json(folder, name), {}))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _fail(folder, name, f"does not fit ({error})") from None


def load_rng_state(folder: Path, process_index: int) -> None:
    """Restore this process's generator states."""
    tensor_file, json_file = rng_files(process_index)
    tensors = read_tensor_file(folder, tensor_file)
    plain = read_json(folder, json_file)
    try:
        python_state = decode_state(plain["python"], {})
        numpy_state = plain["numpy"]
        keys = np.array(numpy_state["keys"], dtype=np.uint32)
        if keys.shape != (624,):
            raise ValueError(f"numpy keys of shape {keys.shape}")
        random.setstate(python_state)
        np.random.set_state(
            (
                str(numpy_state["bit_generator"]),
                keys,
                int(numpy_state["position"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise _fail(folder, json_file, f"not a generator state ({error})") from None
    try:
        torch.set_rng_state(tensors["torch"])
        cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state for _, state in cuda])
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise _fail(folder, tensor_file, f"not a generator state ({error})") from None


def choose_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in `output_dir` whose files verify, or None if there is none at all.

    A damaged newer checkpoint (a truncated, missing or changed file) is skipped with a warning naming the file, so
    the run resumes exactly from the previous complete one instead of continuing from a broken state.

    Raises:
        CheckpointError: there are checkpoint folders but none of them verifies.
    """
    problems = []
    for folder in reversed(checkpoint_folders(output_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            logger.warning("resuming from %s; skipped damaged newer checkpoints: %s", folder.name, "; ".join(problems))
        return folder
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {output_dir} ({'; '.join(problems)}): start over in a new output folder, or "
            "move these checkpoints away"
        )
    return None


__all__ = [
    "CheckpointError",
    "checkpoint_folders",
    "choose_checkpoint",
    "complete_checkpoints",
    "decode_state",
    "encode_state",
    "load_checkpoint",
    "load_model_weights",
    "load_optimizer",
    "load_plain_state",
    "load_rng_state",
    "optimizer_state",
    "process_tensor_file",
    "read_json",
    "read_process_tensors",
    "rotate_checkpoints",
    "save_checkpoint",
    "verify_checkpoint",
    "write_json",
    "write_manifest",
    "write_model",
    "write_rng_state",
    "write_tensor_file",
]
