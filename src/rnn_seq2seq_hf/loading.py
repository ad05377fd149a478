"""Loading a model and its tokenizer for the command line, safely and with one-line errors.

What a command may load is decided here, once for every command:
- the installed library's classes only: `trust_remote_code=False` for the model, its config and its tokenizer unless
  the user asked for remote code; transformers then never asks on stdin (which holds the text being translated);
- safetensors weights only (`use_safetensors=True`): a folder with only `pytorch_model.bin`, a pickle that can run
  code when it is loaded, is refused before transformers sees it;
- a local folder, or a Hub id (`owner/name`) looked up with one quick request instead of transformers' minute of
  retries: an id the Hub does not know, or a Hub that cannot be reached (and no cached copy), is one line that says
  both that no such folder exists and what the Hub said.

Every problem is a `ModelLoadError` (a `ValueError`) whose message starts with the argument and the value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT = 10.0  # seconds for the one request that checks a Hub id


class ModelLoadError(ValueError):
    """A model that cannot (or may not) be loaded; the message names the argument and the value."""


def _looks_local(name: str) -> bool:
    # Hub ids are "owner/name"; anything else (absolute, relative, home, one or three parts) is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def _check_folder(folder: Path, label: str) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{label}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if pickles:
            raise ModelLoadError(
                f"{label}: only {pickles[0]} here, a pickle file that can run code when loaded; this command loads "
                "safetensors weights only (load it once in a trusted Python session and save_pretrained() it again)"
            )
        raise ModelLoadError(f"{label}: no weights here (no *.safetensors file)")


def _hub_location(repo_id: str, label: str) -> dict:
    """Extra `from_pretrained` arguments for a Hub id, after checking it with one request (no retries)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {"local_files_only": True}
        raise ModelLoadError(
            f"{label}: no such folder, and HF_HUB_OFFLINE is set and the Hub cache has no model {repo_id!r}"
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_PROBE_TIMEOUT)
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status else str(error).strip().splitlines()[0]
        raise ModelLoadError(
            f"{label}: no such folder, and the Hub at {constants.ENDPOINT} has no model {repo_id!r} you can read "
            f"({reason})"
        ) from None
    except Exception as error:  # connection refused, DNS failure, timeout, proxy errors
        if cached:
            logger.warning("%s: the Hub is not reachable (%s); using the cached copy", label, type(error).__name__)
            return {"local_files_only": True}
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"{label}: no such folder, and the Hub at {constants.ENDPOINT} cannot be reached to look up {repo_id!r} "
            f"({reason})"
        ) from None
    return {}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_model_and_tokenizer(
    name: str,
    kind: str,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    argument: str = "--model",
) -> tuple[PreTrainedModel, object]:
    """The model (`kind` "seq2seq" or "lm"), in eval mode on `device`, and its tokenizer, from a folder or Hub id.

    Raises:
        ModelLoadError: the folder or id does not exist, holds no safetensors weights, needs remote code that was
            not allowed, or holds another kind of model.
    """
    import rnn_seq2seq_hf  # noqa: F401  (registers the model types, so their installed classes are used)

    label = f"{argument} {name}"
    extra: dict = {}
    if _looks_local(name) or Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not folder.exists():
            raise ModelLoadError(f"{label}: no such folder")
        if not folder.is_dir():
            raise ModelLoadError(f"{label}: not a folder")
        _check_folder(folder, label)
        location = str(folder)
    else:
        extra = _hub_location(name, label)
        location = name
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(location, trust_remote_code=trust_remote_code, use_safetensors=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except (ValueError, OSError) as error:
        reason = _first_line(error)
        if "custom code" in reason or "trust_remote_code" in reason:
            raise ModelLoadError(
                f"{label}: this model's config asks to run Python code that comes with it (auto_map); pass "
                "--trust-remote-code to allow that, for models you trust"
            ) from None
        raise ModelLoadError(f"{label}: cannot load a {kind} model here ({reason})") from None
    return model.to(device).eval(), tokenizer


__all__ = ["ModelLoadError", "load_model_and_tokenizer"]
