"""PNG figures: training and validation loss curves, and attention heatmaps (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curves(log_history: list[dict], path: str | Path, title: str = "loss") -> Path:
    """Training loss (and validation loss when logged) against the optimizer step, from `trainer.state.log_history`."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    valid = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(6, 4))
    if train:
        axes.plot(*zip(*train), label="training")
    if valid:
        axes.plot(*zip(*valid), marker="o", label="validation")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if train or valid:  # a run too short to log anything still gets its (empty) figure
        axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_attention(
    weights: np.ndarray, source_tokens: list[str], target_tokens: list[str], path: str | Path, title: str = ""
) -> Path:
    """Heatmap of attention weights `[target, source]`: row t shows where the decoder looked to produce token t."""
    weights = np.asarray(weights)
    if weights.shape != (len(target_tokens), len(source_tokens)):
        raise ValueError(
            f"weights of shape {weights.shape} do not match {len(target_tokens)} target and "
            f"{len(source_tokens)} source tokens"
        )
    width = max(4.0, 0.35 * len(source_tokens) + 1.5)
    height = max(3.0, 0.35 * len(target_tokens) + 1.5)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(source_tokens)), labels=source_tokens, rotation=90)
    axes.set_yticks(range(len(target_tokens)), labels=target_tokens)
    axes.set_xlabel("source")
    axes.set_ylabel("output")
    if title:  # wrapped to the figure's width, so long sentences stay readable
        axes.set_title(textwrap.fill(title, width=int(width * 12)), fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["plot_attention", "plot_loss_curves"]
