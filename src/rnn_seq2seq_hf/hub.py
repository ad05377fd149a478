"""Sharing on the Hugging Face Hub.

Every checkpoint saved with this library already carries what the Hub needs (see the package docstring): weights in
safetensors, config.json with `auto_map` (and `custom_pipelines` for Seq2Seq models), the model files for
`trust_remote_code=True` loading, tokenizer and generation config. Pushing is therefore the standard
`model.push_to_hub(repo_id)` / `tokenizer.push_to_hub(repo_id)` / `Trainer(args=TrainingArguments(push_to_hub=True,
...))`. `push_folder` uploads a whole folder written by training (`OUTPUT_DIR/model`, model card and figures
included) in one commit.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError


class HubError(OSError):
    """The Hub could not be reached or refused the upload; the message is one line saying which and why."""


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    commit_message: str = "Upload model trained with rnn_seq2seq_hf",
    revision: str | None = None,
    token: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit; returns the commit URL.

    Raises:
        ValueError: `folder` is not a model folder (no config.json or no weights).
        HubError: offline mode, no login, the Hub cannot be reached, or it refused (one-line message).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no safetensors weights to push")
    if constants.HF_HUB_OFFLINE:
        raise HubError("cannot push: HF_HUB_OFFLINE is set (unset it to reach the Hub)")
    token = token or get_token()
    if not token:
        raise HubError("cannot push: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " (check your token: `hf auth whoami`)" if status in (401, 403) else ""
        raise HubError(f"the Hub refused to push to {repo_id}: {_first_line(error)}{hint}") from None
    except Exception as error:  # connection refused, DNS failure, timeout, proxy errors
        raise HubError(f"cannot reach the Hub at {constants.ENDPOINT} ({_first_line(error)})") from None
    return str(commit)


__all__ = ["HubError", "push_folder"]
