"""The Accelerate loop in one process: logged losses equal Trainer's, label smoothing against a hand computation,
divergence, damaged checkpoints, fingerprints, evaluation schedules, the best model and early stopping, the
progress bar, TensorBoard, and the recipe-section mapping. (Several processes and SIGKILL: test_distributed.py.)"""

import copy
import json
import logging
import math
import sys
import types
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from safetensors.torch import load_file, load_model
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from helpers import tiny_lm_config
from loop_runner import build_model, tokenized_copy_task
from rnn_seq2seq_hf import RNNLMForCausalLM
from rnn_seq2seq_hf.accelerate_loop import (
    LOSS_EXPLOSION_FACTOR,
    CheckpointError,
    LoopArguments,
    LoopState,
    TrainingDivergedError,
    _watch_loss,
    train_with_accelerate,
)
from test_checkpoint_security import rewrite_manifest
from test_trainer import copy_task, lm_task, pad_batch


def lm_model(seed: int = 0, **overrides) -> RNNLMForCausalLM:
    torch.manual_seed(seed)
    return RNNLMForCausalLM(tiny_lm_config(initializer_range=0.1, hidden_size=32, embedding_size=16, **overrides))


def as_dataset(examples: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({key: [e[key] for e in examples] for key in ("input_ids", "labels")})


def loop_args(tmp_path, **overrides) -> LoopArguments:
    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=0.01,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return LoopArguments(**values)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same(a: dict, b: dict, tolerance: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance, msg=name)


class StopAfter(Exception):
    pass


def crash_after(monkeypatch, optimizer_steps: int) -> None:
    """Make the (optimizer_steps + 1)-th optimizer step raise, as if the process died there."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > optimizer_steps:
            raise StopAfter
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


# --- logged losses: the mean of each window, as Trainer logs them -------------------------------------------------


@pytest.mark.parametrize("family", ["seq2seq", "lm"])
def test_the_loop_logs_the_losses_trainer_logs_for_the_same_run(tmp_path, family):
    """8 examples = 2 micro-batches of 4 = one optimizer step per epoch (accumulation 2), so the data order of the
    two engines' samplers does not matter; 4 epochs logged every 2 steps: each entry is the mean of 2 steps."""
    if family == "seq2seq":
        model, examples = (build_model(), copy_task(8, 1))
        trainer_class, args_class = Seq2SeqTrainer, Seq2SeqTrainingArguments
    else:
        model, examples = lm_model(), lm_task(8, 1)
        trainer_class, args_class = Trainer, TrainingArguments
    twin = copy.deepcopy(model)
    settings = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=4,
        learning_rate=0.01,
        lr_scheduler_type="linear",
        warmup_steps=1,
        max_grad_norm=1.0,
        logging_steps=2,
        seed=0,
        disable_tqdm=True,
    )
    trainer = trainer_class(
        model=twin,
        args=args_class(
            output_dir=str(tmp_path / "trainer"),
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            optim="adamw_torch",
            **settings,
        ),
        train_dataset=examples,
        data_collator=pad_batch,
    )
    trainer.train()
    model, state, _ = train_with_accelerate(
        model, as_dataset(examples), pad_batch, LoopArguments(output_dir=str(tmp_path / "loop"), **settings)
    )

    expected = [entry for entry in trainer.state.log_history if "loss" in entry]
    got = [entry for entry in state.log_history if "loss" in entry]
    assert [e["step"] for e in got] == [e["step"] for e in expected] == [2, 4]
    for mine, theirs in zip(got, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["epoch"] == pytest.approx(theirs["epoch"])
    # The old bug logged the window's sum: the mean of 2 steps is about half of it.
    assert got[0]["loss"] < 0.6 * sum(step_loss for step_loss in state.recent_losses[:2])
    assert_same(weights(model), weights(trainer.model), tolerance=1e-5)


# --- label smoothing ---------------------------------------------------------------------------------------------


def smoothed_loss_by_hand(model, examples: list[dict], eps: float) -> float:
    """Sum over every target token of (1 - eps) * -log p(y) + eps * mean_v -log p(v), over the token count; one
    example at a time, no padding, decoder inputs built here."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            source = torch.tensor([example["input_ids"]])
            labels = example["labels"]
            if model.config.is_encoder_decoder:
                decoder_inputs = torch.tensor([[model.config.decoder_start_token_id] + labels[:-1]])
                logits = model(input_ids=source, decoder_input_ids=decoder_inputs).logits[0]
                targets = labels
            else:
                logits = model(input_ids=source).logits[0, :-1]
                targets = labels[1:]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            for position, target in enumerate(targets):
                total += (1 - eps) * -log_probs[position, target].item() + eps * -log_probs[position].mean().item()
                count += 1
    return total / count


@pytest.mark.parametrize("family", ["seq2seq", "lm"])
def test_label_smoothing_gives_the_hand_computed_first_step_loss_with_accumulation(tmp_path, family):
    model, examples = (build_model(), copy_task(8, 2)) if family == "seq2seq" else (lm_model(), lm_task(8, 2))
    expected = smoothed_loss_by_hand(model, examples, eps=0.1)
    # One optimizer step over all 8 examples in 2 accumulated micro-batches of 4.
    args = loop_args(tmp_path, max_steps=1, gradient_accumulation_steps=2, label_smoothing_factor=0.1)
    _, state, _ = train_with_accelerate(model, as_dataset(examples), pad_batch, args)
    assert state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    unsmoothed = smoothed_loss_by_hand(model, examples, eps=0.0)
    assert abs(expected - unsmoothed) > 1e-3  # the smoothing is visible at this precision


# --- divergence --------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_training_and_saves_nothing_after_the_last_good_checkpoint(tmp_path):
    model = build_model()
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.lm_head.register_forward_hook(poison)
    args = loop_args(tmp_path, max_steps=6, save_steps=1)
    with pytest.raises(TrainingDivergedError) as error:
        train_with_accelerate(model, tokenized_copy_task(24, 1), pad_batch, args)
    message = str(error.value)
    assert "step 3" in message and "loss is nan" in message and "checkpoint-2, is intact" in message
    assert "\n" not in message and isinstance(error.value, ValueError)
    run = Path(args.output_dir)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(run.glob(".tmp-*"))


@pytest.mark.parametrize("clipping", [None, 1.0], ids=["no-clipping", "clipping"])
def test_non_finite_gradients_never_reach_a_checkpoint(tmp_path, clipping):
    """An infinite gradient at step 2: with clipping the gradient norm stops the step; without it AdamW turns the
    weights into NaN, which the check before saving catches (the loss is still finite)."""
    model = build_model()
    calls = {"n": 0}

    def poison(gradient):
        calls["n"] += 1
        return torch.full_like(gradient, float("inf")) if calls["n"] == 2 else gradient

    model.lm_head.linear.weight.register_hook(poison)
    args = loop_args(tmp_path, max_steps=4, save_steps=1, max_grad_norm=clipping)
    with pytest.raises(TrainingDivergedError) as error:
        train_with_accelerate(model, tokenized_copy_task(16, 1), pad_batch, args)
    message = str(error.value)
    assert "step 2" in message
    assert ("gradient norm is inf" in message) if clipping else ("non-finite values" in message)
    run = Path(args.output_dir)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    saved = load_file(str(run / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


def test_an_exploding_loss_is_reported(caplog):
    state = LoopState()
    with caplog.at_level(logging.WARNING, logger="rnn_seq2seq_hf.accelerate_loop"):
        for step, loss in enumerate([2.0] * 12 + [2.5, 2.0 * LOSS_EXPLOSION_FACTOR * 1.5]):
            state.step = step + 1
            _watch_loss(state, loss)
    assert len(caplog.records) == 1
    assert "loss exploded at step 14: 300, 147 times the mean of the last 13 steps" in caplog.text


# --- damaged checkpoints and exact logging after resume -----------------------------------------------------------


def train_resume_run(tmp_path, name: str, **overrides):
    model = build_model(hidden_dropout=0.3)
    settings = dict(max_steps=8, save_steps=2, save_total_limit=None, logging_steps=3) | overrides
    args = loop_args(tmp_path / name, **settings)
    return train_with_accelerate(model, tokenized_copy_task(20, 4), pad_batch, args)


def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, caplog):
    reference_model, reference, _ = train_resume_run(tmp_path, "reference")

    with monkeypatch.context() as patch:
        crash_after(patch, optimizer_steps=6)
        with pytest.raises(StopAfter):
            train_resume_run(tmp_path, "crashed")
    run = tmp_path / "crashed" / "run"
    assert (run / "checkpoint-6").is_dir()
    damaged = run / "checkpoint-6" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a disk that lost the end of the file

    with caplog.at_level(logging.WARNING, logger="rnn_seq2seq_hf.checkpointing"):
        model, state, _ = train_resume_run(tmp_path, "crashed")
    assert "resuming from checkpoint-4" in caplog.text and "optimizer.safetensors: truncated" in caplog.text
    assert_same(weights(model), weights(reference_model))
    # logging_steps=3 and checkpoints every 2 steps: the run resumed in the middle of a logging window.
    assert state.log_history == reference.log_history


def scaled_accelerator() -> Accelerator:
    """An Accelerator with a gradient scaler on the CPU (accelerate makes one only for fp16 on GPUs), whose scale
    doubles every 2 steps: its state must be checkpointed for an exact resume."""
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return accelerator


def test_the_gradient_scaler_resumes_exactly(tmp_path, monkeypatch):
    def run(name: str):
        accelerator = scaled_accelerator()
        args = loop_args(tmp_path / name, max_steps=8, save_steps=2, max_grad_norm=None)
        model, state, _ = train_with_accelerate(
            build_model(hidden_dropout=0.3), tokenized_copy_task(20, 4), pad_batch, args, accelerator=accelerator
        )
        return model, state, accelerator.scaler.get_scale()

    reference_model, reference, reference_scale = run("reference")
    assert reference_scale == 2.0**14  # 8 steps without overflow: doubled 4 times
    with monkeypatch.context() as patch:
        crash_after(patch, optimizer_steps=5)
        with pytest.raises(StopAfter):
            run("crashed")
    saved = json.loads((tmp_path / "crashed" / "run" / "checkpoint-4" / "scaler.json").read_text())
    assert saved["scale"] == 2.0**12 and saved["_growth_tracker"] == 0
    model, state, scale = run("crashed")
    assert scale == reference_scale and state.log_history == reference.log_history
    assert_same(weights(model), weights(reference_model))


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    train_resume_run(tmp_path, "run")
    run = tmp_path / "run" / "run"
    for folder in run.glob("checkpoint-*"):
        (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*model.safetensors: truncated"):
        train_resume_run(tmp_path, "run")


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    train_resume_run(tmp_path, "run", fingerprint="recipe-a+data-1", max_steps=2)
    with pytest.raises(CheckpointError) as error:
        train_resume_run(tmp_path, "run", fingerprint="recipe-a+data-2")
    message = str(error.value)
    assert "'recipe-a+data-1'" in message and "'recipe-a+data-2'" in message
    assert "new output folder" in message and "resume=False" in message and "\n" not in message
    # the same fingerprint resumes, and resume=False starts over (removing the other run's checkpoints)
    _, state, _ = train_resume_run(tmp_path, "run", fingerprint="recipe-a+data-1")
    assert [entry["step"] for entry in state.log_history] == [2, 3, 6, 8]  # the entry of step 2 came with it
    _, state, _ = train_resume_run(tmp_path, "run", fingerprint="recipe-b", resume=False, max_steps=2)
    assert [entry["step"] for entry in state.log_history] == [2]
    assert sorted(p.name for p in (tmp_path / "run" / "run").glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    train_resume_run(tmp_path, "run", max_steps=2)
    folder = tmp_path / "run" / "run" / "checkpoint-2"
    plain = json.loads((folder / "loop_state.json").read_text())
    plain["world_size"] = 2
    (folder / "loop_state.json").write_text(json.dumps(plain))
    rewrite_manifest(folder, "loop_state.json")
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1"):
        train_resume_run(tmp_path, "run")


# --- evaluation, best model, early stopping ----------------------------------------------------------------------


def test_evaluation_follows_its_schedule_and_changes_nothing_in_training(tmp_path):
    """Dropout is on: evaluating must not draw from the random generators training uses."""
    data, validation = tokenized_copy_task(16, 1), tokenized_copy_task(5, 2)
    plain_model, plain, metrics = train_with_accelerate(
        build_model(hidden_dropout=0.3), data, pad_batch, loop_args(tmp_path / "plain", num_train_epochs=3)
    )
    assert metrics == {}
    for strategy, steps in (("epoch", [4, 8, 12]), ("steps", [5, 10, 12])):
        args = loop_args(tmp_path / strategy, num_train_epochs=3, eval_strategy=strategy, eval_steps=5)
        model, state, metrics = train_with_accelerate(
            build_model(hidden_dropout=0.3), data, pad_batch, args, eval_dataset=validation
        )
        evaluations = [entry for entry in state.log_history if "eval_loss" in entry]
        assert [entry["step"] for entry in evaluations] == steps
        if strategy == "epoch":
            assert [entry["epoch"] for entry in evaluations] == [1.0, 2.0, 3.0]
        assert metrics == {k: v for k, v in evaluations[-1].items() if k.startswith("eval_")}
        assert_same(weights(model), weights(plain_model))
        assert [e["loss"] for e in state.log_history if "loss" in e] == [e["loss"] for e in plain.log_history]


def scripted_bleu(values: list[float]):
    """compute_metrics that returns the next of `values` at each evaluation."""
    remaining = list(values)
    return lambda predictions, references: {"bleu": remaining.pop(0)}


def word_tokenizer():
    from rnn_seq2seq_hf.tokenization import train_tokenizer

    return train_tokenizer(["a b c d e f g h i j k l m n o p q r s"], kind="word", vocab_size=None)


def test_the_best_checkpoint_by_bleu_is_kept_loaded_and_early_stopping_ends_the_run(tmp_path):
    data, validation, tokenizer = tokenized_copy_task(16, 1), tokenized_copy_task(4, 2), word_tokenizer()
    args = loop_args(
        tmp_path,
        max_steps=12,
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        save_total_limit=1,
        metric_for_best_model="bleu",
        load_best_model_at_end=True,
        early_stopping_patience=3,
        generation_max_new_tokens=3,
    )
    model, state, metrics = train_with_accelerate(
        build_model(), data, pad_batch, args, validation, tokenizer, scripted_bleu([1, 3, 2, 2.5, 2])
    )
    run = Path(args.output_dir)
    # BLEU 1, 3, 2, 2.5, 2: no improvement on 3 for 3 evaluations -> stop after step 5
    assert state.step == 5 and state.stopped_early and state.best_step == 2 and state.best_metric == 3
    assert [e["step"] for e in state.log_history if "loss" in e] == [1, 2, 3, 4, 5]
    # save_total_limit=1 keeps the newest checkpoint and the best one
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]
    best = build_model()
    load_model(best, str(run / "checkpoint-2" / "model.safetensors"))
    assert_same(weights(model), weights(best))
    assert metrics["eval_bleu"] == 3

    # Run again: the run had ended; nothing trains, the best model comes back.
    again, state_again, _ = train_with_accelerate(
        build_model(), data, pad_batch, args, validation, tokenizer, scripted_bleu([])
    )
    assert state_again.log_history == state.log_history
    assert_same(weights(again), weights(model))


def test_load_best_model_without_a_save_schedule_keeps_only_best_checkpoints(tmp_path):
    model = lm_model()
    args = loop_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    _, state, metrics = train_with_accelerate(
        model, as_dataset(lm_task(16, 1)), pad_batch, args, as_dataset(lm_task(4, 2))
    )
    evaluations = {entry["step"]: entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry}
    best = min(evaluations, key=evaluations.get)
    assert state.best_step == best and metrics["eval_loss"] == evaluations[best]
    assert f"checkpoint-{best}" in [p.name for p in Path(args.output_dir).glob("checkpoint-*")]


# --- progress bar and TensorBoard ---------------------------------------------------------------------------------


def test_the_progress_bar_shows_steps_unless_disabled(tmp_path, capsys):
    data = tokenized_copy_task(8, 1)
    train_with_accelerate(build_model(), data, pad_batch, loop_args(tmp_path / "a", max_steps=3, disable_tqdm=False))
    shown = capsys.readouterr().err
    assert "training" in shown and "3/3" in shown and "loss=" in shown
    train_with_accelerate(build_model(), data, pad_batch, loop_args(tmp_path / "b", max_steps=3))
    assert "3/3" not in capsys.readouterr().err


class FakeSummaryWriter:
    instances: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


def test_tensorboard_receives_every_logged_value(tmp_path, monkeypatch):
    """What the loop writes, with a stand-in writer (works without the tensorboard package)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    FakeSummaryWriter.instances.clear()
    args = loop_args(tmp_path, max_steps=4, logging_steps=2, eval_steps=4, save_steps=4, report_to="tensorboard")
    _, state, _ = train_with_accelerate(
        build_model(), tokenized_copy_task(8, 1), pad_batch, args, tokenized_copy_task(4, 2)
    )
    (writer,) = FakeSummaryWriter.instances
    assert writer.log_dir == str(tmp_path / "run" / "runs") and writer.purge_step is None
    losses = [(step, value) for tag, value, step in writer.scalars if tag == "train/loss"]
    assert losses == [(e["step"], e["loss"]) for e in state.log_history if "loss" in e]
    assert ("eval/loss", state.log_history[-1]["eval_loss"], 4) in writer.scalars
    assert {tag for tag, _, _ in writer.scalars} >= {"train/learning_rate", "train/grad_norm", "eval/perplexity"}

    # A resumed run hides, in TensorBoard, what the interrupted run logged after its checkpoint (step 4).
    args = loop_args(tmp_path, max_steps=6, logging_steps=2, save_steps=4, report_to="tensorboard")
    train_with_accelerate(build_model(), tokenized_copy_task(8, 1), pad_batch, args)
    assert FakeSummaryWriter.instances[-1].purge_step == 5


def test_tensorboard_event_files_hold_the_logged_losses(tmp_path):
    """With the real package (skipped where tensorboard is not installed)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args = loop_args(tmp_path, max_steps=4, logging_steps=2, report_to="tensorboard")
    _, state, _ = train_with_accelerate(build_model(), tokenized_copy_task(8, 1), pad_batch, args)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "runs"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_tensorboard_asked_for_but_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    args = loop_args(tmp_path, max_steps=1, report_to="tensorboard")
    with pytest.raises(ValueError, match="tensorboard package is not installed"):
        train_with_accelerate(build_model(), tokenized_copy_task(4, 1), pad_batch, args)
    args = loop_args(tmp_path, max_steps=1, report_to="all")  # "all": what is installed
    train_with_accelerate(build_model(), tokenized_copy_task(4, 1), pad_batch, args)


# --- arguments ---------------------------------------------------------------------------------------------------


def test_a_recipe_section_maps_onto_the_loop_and_typos_are_errors(caplog):
    section = {
        "learning_rate": 0.002,
        "max_steps": -1,
        "num_train_epochs": 2,
        "bf16": True,
        "generation_max_length": 40,
        "eval_strategy": "epoch",
        "metric_for_best_model": "bleu",
        "load_best_model_at_end": True,
        "label_smoothing_factor": 0.1,
        "predict_with_generate": True,
        "dataloader_num_workers": 2,
    }
    with caplog.at_level(logging.WARNING, logger="rnn_seq2seq_hf.loop_arguments"):
        args = LoopArguments.from_training_section("out", section)
    assert args.max_steps is None and args.mixed_precision == "bf16" and args.generation_max_new_tokens == 40
    assert args.metric_key == "eval_bleu" and args.greater_is_better and args.label_smoothing_factor == 0.1
    assert "dataloader_num_workers" in caplog.text and "predict_with_generate" in caplog.text

    with pytest.raises(
        ValueError, match=r"unknown training setting `learning_rat` \(did you mean `learning_rate`\?\)"
    ):
        LoopArguments.from_training_section("out", {"learning_rat": 0.1})
    with pytest.raises(ValueError, match=r"`warmup_ratio` \(did you mean `warmup_steps`\?\)"):
        LoopArguments.from_training_section("out", {"warmup_ratio": 0.1})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"learning_rate": "1e-3"}, r"`learning_rate` must be float, got '1e-3' \(str\) \(YAML reads"),
        ({"max_steps": "abc"}, r"`max_steps` must be int \| None, got 'abc'"),
        ({"logging_steps": 0}, r"`logging_steps` must be >= 1, got 0"),
        ({"learning_rate": math.nan}, r"`learning_rate` must be >= 0, got nan"),
        ({"eval_strategy": "sometimes"}, r"`eval_strategy` must be one of \['no', 'steps', 'epoch'\]"),
        ({"lr_scheduler_type": "linearr"}, r"`lr_scheduler_type` must be one of \["),
        ({"label_smoothing_factor": 1.0}, r"`label_smoothing_factor` must be in \[0, 1\)"),
        ({"load_best_model_at_end": True}, r"`load_best_model_at_end` needs evaluations"),
        ({"early_stopping_patience": 2}, r"`early_stopping_patience` needs evaluations"),
        ({"bf16": True, "fp16": True}, r"`bf16` and `fp16` are both true"),
        ({"optim": "adafactor"}, r"`optim` must be one of \['adamw_torch', 'adamw_torch_fused', 'sgd'\]"),
    ],
)
def test_bad_training_values_are_refused_before_anything_trains(settings, message):
    with pytest.raises(ValueError, match=message):
        LoopArguments.from_training_section("out", settings)


def test_the_example_scripts_parser_reads_every_loop_argument():
    (args,) = HfArgumentParser(LoopArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--report_to", "tensorboard", "--warmup_steps", "0.1", "--eval_strategy", "epoch",
         "--load_best_model_at_end", "--metric_for_best_model", "bleu", "--early_stopping_patience", "3"]
    )  # fmt: skip
    assert args.report_to == ["tensorboard"] and args.warmup_steps == 0.1 and args.early_stopping_patience == 3
    (defaults,) = HfArgumentParser(LoopArguments).parse_args_into_dataclasses(["--output_dir", "x"])
    assert defaults == LoopArguments(output_dir="x")


def test_an_evaluation_that_cannot_work_is_refused_before_training(tmp_path):
    data, validation = tokenized_copy_task(8, 1), tokenized_copy_task(4, 2)
    args = loop_args(tmp_path, max_steps=2, eval_strategy="steps", metric_for_best_model="bleu")
    with pytest.raises(ValueError, match="`metric_for_best_model` is 'bleu', but evaluations give only"):
        train_with_accelerate(build_model(), data, pad_batch, args, validation)  # no compute_metrics
    with pytest.raises(ValueError, match="pass the `tokenizer`"):
        train_with_accelerate(build_model(), data, pad_batch, args, validation, None, scripted_bleu([1, 2]))
    with pytest.raises(ValueError, match="`eval_strategy` is 'steps' but no `eval_dataset`"):
        train_with_accelerate(build_model(), data, pad_batch, args)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_a_time_limit_stops_the_loop_and_saves_the_last_step(tmp_path):
    """`max_train_seconds` (the recipe's `time_limit_minutes`): the loop stops, logs and checkpoints that step."""
    args = loop_args(tmp_path, max_steps=10_000, save_steps=10_000, logging_steps=10_000, max_train_seconds=1e-9)
    _, state, _ = train_with_accelerate(build_model(), tokenized_copy_task(16, 1), pad_batch, args)
    assert state.step == 1
    assert [entry["step"] for entry in state.log_history if "loss" in entry] == [1]
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
