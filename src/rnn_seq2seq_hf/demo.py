"""The README's main job: train an attention Seq2Seq model on generated dates, evaluate it on held-out dates, print
a few beam-search outputs, and write the model, metrics, attention heatmap and model card (see `training.py`)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from pathlib import Path

import datasets

from .demo_data import make_date_pairs
from .recipes import load_recipe
from .training import check_recipe, train_translation

logger = logging.getLogger(__name__)

# A few minutes' job shrunk to seconds, for tests and smoke checks (too short to learn the task well).
QUICK_OVERRIDES = [
    "data.train_pairs=2000",
    "data.test_pairs=60",
    "data.validation_pairs=20",
    "training.max_steps=60",
    "training.warmup_steps=5",
    "training.logging_steps=20",
]


SPELLED_OUT = re.compile(r"the [a-z-]+ of [a-z]+, [a-z -]+")  # "the twenty-eighth of may, two thousand and nine"


def attention_example(sources: list[str]) -> str:
    """The held-out date the heatmap shows: the first one written out in words ("the <ordinal> of <month>, <year>"),
    where every field of the output has its own words in the source."""
    return next((source for source in sources if SPELLED_OUT.fullmatch(source)), sources[0])


def pairs_to_dataset(pairs: list[tuple[str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})


def run_demo(
    output_dir: str | Path, quick: bool = False, overrides: list[str] | None = None, overwrite_output_dir: bool = False
) -> dict:
    """Run the demo into `output_dir`; returns the metrics written to `output_dir/metrics.json`."""
    output_dir = Path(output_dir)
    recipe = check_recipe(load_recipe("demo_dates", (QUICK_OVERRIDES if quick else []) + list(overrides or [])))
    sizes = recipe["data"]
    train_pairs, heldout = make_date_pairs(
        sizes["train_pairs"], sizes["validation_pairs"] + sizes["test_pairs"], seed=recipe["training"].get("seed", 0)
    )
    validation, test = heldout[: sizes["validation_pairs"]], heldout[sizes["validation_pairs"] :]
    logger.info("demo: %d training pairs, %d held-out pairs", len(train_pairs), len(test))
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's log lines; stdout shows the results below
        metrics = train_translation(
            recipe,
            output_dir,
            pairs_to_dataset(train_pairs),
            pairs_to_dataset(validation),
            pairs_to_dataset(test),
            data_description=(
                f"{len(train_pairs):,} synthetic pairs from `rnn_seq2seq_hf.demo_data`: dates between 1900 and "
                "2099 written in eight ways (spelled out, with month names, with weekdays, as dd/mm/yyyy), each "
                "paired with its ISO form. Held-out dates never occur in training."
            ),
            dataset_name="synthetic dates (held-out)",
            dataset_type="rnn_seq2seq_hf/synthetic-dates",
            languages=["en"],
            overwrite_output_dir=overwrite_output_dir,
            # the demo's data is the recipe's own, so its name and description are true of this model
            card_title=recipe.get("name"),
            card_summary=str(recipe.get("description", "")).strip() or None,
            attention_example=attention_example([source for source, _ in validation]),
        )
    outputs = (output_dir / "test_translations.txt").read_text().splitlines()
    print(
        f"\nHeld-out examples ({len(test)} dates never seen in training), beam search with "
        f"{metrics['generation'].get('num_beams', 1)} beams:"
    )
    for (source, reference), output in list(zip(test, outputs))[:8]:
        mark = "ok " if output == reference else "ERR"
        print(f"  [{mark}] {source!r:<55} -> {output}   (expected {reference})")
    summary = {key: round(metrics[key], 2) for key in ("exact_match", "bleu", "chrf")}
    print(f"\nHeld-out scores: {json.dumps(summary)}; training took {metrics['training_seconds']:.0f} s")
    print(f"Wrote {output_dir / 'model'} (model, tokenizer, model card), metrics.json, attention.png, loss.png")
    return metrics


__all__ = ["QUICK_OVERRIDES", "attention_example", "run_demo"]
