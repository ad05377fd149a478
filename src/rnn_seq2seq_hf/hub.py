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

from huggingface_hub import HfApi


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
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no safetensors weights to push")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )
    return str(commit)


__all__ = ["push_folder"]
